"""Helpers for the parameterised notebooks: profile sizes and parameter checks."""

from __future__ import annotations

import ast
import math
import numbers

from . import data as D
from .windows import patch_pixels

#: images per class used by each profile (None = the whole evaluation split); quick: 5 since 2026-12-02, towards
#: the 20-minute budget of a cold quick run on a slower 2-core CPU (10 before: 34 to 49 minutes there)
PROFILES = {"tiny": 1, "quick": 5, "paper": None}
#: Adam steps of the universal patches (02-04) per profile; Imagenette patches dominate the quick profile's time
PATCH_STEPS = {"tiny": 10, "quick": 100, "paper": 500}
#: the adaptive attack's penalty weights (Eq. 6) per profile: each is one universal patch to train;
#: the quick profile leaves out 10, where the measured attack success is already near 1% at alpha = 1, and 0.1
#: (each Imagenette patch costs about a minute and a half on a CPU; 0.01 is where the paper reports Fig. 1e)
ALPHAS = {"tiny": [0.0, 0.01, 0.1, 1.0, 10.0], "quick": [0.0, 0.01, 1.0], "paper": [0.0, 0.01, 0.1, 1.0, 10.0]}
#: the window parameters r that 11_window_family compares (r = 3 is the paper's, and the engine's default)
WINDOW_RS = {"tiny": [1, 3], "quick": [1, 3], "paper": [1, 2, 3]}
#: the window parameters r that 10_soundness_audit audits in sound mode: the quick profile audits the paper's r = 3
#: only (the r = 1 audit cost 100 of the cold quick run's CPU seconds); tiny (make test) and paper audit r = 1 too
AUDIT_RS = {"tiny": [1, 3], "quick": [3], "paper": [1, 3]}
#: the overlap ratios tau that 07_window_merging sweeps (Table 4's): tiny (make test) leaves out 0.6, the costliest
#: family on Imagenette-224 (about 100 of nbval's CPU seconds) and the same code path as 0.5
TAUS = {"tiny": [0.3, 0.5], "quick": [0.3, 0.5, 0.6], "paper": [0.3, 0.5, 0.6]}


def check_profile(profile: str) -> str:
    """Return the profile name after checking it is one of tiny, quick, paper."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: expected one of {sorted(PROFILES)}")
    return profile


def check_datasets(datasets) -> list[str]:
    """Return canonical data set names (a single name or a list), raising ValueError on unknown ones."""
    if isinstance(datasets, str):
        datasets = [datasets]
    if not datasets:
        raise ValueError("datasets must name at least one data set")
    return [D.check_dataset(d) for d in datasets]


def _positive_int(value, what: str) -> int:
    """Return value as an int after checking it is a whole number >= 1 (ValueError naming ``what`` otherwise)."""
    whole = isinstance(value, numbers.Integral) or (isinstance(value, numbers.Real) and float(value).is_integer())
    if isinstance(value, bool) or not whole or value < 1:
        raise ValueError(f"{what} must be a whole number >= 1, got {value!r}")
    return int(value)


def per_class(
    profile: str, n_per_class: int | None = None, what: str = "n_per_class", **profile_sizes: int | None
) -> int | None:
    """Return images per class: the explicit value if given (checked, errors naming the parameter ``what``), else the
    notebook's size for the profile (``profile_sizes``, e.g. ``quick=3`` for a costly sweep), else the profile's
    default."""
    if n_per_class is not None:
        return _positive_int(n_per_class, what)
    unknown = set(profile_sizes) - set(PROFILES)
    if unknown:
        raise ValueError(f"unknown profile(s) {sorted(unknown)}: expected names from {sorted(PROFILES)}")
    size = profile_sizes.get(check_profile(profile), PROFILES[profile])
    return None if size is None else _positive_int(size, f"images per class for profile {profile!r}")


def patch_steps(profile: str, steps: int | None = None) -> int:
    """Return the universal-patch optimisation steps: the explicit value if given, else the profile's."""
    return by_profile(profile, steps, "patch_steps", **PATCH_STEPS)


def _number_list(values, what: str, ok, rule: str) -> list:
    """Return values (a list, one number, or papermill's string form of either) as a list, each checked by ``ok``."""
    if isinstance(values, str):  # papermill -p passes "[0, 0.1]" as a string
        try:
            values = ast.literal_eval(values)
        except (ValueError, SyntaxError):
            raise ValueError(f"{what} must be a list of {rule}, got {values!r}") from None
    if isinstance(values, numbers.Real) and not isinstance(values, bool):
        values = [values]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{what} must be a list of {rule}, got {values!r}")
    out = list(values)
    for v in out:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not ok(v):
            raise ValueError(f"{what} must be a list of {rule}, got {v!r} in {values!r}")
    if not out:
        raise ValueError(f"{what} must name at least one value")
    return out


def alphas(profile: str, values=None) -> list[float]:
    """Return the adaptive attack's alphas: the explicit list if given (each finite and >= 0), else the profile's."""
    check_profile(profile)
    values = ALPHAS[profile] if values is None else values
    return [float(a) for a in _number_list(values, "alphas", lambda a: math.isfinite(a) and a >= 0, "numbers >= 0")]


def taus(profile: str, values=None) -> list[float]:
    """Return the overlap ratios tau to sweep: the explicit list if given (each in (0, 1]), else the profile's."""
    check_profile(profile)
    values = TAUS[profile] if values is None else values
    return [float(t) for t in _number_list(values, "taus", lambda t: 0 < t <= 1, "numbers in (0, 1]")]


def window_rs(profile: str, values=None, defaults: dict | None = None) -> list[int]:
    """Return the window parameters r to compare (windows of side p + r - 1): the explicit list if given (whole
    numbers >= 1, sorted, without repeats), else the profile's in ``defaults`` (default :data:`WINDOW_RS`)."""
    check_profile(profile)
    values = (defaults or WINDOW_RS)[profile] if values is None else values
    rs = _number_list(
        values, "rs", lambda r: math.isfinite(r) and float(r).is_integer() and r >= 1, "whole numbers >= 1"
    )
    return sorted({int(r) for r in rs})


def by_profile(profile: str, value: int | None, what: str, **sizes: int) -> int:
    """Return ``value`` if given (checked >= 1), else the size the notebook sets for the profile."""
    check_profile(profile)
    if set(sizes) != set(PROFILES):
        raise ValueError(f"{what} needs one size per profile {sorted(PROFILES)}; got {sorted(sizes)}")
    return _positive_int(sizes[profile] if value is None else value, what)


def patchcleanser_models(profile: str, dataset: str) -> list[tuple[str, str]]:
    """Return PatchCleanser's (row label, checkpoint) pairs a profile runs: the tiny profile only the vanilla model
    (666 forwards per certified image: nbval's time; every code path still runs), the others both models of
    ``experiments.patchcleanser_runs``."""
    from .experiments import patchcleanser_runs

    check_profile(profile)
    runs = patchcleanser_runs(dataset)
    return runs[:1] if profile == "tiny" else runs


def flag(profile: str, value, what: str, **defaults: bool) -> bool:
    """Return a yes/no parameter: ``value`` if given (0, 1, False or True), else the profile's default."""
    check_profile(profile)
    if set(defaults) != set(PROFILES):
        raise ValueError(f"{what} needs one default per profile {sorted(PROFILES)}; got {sorted(defaults)}")
    if value is None:
        return bool(defaults[profile])
    if value not in (0, 1) or isinstance(value, float):
        raise ValueError(f"{what} must be 0 or 1 (or None: the profile's default), got {value!r}")
    return bool(value)


def check_patch(patch_pct, datasets) -> float | None:
    """Return the patch size in % as a float (None stays None: the notebook's default) after checking
    that it is a positive number giving a patch smaller than every data set's images."""
    if patch_pct is None:
        return None
    if (
        isinstance(patch_pct, bool)
        or not isinstance(patch_pct, numbers.Real)
        or not math.isfinite(patch_pct)
        or patch_pct <= 0
    ):
        raise ValueError(f"patch_pct must be a positive number (% of the image area), got {patch_pct!r}")
    for name in check_datasets(datasets):
        n = D.image_size(name)
        p = patch_pixels(float(patch_pct), n) if patch_pct <= 100 else n + 1
        if p >= n:
            raise ValueError(
                f"patch_pct={patch_pct} is a patch of at least {n} px: not smaller than the "
                f"{n}x{n} images of {D.DATASET_LABELS[name]}"
            )
    return float(patch_pct)
