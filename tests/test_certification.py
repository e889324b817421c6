"""Notebook 05's rows and tables (scalecert.certification), on stand-in runs."""

import pandas as pd

from scalecert import certification as C
from scalecert import experiments as E
from scalecert.baselines import harness as H


def _records(n=4, certified=(True, False, True, False)):
    df = pd.DataFrame(
        {
            "id": range(n),
            "clean_correct": [True] * n,
            "certified": list(certified),
            "n_candidates": [5] * n,
            "n_windows": [36] * n,
            "n_evaluated": [3] * n,  # early exit: fewer than the candidates
            # PatchCleanser: certified images evaluate the whole table; image 1 leaves after the first round (two
            # second rounds), image 3 after a group of pairs
            "forwards": [36, 106, 36, 36],
            "pairs_evaluated": [666, 36, 666, 100],
            "masks": [36] * n,
            "certify_forwards": [666] * n,
        }
    )
    df.attrs["seconds_per_image"] = 0.25
    return df


def test_rows_run_every_defence_once_per_size_and_say_which_models_are_missing(monkeypatch):
    calls = []
    monkeypatch.setattr(E, "available", lambda name: name != E.occlusion_model_name("cifar10"))
    monkeypatch.setattr(H, "peer_available", lambda peer, dataset: peer != "DS")
    monkeypatch.setattr(
        E,
        "certify_cached",
        lambda d, ck, pct, *, per_class, **kw: calls.append(("certify", ck, pct, per_class, kw["mode"])) or _records(),
    )
    monkeypatch.setattr(
        H,
        "peer_cached",
        lambda peer, d, pct, *, per_class, checkpoint=None, **kw: (
            calls.append((peer, checkpoint, pct, per_class)) or _records()
        ),
    )
    sizes = C.table_sizes("cifar10", 2, 1, 3)
    assert sizes == [(2, 0.4, 2, 3), (2, 2.4, 2, 3), (5, 5.0, 1, 3), (5, 8.0, 1, 3)]
    got = pd.DataFrame(C.rows("cifar10", sizes, pc_patches=[2.4], pc_per_class=1))
    ours = got[got.defense.isin(["ScaleCert", "ScaleCert (paper mode)", "MR"])]
    assert len(ours) == 3 * len(sizes) and ours.note.isna().all()
    assert sorted({c[3] for c in calls if c[0] == "certify"}) == [1, 2]  # Table 5's sizes at `large`
    assert (ours.forwards_per_image == 4).all()  # 1 + windows the run evaluated
    assert (ours.inference_forwards == 6).all() and (ours.certify_forwards == 6).all()  # 1 + candidates
    ds = got[got.defense == "DS"]
    assert len(ds) == len(sizes) and ds.note.str.endswith("not trained yet").all()
    pc = got[got.defense.isin([E.PC_VANILLA, E.PC_OCCL])]
    assert pc.patch_pct.tolist() == [2.4, 2.4] and (pc.guarantee == "recovery").all()
    van = pc.set_index("defense").loc[E.PC_VANILLA]
    assert (van.certify_forwards, van.inference_forwards) == (666, 53.5)
    assert van.forwards_per_image == (666 + 106 + 666 + 100) / 4  # what the early-exit run evaluated
    assert pc.set_index("defense").loc[E.PC_OCCL, "note"] == f"{E.occlusion_model_name('cifar10')} not trained yet"
    assert ("PatchCleanser", "cifar10_resnet20_vanilla", 2.4, 1) in calls
    one = pd.DataFrame(C.rows("cifar10", sizes[1:2], pc_patches=[2.4], pc_per_class=1, pc_models=[("PC", "m")]))
    assert "PC" in one.defense.tolist() and not one.defense.isin([E.PC_VANILLA, E.PC_OCCL]).any()
    assert ("PatchCleanser", "m", 2.4, 1) in calls


def test_rows_reading_the_cache_only_say_which_runs_are_not_computed_and_compute_nothing(monkeypatch, tmp_path):
    from scalecert import results as R

    cache = tmp_path / "cache"
    monkeypatch.setattr(R, "CACHE_DIR", cache)
    sizes = C.table_sizes("cifar10", 1, 1, 1)[1:2]  # 2.4%: every defence with a checkpoint, PatchCleanser too
    got = pd.DataFrame(C.rows("cifar10", sizes, pc_patches=[2.4], pc_per_class=1, compute_missing=False))
    assert not cache.exists()
    shipped = got[~got.note.str.endswith("not trained yet")]
    assert len(shipped) >= 5 and (shipped.note == C.NOT_COMPUTED).all() and "certified" not in got
    assert {"ScaleCert", "MR", E.PC_VANILLA} <= set(shipped.defense)
    done = pd.DataFrame([{**got.iloc[0].to_dict(), "note": None, "images": 10, "certified": 50.0}])
    table = C.tables(pd.concat([got, done], ignore_index=True))[2]
    assert str(table["images"].dtype) == "Int64" and table["images"].dropna().tolist() == [10]


def test_tables_put_the_papers_numbers_beside_ours_by_table():
    ours = pd.DataFrame(
        [
            {"table": 2, "dataset": "CIFAR-10 (JPEG)", "patch_pct": 2.4, "defense": "ScaleCert (paper mode)",
             "guarantee": "detection", "images": 10, "clean": 80.0, "certified": 50.0, "seconds_per_image": 0.5},
            {"table": 2, "dataset": "CIFAR-10 (JPEG)", "patch_pct": 2.4, "defense": E.PC_VANILLA,
             "guarantee": "recovery", "images": 10, "clean": 70.0, "certified": 5.0, "seconds_per_image": 4.0},
            {"table": 5, "dataset": "CIFAR-10 (JPEG)", "patch_pct": 5.0, "defense": "MR", "note": "x not trained yet"},
        ]
    )  # fmt: skip
    t = C.tables(ours)
    paper = E.paper_table("table2_certified", "cifar10").set_index(["patch_pct", "defense"])
    two = t[2].set_index("defense")
    assert two.loc["ScaleCert (paper mode)", "paper_certified"] == paper.loc[(2.4, "ScaleCert"), "certified"]
    assert pd.isna(two.loc[E.PC_VANILLA, "paper_certified"])  # the paper does not report PatchCleanser
    assert two.images_per_s.tolist() == [2.0, 0.25]
    assert list(t[2].columns) == [c for c in C.COLUMNS if c in t[2].columns] and "note" not in t[2]
    five = t[5].iloc[0]  # a model not shipped: its note, and the paper's number (Table 5) all the same
    assert five.note == "x not trained yet" and "images" not in t[5] and "clean" not in t[5]
    assert five.paper_certified == paper.loc[(5.0, "MR"), "certified"]
