"""Denoising diffusion probabilistic models (Sohl-Dickstein et al. 2015; Ho et al. 2020).

Equation numbers refer to Ho et al. (2020). Time is continuous, ``t in [0, 1]``; the T-step chain
of the paper is the grid ``t = i / T`` (see :func:`dmlib.schedules.ddpm_tables`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm import tqdm

from .parameterization import Denoiser, _col, from_x0_eps, noise_like
from .schedules import DDPMTables, Schedule, as_time


def q_sample(schedule: Schedule, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
    """Closed-form forward marginal, eq. 4: ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}; got {tuple(noise.shape)}.")
    t = as_time(t, like=x0)
    return _col(schedule.alpha(t), x0) * x0 + _col(schedule.sigma(t), x0) * noise


def q_sample_chain(
    tables: DDPMTables, x0: torch.Tensor, steps: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Run the forward chain, eq. 2: ``x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z`` for t = 1..steps.

    Returns every state, shape ``(steps + 1, *x0.shape)``, index 0 being ``x0`` itself.
    """
    steps = tables.T if steps is None else steps
    if not 0 <= steps <= tables.T:
        raise ValueError(f"steps must lie in [0, T={tables.T}]; got {steps}.")
    states = [x0]
    for t in range(1, steps + 1):
        beta = tables.betas[t].to(x0.dtype)
        z = noise_like(x0, generator)
        states.append(torch.sqrt(1 - beta) * states[-1] + torch.sqrt(beta) * z)
    return torch.stack(states)


def _transition(schedule: Schedule, t, s):
    """``(alpha_{t|s}^2, sigma_{t|s}^2)`` of ``q(x_t | x_s)`` for ``s < t``, in float64; for a VP
    schedule ``alpha_{t|s}^2 = abar_t / abar_s`` and ``sigma_{t|s}^2 = beta_{t|s} = 1 - abar_t / abar_s``."""
    t = as_time(t).to(torch.float64)
    s = as_time(s).to(torch.float64)
    on_host = t.device.type == "cpu" and s.device.type == "cpu"  # checked there only, as in as_time
    if on_host and (s >= t).any():
        raise ValueError("the posterior q(x_s | x_t, x_0) needs s < t.")
    a_ts, var_ts = schedule.transition(t, s)
    return a_ts**2, var_ts


def posterior(schedule: Schedule, x_t: torch.Tensor, x0: torch.Tensor, t, s):
    """The true posterior ``q(x_s | x_t, x_0)`` for ``s < t``: returns ``(mean, variance)``.

    For consecutive steps ``s = t - 1/T`` this is eq. 6-7,
    ``mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t``,
    ``variance = betatilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)``; the same formula with
    ``alpha_t -> abar_t / abar_s`` holds for any pair ``s < t`` (it is what DDIM's eta = 1 uses).
    """
    coef_x0, coef_xt, var = _posterior_coefficients(schedule, t, s)
    mean = _col(coef_x0, x0) * x0 + _col(coef_xt, x_t) * x_t
    return mean, var.to(dtype=x_t.dtype, device=x_t.device)


def _posterior_coefficients(schedule: Schedule, t, s):
    """Eq. 7 in float64: the ``x_0`` and ``x_t`` coefficients of the posterior mean, and its variance.

    Written for any schedule (Kingma et al. 2021, eq. 29-31): with ``alpha_{t|s}``, ``sigma_{t|s}^2``
    of :meth:`~dmlib.schedules.Schedule.transition`, ``mean = alpha_s sigma_{t|s}^2 / sigma_t^2 x_0 +
    alpha_{t|s} sigma_s^2 / sigma_t^2 x_t`` and ``variance = sigma_{t|s}^2 sigma_s^2 / sigma_t^2``;
    for a VP schedule these are eq. 7's ``sqrt(abar_{t-1}) beta_t / (1 - abar_t)``,
    ``sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)`` and ``betatilde_t``.
    """
    ratio, var_ts = _transition(schedule, t, s)  # ratio = alpha_{t|s}^2 (abar_t / abar_s for VP)
    s = as_time(s).to(torch.float64)
    var_s = schedule.sigma(s) ** 2
    var_t = ratio * var_s + var_ts  # sigma_t^2, assembled so that it matches the terms above exactly
    coef_x0 = schedule.alpha(s) * var_ts / var_t
    coef_xt = ratio.sqrt() * var_s / var_t
    return coef_x0, coef_xt, var_ts * var_s / var_t


def posterior_variance(schedule: Schedule, t, s) -> torch.Tensor:
    """``betatilde = beta_{t|s} (1 - abar_s) / (1 - abar_t)`` (eq. 7), in float64."""
    return _posterior_coefficients(schedule, t, s)[2]


def posterior_mean_from_eps(schedule: Schedule, x_t: torch.Tensor, eps: torch.Tensor, t, s) -> torch.Tensor:
    """The posterior mean of eq. 7 with ``x_0`` written through the noise, eq. 11:
    ``mean = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)`` (for a jump, ``alpha_t -> abar_t / abar_s``).

    Algebraically equal to :func:`posterior` with ``x0 = (x_t - sigma_t eps) / alpha_t``, but it never
    divides by ``alpha_t``, which near ``t = 1`` is tiny and would amplify float32 rounding ~10^4-fold.
    """
    ratio, beta_ts = _transition(schedule, t, s)  # alpha_{t|s}^2, sigma_{t|s}^2 in general
    sigma_t = schedule.sigma(as_time(t).to(torch.float64))
    return (x_t - _col(beta_ts / sigma_t, x_t) * eps) / _col(ratio.sqrt(), x_t)


def gaussian_kl(mean_q, var_q, mean_p, var_p) -> torch.Tensor:
    """``KL(N(mean_q, var_q I) || N(mean_p, var_p I))`` per sample, summed over all but the batch dim."""
    var_q, var_p = _col(torch.as_tensor(var_q), mean_q), _col(torch.as_tensor(var_p), mean_q)
    kl = 0.5 * (torch.log(var_p / var_q) + var_q / var_p + (mean_q - mean_p) ** 2 / var_p - 1)
    return kl.flatten(1).sum(1)


def gaussian_nll(x, mean, var) -> torch.Tensor:
    """``-log N(x; mean, var I)`` per sample, summed over all but the batch dim."""
    var = _col(torch.as_tensor(var), x)
    nll = 0.5 * (torch.log(2 * math.pi * var) + (x - mean) ** 2 / var)
    return nll.flatten(1).sum(1)


def reverse_variance(schedule: Schedule, t, s, kind: str = "posterior") -> torch.Tensor:
    """Fixed reverse variance of sec. 3.2: ``betatilde`` (``"posterior"``) or ``beta`` (``"beta"``)."""
    if kind == "posterior":
        return posterior_variance(schedule, t, s)
    if kind == "beta":
        return _transition(schedule, t, s)[1]
    raise ValueError(
        f"unknown reverse variance {kind!r}; choose 'posterior' (betatilde_t) or 'beta' (beta_t)."
    )


def vlb_terms(denoiser: Denoiser, x0: torch.Tensor, T: int, *, variance: str = "posterior", generator=None):
    """Monte Carlo estimate of each term of the variational bound, eq. 5, in nats per sample.

    Returns shape ``(B, T + 1)``: column 0 is ``L_0 = -log p(x_0 | x_1)`` (a Gaussian decoder with
    variance ``beta_1``, since ``betatilde_1 = 0``), column ``t`` for ``1 <= t < T`` is
    ``L_t = KL(q(x_t | x_{t+1}, x_0) || p(x_t | x_{t+1}))`` and column T is ``L_T = KL(q(x_T | x_0) || N(0, I))``.
    Their sum is the negative ELBO, an upper bound on ``-log p(x_0)``.
    """
    sched = denoiser.schedule
    grid = torch.arange(T + 1, dtype=torch.float64) / T
    terms = []
    for i in range(1, T + 1):  # step from t = i/T to s = (i-1)/T
        t, s = grid[i], grid[i - 1]
        noise = noise_like(x0, generator)
        x_t = q_sample(sched, x0, t.to(x0.dtype), noise)
        x0_hat = denoiser.x0(x_t, t.to(x0.dtype))
        mean_p, _ = posterior(sched, x_t, x0_hat, t, s)
        if i == 1:
            terms.append(gaussian_nll(x0, mean_p, reverse_variance(sched, t, s, "beta")))
        else:
            mean_q, var_q = posterior(sched, x_t, x0, t, s)
            terms.append(gaussian_kl(mean_q, var_q, mean_p, reverse_variance(sched, t, s, variance)))
    a_T, s_T = sched.alpha(grid[-1]).to(x0.dtype), sched.sigma(grid[-1]).to(x0.dtype)
    terms.append(gaussian_kl(a_T * x0, s_T**2, torch.zeros_like(x0), 1.0))
    return torch.stack(terms, dim=1)


def simple_loss(
    model: Callable, x0: torch.Tensor, schedule: Schedule, *, prediction: str = "eps", generator=None
) -> torch.Tensor:
    """``L_simple`` (eq. 14): ``E_{t, x0, eps} || target - model(x_t, t) ||^2`` with ``t ~ U(0, 1)``.

    With ``prediction="eps"`` this is Ho et al.'s loss; ``"x0"`` and ``"v"`` regress the other
    targets with the same unweighted mean squared error.
    """
    if prediction not in ("eps", "x0", "v"):
        raise ValueError(f"simple_loss trains 'eps', 'x0' or 'v' predictions; got {prediction!r}.")
    t = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
    noise = noise_like(x0, generator)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    x_t = _col(alpha, x0) * x0 + _col(sigma, x0) * noise  # eq. 4, as in q_sample
    target = from_x0_eps(x0, noise, prediction, alpha, sigma)
    return torch.mean((model(x_t, t) - target) ** 2)


def check_timesteps(timesteps) -> torch.Tensor:
    """Sampler time grids run strictly downwards inside [0, 1], e.g. ``torch.linspace(1, 0, T + 1)``.

    A grid is read by Python at every step, so it is returned on the CPU (copied once if it lives elsewhere).
    """
    ts = as_time(timesteps.cpu() if torch.is_tensor(timesteps) else timesteps)
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(
            f"timesteps must be a 1-D tensor with at least 2 times; got shape {tuple(ts.shape)}."
        )
    if not (ts[1:] < ts[:-1]).all():
        i = int((ts[1:] >= ts[:-1]).nonzero()[0])
        raise ValueError(
            f"timesteps must decrease strictly (from noise to data); "
            f"timesteps[{i}]={ts[i].item():g} is followed by {ts[i + 1].item():g}."
        )
    return ts


@torch.no_grad()
def sample_ancestral(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    timesteps,
    *,
    variance: str = "posterior",
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callable | None = None,
) -> torch.Tensor:
    """Ancestral sampling, Algorithm 2: ``x_s ~ p(x_s | x_t) = N(mean of q(x_s | x_t, x0_hat), sigma_t^2)``,
    the mean computed in the noise form of :func:`posterior_mean_from_eps`.

    ``timesteps`` runs from the start time down to 0, e.g. ``torch.linspace(1, 0, 1001)`` for the
    1000-step chain. ``variance`` picks ``sigma_t^2 = betatilde_t`` or ``beta_t`` (sec. 3.2); the last
    step to ``t = 0`` adds no noise. ``callback(i, t, x)`` sees every state, for trajectories.
    """
    ts = check_timesteps(timesteps)
    x = x_T
    if callback is not None:
        callback(0, ts[0], x)
    for i in tqdm(range(len(ts) - 1), disable=not progress, desc="ancestral sampling"):
        t, s = ts[i], ts[i + 1]
        _, eps_hat = denoiser.x0_eps(x, t.to(x.dtype))
        mean = posterior_mean_from_eps(denoiser.schedule, x, eps_hat, t, s)
        if s > 0:
            var = reverse_variance(denoiser.schedule, t, s, variance).to(x.dtype)
            noise = noise_like(x, generator)
            x = mean + var.sqrt() * noise
        else:
            x = mean
        if callback is not None:
            callback(i + 1, s, x)
    return x
