import functools

import numpy as np
import pandas as pd
import pytest

from scalecert import ablation as A
from scalecert import experiments as E
from scalecert.baselines import harness as H
from scalecert.windows import candidate_windows, covers_all_patches, mask_set


def test_families_are_05_11_07_and_the_mask_set_and_each_covers_every_patch():
    c = A.families("cifar10", 2.4)
    # on 32 x 32 images tau = 0.5 and 0.6 merge the 2.4% patch's windows alike (9 px at stride 3): one family
    assert [f["family"] for f in c] == ["r=3", "r=1", "k=6 masks", "r=3 tau=0.3", "r=3 tau=0.5 (= r=3 tau=0.6)"]
    assert [f["kw"].get("tau") for f in c] == [None, None, None, 0.3, 0.5]
    assert [f["family"] for f in A.families("cifar10", 0.4)] == ["r=3", "r=1", "k=6 masks"]
    i = A.families("imagenette", 2.0)  # 05's and 11's Imagenette families are merged at tau = 0.3 already
    assert [f["family"] for f in i] == ["r=3 tau=0.3", "r=1 tau=0.3", "k=6 masks", "r=3 tau=0.5", "r=3 tau=0.6"]
    for name, n, pct in (("cifar10", 32, 2.4), ("imagenette", 224, 2.0)):
        for f in A.families(name, pct):
            kw = f["kw"]
            fam = mask_set(n, pct, kw["masks"]) if "masks" in kw else candidate_windows(n, pct, kw["r"], kw["tau"])
            assert covers_all_patches(fam), (name, f["family"])


def test_every_family_runs_all_four_defences_on_the_right_models():
    runs = A.defence_runs("cifar10", A.families("cifar10", 2.4)[0])
    assert [(d, m) for d, m, _ in runs] == [
        (A.SC, "cifar10_resnet20_sin1_r20"),
        (A.SC_PAPER, "cifar10_resnet20_sin1_r20"),
        (A.MR_VANILLA, "cifar10_resnet20_vanilla"),
        (A.MR_OCCL, E.occlusion_model_name("cifar10")),
    ]
    assert runs[2][2]["sin"] is False and "sin" not in runs[3][2]
    masks = A.defence_runs("cifar10", A.families("cifar10", 2.4)[2])
    assert A.SC_PAPER not in [d for d, _, _ in masks]  # the mask set has no paper-mode rule


def _recs(certified, ids=None):
    ids = list(range(len(certified))) if ids is None else ids
    return pd.DataFrame({"id": ids, "certified": np.asarray(certified, bool)})


def test_verdict_pairs_the_two_runs_image_by_image():
    sc = _recs([1] * 6 + [0] * 4)
    # MR certifies ids 6-9, its rows in reversed id order: paired by id, 6 images only ScaleCert certifies against 4
    # only MR does (p = 2 * 386 / 1024); paired by row position it would be 2 against 0 (p = 0.5)
    mr = _recs([0] * 6 + [1] * 4, ids=list(range(10)))[::-1].reset_index(drop=True)
    recs = {(2.4, "r=3", A.SC): sc, (2.4, "r=3", A.MR_OCCL): mr, (2.4, "r=3", A.MR_VANILLA): _recs([0] * 10)}
    v = A.verdict("cifar10", recs, n_boot=2000)
    assert len(v) == 1 and list(v.columns) == A.VERDICT_COLUMNS
    r = v.iloc[0]
    assert (r.scalecert_certified, r.mr_occl_certified, r.difference) == (60.0, 40.0, 20.0)
    assert r.p_value == 0.754
    # the interval of a difference of +-1 on 10 of 10 images spans far beyond 0 on both sides
    assert r.ci_low <= -20 and r.ci_high >= 50


def test_verdict_refuses_runs_on_other_images():
    recs = {(2.4, "r=3", A.SC): _recs([1, 0, 1]), (2.4, "r=3", A.MR_OCCL): _recs([1, 0, 1], ids=[0, 1, 5])}
    with pytest.raises(ValueError, match="same images"):
        A.verdict("cifar10", recs)


def _table(rows):
    return pd.DataFrame(rows, columns=["dataset", "patch_pct", "family", "defense", "forwards_per_image", "certified"])


def test_equal_forwards_takes_mr_s_best_point_at_no_more_forwards():
    t = _table(
        [
            ("C", 2.4, "r=3", A.SC, 50.0, 47.0),
            ("C", 2.4, "k=6 masks", A.SC, 8.0, 30.0),
            ("C", 2.4, "r=3", A.MR_OCCL, 677.0, 55.0),
            ("C", 2.4, "k=6 masks", A.MR_OCCL, 37.0, 40.0),
            ("C", 2.4, "r=3 tau=0.3", A.MR_OCCL, 50.0, 42.0),
        ]
    )
    f = A.equal_forwards(t).set_index("family")
    assert f.mr_occl_complete.all() and sorted(f.reset_index().columns) == sorted(A.FRONTIER_COLUMNS)
    assert f.loc["r=3", "mr_occl_family"] == "r=3 tau=0.3" and f.loc["r=3", "mr_occl_certified"] == 42.0
    assert np.isnan(f.loc["k=6 masks", "mr_occl_certified"])  # MR has nothing as cheap as 8 forwards


def _verdict_row(**kw):
    row = {
        "dataset": "C",
        "patch_pct": 2.4,
        "family": "r=3",
        "images": 100,
        "scalecert_certified": 50.0,
        "mr_occl_certified": 40.0,
        "difference": 10.0,
        "ci_low": 3.0,
        "ci_high": 17.0,
        "p_value": 0.01,
    }
    return {**row, **kw}


def _frontier(complete=True, **kw):
    return pd.DataFrame(
        [
            {
                "dataset": "C",
                "patch_pct": 2.4,
                "scalecert_certified": 50.0,
                "mr_occl_certified": 42.0,
                "mr_occl_complete": complete,
                **kw,
            }
        ]
    )


def test_sentence_is_written_from_the_tables():
    v = pd.DataFrame([_verdict_row()])
    f = _frontier()
    s = A.sentence("C", v, f)
    assert s.startswith("C: SIN adds certified accuracy") and "+10.0" in s and "100 images" in s and "+8.0" in s
    v2 = v.assign(difference=-10.0, ci_low=-17.0, ci_high=-3.0)
    assert "does not add" in A.sentence("C", v2, f)
    assert "no resolved difference in 1 of 1" in A.sentence("C", v.assign(ci_low=-1.0), f)
    assert "no paired comparison" in A.sentence("D", v, f)


def test_sentence_needs_mcnemar_after_holm_not_only_the_interval():
    # an interval above 0 with McNemar's p = 0.0625 (5 discordant images, all one way) is not a resolved difference
    v = pd.DataFrame([_verdict_row(p_value=0.0625, ci_low=0.1, ci_high=1.0, difference=0.5)])
    assert "no difference between SIN and occlusion training alone is resolved" in A.sentence("C", v, _frontier())
    # three pairs: p 0.02 passes 0.05 / 3 alone? no (0.0167), so Holm rejects none although each p < 0.05
    v3 = pd.DataFrame([_verdict_row(family=f, p_value=0.02) for f in ("r=3", "r=1", "k=6 masks")])
    assert "in 0, fewer in 0 and with no resolved difference in 3 of 3" in A.sentence("C", v3, _frontier())
    v3.loc[0, "p_value"] = 0.001  # 0.001 < 0.05/3, then 0.02 < 0.05/2, then 0.02 < 0.05: all three
    assert "more than MR on the occlusion-trained model in 3, fewer in 0" in A.sentence("C", v3, _frontier())


def test_sentence_compares_cost_only_where_every_mr_family_is_computed():
    v = pd.DataFrame([_verdict_row(images=100), _verdict_row(family="r=1", images=90)])
    s = A.sentence("C", v, _frontier(complete=False))
    assert "no patch size has every MR family computed yet" in s and "ahead of" not in s
    assert "90 to 100 images each" in s
    both = pd.concat([_frontier(complete=False), _frontier(complete=True, patch_pct=0.4)], ignore_index=True)
    assert "1 of 2 patch sizes with every MR family computed" in A.sentence("C", v, both)
    table = _table(
        [
            ("C", 2.4, "r=3", A.SC, 700.0, 47.0),
            ("C", 2.4, "r=3", A.MR_OCCL, 677.0, 55.0),
            ("C", 2.4, "r=1", A.SC, 50.0, 47.0),
            ("C", 2.4, "r=1", A.MR_OCCL, 677.0, np.nan),
            ("C", 0.4, "r=3", A.SC, 50.0, 47.0),
            ("C", 0.4, "r=3", A.MR_OCCL, np.nan, np.nan),
        ]
    )
    assert "of 2 (patch, family) pairs (resolved" in A.sentence("C", v, both)
    assert "of 2 (patch, family) pairs computed so far (of 3) (resolved" in A.sentence("C", v, both, table)
    fr = A.equal_forwards(table).set_index(["patch_pct", "family"])
    assert not fr.loc[(2.4, "r=3"), "mr_occl_complete"] and not fr.loc[(0.4, "r=3"), "mr_occl_complete"]
    assert fr.loc[(2.4, "r=3"), "mr_occl_certified"] == 55.0  # the best so far is still shown


def test_tiny_profile_runs_every_code_path_on_one_patch_size():
    t = A.profile_settings("tiny", "imagenette")
    assert t["patches"] == [2.0] and t["rs"] == (3,) and t["taus"] == (0.5,)
    fams = A.families("imagenette", 2.0, t["rs"], taus=t["taus"])
    assert [f["family"] for f in fams] == ["r=3 tau=0.3", "k=6 masks", "r=3 tau=0.5"]
    assert A.profile_settings("paper", "cifar10")["patches"] == E.PATCHES["cifar10"]


def test_run_all_adds_patchcleanser_points_and_keeps_every_other_row(monkeypatch):
    from scalecert.baselines import harness as H

    occl = E.occlusion_model_name("cifar10")
    shipped = {E.model_name(d) for d in ("cifar10", "imagenette")} | {E.model_name("cifar10", 1, 20)}
    monkeypatch.setattr(E, "available", lambda name: name in shipped)  # the twin is not trained yet

    def certify_cached(dataset, ckpt, pct, *, per_class, **kw):
        df = pd.DataFrame(
            {
                "id": range(4),
                "clean_correct": [True] * 4,
                "certified": [True, False, True, False],
                "n_candidates": [9, 9, 9, 9],
            }
        )
        df.attrs["seconds_per_image"] = 0.5
        return df

    calls = []

    def peer_cached(name, dataset, pct, *, per_class, checkpoint=None, **kw):
        calls.append((name, dataset, pct, per_class, checkpoint))
        df = pd.DataFrame(
            {
                "id": range(2),
                "clean_correct": [True, True],
                "certified": [True, False],
                "forwards": [36, 106],
                "certify_forwards": [666, 666],
            }
        )
        df.attrs["seconds_per_image"] = 4.0
        return df

    monkeypatch.setattr(E, "certify_cached", certify_cached)
    monkeypatch.setattr(H, "peer_cached", peer_cached)
    kw = dict(per_class=2, rs=(3,), taus=(0.5,))
    without, _ = A.run_all("cifar10", [0.4, 2.4], patchcleanser=False, **kw)
    table, recs = A.run_all("cifar10", [0.4, 2.4], pc_per_class=1, **kw)
    pc = table.defense.isin([A.PC_VANILLA, A.PC_OCCL])
    pd.testing.assert_frame_equal(table[~pc].reset_index(drop=True)[without.columns], without)
    assert table[~pc].certify_forwards.isna().all()
    assert (table[~pc].guarantee == "detection").all() and (table[pc].guarantee == "recovery").all()
    assert list(table.columns[: len(A.TABLE_COLUMNS)]) == A.TABLE_COLUMNS
    got = table[pc].set_index(["patch_pct", "defense"])
    assert list(got.index) == [(0.4, A.PC_VANILLA), (0.4, A.PC_OCCL), (2.4, A.PC_VANILLA), (2.4, A.PC_OCCL)]
    assert (got.family == "k=6 masks").all()
    v = got.loc[(2.4, A.PC_VANILLA)]
    assert (v.model, v.images, v.clean, v.certified, v.forwards_per_image, v.certify_forwards, v.seconds_per_image) == (
        "cifar10_resnet20_vanilla",
        2,
        100.0,
        50.0,
        71.0,
        666.0,
        4.0,
    )  # inference forwards: (36 + 106) / 2
    o = got.loc[(2.4, A.PC_OCCL)]
    assert o.model == occl and o.note == f"{occl} not trained yet" and pd.isna(o.certified)
    assert calls == [("PatchCleanser", "cifar10", p, 1, "cifar10_resnet20_vanilla") for p in (0.4, 2.4)]
    calls.clear()  # by default: 05's quick sizes on a subset (its cached runs), the whole split on the whole split
    for name, per_class, want in (("cifar10", 5, 1), ("imagenette", 2, 1), ("imagenette", None, None)):
        A.run_all(name, [A.TAU_PATCH[name]], **{**kw, "per_class": per_class})
        assert calls[-1][3] == want
    calls.clear()  # "auto" on a subset: 07's patch size only; on the whole split: every patch size
    A.run_all("cifar10", [0.4, 2.4], **kw)
    assert [c[2] for c in calls] == [2.4]  # the vanilla model only: the twin is not shipped here
    calls.clear()
    A.run_all("cifar10", [0.4, 2.4], **{**kw, "per_class": None})
    assert [c[2] for c in calls] == [0.4, 2.4]
    assert set(recs) >= {(0.4, "k=6 masks", A.PC_VANILLA), (2.4, "k=6 masks", A.PC_VANILLA)}
    assert len(A.verdict("cifar10", recs, n_boot=200)) == 0  # no MR (occlusion-trained) runs here: nothing to pair


def test_pair_order_runs_the_cheapest_verdict_pair_first_and_unpriced_pairs_last():
    jobs = pd.DataFrame(
        {
            "patch_pct": [2.0, 2.0, 1.0, 1.0, 3.0, 3.0, 3.0],
            "family": ["r=3", "r=3", "r=3", "r=3", "r=3", "k=6 masks", "k=6 masks"],
            "defense": [A.SC, A.MR_OCCL] * 2 + [A.SC, A.SC, A.MR_OCCL],
            "status": ["missing", "missing", "done", "partial", "missing", "missing", "missing"],
            "cpu_hours_left": [0.5, 0.1, 0.0, 0.25, np.nan, 0.2, 0.1],
        }
    )
    got = A.pair_order(jobs)
    assert list(zip(got.patch_pct, got.family, got.defense)) == [
        (1.0, "r=3", A.MR_OCCL),  # pair cost 0.25 (its ScaleCert run is done)
        (3.0, "k=6 masks", A.MR_OCCL),  # 0.3, the cheaper run of the pair first
        (3.0, "k=6 masks", A.SC),
        (2.0, "r=3", A.MR_OCCL),  # 0.6
        (2.0, "r=3", A.SC),
        (3.0, "r=3", A.SC),  # not priced: last
    ]


def test_whole_split_runner_prices_each_run_on_its_subset_and_stops_at_the_budget(monkeypatch, tmp_path):
    from scalecert import results as R

    monkeypatch.setattr(R, "CACHE_DIR", tmp_path / "cache")
    kw = dict(defences=(A.MR_VANILLA,), rs=(), taus=())  # the mask set alone: 36 forwards per image
    before = A.whole_split_jobs("cifar10", [2.4], **kw)
    assert list(before.family) == ["k=6 masks"] and before.status.tolist() == ["missing"]
    assert before.cpu_hours_left.isna().all()  # nothing to price it with yet
    logs = []
    after = A.run_whole_split("cifar10", [2.4], max_hours=0.0, log=logs.append, **kw)
    # priced by its subset run (the key certify_cached wrote is the one the plan reads), whole split not started
    assert after.status.tolist() == ["missing"] and after.images_left.tolist() == [10000]
    assert after.seconds_per_image.iloc[0] > 0 and after.cpu_hours_left.iloc[0] > 0
    assert logs[0].startswith("pricing 2.4% k=6 masks") and logs[-1].startswith("stopping:")
    sub = E.certify_cached("cifar10", "cifar10_resnet20_vanilla", 2.4, per_class=A.PRICE_PER_CLASS, sin=False, masks=6)
    assert len(sub) == 10 * A.PRICE_PER_CLASS and sub.attrs["cache"].startswith(str(tmp_path))


def test_patchcleanser_runs_are_priced_on_their_subset_run_and_paired_apart(monkeypatch, tmp_path):
    from scalecert import results as R

    monkeypatch.setattr(R, "CACHE_DIR", tmp_path / "cache")
    pc = H.peer("PatchCleanser")  # k = 3 (45 pairs per image) keeps the pricing run short; the run's key is the same
    fast = H.dataclasses.replace(pc, certify=functools.partial(pc.certify, k=3))
    peers = {**H._peers(), "PatchCleanser": fast}
    monkeypatch.setattr(H, "_peers", lambda: peers)
    kw = dict(defences=(A.PC_VANILLA, A.MR_VANILLA), rs=(), taus=())
    before = A.whole_split_jobs("cifar10", [2.4], **kw)
    assert sorted(before.defense) == sorted([A.PC_VANILLA, A.MR_VANILLA]) and before.cpu_hours_left.isna().all()
    logs = []
    after = A.run_whole_split("cifar10", [2.4], max_hours=0.0, log=logs.append, **kw)
    pc = after[after.defense == A.PC_VANILLA].iloc[0]
    assert pc.family == "k=6 masks" and pc.images_left == 10000 and pc.seconds_per_image > 0
    assert any(m.startswith(f"pricing 2.4% k=6 masks {A.PC_VANILLA}: 1 images per class") for m in logs)
    # the run the plan priced is the peer harness's subset run (05's quick one)
    sub = H.peer_cached(
        "PatchCleanser",
        "cifar10",
        2.4,
        per_class=A.PC_MAX_PER_CLASS["cifar10"],
        checkpoint="cifar10_resnet20_vanilla",
        compute_missing=False,
        progress=False,
    )
    assert len(sub) == 10 and sub.attrs["cache"].startswith(str(tmp_path))
    # on the same mask set, PatchCleanser's runs are not part of the MR pair: each is a pair of its own
    order = A.pair_order(after.assign(cpu_hours_left=[0.3 if d == A.PC_VANILLA else 0.2 for d in after.defense]))
    assert order.defense.tolist() == [A.MR_VANILLA, A.PC_VANILLA]


def test_run_all_reading_the_cache_only_notes_runs_not_computed_and_writes_nothing(monkeypatch, tmp_path):
    from scalecert import results as R

    cache = tmp_path / "cache"
    monkeypatch.setattr(R, "CACHE_DIR", cache)
    kw = dict(per_class=1, rs=(), taus=(), patchcleanser=False)  # the mask set alone: 36 forwards per image
    table, recs = A.run_all("cifar10", [2.4], compute_missing=False, **kw)
    assert not cache.exists() and recs == {}
    shipped = table[~table.note.fillna("").str.endswith("not trained yet")]
    assert len(shipped) >= 2 and (shipped.note == A.NOT_COMPUTED).all() and shipped.certified.isna().all()
    computed, _ = A.run_all("cifar10", [2.4], **kw)  # computes them
    again, recs = A.run_all("cifar10", [2.4], compute_missing=False, **kw)  # now read, not computed
    pd.testing.assert_frame_equal(again, computed)
    assert set(recs) == {(2.4, "k=6 masks", d) for d in shipped.defense}


def test_cached_refuses_to_compute_when_asked_not_to(tmp_path):
    from scalecert import results as R

    config, ids = {"kind": "test", "n": 3}, [0, 1, 2]

    def fn(rg):
        return pd.DataFrame({"id": list(rg), "v": [1.0] * len(rg)})

    with pytest.raises(R.NotComputed):
        R.cached(config, ids, 2, fn, progress=False, cache_dir=tmp_path, compute_missing=False)
    assert list(tmp_path.iterdir()) == []
    df = R.cached(config, ids, 2, fn, progress=False, cache_dir=tmp_path)
    assert R.is_complete(config, 3, 2, tmp_path)
    pd.testing.assert_frame_equal(R.cached(config, ids, 2, fn, cache_dir=tmp_path, compute_missing=False), df)
    with pytest.raises(ValueError, match="force"):
        R.cached(config, ids, 2, fn, force=True, cache_dir=tmp_path, compute_missing=False)
