"""Flow matching, rectified flow and stochastic interpolants: one more pair of curves ``alpha(t), sigma(t)``.

Flow matching (Lipman et al. 2023, "Flow matching for generative modeling") and rectified flow (Liu et
al. 2023, "Flow straight and fast") train a velocity field ``u(x, t)`` whose ODE ``dx/dt = u`` carries
noise to data. With the straight path ``x_t = (1 - t) x_0 + t eps`` (:class:`LinearPath`) that is a
Gaussian diffusion like every other of this book, so every sampler of :mod:`dmlib.samplers` runs on it,
and the exact oracle of :mod:`dmlib.oracle` gives its exact marginal velocity.

**Time convention (the trap users report).** This book puts the data at ``t = 0`` and the noise at
``t = 1``: ``x_t = alpha(t) x_0 + sigma(t) eps``. Flow-matching papers put the noise at 0 and the data
at 1 (Lipman et al. 2023 write ``psi_t(x) = (1 - (1 - sigma_min) t) x + t x_1`` with ``x_1`` the data;
Liu et al. 2023 write ``X_t = t X_1 + (1 - t) X_0`` with ``X_0`` the noise). To read their formulas
here, substitute ``t_paper = 1 - t``, swap the names of the two end points, and flip the velocity's
sign: ``v_paper(x, t_paper) = -u(x, 1 - t_paper)``; a model trained in their convention becomes one
of ours as ``lambda x, t: -model(x, 1 - t)``. Albergo et al. (2023) already put ``x_0`` at ``t = 0``.

**One symbol, one meaning.** ``v`` in :mod:`dmlib.parameterization` is Salimans & Ho's (2022)
``v = alpha eps - sigma x_0``, a prediction target. The flow-matching velocity is another thing: it is
called ``u`` here (a velocity field), ``u = dx_t/dt = alpha'(t) x_0 + sigma'(t) eps`` (Lipman et al.
2023, eq. 9's target; Liu et al. 2023, eq. 1's ``X_1 - X_0`` with the sign of our time). Given ``x_t``,
``u`` determines ``x_0`` and ``eps`` (:func:`velocity_to_x0_eps`) whenever the log-SNR decreases.

**Derivatives.** ``alpha'`` and ``sigma'`` are closed forms for :class:`LinearPath` (its
``derivatives`` method) and taken by autograd in float64 for any other schedule
(:func:`curve_derivatives`), as :meth:`dmlib.schedules.Schedule.drift_diffusion` does.

The marginal velocity ``u(x, t) = E[alpha' x_0 + sigma' eps | x_t = x]`` (Liu et al. 2023, eq. 2) is
the drift of the probability-flow ODE of the same path, ``f x - g^2 score / 2`` (Song et al. 2021,
eq. 13): a flow-matching model and a diffusion model with the same path are the same ODE (a test checks
it to 1e-10). Also here: reflow and a straightness measure (Liu et al. 2023, sec. 2.2), the minibatch
optimal-transport coupling of Tong et al. (2024, "Improving and generalizing flow-based generative models
with minibatch optimal transport"), and the stochastic interpolants of Albergo et al. (2023, "Stochastic
interpolants: a unifying framework for flows and diffusions", eq. 2.1 and Def. 2.1) as the general form.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from scipy.optimize import linear_sum_assignment

from .ddpm import check_timesteps, uniform_time
from .oracle import GaussianMixture, MixtureOracle, _diffused_stats
from .parameterization import Denoiser, _col, noise_like
from .samplers import SAMPLERS, time_grid
from .schedules import LOG_ABAR_MIN, Schedule, as_time

# alpha = 1 - t reaches 0 at t = 1, where samplers divide by alpha and the log-SNR is -inf. As the cosine
# schedule caps log abar at LOG_ABAR_MIN = -20, the path caps alpha at e^-10 ~ 4.5e-5 (log-SNR >= -20 at t = 1).
ALPHA_MIN = math.exp(LOG_ABAR_MIN / 2)
COUPLINGS = ("independent", "ot", "pairs")
# samplers that draw noise: their endpoint is not a function of the start, so they cannot make reflow pairs
# or trace the ODE's trajectories
STOCHASTIC_SAMPLERS = ("ddim_eta1", "heun_churn", "adaptive_sde")


class LinearPath(Schedule):
    """The straight path ``x_t = (1 - t) x_0 + (sigma_min + (1 - sigma_min) t) eps`` of flow matching.

    ``sigma_min = 0`` (the default) is the rectified-flow path (Liu et al. 2023, sec. 2.1; Lipman et al.
    2023 call it the conditional OT path); ``sigma_min > 0`` is Lipman et al.'s eq. 20 in our time
    (their ``sigma_t = 1 - (1 - sigma_min) t``), whose data end has ``sigma(0) = sigma_min`` like a VE
    schedule. ``alpha`` is floored at :data:`ALPHA_MIN` (only for ``t > 1 - 4.5e-5``), so the log-SNR is
    finite at ``t = 1`` and samplers that divide by ``alpha`` start there; the derivatives are those of
    the straight line, ``alpha' = -1`` and ``sigma' = 1 - sigma_min``. Registered as
    ``get_schedule("linear_path")`` (``"linear"`` is the VP schedule with linear ``beta``).
    """

    name = "linear_path"

    def __init__(self, sigma_min: float = 0.0):
        if not 0 <= sigma_min < 1:
            raise ValueError(f"sigma_min must lie in [0, 1) (Lipman et al. use 1e-4 or 0); got {sigma_min}.")
        self.sigma_min = sigma_min

    def alpha(self, t) -> torch.Tensor:
        return (1 - as_time(t)).clamp(min=ALPHA_MIN)

    def sigma(self, t) -> torch.Tensor:
        return self.sigma_min + (1 - self.sigma_min) * as_time(t)

    def derivatives(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha'(t), sigma'(t)) = (-1, 1 - sigma_min)``, closed form (the floor of ``alpha`` ignored)."""
        t = as_time(t)
        return -torch.ones_like(t), torch.full_like(t, 1 - self.sigma_min)

    def t_from_log_snr(self, log_snr, iterations: int = 60) -> torch.Tensor:
        """Closed-form inverse of ``lambda = 2 log(alpha / sigma)``: on the line, ``alpha / sigma = e^{lambda/2}``
        is linear in t; below the floor's log-SNR, ``sigma = ALPHA_MIN e^{-lambda/2}``. Values outside
        ``[lambda(1), lambda(0)]`` clamp to 1 and 0, as the bisection of the base class does."""
        lam = torch.as_tensor(log_snr, dtype=torch.float64)
        c, inv_r = 1 - self.sigma_min, (-lam / 2).exp()  # inv_r = sigma / alpha
        on_line = (inv_r - self.sigma_min) / (inv_r + c)  # 1 - t = (sigma_min + c t) / inv_r, solved for t
        on_floor = (ALPHA_MIN * inv_r - self.sigma_min) / c  # sigma = ALPHA_MIN inv_r
        floor_starts = self.log_snr(torch.tensor(1 - ALPHA_MIN, dtype=torch.float64))
        t = torch.where(lam < floor_starts, on_floor, on_line).clamp(0.0, 1.0)
        return t.to(log_snr.dtype) if torch.is_tensor(log_snr) else t


# ------------------------------------------------------------------------------------------------
# The velocity parameterization
# ------------------------------------------------------------------------------------------------


def _time_for(t, x: torch.Tensor) -> torch.Tensor:
    """``t`` checked to lie in [0, 1] (on the CPU) and to be a scalar or one time per sample of ``x``."""
    t = as_time(t, like=x)
    if t.ndim != 0 and t.shape != x.shape[:1]:
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},); got {tuple(t.shape)}.")
    return t


def _same_shape(a: torch.Tensor, b: torch.Tensor, names: str):
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}.")


def curve_derivatives(schedule: Schedule, t) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha'(t), sigma'(t))``: the schedule's closed form if it has one (``schedule.derivatives``, e.g.
    :class:`LinearPath`), else by autograd in float64 (where a schedule clamps a curve, e.g. VP's
    ``LOG_ABAR_MIN``, the derivative there is 0)."""
    t = as_time(t)
    if hasattr(schedule, "derivatives"):
        return schedule.derivatives(t)
    # samplers run under torch.no_grad(); without enable_grad every derivative would be 0
    with torch.enable_grad():
        t64 = t.to(torch.float64).detach().requires_grad_(True)
        curves = schedule.alpha(t64), schedule.sigma(t64)
        # a constant curve (VE's alpha = 1) carries no graph: its derivative is 0
        return tuple(
            torch.autograd.grad(c.sum(), t64, retain_graph=True)[0].detach()
            if c.requires_grad
            else torch.zeros_like(t64)
            for c in curves
        )


def velocity_from_x0_eps(schedule: Schedule, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """The conditional velocity ``u = dx_t/dt = alpha'(t) x_0 + sigma'(t) eps``: Lipman et al. (2023)
    eq. 9's target ``u_t(x | x_1)`` written for any path. On :class:`LinearPath` it is
    ``(1 - sigma_min) eps - x_0``, the negative of their eq. 23 target ``x_1 - (1 - sigma_min) x_0`` (data
    and noise named the other way, time reversed); with ``sigma_min = 0``, Liu et al. (2023) eq. 1's
    ``X_1 - X_0``, negated."""
    _same_shape(x0, eps, "x0 and eps")
    t = _time_for(t, x0)
    d_alpha, d_sigma = curve_derivatives(schedule, t)
    return _col(d_alpha, x0) * x0 + _col(d_sigma, x0) * eps


def velocity_to_x0_eps(schedule: Schedule, u: torch.Tensor, x_t: torch.Tensor, t):
    """``(x_0, eps)`` from a velocity ``u`` at ``x_t``: the 2x2 system ``x_t = alpha x_0 + sigma eps``,
    ``u = alpha' x_0 + sigma' eps`` solved,

        x_0 = (sigma' x_t - sigma u) / det,   eps = (alpha u - alpha' x_t) / det,
        det = alpha sigma' - sigma alpha' = -alpha sigma lambda'(t) / 2,

    which is positive wherever the log-SNR ``lambda`` decreases. On :class:`LinearPath` with
    ``sigma_min = 0``, ``det = alpha + sigma = 1`` on the line: ``x_0 = x_t - t u`` and
    ``eps = x_t + (1 - t) u``, well conditioned at both ends (``det = 1 + e^-10`` under the floor at t = 1)."""
    _same_shape(u, x_t, "the velocity u and x_t")
    t = _time_for(t, x_t)
    a, s = _col(schedule.alpha(t), x_t), _col(schedule.sigma(t), x_t)
    d_alpha, d_sigma = (_col(d, x_t) for d in curve_derivatives(schedule, t))
    det = a * d_sigma - s * d_alpha
    return (d_sigma * x_t - s * u) / det, (a * u - d_alpha * x_t) / det


def velocity_to_score(schedule: Schedule, u: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
    """``grad log q_t(x_t) = -E[eps | x_t] / sigma(t)`` (Tweedie) with ``eps`` from :func:`velocity_to_x0_eps`;
    infinite where ``sigma = 0``."""
    t = _time_for(t, x_t)
    return -velocity_to_x0_eps(schedule, u, x_t, t)[1] / _col(schedule.sigma(t), x_t)


def denoiser_velocity(denoiser: Denoiser, x_t: torch.Tensor, t) -> torch.Tensor:
    """The velocity any :class:`~dmlib.parameterization.Denoiser` implies, ``u = alpha' x0_hat + sigma' eps_hat``:
    the probability-flow ODE's drift (a NaN where ``sigma = 0`` for an x0 model, whose ``eps_hat`` is
    undefined there)."""
    t = _time_for(t, x_t)
    x0, eps = denoiser.x0_eps(x_t, t)
    return velocity_from_x0_eps(denoiser.schedule, x0, eps, t)


def velocity_denoiser(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], path: Schedule
) -> Denoiser:
    """A :class:`~dmlib.parameterization.Denoiser` for a velocity model ``model(x_t, t) -> u``, so every
    sampler runs it. It is an x0 model (``x_0`` by :func:`velocity_to_x0_eps`): on the linear path
    ``x_0 = x_t - t u`` stays well conditioned at ``t = 1``, where samplers start and ``alpha`` is tiny
    (an eps model would divide by ``alpha``)."""

    def x0_model(x_t, t):
        u = model(x_t, t)
        if not torch.is_tensor(u) or u.shape != x_t.shape:
            got = tuple(u.shape) if torch.is_tensor(u) else type(u).__name__
            raise ValueError(f"the velocity model must return u of x's shape {tuple(x_t.shape)}; got {got}.")
        return velocity_to_x0_eps(path, u, x_t, t)[0]

    return Denoiser(x0_model, path, prediction="x0")


def marginal_velocity(oracle: MixtureOracle, x: torch.Tensor, t) -> torch.Tensor:
    """The exact marginal velocity of a Gaussian mixture on the oracle's path (Liu et al. 2023, eq. 2):

        u(x, t) = alpha'(t) E[x_0 | x_t = x] + sigma'(t) E[eps | x_t = x],  E[eps | x_t] = -sigma score,

    the minimizer of :func:`cfm_loss` with the independent coupling (Lipman et al. 2023, Theorem 2).
    Tweedie's ``E[eps | x_t] = -sigma score`` keeps it finite at ``sigma = 0`` (the data score of a mixture
    is finite), so it is defined on all of [0, 1]."""
    t = _time_for(t, x)
    t = t.reshape(1) if t.ndim == 0 else t
    path = oracle.schedule
    sigma = path.sigma(t)
    stats = _diffused_stats(oracle.mixture, x, path.alpha(t), sigma)
    d_alpha, d_sigma = curve_derivatives(path, t)
    return _col(d_alpha, x) * stats["x0"] - _col(d_sigma * sigma, x) * stats["score"]


# ------------------------------------------------------------------------------------------------
# Training: the conditional flow-matching loss and its couplings
# ------------------------------------------------------------------------------------------------


def ot_coupling(x0: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minibatch optimal-transport coupling (Tong et al. 2024, sec. 3.2.3, OT-CFM): re-pair ``eps`` with
    ``x0`` by the permutation that minimizes ``sum_i ||x0_i - eps_perm(i)||^2``. For equal batches with
    equal weights the optimal plan is a permutation (Birkhoff), found exactly by the Hungarian-type
    solver ``scipy.optimize.linear_sum_assignment``. Returns ``(x0, eps[perm])``.

    On the CPU by design: the distances go to the CPU in float64 and only the permutation comes back to
    the input's device (an O(B^3) solve, negligible for minibatches of a few hundred). Pairs ignore any
    labels: for a conditional model, couple within each class, or the coupling mixes classes.
    """
    _same_shape(x0, eps, "x0 and eps (a coupling pairs two batches of equal size)")
    if x0.ndim < 2:
        raise ValueError(f"x0 and eps must have shape (B, ...) with a batch axis; got {tuple(x0.shape)}.")
    a, b = x0.detach().flatten(1).cpu().double(), eps.detach().flatten(1).cpu().double()
    # exact distances, not |a|^2 - 2 a.b + |b|^2, whose rounding could break near-ties the wrong way
    cost = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    _, cols = linear_sum_assignment(cost.numpy())
    return x0, eps[torch.as_tensor(cols, device=eps.device)]


def cfm_loss(path: Schedule, coupling=None) -> Callable:
    """The conditional flow-matching loss (Lipman et al. 2023, eq. 9; Liu et al. 2023, eq. 1) as
    ``loss(model, batch, generator=None)`` for :func:`dmlib.train.train`:

        E_{t ~ U(0, 1], (x_0, eps) ~ coupling} || model(x_t, t) - (alpha'(t) x_0 + sigma'(t) eps) ||^2

    with ``x_t = alpha(t) x_0 + sigma(t) eps`` and the mean over every coordinate (as
    :func:`dmlib.ddpm.simple_loss`). ``coupling``: ``None`` or ``"independent"`` (fresh noise per
    sample), ``"ot"`` (:func:`ot_coupling` within the minibatch; CPU, so not on an accelerator's data
    path), ``"pairs"`` (each row of the batch is a stacked pair ``(x_0, eps)``, shape ``(B, 2, ...)``,
    e.g. ``torch.stack(reflow_pairs(...), 1)``: reflow), or a callable ``(x0, eps) -> (x0, eps)``.
    With the independent coupling its minimizer is :func:`marginal_velocity` (Lipman et al. 2023,
    Theorem 2: the CFM and FM losses differ by a constant).
    """
    if coupling is None:
        coupling = "independent"
    if not callable(coupling) and coupling not in COUPLINGS:
        raise ValueError(
            f"unknown coupling {coupling!r}; choose one of {', '.join(COUPLINGS)} or a callable."
        )

    def loss(model: Callable, batch: torch.Tensor, generator=None) -> torch.Tensor:
        if coupling == "pairs":
            if batch.ndim < 3 or batch.shape[1] != 2:
                raise ValueError(
                    f"coupling='pairs' needs batches of stacked pairs, shape (B, 2, ...); got "
                    f"{tuple(batch.shape)}. Build them with torch.stack(reflow_pairs(...), 1)."
                )
            x0, eps = batch[:, 0], batch[:, 1]
        else:
            x0, eps = batch, noise_like(batch, generator)
            if coupling == "ot":
                x0, eps = ot_coupling(x0, eps)
            elif callable(coupling):
                x0, eps = coupling(x0, eps)
                _same_shape(x0, eps, "the coupling's x0 and eps")
        t = uniform_time(x0, generator)
        x_t = _col(path.alpha(t), x0) * x0 + _col(path.sigma(t), x0) * eps
        return torch.mean((model(x_t, t) - velocity_from_x0_eps(path, x0, eps, t)) ** 2)

    return loss


# ------------------------------------------------------------------------------------------------
# Rectified flow: reflow and straightness
# ------------------------------------------------------------------------------------------------


def _ode_sampler(sampler: str):
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    if sampler in STOCHASTIC_SAMPLERS:
        raise ValueError(
            f"sampler {sampler!r} draws noise; reflow and straightness follow the ODE: use a deterministic "
            f"one ({', '.join(s for s in SAMPLERS if s not in STOCHASTIC_SAMPLERS)})."
        )
    return SAMPLERS[sampler]


@torch.no_grad()
def reflow_pairs(
    denoiser: Denoiser, noise: torch.Tensor, *, sampler: str = "plms", n_steps: int = 20, progress=False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reflow's coupling (Liu et al. 2023, sec. 2.2, "Reflow"): ``(x_0, eps)`` pairs with ``x_0`` the
    endpoint of the model's ODE from ``eps = noise`` at ``t = 1``, on ``n_steps`` of the sampler's own
    time grid. Training :func:`cfm_loss` with ``coupling="pairs"`` on them gives the next rectified
    flow, whose paths are straighter (their sec. 3.3): :func:`straightness` measures it."""
    spec = _ode_sampler(sampler)
    ts = time_grid(denoiser.schedule, n_steps, spec.grid)
    return spec.fn(denoiser, noise, ts, **spec.options, progress=progress), noise


@torch.no_grad()
def straightness(
    denoiser: Denoiser, noise: torch.Tensor, timesteps, *, sampler: str = "plms"
) -> torch.Tensor:
    """Straightness of the model's ODE flow (Liu et al. 2023, sec. 2.2), in our time:

        S(Z) = int_0^1 E || (Z_1 - Z_0) - u(Z_t, t) ||^2 dt,

    ``Z`` the ODE's trajectory from ``Z_1 = noise`` (``sampler`` on ``timesteps``, which must run from
    1 to 0), ``u`` the velocity the denoiser implies (:func:`denoiser_velocity`). ``S = 0`` exactly for
    straight paths, which one Euler step solves. The integral is the trapezoid rule on the grid; where
    ``sigma = 0`` (the data end of a VP or the linear path) ``u`` of an x0 model is undefined, and the
    last interval takes the value at its other end. Returns a 0-dim tensor on the noise's device.
    """
    spec = _ode_sampler(sampler)
    ts = check_timesteps(timesteps)
    if ts[0] != 1 or ts[-1] != 0:
        raise ValueError(
            f"straightness integrates over [0, 1]: timesteps must run from 1 to 0; got "
            f"{ts[0].item():g} to {ts[-1].item():g}."
        )
    states = []
    spec.fn(denoiser, noise, ts, **spec.options, callback=lambda i, t, x: states.append(x))
    displacement = states[0] - states[-1]  # Z_1 - Z_0
    defined = (denoiser.schedule.sigma(ts.to(torch.float64)) > 0).tolist()
    values = [
        ((displacement - denoiser_velocity(denoiser, x, t.to(x.dtype))) ** 2).flatten(1).sum(1).mean()
        if ok
        else None
        for x, t, ok in zip(states, ts, defined)
    ]
    total = torch.zeros((), dtype=torch.float64, device=noise.device)
    for i in range(len(ts) - 1):
        ends = [v for v in (values[i], values[i + 1]) if v is not None]
        total = total + (ts[i] - ts[i + 1]).item() * sum(ends) / len(ends)
    return total


# ------------------------------------------------------------------------------------------------
# The 1D monotone map
# ------------------------------------------------------------------------------------------------


def _check_1d(mixture: GaussianMixture):
    if mixture.dim != 1:
        raise ValueError(f"the monotone map is for 1D mixtures; got a mixture in {mixture.dim} dimensions.")


def mixture_cdf_1d(mixture: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """The CDF ``F(x) = sum_k w_k Phi((x - mu_k) / s_k)`` of a 1D mixture, elementwise, in float64."""
    _check_1d(mixture)
    x = torch.as_tensor(x, dtype=torch.float64)
    mu, s, w = (
        v.to(x.device, torch.float64)
        for v in (mixture.means[:, 0], mixture.covs[:, 0, 0].sqrt(), mixture.weights)
    )
    return (w * torch.special.ndtr((x[..., None] - mu) / s)).sum(-1)


def monotone_map_1d(mixture: GaussianMixture, z: torch.Tensor, iterations: int = 100) -> torch.Tensor:
    """``T(z) = F^{-1}(Phi(z))``: the increasing map that pushes ``N(0, 1)`` to the 1D mixture (the optimal
    transport map in 1D; e.g. Villani 2003, Theorem 2.18), ``F^{-1}`` by bisection in float64. In 1D the
    probability-flow ODE of any path with ``q_1 = N(0, 1)`` (e.g. :class:`LinearPath`), run from ``z`` at
    ``t = 1`` to ``t = 0``, is this map (a test checks it): an ODE flow in 1D keeps order, and the one
    increasing map that pushes ``N(0, 1)`` to the data is ``T``."""
    _check_1d(mixture)
    z = torch.as_tensor(z, dtype=torch.float64)
    target = torch.special.ndtr(z)
    mu, s = (
        mixture.means[:, 0].to(z.device, torch.float64),
        mixture.covs[:, 0, 0].sqrt().to(z.device, torch.float64),
    )
    # every component's CDF is above Phi(z) at hi and below it at lo, so the root lies between
    reach = (z.abs().max() + 1) * s.max()
    lo, hi = torch.full_like(z, 1.0) * (mu.min() - reach), torch.full_like(z, 1.0) * (mu.max() + reach)
    for _ in range(iterations):  # 100 halvings: below float64 resolution for any bracket here
        mid = (lo + hi) / 2
        below = mixture_cdf_1d(mixture, mid) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


# ------------------------------------------------------------------------------------------------
# Stochastic interpolants
# ------------------------------------------------------------------------------------------------


class StochasticInterpolant:
    """``x_t = alpha(t) x_0 + beta(t) x_1 + gamma(t) z``, ``z ~ N(0, I)`` (Albergo et al. 2023, eq. 2.1 with
    their spatially linear ``I(t, x_0, x_1) = alpha x_0 + beta x_1``; Def. 2.1): a bridge between any two
    laws, ``x_0`` at ``t = 0`` and ``x_1`` at ``t = 1`` (the book's and their convention alike).

    ``alpha, beta, gamma`` are callables of a float64 time tensor. Def. 2.1's boundary conditions are
    checked to ``atol``: ``alpha(0) = beta(1) = 1``, ``alpha(1) = beta(0) = 0``, ``gamma(0) = gamma(1) = 0``
    and ``gamma >= 0`` (``gamma = 0`` gives the deterministic interpolants of rectified flow and flow
    matching). The default ``atol = 1e-4`` lets through the floors of this library's paths
    (``alpha(1) = e^-10`` on :class:`LinearPath`). Special cases:

    * the linear path: ``alpha = 1 - t``, ``beta = t``, ``gamma = 0`` with ``x_1 = eps`` (:meth:`linear`);
    * a diffusion ``x_t = alpha x_0 + sigma eps`` is ``beta = sigma``, ``gamma = 0``, ``x_1 = eps``
      (:meth:`from_schedule`), which satisfies Def. 2.1 only if ``alpha(1) = 0`` and ``sigma(1) = 1``:
      VP schedules end at ``alpha(1) > 0`` and VE ones at ``sigma(1) >> 1``;
    * conversely, with Gaussian ``x_1`` independent of ``x_0``, ``beta x_1 + gamma z`` is one Gaussian:
      the interpolant is the diffusion ``alpha, sqrt(beta^2 + gamma^2)`` (:meth:`gaussian_schedule`).
    """

    def __init__(self, alpha: Callable, beta: Callable, gamma: Callable | None = None, *, atol: float = 1e-4):
        self.alpha, self.beta = alpha, beta
        self.gamma = gamma if gamma is not None else torch.zeros_like
        ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
        a, b, g = (torch.as_tensor(f(ends), dtype=torch.float64) for f in (self.alpha, self.beta, self.gamma))
        for name, value, want in [
            ("alpha(0)", a[0], 1),
            ("alpha(1)", a[1], 0),
            ("beta(0)", b[0], 0),
            ("beta(1)", b[1], 1),
            ("gamma(0)", g[0], 0),
            ("gamma(1)", g[1], 0),
        ]:
            if not abs(value.item() - want) <= atol:
                raise ValueError(
                    f"a stochastic interpolant needs {name} = {want} (Albergo et al. 2023, Def. 2.1: x_t = x_0 "
                    f"at t = 0 and x_1 at t = 1); got {value.item():g}."
                )
        interior = self.gamma(torch.linspace(0, 1, 101, dtype=torch.float64))
        if not (torch.isfinite(interior).all() and (interior >= 0).all()):
            raise ValueError("gamma(t) must be finite and >= 0 on [0, 1] (it scales the latent noise z).")

    @classmethod
    def linear(cls) -> StochasticInterpolant:
        """``x_t = (1 - t) x_0 + t x_1``: with ``x_1 = eps``, :class:`LinearPath` (rectified flow)."""
        return cls(lambda t: 1 - t, lambda t: t)

    @classmethod
    def from_schedule(cls, schedule: Schedule, *, atol: float = 1e-4) -> StochasticInterpolant:
        """A diffusion as an interpolant: ``alpha = schedule.alpha``, ``beta = schedule.sigma``, ``gamma = 0``,
        ``x_1 = eps``; refused (naming the end that fails) if it does not reach pure noise at ``t = 1``."""
        return cls(schedule.alpha, schedule.sigma, atol=atol)

    def _coefficients(self, t, x: torch.Tensor):
        t = _time_for(t, x).to(torch.float64)
        return (_col(f(t), x) for f in (self.alpha, self.beta, self.gamma))

    def sample(self, x0: torch.Tensor, x1: torch.Tensor, t, z: torch.Tensor | None = None, generator=None):
        """``x_t = alpha(t) x_0 + beta(t) x_1 + gamma(t) z`` (eq. 2.1), ``z`` drawn if not given."""
        _same_shape(x0, x1, "x0 and x1")
        z = noise_like(x0, generator) if z is None else z
        _same_shape(x0, z, "x0 and z")
        a, b, g = self._coefficients(t, x0)
        return a * x0 + b * x1 + g * z

    def velocity(self, x0: torch.Tensor, x1: torch.Tensor, z: torch.Tensor, t) -> torch.Tensor:
        """``d x_t / dt = alpha' x_0 + beta' x_1 + gamma' z`` (autograd, float64), whose conditional mean
        given ``x_t`` is the interpolant's velocity field (with ``gamma = 0`` and ``x_1 = eps``,
        :func:`velocity_from_x0_eps`). ``gamma'`` is infinite at the ends for ``gamma = sqrt(2t(1-t))``."""
        _same_shape(x0, x1, "x0 and x1")
        _same_shape(x0, z, "x0 and z")
        t = _time_for(t, x0).to(torch.float64)
        with torch.enable_grad():
            t = t.detach().requires_grad_(True)
            curves = [f(t) for f in (self.alpha, self.beta, self.gamma)]
            # a curve without a graph (gamma = 0) is constant: its derivative is 0
            ds = [
                torch.autograd.grad(c.sum(), t)[0] if c.requires_grad else torch.zeros_like(t) for c in curves
            ]
        return sum(_col(d, x0) * v for d, v in zip(ds, (x0, x1, z)))

    def gaussian_schedule(self) -> Schedule:
        """The diffusion this interpolant is when ``x_1 ~ N(0, I)`` is independent of ``x_0``:
        ``alpha(t)`` and ``sigma(t) = sqrt(beta^2 + gamma^2)``. ``alpha`` is floored at :data:`ALPHA_MIN`
        as on :class:`LinearPath`: samplers that step in ``sigma / alpha`` start at ``t = 1``. Derivatives
        of this schedule are taken by autograd: write ``gamma`` without a square root that is infinitely
        steep at an end (e.g. ``gamma = t(1 - t)``, not ``sqrt(2t(1 - t))``), or ``sigma'`` is NaN there."""
        return _InterpolantSchedule(self)


class _InterpolantSchedule(Schedule):
    name = "interpolant"

    def __init__(self, interpolant: StochasticInterpolant):
        self.interpolant = interpolant

    def alpha(self, t):
        return self.interpolant.alpha(as_time(t)).clamp(min=ALPHA_MIN)

    def sigma(self, t):
        t = as_time(t)
        return (self.interpolant.beta(t) ** 2 + self.interpolant.gamma(t) ** 2).sqrt()
