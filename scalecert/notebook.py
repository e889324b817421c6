"""Helpers for the parameterised notebooks: profile sizes and parameter checks."""
from __future__ import annotations

from . import data as D

#: images per class used by each profile (None = the whole evaluation split)
PROFILES = {"tiny": 1, "quick": 10, "paper": None}
#: Adam steps of the universal patches (02-04) per profile; Imagenette patches dominate the quick profile's time
PATCH_STEPS = {"tiny": 10, "quick": 100, "paper": 500}


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


def per_class(profile: str, n_per_class: int | None = None, **profile_sizes: int | None) -> int | None:
    """Return images per class: the explicit value if given, else the notebook's size for the profile
    (``profile_sizes``, e.g. ``quick=3`` for a costly sweep), else the profile's default."""
    if n_per_class is not None:
        if int(n_per_class) < 1:
            raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
        return int(n_per_class)
    unknown = set(profile_sizes) - set(PROFILES)
    if unknown:
        raise ValueError(f"unknown profile(s) {sorted(unknown)}: expected names from {sorted(PROFILES)}")
    size = profile_sizes.get(check_profile(profile), PROFILES[profile])
    if size is not None and int(size) < 1:
        raise ValueError(f"images per class for profile {profile!r} must be >= 1, got {size}")
    return None if size is None else int(size)


def patch_steps(profile: str, steps: int | None = None) -> int:
    """Return the universal-patch optimisation steps: the explicit value if given, else the profile's."""
    if steps is not None:
        if int(steps) < 1:
            raise ValueError(f"patch_steps must be >= 1, got {steps}")
        return int(steps)
    return PATCH_STEPS[check_profile(profile)]
