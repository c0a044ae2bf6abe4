"""The two tests every chapter's checked exercises share, made once for a list of checks.

``CHECKS`` pairs each ``check_*`` with a reference solution; ``MISTAKES`` lists ``(check, solution, mistake,
match)``, where ``solution(*args, mistake=mistake)`` makes one typical error and ``match`` is a regular
expression the check's message must contain (the hint names the mistake without printing the answer).
"""

from __future__ import annotations

import pytest

from dmlib.exercises import ExerciseFailed


def _stub(*args):
    raise NotImplementedError


def exercise_tests(checks, mistakes):
    """``(test_solution_passes_and_stub_fails, test_typical_mistakes_fail)`` for a test module to bind."""

    @pytest.mark.parametrize("check,solution", checks, ids=[c.__name__ for c, _ in checks])
    def test_solution_passes_and_stub_fails(check, solution):
        """The solution passes; the stub is reported as not implemented (not as wrong)."""
        assert check(solution)
        with pytest.raises(ExerciseFailed, match="not implemented yet"):
            check(_stub)

    @pytest.mark.parametrize(
        "check,solution,mistake,match", mistakes, ids=[f"{c.__name__}-{m}" for c, _, m, _ in mistakes]
    )
    def test_typical_mistakes_fail(check, solution, mistake, match):
        """Each typical mistake fails its check, and the message names it (``match``)."""
        with pytest.raises(ExerciseFailed, match=match):
            check(lambda *a: solution(*a, mistake=mistake))

    return test_solution_passes_and_stub_fails, test_typical_mistakes_fail
