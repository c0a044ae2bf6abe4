"""Exercises of Chapter 9 (inverse problems with a diffusion prior).

Each check measures behaviour where the answer is known: a replacement step by the law of what it
returns (the observed coordinates must be ``q(x_s | x_0 = y)``, the others an ancestral step from
``x_t``, and a full run on a Gaussian prior whose coordinates are independent must sample the exact
posterior); a DPS gradient against central finite differences of ``||y - A x0_hat(x_t)||`` through the
exact mixture denoiser; a Gaussian posterior against Bayes' rule by quadrature on a grid and against
:func:`dmlib.inverse.exact_posterior`. A wrong answer is matched against the typical mistakes to say
which one it looks like; no check prints the right answer.
"""

from __future__ import annotations

import math

import torch

from .. import inverse as _inv
from ..oracle import GaussianMixture, MixtureOracle
from ..samplers import time_grid
from ..schedules import Cosine
from ._common import ExerciseFailed, _call, _expect_tensor

F64 = torch.float64


def _gaussian(mean, cov) -> GaussianMixture:
    return GaussianMixture(torch.tensor([mean], dtype=F64), torch.tensor([cov], dtype=F64))


def _z(x: torch.Tensor) -> float:
    """``|mean| / SE`` of a sample that should have mean 0."""
    return (x.mean().abs() / (x.std() / math.sqrt(x.numel()))).item()


def check_replacement_step(fn) -> bool:
    """Exercise (Chapter 9): ``fn(denoiser, x_t, t, s, y, observed, generator) -> x_s``, one step of the
    replacement method (Song et al. 2021, App. I.2) from time ``t`` down to ``s < t``: an ancestral step
    (DDIM with eta = 1) for every coordinate, then the observed coordinates (``observed``, a boolean
    tensor of shape ``(d,)``) replaced by a fresh draw of ``q(x_s | x_0 = y) = N(alpha_s y, sigma_s^2)``;
    ``x_t`` has shape ``(B, d)`` and ``y`` shape ``(m,)``, one value per observed coordinate.

    Graded by the law of the step on a correlated Gaussian prior (pasted values: mean ``alpha_s y`` and
    standard deviation ``sigma_s``; the other coordinates: the ancestral step's mean and noise), by
    ``s = 0`` (the observed values must be ``y`` exactly), and by a full run on a prior with independent
    coordinates, where the method is exact: its samples must match the exact posterior."""
    name = "replacement_step"
    g = torch.Generator().manual_seed(90)
    sched = Cosine()
    prior = _gaussian([0.3, -0.5, 0.8], [[0.5, 0.3, 0.1], [0.3, 0.6, -0.2], [0.1, -0.2, 0.4]])
    den = MixtureOracle(prior, sched).denoiser()
    observed = torch.tensor([True, False, True])
    y = torch.tensor([0.9, -0.4], dtype=F64)
    n, t, s = 20_000, 0.6, 0.45
    x0 = prior.sample(n, g, dtype=F64)
    x_t = float(sched.alpha(t)) * x0 + float(sched.sigma(t)) * torch.randn(n, 3, generator=g, dtype=F64)
    got = _call(
        name, fn, den, x_t.clone(), t, s, y.clone(), observed.clone(), torch.Generator().manual_seed(91)
    )
    got = _expect_tensor(name, got, (n, 3), "x_s, one row per sample")
    if not torch.isfinite(got).all():
        raise ExerciseFailed(f"{name}: x_s has NaN or infinite entries.")
    a_s, sig_s, a_t = float(sched.alpha(s)), float(sched.sigma(s)), float(sched.alpha(t))
    # the unobserved coordinate: the ancestral step's mean plus c z, c^2 the variance of q(x_s | x_t, x_0)
    x0_hat, eps_hat = den.x0_eps(x_t, t)
    c2 = sig_s**2 * -math.expm1(float(sched.log_snr(t) - sched.log_snr(s)))
    mean = a_s * x0_hat + math.sqrt(sig_s**2 - c2) * eps_hat
    resid = (got - mean)[:, ~observed] / math.sqrt(c2)
    deterministic = a_s * x0_hat + sig_s * eps_hat  # DDIM with eta = 0
    if (got - deterministic)[:, ~observed].abs().max() < 1e-5 or resid.std() < 0.1:
        raise ExerciseFailed(
            f"{name}: the unobserved coordinate moves deterministically. Hint: take an ancestral step "
            "(DDIM with eta = 1), which adds fresh noise; the deterministic step (eta = 0) is a different sampler."
        )
    if _z(resid) > 5 or abs(resid.std().item() - 1) > 0.05:
        raise ExerciseFailed(
            f"{name}: the unobserved coordinate is not distributed as an ancestral step from x_t to s "
            f"(its standardized residual has mean {resid.mean().item():.3g} and std {resid.std().item():.3g}, "
            "want 0 and 1). Hint: step every coordinate with the denoiser first, then paste."
        )
    pasted = got[:, observed]
    if (pasted.std(0) < 0.1 * sig_s).any():
        raise ExerciseFailed(
            f"{name}: the observed coordinates carry no noise at s = {s}. Hint: at time s the data are noisy, "
            "x_s = alpha_s x_0 + sigma_s z; paste y at that noise level, not y itself."
        )
    for j in range(2):
        v = pasted[:, j]
        if _z(v - a_s * y[j]) > 5 or abs(v.std().item() / sig_s - 1) > 0.05:
            at_t = _z(v - a_t * y[j]) < 5
            hint = (
                "you paste at the noise level of t, the time you step from; the step ends at s"
                if at_t
                else "the pasted values must be a fresh draw of N(alpha_s y, sigma_s^2), after the step"
            )
            raise ExerciseFailed(
                f"{name}: observed coordinate {j} has mean {v.mean().item():.3g} and std {v.std().item():.3g} "
                f"after the step to s = {s}. Hint: {hint}."
            )
    last = _call(name, fn, den, x_t[:256].clone(), 0.02, 0.0, y.clone(), observed.clone(),
                 torch.Generator().manual_seed(92))  # fmt: skip
    last = _expect_tensor(name, last, (256, 3), "x_s, one row per sample")
    if not (last[:, observed] - y).abs().max().item() <= 1e-12:
        raise ExerciseFailed(
            f"{name}: on the last step (s = 0) the observed coordinates are not y. Hint: sigma_0 = 0, so "
            "the pasted values are exactly y there; the paste-back after the last step is what makes "
            "the samples consistent with the observation."
        )
    # a full run where replacement is exact: a prior whose coordinates are independent
    indep = _gaussian([0.5, -0.3], [[0.4, 0.0], [0.0, 0.7]])
    den2, obs2, y2 = (
        MixtureOracle(indep, sched).denoiser(),
        torch.tensor([True, False]),
        torch.tensor([1.2], dtype=F64),
    )
    ts = time_grid(sched, 50).tolist()
    x = torch.randn(4000, 2, generator=g, dtype=F64)
    gen = torch.Generator().manual_seed(93)
    for t_i, s_i in zip(ts[:-1], ts[1:]):
        x = _call(name, fn, den2, x, t_i, s_i, y2.clone(), obs2.clone(), gen).detach().double()
    post = _inv.exact_posterior(indep, _inv.mask(obs2), y2, 0.0)
    m_free, v_free = post.means[0, 1].item(), post.covs[0, 1, 1].item()
    z_mean = abs(x[:, 1].mean().item() - m_free) / math.sqrt(v_free / 4000)
    z_var = abs(x[:, 1].var().item() - v_free) / (v_free * math.sqrt(2 / 4000))
    if not ((x[:, 0] - y2).abs().max().item() <= 1e-12 and z_mean < 4.5 and z_var < 4.5):
        raise ExerciseFailed(
            f"{name}: a 50-step run on a prior with independent coordinates does not sample the exact "
            f"posterior (free coordinate: mean off by {z_mean:.1f} SE, variance by {z_var:.1f} SE)."
        )
    print(f"{name}: correct (the step's law, the paste at s = 0, and an exact run on an independent prior).")
    return True


def _fd_gradient(den, A, y, x, t, h=1e-6) -> torch.Tensor:
    """Central differences of ``||y - A x0_hat(x_t)||`` per sample, coordinate by coordinate."""
    B, d = x.shape
    grad = torch.empty_like(x)
    for i in range(d):
        e = torch.zeros(d, dtype=x.dtype)
        e[i] = h
        up = (y - den.x0(x + e, t) @ A.T).norm(dim=1)
        down = (y - den.x0(x - e, t) @ A.T).norm(dim=1)
        grad[:, i] = (up - down) / (2 * h)
    return grad


def check_dps_gradient(fn) -> bool:
    """Exercise (Chapter 9): ``fn(denoiser, A, y, x_t, t) -> grad``, the gradient with respect to ``x_t``
    of DPS's data term ``||y - A x0_hat(x_t)||`` (Chung et al. 2023, Algorithm 1, with the non-squared norm
    of their code), one norm per sample: ``x_t`` of shape ``(B, d)``, ``A`` of shape ``(m, d)``, ``y`` of
    shape ``(m,)``, ``t`` a number; returns ``(B, d)``. Graded against central finite differences through
    the exact denoiser of a Gaussian mixture at three times."""
    name = "dps_gradient"
    g = torch.Generator().manual_seed(94)
    mix = GaussianMixture([[-1.0, 0.5, 0.0], [1.0, -0.5, 0.8]], stds=[0.4, 0.6], weights=[0.6, 0.4])
    den = MixtureOracle(mix, Cosine()).denoiser()
    A = torch.randn(2, 3, generator=g, dtype=F64)
    y = torch.tensor([0.7, -0.2], dtype=F64)
    x = 1.5 * torch.randn(32, 3, generator=g, dtype=F64)
    for t in (0.2, 0.5, 0.8):
        want = _fd_gradient(den, A, y, x, t)
        got = _call(name, fn, den, A.clone(), y.clone(), x.clone(), t)
        got = _expect_tensor(name, got, want.shape, "the gradient, one row per sample")
        err = ((got - want).abs() / (1 + want.abs())).max().item()
        if err < 1e-5:
            continue
        x0 = den.x0(x, t)
        resid = y - x0 @ A.T
        norm = resid.norm(dim=1, keepdim=True)
        no_jacobian = -(resid / norm) @ A
        one_norm = want * norm / resid.norm()  # one norm over the whole batch, as DPS's code takes
        ratio = (got * want).sum(1) / (want * want).sum(1)
        if ((ratio - 2 * norm[:, 0]).abs() < 1e-3 * (1 + ratio.abs())).all():
            hint = (
                "it is the gradient of the squared norm ||r||^2, which is 2 ||r|| times larger; "
                "DPS's code differentiates ||r||."
            )
        elif ((ratio + 1).abs() < 1e-6).all():
            hint = "the sign is flipped: return the gradient of +||y - A x0_hat||; the sampler subtracts zeta times it."
        elif (got - no_jacobian).abs().max() < 1e-6:
            hint = (
                "this is the gradient with respect to x0_hat, as if x0_hat did not depend on x_t; "
                "differentiate through the denoiser (x_t.requires_grad_(), then torch.autograd.grad)."
            )
        elif (got - one_norm).abs().max() < 1e-5:
            hint = "take one norm per sample (dim=1) and sum those; one norm over the whole batch couples the samples."
        else:
            hint = "r = y - A x0_hat(x_t) per sample; the gradient is -(d x0_hat / d x_t)^T A^T r / ||r||."
        raise ExerciseFailed(
            f"{name}: at t = {t} the gradient is off by up to {err:.3g} (relative). Hint: {hint}"
        )
    print(f"{name}: correct (central differences through the exact denoiser at t = 0.2, 0.5, 0.8).")
    return True


def _bayes_on_grid(mu, C, A, y, sigma_y, half_width=9.0, points=601):
    """Posterior mean and covariance of a 2D Gaussian prior by quadrature: the prior times the likelihood
    ``N(y; A x, sigma_y^2 I)`` on a grid of ``+-half_width`` prior standard deviations."""
    std = C.diagonal().sqrt()
    axes = [mu[i] + std[i] * torch.linspace(-half_width, half_width, points, dtype=F64) for i in range(2)]
    X = torch.cartesian_prod(*axes)
    log_p = torch.distributions.MultivariateNormal(mu, C).log_prob(X)
    log_p = log_p - 0.5 * ((y - X @ A.T) ** 2).sum(1) / sigma_y**2
    w = torch.softmax(log_p, 0)
    mean = w @ X
    d = X - mean
    return mean, (w[:, None] * d).T @ d


def check_gaussian_posterior(fn) -> bool:
    """Exercise (Chapter 9): ``fn(mu, C, A, y, sigma_y) -> (mean, cov)``, the posterior ``p(x | y)`` of a
    Gaussian prior ``N(mu, C)`` under ``y = A x + N(0, sigma_y^2 I)``: ``mu`` of shape ``(n,)``, ``C``
    ``(n, n)``, ``A`` ``(m, n)``, ``y`` ``(m,)``. Graded against Bayes' rule by quadrature on a 2D grid,
    against the closed form of :func:`dmlib.inverse.exact_posterior` in 5 dimensions with 3 measurements,
    and in the noiseless limit ``sigma_y = 0`` with full-row-rank ``A``."""
    name = "gaussian_posterior"
    g = torch.Generator().manual_seed(95)
    cases = []
    mu2, C2 = torch.tensor([0.4, -0.3], dtype=F64), torch.tensor([[0.8, 0.35], [0.35, 0.5]], dtype=F64)
    A2, y2 = torch.tensor([[1.0, -0.6]], dtype=F64), torch.tensor([1.1], dtype=F64)
    cases.append(
        ("the 2D case against quadrature", mu2, C2, A2, y2, 0.4, _bayes_on_grid(mu2, C2, A2, y2, 0.4), 1e-7)
    )
    L = torch.randn(5, 5, generator=g, dtype=F64)
    mu5, C5 = torch.randn(5, generator=g, dtype=F64), L @ L.T / 5 + 0.1 * torch.eye(5, dtype=F64)
    A5, y5 = torch.randn(3, 5, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    for sigma_y in (0.3, 0.0):
        post = _inv.exact_posterior(
            GaussianMixture(mu5[None], C5[None]), _inv.Dense("A", (5,), A5), y5, sigma_y
        )
        what = f"5 dimensions, 3 measurements, sigma_y = {sigma_y}"
        cases.append((what, mu5, C5, A5, y5, sigma_y, (post.means[0], post.covs[0]), 1e-9))
    for what, mu, C, A, y, sigma_y, (m_want, c_want), tol in cases:
        got = _call(name, fn, mu.clone(), C.clone(), A.clone(), y.clone(), sigma_y)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise ExerciseFailed(f"{name}: return a pair (mean, cov); got {type(got).__name__}.")
        mean = _expect_tensor(name, got[0], m_want.shape, "the posterior mean")
        cov = _expect_tensor(name, got[1], c_want.shape, "the posterior covariance")
        m_err = (mean - m_want).abs().max().item()
        c_err = (cov - c_want).abs().max().item()
        if m_err <= tol and c_err <= tol:
            continue
        hint = _posterior_hint(mu, C, A, y, sigma_y, mean, cov)
        raise ExerciseFailed(
            f"{name}: for {what} the mean is off by {m_err:.3g} and the covariance by {c_err:.3g}. Hint: {hint}"
        )
    print(f"{name}: correct (Bayes by quadrature in 2D; the closed form in 5D, noisy and noiseless).")
    return True


def _posterior_hint(mu, C, A, y, sigma_y, mean, cov) -> str:
    """Which typical mistake ``(mean, cov)`` looks like, said without the formula's answer."""

    def form(noise_var):
        S = A @ C @ A.T + noise_var * torch.eye(len(y), dtype=F64)
        K = torch.linalg.solve(S, A @ C).T
        return mu + K @ (y - A @ mu), C - K @ A @ C

    def near(pair):
        return all((a - b).abs().max().item() < 1e-6 for a, b in zip(pair, (mean, cov)))

    if sigma_y > 0 and sigma_y != 1 and near(form(sigma_y)):
        return "sigma_y is a standard deviation; the noise adds its variance to the covariance of A x."
    if sigma_y > 0 and near(form(0.0)):
        return "the noise of y is missing: y = A x + noise has covariance A C A^T plus the noise's."
    if (cov - cov.T).abs().max() > 1e-8:
        return "the covariance is not symmetric: check the transposes in the gain K = C A^T S^{-1}."
    if (cov - C).abs().max() < 1e-9:
        return "the covariance did not shrink: observing y removes K A C from the prior's C."
    return "condition the joint Gaussian of (x, y) on y: the gain K = C A^T S^{-1} moves the mean by K (y - A mu)."


__all__ = ["check_replacement_step", "check_dps_gradient", "check_gaussian_posterior"]
