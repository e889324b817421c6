"""Command-line errors: every bad argument of ``python -m scalecert <command>`` ends in one stderr line ``error: …``
with exit status 2 and no traceback, before any data set, certification, audit, benchmark or training starts."""

import argparse

import pytest
import torch

from scalecert import cli, train
from scalecert import data as D
from scalecert.__main__ import main
from scalecert.models import build, save_checkpoint

AUDIT_WITH_PROGRESS = cli.audit_with_progress  # the fixture below replaces it; one test runs it


def _no_work(*args, **kwargs):
    raise AssertionError("the command started real work instead of rejecting its arguments")


@pytest.fixture(autouse=True)
def no_real_work(monkeypatch):
    """Any data loading, certification, audit, benchmark, training or re-measurement fails the test."""
    for module, name in (
        (cli, "eval_subset"),
        (cli, "run_certify"),
        (cli, "bench_one"),
        (cli, "audit_with_progress"),
        (D, "load_dataset"),
        (D, "main"),
        (D, "prepare"),
        (train, "train"),
        (train, "recalibrate_bn"),
        (train, "remeasure"),
    ):
        monkeypatch.setattr(module, name, _no_work)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A small SIN checkpoint with its card (loads in well under a second)."""
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    save_checkpoint(build("resnet20", 10, 1, 0.2), path, {"name": "m", "dataset_key": "cifar10"})
    return str(path)


def error_line(capsys, argv) -> str:
    """Run ``python -m scalecert`` with argv in-process; assert exit status 2 and one ``error:`` line; return it."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------ unknown data set


@pytest.mark.parametrize(
    "argv",
    [
        ["certify", "--dataset", "nope"],
        ["audit", "--dataset", "nope"],
        ["train", "--name", "x", "--dataset", "nope"],
        ["data", "cifar10", "nope"],
        ["ablation", "--dataset", "nope"],
    ],
)
def test_unknown_dataset(capsys, argv):
    assert "unknown dataset 'nope'" in error_line(capsys, argv)


# ------------------------------------------------------------------ unknown model / missing checkpoint file


@pytest.mark.parametrize(
    "argv",
    [
        ["certify", "--checkpoint", "no_such_model"],
        ["audit", "--checkpoint", "no_such_model"],
        ["train", "--name", "x", "--init", "no_such_model"],
        ["recalibrate", "no_such_model"],
    ],
)
def test_unknown_checkpoint_name(capsys, argv):
    assert "unknown model 'no_such_model'" in error_line(capsys, argv)


def test_missing_checkpoint_file(capsys, tmp_path):
    missing = str(tmp_path / "missing.pt")
    assert f"unknown model '{missing}'" in error_line(capsys, ["certify", "--checkpoint", missing])


def test_no_shipped_checkpoint_for_the_dataset(capsys):
    assert "no shipped checkpoint for imagenet" in error_line(capsys, ["certify", "--dataset", "imagenet"])


def test_checkpoint_without_card(capsys, ckpt, tmp_path):
    bare = tmp_path / "bare.pt"
    bare.write_bytes(open(ckpt, "rb").read())  # no card beside it: load_model refuses it
    assert "no card with a sha256" in error_line(capsys, ["certify", "--checkpoint", str(bare)])


# ------------------------------------------------------------------ patch larger than the image, or not positive


@pytest.mark.parametrize(
    "argv",
    [
        ["certify", "--patch", "200"],
        ["certify", "--dataset", "imagenette", "--patch", "150"],
        ["audit", "--quick", "--patch", "200"],
        ["train", "--name", "x", "--occlude", "2.4,200"],
    ],
)
def test_patch_larger_than_the_image(capsys, ckpt, argv):
    argv = argv + (["--checkpoint", ckpt] if argv[0] != "train" else [])
    assert "more than the whole image" in error_line(capsys, argv)


def test_ablation_checks_its_patch_and_defences_before_any_work(capsys):
    assert "more than the whole image" in error_line(capsys, ["ablation", "--dataset", "cifar10", "--patch", "200"])
    err = error_line(capsys, ["ablation", "--dataset", "cifar10", "--defences", "sc,nope"])
    assert "unknown defence(s) nope" in err


@pytest.mark.parametrize("patch", ["0", "-3", "nan", "inf"])
def test_patch_not_positive(capsys, ckpt, patch):
    assert "patch must be a positive" in error_line(capsys, ["certify", "--checkpoint", ckpt, f"--patch={patch}"])


# ------------------------------------------------------------------ tau outside (0, 1]


@pytest.mark.parametrize("tau", ["7", "1.0001", "0", "-0.5", "nan"])
def test_tau_outside_unit_interval(capsys, ckpt, tau):
    line = error_line(capsys, ["certify", "--checkpoint", ckpt, f"--tau={tau}"])
    assert "argument --tau: overlap ratio tau must lie in (0, 1]" in line


@pytest.mark.parametrize(
    "argv", [["audit", "--tau", "7"], ["bench", "--tau", "7"], ["train", "--name", "x", "--occlude-tau", "7"]]
)
def test_tau_outside_unit_interval_other_commands(capsys, argv):
    assert "tau must lie in (0, 1]" in error_line(capsys, argv)


def test_tau_not_a_number(capsys):
    assert "argument --tau: expected a number, got 'x'" in error_line(capsys, ["certify", "--tau", "x"])


def test_tau_one_and_small_are_accepted():
    assert cli.overlap_ratio("1") == 1.0 and cli.overlap_ratio("0.3") == 0.3 and cli.overlap_ratio("1e-9") == 1e-9
    for bad in ("0", "1.5", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.overlap_ratio(bad)


# ------------------------------------------------------------------ r < 1


@pytest.mark.parametrize(
    "argv", [["certify", "--window-r", "0"], ["audit", "--window-r", "-2"], ["train", "--name", "x", "--r", "0"]]
)
def test_r_below_one(capsys, argv):
    assert "must be >= 1" in error_line(capsys, argv)


# ------------------------------------------------------------------ unknown device


@pytest.mark.parametrize(
    "command",
    [
        ["certify"],
        ["audit"],
        ["bench"],
        ["train", "--name", "x"],
        ["recalibrate", "no_such_model"],
        ["remeasure", "no_such_model"],
    ],
)
def test_unknown_device(capsys, command):
    assert "argument --device: unknown device 'nope'" in error_line(capsys, command + ["--device", "nope"])


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_device_without_cuda(capsys, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA is not available" in error_line(capsys, ["certify", "--device", device])


def test_device_names():
    assert cli.device_name("cpu") == "cpu"
    for bad in ("nope", "meta", "cuda:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.device_name(bad)


# ------------------------------------------------------------------ --images below its minimum


@pytest.mark.parametrize(
    "argv", [["certify", "--images", "-1"], ["audit", "--images", "-1"], ["bench", "--images", "-1"]]
)
def test_negative_images(capsys, argv):
    assert "argument --images: must be >= 0" in error_line(capsys, argv)


def test_recalibrate_images_zero(capsys):
    assert "argument --images: must be >= 1" in error_line(capsys, ["recalibrate", "no_such_model", "--images", "0"])


def test_images_not_an_integer(capsys):
    assert "argument --images: expected an integer, got '2.5'" in error_line(capsys, ["certify", "--images", "2.5"])


def test_audit_of_the_whole_split_shows_progress_from_the_start(capsys, monkeypatch, ckpt):
    # audit --images 0 is the whole split: its progress bar is there before the first image is audited
    seen = {}
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2])

    def subset(dataset, n, seed=0):
        seen["n"] = n
        return x, y, [0, 1, 2]

    def first_image(*args, **kwargs):
        seen["stderr"] = capsys.readouterr().err
        raise KeyboardInterrupt  # stop before any real audit work

    import scalecert.audit

    monkeypatch.setattr(cli, "audit_with_progress", AUDIT_WITH_PROGRESS)
    monkeypatch.setattr(cli, "eval_subset", subset)
    monkeypatch.setattr(scalecert.audit, "audit", first_image)
    with pytest.raises(KeyboardInterrupt):
        main(["audit", "--checkpoint", ckpt, "--images", "0"])
    assert seen["n"] == 0
    assert "audit sound (images)" in seen["stderr"] and "0/3" in seen["stderr"]


# ------------------------------------------------------------------ SIN layer and rate the checkpoint cannot take


def test_unknown_sin_layer(capsys, ckpt):
    assert "unknown superficial layer 0" in error_line(capsys, ["certify", "--checkpoint", ckpt, "--layer", "0"])


def test_sin_rate_outside_unit_interval(capsys, ckpt):
    assert "SIN rate must lie in (0, 1]" in error_line(capsys, ["certify", "--checkpoint", ckpt, "--rate", "2"])


# ------------------------------------------------------------------ commands and options argparse itself rejects


@pytest.mark.parametrize(
    "argv",
    [
        ["certify", "--bogus"],
        ["models", "--bogus"],
        ["cache", "--bogus"],
        ["data", "--bogus"],
        ["certify", "--mode", "nope"],
        ["train", "--dataset", "cifar10"],
    ],
)
def test_argparse_errors_are_one_line(capsys, argv):
    error_line(capsys, argv)


@pytest.mark.parametrize("argv", [["nope"], []])
def test_unknown_or_missing_command(capsys, argv):
    assert "usage: python -m scalecert {" in error_line(capsys, argv)


@pytest.mark.parametrize(
    "argv",
    [
        [
            "certify",
            "--tau",
            "1",
            "--window-r",
            "1",
            "--images",
            "0",
            "--patch",
            "2.4",
            "--device",
            "cpu",
            "--layer",
            "1",
        ],
        ["audit", "--quick", "--tau", "0.3", "--dataset", "CIFAR-10", "--patch", "100"],
        ["train", "--name", "x", "--occlude", "2.4,5", "--occlude-tau", "0.3", "--r", "1", "--device", "cpu"],
        ["recalibrate", "CKPT", "--images", "1"],
        ["bench", "--tau", "1", "--images", "0"],
        ["data", "cifar10", "imagenette-224"],
    ],
)
def test_valid_arguments_get_past_the_checks(capsys, ckpt, argv):
    # the checks reject nothing valid: each command goes on until the first real work (stopped by the fixture)
    argv = [ckpt if x == "CKPT" else x for x in argv]
    argv += ["--checkpoint", ckpt] if argv[0] in ("certify", "audit") else []
    with pytest.raises(AssertionError, match="started real work"):
        main(argv)
    assert "error" not in capsys.readouterr().err


def test_a_real_process_exits_2_with_one_line():
    # the one test through a real interpreter (the others run main() in-process): what a shell sees
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, "-m", "scalecert", "certify", "--tau", "7"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        timeout=120,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [p.stderr.strip()] and p.stderr.startswith("error: argument --tau: ")


def test_help_is_not_an_error(capsys):
    assert main(["-h"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m scalecert")


def test_int_at_least():
    check = cli.int_at_least(0, " (0 = all)")
    assert check("0") == 0 and check("12") == 12
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be >= 0 \(0 = all\), got -1"):
        check("-1")
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer"):
        check("1.5")
