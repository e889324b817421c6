"""Argument parsing the commands share: a parser whose errors are one line (``error: …`` on stderr, exit status
2) and the argparse types of the common options."""

from __future__ import annotations

import argparse
import contextlib

import torch


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr, ``error: …``, with exit status 2 (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(str(message).splitlines())}  (see {self.prog} -h)\n")


@contextlib.contextmanager
def usage_errors(p: argparse.ArgumentParser):
    """Turn the package's own checks of arguments (ValueError, FileNotFoundError, KeyError) into ``p.error``."""
    try:
        yield
    except (ValueError, FileNotFoundError, KeyError) as e:
        p.error(e.args[0] if isinstance(e, KeyError) and e.args else str(e))


def int_at_least(low: int, note: str = ""):
    """Return an argparse type: an int >= low (``note`` is added to the error, e.g. what 0 means)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{note}, got {value}")
        return value

    return parse


def overlap_ratio(text: str) -> float:
    """argparse type of tau: a number in (0, 1]; 1 merges no windows."""
    try:
        tau = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < tau <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"overlap ratio tau must lie in (0, 1] (1 = no merging), got {text}")
    return tau


def device_name(text: str) -> str:
    """argparse type of --device: a torch device this machine has (cpu, cuda, cuda:N, mps)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r}: MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"device {text!r}: not supported (cpu, cuda, cuda:N or mps)")
    return text
