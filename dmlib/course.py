"""For teachers: chapter notebooks for JupyterLab or Colab, student copies without solutions, timings.

    python -m dmlib.course notebooks _build/notebooks            # every chapter as .ipynb
    python -m dmlib.course notebooks _build/student --student    # the same without solutions
    python -m dmlib.course time --profile cpu                    # execute each chapter, record wall time

Exercises are marked in the chapters by cell tags: ``exercise-stub`` (the code students complete),
``exercise-solution`` (hidden on the website, removed from student copies) and ``exercise-check``
(a ``dmlib.exercises.check_*`` call that fails until the stub is solved).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS_DIR = ROOT / "chapters"
TIMINGS = ROOT / "data" / "chapter_times.json"
TAGS = ("exercise-stub", "exercise-solution", "exercise-check")


def chapter_paths() -> list[Path]:
    return sorted(CHAPTERS_DIR.glob("[0-9]*.md"))


def _read(path: Path):
    import jupytext

    return jupytext.read(path)


def exercises(path: Path) -> list[tuple[str, str, str]]:
    """``(stub, solution, check)`` source triples of a chapter, in order."""
    cells = [c for c in _read(path).cells if c.cell_type == "code"]
    by_tag = [[c.source for c in cells if tag in c.metadata.get("tags", [])] for tag in TAGS]
    if len({len(group) for group in by_tag}) != 1:
        counts = ", ".join(f"{tag}: {len(group)}" for tag, group in zip(TAGS, by_tag))
        raise ValueError(f"{path.name}: exercise cells must come in stub/solution/check triples ({counts}).")
    return list(zip(*by_tag))


# the {solution-start} ... {solution-end} directive fences that wrap a solution on the website
SOLUTION_FENCE = re.compile(r"```\{solution-(?:start|end)\}[^`]*```\n?")
# the {exercise-start} / {exercise-end} fences: in a plain notebook they would show as code blocks
EXERCISE_START = re.compile(r"```\{exercise-start\}[^`]*```")
EXERCISE_END = re.compile(r"```\{exercise-end\}[^`]*```\n?")


def _without_solutions(cells) -> list:
    kept = []
    for cell in cells:
        if "exercise-solution" in cell.metadata.get("tags", []):
            continue
        if cell.cell_type == "markdown":
            source = SOLUTION_FENCE.sub("", cell.source)
            source = EXERCISE_END.sub("", EXERCISE_START.sub("**Exercise.**", source))
            cell.source = source.strip("\n")
            if not cell.source:
                continue
        kept.append(cell)
    return kept


def write_notebooks(out: Path, student: bool = False) -> list[Path]:
    """Write every chapter as ``.ipynb`` into ``out``; ``student=True`` drops the solutions."""
    import jupytext

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in chapter_paths():
        nb = _read(path)
        if student:
            nb.cells = _without_solutions(nb.cells)
        target = out / (path.stem + ".ipynb")
        jupytext.write(nb, target, fmt="ipynb")
        written.append(target)
    return written


def time_chapters(profile: str, timeout: int = 1800) -> dict:
    """Execute every chapter at ``profile`` and record its wall time (seconds) in data/chapter_times.json."""
    import nbclient

    times = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
    os.environ["DMLIB_PROFILE"] = profile  # the kernel inherits it
    for path in chapter_paths():
        nb = _read(path)
        tic = time.perf_counter()
        nbclient.NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
        ).execute()
        times.setdefault(path.stem, {})[profile] = round(time.perf_counter() - tic, 1)
        print(f"{path.stem}: {times[path.stem][profile]} s at {profile}", flush=True)
    TIMINGS.write_text(json.dumps(times, indent=2, sort_keys=True) + "\n")
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dmlib.course", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    nb = sub.add_parser("notebooks", help="write chapters as .ipynb")
    nb.add_argument("out", type=Path)
    nb.add_argument("--student", action="store_true", help="drop the solutions")
    tm = sub.add_parser("time", help="execute every chapter and record its wall time")
    tm.add_argument("--profile", choices=("test", "cpu", "gpu"), required=True)
    args = parser.parse_args(argv)
    if args.command == "notebooks":
        for path in write_notebooks(args.out, args.student):
            print(path)
    else:
        time_chapters(args.profile)


if __name__ == "__main__":
    main()
