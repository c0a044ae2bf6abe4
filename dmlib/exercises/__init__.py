"""Self-checking exercises: ``check_<name>(student_fn)`` raises :class:`ExerciseFailed` with feedback
until ``student_fn`` is right, and prints a confirmation when it is.

Each check compares the student's function with dmlib's on fixed random inputs, so the same call
grades in a notebook, in a course's autograder and in this project's tests.

The checks live in one module per chapter (``ch01``, ``ch02``, ...); this package re-exports
them all, so ``dmlib.exercises.check_<name>`` works for every chapter.
"""

from ._common import ExerciseFailed
from .ch01 import check_forward_sample, check_posterior, check_x0_from_eps
from .ch02 import check_dsm_loss, check_langevin_step, check_sde_coefficients
from .ch03 import check_ddim_step, check_dpm_solver_1_step, check_edm_grid
from .ch04 import check_discretized_log_likelihood, check_gaussian_kl, check_hutchinson_divergence

__all__ = [
    "ExerciseFailed",
    "check_forward_sample",
    "check_posterior",
    "check_x0_from_eps",
    "check_sde_coefficients",
    "check_dsm_loss",
    "check_langevin_step",
    "check_ddim_step",
    "check_dpm_solver_1_step",
    "check_edm_grid",
    "check_gaussian_kl",
    "check_hutchinson_divergence",
    "check_discretized_log_likelihood",
]
