"""The reproduction ledger: the numbers chapters compute, recorded as the book builds.

A chapter calls :func:`record` with its headline numbers; the ledger page (``chapters/ledger.md``)
reads them with :func:`load` and prints them beside the published large-scale results in
``data/published.json``. Numbers are kept per profile (``_build/ledger/<profile>/<chapter>.json``)
so that a quick ``test`` run never overwrites the ``cpu`` numbers the website shows.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .profiles import profile

ROOT = Path(__file__).resolve().parent.parent
LEDGER_DIR = ROOT / "_build" / "ledger"
PUBLISHED = ROOT / "data" / "published.json"
FIELDS = ("quantity", "value", "compare_with", "what_differs")


def record(chapter: str, rows: list[dict]) -> Path:
    """Write a chapter's ledger rows (dicts with keys ``FIELDS``) for the active profile, atomically."""
    for row in rows:
        missing = [f for f in FIELDS if f not in row]
        if missing:
            raise ValueError(f"ledger row {row} lacks {missing}; every row needs {FIELDS}.")
    out = LEDGER_DIR / profile() / f"{chapter}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(rows, f, indent=2)
    os.replace(tmp, out)
    return out


def load(profile_name: str | None = None) -> dict[str, list[dict]]:
    """Every chapter's recorded rows for a profile (the active one by default), by chapter name."""
    folder = LEDGER_DIR / (profile_name or profile())
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def published() -> list[dict]:
    """The published results the ledger compares with, each verified against its paper."""
    return json.loads(PUBLISHED.read_text())
