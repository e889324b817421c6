"""The project's folders, in one place. Every module takes its paths from here.

Three can be moved by the environment, read once at import:

* ``SCALECERT_DATA_DIR``: where the data sets are extracted (default ``data/``);
* ``SCALECERT_CACHE_DIR``: the result cache (default ``data/cache``);
* ``SCALECERT_FIG_DIR``: where the notebooks write figures and tables (default ``figures/``);
* ``SCALECERT_MEASURE_DIR``: where they write wall-time measurements of the machine they ran on (default
  ``build/measurements/``, not committed: a figure must be what the committed code and cache produce).

The shipped checkpoints, the training runs and the paper's tables always live in the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

#: the repository: the folder that holds ``scalecert/``
ROOT = Path(__file__).resolve().parent.parent
#: the extracted data sets and their decoded caches
DATA_DIR = Path(os.environ.get("SCALECERT_DATA_DIR", ROOT / "data"))
#: the shipped checkpoints (``<name>.pt``) and their cards (``<name>.json``)
CHECKPOINT_DIR = ROOT / "data" / "checkpoints"
#: the result cache: one folder per configuration (chunks while in flight, ``records.parquet`` when complete)
CACHE_DIR = Path(os.environ.get("SCALECERT_CACHE_DIR", ROOT / "data" / "cache"))
#: training runs: ``<name>/state.pt`` and ``<name>/log.jsonl``
RUNS_DIR = ROOT / "data" / "runs"
#: the numbers the paper reports (its tables as CSV)
PAPER_DIR = ROOT / "data" / "paper"
#: the figures and tables the notebooks write
FIG_DIR = Path(os.environ.get("SCALECERT_FIG_DIR", ROOT / "figures"))
#: wall-time measurements of this machine (not committed figures)
MEASURE_DIR = Path(os.environ.get("SCALECERT_MEASURE_DIR", ROOT / "build" / "measurements"))
#: the paper profile's tables, one folder per data set (the README's claims table reads them)
PAPER_FIG_DIR = ROOT / "figures" / "paper"


def relative(path: Path | str, root: Path | None = None) -> str:
    """Return ``path`` relative to ``root`` (default the repository) when it lies inside it, else as given."""
    path, root = Path(path), Path(root or ROOT).resolve()
    return str(path.resolve().relative_to(root)) if root in path.resolve().parents else str(path)
