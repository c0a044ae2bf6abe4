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


VARIANCES = ("beta", "betatilde")  # the fixed reverse variances Sigma_i (Ho et al. 2020, sec. 3.2)


def reverse_variance(schedule: Schedule, t, s, kind: str = "betatilde") -> torch.Tensor:
    """A fixed reverse variance ``Sigma`` of the step ``t -> s`` (sec. 3.2), in float64:
    ``"betatilde"``, the variance of the posterior ``q(x_s | x_t, x_0)`` (eq. 7, the lower bound on
    the reverse entropy), or ``"beta"``, ``beta_{t|s} = sigma_{t|s}^2`` (the upper one)."""
    if kind == "betatilde":
        return _posterior_coefficients(schedule, t, s)[2]
    if kind == "beta":
        return _transition(schedule, t, s)[1]
    raise ValueError(f"unknown reverse variance {kind!r}; choose 'betatilde' or 'beta'.")


def variance_table(schedule: Schedule, T: int, kind: str) -> torch.Tensor:
    """Fixed reverse variances ``Sigma_i`` of the ``T``-step chain, shape ``(T + 1,)``: entry ``i`` is
    the variance of ``p(x_{i-1} | x_i)``, ``beta_i`` (``kind="beta"``) or ``betatilde_i``
    (``"betatilde"``). Since ``betatilde_1 = 0``, both use ``beta_1`` for the decoder
    ``p(x_0 | x_1)``. Entry 0 is unused (0)."""
    if kind not in VARIANCES:
        raise ValueError(f"unknown fixed variance {kind!r}; choose 'beta' or 'betatilde'.")
    grid = _grid(T)
    out = torch.zeros(int(T) + 1, dtype=torch.float64)
    out[1:] = reverse_variance(schedule, grid[1:], grid[:-1], kind)
    out[1] = reverse_variance(schedule, grid[1], grid[0], "beta")
    return out


def _grid(T) -> torch.Tensor:
    if isinstance(T, bool) or int(T) != T or T < 1:
        raise ValueError(f"T must be a positive integer number of steps; got {T!r}.")
    return torch.arange(int(T) + 1, dtype=torch.float64) / int(T)


def vlb_terms(
    denoiser: Denoiser,
    x0: torch.Tensor,
    T: int,
    *,
    variance: str | torch.Tensor | Callable = "betatilde",
    decoder_nll: Callable = gaussian_nll,
    generator=None,
) -> torch.Tensor:
    """Monte Carlo estimate of each term of the variational bound, eq. 5, in nats per sample: the
    one discrete bound of the library (:func:`dmlib.likelihood.discrete_vlb` calls it).

    Returns shape ``(B, T + 1)``: column 0 is ``L_0 = -log p(x_0 | x_1)`` (``decoder_nll(x0, mean,
    Sigma_1)``, a Gaussian density by default), column ``i`` for ``1 <= i < T`` is
    ``L_i = KL(q(x_i | x_{i+1}, x_0) || p(x_i | x_{i+1}))`` and column T is
    ``L_T = KL(q(x_T | x_0) || N(0, I))``. Their sum is the negative ELBO, an upper bound on
    ``-log p(x_0)``. The reverse mean is the posterior mean at ``x0_hat``; the reverse variance
    ``Sigma_i`` is ``"betatilde"`` or ``"beta"`` (:func:`variance_table`), a ``(T + 1,)`` tensor, or
    a callable ``Sigma(x_t, i)`` for a variance that depends on ``x_t``.
    """
    sched = denoiser.schedule
    if float(sched.sigma(torch.tensor(0.0, dtype=torch.float64)).detach()) > 0:
        raise ValueError(
            f"the discrete bound needs sigma(0) = 0 (the chain starts at the data); "
            f"{type(sched).__name__} has sigma(0) > 0: use dmlib.likelihood.continuous_vlb."
        )
    grid = _grid(T)
    table = variance_table(sched, T, variance) if isinstance(variance, str) else variance
    terms = []
    for i in range(1, int(T) + 1):  # step from t = i/T to s = (i-1)/T
        t, s = grid[i], grid[i - 1]
        noise = noise_like(x0, generator)
        x_t = q_sample(sched, x0, t.to(x0.dtype), noise)
        mean_p, _ = posterior(sched, x_t, denoiser.x0(x_t, t.to(x0.dtype)), t, s)
        var = table(x_t, i) if callable(table) else table[i].to(x0.dtype)
        if i == 1:
            terms.append(decoder_nll(x0, mean_p, var))
        else:
            mean_q, var_q = posterior(sched, x_t, x0, t, s)
            terms.append(gaussian_kl(mean_q, var_q, mean_p, var))
    a_T, s_T = sched.alpha(grid[-1]).to(x0.dtype), sched.sigma(grid[-1]).to(x0.dtype)
    terms.append(gaussian_kl(a_T * x0, s_T**2, torch.zeros_like(x0), 1.0))
    return torch.stack(terms, dim=1)


def uniform_time(x0: torch.Tensor, generator=None, t_min: float = 0.0) -> torch.Tensor:
    """One training time per sample, uniform on ``(t_min, 1]``: ``torch.rand`` can return exactly
    0 (in float32 about once in 2^24 draws), where ``sigma = 0`` and a score divides by zero, so the
    draw is flipped to ``1 - u``, which never reaches ``t_min``."""
    u = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
    return t_min + (1 - t_min) * (1 - u)


def simple_loss(schedule: Schedule, *, prediction: str = "eps") -> Callable:
    """``L_simple`` (eq. 14), ``E_{t, x0, eps} || target - model(x_t, t) ||^2`` with ``t ~ U(0, 1]``,
    as a loss function ``loss(model, x0, generator=None)`` for :func:`dmlib.train.train`.

    With ``prediction="eps"`` this is Ho et al.'s loss; ``"x0"`` and ``"v"`` regress the other
    targets with the same unweighted mean squared error.
    """
    if prediction not in ("eps", "x0", "v"):
        raise ValueError(f"simple_loss trains 'eps', 'x0' or 'v' predictions; got {prediction!r}.")

    def loss(model: Callable, x0: torch.Tensor, generator=None) -> torch.Tensor:
        t = uniform_time(x0, generator)
        noise = noise_like(x0, generator)
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        x_t = _col(alpha, x0) * x0 + _col(sigma, x0) * noise  # eq. 4, as in q_sample
        target = from_x0_eps(x0, noise, prediction, alpha, sigma)
        return torch.mean((model(x_t, t) - target) ** 2)

    return loss


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


def check_start(x_T: torch.Tensor) -> torch.Tensor:
    """A sampler's starting point must be finite: a NaN would run through every step unseen."""
    # (a meta tensor has no values to check: the device tests run samplers on it)
    if x_T.device.type != "meta" and not torch.isfinite(x_T).all():
        raise ValueError("x_T has NaN or infinite entries; start a sampler from finite noise.")
    return x_T


def run_steps(step: Callable, denoiser: Denoiser, x_T, timesteps, desc, progress=False, callback=None):
    """The loop every sampler of the library shares (this module, :mod:`dmlib.sde`,
    :mod:`dmlib.samplers`): ``x <- step(i, x)`` takes ``x`` from ``timesteps[i]`` to
    ``timesteps[i + 1]``, and ``callback(i, t, x)`` sees every state.

    The one last-step rule: a step that ends where ``sigma = 0`` (the data end of a VP or sub-VP
    schedule) is the denoising step ``x = alpha E[x_0 | x_t]`` (Tweedie's formula), since the score
    is infinite there; it costs one network evaluation. A step to ``t = 0`` where ``sigma(0) > 0``
    (VE) is an ordinary step, and stochastic samplers add no noise on it.
    """
    ts = check_timesteps(timesteps)
    x = check_start(x_T)
    end = ts[-1:].to(torch.float64)
    with torch.no_grad():  # a learned schedule's curves carry a graph; only their values are wanted
        denoise_last = float(denoiser.schedule.sigma(end)[0]) == 0
        alpha_end = float(denoiser.schedule.alpha(end)[0])
    if callback is not None:
        callback(0, ts[0], x)
    n = len(ts) - 1
    for i in tqdm(range(n), disable=not progress, desc=desc):
        if i == n - 1 and denoise_last:
            x = alpha_end * denoiser.x0(x, ts[i].to(x.dtype))
        else:
            x = step(i, x)
        if callback is not None:
            callback(i + 1, ts[i + 1], x)
    return x


@torch.no_grad()
def sample_ancestral(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    timesteps,
    *,
    variance: str = "betatilde",
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callable | None = None,
) -> torch.Tensor:
    """Ancestral sampling, Algorithm 2: ``x_s ~ p(x_s | x_t) = N(mean of q(x_s | x_t, x0_hat), Sigma)``,
    the mean computed in the noise form of :func:`posterior_mean_from_eps`.

    ``timesteps`` runs from the start time down to 0, e.g. ``torch.linspace(1, 0, 1001)`` for the
    1000-step chain. ``variance`` picks the reverse variance ``Sigma = betatilde`` or ``beta``
    (sec. 3.2); the last step to ``t = 0`` adds no noise (:func:`run_steps`). ``callback(i, t, x)``
    sees every state, for trajectories.
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown reverse variance {variance!r}; choose 'betatilde' or 'beta'.")
    ts = check_timesteps(timesteps)

    def step(i, x):
        t, s = ts[i], ts[i + 1]
        _, eps_hat = denoiser.x0_eps(x, t.to(x.dtype))
        mean = posterior_mean_from_eps(denoiser.schedule, x, eps_hat, t, s)
        if s == 0:
            return mean
        var = reverse_variance(denoiser.schedule, t, s, variance).to(x.dtype)
        return mean + var.sqrt() * noise_like(x, generator)

    return run_steps(step, denoiser, x_T, ts, "ancestral sampling", progress, callback)
