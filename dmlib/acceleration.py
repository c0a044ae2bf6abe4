"""Learning-based acceleration (Chapter 3; survey 000 sec. 3.2, survey 002 sec. 5.2): instead of a
better ODE solver, *choose* or *learn* a short sampling chain.

* Dynamic programming (Watson et al. 2021): the variational bound splits into one term per jump, so
  the k-step sub-path of a grid with the best bound is a shortest-path problem (survey 000, eq. 31-32).
* Truncation / early stopping (Zheng et al. 2022, TDPM; Lyu et al. 2022, ES-DDPM): start the reverse
  chain at ``t_trunc < 1`` from a fitted prior for ``q_{t_trunc}`` instead of from noise at ``t = 1``.
* Progressive distillation (Salimans & Ho 2022, Algorithm 2): a student learns to do in one DDIM step
  what its teacher does in two; the student becomes the next teacher.
* Consistency distillation (Song et al. 2023, Algorithm 2): a network learns the map from any point
  of a probability-flow ODE trajectory to its end, and samples in one step.

Samplers here keep the signature of :mod:`dmlib.samplers`; teachers are :class:`Denoiser` views, so
the exact oracle of a Gaussian mixture can stand in for a trained network.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from numbers import Real
from typing import NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from .ddpm import _posterior_coefficients, check_timesteps, gaussian_kl, gaussian_nll, q_sample
from .parameterization import Denoiser, _col, noise_like
from .samplers import ddim_step, sample_ddim, time_grid
from .schedules import Schedule, as_time
from .train import TrainConfig, train

# ---------------------------------------------------------------------------------------------
# Dynamic programming over the variational bound (Watson et al. 2021)
# ---------------------------------------------------------------------------------------------


class StepCosts(NamedTuple):
    """Per-jump terms of the bound on an increasing ``grid`` (``grid[0] = 0``), in nats per sample.

    ``jump[i, j]`` (``j < i``) is ``L(grid[i], grid[j])`` of survey 000 eq. 32; ``+inf`` where ``j >= i``.
    ``prior`` is ``KL(q(x_{grid[-1]} | x_0) || N(0, I))``, shared by every path that starts at ``grid[-1]``.
    """

    grid: torch.Tensor
    jump: torch.Tensor
    prior: float


def _check_increasing(grid) -> torch.Tensor:
    g = as_time(grid).to(torch.float64)
    if g.ndim != 1 or g.numel() < 2 or g[0] != 0 or not (g[1:] > g[:-1]).all():
        raise ValueError(
            "grid must be a 1-D, strictly increasing tensor of times starting at 0 "
            f"(e.g. torch.arange(T + 1) / T); got {g.tolist() if g.numel() < 12 else tuple(g.shape)}."
        )
    return g


def vlb_step_costs(
    denoiser: Denoiser, x0: torch.Tensor, grid, *, variance: str = "betatilde", generator=None
) -> StepCosts:
    """Monte Carlo estimates of every jump term ``L(t, s)``, ``s < t`` on ``grid`` (Watson et al. 2021,
    eq. 5; survey 000 eq. 32), averaged over the data ``x0``.

    ``L(t, s) = E KL(q(x_s | x_t, x_0) || p(x_s | x_t))`` for ``s > 0``, where ``p`` is the posterior at
    ``x0_hat(x_t, t)`` with variance ``betatilde_{t|s}`` or ``beta_{t|s}`` (any pair ``s < t``, not only
    neighbours: Kingma et al. 2021, eq. 29-31). The two means differ by ``coef_x0 (x_0 - x0_hat)``, so
    one denoiser call per ``t`` serves every ``s``: N calls for the N^2 / 2 terms. ``L(t, 0)`` is the
    decoder ``-log N(x_0; x0_hat, beta_{t|0})`` (variance ``beta`` as in :func:`dmlib.ddpm.vlb_terms`).
    Noise is drawn in the order of ``vlb_terms``, so with the same seed the full path's bound is exactly
    that function's sum. ``jump`` is computed on ``x0``'s device and stays there.
    """
    if variance not in ("betatilde", "beta"):
        raise ValueError(f"variance must be 'betatilde' or 'beta'; got {variance!r}.")
    sched, g = denoiser.schedule, _check_increasing(grid)
    if sched.sigma(g[0]) > 0:
        raise ValueError(f"the decoder term needs sigma(0) = 0 (data at t = 0); {sched!r} has sigma(0) > 0.")
    n, dim = g.numel() - 1, x0[0].numel()
    jump = torch.full((n + 1, n + 1), math.inf, dtype=torch.float64, device=x0.device)
    for i in range(1, n + 1):
        t = g[i]
        noise = noise_like(x0, generator)
        x_t = q_sample(sched, x0, t.to(x0.dtype), noise)
        x0_hat = denoiser.x0(x_t, t.to(x0.dtype))
        # one entry per s < t, computed on the (CPU) grid and moved next to the data
        coef_x0, coef_xt, var_q = (c.to(x0.device) for c in _posterior_coefficients(sched, t, g[:i]))
        mean_p0 = _col(coef_x0[0], x0) * x0_hat + _col(coef_xt[0], x_t) * x_t
        jump[i, 0] = gaussian_nll(x0, mean_p0, sched.transition(t, g[0])[1].to(x0.dtype)).double().mean()
        if i > 1:
            var_q = var_q[1:]
            var_p = var_q if variance == "betatilde" else sched.transition(t, g[1:i])[1].to(x0.device)
            err2 = ((x0 - x0_hat) ** 2).flatten(1).sum(1).double().mean()  # the KL is linear in it
            log_ratio_terms = 0.5 * dim * (torch.log(var_p / var_q) + var_q / var_p - 1)
            jump[i, 1:i] = log_ratio_terms + coef_x0[1:] ** 2 * err2 / (2 * var_p)
    a, s = sched.alpha(g[-1]).to(x0.dtype), sched.sigma(g[-1]).to(x0.dtype)
    prior = gaussian_kl(a * x0, s**2, torch.zeros_like(x0), 1.0).double().mean().item()
    return StepCosts(g, jump, prior)


def optimal_subsequence(costs: StepCosts, k: int) -> tuple[torch.Tensor, float]:
    """The k-jump path ``grid[-1] = tau_0 > ... > tau_k = 0`` with the smallest bound (Watson et al.
    2021, sec. 3): ``best_m[j] = min_i best_{m-1}[i] + L(grid[i], grid[j])``, one (N+1)^2 tensor
    minimum per m, so O(k N^2). Returns ``(times, bound)``, times decreasing (a sampler's timesteps).

    The ELBO-optimal path need not sample best: Watson et al. found it can even lower FID-quality,
    which led them to optimise sample quality directly (Watson et al. 2022, GGDM).
    """
    n = costs.grid.numel() - 1
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= n:
        raise ValueError(f"k must be an integer number of jumps in [1, {n}] (the grid's steps); got {k!r}.")
    best = torch.full((n + 1,), math.inf, dtype=torch.float64, device=costs.jump.device)
    best[n] = 0.0
    back = []
    for _ in range(int(k)):
        best, arg = (best[:, None] + costs.jump).min(0)  # rows: where the jump starts; columns: where it ends
        back.append(arg)
    idx = [0]
    for arg in reversed(back):  # follow the predecessors from t = 0 back to grid[-1]
        idx.append(int(arg[idx[-1]]))
    return costs.grid[idx[::-1]], best[0].item() + costs.prior


def path_bound(costs: StepCosts, path) -> float:
    """The bound (nats per sample) of a path of grid times from ``grid[-1]`` down to 0 (survey 000 eq. 31)."""
    p = check_timesteps(path).to(torch.float64)
    idx = torch.searchsorted(costs.grid, p).clamp(max=costs.grid.numel() - 1)
    on_grid = torch.allclose(costs.grid[idx], p, rtol=0, atol=1e-12)
    if not on_grid or idx[0] != costs.grid.numel() - 1 or idx[-1] != 0:
        raise ValueError("path must run over grid times from the grid's last time down to 0.")
    return costs.jump[idx[:-1], idx[1:]].sum().item() + costs.prior


# ---------------------------------------------------------------------------------------------
# Truncated diffusion / early stopping (Zheng et al. 2022; Lyu et al. 2022)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GaussianPrior:
    """``N(mean, cov)`` over flattened samples, standing in for ``q_t`` at time ``t``."""

    mean: torch.Tensor
    cov: torch.Tensor
    t: float

    def sample(self, n: int, generator=None, dtype=torch.float32) -> torch.Tensor:
        """``n`` samples, drawn on the prior's device."""
        z = torch.randn(
            n, self.mean.numel(), generator=generator, dtype=torch.float64, device=self.mean.device
        )
        return (self.mean + z @ torch.linalg.cholesky(self.cov).T).to(dtype)


def fit_gaussian_prior(schedule: Schedule, data: torch.Tensor, t_trunc: float) -> GaussianPrior:
    """The moment-matched Gaussian for ``q_{t_trunc}``: ``x_t = alpha x_0 + sigma eps`` has mean
    ``alpha E[x_0]`` and covariance ``alpha^2 Cov[x_0] + sigma^2 I``, here with the data's sample moments
    (exact in the noise, so no noise is drawn).

    TDPM and ES-DDPM fit a GAN or a VAE (or reuse a pretrained model) to ``q_{t_trunc}``; a Gaussian is
    the simplest such prior, and ``t_trunc -> 1`` makes it exact since ``q_1 ~ N(0, I)``.
    """
    t = float(as_time(float(t_trunc)))
    if t <= 0:
        raise ValueError(f"t_trunc must lie in (0, 1]; got {t_trunc}.")
    x = data.flatten(1).to(torch.float64)
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 data samples for a covariance; got {x.shape[0]}.")
    tt = torch.tensor(t, dtype=torch.float64)
    a, s, d = schedule.alpha(tt), schedule.sigma(tt), x.shape[1]
    cov = a**2 * torch.cov(x.T).reshape(d, d) + s**2 * torch.eye(d, dtype=torch.float64, device=x.device)
    return GaussianPrior(a * x.mean(0), cov, t)


def sample_truncated(
    denoiser: Denoiser,
    prior: GaussianPrior,
    shape: tuple[int, ...],
    timesteps,
    *,
    sampler: Callable = sample_ddim,
    generator=None,
    **options,
) -> torch.Tensor:
    """Draw ``x_{t_trunc}`` from ``prior`` (shape ``shape``), then run ``sampler`` from ``t_trunc``:
    ``timesteps[0]`` must be ``prior.t``, e.g. ``time_grid(schedule, n, t_max=prior.t)``."""
    ts = check_timesteps(timesteps)
    if abs(ts[0].item() - prior.t) > 1e-9:
        raise ValueError(f"timesteps must start at the prior's time {prior.t}; got {ts[0].item()}.")
    if math.prod(shape[1:]) != prior.mean.numel():
        raise ValueError(f"shape {shape} does not hold samples of the prior's {prior.mean.numel()} numbers.")
    x = prior.sample(shape[0], generator).reshape(shape)
    return sampler(denoiser, x, ts, generator=generator, **options)


# ---------------------------------------------------------------------------------------------
# Progressive distillation (Salimans & Ho 2022)
# ---------------------------------------------------------------------------------------------


def distillation_target(teacher: Denoiser, x_t, t, t_mid, s) -> torch.Tensor:
    """The student's x0 target (Salimans & Ho 2022, Algorithm 2): two teacher DDIM steps
    ``t -> t_mid -> s`` give ``x_s``; the ``x~`` whose single DDIM step ``t -> s`` lands there is
    ``x~ = (x_s - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)``."""
    sched = teacher.schedule
    t, s = as_time(t, like=x_t), as_time(s, like=x_t)
    x_s = ddim_step(teacher, ddim_step(teacher, x_t, t, t_mid), t_mid, s)
    ratio = sched.sigma(s) / sched.sigma(t)  # alpha_s - ratio alpha_t > 0: the log-SNR falls from s to t
    return (x_s - _col(ratio, x_t) * x_t) / _col(sched.alpha(s) - ratio * sched.alpha(t), x_t)


def _nested_grids(schedule: Schedule, n_student_steps: int, kind: str):
    """The student's grid and the teacher's midpoints: the 2N-step grid must contain the N-step one."""
    fine = time_grid(schedule, 2 * n_student_steps, kind)
    coarse = time_grid(schedule, n_student_steps, kind)
    if not torch.allclose(fine[::2], coarse, rtol=0, atol=1e-9):
        raise ValueError(
            f"the {kind!r} grid of {2 * n_student_steps} steps misses the {n_student_steps}-step one."
        )
    return coarse, fine[1::2]


def progressive_distillation_loss(
    teacher: Denoiser, n_student_steps: int, *, prediction: str = "v", grid: str = "uniform"
) -> Callable:
    """Algorithm 2 of Salimans & Ho (2022), as a loss function ``loss(model, x0, generator=None)`` of
    the student network (read through ``Denoiser(model, teacher.schedule, prediction)``) for
    :func:`dmlib.train.train`: ``t = grid[i]`` on the student's N-step grid, ``x_t ~ q``, and
    ``max(SNR_t, 1) ||x~ - x0_hat||^2``, the "truncated SNR" weighting of their sec. 4 (equal to
    ``max(||x0 - x0_hat||^2, ||eps - eps_hat||^2)``): without the floor the weight vanishes at t = 1,
    where a one-step student must do the most work."""
    ts, mids = _nested_grids(teacher.schedule, n_student_steps, grid)
    Denoiser(None, teacher.schedule, prediction)  # a clear error for an unknown prediction, now

    def loss(model, x0: torch.Tensor, generator=None) -> torch.Tensor:
        student = Denoiser(model, teacher.schedule, prediction)
        i = torch.randint(0, n_student_steps, (x0.shape[0],), generator=generator, device=x0.device)
        t, t_mid, s = (v.to(x0.device)[i].to(x0.dtype) for v in (ts[:-1], mids, ts[1:]))
        noise = noise_like(x0, generator)
        x_t = q_sample(teacher.schedule, x0, t, noise)
        with torch.no_grad():
            target = distillation_target(teacher, x_t, t, t_mid, s)
        weight = teacher.schedule.snr(t).clamp(min=1.0)
        return (_col(weight, x0) * (student.x0(x_t, t) - target) ** 2).flatten(1).sum(1).mean()

    return loss


class DistillRound(NamedTuple):
    n_steps: int  # the student's number of DDIM steps
    model: nn.Module
    losses: torch.Tensor
    seconds: float


def distill(
    teacher: Denoiser,
    student_model: nn.Module,
    data: torch.Tensor,
    *,
    n_teacher_steps: int,
    rounds: int,
    steps_per_round: int | Sequence[int],
    prediction: str = "v",
    grid: str = "uniform",
    config: TrainConfig | None = None,
) -> list[DistillRound]:
    """``rounds`` halvings ``N -> N/2 -> ...`` with :func:`dmlib.train.train`; each round's student (its
    EMA weights) is the next teacher and the next student's initialisation, as in Algorithm 2 (there
    the first student copies the teacher; here ``student_model`` may be a copy or a fresh network, so an
    oracle can teach). ``prediction="v"`` follows the paper: eps-prediction fails at low SNR.
    ``steps_per_round`` is one number or one per round: a fresh student needs most steps in its first
    round, and each later student starts from a network that already does nearly the right thing.
    """
    if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be a positive integer; got {rounds!r}.")
    per_round = (
        [steps_per_round] * int(rounds) if isinstance(steps_per_round, Real) else list(steps_per_round)
    )
    if len(per_round) != rounds or any(isinstance(k, bool) or int(k) != k or k < 0 for k in per_round):
        raise ValueError(
            f"steps_per_round must be a non-negative integer or {rounds} of them; got {steps_per_round!r}."
        )
    if n_teacher_steps % 2**rounds:
        raise ValueError(f"n_teacher_steps={n_teacher_steps} cannot be halved {rounds} times.")
    base = config or TrainConfig(steps=int(per_round[0]), progress=False)
    out, model, n = [], copy.deepcopy(student_model), n_teacher_steps
    for r in range(int(rounds)):
        n //= 2

        loss_fn = progressive_distillation_loss(teacher, n, prediction=prediction, grid=grid)
        res = train(model, data, loss_fn, replace(base, steps=int(per_round[r]), seed=base.seed + r))
        out.append(DistillRound(n, res.ema, res.losses, res.seconds))
        teacher = Denoiser(res.ema, teacher.schedule, prediction)
        model = copy.deepcopy(res.ema).requires_grad_(True)
    return out


# ---------------------------------------------------------------------------------------------
# Consistency distillation (Song et al. 2023)
# ---------------------------------------------------------------------------------------------


class ConsistencyFunction(nn.Module):
    """``f(x_t, t)``, an estimate of the ODE trajectory's point at ``t_min``, parameterised as in Song et
    al. (2023), sec. 3 and appendix C: ``f = c_skip(rho) y + c_out(rho) F(c_in y, t)`` in EDM's variables
    ``rho = sigma / alpha`` and ``y = x / alpha``, with ``c_skip = sd^2 / ((rho - rho_min)^2 + sd^2)``,
    ``c_out = sd (rho - rho_min) / sqrt(sd^2 + rho^2)``, ``c_in = 1 / sqrt(rho^2 + sd^2)``, mapped back
    to x at ``t_min`` by the factor ``alpha(t_min)``. At ``t = t_min``, ``c_skip = 1`` and ``c_out = 0``,
    so ``f(x, t_min) = x`` exactly (the boundary condition) whatever the network ``F``.
    """

    def __init__(self, net: nn.Module, schedule: Schedule, *, t_min: float = 1e-3, sigma_data: float = 1.0):
        super().__init__()
        if not 0 < t_min < 1 or sigma_data <= 0:
            raise ValueError(f"need 0 < t_min < 1 and sigma_data > 0; got {t_min=}, {sigma_data=}.")
        self.net, self.schedule, self.t_min, self.sigma_data = net, schedule, t_min, sigma_data

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = as_time(t, like=x)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        # t_min as x's dtype sees it: the boundary is exact
        t_min = torch.tensor(self.t_min, dtype=t.dtype, device=t.device)
        if t.device.type == "cpu" and (t < t_min).any():  # checked on the host only, as in as_time
            raise ValueError(f"a consistency function is defined for t >= t_min = {self.t_min}.")
        a, s = self.schedule.alpha(t.double()), self.schedule.sigma(t.double())
        a_min = self.schedule.alpha(t_min.double())
        rho, rho_min = s / a, self.schedule.sigma(t_min.double()) / a_min
        sd2, at_min = self.sigma_data**2, t == t_min
        c_skip = torch.where(at_min, 1.0, sd2 / ((rho - rho_min) ** 2 + sd2) * a_min / a)
        c_out = torch.where(at_min, 0.0, a_min * self.sigma_data * (rho - rho_min) / (sd2 + rho**2).sqrt())
        c_in = 1 / (a * (rho**2 + sd2).sqrt())  # applied to x: c_in y = x / (alpha sqrt(rho^2 + sd^2))
        skip, out = _col(c_skip, x), _col(c_out, x)
        return skip * x + out * self.net(_col(c_in, x) * x, t)


def consistency_distillation_loss(
    teacher: Denoiser, timesteps, *, target: Callable | None = None
) -> Callable:
    """Song et al. (2023), Algorithm 2 with the squared L2 metric and weight 1, as a loss function
    ``loss(model, x0, generator=None)`` of a :class:`ConsistencyFunction` for
    :func:`dmlib.train.train`: for a random pair of neighbours ``t > s`` of ``timesteps``
    (decreasing, ending at ``model.t_min``), ``x_t ~ q(x_t | x_0)``, one teacher DDIM step (= Euler
    on the PF-ODE in EDM form) gives ``x^_s``, and the loss is ``||model(x_t, t) - target(x^_s, s)||^2``.
    ``target`` is the EMA network ``theta^-`` (under no_grad); ``None`` uses the model itself,
    ``theta^- = theta``, which Song & Dhariwal (2023, sec. 3.2) show works as well.
    """
    ts = check_timesteps(timesteps)

    def loss(model, x0: torch.Tensor, generator=None) -> torch.Tensor:
        if abs(ts[-1].item() - getattr(model, "t_min", ts[-1].item())) > 1e-12:
            raise ValueError(f"timesteps must end at the consistency function's t_min = {model.t_min}.")
        grid = ts.to(x0.device)
        i = torch.randint(0, grid.numel() - 1, (x0.shape[0],), generator=generator, device=x0.device)
        t, s = grid[i].to(x0.dtype), grid[i + 1].to(x0.dtype)
        x_t = q_sample(teacher.schedule, x0, t, noise_like(x0, generator))
        with torch.no_grad():
            goal = (model if target is None else target)(ddim_step(teacher, x_t, t, s), s)
        return ((model(x_t, t) - goal) ** 2).flatten(1).sum(1).mean()

    return loss


@torch.no_grad()
def sample_consistency(
    model: ConsistencyFunction, x_T, timesteps, *, generator=None, progress=False, callback=None
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): ``x <- f(x_T, timesteps[0])``,
    then for each later time ``tau`` except the last, re-noise ``x`` with ``q(x_tau | x_{t_min})`` and
    apply ``f`` again. ``[1.0, 0.0]`` is one-step sampling; the last entry only marks the end, and the
    result approximates ``x_{t_min}`` (within ``sigma(t_min)`` of the data)."""
    ts = check_timesteps(timesteps)
    if (ts[:-1] < model.t_min).any():
        raise ValueError(f"evaluation times timesteps[:-1] must be >= t_min = {model.t_min}.")
    x = x_T
    if callback is not None:
        callback(0, ts[0], x)
    for i in tqdm(range(ts.numel() - 1), disable=not progress, desc="consistency sampling"):
        if i > 0:
            a_ts, var_ts = model.schedule.transition(ts[i], torch.tensor(model.t_min, dtype=torch.float64))
            z = noise_like(x, generator)
            x = a_ts.item() * x + math.sqrt(max(var_ts.item(), 0.0)) * z
        x = model(x, ts[i].to(x.dtype))
        if callback is not None:
            callback(i + 1, ts[i + 1], x)
    return x
