"""Compute profiles: one switch, ``DMLIB_PROFILE``, sets every budget in the book.

``test``  seconds per chapter; CI uses it to prove every cell runs.
``cpu``   about a minute per chapter on a 2-core laptop; the numbers the website shows.
``gpu``   full-scale training on a CUDA device.

Without the variable the profile is ``gpu`` when CUDA is available and ``cpu`` otherwise.
"""

from __future__ import annotations

import os

import torch

PROFILES = ("test", "cpu", "gpu")


def profile() -> str:
    """The active profile name, read from ``DMLIB_PROFILE`` each call (no hidden state)."""
    name = os.environ.get("DMLIB_PROFILE", "").strip().lower()
    if not name:
        return "gpu" if torch.cuda.is_available() else "cpu"
    if name not in PROFILES:
        raise ValueError(f"DMLIB_PROFILE={name!r} is not a profile; use one of {', '.join(PROFILES)}.")
    return name


def budget(*, test, cpu, gpu):
    """Pick the value for the active profile, e.g. ``steps = budget(test=200, cpu=4000, gpu=100_000)``."""
    return {"test": test, "cpu": cpu, "gpu": gpu}[profile()]


def quality_checks_on() -> bool:
    """Quality assertions in chapters run at ``cpu`` and ``gpu``; ``test`` budgets are too small."""
    return profile() != "test"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
