"""Every exercise in every chapter: its check fails on the stub, fails on a typical mistake, passes on the solution.

Stubs, solutions and checks are read from the chapters themselves (cells tagged ``exercise-stub``,
``exercise-solution``, ``exercise-check``), so this test grades what readers actually see; the
student copies that ``python -m dmlib.course notebooks --student`` writes are checked too.
"""

import jupytext
import pytest
import torch

import dmlib
from dmlib.course import chapter_paths, exercises, write_notebooks
from dmlib.exercises import ExerciseFailed

CASES = [(p.name, i, ex) for p in chapter_paths() for i, ex in enumerate(exercises(p))]


def _namespace():
    return {"torch": torch, "dmlib": dmlib}


def test_every_chapter_has_at_least_three_checked_exercises():
    for p in chapter_paths():
        assert len(exercises(p)) >= 3, f"{p.name} has fewer than 3 checked exercises"


@pytest.mark.parametrize("chapter,index,exercise", CASES, ids=[f"{c}-{i}" for c, i, _ in CASES])
def test_check_fails_on_stub_and_passes_on_solution(chapter, index, exercise):
    stub, solution, check = exercise
    ns = _namespace()
    exec(stub, ns)
    with pytest.raises(ExerciseFailed, match="not implemented yet"):
        exec(check, ns)
    exec(solution, ns)
    exec(check, ns)  # raises if the chapter's own solution is wrong


def test_student_notebooks_keep_stubs_and_checks_but_no_solutions(tmp_path):
    for path in write_notebooks(tmp_path, student=True):
        cells = jupytext.read(path).cells
        text = "\n".join(c.source for c in cells)
        tags = [t for c in cells for t in c.metadata.get("tags", [])]
        assert "exercise-solution" not in tags and "{solution-start}" not in text, path.name
        assert tags.count("exercise-stub") == tags.count("exercise-check") >= 3, path.name
        # what a student runs first: each stub with its check, which must fail
        ns = _namespace()
        stubs = [c.source for c in cells if "exercise-stub" in c.metadata.get("tags", [])]
        checks = [c.source for c in cells if "exercise-check" in c.metadata.get("tags", [])]
        for stub, check in zip(stubs, checks):
            exec(stub, ns)
            with pytest.raises(ExerciseFailed):
                exec(check, ns)


def test_teacher_notebooks_keep_solutions(tmp_path):
    for path in write_notebooks(tmp_path):
        tags = [t for c in jupytext.read(path).cells for t in c.metadata.get("tags", [])]
        assert tags.count("exercise-solution") >= 3
