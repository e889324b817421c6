"""The cached per-image analyses of 02, 03, 04 and 09: equal to the uncached functions, resumed, never recomputed."""
import pandas as pd
import pytest
import torch

from scalecert import analysis as A
from scalecert import attacks as T
from scalecert import experiments as E
from scalecert import results as R
from scalecert.windows import patch_pixels

CKPT = "cifar10_resnet20_sin1_r20"
KW = dict(per_class=1, chunk_images=4, progress=False)  # 10 images in chunks of 4, 4, 2


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def setup():
    model = E.load_model(CKPT)
    x, y, ids = E.eval_images("cifar10", 1)
    p = patch_pixels(5.0, 32)
    patch = torch.rand(3, p, p, generator=torch.Generator().manual_seed(3))
    corners = E.patch_corners(len(ids), "cifar10", 5.0)
    return model, x, y, ids, p, patch, corners


def _stamps(cache):
    return {f: f.stat().st_mtime_ns for f in cache.glob("*/chunk-*.csv")}


def test_sin_statistics_cached_equals_the_direct_run_and_is_read_back(cache, setup, monkeypatch):
    model, x, y, ids, p, patch, corners = setup
    boxes = [(a, b, a + p - 1, b + p - 1) for a, b in corners.tolist()]
    for imgs, kw in ((x, {}), (T.apply_patch(x, patch, corners), {"patch": patch})):
        per, cl = E.sin_statistics_cached("cifar10", CKPT, 5.0, **KW, **kw)
        want_per, want_cl = A.sin_statistics(model, imgs, kind="patched" if kw else "benign", patch_boxes=boxes)
        assert list(per.id) == ids
        pd.testing.assert_frame_equal(per.drop(columns="id"), want_per, check_exact=True)  # bit for bit
        pd.testing.assert_frame_equal(cl, want_cl, check_exact=True)
    assert len(list(cache.iterdir())) == 2 and len(_stamps(cache)) == 6
    stamps = _stamps(cache)
    monkeypatch.setattr(A, "sin_statistics", lambda *a, **k: pytest.fail("recomputed a cached chunk"))
    again, cl2 = E.sin_statistics_cached("cifar10", CKPT, 5.0, patch=patch, **KW)
    pd.testing.assert_frame_equal(again, per)
    pd.testing.assert_frame_equal(cl2, cl)
    assert _stamps(cache) == stamps


def test_another_patch_is_another_run(cache, setup):
    *_, patch, _ = setup
    E.sin_statistics_cached("cifar10", CKPT, 5.0, patch=patch, **KW)
    E.sin_statistics_cached("cifar10", CKPT, 5.0, patch=1 - patch, **KW)
    assert len(list(cache.iterdir())) == 2


def test_prediction_stability_cached_equals_the_direct_table(cache, setup, monkeypatch):
    model, x, y, ids, p, patch, corners = setup
    table, per = E.prediction_stability_cached("cifar10", CKPT, 5.0, patch, **KW)
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    assert 0 < ok.sum() < len(ok)  # the filter is exercised
    want = A.prediction_stability(model, x[ok], T.apply_patch(x, patch, corners)[ok], y[ok])
    pd.testing.assert_frame_equal(table, want)
    assert table.before[table.images == "benign"].item() == 100.0
    assert list(per.id) == ids and len(per) == 10
    monkeypatch.setattr(A, "predict_without", lambda *a, **k: pytest.fail("recomputed a cached chunk"))
    monkeypatch.setattr(A, "sin_statistics", lambda *a, **k: pytest.fail("recomputed a cached chunk"))
    pd.testing.assert_frame_equal(E.prediction_stability_cached("cifar10", CKPT, 5.0, patch, **KW)[0], table)


def test_share_detection_cached_equals_the_direct_run(cache, setup):
    model, x, y, ids, p, patch, corners = setup
    boxes = [(a, b, a + p - 1, b + p - 1) for a, b in corners.tolist()]
    got = E.share_detection_cached("cifar10", CKPT, 5.0, patch=patch, **KW)
    want = A.share_detection(model, T.apply_patch(x, patch, corners), p, boxes).assign(label=y.numpy())
    pd.testing.assert_frame_equal(got.drop(columns=["id", "config_key"]), want, check_dtype=False)
    benign = E.share_detection_cached("cifar10", CKPT, 5.0, **KW)
    assert not benign.localised.any()  # no patch, nothing to localise
    s = A.adaptive_summary(benign, got, target=3)
    keep = got.label != 3
    assert s["attack_success"] == round(100 * (got.pred[keep] == 3).mean(), 1)


def test_recovery_cached_resumes_and_keeps_its_examples(cache, setup, monkeypatch):
    model, x, y, ids, p, patch, corners = setup
    kw = dict(KW, steps=2, examples=3)
    summary, per, (xs, xp, rows) = E.recovery_cached("cifar10", CKPT, 5.0, **kw)
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    assert list(per.id) == [i for i, o in zip(ids, ok.tolist()) if o]  # only the correctly classified images
    assert summary.clean_acc.item() == 100.0 and summary.images.item() == int(ok.sum())
    assert list(rows.id) == list(per.id[:3])
    assert torch.equal(xs, E.D.load_dataset("cifar10", "eval").tensors(list(rows.id))[0])
    for i, (a, b) in enumerate(corners[ok][:3].tolist()):  # the stored images: clean outside the patch, at its corner
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[a:a + p, b:b + p] = False
        assert torch.equal(xp[i][:, outside], xs[i][:, outside])
        assert rows.patch_box[i] == (a, b, a + p - 1, b + p - 1)
    with torch.no_grad():
        assert (model(xp).argmax(1).numpy() == rows.patched.to_numpy()).all()
    # a lost chunk is recomputed alone, identically; the others are read back
    (run,) = cache.iterdir()
    (run / "chunk-00001.csv").unlink()
    calls = []
    real = T.pgd_patch
    monkeypatch.setattr(T, "pgd_patch", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = E.recovery_cached("cifar10", CKPT, 5.0, **kw)
    assert len(calls) == 1
    pd.testing.assert_frame_equal(again[1], per)
    pd.testing.assert_frame_equal(again[0], summary)
