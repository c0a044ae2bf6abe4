"""Critically-damped Langevin diffusion: closed-form moments, equilibrium and the exact-score sampler."""

import math

import pytest
import torch

from dmlib import cld as C


def test_van_loan_covariance_equals_the_integral():
    """Sigma_t = int_0^t exp(sF) D exp(sF)^T ds, by a fine trapezoid rule."""
    p = C.CLD()
    t = 0.3
    s = torch.linspace(0, t, 20_001, dtype=torch.float64)
    E = torch.linalg.matrix_exp(s[:, None, None] * p.F)
    integrand = E @ p.D @ E.transpose(1, 2)
    ref = torch.trapezoid(integrand, s, dim=0)
    torch.testing.assert_close(p.transition(t)[1], ref, rtol=1e-7, atol=1e-9)


def test_critical_damping_and_equilibrium():
    p = C.CLD()
    eig = torch.linalg.eigvals(p.F)
    assert abs(eig[0] - eig[1]) < 1e-6, "Gamma^2 = 4M gives a repeated eigenvalue (critical damping)"
    A, Sigma = p.transition(1.0)
    assert A.abs().max() < 0.01  # the data is forgotten at t = 1 (beta = 4)
    torch.testing.assert_close(
        Sigma, torch.diag(torch.tensor([1.0, p.M], dtype=torch.float64)), atol=1e-3, rtol=0
    )


def test_forward_simulation_matches_the_exact_marginal(eight, gen):
    """Euler-Maruyama on (x, v) vs the mixture `marginal` returns: means and covariances."""
    p, n = C.CLD(), 20_000
    x0 = eight.sample(n, gen, dtype=torch.float64)
    u = C.simulate_forward(p, x0, torch.linspace(0, 0.15, 301, dtype=torch.float64), gen)[-1]
    exact = p.marginal(eight, 0.15)
    mean = (exact.weights[:, None] * exact.means).sum(0)
    second = (
        exact.weights[:, None, None] * (exact.covs + exact.means[:, :, None] * exact.means[:, None, :])
    ).sum(0)
    cov = second - mean[:, None] * mean[None, :]
    assert (u.mean(0) - mean).abs().max() < 5 * math.sqrt(cov.diagonal().max() / n)
    assert (torch.cov(u.T) - cov).abs().max() < 0.03 * cov.diagonal().max()


def test_reverse_cld_with_the_exact_score_reproduces_the_data(eight, gen):
    p = C.CLD()
    u = C.sample_cld(
        p,
        lambda u, t: p.marginal(eight, float(t)).score(u),
        p.equilibrium(2000, 2, gen).double(),
        torch.linspace(1, 0, 201),
        generator=gen,
    )
    x = u[:, :2]
    near = torch.cdist(x, eight.means).min(1)
    counts = torch.bincount(near.indices, minlength=8) / len(x)
    assert (counts - 1 / 8).abs().max() < 0.03
    spread = (near.values**2).mean() / (2 * 0.01)
    assert 0.8 < spread < 1.25


def test_bad_parameters():
    with pytest.raises(ValueError, match="positive"):
        C.CLD(M=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        C.CLD().transition(1.5)
