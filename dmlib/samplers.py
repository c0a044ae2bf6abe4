"""Fast samplers (Chapter 3): DDIM, EDM's Euler and Heun, DPM-Solver, DPM-Solver++, DEIS, PLMS,
the adaptive SDE solver of "Gotta go fast", and CCDF's shortcut start.

Every sampler has the signature of :func:`dmlib.ddpm.sample_ancestral`::

    sample_X(denoiser, x_T, timesteps, *, generator=None, progress=False, callback=None, **options)

and returns the final ``x``. ``timesteps`` runs strictly downwards inside [0, 1] (build one with
:func:`time_grid`); ``callback(i, t, x)`` sees every state. All of them work for any schedule
``x_t = alpha(t) x_0 + sigma(t) eps`` (VP, VE, sub-VP) through ``alpha``, ``sigma`` and the log-SNR.

Two conventions to keep in mind while reading the papers beside this file:

* this repository's log-SNR is ``lambda = log(alpha^2 / sigma^2)``; DPM-Solver's time variable
  (Lu et al. write it ``lambda``) is the half log-SNR ``ell = log(alpha / sigma) = lambda / 2``, and
  a step is ``h = ell_s - ell_t``;
* EDM's noise level (Karras et al. write it ``sigma``) is ``nu = sigma / alpha = exp(-lambda / 2)``
  and its state is ``y = x / alpha``; in those variables the probability-flow ODE is
  ``dy / dnu = eps(x, t)`` (Karras et al. 2022, eq. 4 with ``s(t) = 1``; Song, Meng & Ermon 2021,
  eq. 14). ``rho`` is only the exponent of EDM's time grid (:func:`time_grid`).

A step that ends where ``sigma = 0`` (the data end of VP and sub-VP) cannot use the ODE there (the
score is infinite); every fixed-grid sampler makes it the denoising step ``x = alpha(0) E[x_0 | x_t]``
(Tweedie's formula; the one last-step rule of :func:`dmlib.ddpm.run_steps`, which every sampler of
the library shares), which is what DDIM and DPM-Solver-1 give by themselves and what DPM-Solver++
and k-diffusion do for their last step. It costs one network evaluation (NFE) whatever the order, so
a grid ending at 0 costs ``k (N - 1) + 1`` evaluations for a k-stage method (:func:`nfe`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from .ddpm import check_start, check_timesteps, q_sample, run_steps
from .parameterization import Denoiser, _col, noise_like
from .schedules import Schedule, as_time
from .sde import reverse_drift

GRIDS = ("uniform", "quadratic", "logsnr", "edm")


def _f64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


@dataclass(frozen=True)
class _Grid:
    """A checked time grid and the schedule read on it once, in float64 (Python floats for the formulas).

    ``half_log_snr`` is DPM-Solver's time variable ``ell = log(alpha / sigma)``, half of this
    repository's log-SNR (+inf where sigma = 0); ``nu = sigma / alpha`` is EDM's noise level.
    """

    t: torch.Tensor
    alpha: list[float]
    sigma: list[float]
    half_log_snr: list[float]
    nu: list[float]

    @classmethod
    def build(cls, schedule: Schedule, timesteps) -> _Grid:
        t = check_timesteps(timesteps).to(torch.float64)
        a, s = schedule.alpha(t), schedule.sigma(t)
        return cls(t, a.tolist(), s.tolist(), (schedule.log_snr(t) / 2).tolist(), (s / a).tolist())

    @property
    def steps(self) -> int:
        return len(self.t) - 1


def time_grid(
    schedule: Schedule,
    n_steps: int,
    kind: str = "uniform",
    *,
    t_max: float = 1.0,
    t_min: float = 0.0,
    rho: float = 7.0,
    t_eps: float = 1e-3,
) -> torch.Tensor:
    """A decreasing grid of ``n_steps + 1`` times from ``t_max`` to ``t_min`` (float64).

    ``"uniform"``: equal steps in t. ``"quadratic"``: ``t_i = t_min + (t_max - t_min) (i / N)^2``, the
    continuous form of DDIM's quadratic sub-sequence (Song, Meng & Ermon 2021, appendix D.2).
    ``"logsnr"``: equal steps in log-SNR (Lu et al. 2022, sec. 3.3). ``"edm"``: Karras et al. (2022)
    eq. 5 on EDM's noise level ``nu = sigma / alpha`` with exponent ``rho`` (7 in their paper),
    ``nu_i = (nu_max^(1/rho) + i/N (nu_min^(1/rho) - nu_max^(1/rho)))^rho``.

    The last two need a finite log-SNR at both ends. If ``sigma(t_min) = 0`` they space ``n_steps - 1``
    steps down to ``t_eps`` (1e-3, the end time of Song et al. 2021 and Lu et al. 2022) and append
    ``t = 0``, as EDM appends ``sigma_N = 0``; the last step is then the denoising step.
    """
    if kind not in GRIDS:
        raise ValueError(f"unknown time grid kind {kind!r}; choose one of {', '.join(GRIDS)}.")
    if isinstance(n_steps, bool) or int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer; got {n_steps!r}.")
    if not 0 <= t_min < t_max <= 1:
        raise ValueError(f"need 0 <= t_min < t_max <= 1; got t_min={t_min}, t_max={t_max}.")
    if rho <= 0:
        raise ValueError(f"rho must be positive (Karras et al. use 7); got {rho}.")
    n = int(n_steps)
    if kind in ("uniform", "quadratic"):
        u = torch.linspace(1, 0, n + 1, dtype=torch.float64)
        return t_min + (t_max - t_min) * (u if kind == "uniform" else u**2)
    end, append_zero = t_min, bool(torch.isinf(schedule.log_snr(_f64(t_min))))
    if append_zero:
        if not t_min < t_eps < t_max:
            raise ValueError(f"t_eps must lie strictly between t_min={t_min} and t_max={t_max}; got {t_eps}.")
        if n < 2:
            raise ValueError(
                f"a {kind!r} grid ending where sigma = 0 needs n_steps >= 2 (steps down to t_eps, then a "
                f"denoising step to t = {t_min}); got {n}. Pass more steps or t_min > 0."
            )
        end, n = t_eps, n - 1
    # on the CPU, where the grid is built (a learned schedule answers on its own device)
    lam_hi, lam_lo = schedule.log_snr(_f64(end)).cpu(), schedule.log_snr(_f64(t_max)).cpu()
    i = torch.arange(n + 1, dtype=torch.float64) / n
    if kind == "logsnr":
        lam = lam_lo + i * (lam_hi - lam_lo)
    else:
        nu_max, nu_min = (-lam_lo / 2).exp(), (-lam_hi / 2).exp()
        lam = -2 * torch.log((nu_max ** (1 / rho) + i * (nu_min ** (1 / rho) - nu_max ** (1 / rho))) ** rho)
    ts = schedule.t_from_log_snr(lam)
    ts[0], ts[-1] = t_max, end  # the bisection is exact to ~1e-16; pin the ends exactly
    if append_zero:
        ts = torch.cat([ts, ts.new_full((1,), t_min)])
    return check_timesteps(ts)


def _min_steps(grid: _Grid, need: int, what: str):
    if grid.steps < need:
        raise ValueError(
            f"{what} needs at least {need} steps (its formula uses {need - 1} earlier evaluations); got "
            f"{grid.steps}. Pass more timesteps or lower the order."
        )


def ddim_step(denoiser: Denoiser, x, t, s, *, eta: float = 0.0, generator=None) -> torch.Tensor:
    """One DDIM step from ``t`` down to ``s`` (scalars or one time per sample; Song, Meng & Ermon
    2021, eq. 12), for any schedule: ``x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z``
    with ``c^2 = eta^2 sigma_s^2 (1 - e^{lambda_t - lambda_s})``, which is eq. 16's
    ``eta^2 (1 - abar_s)/(1 - abar_t) (1 - abar_t / abar_s)`` for a VP schedule: the variance of
    ``q(x_s | x_t, x_0)``. ``eta = 0`` is deterministic; no noise is added on a step to ``s = 0``.
    The coefficients are computed in float64."""
    t64, s64 = as_time(t).to(torch.float64), as_time(s).to(torch.float64)
    x0, eps = denoiser.x0_eps(x, torch.as_tensor(t).to(device=x.device, dtype=x.dtype))
    sched = denoiser.schedule
    a_s, sig_s = sched.alpha(s64), sched.sigma(s64)
    if eta == 0:
        return _col(a_s, x) * x0 + _col(sig_s, x) * eps
    c2 = eta**2 * sig_s**2 * -torch.expm1(sched.log_snr(t64) - sched.log_snr(s64))
    x = _col(a_s, x) * x0 + _col((sig_s**2 - c2).clamp(min=0).sqrt(), x) * eps
    return x + _col(torch.where(s64 > 0, c2.sqrt(), 0.0), x) * noise_like(x, generator)


@torch.no_grad()
def sample_ddim(
    denoiser, x_T, timesteps, *, eta: float = 0.0, generator=None, progress=False, callback=None
) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon 2021, eq. 12): :func:`ddim_step` along ``timesteps``. ``eta = 0`` is
    deterministic; ``eta = 1`` is ancestral DDPM with variance ``Sigma = betatilde``. As in
    :func:`dmlib.ddpm.sample_ancestral`, no noise is added on the step to t = 0.
    """
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM); got {eta}.")
    ts = check_timesteps(timesteps)

    def step(i, x):
        return ddim_step(denoiser, x, ts[i], ts[i + 1], eta=eta, generator=generator)

    return run_steps(step, denoiser, x_T, ts, f"DDIM (eta={eta})", progress, callback)


@torch.no_grad()
def sample_euler(denoiser, x_T, timesteps, *, generator=None, progress=False, callback=None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE in EDM form (Karras et al. 2022, Algorithm 1 without
    its line 6): with ``y = x / alpha`` and ``nu = sigma / alpha``, ``dy / dnu = (y - D) / nu``,
    ``D = E[x_0 | x_t]`` (their eq. 4 with ``sigma(t) = t``, ``s(t) = 1``). In these variables it is
    exactly deterministic DDIM (Karras et al. 2022, sec. 3; a test checks it)."""
    grid = _Grid.build(denoiser.schedule, timesteps)

    def step(i, x):
        y = x / grid.alpha[i]
        d = (y - denoiser.x0(x, grid.t[i].to(x.dtype))) / grid.nu[i]
        return grid.alpha[i + 1] * (y + (grid.nu[i + 1] - grid.nu[i]) * d)

    return run_steps(step, denoiser, x_T, grid.t, "Euler (EDM form)", progress, callback)


@torch.no_grad()
def sample_heun(
    denoiser,
    x_T,
    timesteps,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator=None,
    progress=False,
    callback=None,
) -> torch.Tensor:
    """Heun's method in EDM form (Karras et al. 2022, Algorithm 1; with ``s_churn > 0``, the stochastic
    Algorithm 2). Two evaluations per step; the last step to ``sigma = 0`` is Euler's (one evaluation).

    Churn: where ``s_tmin <= nu_t <= s_tmax``, first raise the noise level to
    ``nu_hat = nu_t (1 + gamma)``, ``gamma = min(s_churn / N, sqrt(2) - 1)``, by adding fresh noise of
    variance ``(nu_hat^2 - nu_t^2) s_noise^2`` to ``y``, then take the Heun step from ``nu_hat``.
    ``nu_hat`` is capped at ``nu(1)``: the denoiser is not defined beyond the schedule's end.
    """
    if s_churn < 0 or s_noise <= 0 or s_tmin > s_tmax:
        raise ValueError(
            f"need s_churn >= 0, s_noise > 0 and s_tmin <= s_tmax; got s_churn={s_churn}, "
            f"s_noise={s_noise}, s_tmin={s_tmin}, s_tmax={s_tmax}."
        )
    sched = denoiser.schedule
    grid = _Grid.build(sched, timesteps)
    gamma = min(s_churn / grid.steps, math.sqrt(2) - 1)
    nu_top = (sched.sigma(_f64(1.0)) / sched.alpha(_f64(1.0))).item()
    nu_hat = [min(n * (1 + gamma), nu_top) if gamma > 0 and s_tmin <= n <= s_tmax else n for n in grid.nu]
    t_hat = sched.t_from_log_snr(-2 * torch.log(_f64(nu_hat)))  # the times of the raised noise levels
    a_hat = sched.alpha(t_hat).tolist()

    def denoise(y, t, a):  # D at x = a y: the denoiser sees x, not y
        return denoiser.x0(a * y, t.to(y.dtype))

    def step(i, x):
        y, t, a, nu, nu_s = x / grid.alpha[i], grid.t[i], grid.alpha[i], grid.nu[i], grid.nu[i + 1]
        if nu_hat[i] > nu:
            z = noise_like(y, generator)
            y = y + math.sqrt(nu_hat[i] ** 2 - nu**2) * s_noise * z
            t, a, nu = t_hat[i], a_hat[i], nu_hat[i]
        d = (y - denoise(y, t, a)) / nu
        y_euler = y + (nu_s - nu) * d
        d_s = (y_euler - denoise(y_euler, grid.t[i + 1], grid.alpha[i + 1])) / nu_s
        return grid.alpha[i + 1] * (y + (nu_s - nu) * (d + d_s) / 2)

    return run_steps(step, denoiser, x_T, grid.t, "Heun (EDM form)", progress, callback)


@torch.no_grad()
def sample_dpm_solver(
    denoiser, x_T, timesteps, *, order: int = 2, generator=None, progress=False, callback=None
) -> torch.Tensor:
    """Singlestep DPM-Solver (Lu et al. 2022) with noise prediction, ``h = ell_s - ell_t`` in the half
    log-SNR ``ell = log(alpha / sigma)`` (their ``lambda``); each step uses ``order`` evaluations.

    order 1 (eq. 3.7; = DDIM): ``x_s = (alpha_s / alpha_t) x_t - sigma_s (e^h - 1) eps_t``.
    order 2 (Algorithm 1, r1 = 1/2): an order-1 step to ``ell_t + r1 h`` gives ``eps_1``; then
    ``x_s = ... - sigma_s / (2 r1) (e^h - 1) (eps_1 - eps_t)``.
    order 3 (Algorithm 2, r1 = 1/3, r2 = 2/3): intermediate points at ``ell_t + r1 h`` and
    ``ell_t + r2 h``, with ``phi(z) = (e^z - 1) / z - 1``.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver order must be 1, 2 or 3; got {order!r}.")
    sched = denoiser.schedule
    grid = _Grid.build(sched, timesteps)
    ell = torch.tensor(grid.half_log_snr, dtype=torch.float64)
    h_all = ell[1:] - ell[:-1]  # +inf on a step to sigma = 0, which the loop makes a denoising step
    r1, r2 = (0.5 if order == 2 else 1 / 3), 2 / 3

    def stage(r):  # the intermediate times ell_t + r h of every step (one bisection), alpha, sigma there
        t_r = sched.t_from_log_snr(2 * (ell[:-1] + r * h_all))
        return t_r, sched.alpha(t_r).tolist(), sched.sigma(t_r).tolist()

    t1, a1, sig1 = stage(r1) if order > 1 else (None, None, None)
    t2, a2, sig2 = stage(r2) if order > 2 else (None, None, None)

    def eps_at(x, t):
        return denoiser.eps(x, t.to(x.dtype))

    def step(i, x):
        h, a_t, a_s, sig_s = h_all[i].item(), grid.alpha[i], grid.alpha[i + 1], grid.sigma[i + 1]
        e_t = eps_at(x, grid.t[i])
        x_s = (a_s / a_t) * x - sig_s * math.expm1(h) * e_t
        if order == 1:
            return x_s
        d1 = eps_at((a1[i] / a_t) * x - sig1[i] * math.expm1(r1 * h) * e_t, t1[i]) - e_t
        if order == 2:
            return x_s - sig_s / (2 * r1) * math.expm1(h) * d1
        phi_22 = math.expm1(r2 * h) / (r2 * h) - 1
        u2 = (a2[i] / a_t) * x - sig2[i] * math.expm1(r2 * h) * e_t - (r2 / r1) * sig2[i] * phi_22 * d1
        d2 = eps_at(u2, t2[i]) - e_t
        return x_s - (1 / r2) * sig_s * (math.expm1(h) / h - 1) * d2

    return run_steps(step, denoiser, x_T, grid.t, f"DPM-Solver-{order}", progress, callback)


@torch.no_grad()
def sample_dpm_solver_pp_2m(
    denoiser, x_T, timesteps, *, generator=None, progress=False, callback=None
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): multistep, data prediction, one evaluation per step.

    ``x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D`` with ``D = x0_t`` on the first step and
    ``D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev``, ``r = h_prev / h``, afterwards.
    """
    grid, previous = _Grid.build(denoiser.schedule, timesteps), []  # [(h, x0)] of the previous step

    def step(i, x):
        h = grid.half_log_snr[i + 1] - grid.half_log_snr[i]
        x0 = denoiser.x0(x, grid.t[i].to(x.dtype))
        d = x0
        if previous:
            r = previous[0][0] / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous[0][1]
        previous[:] = [(h, x0)]
        return (grid.sigma[i + 1] / grid.sigma[i]) * x - grid.alpha[i + 1] * math.expm1(-h) * d

    return run_steps(step, denoiser, x_T, grid.t, "DPM-Solver++(2M)", progress, callback)


def _deis_coefficients(schedule: Schedule, grid: _Grid, order: int, n_quad: int = 24) -> list[list[float]]:
    """For each step i, ``C_ij = int_{nu_i}^{nu_{i+1}} l_j(t(nu)) dnu`` with ``l_j`` the Lagrange basis
    in time through ``t_i, t_{i-1}, ...`` (at most ``order`` points), by Gauss-Legendre quadrature in
    ``nu = sigma / alpha``; ``t(nu)`` by one vectorised bisection for all steps and nodes."""
    nodes, weights = np.polynomial.legendre.leggauss(n_quad)
    r0, r1 = np.array(grid.nu[:-1])[:, None], np.array(grid.nu[1:])[:, None]
    nu = r0 + (r1 - r0) * (nodes + 1) / 2  # (steps, n_quad)
    tau = schedule.t_from_log_snr(torch.from_numpy(-2 * np.log(nu))).cpu().numpy()  # interior nodes: nu > 0
    w, ts = weights * (r1 - r0) / 2, grid.t.tolist()
    coefs = []
    for i in range(grid.steps):
        points = ts[max(i - order + 1, 0) : i + 1][::-1]  # newest first
        basis = [
            np.prod([(tau[i] - t_m) / (t_j - t_m) for m, t_m in enumerate(points) if m != j], axis=0)
            for j, t_j in enumerate(points)
        ]
        coefs.append([float(np.sum(w[i] * b)) for b in basis])
    return coefs


@torch.no_grad()
def sample_deis(
    denoiser, x_T, timesteps, *, order: int = 3, generator=None, progress=False, callback=None
) -> torch.Tensor:
    """tAB-DEIS (Zhang & Chen 2022, sec. 4; survey 000 eq. 25): the exponential integrator with ``eps``
    extrapolated by the polynomial in t through the last ``order`` evaluations.

    The exact solution of the probability-flow ODE is ``x_s / alpha_s = x_t / alpha_t + int eps dnu``
    (``nu = sigma / alpha``: the transition factor ``alpha_s / alpha_tau`` times the weight
    ``g^2 / (2 sigma)`` equals ``alpha_s dnu / dtau`` for any schedule). Replacing ``eps`` by its
    Lagrange polynomial gives ``x_s = alpha_s (x_t / alpha_t + sum_j C_j eps_j)`` with the quadrature
    coefficients of :func:`_deis_coefficients`. The first steps warm up with the orders available;
    order 1 is DDIM. One evaluation per step; needs at least ``order`` steps.
    """
    if order not in (1, 2, 3, 4):
        raise ValueError(f"DEIS order must be 1, 2, 3 or 4; got {order!r}.")
    sched = denoiser.schedule
    grid = _Grid.build(sched, timesteps)
    _min_steps(grid, order, f"DEIS of order {order}")
    coefs, history = _deis_coefficients(sched, grid, order), []  # eps, newest first

    def step(i, x):
        history.insert(0, denoiser.eps(x, grid.t[i].to(x.dtype)))
        del history[order:]
        return grid.alpha[i + 1] * (x / grid.alpha[i] + sum(c * e for c, e in zip(coefs[i], history)))

    return run_steps(step, denoiser, x_T, grid.t, f"DEIS-{order}", progress, callback)


# Adams-Bashforth weights, newest evaluation first (Hairer, Norsett & Wanner 1993, sec. III.1)
_ADAMS_BASHFORTH = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@torch.no_grad()
def sample_plms(denoiser, x_T, timesteps, *, generator=None, progress=False, callback=None) -> torch.Tensor:
    """PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022, sec. 3): the DDIM transfer
    ``phi(x_t, eps', t, s) = alpha_s (x_t / alpha_t + (nu_s - nu_t) eps')`` (their rationalised VP
    formula, written for any schedule) applied to the 4th-order Adams-Bashforth combination
    ``eps' = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24`` of the last four evaluations.

    Warm-up: the paper runs three pseudo Runge-Kutta steps (4 evaluations each); here the first three
    steps use Adams-Bashforth of order 1, 2, 3 instead, so every step costs one evaluation. The AB
    weights assume steps equal in ``nu``, the variable in which the transfer integrates ``eps``; on
    other grids (all those of :func:`time_grid`) the method converges at second order (measured in the
    tests). Needs at least 4 steps.
    """
    grid, history = _Grid.build(denoiser.schedule, timesteps), []  # eps, newest first
    _min_steps(grid, 4, "PLMS")

    def step(i, x):
        history.insert(0, denoiser.eps(x, grid.t[i].to(x.dtype)))
        del history[4:]
        eps = sum(w * e for w, e in zip(_ADAMS_BASHFORTH[len(history) - 1], history))
        return grid.alpha[i + 1] * (x / grid.alpha[i] + (grid.nu[i + 1] - grid.nu[i]) * eps)

    return run_steps(step, denoiser, x_T, grid.t, "PLMS", progress, callback)


def _reverse_sde_increment(denoiser, x, t, h, z):
    """``-h drift + g sqrt(h) z``, drift :func:`dmlib.sde.reverse_drift`: a step of length ``h`` down
    the reverse SDE (Song et al. 2021, eq. 6), with one time and step per sample."""
    g2 = denoiser.schedule.drift_diffusion(t)[1]
    return _col(-h, x) * reverse_drift(denoiser, x, t) + _col((g2 * h).sqrt(), x) * z


@torch.no_grad()
def sample_adaptive_sde(
    denoiser,
    x_T,
    timesteps,
    *,
    eps_rel: float = 0.05,
    eps_abs: float = 0.0078,
    theta: float = 0.9,
    r: float = 0.9,
    h_init: float = 0.01,
    t_eps: float = 1e-3,
    max_iterations: int = 10_000,
    info: dict | None = None,
    generator=None,
    progress=False,
    callback=None,
) -> torch.Tensor:
    """The adaptive reverse-SDE solver of Jolicoeur-Martineau et al. (2021, "Gotta go fast", Algorithm 1;
    survey 000 eq. 21), with a step size per sample.

    Each iteration draws one ``z`` and makes the Euler-Maruyama proposal ``x' = x + K1`` and the improved
    Euler one ``x'' = x + (K1 + K2) / 2`` (``K = -h drift + g sqrt(h) z`` at ``(x, t)`` and
    ``(x', t - h)``, drift ``f x - g^2 score``); with ``delta = max(eps_abs, eps_rel max(|x'|, |x'_prev|))``
    the error is ``E = ||(x' - x'') / delta||_2 / sqrt(dim)``. A sample accepts ``x''`` if ``E <= 1``;
    either way its step becomes ``h <- min(t - t_end, theta h E^{-r})``.

    Defaults from the authors' code (``sde_sampling_torch.py``): ``theta = 0.9``, ``r = 0.9``,
    ``h_init = 0.01``; their experiments use ``eps_rel`` in {0.01, 0.02, 0.05, 0.1} and ``eps_abs`` =
    0.0078 for data in [-1, 1] (0.0039 for [0, 1]): about one quantization level, so scale it with the
    data's range. In 2D the error norm averages only two coordinates, so it is noisy and many more
    proposals are rejected than the paper reports for images.

    Of ``timesteps`` only the ends are used: it integrates from ``timesteps[0]`` to ``timesteps[-1]``,
    or, if ``sigma`` vanishes there, to ``t_eps`` followed by the denoising step (as the authors do).
    ``callback(i, t, x)`` gets the vector of per-sample times. The cost is not fixed in advance: pass a
    dict as ``info`` to receive ``nfe`` (2 per iteration, +1 for the denoising step; the network sees
    the whole batch of unfinished samples at once), ``iterations`` and ``rejected`` (sample-steps).
    """
    if not (eps_rel >= 0 and eps_abs >= 0 and eps_rel + eps_abs > 0):
        raise ValueError(f"need eps_rel, eps_abs >= 0, not both 0; got eps_rel={eps_rel}, eps_abs={eps_abs}.")
    if not (0 < theta <= 1 and r > 0 and h_init > 0):
        raise ValueError(
            f"need 0 < theta <= 1, r > 0, h_init > 0; got theta={theta}, r={r}, h_init={h_init}."
        )
    ts = check_timesteps(timesteps).to(torch.float64)
    sched, x = denoiser.schedule, check_start(x_T)
    t_start, t_end = ts[0].item(), ts[-1].item()
    denoise = bool(sched.sigma(ts[-1]) == 0)
    t_stop = t_eps if denoise else t_end
    if denoise and not t_end < t_eps < t_start:
        raise ValueError(f"t_eps must lie between the grid's ends {t_end} and {t_start}; got {t_eps}.")
    t = torch.full((x.shape[0],), t_start, dtype=torch.float64, device=x.device)
    h = torch.full_like(t, min(h_init, t_start - t_stop))
    x_prev, iterations, rejected = x, 0, 0
    if callback is not None:
        callback(0, t.clone(), x)
    bar = tqdm(total=t_start - t_stop, disable=not progress, desc="adaptive SDE")
    while (active := (t > t_stop).nonzero().squeeze(1)).numel():
        if iterations >= max_iterations:
            raise RuntimeError(
                f"adaptive SDE solver: {max_iterations} iterations without reaching t={t_stop}; "
                f"loosen eps_rel / eps_abs or raise max_iterations."
            )
        xa, ta, ha = x[active], t[active], h[active]
        z = noise_like(xa, generator)

        k1 = _reverse_sde_increment(denoiser, xa, ta, ha, z)
        x1 = xa + k1
        x2 = xa + (k1 + _reverse_sde_increment(denoiser, x1, ta - ha, ha, z)) / 2
        delta = (eps_rel * torch.maximum(x1.abs(), x_prev[active].abs())).clamp(min=eps_abs)
        err = ((x1 - x2) / delta).flatten(1).pow(2).mean(1).sqrt().to(torch.float64)
        accept = err <= 1
        t_new = torch.where(accept, torch.where(ha >= ta - t_stop, t_stop, ta - ha), ta)
        keep = accept.reshape(-1, *(1,) * (xa.ndim - 1))
        x, x_prev, t, h = x.clone(), x_prev.clone(), t.clone(), h.clone()
        x[active] = torch.where(keep, x2, xa)
        x_prev[active] = torch.where(keep, x1, x_prev[active])
        t[active] = t_new
        h[active] = torch.minimum(t_new - t_stop, theta * ha * err.pow(-r))
        iterations, rejected = iterations + 1, rejected + int((~accept).sum())
        bar.update(t_start - t.max().item() - bar.n)
        if callback is not None:
            callback(iterations, t.clone(), x)
    bar.close()
    if denoise:
        x = sched.alpha(ts[-1]).item() * denoiser.x0(x, torch.tensor(t_stop, dtype=x.dtype))
        if callback is not None:
            callback(iterations + 1, ts[-1], x)
    if info is not None:
        info.update(nfe=2 * iterations + int(denoise), iterations=iterations, rejected=rejected)
    return x


def ccdf_start(schedule: Schedule, x0_guess: torch.Tensor, t0, generator=None) -> torch.Tensor:
    """CCDF's shortcut (Chung et al. 2022): ``x_{t0} = alpha(t0) x0_guess + sigma(t0) eps``, a noised initial
    guess from which any sampler starts at ``t0 < 1``, e.g. on ``time_grid(sched, n, t_max=t0)``."""
    t0 = float(as_time(float(t0)))
    if t0 <= 0:
        raise ValueError(f"t0 must lie in (0, 1]; got {t0}.")
    noise = noise_like(x0_guess, generator)
    return q_sample(schedule, x0_guess, t0, noise)


class SamplerSpec(NamedTuple):
    """How to run a sampler: ``fn(denoiser, x_T, timesteps, **options)``; ``evals_per_step`` (``None``:
    adaptive); ``grid``, the :func:`time_grid` kind its paper uses."""

    fn: Callable
    options: dict
    evals_per_step: int | None
    grid: str


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(sample_ddim, {"eta": 0.0}, 1, "quadratic"),
    "ddim_eta1": SamplerSpec(sample_ddim, {"eta": 1.0}, 1, "uniform"),
    "euler": SamplerSpec(sample_euler, {}, 1, "edm"),
    "heun": SamplerSpec(sample_heun, {}, 2, "edm"),
    # Karras et al. (2022) Table 5's CIFAR-10 churn settings; S_noise > 1 offsets a trained network's
    # errors, which the exact oracle does not have, so it stays 1 here
    "heun_churn": SamplerSpec(sample_heun, {"s_churn": 30.0, "s_tmin": 0.01, "s_tmax": 1.0}, 2, "edm"),
    "dpm_solver_1": SamplerSpec(sample_dpm_solver, {"order": 1}, 1, "logsnr"),
    "dpm_solver_2": SamplerSpec(sample_dpm_solver, {"order": 2}, 2, "logsnr"),
    "dpm_solver_3": SamplerSpec(sample_dpm_solver, {"order": 3}, 3, "logsnr"),
    "dpm_solver_pp_2m": SamplerSpec(sample_dpm_solver_pp_2m, {}, 1, "logsnr"),
    "deis": SamplerSpec(sample_deis, {"order": 3}, 1, "quadratic"),
    "plms": SamplerSpec(sample_plms, {}, 1, "uniform"),
    "adaptive_sde": SamplerSpec(sample_adaptive_sde, {"eps_rel": 0.05, "eps_abs": 0.0078}, None, "uniform"),
}


def nfe(name: str, n_steps: int, *, to_zero: bool = True) -> int:
    """Network evaluations of ``SAMPLERS[name]`` on ``n_steps`` steps: ``k n_steps``, less ``k - 1`` if the
    grid ends where ``sigma = 0`` (``to_zero``), whose denoising step costs one evaluation."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.")
    if isinstance(n_steps, bool) or int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer; got {n_steps!r}.")
    k = SAMPLERS[name].evals_per_step
    if k is None:
        raise ValueError(f"{name!r} picks its own steps; pass info={{}} to it and read info['nfe'].")
    return k * n_steps - (k - 1 if to_zero else 0)
