"""Resumable epoch loops: a run folder holds ``state.pt`` (rewritten atomically) and ``log.jsonl``.

Any training loop can use :class:`ResumableRun`: it restores the last state, yields the epoch's
batches (saving the step reached, the generator and the loop's running totals every ``save_every``
seconds, so an interrupted epoch resumes at that step with the same random draws) and writes the
state at the end of every epoch. A state made with another configuration is refused, so a changed
command never continues an old run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import data as D
from .results import atomic_write


class Interrupted(RuntimeError):
    """Raised by :meth:`ResumableRun.batches` after ``stop_after`` steps, its state saved (tests)."""


def resume_run(
    run_dir: Path, config, device="cpu", accept_legacy: bool = False, **stateful
) -> tuple[int, float, dict | None]:
    """Return (epochs done, seconds, mid-epoch partial state or None) of run_dir after loading its
    state.pt into ``stateful``; (0, 0.0, None) if new. ``accept_legacy``: a state saved without a
    configuration (by older code: no "config" key, or None) is resumed instead of refused."""
    state_path = Path(run_dir) / "state.pt"
    if not state_path.is_file():
        return 0, 0.0, None
    st = torch.load(state_path, map_location=device, weights_only=False)
    if not (accept_legacy and st.get("config") is None) and st.get("config") != config:
        raise ValueError(
            f"{state_path} was made with another configuration {st.get('config')}; "
            "use another --name or delete the run directory"
        )
    for key, obj in stateful.items():
        obj.load_state_dict(st[key])
    partial = st.get("partial")
    if partial is not None:  # map_location moved it; a torch.Generator takes its state on the CPU only
        partial = dict(partial, gen=partial["gen"].cpu())
    where = f"step {partial['step']} of epoch {st['epoch'] + 1}" if partial else f"epoch {st['epoch']}"
    print(f"resuming {Path(run_dir).name} after {where}", file=sys.stderr)
    return st["epoch"], st["elapsed"], partial


def save_state(run_dir: Path, config, epoch: int, elapsed: float, partial: dict | None = None, **stateful) -> None:
    """Atomically rewrite run_dir/state.pt: ``epoch`` epochs done (+ the ``partial`` one's step, if given)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {key: obj.state_dict() for key, obj in stateful.items()}
    extra = {} if partial is None else {"partial": partial}
    blob = dict(state, epoch=epoch, elapsed=elapsed, config=config, **extra)
    atomic_write(run_dir / "state.pt", lambda tmp: torch.save(blob, tmp))


def end_epoch(run_dir: Path, record: dict, config, elapsed: float, **stateful) -> None:
    """Append ``record`` (with its "epoch") to run_dir/log.jsonl and atomically rewrite run_dir/state.pt."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), file=sys.stderr, flush=True)
    save_state(run_dir, config, record["epoch"], elapsed, **stateful)


class ResumableRun:
    """One training run that survives interruption at any step (see the module docstring).

    ``start``/``elapsed``: epochs done and their seconds after resuming. ``stop_after`` > 0 raises
    :class:`Interrupted` after that many steps of this process, its state saved (to test resumption).
    """

    def __init__(
        self,
        run_dir: Path,
        config,
        device="cpu",
        save_every: float = 600.0,
        stop_after: int = 0,
        accept_legacy: bool = False,
        **stateful,
    ):
        self.run_dir, self.config, self.stateful = Path(run_dir), config, stateful
        self.save_every, self.stop_after, self.steps_run = float(save_every), int(stop_after), 0
        self.start, self.elapsed, self._partial = resume_run(run_dir, config, device, accept_legacy, **stateful)
        self._t0, self._before, self.bar = time.time(), 0.0, None

    @property
    def partial(self) -> dict | None:
        """Return the mid-epoch state the next :meth:`batches` call resumes from (None: a fresh epoch)."""
        return self._partial

    @property
    def first_step(self) -> int:
        """Return the step the next :meth:`batches` call starts from (0 unless resuming mid-epoch)."""
        return self._partial["step"] if self._partial else 0

    def batches(
        self,
        train_set,
        n_train: int,
        batch_size: int,
        pad: int,
        gen: torch.Generator,
        seed: int,
        epoch: int,
        device="cpu",
        totals: dict | None = None,
        desc: str = "",
    ):
        """Yield the epoch's (x, y) batches as :func:`epoch_batches`, from the saved step if this epoch was
        interrupted (``totals``, the caller's running sums, are restored in place and saved with the step)."""
        totals = {} if totals is None else totals
        partial, self._partial = self._partial, None
        first, self._before, gen_state = 0, 0.0, None
        if partial is not None:
            first, self._before, gen_state = partial["step"], partial["seconds"], partial["gen"]
            totals.update({k: partial[k] for k in totals})
        steps = math.ceil(n_train / batch_size)
        self._t0 = last = time.time()
        from tqdm.auto import tqdm

        self.bar = bar = tqdm(
            total=steps,
            initial=first,
            desc=desc or f"{self.run_dir.name} {epoch + 1}",
            leave=False,
            mininterval=5,
            disable=False,
        )
        try:
            for s, batch in enumerate(
                epoch_batches(train_set, n_train, batch_size, pad, gen, seed, epoch, device, first, gen_state), first
            ):
                yield batch
                self.steps_run += 1
                bar.update(1)
                now = time.time()
                stop = self.stop_after and self.steps_run >= self.stop_after
                if stop or (s + 1 < steps and now - last >= self.save_every):
                    save_state(
                        self.run_dir,
                        self.config,
                        epoch,
                        self.elapsed,
                        {"step": s + 1, "gen": gen.get_state(), "seconds": self.epoch_seconds(), **totals},
                        **self.stateful,
                    )
                    last = now
                    if stop:
                        raise Interrupted(f"stopped {self.run_dir.name} at step {s + 1} of epoch {epoch + 1}")
        finally:
            bar.close()

    def epoch_seconds(self) -> float:
        """Return the seconds spent on the current epoch so far, including those before an interruption."""
        return self._before + time.time() - self._t0

    def end_epoch(self, record: dict, seconds: float | None = None) -> None:
        """Add the epoch's seconds (``seconds`` if given, else :meth:`epoch_seconds`) to ``elapsed``, log
        ``record`` and write the end-of-epoch state."""
        self.elapsed += self.epoch_seconds() if seconds is None else float(seconds)
        end_epoch(self.run_dir, record, self.config, self.elapsed, **self.stateful)


def prepare(seed: int, threads: int, dataset: str, train_set=None, eval_set=None):
    """Seed torch, set the thread count and return (train_set, eval_set, image side) of a training run."""
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    if train_set is None or eval_set is None:
        key = D.check_dataset(dataset)
        train_set, eval_set = D.load_dataset(key, "train"), D.load_dataset(key, "eval")
    return train_set, eval_set, int(train_set.images.shape[-1])


def epoch_batches(
    train_set,
    n_train: int,
    batch_size: int,
    pad: int,
    gen: torch.Generator,
    seed: int,
    epoch: int,
    device="cpu",
    first_step: int = 0,
    gen_state: torch.Tensor | None = None,
):
    """Yield the augmented (x, y) batches of one epoch: a seeded permutation of the first n_train draws
    (from batch ``first_step`` on, with the generator set to ``gen_state`` first when resuming)."""
    gen.manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(len(train_set), generator=gen)[:n_train].numpy()
    if gen_state is not None:
        gen.set_state(gen_state)
    for s in range(first_step * batch_size, n_train, batch_size):
        x, y = train_set.tensors(np.sort(perm[s : s + batch_size]))
        yield D.augment(x, pad, gen).to(device), y.to(device)


def finished_card(card_path: Path, config: dict, epochs: int) -> dict | None:
    """Return the JSON card at ``card_path`` if it is final with all ``epochs`` done (nothing is redone, a hand-written
    note survives and the run's state file is not needed), else None; a final card of another configuration is
    refused."""
    card_path = Path(card_path)
    if not card_path.is_file():
        return None
    card = json.loads(card_path.read_text())
    if card.get("status") != "final" or card.get("epochs_done", 0) < epochs:
        return None
    differ = sorted(k for k, v in config.items() if k in card and card[k] != v)
    if differ:
        raise ValueError(
            f"{card_path} was made with another configuration (differs in {differ}); "
            "use another --name or delete the run directory"
        )
    print(f"{card.get('name', card_path.stem)} is already final; nothing to do", file=sys.stderr)
    return card
