import json

import numpy as np
import pytest
import torch
import torchvision

from scalecert import data as D
from scalecert.data import augment
from scalecert.geometry import rect_masks
from scalecert.models import (
    ARCHS,
    CHECKPOINT_DIR,
    build,
    from_torchvision_state,
    load_model,
    rest_channels_last,
    round_to_storage,
    save_checkpoint,
)
from scalecert.train import evaluate, random_window_exclude, worst_window_exclude


def test_tampered_checkpoint_is_refused(tmp_path):
    m = build("resnet20", 10, 1, 0.1)
    card = save_checkpoint(m, tmp_path / "m.pt", {"name": "m"})
    assert load_model(tmp_path / "m.pt").sin_rate == 0.1
    blob = bytearray((tmp_path / "m.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tmp_path / "m.pt").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="sha256"):
        load_model(tmp_path / "m.pt")
    assert json.loads((tmp_path / "m.json").read_text())["sha256"] == card["sha256"]


def test_fp16_roundtrip_keeps_predictions(tmp_path):
    torch.manual_seed(0)
    m = build("resnet20", 10).eval()
    save_checkpoint(m, tmp_path / "m.pt", {})
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m(x), load_model(tmp_path / "m.pt")(x), atol=2e-2)


def test_a_model_rounded_to_storage_is_exactly_the_model_that_loads(tmp_path):
    from conftest import randomise_bn

    torch.manual_seed(0)
    m = rest_channels_last(randomise_bn(build("resnet20", 10, 1, 0.2)).eval())
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp32 = m(x)
        save_checkpoint(m, tmp_path / "raw.pt", {})
        assert not torch.equal(fp32, load_model(tmp_path / "raw.pt")(x))  # what cards measured until 2026-12-06
        round_to_storage(m)
        save_checkpoint(m, tmp_path / "m.pt", {})
        loaded = load_model(tmp_path / "m.pt")
        assert torch.isfinite(fp32).all() and torch.equal(m(x), loaded(x))
        state = loaded.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    # rounding again changes nothing, so the sha256 of what ships does not depend on how often it was rounded
    assert (
        save_checkpoint(round_to_storage(m), tmp_path / "again.pt", {})["sha256"]
        == json.loads((tmp_path / "m.json").read_text())["sha256"]
    )


@pytest.mark.parametrize(
    "loader",
    [
        "scalecert.models.load_model",
        "scalecert.baselines.bagnet.load_bagnet",
        "scalecert.baselines.smoothing.load_ds",
        "scalecert.baselines.ibp.load_ibp",
    ],
)
def test_a_checkpoint_with_non_finite_weights_is_refused_by_every_loader(tmp_path, loader):
    import hashlib
    import importlib
    import io

    module, fn = loader.rsplit(".", 1)
    load = getattr(importlib.import_module(module), fn)
    m = build("resnet20", 10, 1, 0.1)
    state = m.state_dict()
    state["head.2.weight"][0, 0] = float("inf")  # as an older save_checkpoint could have written after fp16 overflow
    buf = io.BytesIO()
    torch.save({"arch": "resnet20", "num_classes": 10, "sin_layer": 1, "sin_rate": 0.1, "state": state}, buf)
    (tmp_path / "m.pt").write_bytes(buf.getvalue())
    (tmp_path / "m.json").write_text(json.dumps({"sha256": hashlib.sha256(buf.getvalue()).hexdigest()}))
    with pytest.raises(ValueError, match="non-finite weights in \\['head.2.weight'\\]"):
        load(tmp_path / "m.pt")
    before = (tmp_path / "m.pt").read_bytes()
    with pytest.raises(ValueError, match="NaN or infinite"):  # and nothing writes one any more
        save_checkpoint(m, tmp_path / "m.pt", {}, half=False)
    assert (tmp_path / "m.pt").read_bytes() == before and list(tmp_path.glob(".*")) == []


def test_rounding_to_storage_refuses_weights_that_fp16_cannot_hold_before_anything_is_measured():
    m = build("resnet20", 10, 1, 0.1)
    m.head[2].weight.data[0, 0] = 1e6
    with pytest.raises(ValueError, match="beyond ±65504 once rounded to fp16: \\['head.2.weight'\\]"):
        round_to_storage(m)
    assert m.head[2].weight[0, 0] == 1e6  # untouched: a refused rounding changes no weight
    m.head[2].weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        round_to_storage(m)


def test_remeasure_rewrites_the_card_with_the_stored_weights_accuracy(tmp_path, monkeypatch):
    from conftest import randomise_bn

    from scalecert import train

    ds = D.load_dataset("cifar10", "test")
    small = D.ImageSet(ds.images[ds.subset(5)], ds.labels[ds.subset(5)], ds.classes, "cifar10", "test")
    monkeypatch.setattr(D, "load_dataset", lambda name, split: small)
    card = {"name": "m", "dataset_key": "cifar10", "accuracy_with_sin": -1.0, "accuracy_without_sin": -2.0}
    torch.manual_seed(0)
    save_checkpoint(randomise_bn(build("resnet20", 10, 1, 0.2)), tmp_path / "m.pt", card)
    new = train.remeasure(tmp_path / "m.pt")
    stored = load_model(tmp_path / "m.pt")
    assert new["accuracy_with_sin"] == evaluate(stored, small)
    assert new["accuracy_without_sin"] == evaluate(stored, small, sin=False)
    assert new["accuracy_before_remeasure"]["accuracy_with_sin"] == -1.0
    assert new["accuracy_measured_on"] == train.MEASURED_ON
    assert json.loads((tmp_path / "m.json").read_text()) == new
    assert train.remeasure(tmp_path / "m.pt") is None  # already measured on the stored weights
    again = train.remeasure(tmp_path / "m.pt", force=True)
    assert again["accuracy_before_remeasure"]["accuracy_with_sin"] == -1.0  # the fp32-era numbers are kept
    load_model(tmp_path / "m.pt")  # the card still matches the weights' sha256


def test_remeasure_command_reports_each_name_it_cannot_remeasure_and_goes_on(tmp_path, monkeypatch, capsys):
    from scalecert import train
    from scalecert.__main__ import main

    ds = D.load_dataset("cifar10", "test")
    small = D.ImageSet(ds.images[ds.subset(2)], ds.labels[ds.subset(2)], ds.classes, "cifar10", "test")
    monkeypatch.setattr(D, "load_dataset", lambda name, split: small)
    common = {"dataset_key": "cifar10", "accuracy_with_sin": -1.0, "accuracy_without_sin": -2.0}
    save_checkpoint(build("resnet20", 10, 1, 0.2), tmp_path / "other_split.pt", dict(common, eval_images=999))
    save_checkpoint(build("resnet20", 10), tmp_path / "peer.pt", {"dataset_key": "cifar10", "clean_accuracy": 50.0})
    save_checkpoint(build("resnet20", 10, 1, 0.2), tmp_path / "good.pt", dict(common, eval_images=len(small)))
    before = (tmp_path / "other_split.json").read_text()
    rc = main(
        [
            "remeasure",
            str(tmp_path / "other_split.pt"),
            "no_such_model",
            str(tmp_path / "peer.pt"),
            str(tmp_path / "good.pt"),
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 1
    assert "counts 999 evaluation images" in err and "unknown model 'no_such_model'" in err
    assert "peer: not a ScaleCert checkpoint card" in err
    assert err.strip().endswith(f"not re-measured: {tmp_path / 'other_split.pt'} no_such_model {tmp_path / 'peer.pt'}")
    assert (tmp_path / "other_split.json").read_text() == before
    assert json.loads(out)["accuracy_before_remeasure"]["accuracy_with_sin"] == -1.0  # the good one went on
    assert main(["remeasure", str(tmp_path / "good.pt")]) == 0
    assert "already measured on the stored weights" in capsys.readouterr().err
    assert json.loads((tmp_path / "good.json").read_text())["accuracy_measured_on"] == train.MEASURED_ON


@pytest.mark.parametrize("arch,n,layer", [("resnet20", 32, 1), ("resnet20", 32, 2), ("resnet18w16", 64, 1)])
def test_channels_last_rest_keeps_the_stem_bit_identical_and_the_logits(arch, n, layer):
    torch.manual_seed(0)
    ref = build(arch, 10, layer, 0.2).eval()
    fast = rest_channels_last(build(arch, 10, layer, 0.2).eval())
    fast.load_state_dict(ref.state_dict())
    x = torch.rand(4, 3, n, n)
    with torch.no_grad():
        assert torch.equal(fast.stem(x), ref.stem(x))  # SIN(x) and the candidates cannot move
        f = ref.stem(x)
        assert torch.allclose(fast.rest(f), ref.rest(f), atol=1e-5)
    convs = [(i, m) for i, u in enumerate(fast.units) for m in u.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) == (i >= layer) for i, m in convs)
    # moving the SIN layer and converting again puts the new stem back in the default layout
    rest_channels_last(fast.set_sin(layer + 1, 0.2))
    assert all(m.weight.is_contiguous() for i, m in convs if i < layer + 1)


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    m = build("resnet20", 10, 1, 0.2).train()
    x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_worst_of_k_occlusion_picks_the_highest_loss_window_and_keeps_bn_statistics():
    from conftest import calibration_images, spread_model

    m = spread_model(rate=0.2).train()
    x = calibration_images(6, 32, 9)
    y = torch.arange(6) % 10
    bn = [t.clone() for t in m.state_dict().values() if t.dtype == torch.float32]
    got = worst_window_exclude(m, x, y, [4, 7], 5, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # the same five draws, scored one by one
    draws = [random_window_exclude(m, 32, [4, 7], 6, g) for _ in range(5)]
    m.eval()
    with torch.no_grad():
        loss = torch.stack([torch.nn.functional.cross_entropy(m(x, d), y, reduction="none") for d in draws])
    want = torch.stack([draws[int(loss[:, i].argmax())][i] for i in range(6)])
    assert torch.equal(got, want)
    assert len({int(loss[:, i].argmax()) for i in range(6)}) > 1  # not always the same draw
    assert all(torch.equal(a, b) for a, b in zip(bn, [t for t in m.state_dict().values() if t.dtype == torch.float32]))
    assert torch.equal(worst_window_exclude(m, x, y, [4, 7], 1, torch.Generator().manual_seed(1)), draws[0])


def test_feature_shape_probe_leaves_batchnorm_statistics_alone():
    m = build("resnet20", 10, 1, 0.2).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert m.feature_shape(32) == (16, 32, 32) and m.training
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # it moved them until 2026-11-25


class _Images:
    """A stand-in for data.ImageSet: fixed random images."""

    def __init__(self, n, seed=0):
        self.x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def tensors(self, idx):
        idx = torch.as_tensor(np.asarray(idx))
        return self.x[idx], torch.zeros(len(idx), dtype=torch.long)


def test_recalibrated_statistics_are_the_exact_batch_moments_and_forget_the_old_ones():
    from scalecert.train import recalibrate_bn

    torch.manual_seed(0)
    m = build("resnet20", 10, 1, 0.2)
    ds = _Images(96)
    for mod in m.modules():  # statistics from elsewhere must not matter
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.fill_(5.0)
    bn = next(mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d))
    seen = []
    hook = bn.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach().clone()))
    assert recalibrate_bn(m, ds, 96, batch=96) == 96 and not m.training
    hook.remove()
    (z,) = seen  # the first BatchNorm's input (after the input normalisation and the first convolution)
    assert torch.allclose(bn.running_mean, z.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, z.var((0, 2, 3), unbiased=True), rtol=1e-4)
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 1
    m2 = build("resnet20", 10, 1, 0.2)
    m2.load_state_dict(
        {k: v for k, v in m.state_dict().items() if "running" not in k and "tracked" not in k}, strict=False
    )
    recalibrate_bn(m2, ds, 96, batch=96)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def test_recalibrate_command_rewrites_checkpoint_and_card_once(tmp_path, capsys, monkeypatch):
    import scalecert.train as T
    from scalecert.train import recalibrate_main

    real = T.evaluate  # the card's accuracies on 200 test images, not the whole split (20,000 forwards)
    monkeypatch.setattr(T, "evaluate", lambda model, ds, idx=None, **kw: real(model, ds, np.arange(200), **kw))
    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    card = {"name": "m", "dataset_key": "cifar10", "accuracy_with_sin": 1.0, "accuracy_without_sin": 2.0}
    old = save_checkpoint(build("resnet20", 10, 1, 0.2), path, card)
    assert recalibrate_main([str(path), "--images", "64", "--batch-size", "32"]) == 0
    card = json.loads((tmp_path / "m.json").read_text())
    r = card["bn_recalibration"]
    assert r["before"] == {"accuracy_with_sin": 1.0, "accuracy_without_sin": 2.0, "sha256": old["sha256"]}
    assert r["images_used"] == 64 and card["sha256"] != old["sha256"] and 0 <= card["accuracy_with_sin"] <= 100
    assert load_model(path).card["sha256"] == card["sha256"]  # the loader accepts the rewritten file
    assert "path" not in card  # the loader's note of where it found the file is not written into the card
    assert recalibrate_main([str(path), "--images", "64", "--batch-size", "32"]) == 0
    assert "already recalibrated" in capsys.readouterr().err
    assert json.loads((tmp_path / "m.json").read_text()) == card


def test_sin_forward_keeps_at_most_k_positions():
    m = build("resnet18w16", 10, 2, 0.1).eval()
    seen = {}
    m.units[2].register_forward_pre_hook(lambda mod, inp: seen.setdefault("f", inp[0]))
    m(torch.rand(2, 3, 64, 64))
    nz = (seen["f"] != 0).any(1).flatten(1).sum(1)
    assert (nz <= round(0.1 * 16 * 16)).all()


def test_torchvision_weights_load_into_the_split_layout():
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    m = from_torchvision_state("resnet18", tv.state_dict(), num_classes=10).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m(x), tv(m.normalize(x)), atol=1e-5)


def test_augment_keeps_range_and_shape():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 32, 32)
    out = augment(x, 4, g)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)


def test_unknown_architecture_and_model_name():
    with pytest.raises(ValueError, match="architecture"):
        build("vgg16")
    with pytest.raises(ValueError, match="unknown model"):
        load_model("no_such_model")


# the ScaleCert models (peer defences' checkpoints have their own architectures and loaders)
CHECKPOINTS = sorted(
    p.stem for p in CHECKPOINT_DIR.glob("*.pt") if json.loads(p.with_suffix(".json").read_text())["arch"] in ARCHS
)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_card_accuracy_holds_on_a_subset(name):
    """Each shipped card's accuracy, re-measured on a seeded 200-image subset, within 7 points (about 3 sigma)."""
    m = load_model(name)
    card = m.card
    ds = D.load_dataset(card["dataset_key"], "eval")
    idx = ds.subset(20, seed=123)
    key = "accuracy_with_sin" if m.sin is not None else "accuracy_without_sin"
    acc = evaluate(m, ds, idx, batch=100)
    assert abs(acc - card[key]) <= 7.0, (acc, card[key])


def test_finished_training_job_is_not_redone(tmp_path, monkeypatch):
    import json

    from scalecert import train as T

    monkeypatch.setattr(T, "RUNS_DIR", tmp_path / "runs")
    a = T.parse(["--name", "m", "--dataset", "cifar10", "--epochs", "4", "--out-dir", str(tmp_path)])
    assert T.finished_card(a) is None  # no run yet
    (tmp_path / "runs" / "m").mkdir(parents=True)
    (tmp_path / "runs" / "m" / "state.pt").write_bytes(b"x")
    card = {"name": "m", "status": "provisional: snapshot", "epochs_done": 2, "note": "hand-written"}
    (tmp_path / "m.json").write_text(json.dumps(card))
    assert T.finished_card(a) is None  # provisional card: training continues
    card.update(status="final", epochs_done=4)
    (tmp_path / "m.json").write_text(json.dumps(card))
    assert T.train(a) == card  # returns at once, card (and its note) untouched
    assert json.loads((tmp_path / "m.json").read_text())["note"] == "hand-written"
    assert (
        T.finished_card(T.parse(["--name", "m", "--dataset", "cifar10", "--epochs", "8", "--out-dir", str(tmp_path)]))
        is None
    )  # more epochs asked: resume


def test_models_table_reads_every_card(tmp_path):
    import json

    from scalecert.cli import models_table

    (tmp_path / "a.json").write_text(
        json.dumps(
            {
                "name": "a",
                "status": "final",
                "sin_layer": 1,
                "sin_rate": 0.1,
                "accuracy_with_sin": 70.0,
                "accuracy_without_sin": 60.0,
                "epochs_done": 5,
                "epochs": 5,
                "train_seconds": 7200,
            }
        )
    )
    (tmp_path / "b.json").write_text(
        json.dumps(
            {
                "name": "b",
                "status": "provisional: snapshot",
                "sin_rate": None,
                "accuracy_without_sin": 80.0,
                "epochs_done": 2,
                "epochs": 9,
            }
        )
    )
    (tmp_path / "c.json").write_text(
        json.dumps(
            {
                "name": "c",
                "status": "final",
                "arch": "ibp_small",
                "sin_rate": None,
                "clean_accuracy": 47.6,
                "certified_accuracy": 13.6,
            }
        )
    )
    t = models_table(tmp_path)
    assert list(t.checkpoint) == ["a", "b", "c"] and list(t.status) == ["final", "provisional", "final"]
    assert list(t["accuracy_%"]) == [70.0, 80.0, 47.6] and list(t.SIN) == ["layer 1 at 10%", "none", "none"]
    assert list(t.epochs) == ["5/5", "2/9", "?/?"] and t.train_hours[0] == 2.0
    assert list(t["target_%"]) == ["", "", ""]  # not ScaleCert architectures: no target of issue 4


def test_models_table_checks_issue_4_targets(tmp_path):
    import json

    from scalecert.cli import models_table

    def card(name, **kw):
        (tmp_path / f"{name}.json").write_text(
            json.dumps({"name": name, "arch": "resnet20", "dataset_key": "cifar10", "status": "final", **kw})
        )

    card("cifar10_resnet20_vanilla", sin_rate=None, accuracy_without_sin=88.0)
    card("cifar10_resnet20_sin1_r20", sin_layer=1, sin_rate=0.2, accuracy_with_sin=85.0, accuracy_without_sin=80.0)
    card("cifar10_resnet20_sin1_r10", sin_layer=1, sin_rate=0.1, accuracy_with_sin=84.99, accuracy_without_sin=90.0)
    t = models_table(tmp_path).set_index("checkpoint")
    assert tuple(t.loc["cifar10_resnet20_vanilla", ["target_%", "reached"]]) == (90.0, "no")
    assert tuple(t.loc["cifar10_resnet20_sin1_r20", ["target_%", "reached"]]) == (85.0, "yes")
    assert t.loc["cifar10_resnet20_sin1_r10", "reached"] == "no"  # judged with the SIN layer active


def test_every_shipped_model_that_misses_its_target_carries_a_runnable_next_command():
    """Issue 4: where CPU time forbade a target, the card says so and leaves the command to go further."""
    import shlex

    from scalecert.cli import models_table
    from scalecert.train import parse

    t = models_table()
    assert (t.reached != "").sum() >= 11  # every ScaleCert model has a target
    for name in t[t.reached == "no"].checkpoint:
        card = json.loads((CHECKPOINT_DIR / f"{name}.json").read_text())
        assert card["next_command_note"].startswith("not run"), name
        train_cmd, *rest = card["next_command"].split(" && ")
        words = shlex.split(train_cmd)
        assert words[:4] == ["python", "-m", "scalecert", "train"], name
        a = parse(words[4:])  # parses with the current options
        assert a.name != name and (a.init is None or (CHECKPOINT_DIR / f"{a.init}.pt").is_file()), name
        assert all(r.startswith(f"python -m scalecert recalibrate {a.name} ") for r in rest), name


def test_interrupted_epoch_resumes_at_its_step_exactly(tmp_path, monkeypatch):
    """Stopping mid-epoch and resuming gives the same weights, optimiser, schedule and generator as one run."""
    from scalecert import train as T

    def run(name, stop):
        monkeypatch.setattr(T, "RUNS_DIR", tmp_path / "runs")
        args = [
            "--name",
            name,
            "--dataset",
            "cifar10",
            "--sin-rate",
            "0.2",
            "--occlude",
            "2.4",
            "--consistency",
            "1",
            "--epochs",
            "2",
            "--max-train",
            "48",
            "--batch-size",
            "16",
            "--eval-subset",
            "10",
            "--threads",
            "1",
            "--out-dir",
            str(tmp_path),
            "--stop-after-steps",
            str(stop),
        ]
        assert T.train(T.parse(args)) is None
        return torch.load(tmp_path / "runs" / name / "state.pt", weights_only=False)

    whole = run("a", 5)  # epoch 1 (3 steps) + 2 steps of epoch 2, then stop
    run("b", 2)  # stop inside epoch 1 ...
    resumed = run("b", 3)  # ... resume: its last step, then 2 steps of epoch 2
    assert whole["epoch"] == resumed["epoch"] == 1 and whole["partial"]["step"] == resumed["partial"]["step"] == 2
    for key in ("model", "sched"):
        a, b = whole[key], resumed[key]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], (key, k)
    assert torch.equal(whole["partial"]["gen"], resumed["partial"]["gen"])
    assert whole["partial"]["tot"] == resumed["partial"]["tot"] and whole["partial"]["seen"] == 32
    for s_a, s_b in zip(whole["opt"]["state"].values(), resumed["opt"]["state"].values()):
        assert torch.equal(s_a["momentum_buffer"], s_b["momentum_buffer"])
    logs = [(tmp_path / "runs" / n / "log.jsonl").read_text().splitlines() for n in "ab"]
    assert [json.loads(x)["epoch"] for x in logs[1]] == [1]  # the interrupted epoch is logged once
    assert json.loads(logs[0][0])["loss"] == json.loads(logs[1][0])["loss"]


@pytest.mark.parametrize("legacy", ["missing", "None"])
def test_resuming_with_another_configuration_is_refused_but_legacy_states_resume(tmp_path, monkeypatch, legacy):
    from scalecert import train as T

    monkeypatch.setattr(T, "RUNS_DIR", tmp_path / "runs")
    args = [
        "--name",
        "c",
        "--dataset",
        "cifar10",
        "--epochs",
        "2",
        "--max-train",
        "48",
        "--batch-size",
        "16",
        "--eval-subset",
        "10",
        "--threads",
        "1",
        "--out-dir",
        str(tmp_path),
        "--stop-after-steps",
        "2",
    ]
    assert T.train(T.parse(args)) is None
    with pytest.raises(ValueError, match="another configuration"):
        T.train(T.parse(args[:-2] + ["--batch-size", "8", "--stop-after-steps", "1"]))
    state_path = tmp_path / "runs" / "c" / "state.pt"
    st = torch.load(state_path, weights_only=False)
    if legacy == "missing":
        del st["config"]  # as written before runstate existed
    else:
        st["config"] = None  # as written by runstate before train.py recorded one
    torch.save(st, state_path)
    assert T.train(T.parse(args[:-1] + ["1"])) is None  # resumed at step 2, one more step
    st = torch.load(state_path, weights_only=False)
    assert st["partial"]["step"] == 3 and st["config"]["batch_size"] == 16
    assert st["partial"]["gen"].device.type == "cpu"


def test_without_sin_switches_the_layer_off_and_restores_it_after_an_error():
    from scalecert.models import build, without_sin

    model = build("resnet20", sin_layer=1, sin_rate=0.2)
    layer = model.sin
    assert layer is not None
    with pytest.raises(RuntimeError):
        with without_sin(model) as m:
            assert m is model and model.sin is None
            raise RuntimeError("inside")
    assert model.sin is layer


def test_footprint_and_pixel_occlusion_runs_differ_only_in_the_occlusion(tmp_path, monkeypatch):
    """The ablation twin's trainer: same batches, same windows, same schedule; only how a window is occluded."""
    from scalecert import train as T

    monkeypatch.setattr(T, "RUNS_DIR", tmp_path / "runs")
    seen = {}
    real = T.occlude

    def spy(model, x, boxes, occlusion):
        xo, excl = real(model, x, boxes, occlusion)
        seen.setdefault(occlusion, []).append((x.clone(), boxes.clone(), xo.clone(), excl))
        return xo, excl

    monkeypatch.setattr(T, "occlude", spy)
    common = [
        "--dataset",
        "cifar10",
        "--occlude",
        "2.4",
        "--consistency",
        "1",
        "--epochs",
        "1",
        "--max-train",
        "48",
        "--batch-size",
        "16",
        "--eval-subset",
        "10",
        "--threads",
        "1",
        "--out-dir",
        str(tmp_path),
    ]
    sin = T.train(T.parse(["--name", "s", "--sin-rate", "0.2"] + common))
    occl = T.train(T.parse(["--name", "o", "--occlusion", "pixels", "--twin", "s"] + common))
    fp, px = seen["footprint"], seen["pixels"]
    assert len(fp) == len(px) == 3
    for (x1, b1, xo1, e1), (x2, b2, xo2, e2) in zip(fp, px):
        assert torch.equal(x1, x2) and torch.equal(b1, b2)  # same images, augmentation and windows
        assert torch.equal(xo1, x1) and e1 is not None and e1.any()  # footprint: image kept, features excluded
        inside = rect_masks(b2, 32, 32).unsqueeze(1).expand_as(x2)
        assert e2 is None and torch.equal(xo2[~inside], x2[~inside]) and (xo2[inside] == T.PIXEL_FILL).all()
    cfg = [torch.load(tmp_path / "runs" / n / "state.pt", weights_only=False)["config"] for n in "so"]
    assert {k for k in cfg[0].keys() | cfg[1].keys() if cfg[0].get(k) != cfg[1].get(k)} == {"sin_rate", "occlusion"}
    assert sin["occlusion"] == "footprint" and occl["occlusion"] == "pixels" and occl["twin"] == "s"
    assert occl["accuracy_with_sin"] is None


def test_occlusion_switch_refuses_the_wrong_model(tmp_path, monkeypatch):
    from scalecert import train as T

    monkeypatch.setattr(T, "RUNS_DIR", tmp_path / "runs")
    common = [
        "--dataset",
        "cifar10",
        "--occlude",
        "2.4",
        "--epochs",
        "1",
        "--max-train",
        "16",
        "--threads",
        "1",
        "--out-dir",
        str(tmp_path),
    ]
    with pytest.raises(ValueError, match="needs a SIN layer"):
        T.train(T.parse(["--name", "a"] + common))
    with pytest.raises(ValueError, match="without a SIN layer"):
        T.train(T.parse(["--name", "b", "--sin-rate", "0.2", "--occlusion", "pixels"] + common))


def test_the_ablation_twins_have_no_accuracy_target_but_name_their_sin_twin():
    from scalecert.cli import accuracy_target, models_table

    t = models_table().set_index("checkpoint")
    for name in ("cifar10_resnet20_occl", "imagenette_resnet18w16_occl"):
        card = json.loads((CHECKPOINT_DIR / f"{name}.json").read_text())
        assert accuracy_target(card, None) is None and t.loc[name, "reached"] == ""
        twin = json.loads((CHECKPOINT_DIR / f"{card['twin']}.json").read_text())
        assert twin["sin_rate"] and card["init"] == twin["init"] and card["epochs"] == twin["epochs"]
        assert card["occlusion"] == "pixels" and card["train_seconds"] > 0 and card["sin_rate"] is None
        # the table names the pair both ways and lists the twin right after its SIN model
        assert t.loc[name, "twin"] == card["twin"] and t.loc[card["twin"], "twin"] == name
        names = list(t.index)
        assert names.index(name) == names.index(card["twin"]) + 1
