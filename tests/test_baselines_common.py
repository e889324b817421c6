"""The helpers the peer defences share (scalecert/baselines/__init__.py)."""

import importlib
import inspect

import numpy as np
import pytest
import torch

from scalecert.baselines import add_run_args, balanced_ids, patch_arg
from scalecert.data import ImageSet


def test_patch_arg_reads_pixels_or_percent():
    assert patch_arg("5px") == 5 and isinstance(patch_arg("5px"), int)
    assert patch_arg("2.4") == 2.4 and isinstance(patch_arg("2"), float)
    with pytest.raises(ValueError):
        patch_arg("big")


def test_balanced_ids_all_or_a_seeded_balanced_subset():
    ds = ImageSet(
        torch.zeros(40, 3, 4, 4, dtype=torch.uint8).numpy(), np.repeat(np.arange(4), 10), list("abcd"), "toy", "test"
    )
    for n in (0, -1, 40, 100):
        assert balanced_ids(ds, n, 0).tolist() == list(range(40))
    sub = balanced_ids(ds, 8, 1)
    assert len(sub) == 8 and np.bincount(ds.labels[sub]).tolist() == [2, 2, 2, 2]
    assert sub.tolist() == balanced_ids(ds, 8, 1).tolist() != balanced_ids(ds, 8, 2).tolist()


@pytest.mark.parametrize(
    "module, trainer", [("bagnet", "train_bagnet"), ("ibp", "train_ibp"), ("smoothing", "train_ds")]
)
def test_every_peer_trainer_takes_the_shared_run_options(module, trainer, monkeypatch, tmp_path):
    mod = importlib.import_module(f"scalecert.baselines.{module}")
    signature, seen = inspect.signature(getattr(mod, trainer)), {}

    def fake(*args, **kw):
        seen.update(signature.bind(*args, **kw).arguments)
        return {"name": "m", "clean_accuracy": 1.0, "certified_accuracy": 1.0, "base_accuracy": 1.0, "sha256": "x"}

    monkeypatch.setattr(mod, trainer, fake)
    assert (
        mod.main(
            [
                "train",
                "--name",
                "m",
                "--seed",
                "3",
                "--threads",
                "1",
                "--save-every",
                "5",
                "--max-train",
                "7",
                "--device",
                "cpu",
                "--out-dir",
                str(tmp_path / "ck"),
                "--runs-dir",
                str(tmp_path / "runs"),
            ]
        )
        == 0
    )
    shared = (seen["seed"], seen["threads"], seen["save_every"], seen["max_train"], seen["device"])
    assert shared == (3, 1, 5.0, 7, "cpu")
    assert (seen["out_dir"], seen["runs_dir"]) == (str(tmp_path / "ck"), str(tmp_path / "runs"))


def test_add_run_args_defaults_are_the_trainers_defaults():
    import argparse

    p = argparse.ArgumentParser()
    add_run_args(p)
    a = vars(p.parse_args([]))
    assert a == {
        "seed": 0,
        "threads": 0,
        "save_every": 600.0,
        "max_train": 0,
        "device": "cpu",
        "out_dir": None,
        "runs_dir": None,
    }
