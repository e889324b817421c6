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

Timings are kept apart (``timings.csv``) so that record tables are exactly reproducible.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import tempfile
import time
from pathlib import Path

import pandas as pd

CACHE_DIR = Path(os.environ.get("SCALECERT_CACHE_DIR", Path(__file__).resolve().parent.parent / "data" / "cache"))
TIMING_COLUMNS = ("seconds",)


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
def exclusive(name: str, cache_dir: Path | None = None, wait: bool = True):
    """Hold an exclusive advisory lock named ``name``, one per cache folder, for the block; yield True once held.
    With ``wait=False`` yield False at once (holding nothing) if another process holds it."""
    folder = config_key({"cache": str(Path(cache_dir or CACHE_DIR).resolve())})
    path = Path(tempfile.gettempdir()) / "scalecert-locks" / folder / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:  # the kernel releases the lock when the process exits, however it exits
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def chunks(n: int, size: int) -> list[range]:
    """Return the fixed chunks of image positions [0, n)."""
    return [range(s, min(n, s + size)) for s in range(0, n, size)]


def compute(run: Path, n: int, chunk_size: int, fn, rank: int = 0, world: int = 1, progress: bool = True,
            fail_after: int | None = None, redo: bool = False) -> int:
    """Compute this rank's missing chunks (every chunk with ``redo``) with ``fn(range) -> DataFrame``; return how many.

    A chunk's time is its wall time plus ``df.attrs["extra_seconds"]`` (work ``fn`` reused from another configuration).
    ``redo`` overwrites each chunk in place (atomically) rather than deleting the run first, so that a process
    reading the same run meanwhile always finds every chunk."""
    from tqdm.auto import tqdm
    size = run / "size.json"  # outside config.json (which names the run), so old runs keep their key
    if not size.is_file():
        atomic_write_text(size, json.dumps({"images": n, "chunk_images": chunk_size}))
    if redo:
        (run / f"timings-rank{rank}.csv").unlink(missing_ok=True)
    todo = [(c, r) for c, r in enumerate(chunks(n, chunk_size)) if c % world == rank
            and (redo or not (run / f"chunk-{c:05d}.csv").is_file())]
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
                t = time.perf_counter()
                df = fn(r)
                secs = time.perf_counter() - t + float(df.attrs.get("extra_seconds", 0.0))  # work reused from elsewhere
                df = df.drop(columns=[c_ for c_ in TIMING_COLUMNS if c_ in df.columns])
                df.insert(0, "config_key", run.name)
                atomic_write_text(out, df.to_csv(index=False))
                with open(run / f"timings-rank{rank}.csv", "a") as f:
                    f.write(f"{c},{len(r)},{secs:.4f}\n")
            done += 1
            if fail_after is not None and done >= fail_after:
                raise KeyboardInterrupt(f"fault injected after {done} chunks")
        todo, wait = busy, True
    bar.close()
    return done


def merge(run: Path, n: int, chunk_size: int, ids=None) -> pd.DataFrame:
    """Return the merged records of every chunk, checking each shard's key and that every image is there once."""
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
    out = pd.concat(parts, ignore_index=True)
    if ids is not None and list(out["id"]) != list(ids):
        raise CacheMismatch(f"{run}: merged ids differ from the requested images")
    if out["id"].duplicated().any():
        raise CacheMismatch(f"{run}: some images appear twice")
    return out


def cached(config: dict, ids: list, chunk_images: int, fn, force: bool = False, progress: bool = True,
           cache_dir: Path | None = None) -> pd.DataFrame:
    """Return the merged records of a configuration's run, computing its missing chunks (all with ``force``) with
    ``fn(range)`` first; ``attrs`` hold ``seconds_per_image`` and the run folder (``cache``)."""
    run = open_run(config, cache_dir)
    compute(run, len(ids), chunk_images, fn, progress=progress, redo=force)
    df = merge(run, len(ids), chunk_images, ids)
    t = timings(run)
    df.attrs["seconds_per_image"] = float(t.seconds.sum() / max(1, t.images.sum())) if len(t) else float("nan")
    df.attrs["cache"] = str(run)
    return df


def timings(run: Path) -> pd.DataFrame:
    """Return the per-chunk timings of a run (chunk, images, seconds), from every rank."""
    frames = [pd.read_csv(p, names=["chunk", "images", "seconds"]) for p in sorted(run.glob("timings-rank*.csv"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["chunk", "images", "seconds"])


#: configuration fields shown by ``status`` (whichever a run has), in this order
STATUS_FIELDS = ("dataset", "kind", "peer", "mode", "rule", "patch", "patch_pct", "tau", "layer", "rate")


def status(cache_dir: Path | None = None) -> pd.DataFrame:
    """Return one row per cached run: its main settings, chunks and images done of its total, seconds, ETA."""
    rows = []
    for meta in sorted(Path(cache_dir or CACHE_DIR).glob("*/config.json")):
        run, config = meta.parent, json.loads(meta.read_text())
        size = json.loads((run / "size.json").read_text()) if (run / "size.json").is_file() else None
        done = sorted(int(p.stem.split("-")[1]) for p in run.glob("chunk-*.csv"))
        row = {"key": run.name, **{k: config[k] for k in STATUS_FIELDS if k in config}, "chunks_done": len(done)}
        t = timings(run)
        row["seconds"] = round(float(t.seconds.sum()), 1)
        if size:
            parts = chunks(size["images"], size["chunk_images"])
            row["chunks"] = len(parts)
            row["images_done"] = sum(len(parts[c]) for c in done if c < len(parts))
            row["images"] = size["images"]
            left = row["images"] - row["images_done"]
            per_image = t.seconds.sum() / max(1, t.images.sum())
            row["eta_hours"] = round(left * per_image / 3600, 2) if len(t) else None
        rows.append(row)
    cols = ["key", *STATUS_FIELDS, "chunks_done", "chunks", "images_done", "images", "seconds", "eta_hours"]
    out = pd.DataFrame(rows)
    for c in ("chunks", "images_done", "images", "layer"):  # whole numbers, some unknown
        if c in out.columns:
            out[c] = out[c].astype("Int64")
    return out[[c for c in cols if c in out.columns]] if len(out) else pd.DataFrame(columns=cols)
