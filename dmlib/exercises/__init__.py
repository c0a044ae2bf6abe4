"""Self-checking exercises: ``check_<name>(student_fn)`` raises :class:`ExerciseFailed` with feedback
until ``student_fn`` is right, and prints a confirmation when it is.

Each check compares the student's function with dmlib's on fixed random inputs, so the same call
grades in a notebook, in a course's autograder and in this project's tests.

The checks live in one module per chapter (``ch01``, ``ch02``, ...); this package re-exports
them all, so ``dmlib.exercises.check_<name>`` works for every chapter.
"""

from ._common import ExerciseFailed
from .ch01 import (
    check_ancestral_sampler,
    check_eps_error_curve,
    check_forward_sample,
    check_posterior,
    check_vlb_terms,
    check_x0_from_eps,
)
from .ch02 import (
    check_annealed_langevin,
    check_dsm_loss,
    check_langevin_step,
    check_reverse_sde_sampler,
    check_sde_coefficients,
    check_sliced_score_matching,
)
from .ch03 import (
    check_ddim_step,
    check_dpm_solver_1_step,
    check_dpm_solver_2,
    check_edm_grid,
    check_heun,
    check_optimal_path,
)
from .ch04 import (
    check_analytic_dpm_variances,
    check_discretized_log_likelihood,
    check_gaussian_kl,
    check_hutchinson_divergence,
    check_hutchinson_ode_likelihood,
    check_importance_sampled_bound,
)
from .ch05 import check_d3pm_posterior, check_masked_nelbo, check_masked_sampler
from .ch06 import check_equivariance_error, check_torus_score, check_zero_com_log_prob
from .ch07 import check_cfg_eps_score, check_edm_skip_out, check_equivalent_density
from .ch08 import check_cfm_loss, check_monotone_map, check_reflow_pairs
from .ch09 import check_dps_gradient, check_gaussian_posterior, check_replacement_step

__all__ = [
    "ExerciseFailed",
    "check_forward_sample",
    "check_posterior",
    "check_x0_from_eps",
    "check_ancestral_sampler",
    "check_vlb_terms",
    "check_eps_error_curve",
    "check_sde_coefficients",
    "check_dsm_loss",
    "check_langevin_step",
    "check_annealed_langevin",
    "check_reverse_sde_sampler",
    "check_sliced_score_matching",
    "check_ddim_step",
    "check_dpm_solver_1_step",
    "check_edm_grid",
    "check_dpm_solver_2",
    "check_optimal_path",
    "check_heun",
    "check_gaussian_kl",
    "check_hutchinson_divergence",
    "check_discretized_log_likelihood",
    "check_analytic_dpm_variances",
    "check_importance_sampled_bound",
    "check_hutchinson_ode_likelihood",
    "check_d3pm_posterior",
    "check_masked_sampler",
    "check_masked_nelbo",
    "check_torus_score",
    "check_zero_com_log_prob",
    "check_equivariance_error",
    "check_edm_skip_out",
    "check_cfg_eps_score",
    "check_equivalent_density",
    "check_cfm_loss",
    "check_reflow_pairs",
    "check_monotone_map",
    "check_replacement_step",
    "check_dps_gradient",
    "check_gaussian_posterior",
]
