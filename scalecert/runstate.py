"""Resumable epoch loops: a run folder holds ``state.pt`` (rewritten atomically after every epoch) and ``log.jsonl``.

Any training loop can use it: :func:`resume_run` before the first epoch, :func:`end_epoch` after each.
A state made with another configuration is refused, so a changed command never continues an old run.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch


def resume_run(run_dir: Path, config: dict, device="cpu", **stateful) -> tuple[int, float]:
    """Return (epochs done, seconds) of run_dir after loading its state.pt into ``stateful``; (0, 0.0) if new."""
    state_path = Path(run_dir) / "state.pt"
    if not state_path.is_file():
        return 0, 0.0
    st = torch.load(state_path, map_location=device, weights_only=False)
    if st.get("config") != config:
        raise ValueError(f"{state_path} was made with another configuration {st.get('config')}; "
                         "use another --name or delete the run directory")
    for key, obj in stateful.items():
        obj.load_state_dict(st[key])
    print(f"resuming {Path(run_dir).name} after epoch {st['epoch']}", file=sys.stderr)
    return st["epoch"], st["elapsed"]


def end_epoch(run_dir: Path, record: dict, config: dict, elapsed: float, **stateful) -> None:
    """Append ``record`` (with its "epoch") to run_dir/log.jsonl and atomically rewrite run_dir/state.pt."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), file=sys.stderr, flush=True)
    state = {key: obj.state_dict() for key, obj in stateful.items()}
    torch.save(dict(state, epoch=record["epoch"], elapsed=elapsed, config=config), run_dir / "state.tmp")
    os.replace(run_dir / "state.tmp", run_dir / "state.pt")


def prepare(seed: int, threads: int, dataset: str, train_set=None, eval_set=None):
    """Seed torch, set the thread count and return (train_set, eval_set, image side) of a training run."""
    from . import data as D
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    if train_set is None or eval_set is None:
        key = D.check_dataset(dataset)
        train_set, eval_set = D.load_dataset(key, "train"), D.load_dataset(key, "eval")
    return train_set, eval_set, int(train_set.images.shape[-1])


def epoch_batches(train_set, n_train: int, batch_size: int, pad: int, gen: torch.Generator, seed: int,
                  epoch: int, device="cpu"):
    """Yield the augmented (x, y) batches of one epoch: a seeded permutation of the first n_train draws."""
    from .train import augment
    gen.manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(len(train_set), generator=gen)[:n_train].numpy()
    for s in range(0, n_train, batch_size):
        x, y = train_set.tensors(np.sort(perm[s: s + batch_size]))
        yield augment(x, pad, gen).to(device), y.to(device)
