"""Result cache: per-configuration folders of per-chunk record files, written atomically and merged.

A certification job is a configuration (data set, checkpoint hash, patch, mode, rule, tau, r,
SIN layer and rate, image ids) applied to a list of images. The images are cut into fixed chunks;
chunk ``c`` is computed by rank ``c % world`` and written as ``chunk-c.csv`` (via a temporary file
and a rename), so that

* a killed run, started again, skips the chunks already on disk and redoes only the missing ones;
* the merged table does not depend on the number of processes (identical row for row);
* a folder made with another configuration or checkpoint is refused by name (its ``config.json``);
* processes that need the same run at the same time (notebooks side by side) compute each chunk once and share
  the work: a chunk is computed under an exclusive lock (a file in the system's temporary folder, named after the
  cache folder, so the cache holds results only; released when its process ends, even if killed); a process that
  finds a chunk's lock held moves on to the next chunk, comes back to the ones it passed at the end, waits on their
  locks and reads what the other process wrote.

Timings are kept apart (``timings-rank<r>.csv``) so that record tables are exactly reproducible.

A finished run can be compacted (``compact``, ``compact_all``; ``python -m scalecert cache --compact``): its chunks,
timings and size become one compressed Parquet file, ``records.parquet``, beside ``config.json``, and the chunk, timing
and size files are removed (two files per finished run). The file holds the merged records column by column with their
exact pandas types (NaN kept apart from None, mixed columns of the CSV reader restored cell by cell) and, in its
metadata, the run's key, size and the text of its timing files (``run_size`` reads either form). It is written through a
temporary file and a rename and read back and compared with the chunk merge before any chunk is removed. Every reader
(``merge``, ``timings``, ``status``, ``cached``) gives the same tables from either form; ``compute`` skips a compacted
run (``redo`` recomputes it into chunks, which ``cached`` compacts again). Compaction holds a run's lock exclusively and
``compute`` holds it shared, so a run being computed is never compacted. ``write_index`` lists every run in
``INDEX.csv`` (settings, checkpoint name, state).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import secrets
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .paths import CACHE_DIR, CHECKPOINT_DIR

TIMING_COLUMNS = ("seconds",)
#: the records and timings of a compacted run
RECORDS = "records.parquet"
#: the list of every run, written by ``write_index``
INDEX = "INDEX.csv"


class CacheMismatch(RuntimeError):
    """Raised when a cache folder or shard was made with a different configuration."""


def config_key(config: dict) -> str:
    """Return a short stable hash of a JSON-serialisable configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_write(path: Path, write) -> None:
    """Write a file with ``write(tmp_path)`` to a temporary file named per process, then rename it to path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name per call: notebooks may run side by side, and a process may write one file from two places
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temps(path: Path, older_than: float = 3600) -> list[Path]:
    """Return the temporary files of :func:`atomic_write` for path older than older_than seconds, after deleting
    them (a writer killed between its write and its rename leaves one behind)."""
    path = Path(path)
    stale = [t for t in path.parent.glob(f".{path.name}.*.tmp") if time.time() - t.stat().st_mtime > older_than]
    for t in stale:
        t.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to path through a temporary file and a rename."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def open_run(config: dict, cache_dir: Path | None = None) -> Path:
    """Return the run folder of a configuration, creating it or checking its recorded configuration."""
    key = config_key(config)
    run = Path(cache_dir or CACHE_DIR) / key
    meta = run / "config.json"
    if meta.is_file():
        saved = json.loads(meta.read_text())
        if saved != json.loads(json.dumps(config, sort_keys=True, default=str)):
            diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
            raise CacheMismatch(f"{run} holds results of another configuration (differs in {diff})")
    else:
        atomic_write_text(meta, json.dumps(config, sort_keys=True, default=str, indent=1))
    return run


@contextlib.contextmanager
def _flock(name: str, cache_dir: Path | None, wait: bool, shared: bool):
    folder = config_key({"cache": str(Path(cache_dir or CACHE_DIR).resolve())})
    path = Path(tempfile.gettempdir()) / "scalecert-locks" / folder / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:  # the kernel releases the lock when the process exits, however it exits
            fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive(name: str, cache_dir: Path | None = None, wait: bool = True):
    """Hold an exclusive advisory lock named ``name``, one per cache folder, for the block; yield True once held.
    With ``wait=False`` yield False at once (holding nothing) if another process holds it."""
    with _flock(name, cache_dir, wait, shared=False) as held:
        yield held


def computing(run: Path, wait: bool = True):
    """Hold a run's lock shared for the block (``compute`` does, while it computes; processes share it): ``compact``
    takes it exclusively, so it never compacts a run that a process is computing. Yields True once held."""
    return _flock(f"{Path(run).name}-run", Path(run).parent, wait, shared=True)


def chunks(n: int, size: int) -> list[range]:
    """Return the fixed chunks of image positions [0, n)."""
    return [range(s, min(n, s + size)) for s in range(0, n, size)]


def compute(
    run: Path,
    n: int,
    chunk_size: int,
    fn,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    fail_after: int | None = None,
    redo: bool = False,
) -> int:
    """Compute this rank's missing chunks (every chunk with ``redo``) with ``fn(range) -> DataFrame``; return how many.

    A chunk's time is its wall time plus ``df.attrs["extra_seconds"]`` (work ``fn`` reused from another configuration).
    ``redo`` overwrites each chunk in place (atomically) rather than deleting the run first, so that a process
    reading the same run meanwhile always finds every chunk. A compacted run (``records.parquet``) is complete: without
    ``redo`` nothing is computed; with it every chunk is computed again into chunk files, and the records file stays
    what readers read until ``compact`` replaces it (``cached`` does)."""
    with computing(run):
        if not redo and is_compact(run):
            return 0
        return _compute(run, n, chunk_size, fn, rank, world, progress, fail_after, redo)


def _compute(
    run: Path, n: int, chunk_size: int, fn, rank: int, world: int, progress: bool, fail_after: int | None, redo: bool
) -> int:
    from tqdm.auto import tqdm

    size = run / "size.json"  # outside config.json (which names the run), so old runs keep their key
    if not size.is_file():
        atomic_write_text(size, json.dumps({"images": n, "chunk_images": chunk_size}))
    if redo:
        (run / f"timings-rank{rank}.csv").unlink(missing_ok=True)
    todo = [
        (c, r)
        for c, r in enumerate(chunks(n, chunk_size))
        if c % world == rank and (redo or not (run / f"chunk-{c:05d}.csv").is_file())
    ]
    done = 0
    bar = tqdm(total=len(todo), disable=not progress or rank != 0, desc=f"chunks (rank {rank})")
    wait = False  # first pass: skip the chunks another process is computing; second pass: wait for them
    while todo:
        busy = []
        for c, r in todo:
            out = run / f"chunk-{c:05d}.csv"
            with exclusive(f"{run.name}-{c:05d}", run.parent, wait=wait) as held:
                if not held:
                    busy.append((c, r))
                    continue
                bar.update()
                if not redo and out.is_file():  # written by another process meanwhile
                    continue
                t, cpu = time.perf_counter(), time.process_time()
                df = fn(r)
                extra = float(df.attrs.get("extra_seconds", 0.0))  # work reused from elsewhere (its wall time)
                secs = time.perf_counter() - t + extra
                # CPU seconds of this process (every thread) beside the wall time: a machine shared with other jobs,
                # or a stopped process, inflates the wall time but not this (reused work counts its wall time)
                cpu = time.process_time() - cpu + extra
                df = df.drop(columns=[c_ for c_ in TIMING_COLUMNS if c_ in df.columns])
                df.insert(0, "config_key", run.name)
                atomic_write_text(out, df.to_csv(index=False))
                with open(run / f"timings-rank{rank}.csv", "a") as f:
                    f.write(f"{c},{len(r)},{secs:.4f},{cpu:.4f}\n")
            done += 1
            if fail_after is not None and done >= fail_after:
                raise KeyboardInterrupt(f"fault injected after {done} chunks")
        todo, wait = busy, True
    bar.close()
    return done


def is_compact(run: Path) -> bool:
    """Return True iff a run has been compacted: its records and timings are in ``records.parquet``."""
    return (Path(run) / RECORDS).is_file()


def _merge_chunks(run: Path, n: int, chunk_size: int) -> pd.DataFrame:
    parts = []
    for c, r in enumerate(chunks(n, chunk_size)):
        path = run / f"chunk-{c:05d}.csv"
        if not path.is_file():
            raise CacheMismatch(f"{path} is missing: the run is incomplete (start it again to resume)")
        df = pd.read_csv(path, dtype={"config_key": str})  # a hex key like "4590e25..." would parse as a float
        if (df["config_key"] != run.name).any():
            raise CacheMismatch(f"{path} was made with configuration {df['config_key'].iloc[0]}, not {run.name}")
        if len(df) != len(r):
            raise CacheMismatch(f"{path} has {len(df)} rows, expected {len(r)}")
        parts.append(df)
    return pd.concat(parts, ignore_index=True)


def _check_ids(out: pd.DataFrame, run: Path, ids=None) -> pd.DataFrame:
    if ids is not None and list(out["id"]) != list(ids):
        raise CacheMismatch(f"{run}: merged ids differ from the requested images")
    if out["id"].duplicated().any():
        raise CacheMismatch(f"{run}: some images appear twice")
    return out


def merge(run: Path, n: int, chunk_size: int, ids=None) -> pd.DataFrame:
    """Return the merged records of a run (of every chunk, or of its records file once compacted), checking each
    shard's key and that every image is there once."""
    run = Path(run)
    if is_compact(run):
        return _check_ids(_read_compact(run, n, chunk_size), run, ids)
    try:
        out = _merge_chunks(run, n, chunk_size)
    except (CacheMismatch, FileNotFoundError):
        if not is_compact(run):
            raise
        out = _read_compact(run, n, chunk_size)  # compacted while its chunks were being read
    return _check_ids(out, run, ids)


class NotComputed(LookupError):
    """A configuration's run is not complete in the cache and the caller asked not to compute it."""


def is_complete(config: dict, n: int, chunk_images: int, cache_dir: Path | None = None) -> bool:
    """Return True iff the cache holds a configuration's run complete (compacted, or every chunk on disk); reads only,
    creates nothing."""
    run = Path(cache_dir or CACHE_DIR) / config_key(config)
    return (run / "config.json").is_file() and _run_complete(run, n, chunk_images)


def _run_complete(run: Path, n: int, chunk_images: int) -> bool:
    """Return True iff a run folder is compacted or holds every chunk of its n images."""
    return is_compact(run) or set(_chunks_done(run)) >= set(range(len(chunks(n, chunk_images))))


def cached(
    config: dict,
    ids: list,
    chunk_images: int,
    fn,
    force: bool = False,
    progress: bool = True,
    cache_dir: Path | None = None,
    compute_missing: bool = True,
) -> pd.DataFrame:
    """Return the merged records of a configuration's run, computing its missing chunks (all with ``force``) with
    ``fn(range)`` first; ``attrs`` hold ``seconds_per_image`` and the run folder (``cache``). A compacted run is read,
    not computed; with ``force`` it is computed again and compacted again. ``compute_missing=False``: a run not
    complete raises ``NotComputed`` and nothing is written."""
    if force and not compute_missing:
        raise ValueError("force recomputes the run: it cannot go with compute_missing=False")
    if not compute_missing and not is_complete(config, len(ids), chunk_images, cache_dir):
        raise NotComputed(f"run {config_key(config)} is not complete in the cache")
    run = open_run(config, cache_dir)
    was_compact = force and is_compact(run)
    compute(run, len(ids), chunk_images, fn, progress=progress, redo=force)
    if was_compact and compact(run) != "compacted":
        (run / RECORDS).unlink(missing_ok=True)  # could not be compacted again: the recomputed chunks are the records
    df = merge(run, len(ids), chunk_images, ids)
    t = timings(run)
    df.attrs["seconds_per_image"] = float(t.seconds.sum() / max(1, t.images.sum())) if len(t) else float("nan")
    df.attrs["cache"] = str(run)
    return df


#: a timing line: chunk, images, wall seconds, CPU seconds (empty, read as NaN, in lines written before 2026-12-07)
TIMINGS_NAMES = ["chunk", "images", "seconds", "cpu_seconds"]


def _timings_of(frames: list) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TIMINGS_NAMES)


def timings(run: Path) -> pd.DataFrame:
    """Return the per-chunk timings of a run (chunk, images, wall seconds, CPU seconds: NaN where not recorded), from
    every rank."""
    run = Path(run)
    if not is_compact(run):
        try:
            return _timings_of([pd.read_csv(p, names=TIMINGS_NAMES) for p in sorted(run.glob("timings-rank*.csv"))])
        except FileNotFoundError:
            if not is_compact(run):
                raise  # else compacted while its timing files were being read
    return _compact_timings(_read_meta(run / RECORDS))


def _compact_timings(meta: dict) -> pd.DataFrame:
    """The timings of a compacted run: its timing files' text, parsed as ``timings`` parses the files."""
    return _timings_of([pd.read_csv(io.StringIO(text), names=TIMINGS_NAMES) for _, text in meta["timings"]])


#: configuration fields shown by ``status`` (whichever a run has), in this order
STATUS_FIELDS = ("dataset", "kind", "peer", "mode", "rule", "patch", "patch_pct", "tau", "masks", "layer", "rate")


def _chunks_done(run: Path) -> list[int]:
    """Return the chunks of a run on disk (all of them once it is compacted)."""
    if is_compact(run):
        return list(range(_read_meta(run / RECORDS)["chunks"]))
    return sorted(int(p.stem.split("-")[1]) for p in run.glob("chunk-*.csv"))


def status(cache_dir: Path | None = None) -> pd.DataFrame:
    """Return one row per cached run: its main settings, chunks and images done of its total, seconds, ETA."""
    rows = []
    for meta in sorted(Path(cache_dir or CACHE_DIR).glob("*/config.json")):
        run, config = meta.parent, json.loads(meta.read_text())
        size = run_size(run)
        done = _chunks_done(run)
        row = {"key": run.name, **{k: config[k] for k in STATUS_FIELDS if k in config}, "chunks_done": len(done)}
        t = timings(run)
        row["seconds"] = round(float(t.seconds.sum()), 1)
        cpu = pd.to_numeric(t.cpu_seconds)
        row["cpu_seconds"] = round(float(cpu.sum()), 1) if len(t) and cpu.notna().all() else None  # every chunk's
        if size:
            parts = chunks(size["images"], size["chunk_images"])
            row["chunks"] = len(parts)
            row["images_done"] = sum(len(parts[c]) for c in done if c < len(parts))
            row["images"] = size["images"]
            left = row["images"] - row["images_done"]
            per_image = t.seconds.sum() / max(1, t.images.sum())
            row["eta_hours"] = round(left * per_image / 3600, 2) if len(t) else None
        rows.append(row)
    cols = [
        "key",
        *STATUS_FIELDS,
        "chunks_done",
        "chunks",
        "images_done",
        "images",
        "seconds",
        "cpu_seconds",
        "eta_hours",
    ]
    out = pd.DataFrame(rows)
    for c in ("chunks", "images_done", "images", "layer"):  # whole numbers, some unknown
        if c in out.columns:
            out[c] = out[c].astype("Int64")
    if "cpu_seconds" in out.columns:
        out["cpu_seconds"] = pd.to_numeric(out["cpu_seconds"])  # NaN where not every chunk recorded it
    return out[[c for c in cols if c in out.columns]] if len(out) else pd.DataFrame(columns=cols)


# --- the compact form of a finished run: one Parquet file -----------------------------------------------------------

COMPACT_FORMAT = 1


class NotStorable(ValueError):
    """Raised when a run's records would not read back from its records file exactly as from its chunks."""


def _is_nan(v) -> bool:
    return type(v) is float and v != v


#: cells of a column of mixed types (the CSV reader's object columns that are not plain text or booleans with gaps):
#: stored as JSON text [tag, value], the tag naming the Python or NumPy type to restore
_TAGS = {str: "s", bool: "b", int: "i", float: "f", type(None): "n", np.bool_: "B", np.int64: "I", np.float64: "F"}
_TYPES = {tag: t for t, tag in _TAGS.items()}


def _encode(s: pd.Series):
    """Return (Arrow array, kind) of a record column; kind tells ``_decode`` how to restore its pandas type."""
    import pyarrow as pa

    dtype = s.dtype
    if isinstance(dtype, np.dtype) and dtype.kind in "biuf":
        return pa.array(s.to_numpy(), from_pandas=False), str(dtype)  # NaN stays a float value, not a null
    if isinstance(dtype, pd.StringDtype) and _is_nan(dtype.na_value):  # the CSV reader's text columns
        return pa.array(s.tolist(), type=pa.string(), from_pandas=True), "str"
    if isinstance(dtype, np.dtype) and dtype.kind == "O":
        values = s.tolist()
        types = {type(v) for v in values if not _is_nan(v)}
        if types <= {bool} or types <= {str}:  # booleans or text with gaps (NaN): nulls
            kind = "bool" if types <= {bool} else "str"
            arrow = pa.bool_() if kind == "bool" else pa.string()
            return pa.array([None if _is_nan(v) else v for v in values], type=arrow), f"object:{kind}"
        cells = []
        for v in values:
            tag = _TAGS.get(type(v))
            if tag is None:
                raise NotStorable(f"column {s.name!r} holds a {type(v).__name__}")
            cells.append(json.dumps([tag, v.item() if isinstance(v, np.generic) else v]))
        return pa.array(cells, type=pa.string()), "object:json"
    raise NotStorable(f"column {s.name!r} has dtype {dtype}")


def _decode(col, kind: str):
    """Return the pandas column of an Arrow column stored by ``_encode``."""
    if kind == "str":
        return pd.Series(col.to_pylist(), dtype=pd.StringDtype(na_value=np.nan))
    if kind.startswith("object:"):
        if kind == "object:json":
            values = [None if t == "n" else _TYPES[t](v) for t, v in map(json.loads, col.to_pylist())]
        else:
            values = [np.nan if v is None else v for v in col.to_pylist()]
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return pd.Series(out, dtype=object)  # as object: pandas would infer text from an object array of strings
    return pd.Series(col.to_numpy().astype(np.dtype(kind), copy=False))


def _write_records(path: Path, df: pd.DataFrame, meta: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(df.index, pd.RangeIndex) or (df.index.start, df.index.step) != (0, 1):
        raise NotStorable("the records have an index other than 0, 1, ...")
    if not df.columns.is_unique or not all(isinstance(c, str) for c in df.columns):
        raise NotStorable("column names are not unique text")
    arrays, kinds = zip(*(_encode(df[c]) for c in df.columns)) if len(df.columns) else ((), ())
    meta = {**meta, "columns": list(kinds), "column_index": str(df.columns.dtype)}
    table = pa.table(dict(zip(df.columns, arrays))).replace_schema_metadata(
        {"scalecert": json.dumps(meta, sort_keys=True)}
    )
    pq.write_table(table, path, compression="zstd")


def _read_meta(path: Path) -> dict:
    import pyarrow.parquet as pq

    return json.loads(pq.read_schema(path).metadata[b"scalecert"])


def run_size(run: Path) -> dict | None:
    """Return a run's size, ``{"images": n, "chunk_images": c}``, from ``size.json`` or, once compacted, from its
    records file; None if it has neither (a run cached before sizes were recorded)."""
    run = Path(run)
    with contextlib.suppress(FileNotFoundError):  # removed by a compaction meanwhile: its records file has it
        return json.loads((run / "size.json").read_text())
    if is_compact(run):
        meta = _read_meta(run / RECORDS)
        return {"images": meta["images"], "chunk_images": meta["chunk_images"]}
    return None


def _read_records(path: Path) -> tuple[pd.DataFrame, dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"scalecert"])
    df = pd.DataFrame(
        {
            name: _decode(table.column(i), kind)
            for i, (name, kind) in enumerate(zip(table.column_names, meta["columns"]))
        },
        index=pd.RangeIndex(table.num_rows),
    )
    df.columns = pd.Index(table.column_names, dtype=meta["column_index"])
    return df, meta


def _read_compact(run: Path, n: int, chunk_size: int) -> pd.DataFrame:
    df, meta = _read_records(run / RECORDS)
    if meta["key"] != run.name:
        raise CacheMismatch(f"{run / RECORDS} was made with configuration {meta['key']}, not {run.name}")
    if (meta["images"], meta["chunk_images"]) != (n, chunk_size):
        raise CacheMismatch(
            f"{run / RECORDS} holds {meta['images']} images in chunks of {meta['chunk_images']}, "
            f"not {n} in chunks of {chunk_size}"
        )
    return df


def _same_cell(u, v) -> bool:
    if u is v or _is_nan(u) and _is_nan(v):  # pd.NA is one object
        return True
    try:
        return bool(u == v)
    except TypeError:  # pd.NA against a value
        return False


def difference(a: pd.DataFrame, b: pd.DataFrame) -> str | None:
    """Return how two tables differ (None if they are identical): index, column names and their type, attrs, each
    column's dtype (text storage included) and each cell, NaN told apart from None and a cell's Python or NumPy type
    from another's; float columns compared bit for bit."""
    if type(a.index) is not type(b.index) or not a.index.equals(b.index):
        return "index"
    if (
        type(a.columns) is not type(b.columns)
        or a.columns.dtype != b.columns.dtype
        or list(a.columns) != list(b.columns)
    ):
        return f"columns {list(a.columns)} != {list(b.columns)}"
    if a.attrs != b.attrs:
        return f"attrs {a.attrs} != {b.attrs}"
    for i, c in enumerate(a.columns):
        x, y = a.iloc[:, i], b.iloc[:, i]
        if x.dtype != y.dtype:
            return f"column {c!r}: dtype {x.dtype!r} != {y.dtype!r}"
        if isinstance(x.dtype, np.dtype) and x.dtype != object:
            if x.to_numpy().tobytes() != y.to_numpy().tobytes():
                return f"column {c!r}: values differ"
            continue
        xs, ys = x.tolist(), y.tolist()
        if [type(v) for v in xs] != [type(v) for v in ys]:
            return f"column {c!r}: cell types differ"
        if not all(map(_same_cell, xs, ys)):
            return f"column {c!r}: values differ"
    try:
        pd.testing.assert_frame_equal(a, b, check_exact=True, check_index_type=True, check_column_type=True)
    except AssertionError as e:
        return str(e)
    return None


def compact(run: Path) -> str:
    """Turn a complete run into its compact form (``records.parquet``; its chunk and timing files removed) and return
    what was done: ``compacted``; ``already`` (compacted before; nothing written); ``partial`` (chunks missing, or no
    ``size.json``: left alone); ``busy`` (a process is computing it: left alone); or ``refused: why`` (inconsistent
    chunks, or records that would not read back identical: left alone). The records file is written through a temporary
    file that is read back and compared with the chunk merge and the timing files (``difference``) before it is renamed
    into place; only then are chunks removed. A compacted run whose chunks are all there again (``cached`` with
    ``force``, or a compaction interrupted before its clean-up) is compacted from those chunks again."""
    run = Path(run)
    size = run_size(run)
    if size is None:
        return "partial"
    n, chunk_size = size["images"], size["chunk_images"]
    parts = chunks(n, chunk_size)
    with exclusive(f"{run.name}-run", run.parent, wait=False) as held:
        if not held:
            return "busy"
        remove_stale_temps(run / RECORDS)
        present = sorted(int(p.stem.split("-")[1]) for p in run.glob("chunk-*.csv"))
        if set(present) - set(range(len(parts))):
            return f"refused: chunk files beyond the {len(parts)} chunks of {n} images"
        if len(present) < len(parts):
            if is_compact(run):
                if not present:  # a clean-up interrupted after the chunks went: timing files the records file holds
                    stored = dict(map(tuple, _read_meta(run / RECORDS)["timings"]))
                    for p in run.glob("timings-rank*.csv"):
                        if stored.get(p.name) == p.read_bytes().decode():
                            p.unlink()
                    _drop_size_file(run)
                return "already"
            return "partial"
        try:
            df = _check_ids(_merge_chunks(run, n, chunk_size), run)
        except CacheMismatch as e:
            return f"refused: {e}"
        files = sorted(run.glob("timings-rank*.csv"))
        texts = [(p.name, p.read_bytes().decode()) for p in files]
        t = _timings_of([pd.read_csv(p, names=TIMINGS_NAMES) for p in files])
        meta = {
            "format": COMPACT_FORMAT,
            "key": run.name,
            "images": n,
            "chunk_images": chunk_size,
            "chunks": len(parts),
            "timings": texts,
        }

        def write(tmp):
            _write_records(tmp, df, meta)
            back, back_meta = _read_records(tmp)
            diff = difference(df, back) or difference(t, _compact_timings(back_meta))
            if diff:
                raise NotStorable(f"reads back differently: {diff}")

        try:
            atomic_write(run / RECORDS, write)
        except NotStorable as e:
            return f"refused: {e}"
        for c in present:
            (run / f"chunk-{c:05d}.csv").unlink()
        for p in files:
            p.unlink()
        _drop_size_file(run)
    return "compacted"


def _drop_size_file(run: Path) -> None:
    """Remove a compacted run's ``size.json`` when its records file says the same size (it then holds it)."""
    path = run / "size.json"
    if path.is_file():
        meta = _read_meta(run / RECORDS)
        if json.loads(path.read_text()) == {"images": meta["images"], "chunk_images": meta["chunk_images"]}:
            path.unlink()


def _last_modified(run: Path) -> float:
    times = [run.stat().st_mtime]
    for p in run.iterdir():
        with contextlib.suppress(FileNotFoundError):
            times.append(p.stat().st_mtime)
    return max(times)


def compact_all(
    cache_dir: Path | None = None, min_age: float = 0.0, checkpoint_dir: Path | None = None
) -> pd.DataFrame:
    """Compact every run of a cache (see ``compact``), leaving alone those with a file modified in the last ``min_age``
    seconds (outcome ``recent``), then write ``INDEX.csv``; return one row per run: key, outcome, detail."""
    cache = Path(cache_dir or CACHE_DIR)
    rows = []
    for meta in sorted(cache.glob("*/config.json")):
        run = meta.parent
        outcome = "recent" if min_age and time.time() - _last_modified(run) < min_age else compact(run)
        kind, _, detail = outcome.partition(": ")
        rows.append({"key": run.name, "outcome": kind, "detail": detail})
    write_index(cache, checkpoint_dir)
    return pd.DataFrame(rows, columns=["key", "outcome", "detail"])


def checkpoint_names(checkpoint_dir: Path | None = None) -> dict:
    """Return {sha256: checkpoint name} of every checkpoint card (``<name>.json``) in a folder."""
    names = {}
    for card in sorted(Path(checkpoint_dir or CHECKPOINT_DIR).glob("*.json")):
        c = json.loads(card.read_text())
        if "sha256" in c:
            names[c["sha256"]] = card.stem
    return names


INDEX_COLUMNS = [
    "key",
    "kind",
    "defense",
    "dataset",
    "checkpoint",
    "patch",
    "mode",
    "tau",
    "r",
    "masks",
    "images",
    "state",
    "form",
]


def write_index(cache_dir: Path | None = None, checkpoint_dir: Path | None = None) -> pd.DataFrame:
    """Write ``INDEX.csv`` in a cache (rewritten only if it changes) and return it: one row per run with its key,
    kind (``certify`` for a certification run), defence (ScaleCert, MR or the peer; certification runs only), data
    set, checkpoint name (by its card's sha256; ``sha256:<first 16 hex>`` if no card has it), patch (%), mode, tau, r,
    masks (PatchCleanser's k of a mask-set family), images, state (``complete``: compacted or every chunk on disk;
    else ``partial``) and form (parquet or chunks)."""
    cache = Path(cache_dir or CACHE_DIR)
    names, rows = checkpoint_names(checkpoint_dir), []
    for meta in sorted(cache.glob("*/config.json")):
        run, config = meta.parent, json.loads(meta.read_text())
        size = run_size(run)
        compacted = is_compact(run)
        complete = compacted or size is not None and _run_complete(run, size["images"], size["chunk_images"])
        sha = config.get("checkpoint_sha256")
        defense = None
        if "kind" not in config:
            defense = (
                config["peer"]
                if "peer" in config
                else (("MR" if config.get("rate") is None else "ScaleCert") if "mode" in config else None)
            )
        checkpoint = names.get(sha, f"sha256:{sha[:16]}") if sha else None
        rows.append(
            {
                "key": run.name,
                "kind": config.get("kind", "certify"),
                "defense": defense,
                "dataset": config.get("dataset"),
                "checkpoint": checkpoint,
                "patch": config.get("patch", config.get("patch_pct")),
                "mode": config.get("mode"),
                "tau": config.get("tau"),
                "r": config.get("r"),
                "masks": config.get("masks"),
                "images": size["images"] if size else None,
                "state": "complete" if complete else "partial",
                "form": "parquet" if compacted else "chunks",
            }
        )
    out = pd.DataFrame(rows, columns=INDEX_COLUMNS).astype({"r": "Int64", "masks": "Int64", "images": "Int64"})
    text = out.to_csv(index=False)
    path = cache / INDEX
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return out
