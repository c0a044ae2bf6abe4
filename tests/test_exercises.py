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
from dmlib.exercises import (
    ExerciseFailed,
    check_dsm_loss,
    check_forward_sample,
    check_langevin_step,
    check_posterior,
    check_sde_coefficients,
    check_x0_from_eps,
)

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
    # Chapter 2
    (check_sde_coefficients, lambda a, da, s, ds: (da / a, 2 * s * ds), "g\\^2"),  # forgot -2 f sigma^2
    (check_sde_coefficients, lambda a, da, s, ds: (da, 2 * s * ds - 2 * da * s**2), "f for"),  # f = alpha'
    (check_sde_coefficients, lambda a, da, s, ds: da / a, "pair"),
    (
        check_dsm_loss,
        lambda m, x0, a, s, e: ((m(a * x0 + s * e) - e / s) ** 2).sum(1).mean(),
        "off by",
    ),  # sign
    (
        check_dsm_loss,
        lambda m, x0, a, s, e: ((m(a * x0 + s * e) + e / s) ** 2).mean(),
        "off by",
    ),  # mean over dims
    (check_langevin_step, lambda x, sc, h, z: x + h * sc + h**0.5 * z, "off by"),  # full step on the score
    (
        check_langevin_step,
        lambda x, sc, h, z: x + h / 2 * sc + h * z,
        "off by",
    ),  # no square root on the noise
]


@pytest.mark.parametrize("check,wrong,message", MISTAKES)
def test_checks_catch_typical_mistakes(check, wrong, message):
    with pytest.raises(ExerciseFailed, match=message):
        check(wrong)
