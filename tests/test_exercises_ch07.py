"""Chapter 7's exercise checks: each passes on a solution, reports a stub as not implemented, and
fails on the typical mistakes with a message that points at the fix."""

import pytest
import torch
from exercise_harness import exercise_tests

from dmlib.exercises import ExerciseFailed
from dmlib.exercises.ch07 import check_cfg_eps_score, check_edm_skip_out, check_equivalent_density

# --- EDM's c_skip and c_out -----------------------------------------------------------------------


def edm_skip_out(nu, sigma_data, mistake=None):
    var = nu**2 + sigma_data**2
    if mistake == "resnet skip":  # D = y + nu F: unit variance, but c_out = nu grows without bound
        return torch.ones_like(nu), nu
    if mistake == "x0 head":  # D = sd F: unit variance, but the skip connection is wasted
        return torch.zeros_like(nu), torch.full_like(nu, sigma_data)
    c_skip = sigma_data**2 / var
    c_out = nu * sigma_data / (var if mistake == "no sqrt" else var.sqrt())
    return c_skip, c_out


# --- CFG in eps and in score form ---------------------------------------------------------------


def cfg_eps_score(x0_c, x0_u, x_t, alpha, sigma, w, mistake=None):
    a = 1.0 if mistake == "no alpha" else alpha
    eps_c, eps_u = (x_t - a * x0_c) / sigma, (x_t - a * x0_u) / sigma
    if mistake == "w as scale":  # eps_u + w (eps_c - eps_u): w = 0 is the unconditional model
        eps = eps_u + w * (eps_c - eps_u)
    else:
        eps = (1 + w) * eps_c - w * eps_u
    score = -eps * sigma if mistake == "score times sigma" else -eps / sigma
    return eps, score


# --- a weighting's equivalent density -----------------------------------------------------------


def equivalent_density(weight, lam_range, n, generator, mistake=None):
    lo, hi = lam_range
    if mistake == "uniform draws":  # unbiased, but not the equivalent density
        lam = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
        return lam, weight(lam) * (hi - lo)
    cells = 64 if mistake == "grid points" else 4096
    grid = torch.linspace(lo, hi, cells + 1, dtype=torch.float64)
    om = weight(grid)
    mass = (om[1:] + om[:-1]) / 2 * grid.diff()
    Z = mass.sum()
    cdf = torch.cat([mass.new_zeros(1), mass.cumsum(0)]) / Z
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    i = (torch.searchsorted(cdf, u, right=True) - 1).clamp(0, cells - 1)
    if mistake == "grid points":  # the cell's left end, no interpolation
        lam = grid[i]
    else:
        lam = grid[i] + (u - cdf[i]) / (cdf[i + 1] - cdf[i]) * (grid[i + 1] - grid[i])
    q = mass[i] / Z / (grid[i + 1] - grid[i])
    ratio = torch.ones_like(lam) if mistake == "no Z" else weight(lam) / q
    return lam, ratio


CHECKS = [
    (check_edm_skip_out, edm_skip_out),
    (check_cfg_eps_score, cfg_eps_score),
    (check_equivalent_density, equivalent_density),
]


MISTAKES = [
    (check_edm_skip_out, edm_skip_out, "no sqrt", "standard deviation"),
    (check_edm_skip_out, edm_skip_out, "resnet skip", "not the smallest"),
    (check_edm_skip_out, edm_skip_out, "x0 head", "not the smallest"),
    (check_cfg_eps_score, cfg_eps_score, "w as scale", "scale s = 1 \\+ w"),
    (check_cfg_eps_score, cfg_eps_score, "no alpha", "x_t = alpha x0"),
    (check_cfg_eps_score, cfg_eps_score, "score times sigma", "-eps / sigma"),
    (check_equivalent_density, equivalent_density, "no Z", "normalizer Z"),
    (check_equivalent_density, equivalent_density, "uniform draws", "do not follow"),
    (check_equivalent_density, equivalent_density, "grid points", "do not follow"),
]


test_solution_passes_and_stub_fails, test_typical_mistakes_fail = exercise_tests(CHECKS, MISTAKES)


def test_wrong_return_types_are_reported():
    """A single tensor where a pair is expected, and a pair of the wrong shape: clear messages."""
    with pytest.raises(ExerciseFailed, match="return the pair"):
        check_edm_skip_out(lambda nu, sd: nu)
    with pytest.raises(ExerciseFailed, match="shape"):
        check_cfg_eps_score(lambda x0c, x0u, x, a, s, w: (x[:1], x[:1]))
