import pandas as pd
import pytest
import torch
from conftest import calibration_images, spread_model

from scalecert.audit import audit, paste, patch_positions
from scalecert.defense import Engine, certify, detect
from scalecert.geometry import patch_boxes, rect_masks
from scalecert.models import load_model, save_checkpoint


def images(b=6, n=16, seed=0):
    return calibration_images(b, n, seed)


@pytest.mark.parametrize(
    "arch,layer,n", [("resnet20", 1, 32), ("resnet20", 2, 32), ("resnet18w16", 1, 64), ("resnet18w16", 2, 64)]
)
def test_stem_once_equals_filled_input_bit_for_bit(arch, layer, n):
    m = spread_model(arch, layer)
    eng = Engine(m, n, 5)
    x = images(2, n)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, len(eng.family), (12,), generator=g)
    boxes = eng.family.boxes[idx]
    img = torch.arange(12) % 2
    with torch.no_grad():
        excl = rect_masks(eng.fp[idx], eng.h, eng.w).flatten(1)
        direct = m(eng.fill_windows(x[img], boxes), exclude=excl)
        f = m.stem(x)
        from scalecert.sin import importance, masked_topk_from_order, strict_order

        keep = masked_topk_from_order(strict_order(importance(f))[img], excl, eng.k)
        once = m.rest(f[img] * keep.view(-1, 1, eng.h, eng.w))
    assert torch.equal(direct, once)


def test_invariance_lemma_non_candidates_keep_the_winners():
    m = spread_model(rate=0.1)
    eng = Engine(m, 16, 2)
    x = images(4)
    with torch.no_grad():
        f, order, sin = eng.stem(x)
        cand = eng.candidates(sin)
        assert (~cand).any(), "the test needs some non-candidate windows"
        for i in range(4):
            non = (~cand[i]).nonzero().flatten()
            excl = rect_masks(eng.fp[non], eng.h, eng.w).flatten(1)
            from scalecert.sin import masked_topk_from_order

            keep = masked_topk_from_order(order[i].expand(len(non), -1), excl, eng.k)
            assert torch.equal(keep, sin[i].flatten().expand_as(keep))
            cand_excl = rect_masks(eng.fp[cand[i]], eng.h, eng.w).flatten(1)
            assert (cand_excl & sin[i].flatten()).any(1).all()


def test_candidates_match_region_definition():
    from scalecert.geometry import region

    m = spread_model(rate=0.05)
    eng = Engine(m, 16, 3)
    x = images(2)
    with torch.no_grad():
        _, _, sin = eng.stem(x)
    cand = eng.candidates(sin)
    for i in range(2):
        R = region(eng.geo, sin[i], 16)
        boxes = eng.family.boxes
        meets = torch.tensor([R[r0 : r1 + 1, c0 : c1 + 1].any().item() for r0, c0, r1, c1 in boxes.tolist()])
        assert torch.equal(cand[i], meets)


def test_records_are_consistent_and_strict_rule_clean_equals_certified():
    m = spread_model()
    x = images(8)
    with torch.no_grad():
        y = m(x).argmax(1)
    y[0] = (y[0] + 1) % 10
    df = certify(m, x, y, 3, early_stop=False)
    assert isinstance(df, pd.DataFrame) and len(df) == 8
    assert (df.clean_correct == df.certified).all()
    assert not df.certified[0]
    assert (df.n_evaluated == df.n_candidates).all()
    assert ((df.n_disagree > 0) == df.alert).all()
    fast = certify(m, x, y, 3)
    assert (fast.certified == df.certified).all()
    det = detect(m, x, 3)
    assert ((det.output == -1) == det.alert).all()


@pytest.mark.parametrize("mode", ["sound", "paper"])
def test_observer_sees_every_evaluated_window_and_changes_nothing(mode):
    m = spread_model()
    eng = Engine(
        m, 16, 3, mode=mode, tau=0.5 if mode == "paper" else None, rule="paper" if mode == "paper" else "strict"
    )
    x = images(4)
    events = []
    with torch.no_grad():
        plain = eng.run(x, early_stop=False)
        seen = eng.run(x, early_stop=False, observer=lambda event, *data: events.append((event, *data)))
    assert seen == [{**r, "seconds": s["seconds"]} for r, s in zip(plain, seen)]  # the same records but the time
    assert [e[0] for e in events[:1]] == ["sin"] and events[0][1].shape == (4, eng.h, eng.w)
    occluded = [e for e in events if e[0] == "occluded"]
    assert sum(len(e[2]) for e in occluded) == sum(r["n_evaluated"] for r in seen)
    assert all(e[1].shape == (len(e[2]), 4) for e in occluded)
    assert sum(int((e[2] != -1).sum()) for e in occluded) == sum(r["n_evaluated"] for r in seen)


def test_minority_reports_evaluates_every_window():
    m = spread_model()
    m.set_sin(1, None)
    df = detect(m, images(2), 5)
    assert (df.n_candidates == 10 * 10).all() and (df.n_evaluated == 100).all()


@pytest.mark.parametrize(
    "kw,match", [({"mode": "fast"}, "mode"), ({"rule": "x"}, "rule"), ({"rate": 1.5}, "rate"), ({"layer": 99}, "layer")]
)
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        certify(spread_model(), images(1), [0], 3, **kw)


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.rand(3, 32, 31), "shape"),
        (torch.rand(1, 3, 32, 32) * 2, "range|lie"),
        (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "floating"),
    ],
)
def test_bad_images_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        certify(spread_model(), bad, [0], 3)


def test_patch_larger_than_image_raises():
    with pytest.raises(ValueError, match="larger"):
        certify(spread_model(), images(1), [0], 40)


def test_paste_places_patch_exactly():
    x = torch.zeros(3, 8, 8)
    out = paste(x, torch.ones(3, 2, 2), torch.tensor([[0, 0], [6, 5]]))
    assert out[0].sum() == 12 and out[0, :, :2, :2].all() and out[1, :, 6:8, 5:7].all() and out[1].sum() == 12
    assert len(patch_positions(8, 3)) == 36


@pytest.mark.parametrize("r", [3, 1])
def test_sound_mode_has_no_violations(r):
    """Soundness: certified images never give a wrong label without an alert, whatever the patch (the paper's
    window parameter r = 3 and the smallest covering family r = 1)."""
    m = spread_model(rate=0.2)
    x = images(6, seed=5)
    with torch.no_grad():
        y = m(x).argmax(1)
    eng = Engine(m, 16, 2, r=r)
    res = audit(eng, x, y, progress=False, contents=("zeros", "ones", "noise"))  # every position
    att = audit(eng, x, y, progress=False, contents=("attack",), stride=3, attack_steps=2)
    assert res["certified"] > 0 and res["cases"] == res["certified"] * 3 * 15 * 15
    assert res["flipped"] > 0, "no patch changed M(x): the audit would prove nothing"
    assert att["flipped"] > 0 and att["violations"] == 0, att["examples"]
    assert res["violations"] == 0, res["examples"]


@pytest.mark.parametrize("mode,tau", [("sound", None), ("paper", 0.5)])
def test_windows_with_the_patch_first_change_no_verdict_and_stop_sooner(mode, tau):
    """The audit's evaluation order (the windows that contain the patch first) leaves pred, alert, output and
    certified of every patched image of a certified image as the raster order gives them, and evaluates fewer
    windows."""
    m = spread_model(rate=0.2)
    eng = Engine(m, 16, 2, r=3, mode=mode, tau=tau, chunk=64)
    x = images(6, seed=5)
    with torch.no_grad():
        y = m(x).argmax(1)
    cert = [i for i, r in enumerate(eng.run(x, y)) if r["certified"]]
    corners = patch_positions(16, eng.p, stride=2)
    xp = torch.cat([paste(x[i], torch.ones(3, eng.p, eng.p), corners) for i in cert])
    with torch.no_grad():
        held = m(xp).argmax(1)
    flipped = held != y[cert].repeat_interleave(len(corners))  # what the audit passes on: M(x') != y
    assert flipped.sum() >= 5, "the test needs patched images that change M(x)"
    box = patch_boxes(corners, eng.p).repeat(len(cert), 1)
    raster = eng.run(xp[flipped], held[flipped])
    first = eng.run(xp[flipped], held[flipped], first=box[flipped])
    keys = ("pred", "alert", "output", "certified", "n_candidates")
    assert [{k: r[k] for k in keys} for r in first] == [{k: r[k] for k in keys} for r in raster]
    assert sum(r["n_evaluated"] for r in first) < sum(r["n_evaluated"] for r in raster)


def test_cpu_chunk_follows_the_cache_budget(monkeypatch):
    from scalecert.defense import default_chunk

    monkeypatch.setenv("SCALECERT_CPU_CHUNK_MB", "16")
    assert default_chunk(1 << 18, "cpu") == 64  # 16 MB / 256 KB
    assert default_chunk(1 << 30, "cpu") == 8  # never below 8
    monkeypatch.setenv("SCALECERT_CPU_CHUNK_MB", "4096")
    assert default_chunk(1, "cpu") == 1024  # never above 1024


@pytest.mark.parametrize("mode,sin", [("sound", True), ("paper", True), ("sound", False)])
def test_no_batch_of_occluded_windows_exceeds_the_chunk(monkeypatch, mode, sin):
    """Memory is flat in the number of windows: every occluded batch holds at most `chunk` windows."""
    m = spread_model()
    x = images(2, 32, seed=5)
    if not sin:
        m.sin = None
    eng = Engine(m, 32, 5, chunk=64, mode=mode)
    sizes = []
    inner = eng.occluded_labels

    def counted(x, f, o, img, *a):
        sizes.append(len(img))
        return inner(x, f, o, img, *a)

    monkeypatch.setattr(eng, "occluded_labels", counted)
    recs = eng.run(x, early_stop=False)
    assert max(sizes) <= 64 and sum(sizes) == sum(r["n_candidates"] for r in recs) > 64 * 4


def test_chunk_size_does_not_change_the_records():
    m = spread_model()
    x = images(3, 16, seed=4)
    y = torch.tensor([0, 1, 2])
    a = Engine(m, 16, 2, chunk=8).run(x, y, early_stop=False)  # 3 images x up to 13 x 13 windows, 8 at a time
    b = Engine(m, 16, 2, chunk=300).run(x, y, early_stop=False)  # 300 at a time
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == [
        {k: v for k, v in r.items() if k not in drop} for r in b
    ]


def test_bench_one_reports_consistent_counts():
    from scalecert.cli import bench_one

    m = spread_model()
    x = images(2, 16, seed=5)
    row = bench_one(m, x, 2, repeat=1)
    recs = Engine(m, 16, 2).run(x, early_stop=False)
    assert row["windows_total"] == 13 * 13  # squares of side 2 + 3 - 1 = 4 at stride 1 on 16 px
    assert row["candidates_mean"] == sum(r["n_candidates"] for r in recs) / 2
    assert 0 < row["efficiency"] < 50 and row["speedup_vs_mr"] > 0
    assert m.sin is not None  # the Minority Reports timing restores the SIN layer
    with pytest.raises(ValueError, match="repeat"):
        bench_one(m, x, 2, repeat=0)


def test_bench_one_restores_the_sin_layer_when_minority_reports_fails(monkeypatch):
    from scalecert import cli

    class Failing(Engine):
        def __post_init__(self):
            if self.model.sin is None:
                raise RuntimeError("no room for Minority Reports")
            super().__post_init__()

    m = spread_model()
    monkeypatch.setattr(cli, "Engine", Failing)
    with pytest.raises(RuntimeError, match="no room"):
        cli.bench_one(m, images(1, 32, seed=5), 5, repeat=1)
    assert m.sin is not None


def test_audit_attack_stride_only_thins_the_attack_positions():
    m = spread_model(rate=0.2)
    x = images(2, seed=5)
    with torch.no_grad():
        y = m(x).argmax(1)
    res = audit(
        Engine(m, 16, 2), x, y, progress=False, contents=("zeros", "attack"), stride=1, attack_stride=5, attack_steps=1
    )
    assert res["certified"] > 0
    assert len(patch_positions(16, 2, 5)) == 16  # 0, 5, 10 and the last corner 14, per axis
    assert res["cases"] == res["certified"] * (15 * 15 + 16)


def test_audit_cached_matches_audit_and_resumes_from_the_cache(tmp_path, monkeypatch):
    from scalecert import audit as A
    from scalecert import experiments as E
    from scalecert import results as R

    monkeypatch.setattr(R, "CACHE_DIR", tmp_path / "cache")
    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    save_checkpoint(spread_model(rate=0.2), path, {"name": "m"}, half=False)  # its head overflows fp16
    kw = dict(per_class=1, mode="sound", stride=9, attack_stride=27, attack_steps=1, progress=False)
    a = E.audit_cached("cifar10", str(path), 2.4, **kw)
    x, y, ids = E.eval_images("cifar10", 1)
    tot = audit(
        Engine(load_model(str(path)), 32, 2.4), x, y, progress=False, stride=9, attack_stride=27, attack_steps=1
    )
    assert list(a.id) == ids and len(a) == 10
    assert (int(a.certified.sum()), int(a.cases.sum()), int(a.flipped.sum()), int(a.violations.sum())) == (
        tot["certified"],
        tot["cases"],
        tot["flipped"],
        tot["violations"],
    )
    assert a.violations.sum() == 0
    monkeypatch.setattr(A, "audit_records", lambda *a_, **k: pytest.fail("recomputed a cached image"))
    pd.testing.assert_frame_equal(a, E.audit_cached("cifar10", str(path), 2.4, **kw))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="Linux /proc only")
def test_run_peak_sees_an_allocation_and_resets_between_calls():
    from scalecert.cli import run_peak_mb

    before, peak = run_peak_mb(lambda: torch.ones(25_000_000).sum())  # 100 MB, freed on return
    assert peak - before > 90
    before, peak = run_peak_mb(lambda: None)
    assert peak - before < 20


@pytest.mark.parametrize("patch,family", [(2, dict(r=2)), (4, dict(masks=3))])
def test_minority_reports_certified_equals_brute_force_over_every_window(patch, family):
    """MR certifies an image iff the plain prediction and every window-filled prediction equal the label."""
    m = spread_model()
    m.set_sin(1, None)
    x = images(8, seed=3)
    with torch.no_grad():
        y = m(x).argmax(1)
    y[0] = (y[0] + 1) % 10  # one wrong label: never certified
    eng = Engine(m, 16, patch, **family)
    recs = pd.DataFrame(eng.run(x, y))
    want = []
    with torch.no_grad():
        for i in range(len(x)):
            masks = rect_masks(eng.family.boxes, 16, 16).unsqueeze(1)
            filled = x[i : i + 1].expand(len(masks), -1, -1, -1).masked_fill(masks, 0.0)
            labels = m(filled).argmax(1)
            want.append(bool(m(x[i : i + 1]).argmax(1) == y[i]) and bool((labels == y[i]).all()))
    assert recs.certified.tolist() == want
    assert 0 < sum(want) < len(want), "the check needs certified and uncertified images"
    assert (recs.n_candidates == len(eng.family)).all()


def test_sound_mode_on_the_mask_set_has_no_violations():
    """The certificate stays sound on PatchCleanser's mask set: SIN prunes the masks, every patch lies in one."""
    m = spread_model(rate=0.2)
    x = images(6, seed=5)
    with torch.no_grad():
        y = m(x).argmax(1)
    eng = Engine(m, 16, 2, masks=4)
    assert len(eng.family) == 16
    res = audit(eng, x, y, progress=False, contents=("zeros", "ones", "noise"))
    assert res["certified"] > 0 and res["flipped"] > 0
    assert res["violations"] == 0, res["examples"]


@pytest.mark.parametrize("kw", [dict(tau=0.5), dict(rule="paper")])
def test_mask_set_takes_no_tau_and_only_the_strict_rule(kw):
    with pytest.raises(ValueError, match="mask-set"):
        Engine(spread_model(), 16, 2, masks=6, **kw)
