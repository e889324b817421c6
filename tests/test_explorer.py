"""The explorer's panel (notebook 13) shows what the engine computes: its verdicts are detect's and certify's, its
windows are the ones they evaluate, and each window's occluded prediction is the model's with that window removed."""

import numpy as np
import pytest
import torch
from conftest import calibration_images, spread_model

from scalecert import explorer as X
from scalecert.analysis import predict_without
from scalecert.defense import Engine, certify, detect
from scalecert.geometry import footprint

#: record fields compared with detect's and certify's rows (``seconds`` is a time, ``id`` a position in a batch)
FIELDS = (
    "pred",
    "alert",
    "output",
    "n_windows",
    "n_candidates",
    "n_evaluated",
    "n_disagree",
    "disagree_labels",
    "suspected_box",
)
CERT_FIELDS = FIELDS + ("label", "certified", "clean_correct")


def same(row, rec, fields):
    for f in fields:
        a, b = row[f], rec[f]
        if isinstance(a, (list, tuple, np.ndarray)) or isinstance(b, (list, tuple)):
            assert list(a) == list(b), f
        elif a is None or b is None or (isinstance(a, float) and np.isnan(a)):
            assert (a is None or (isinstance(a, float) and np.isnan(a))) == (b is None), f
        else:
            assert a == b, f


@pytest.fixture(scope="module")
def model():
    return spread_model(rate=0.2)


@pytest.fixture(scope="module")
def images():
    return calibration_images(6, 32, seed=3)


def _check_panel(m, x, label, content, position, patch, mode, tau, r):
    pan = X.panel(m, x, label, content, position, patch, mode=mode, tau=tau, r=r)
    xp = pan["patched"]
    row0, col0 = position
    p = pan["p"]
    # the patch is where it was asked, and nowhere else
    assert torch.equal(xp[:, row0 : row0 + p, col0 : col0 + p], content)
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[row0 : row0 + p, col0 : col0 + p] = False
    assert torch.equal(xp[:, outside], x[:, outside])
    rule = X.MODES[mode]
    det = detect(m, xp[None], patch, mode=mode, rule=rule, tau=tau, r=r).iloc[0]
    same(det, pan["detect"]["record"], FIELDS)
    cert = certify(m, x[None], torch.tensor([label]), patch, mode=mode, rule=rule, tau=tau, r=r).iloc[0]
    same(cert, pan["certify"]["record"], CERT_FIELDS)
    # the windows shown are the ones detect evaluated, and its counts follow from their labels
    d = pan["detect"]
    assert len(d["windows"]) == len(d["labels"]) == det.n_evaluated == det.n_candidates
    assert int(d["disagree"].sum()) == det.n_disagree
    assert sorted(set(d["labels"][d["disagree"]].tolist())) == list(det.disagree_labels)
    if det.suspected_box is not None:
        assert tuple(det.suspected_box) in {tuple(b) for b in d["windows"][d["disagree"]].tolist()}
    assert d["forwards"] == 1 + det.n_evaluated and pan["certify"]["forwards"] == 1 + cert.n_evaluated
    if not (mode == "paper" and tau is not None):  # paper mode merges each image's candidates: fewer boxes
        assert len(d["candidates"]) == det.n_candidates
    return pan, det, cert


# few windows, to keep the test short: the base family once with a 24 px patch (49 windows), merged families
# (tau = 0.3: 25 to 36 windows; paper mode merges each image's candidates) for the rest
@pytest.mark.parametrize(
    "mode,tau,r,p,cases",
    [
        ("sound", None, 3, 24, [(0, (4, 4))]),
        ("sound", 0.3, 2, 5, [(1, (0, 0)), (2, (27, 4))]),
        ("paper", 0.3, 3, 5, [(1, (13, 13)), (2, (27, 4))]),
    ],
)
def test_panel_verdicts_and_windows_are_detect_and_certify(model, images, mode, tau, r, p, cases):
    labels = model(images).argmax(1)
    patch = torch.rand(3, p, p, generator=torch.Generator().manual_seed(1))
    dets = [_check_panel(model, images[i], int(labels[i]), patch, pos, p, mode, tau, r)[1] for i, pos in cases]
    assert any(d.n_disagree > 0 for d in dets)  # the windows compared include disagreeing ones


def test_panel_of_a_model_without_sin_is_minority_reports(images):
    m = spread_model(rate=None)
    labels = m(images).argmax(1)
    pan, det, _ = _check_panel(m, images[0], int(labels[0]), torch.zeros(3, 8, 8), (10, 20), 8, "sound", 0.3, 3)
    assert pan["sin"]["engine_mask"] is None and det.n_candidates == det.n_windows  # every window is a candidate


def test_each_window_label_is_the_model_without_that_window(model, images):
    """Sound mode: the occluded prediction of a window is the model with its footprint removed from the SIN
    ranking (``analysis.predict_without``, an independent path through the SIN layer)."""
    y = int(model(images[3:4]).argmax(1))
    pan = X.panel(model, images[3], y, torch.ones(3, 5, 5), (8, 8), 5, tau=0.3)
    d = pan["detect"]
    eng = Engine(model, 32, 5, tau=0.3)
    keep = torch.cat([d["disagree"].nonzero().flatten()[:20], torch.arange(min(20, len(d["labels"])))])
    rects = footprint(eng.geo, d["windows"][keep], eng.h, eng.w)
    got = predict_without(model, pan["patched"][None].expand(len(keep), -1, -1, -1), rects)
    assert torch.equal(got, d["labels"][keep])


def test_first_break_is_the_first_disagreeing_window_certify_meets(model, images):
    labels = model(images).argmax(1)
    seen = set()
    for i in range(len(images)):
        c = X.certify_clean(Engine(model, 32, 5, tau=0.3), images[i], int(labels[i]))
        t, brk = c["trace"], c["first_break"]
        if c["record"]["certified"]:
            seen.add("certified")
            assert brk is None and "certified" in c["reason"]
            continue
        seen.add("broken")
        assert brk is not None and brk["label"] != c["record"]["pred"]
        assert not t.disagree[: brk["index"]].any()  # every window before it agrees
        eng = Engine(model, 32, 5)
        rect = footprint(eng.geo, torch.tensor([brk["box"]]), eng.h, eng.w)
        assert int(predict_without(model, images[i : i + 1], rect)[0]) == brk["label"]
        assert str(brk["box"]) in c["reason"]
    wrong = X.certify_clean(Engine(model, 32, 5, tau=0.3), images[0], (int(labels[0]) + 1) % 10)
    assert not wrong["record"]["certified"] and wrong["forwards"] == 1
    assert "clean prediction is wrong" in wrong["reason"]
    assert "broken" in seen


def test_trace_leaves_the_engine_as_it_was(model, images):
    eng = Engine(model, 32, 5, tau=0.3)
    X.trace(eng, images[0])
    assert "stem" not in vars(eng) and "occluded_labels" not in vars(eng)
    assert eng.run(images[:1])[0]["n_candidates"] == X.trace(eng, images[0]).record["n_candidates"]


def test_verdict_text_and_figure(model, images):
    import matplotlib

    matplotlib.use("agg")
    y = int(model(images[1:2]).argmax(1))
    pan = X.panel(model, images[1], y, torch.ones(3, 5, 5), (13, 13), 5, tau=0.3)
    text = X.verdict_text(pan, [f"c{k}" for k in range(10)])
    first = text.splitlines()[0]
    assert ("ALERT" in first) == bool(pan["detect"]["record"]["alert"])
    assert "CERTIFIED" in text.splitlines()[1]
    fig = X.figure(pan, [f"c{k}" for k in range(10)], title="t")
    assert len(fig.axes) == 4
    row = X.summary(pan)
    assert row["detect"] == ("alert" if pan["detect"]["record"]["alert"] else str(pan["detect"]["record"]["output"]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"position": (28, 0)}, r"outside the 32x32 image"),
        ({"position": (-1, 0)}, r"outside"),
        ({"position": (1.5, 0)}, r"two whole numbers"),
        ({"position": 3}, r"\(row, col\)"),
        ({"content": torch.zeros(3, 4, 4)}, r"shape \(3, 5, 5\)"),
        ({"content": torch.full((3, 5, 5), 2.0)}, r"lie in \[0, 1\]"),
        ({"mode": "fast"}, r"unknown mode"),
        ({"tau": 0.0}, r"tau must be None or lie in \(0, 1\]"),
        ({"tau": 1.5}, r"tau must"),
        ({"r": 0}, r"r must be a whole number >= 1"),
        ({"label": 10}, r"labels must lie in \[0, 9\]"),
        ({"image": torch.rand(2, 3, 32, 32)}, r"one image"),
        ({"image": torch.rand(3, 32, 32) * 2}, r"\[0, 1\]"),
        ({"patch": 40}, r"larger than the 32x32 image"),
    ],
)
def test_panel_rejects_bad_input(model, kwargs, match):
    args = {
        "image": torch.rand(3, 32, 32),
        "label": 0,
        "content": torch.zeros(3, 5, 5),
        "position": (0, 0),
        "patch": 5,
        "mode": "sound",
        "tau": None,
        "r": 3,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        X.panel(
            model,
            args["image"],
            args["label"],
            args["content"],
            args["position"],
            args["patch"],
            mode=args["mode"],
            tau=args["tau"],
            r=args["r"],
        )


@pytest.fixture(scope="module")
def explorer():
    return X.Explorer("tiny")


@pytest.mark.parametrize(
    "change,match",
    [
        ({"dataset": "mnist"}, "unknown dataset"),
        ({"model": "cifar10_bagnet11"}, "unknown model"),
        ({"model": "imagenette_resnet18w16_vanilla"}, "unknown model"),
        ({"image": 10_000}, r"image must be an index in \[0, 9999\]"),
        ({"image": -1}, "image must be an index"),
        ({"patch_pct": 150.0}, "not smaller than the 32x32 images"),
        ({"position": (30, 0)}, "outside the 32x32 image"),
        ({"content": "sticker"}, "unknown patch content"),
        ({"mode": "exact"}, "unknown mode"),
        ({"r": 0}, "r must be"),
    ],
)
def test_explorer_rejects_bad_settings(explorer, change, match):
    from dataclasses import replace

    with pytest.raises(ValueError, match=match):
        explorer.update(replace(X.Setting("cifar10", image=0, content="zeros"), **change))


def test_explorer_update_on_a_shipped_model_is_detect_and_certify(explorer):
    """The glue: data set image, shipped model, the content placed at the position, the clean certificate reused."""
    s = X.Setting("cifar10", image=7, patch_pct=2.4, position=(14, 14), content="zeros", tau=0.3)
    pan = explorer.update(s)
    m = explorer.model("cifar10", None)[1]
    x, y = explorer.dataset("cifar10").tensors([7])
    xp = x.clone()
    xp[:, :, 14:19, 14:19] = 0
    assert torch.equal(pan["patched"], xp[0])
    same(detect(m, xp, 2.4, tau=0.3).iloc[0], pan["detect"]["record"], FIELDS)
    same(certify(m, x, y, 2.4, tau=0.3).iloc[0], pan["certify"]["record"], CERT_FIELDS)
    assert pan["setting"].model == "cifar10_resnet20_sin1_r20"
    assert explorer.check(X.Setting("cifar10")).tau is None  # the data set's default: no merging at 32x32
    moved = explorer.update(X.Setting("cifar10", image=7, patch_pct=2.4, position=(0, 0), content="zeros", tau=0.3))
    assert moved["certify"] is pan["certify"]  # moving the patch re-runs detect only
    shipped = X.shipped_models("cifar10")
    assert shipped[0].startswith("cifar10_resnet20_sin") and "cifar10_resnet20_vanilla" in shipped
    assert "cifar10_bagnet11" not in shipped  # a peer's architecture: not a split network the engine runs


def test_a_saved_explorer_figure_holds_no_wall_time_but_the_live_one_does():
    import matplotlib

    matplotlib.use("Agg")
    ex = X.Explorer(profile="tiny")
    pan = ex.update(X.Setting("cifar10", image=3, patch_pct=2.4, position=(0, 0), content="zeros", tau=None))
    import re

    texts = lambda fig: " ".join(t.get_text() for ax in fig.axes for t in ax.texts)  # noqa: E731
    seconds = re.compile(r"\d\.\d\d s\b")
    assert not seconds.search(texts(X.figure(pan))) and "update:" not in texts(X.figure(pan))
    assert "update:" in texts(X.figure(pan, timings=True)) and seconds.search(texts(X.figure(pan, timings=True)))
    assert not seconds.search(X.verdict_text(pan, timings=False)) and len(seconds.findall(X.verdict_text(pan))) == 2
