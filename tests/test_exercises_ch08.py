"""Chapter 8's exercise checks: each passes on a solution, reports a stub as not implemented, and
fails on the typical mistakes with a message that points at the fix."""

import pytest
import torch
from exercise_harness import exercise_tests

from dmlib.exercises.ch08 import check_cfm_loss, check_monotone_map, check_reflow_pairs

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

# --- the conditional flow-matching loss ---------------------------------------------------------


def cfm_loss(model, x0, generator, mistake=None):
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    t = 1 - torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype)
    tc = t[:, None]
    if mistake == "paper time":  # the noise at t = 0, as in the flow-matching papers, read as ours
        x_t, target = tc * x0 + (1 - tc) * eps, x0 - eps
    else:
        x_t, target = (1 - tc) * x0 + tc * eps, eps - x0
    if mistake == "sign":
        target = -target
    inputs = eps if mistake == "eps input" else x_t
    sq = (model(inputs, t) - target) ** 2
    return sq.sum(1).mean() if mistake == "sum" else sq.mean()


# --- one reflow step ----------------------------------------------------------------------------


def reflow_pairs(velocity, noise, n_steps, mistake=None):
    ts = torch.linspace(1, 0, n_steps + 1, dtype=noise.dtype)
    if mistake == "paper time":
        ts = ts.flip(0)
    x = noise
    for t, s in zip(ts[:-1], ts[1:]):
        step = (t - s) if mistake == "sign" else (s - t)
        x = x + step * velocity(x, t)
    return x, (torch.randn_like(noise) if mistake == "fresh noise" else noise)


# --- the 1D monotone map ------------------------------------------------------------------------


def monotone_map(means, stds, weights, z, mistake=None):
    if mistake == "moments":
        m = (weights * means).sum()
        return m + ((weights * (stds**2 + means**2)).sum() - m**2).sqrt() * z
    if mistake == "mixed quantiles":
        return (weights * (means + stds * z[:, None])).sum(1)
    target = torch.special.ndtr(z)
    lo = torch.full_like(z, (means - 12 * stds).min().item())
    hi = torch.full_like(z, (means + 12 * stds).max().item())
    for _ in range(20 if mistake == "few iterations" else 100):
        mid = (lo + hi) / 2
        below = (weights * torch.special.ndtr((mid[:, None] - means) / stds)).sum(1) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


CHECKS = [
    (check_cfm_loss, cfm_loss),
    (check_reflow_pairs, reflow_pairs),
    (check_monotone_map, monotone_map),
]


MISTAKES = [
    (check_cfm_loss, cfm_loss, "sign", "sign of the target"),
    (check_cfm_loss, cfm_loss, "paper time", "should be 0"),
    (check_cfm_loss, cfm_loss, "eps input", "model sees x_t"),
    (check_cfm_loss, cfm_loss, "sum", "twice the mean"),
    (check_reflow_pairs, reflow_pairs, "sign", "time step is negative"),
    (check_reflow_pairs, reflow_pairs, "paper time", "exact ODE's"),
    (check_reflow_pairs, reflow_pairs, "fresh noise", "straightness"),
    (check_monotone_map, monotone_map, "moments", "mean and variance"),
    (check_monotone_map, monotone_map, "mixed quantiles", "quantile of a mixture"),
    (check_monotone_map, monotone_map, "few iterations", "Phi"),
]


test_solution_passes_and_stub_fails, test_typical_mistakes_fail = exercise_tests(CHECKS, MISTAKES)
