"""House rules every chapter keeps, checked on the chapter sources.

* Code fits the website's code column: a longer line is cut off (scrolled out of sight) on the page.
* A chapter that is not written yet is only mentioned as planned, never as if a reader could open it.
"""

import re

import jupytext
import pytest

from dmlib.course import chapter_paths

# The widest code line the code column shows whole in a 1280-pixel window, with the code cells at
# 12px (book/_static/code-column.css; tests/browser/test_pages.py measures the page). An exercise's
# box and a solution's dropdown are indented: their cells are narrower.
CODE_COLUMN = 88
BOXED_COLUMN = {"exercise": 80, "solution": 86}
CHAPTERS = chapter_paths()
WRITTEN = {int(p.name[:2]) for p in CHAPTERS}


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_code_lines_fit_the_code_column(path):
    long, box = [], None
    for i, cell in enumerate(jupytext.read(path).cells):
        if cell.cell_type == "markdown":
            for kind in BOXED_COLUMN:
                if f"{{{kind}-start}}" in cell.source:
                    box = kind
                if f"{{{kind}-end}}" in cell.source:
                    box = None
            continue
        if cell.cell_type != "code":
            continue
        width = BOXED_COLUMN[box] if box else CODE_COLUMN
        long += [
            f"cell {i}: {line[:60]}... ({len(line)} characters, {width} fit{f' in the {box} box' if box else ''})"
            for line in cell.source.splitlines()
            if len(line) > width
        ]
    assert not long, f"{path.name}: code lines wider than the code column:\n" + "\n".join(long)


def _paragraphs(text: str):
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_unwritten_chapters_are_called_planned(path):
    bad = []
    for para in _paragraphs(path.read_text()):
        for m in re.finditer(r"Chapters?\s+(\d+)", para):
            if int(m.group(1)) not in WRITTEN and "planned" not in para.lower():
                bad.append(f"{m.group(0)}: {' '.join(para.split())[:100]}...")
    assert not bad, f"{path.name} refers to unwritten chapters without saying they are planned:\n" + "\n".join(bad)


def test_intro_roadmap_matches_the_written_chapters():
    """The introduction's roadmap says "written" (with a link) exactly for the chapters that exist, and its
    count sentence agrees; catches a new chapter left "planned" on the front page (it happened to 5 and 6)."""
    intro = (CHAPTERS[0].parent.parent / "book" / "intro.md").read_text()
    rows = dict(re.findall(r"^\| (\d\d) \| [^|]+ \| ([^|]+) \|$", intro, flags=re.M))
    assert rows, "no roadmap table found in book/intro.md"
    wrong = [
        f"{num}: {status.strip()!r}"
        for num, status in rows.items()
        if (int(num) in WRITTEN) != status.strip().startswith("written:")
        or (int(num) in WRITTEN and f"chapters/{num}_" not in status)
    ]
    assert not wrong, "book/intro.md's roadmap disagrees with chapters/: " + ", ".join(wrong)
    assert f"Chapters 1 to {max(WRITTEN)} exist so far" in intro
