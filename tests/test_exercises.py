"""Every exercise in every chapter: its check fails on the stub, fails on a typical mistake, passes on the solution.

Stubs, solutions and checks are read from the chapters themselves (cells tagged ``exercise-stub``,
``exercise-solution``, ``exercise-check``), so this test grades what readers actually see.
"""

from pathlib import Path

import jupytext
import pytest
import torch

import dmlib
from dmlib.exercises import ExerciseFailed, check_forward_sample, check_posterior, check_x0_from_eps

CHAPTERS = sorted((Path(__file__).resolve().parent.parent / "chapters").glob("*.md"))


def _exercises(path):
    cells = [c for c in jupytext.read(path).cells if c.cell_type == "code"]
    by_tag = {
        tag: [c.source for c in cells if tag in c.metadata.get("tags", [])]
        for tag in ("exercise-stub", "exercise-solution", "exercise-check")
    }
    assert len(set(map(len, by_tag.values()))) == 1, f"{path.name}: stubs, solutions and checks must pair up"
    return list(zip(*by_tag.values()))


CASES = [(p.name, i, ex) for p in CHAPTERS for i, ex in enumerate(_exercises(p))]


def _namespace():
    return {"torch": torch, "dmlib": dmlib}


def test_every_chapter_with_exercises_has_at_least_three():
    for p in CHAPTERS:
        assert len(_exercises(p)) >= 3, f"{p.name} has fewer than 3 checked exercises"


@pytest.mark.parametrize("chapter,index,exercise", CASES, ids=[f"{c}-{i}" for c, i, _ in CASES])
def test_check_fails_on_stub_and_passes_on_solution(chapter, index, exercise):
    stub, solution, check = exercise
    ns = _namespace()
    exec(stub, ns)
    with pytest.raises(ExerciseFailed, match="not implemented yet"):
        exec(check, ns)
    exec(solution, ns)
    exec(check, ns)  # raises if the chapter's own solution is wrong


# one typical mistake per check: each must be caught, with a message that points at the fix
MISTAKES = [
    (check_forward_sample, lambda x0, abar, eps: abar * x0 + (1 - abar) * eps, "square roots"),
    (check_forward_sample, lambda x0, abar, eps: (abar.sqrt() * x0 + (1 - abar).sqrt() * eps)[:1], "shape"),
    (
        check_posterior,
        lambda x_t, x0, b, ab, abp: (
            (abp.sqrt() * b * x0 + abp.sqrt() * (1 - abp) * x_t) / (1 - ab),
            b * (1 - abp) / (1 - ab),
        ),
        "the mean",
    ),  # the misprint of Chang et al. eq. 13: sqrt(abar_{t-1}) where sqrt(alpha_t) belongs
    (
        check_posterior,
        lambda x_t, x0, b, ab, abp: (((1 - b) ** 0.5 * (1 - abp) * x_t + abp.sqrt() * b * x0) / (1 - ab), b),
        "the variance",
    ),
    (check_posterior, lambda x_t, x0, b, ab, abp: x_t, "pair"),
    (check_x0_from_eps, lambda x_t, eps, ab: x_t - (1 - ab).sqrt() * eps, "off by"),
    (check_x0_from_eps, lambda x_t, eps, ab: torch.full_like(x_t, float("nan")), "off by"),
    (check_x0_from_eps, lambda x_t, eps, ab: x_t.numpy(), "torch.Tensor"),
]


@pytest.mark.parametrize("check,wrong,message", MISTAKES)
def test_checks_catch_typical_mistakes(check, wrong, message):
    with pytest.raises(ExerciseFailed, match=message):
        check(wrong)
