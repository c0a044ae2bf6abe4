"""Exercises of Chapter 1 (DDPM)."""

from __future__ import annotations

import torch

from .. import ddpm
from ..schedules import Cosine, ddpm_tables
from ._common import ExerciseFailed, _call, _compare


def check_forward_sample(fn) -> bool:
    """Exercise: ``fn(x0, alpha_bar_t, eps) -> x_t`` implements the closed-form forward marginal."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 2, generator=g, dtype=torch.float64)
    for abar in (0.9, 0.3, 0.01):
        want = abar**0.5 * x0 + (1 - abar) ** 0.5 * eps
        got = _call("forward_sample", fn, x0, torch.tensor(abar, dtype=torch.float64), eps)
        _compare(
            "forward_sample",
            got,
            want,
            f"x_t at alpha_bar_t={abar}",
            "x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps; mind the square roots.",
        )
    print("forward_sample: correct.")
    return True


def check_posterior(fn) -> bool:
    """Exercise: ``fn(x_t, x0, beta_t, alpha_bar_t, alpha_bar_prev) -> (mean, variance)`` of q(x_{t-1}|x_t,x_0)."""
    g = torch.Generator().manual_seed(1)
    tables = ddpm_tables(Cosine(), 50)
    abar = tables.alphas_cumprod
    x0 = torch.randn(64, 2, generator=g, dtype=torch.float64)
    x_t = torch.randn(64, 2, generator=g, dtype=torch.float64)
    for t in (2, 25, 50):
        want_mean, want_var = ddpm.posterior(Cosine(), x_t, x0, t / 50, (t - 1) / 50)
        got = _call("posterior", fn, x_t, x0, tables.betas[t], abar[t], abar[t - 1])
        if not (isinstance(got, tuple) and len(got) == 2):
            raise ExerciseFailed("posterior: return a pair (mean, variance).")
        _compare(
            "posterior",
            got[0],
            want_mean,
            f"the mean at t={t}",
            "mean = sqrt(abar_{t-1}) beta_t/(1-abar_t) x0 + sqrt(alpha_t)(1-abar_{t-1})/(1-abar_t) x_t, alpha_t = 1-beta_t.",
        )
        _compare(
            "posterior",
            torch.as_tensor(got[1]).reshape(()),
            want_var.reshape(()),
            f"the variance at t={t}",
            "variance = beta_t (1 - abar_{t-1}) / (1 - abar_t): smaller than beta_t.",
        )
    print("posterior: correct.")
    return True


def check_x0_from_eps(fn) -> bool:
    """Exercise: ``fn(x_t, eps_hat, alpha_bar_t) -> x0_hat`` inverts the forward marginal."""
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(64, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 2, generator=g, dtype=torch.float64)
    for abar in (0.99, 0.5, 0.05):
        want = (x_t - (1 - abar) ** 0.5 * eps) / abar**0.5
        got = _call("x0_from_eps", fn, x_t, eps, torch.tensor(abar, dtype=torch.float64))
        _compare(
            "x0_from_eps",
            got,
            want,
            f"x0_hat at alpha_bar_t={abar}",
            "solve x_t = sqrt(abar) x0 + sqrt(1 - abar) eps for x0.",
        )
    print("x0_from_eps: correct.")
    return True
