"""Score-based generative modelling through SDEs (Song et al. 2021), for any schedule.

A schedule ``x_t = alpha(t) x_0 + sigma(t) eps`` is the marginal of the forward SDE

    dx = f(t) x dt + g(t) dw                                   (Song et al. 2021, eq. 5)

with ``(f, g^2)`` from :meth:`dmlib.schedules.Schedule.drift_diffusion`. Anderson (1982) gives
the reverse-time SDE and Song et al. the probability-flow ODE with the same marginals:

    dx = [f(t) x - g(t)^2 grad log q_t(x)] dt + g(t) dwbar      (eq. 6)
    dx = [f(t) x - g(t)^2 grad log q_t(x) / 2] dt               (eq. 13)

Every sampler here has the signature of :func:`dmlib.ddpm.sample_ancestral`:
``sampler(denoiser, x_T, timesteps, *, generator=None, progress=False, callback=None, ...)``, where
``timesteps`` runs strictly downwards, e.g. ``torch.linspace(1, 0, N + 1)``. The score is
``-eps / sigma``, which is infinite at a data time with ``sigma = 0``; so a step that ends where
``sigma = 0`` returns ``alpha E[x_0 | x_t]`` (Tweedie's formula), the "denoising" last step of
Song et al. (2021, appendix G) and Jolicoeur-Martineau et al. (2021). The loop and this rule are
:func:`dmlib.ddpm.run_steps`, shared with every other sampler; where ``sigma(0) > 0`` (VE) the
last step is an ordinary one without noise.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .ddpm import check_timesteps, run_steps
from .parameterization import Denoiser, _col, noise_like
from .schedules import Schedule, as_time


def reverse_drift(denoiser: Denoiser, x: torch.Tensor, t, *, ode: bool = False) -> torch.Tensor:
    """The drift of the reverse SDE, ``f x - g^2 score`` (eq. 6), or with ``ode=True`` of the
    probability-flow ODE, ``f x - g^2 score / 2`` (eq. 13). ``t`` is a scalar time."""
    t = as_time(t, like=x)
    f, g2 = denoiser.schedule.drift_diffusion(t)
    weight = 0.5 if ode else 1.0
    return _col(f, x) * x - weight * _col(g2, x) * denoiser.score(x, t)


def pf_ode_drift(denoiser: Denoiser, x: torch.Tensor, t) -> torch.Tensor:
    """``dx/dt = f(t) x - g(t)^2 grad log q_t(x) / 2``, the probability-flow ODE (eq. 13)."""
    return reverse_drift(denoiser, x, t, ode=True)


def simulate_forward(
    schedule: Schedule, x0: torch.Tensor, timesteps, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Euler–Maruyama on the forward SDE: ``x <- x + f x dt + g sqrt(dt) z`` along increasing ``timesteps``.

    Returns every state, shape ``(len(timesteps), *x0.shape)``. Its marginals approach the closed
    form ``N(alpha x_0, sigma^2 I)`` as the steps shrink (a test checks the moments).
    """
    ts = check_timesteps(torch.as_tensor(timesteps).flip(0)).flip(0)  # increasing here
    states = [x0]
    for t, u in zip(ts[:-1], ts[1:]):
        f, g2 = schedule.drift_diffusion(t)
        dt = (u - t).item()
        z = noise_like(x0, generator)
        states.append(states[-1] + f.item() * states[-1] * dt + (g2.item() * dt) ** 0.5 * z)
    return torch.stack(states)


def _run(step: Callable, denoiser, x_T, timesteps, desc, progress, callback):
    """:func:`dmlib.ddpm.run_steps`, the loop and last-step rule every sampler shares, for a
    ``step(x, t, s)`` that takes the times in ``x``'s dtype."""
    ts = check_timesteps(timesteps)

    def by_index(i, x):
        return step(x, ts[i].to(x.dtype), ts[i + 1].to(x.dtype))

    return run_steps(by_index, denoiser, x_T, ts, desc, progress, callback)


@torch.no_grad()
def sample_euler_maruyama(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    timesteps,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callable | None = None,
) -> torch.Tensor:
    """Euler–Maruyama on the reverse SDE (eq. 6), stepping back by ``dt = t - s > 0``:
    ``x <- x - [f x - g^2 score] dt + g sqrt(dt) z``. One network evaluation per step."""

    def step(x, t, s):
        return _euler_maruyama_step(denoiser, x, t, s, generator)

    return _run(step, denoiser, x_T, timesteps, "reverse SDE (Euler-Maruyama)", progress, callback)


def _euler_maruyama_step(denoiser, x, t, s, generator):
    """One reverse Euler–Maruyama step from ``t`` back to ``s``: ``x - [f x - g^2 score] dt + g sqrt(dt) z``
    (no noise on a step to ``s = 0``)."""
    _, g2 = denoiser.schedule.drift_diffusion(t)
    dt = t - s
    x = x - reverse_drift(denoiser, x, t) * dt
    return x + _col(g2 * dt, x).sqrt() * noise_like(x, generator) if s > 0 else x


def _reverse_diffusion_step(denoiser, x, t, s, generator):
    """Song et al. (2021) eq. 46: discretize the forward SDE as ``x_t = x_s + f_i(x_s) + G_i z`` with
    ``f_i(x) = (alpha_{t|s} - 1) x`` and ``G_i = sigma_{t|s}`` (the exact transition of the schedule),
    then run it backwards: ``x_s = x_t - f_i(x_t) + G_i^2 score(x_t, t) + G_i z`` (no noise on a step
    to ``s = 0``)."""
    a_ts, var_ts = denoiser.schedule.transition(t, s)
    a_ts, var_ts = _col(a_ts, x), _col(var_ts, x)
    x = (2 - a_ts) * x + var_ts * denoiser.score(x, t)
    return x + var_ts.sqrt() * noise_like(x, generator) if s > 0 else x


@torch.no_grad()
def sample_reverse_diffusion(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    timesteps,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callable | None = None,
) -> torch.Tensor:
    """The reverse-diffusion predictor of Song et al. (2021, eq. 46; the ancestral sampler of NCSN
    for VE). One network evaluation per step."""

    def step(x, t, s):
        return _reverse_diffusion_step(denoiser, x, t, s, generator)

    return _run(step, denoiser, x_T, timesteps, "reverse diffusion", progress, callback)


def langevin_correct(
    denoiser: Denoiser,
    x: torch.Tensor,
    t,
    *,
    snr: float = 0.16,
    n_steps: int = 1,
    alpha_ratio=1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Langevin corrector at fixed ``t`` (Song et al. 2021, Algorithms 4-5), in the book's Langevin
    convention (Chapter 2, eq. ``eq-langevin``)::

        x <- x + delta score + sqrt(2 delta) z,   delta = 2 a (r ||z|| / ||score||)^2,

    the step ``delta`` set by the target signal-to-noise ratio ``r = snr`` (``a = alpha_ratio`` is
    1 for VE and ``alpha_i = 1 - beta_i`` for VP). This step-size rule belongs to exactly this
    update (not to ``x + (delta / 2) score + sqrt(delta) z``): with it the ratio
    ``||delta score|| / ||sqrt(2 delta) z||`` is ``r sqrt(a)``. As in Song et al.'s code the two
    norms are averaged over the batch before the ratio is taken: per-sample ratios of two
    chi-distributed norms are very noisy in low dimension (in 2D some steps would be 100x too
    long)."""
    if snr <= 0 or n_steps < 1:
        raise ValueError(f"need snr > 0 and n_steps >= 1; got snr={snr}, n_steps={n_steps}.")
    for _ in range(n_steps):
        score = denoiser.score(x, t)
        z = noise_like(x, generator)
        ratio = z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean().clamp(min=1e-12)
        a = torch.as_tensor(alpha_ratio, dtype=x.dtype, device=x.device)
        delta = 2 * a * (snr * ratio) ** 2  # batch-averaged norms, as in Song et al.'s code
        x = x + delta * score + (2 * delta).sqrt() * z
    return x


@torch.no_grad()
def sample_pc(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    timesteps,
    *,
    predictor: str = "reverse_diffusion",
    snr: float = 0.16,
    corrector_steps: int = 1,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callable | None = None,
) -> torch.Tensor:
    """Predictor–corrector sampling (Song et al. 2021, Algorithm 1): each step is one predictor step
    (``"reverse_diffusion"`` or ``"euler_maruyama"``) followed by ``corrector_steps`` Langevin steps
    of :func:`langevin_correct` at the new time (``x + delta score + sqrt(2 delta) z``, the step
    ``delta`` from the target ``snr`` with batch-averaged norms). Network evaluations:
    ``1 + corrector_steps`` per step, and one on the last step to ``t = 0``, which has no corrector
    (it adds no noise)."""
    if predictor not in ("reverse_diffusion", "euler_maruyama"):
        raise ValueError(f"unknown predictor {predictor!r}; choose 'reverse_diffusion' or 'euler_maruyama'.")
    sched = denoiser.schedule

    def step(x, t, s):
        if predictor == "reverse_diffusion":
            x = _reverse_diffusion_step(denoiser, x, t, s, generator)
        else:
            x = _euler_maruyama_step(denoiser, x, t, s, generator)
        if s == 0:  # no noise on the last step (run_steps' rule), so no corrector there either
            return x
        # the corrector's step scale: 1 for VE, alpha_{t|s}^2 = 1 - beta_i for VP (Song et al.'s code)
        a_ts, _ = sched.transition(t, s)
        return langevin_correct(
            denoiser, x, s, snr=snr, n_steps=corrector_steps, alpha_ratio=a_ts**2, generator=generator
        )

    return _run(step, denoiser, x_T, timesteps, "predictor-corrector", progress, callback)


@torch.no_grad()
def sample_pf_ode(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    timesteps,
    *,
    method: str = "euler",
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callable | None = None,
) -> torch.Tensor:
    """Fixed-step solution of the probability-flow ODE (eq. 13): ``"euler"`` (one evaluation per step)
    or ``"heun"`` (two; Karras et al. 2022, Algorithm 1). Deterministic: ``generator`` is unused and
    accepted only so that every sampler takes the same arguments."""
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown ODE method {method!r}; choose 'euler' or 'heun'.")

    def step(x, t, s):
        d = pf_ode_drift(denoiser, x, t)
        x_next = x + d * (s - t)
        if method == "heun":
            x_next = x + (d + pf_ode_drift(denoiser, x_next, s)) / 2 * (s - t)
        return x_next

    return _run(step, denoiser, x_T, timesteps, f"probability-flow ODE ({method})", progress, callback)


def solve_pf_ode(
    denoiser: Denoiser,
    x: torch.Tensor,
    t_start: float,
    t_end: float,
    *,
    t_eval=None,
    rtol: float = 1e-7,
    atol: float = 1e-7,
) -> tuple[torch.Tensor, int]:
    """The probability-flow ODE solved accurately, by scipy's adaptive RK45 (Dormand & Prince 1980)
    in float64: the reference every fixed-step sampler is measured against.

    Works in either direction (``t_end < t_start`` samples, ``t_end > t_start`` encodes).
    Returns ``(states, nfe)``: the state at ``t_end`` (or, given ``t_eval``, the states at those
    times, shape ``(len(t_eval), *x.shape)``), in ``x``'s dtype and on its device, and the number of
    drift evaluations. The denoiser runs on ``x``'s device; the solver's state goes through the CPU
    at every evaluation, so this reference is for small problems.
    """
    from scipy.integrate import solve_ivp

    ends = as_time(torch.tensor([float(t_start), float(t_end)], dtype=torch.float64))  # in [0, 1]
    if t_start == t_end:
        raise ValueError("t_start and t_end must differ.")
    with torch.no_grad():
        sigma_ends = denoiser.schedule.sigma(ends)
    if (sigma_ends == 0).any():
        raise ValueError(
            f"the probability-flow ODE's drift is infinite where sigma = 0 (t = {float(ends[sigma_ends == 0][0]):g} "
            f"for {type(denoiser.schedule).__name__}); integrate between times with sigma > 0, e.g. "
            f"down to t = 1e-3, then take the denoising step alpha E[x_0 | x_t] if you need t = 0."
        )
    shape, dtype, device = x.shape, x.dtype, x.device

    def rhs(t, y):
        xt = torch.from_numpy(y).reshape(shape).to(device)
        with torch.no_grad():
            return pf_ode_drift(denoiser, xt, torch.tensor(t, dtype=torch.float64)).reshape(-1).cpu().numpy()

    sol = solve_ivp(
        rhs,
        (float(t_start), float(t_end)),
        x.detach().to(torch.float64).reshape(-1).cpu().numpy(),
        method="RK45",
        rtol=rtol,
        atol=atol,
        t_eval=None if t_eval is None else np.asarray(t_eval, dtype=np.float64),
    )
    if not sol.success:
        raise RuntimeError(f"the ODE solver failed: {sol.message}")
    ys = torch.from_numpy(sol.y.T.copy())
    out = ys[-1].reshape(shape) if t_eval is None else ys.reshape(len(ys), *shape)
    return out.to(device=device, dtype=dtype), sol.nfev
