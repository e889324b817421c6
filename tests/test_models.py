import json

import numpy as np
import pytest
import torch
import torchvision

from scalecert import data as D
from scalecert.models import ARCHS, CHECKPOINT_DIR, build, from_torchvision_state, load_model, save_checkpoint
from scalecert.train import augment, evaluate


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
CHECKPOINTS = sorted(p.stem for p in CHECKPOINT_DIR.glob("*.pt")
                     if json.loads(p.with_suffix(".json").read_text())["arch"] in ARCHS)


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
    assert T.finished_card(a) is None                      # no run yet
    (tmp_path / "runs" / "m").mkdir(parents=True)
    (tmp_path / "runs" / "m" / "state.pt").write_bytes(b"x")
    card = {"name": "m", "status": "provisional: snapshot", "epochs_done": 2, "note": "hand-written"}
    (tmp_path / "m.json").write_text(json.dumps(card))
    assert T.finished_card(a) is None                      # provisional card: training continues
    card.update(status="final", epochs_done=4)
    (tmp_path / "m.json").write_text(json.dumps(card))
    assert T.train(a) == card                              # returns at once, card (and its note) untouched
    assert json.loads((tmp_path / "m.json").read_text())["note"] == "hand-written"
    assert T.finished_card(T.parse(["--name", "m", "--dataset", "cifar10", "--epochs", "8",
                                    "--out-dir", str(tmp_path)])) is None   # more epochs asked: resume


def test_models_table_reads_every_card(tmp_path):
    import json
    from scalecert.cli import models_table
    (tmp_path / "a.json").write_text(json.dumps({"name": "a", "status": "final", "sin_layer": 1, "sin_rate": 0.1,
                                                 "accuracy_with_sin": 70.0, "accuracy_without_sin": 60.0,
                                                 "epochs_done": 5, "epochs": 5, "train_seconds": 7200}))
    (tmp_path / "b.json").write_text(json.dumps({"name": "b", "status": "provisional: snapshot", "sin_rate": None,
                                                 "accuracy_without_sin": 80.0, "epochs_done": 2, "epochs": 9}))
    (tmp_path / "c.json").write_text(json.dumps({"name": "c", "status": "final", "arch": "ibp_small", "sin_rate": None,
                                                 "clean_accuracy": 47.6, "certified_accuracy": 13.6}))
    t = models_table(tmp_path)
    assert list(t.checkpoint) == ["a", "b", "c"] and list(t.status) == ["final", "provisional", "final"]
    assert list(t["accuracy_%"]) == [70.0, 80.0, 47.6] and list(t.SIN) == ["layer 1 at 10%", "none", "none"]
    assert list(t.epochs) == ["5/5", "2/9", "?/?"] and t.train_hours[0] == 2.0


def test_interrupted_epoch_resumes_at_its_step_exactly(tmp_path, monkeypatch):
    """Stopping mid-epoch and resuming gives the same weights, optimiser, schedule and generator as one run."""
    from scalecert import train as T

    def run(name, stop):
        monkeypatch.setattr(T, "RUNS_DIR", tmp_path / "runs")
        args = ["--name", name, "--dataset", "cifar10", "--sin-rate", "0.2", "--occlude", "2.4", "--consistency", "1",
                "--epochs", "2", "--max-train", "48", "--batch-size", "16", "--eval-subset", "10", "--threads", "1",
                "--out-dir", str(tmp_path), "--stop-after-steps", str(stop)]
        assert T.train(T.parse(args)) is None
        return torch.load(tmp_path / "runs" / name / "state.pt", weights_only=False)

    whole = run("a", 5)                      # epoch 1 (3 steps) + 2 steps of epoch 2, then stop
    run("b", 2)                              # stop inside epoch 1 ...
    resumed = run("b", 3)                    # ... resume: its last step, then 2 steps of epoch 2
    assert whole["epoch"] == resumed["epoch"] == 1 and whole["partial"]["step"] == resumed["partial"]["step"] == 2
    for key in ("model", "sched"):
        a, b = whole[key], resumed[key]
        assert a.keys() == b.keys()
        for k in a:
            assert (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]), (key, k)
    assert torch.equal(whole["partial"]["gen"], resumed["partial"]["gen"])
    assert whole["partial"]["tot"] == resumed["partial"]["tot"] and whole["partial"]["seen"] == 32
    for s_a, s_b in zip(whole["opt"]["state"].values(), resumed["opt"]["state"].values()):
        assert torch.equal(s_a["momentum_buffer"], s_b["momentum_buffer"])
    logs = [(tmp_path / "runs" / n / "log.jsonl").read_text().splitlines() for n in "ab"]
    assert [json.loads(x)["epoch"] for x in logs[1]] == [1]   # the interrupted epoch is logged once
    assert json.loads(logs[0][0])["loss"] == json.loads(logs[1][0])["loss"]


@pytest.mark.parametrize("legacy", ["missing", "None"])
def test_resuming_with_another_configuration_is_refused_but_legacy_states_resume(tmp_path, monkeypatch, legacy):
    from scalecert import train as T
    monkeypatch.setattr(T, "RUNS_DIR", tmp_path / "runs")
    args = ["--name", "c", "--dataset", "cifar10", "--epochs", "2", "--max-train", "48", "--batch-size", "16",
            "--eval-subset", "10", "--threads", "1", "--out-dir", str(tmp_path), "--stop-after-steps", "2"]
    assert T.train(T.parse(args)) is None
    with pytest.raises(ValueError, match="another configuration"):
        T.train(T.parse(args[:-2] + ["--batch-size", "8", "--stop-after-steps", "1"]))
    state_path = tmp_path / "runs" / "c" / "state.pt"
    st = torch.load(state_path, weights_only=False)
    if legacy == "missing":
        del st["config"]                                    # as written before runstate existed
    else:
        st["config"] = None                                 # as written by runstate before train.py recorded one
    torch.save(st, state_path)
    assert T.train(T.parse(args[:-1] + ["1"])) is None      # resumed at step 2, one more step
    st = torch.load(state_path, weights_only=False)
    assert st["partial"]["step"] == 3 and st["config"]["batch_size"] == 16
    assert st["partial"]["gen"].device.type == "cpu"
