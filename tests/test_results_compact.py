"""The compact form of a finished run (one records.parquet beside config.json): every reader gives the
same tables as from its chunks; compacted runs are read, not recomputed; partial, busy or inconsistent runs are left
alone; INDEX.csv lists every run."""

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scalecert import results as R

N, CHUNK = 10, 4  # chunks of 4, 4 and 2 images
IDS = list(range(N))


def records(rg):
    """Per-image records whose chunks the CSV reader types differently, so that the merge has every kind of column
    the real cache has: int, float with NaN and -0.0, bool, text with gaps (str), booleans with gaps (object of bool and
    NaN), JSON text empty in a whole chunk (object of NaN and str), ints in one chunk and text in the others (object of
    int and str)."""
    ids = list(rg)
    first = rg.start == 0
    return pd.DataFrame(
        {
            "id": ids,
            "pred": [i % 3 for i in ids],
            "margin": [np.nan if i % 4 == 1 else -0.0 if i == 0 else i / 7 for i in ids],
            "certified": [i % 2 == 0 for i in ids],
            "alert": [True] * len(ids) if first else [None if i % 3 == 0 else i % 2 == 0 for i in ids],
            "box": [None] * len(ids) if first else [json.dumps([i, i + 1, 2, 2]) for i in ids],
            "mixed": ids if first else [f"x{i}" for i in ids],
            "label": ["cat" if i % 2 else None for i in ids],
            "big": [2**62 + i for i in ids],
        }
    )


def never(rg):
    raise AssertionError(f"chunk at {rg.start} computed")


def render(cache, config):
    """Every reader's output for a cache holding the run of config."""
    run = R.open_run(config, cache)
    read = R.cached(config, IDS, CHUNK, never, progress=False, cache_dir=cache)
    return {
        "merge": R.merge(run, N, CHUNK, IDS),
        "merge_no_ids": R.merge(run, N, CHUNK),
        "timings": R.timings(run),
        "status": R.status(cache),
        "cached": read,
    }


def cell_types(df):
    return {c: [type(v) for v in df[c]] for c in df.columns if df[c].dtype == object}


def assert_identical(after, before):
    pd.testing.assert_frame_equal(after, before, check_exact=True, check_index_type=True, check_column_type=True)
    assert after.attrs == before.attrs
    assert cell_types(after) == cell_types(before)  # NaN is not None, a Python int is not a str, ...
    assert R.difference(after, before) is None


def files(run):
    return {p.name: p.stat().st_mtime_ns for p in run.iterdir()}


def test_every_reader_gives_the_same_tables_from_the_chunks_and_from_the_compacted_run(tmp_path):
    config = {"dataset": "cifar10", "mode": "sound", "patch": 2.4, "tau": 0.3, "r": 3}
    run = R.open_run(config, tmp_path)
    for rank in (0, 1):  # two ranks: two timing files
        R.compute(run, N, CHUNK, records, rank=rank, world=2, progress=False)
    before = render(tmp_path, config)
    df = before["merge"]
    assert {c: str(df[c].dtype) for c in ("alert", "box", "mixed", "label", "margin")} == {
        "alert": "object",
        "box": "object",
        "mixed": "object",
        "label": "str",
        "margin": "float64",
    }
    assert {type(v) for v in df.mixed} == {int, str} and np.signbit(df.margin[0])
    assert set(before["cached"].attrs) == {"seconds_per_image", "cache"} and len(before["timings"]) == 3

    out = R.compact_all(tmp_path)
    assert out.to_dict("records") == [{"key": run.name, "outcome": "compacted", "detail": ""}]
    assert sorted(files(run)) == ["config.json", "records.parquet"]
    after = render(tmp_path, config)
    for name in before:
        assert_identical(after[name], before[name])


def test_experiment_tables_read_the_same_from_compacted_runs(tmp_path, monkeypatch):
    from scalecert import data as D
    from scalecert import paperprofile as PP

    cache = tmp_path / "cache"
    monkeypatch.setattr(R, "CACHE_DIR", cache)
    n = 6
    monkeypatch.setattr(D, "load_dataset", lambda name, split=None, root=None: range(n))
    shas = {name: sha for sha, name in PP._checkpoint_names().items()}
    whole, part = R.config_key({"ids": list(range(n))}), R.config_key({"ids": [0, 2, 4]})
    base = {
        "dataset": "cifar10",
        "checkpoint_sha256": shas["cifar10_resnet20_sin1_r20"],
        "patch": 2.4,
        "mode": "sound",
        "rule": "strict",
        "tau": None,
        "r": 3,
        "layer": 1,
        "rate": 0.2,
        "ids": whole,
        "chunk_images": 2,
        "early_stop": True,
    }

    def certificates(rg):
        return pd.DataFrame(
            {"id": list(rg), "certified": [i % 3 == 0 for i in rg], "clean_correct": [i % 2 == 0 for i in rg]}
        )

    runs = (
        (base, n, None),
        ({**base, "ids": part}, 3, None),
        ({**base, "patch": 0.4, "ids": part}, 3, None),
        ({**base, "patch": 0.4}, n, 1),
    )  # a whole split, two subsets, a partial whole split
    for config, size, stop in runs:
        run = R.open_run(config, cache)
        if stop:
            with pytest.raises(KeyboardInterrupt):
                R.compute(run, size, 2, certificates, progress=False, fail_after=stop)
        else:
            R.compute(run, size, 2, certificates, progress=False)

    def tables():
        return {
            "whole": PP.whole_split_results(),
            "plan": PP.paper_plan(),
            "cards": PP.card_accuracy_check(),
            "status": R.status(),
        }

    before = tables()
    assert len(before["whole"]) == 1 and sorted(before["plan"].status) == ["done", "partial"]
    out = R.compact_all(cache)
    assert sorted(out.outcome) == ["compacted"] * 3 + ["partial"]
    after = tables()
    for name in before:
        assert_identical(after[name], before[name])


def test_a_compacted_run_is_read_not_recomputed_and_force_recomputes_it(tmp_path):
    config = {"x": 1}
    first = R.cached(config, IDS, CHUNK, records, progress=False, cache_dir=tmp_path)
    run = Path(first.attrs["cache"])
    assert R.compact(run) == "compacted"
    assert R.compute(run, N, CHUNK, never, progress=False) == 0
    again = R.cached(config, IDS, CHUNK, never, progress=False, cache_dir=tmp_path)
    assert_identical(again, first)

    calls = []

    def changed(rg):
        calls.append(rg.start)
        df = records(rg)
        df["pred"] += 10
        return df

    forced = R.cached(config, IDS, CHUNK, changed, force=True, progress=False, cache_dir=tmp_path)
    assert sorted(calls) == [0, 4, 8]
    assert forced.pred.tolist() == [p + 10 for p in first.pred]
    assert sorted(files(run)) == ["config.json", "records.parquet"]  # compacted again
    assert sorted(R.timings(run).chunk) == [0, 1, 2]  # the recomputation's timings only
    assert_identical(R.cached(config, IDS, CHUNK, never, progress=False, cache_dir=tmp_path), forced)


def test_compaction_leaves_partial_busy_and_inconsistent_runs_alone_and_is_idempotent(tmp_path):
    partial, bad, busy, done = (R.open_run({"x": name}, tmp_path) for name in ("partial", "bad", "busy", "done"))
    unsized = R.open_run({"x": "cached before sizes were recorded"}, tmp_path)  # no size.json: status shows <NA>
    with pytest.raises(KeyboardInterrupt):
        R.compute(partial, N, CHUNK, records, progress=False, fail_after=1)
    for run in (bad, busy, done):
        R.compute(run, N, CHUNK, records, progress=False)
    chunk = bad / "chunk-00001.csv"
    chunk.write_text("".join(chunk.read_text().splitlines(keepends=True)[:3]))  # 2 rows, not 4
    kept = {run: files(run) for run in (partial, bad, busy, unsized)}
    with R.computing(busy):  # as a process computing the run holds it
        out = R.compact_all(tmp_path).set_index("key")
    assert out.loc[partial.name, "outcome"] == "partial" and out.loc[busy.name, "outcome"] == "busy"
    assert out.loc[unsized.name, "outcome"] == "partial"
    assert out.loc[bad.name, "outcome"] == "refused" and "has 2 rows, expected 4" in out.loc[bad.name, "detail"]
    assert out.loc[done.name, "outcome"] == "compacted"
    assert {run: files(run) for run in kept} == kept  # not a file touched
    stamp, index = files(done), (tmp_path / R.INDEX).stat().st_mtime_ns

    out = R.compact_all(tmp_path).set_index("key")
    assert out.loc[done.name, "outcome"] == "already" and out.loc[busy.name, "outcome"] == "compacted"
    assert files(done) == stamp
    R.compute(partial, N, CHUNK, records, progress=False)  # resumed and finished
    assert R.compact(partial) == "compacted" and R.compact(partial) == "already"
    before = R.status(tmp_path)
    assert before.chunks.isna().sum() == 1
    R.compact_all(tmp_path)
    assert_identical(R.status(tmp_path), before)
    assert (tmp_path / R.INDEX).stat().st_mtime_ns != index  # the index changed: rewritten
    index = (tmp_path / R.INDEX).stat().st_mtime_ns
    R.compact_all(tmp_path)
    assert (tmp_path / R.INDEX).stat().st_mtime_ns == index  # unchanged: not rewritten


def test_an_interrupted_compaction_is_finished_by_the_next_one(tmp_path):
    run = R.open_run({"x": 1}, tmp_path)
    R.compute(run, N, CHUNK, records, progress=False)
    saved = {p.name: p.read_bytes() for p in run.iterdir() if p.name.startswith(("chunk-", "timings-"))}
    before = (R.merge(run, N, CHUNK), R.timings(run))
    assert R.compact(run) == "compacted"
    for name, data in saved.items():  # killed after the rename, before the clean-up
        (run / name).write_bytes(data)
    assert_identical(R.merge(run, N, CHUNK), before[0])
    assert R.compact(run) == "compacted"
    assert sorted(files(run)) == ["config.json", "records.parquet"]
    (run / "timings-rank0.csv").write_bytes(saved["timings-rank0.csv"])  # killed after the chunks went
    assert R.compact(run) == "already"
    assert sorted(files(run)) == ["config.json", "records.parquet"]
    size = {"images": N, "chunk_images": CHUNK}
    assert R.run_size(run) == size  # from the records file
    (run / "size.json").write_text(json.dumps({"images": N, "chunk_images": 9}))  # a size the records do not say
    assert R.compact(run) == "already" and (run / "size.json").is_file()  # kept: not the records' to drop
    (run / "size.json").write_text(json.dumps(size))  # compacted when runs kept their size file beside the records
    assert R.compact(run) == "already" and sorted(files(run)) == ["config.json", "records.parquet"]
    assert_identical(R.merge(run, N, CHUNK), before[0])
    assert_identical(R.timings(run), before[1])


def test_a_records_file_that_reads_back_differently_is_not_kept(tmp_path, monkeypatch):
    run = R.open_run({"x": 1}, tmp_path)
    R.compute(run, N, CHUNK, records, progress=False)
    kept = files(run)
    real = R._decode

    def none_for_nan(col, kind):  # a reader that would turn the CSV reader's NaN into None
        s = real(col, kind)
        if kind != "object:bool":
            return s
        return pd.Series([None if v != v else v for v in s], dtype=object)

    monkeypatch.setattr(R, "_decode", none_for_nan)
    outcome = R.compact(run)
    assert outcome.startswith("refused: reads back differently: column 'alert'")
    assert files(run) == kept  # no records file, no temporary file, every chunk kept


def test_index_names_each_run_its_settings_checkpoint_and_state(tmp_path):
    cards, cache = tmp_path / "cards", tmp_path / "cache"
    cards.mkdir()
    (cards / "cifar10_model.json").write_text(json.dumps({"name": "cifar10_model", "sha256": "a" * 64}))
    ours = {
        "dataset": "cifar10",
        "checkpoint_sha256": "a" * 64,
        "patch": 2.4,
        "mode": "sound",
        "rule": "strict",
        "tau": 0.3,
        "r": 3,
        "layer": 1,
        "rate": 0.2,
    }
    mr = {**ours, "tau": None, "rate": None, "masks": 6}  # on PatchCleanser's 6 x 6 mask set
    peer = {"peer": "DS", "version": 1, "dataset": "cifar10", "checkpoint_sha256": "b" * 64, "patch": 2.4}
    stats = {"kind": "sin_statistics", "dataset": "imagenette", "checkpoint_sha256": "a" * 64, "patch_pct": 2.0}
    runs = {
        name: R.open_run(config, cache)
        for name, config in (("ours", ours), ("mr", mr), ("peer", peer), ("stats", stats))
    }
    for name, run in runs.items():
        if name == "mr":
            with pytest.raises(KeyboardInterrupt):
                R.compute(run, N, CHUNK, records, progress=False, fail_after=2)
        else:
            R.compute(run, N, CHUNK, records, progress=False)
    R.compact(runs["peer"])
    written = R.write_index(cache, cards)
    index = pd.read_csv(cache / R.INDEX, dtype={"key": str})
    assert list(index.columns) == R.INDEX_COLUMNS == list(written.columns)
    assert index.key.tolist() == sorted(run.name for run in runs.values())
    rows = index.set_index("key").astype(object).where(index.set_index("key").notna(), None)
    assert rows.loc[runs["ours"].name].to_dict() == {
        "kind": "certify",
        "defense": "ScaleCert",
        "dataset": "cifar10",
        "checkpoint": "cifar10_model",
        "patch": 2.4,
        "mode": "sound",
        "tau": 0.3,
        "r": 3,
        "masks": None,
        "images": N,
        "state": "complete",
        "form": "chunks",
    }
    got = rows.loc[runs["mr"].name, ["defense", "tau", "masks", "state", "form"]].tolist()
    assert got == ["MR", None, 6, "partial", "chunks"]
    assert rows.loc[runs["peer"].name, ["defense", "checkpoint", "mode", "state", "form"]].tolist() == [
        "DS",
        "sha256:" + "b" * 16,
        None,
        "complete",
        "parquet",
    ]
    assert rows.loc[runs["stats"].name, ["kind", "defense", "dataset", "patch"]].tolist() == [
        "sin_statistics",
        None,
        "imagenette",
        2.0,
    ]
    out = R.compact_all(cache, checkpoint_dir=cards).set_index("key")
    assert out.loc[runs["ours"].name, "outcome"] == "compacted"
    assert pd.read_csv(cache / R.INDEX, dtype={"key": str}).set_index("key").loc[runs["ours"].name, "form"] == "parquet"


def test_cache_compact_command(tmp_path, capsys):
    from scalecert import cli

    complete, partial = R.open_run({"x": 1}, tmp_path), R.open_run({"x": 2}, tmp_path)
    R.compute(complete, N, CHUNK, records, progress=False)
    with pytest.raises(KeyboardInterrupt):
        R.compute(partial, N, CHUNK, records, progress=False, fail_after=1)
    assert cli.cache(["--dir", str(tmp_path), "--compact"]) == 0
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert last == {"runs": 2, "compacted": 1, "already": 0, "partial": 1, "busy": 0, "refused": 0}
    assert (complete / R.RECORDS).is_file() and not (partial / R.RECORDS).exists() and (tmp_path / R.INDEX).is_file()
    cli.cache(["--dir", str(tmp_path), "--compact"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["already"] == 1


def test_timings_record_cpu_seconds_and_read_older_lines_without_them(tmp_path):
    run = R.open_run({"x": "timed"}, tmp_path)

    def busy(rg):
        t = time.process_time()
        while time.process_time() - t < 0.05:  # CPU work the process does
            pass
        time.sleep(0.05)  # wall time it does not spend on the CPU
        return records(rg)

    R.compute(run, N, CHUNK, busy, progress=False)
    t = R.timings(run)
    assert list(t.columns) == ["chunk", "images", "seconds", "cpu_seconds"] and len(t) == 3
    assert (t.cpu_seconds >= 0.05).all() and (t.seconds >= t.cpu_seconds + 0.04).all()
    status = R.status(tmp_path).set_index("key")
    assert status.loc[run.name, "cpu_seconds"] == round(t.cpu_seconds.sum(), 1)
    old = R.open_run({"x": "timed before CPU seconds"}, tmp_path)
    R.compute(old, N, CHUNK, records, progress=False)
    (old / "timings-rank0.csv").write_text("0,4,1.5\n1,4,1.25\n2,2,0.5\n")  # a file of the three-column form
    assert R.timings(old).cpu_seconds.isna().all() and R.timings(old).seconds.sum() == 3.25
    assert pd.isna(R.status(tmp_path).set_index("key").loc[old.name, "cpu_seconds"])
    assert R.compact(old) == "compacted"
    assert R.timings(old).cpu_seconds.isna().all() and R.timings(old).seconds.sum() == 3.25  # the same, compacted
