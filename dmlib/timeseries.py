"""Time series with diffusion models (Chapter 10): imputation (CSDI), forecasting (TimeGrad), and the exact
Gaussian answers and proper scores that check them.

**Exact references.** For a stationary VAR(1), ``x_t = A x_{t-1} + w_t`` with ``w_t ~ N(0, Q)``
(:class:`VAR1`; AR(1) is ``K = 1``), every window is Gaussian, so the law of the missing values given the
observed ones and the law of the next ``h`` values are Gaussian in closed form: by conditioning the
window's joint covariance (:func:`gaussian_conditional`; Bishop 2006, eq. 2.81-2.82) or by the Kalman
filter (Kalman 1960) and the Rauch-Tung-Striebel smoother (Rauch, Tung & Striebel 1965)
(:func:`kalman_smoother`, :func:`exact_forecast`). The two agree; a test checks it. The window's law is
a one-component :class:`~dmlib.oracle.GaussianMixture` (:meth:`VAR1.window_prior`), so the exact
*conditional* denoiser ``E[x_0 | x_t on the missing entries, x_0 on the observed ones]`` is a closed form
too (:class:`ExactConditionalDenoiser`).

**CSDI** (Tashiro et al. 2021, NeurIPS, sec. 4.1-4.3): a denoiser ``eps_theta(x_t^ta, t | x_0^co)`` of the
imputation targets given the observed values and their mask (:class:`CSDIDenoiser`, a small MLP over
the flattened window); trained self-supervised by hiding a random share of the *observed* values and
predicting the noise on those only (:func:`csdi_loss`, their "random strategy"); sampled with any
sampler of :mod:`dmlib.samplers` while the observed values stay fixed (:func:`impute`). With the exact
conditional denoiser the samples follow the Kalman conditional.

**TimeGrad** (Rasul et al. 2021, ICML, sec. 2-3): a GRU reads the history into a state ``h_{t-1}`` that
conditions a small diffusion model of the next value ``x_t`` (:class:`TimeGrad`, :func:`timegrad_loss`);
forecasts are drawn one step at a time, each sample fed back into the GRU (:func:`forecast`).

**Scores** (Gneiting & Raftery 2007, sec. 4.2, eq. 20-21): the continuous ranked probability score
``CRPS(F, y) = int (F(x) - 1{x >= y})^2 dx = E|X - y| - 1/2 E|X - X'|`` (smaller is better here), for
samples (:func:`crps_samples`) and in closed form for a Gaussian (:func:`crps_gaussian`), and the coverage
of central intervals (:func:`coverage`).

**Real data** shipping inside statsmodels (no download): ``co2`` (weekly), ``sunspots`` (yearly) and
``elnino`` (monthly) (:func:`load_series`), against a classical state-space baseline fitted by
statsmodels (:func:`fit_baseline`), scored on the same rolling origins (:func:`evaluate_forecasts`).
The statsmodels parts run on the CPU by design (numpy, scipy optimizers); the networks, losses,
denoisers and samplers run on any device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .ddpm import uniform_time
from .nets.mlp import _check_even, _stack, embed_time
from .oracle import GaussianMixture, MixtureOracle
from .parameterization import PREDICTIONS, Denoiser, _col, noise_like
from .samplers import SAMPLERS, time_grid
from .schedules import Schedule, as_time

D64 = torch.float64

# ------------------------------------------------------------------------------------------------
# Input checks shared by the exact references, imputation and forecasting
# ------------------------------------------------------------------------------------------------


def _count(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}.")
    return int(value)


def _horizon(horizon) -> int:
    if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon <= 0:
        raise ValueError(f"the forecast horizon must be a positive number of steps; got {horizon!r}.")
    return int(horizon)


def _check_mask(values: torch.Tensor, mask) -> torch.Tensor:
    """``mask`` (True: observed) of ``values``' shape; NaN is allowed only where it is False."""
    if not torch.is_tensor(values) or not values.is_floating_point():
        raise TypeError(f"values must be a floating-point tensor; got {type(values).__name__}.")
    if mask is None:
        mask = torch.ones(values.shape, dtype=torch.bool, device=values.device)
    if not torch.is_tensor(mask) or mask.dtype != torch.bool:
        raise TypeError("mask must be a boolean tensor (True where a value is observed).")
    if mask.shape != values.shape:
        raise ValueError(
            f"mask must have the shape of the values, {tuple(values.shape)}; got {tuple(mask.shape)}."
        )
    if values.device.type == "cpu" and bool((mask & ~torch.isfinite(values)).any()):
        raise ValueError(
            "values has NaN or infinite entries where mask says observed: mark missing values False in mask."
        )
    return mask


def _series(values: torch.Tensor, mask, dim: int):
    """One series ``(L,)`` or ``(L, K)`` as float64 ``(L, K)`` values (0 where missing) and mask."""
    mask = _check_mask(values, mask)
    if values.ndim not in (1, 2) or (values.shape[-1] if values.ndim == 2 else 1) != dim:
        raise ValueError(f"a series of this process has shape (L,) or (L, {dim}); got {tuple(values.shape)}.")
    x, m = values.reshape(values.shape[0], dim).to(D64), mask.reshape(values.shape[0], dim)
    return torch.where(m, x, torch.zeros_like(x)), m


# ------------------------------------------------------------------------------------------------
# Exact references: the VAR(1) process, its Gaussian conditionals, Kalman filter and RTS smoother
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VAR1:
    """``x_t = A x_{t-1} + w_t``, ``w_t ~ N(0, Q)``, started in its stationary law ``N(0, P)``.

    ``A`` and ``Q`` are ``(K, K)`` (kept in float64 on the CPU); the process must be stationary (every
    eigenvalue of A inside the unit circle) and Q positive definite. :meth:`ar1` builds AR(1)."""

    A: torch.Tensor
    Q: torch.Tensor

    def __post_init__(self):
        A, Q = torch.as_tensor(self.A, dtype=D64), torch.as_tensor(self.Q, dtype=D64)
        if A.ndim != 2 or A.shape[0] != A.shape[1] or Q.shape != A.shape:
            raise ValueError(f"A and Q must both be (K, K); got {tuple(A.shape)} and {tuple(Q.shape)}.")
        if torch.linalg.eigvals(A).abs().max() >= 1:
            raise ValueError(
                "A has an eigenvalue on or outside the unit circle: the process is not stationary."
            )
        if not torch.allclose(Q, Q.T) or torch.linalg.eigvalsh(Q).min() <= 0:
            raise ValueError("Q, the noise covariance, must be symmetric positive definite.")
        object.__setattr__(self, "A", A)
        object.__setattr__(self, "Q", Q)

    @classmethod
    def ar1(cls, phi: float, noise_std: float = 1.0) -> VAR1:
        """AR(1): ``x_t = phi x_{t-1} + noise_std w_t`` with ``|phi| < 1``."""
        return cls([[float(phi)]], [[float(noise_std) ** 2]])

    @property
    def dim(self) -> int:
        return self.A.shape[0]

    def stationary_cov(self) -> torch.Tensor:
        """``P = A P A^T + Q`` (the discrete Lyapunov equation), solved as ``(I - A (x) A) vec P = vec Q``;
        for AR(1), ``P = noise_std^2 / (1 - phi^2)``."""
        K = self.dim
        vec = torch.linalg.solve(torch.eye(K * K, dtype=D64) - torch.kron(self.A, self.A), self.Q.reshape(-1))
        P = vec.reshape(K, K)
        return (P + P.T) / 2

    def window_cov(self, length: int) -> torch.Tensor:
        """Covariance of a flattened window ``(x_1, ..., x_L)`` (index ``i K + k``): block ``(i, j)`` is
        ``Cov(x_i, x_j) = A^(i-j) P`` for ``i >= j`` and its transpose above the diagonal."""
        L, K = _count("length", length), self.dim
        blocks = [self.stationary_cov()]
        for _ in range(L - 1):
            blocks.append(self.A @ blocks[-1])  # A^lag P
        C = torch.empty(L, K, L, K, dtype=D64)
        for i in range(L):
            for j in range(i + 1):
                C[i, :, j], C[j, :, i] = blocks[i - j], blocks[i - j].T
        return C.reshape(L * K, L * K)

    def window_prior(self, length: int) -> GaussianMixture:
        """The law of a flattened window as a one-component :class:`~dmlib.oracle.GaussianMixture`."""
        C = self.window_cov(length)
        return GaussianMixture(torch.zeros(1, C.shape[0], dtype=D64), C[None])

    def simulate(self, n: int, length: int, generator=None, dtype=D64) -> torch.Tensor:
        """``n`` independent windows of ``length`` steps, shape ``(n, length, K)``, each started in N(0, P)."""
        n, L = _count("n", n), _count("length", length)
        chol_p, chol_q = torch.linalg.cholesky(self.stationary_cov()), torch.linalg.cholesky(self.Q)

        def white():
            return torch.randn(n, self.dim, generator=generator, dtype=D64)

        out = [white() @ chol_p.T]
        for _ in range(L - 1):
            out.append(out[-1] @ self.A.T + white() @ chol_q.T)
        return torch.stack(out, dim=1).to(dtype)


def gaussian_conditional(process: VAR1, values: torch.Tensor, mask=None):
    """The exact law of the missing values given the observed ones, by conditioning the window's joint
    Gaussian (Bishop 2006, eq. 2.81-2.82): ``m = C_mo C_oo^-1 x_o``, ``S = C_mm - C_mo C_oo^-1 C_om``.

    ``values`` ``(L,)`` or ``(L, K)`` (NaN allowed where ``mask`` is False). Returns the window mean (the
    observed values in place, the conditional mean elsewhere; ``values``' shape) and the ``(L K, L K)``
    covariance of the flattened window (zero in every row and column of an observed entry)."""
    x, m = _series(values, mask, process.dim)
    C, obs, flat = process.window_cov(x.shape[0]), m.reshape(-1), x.reshape(-1)
    o, u = obs.nonzero()[:, 0], (~obs).nonzero()[:, 0]
    gain = torch.linalg.solve(C[o][:, o], C[o][:, u]).T  # C_mo C_oo^-1 (C_oo symmetric)
    mean, cov = flat.clone(), torch.zeros_like(C)
    mean[u] = gain @ flat[o]
    cov[u[:, None], u] = C[u][:, u] - gain @ C[o][:, u]
    return mean.reshape(values.shape), (cov + cov.T) / 2


def _kalman_filter(process: VAR1, x: torch.Tensor, m: torch.Tensor):
    """Filtered and one-step predicted means and covariances (Kalman 1960) with exact (noise-free)
    observations of the components ``m[t]`` at each time; missing components are simply not updated."""
    A, Q = process.A, process.Q
    pred_mean, pred_cov = torch.zeros(process.dim, dtype=D64), process.stationary_cov()
    filt, pred = [], []
    for t in range(x.shape[0]):
        if t > 0:
            pred_mean, pred_cov = A @ filt[-1][0], A @ filt[-1][1] @ A.T + Q
        pred.append((pred_mean, pred_cov))
        o = m[t].nonzero()[:, 0]
        gain = torch.linalg.solve(pred_cov[o][:, o], pred_cov[o]).T  # P H^T (H P H^T)^-1
        mean = pred_mean + gain @ (x[t, o] - pred_mean[o])
        cov = pred_cov - gain @ pred_cov[o]
        filt.append((mean, (cov + cov.T) / 2))
    return filt, pred


def kalman_smoother(process: VAR1, values: torch.Tensor, mask=None):
    """Smoothed means and covariances ``E[x_t | all observed]``, ``Cov[x_t | all observed]`` by the Kalman
    filter and the Rauch-Tung-Striebel backward pass (Rauch, Tung & Striebel 1965):
    ``J_t = P_t|t A^T P_t+1|t^-1``, ``m_t = m_t|t + J_t (m_t+1 - m_t+1|t)``,
    ``P_t = P_t|t + J_t (P_t+1 - P_t+1|t) J_t^T``. Returns means of ``values``' shape and ``(L, K, K)``."""
    x, m = _series(values, mask, process.dim)
    filt, pred = _kalman_filter(process, x, m)
    means, covs = [filt[-1][0]], [filt[-1][1]]
    for t in range(x.shape[0] - 2, -1, -1):
        (mf, Pf), (mp, Pp) = filt[t], pred[t + 1]
        J = torch.linalg.solve(Pp, process.A @ Pf).T  # Pf A^T Pp^-1 (Pp, Pf symmetric)
        means.insert(0, mf + J @ (means[0] - mp))
        cov = Pf + J @ (covs[0] - Pp) @ J.T
        covs.insert(0, (cov + cov.T) / 2)
    return torch.stack(means).reshape(values.shape), torch.stack(covs)


def exact_forecast(process: VAR1, values: torch.Tensor, horizon: int, mask=None):
    """The law of the next ``horizon`` values given the observed history (the Kalman predictor): from the
    filtered ``N(m_T, P_T)``, ``E[x_T+j] = A^j m_T`` and ``Cov(x_T+i, x_T+j) = A^(i-j) C_j`` (``i >= j``)
    with ``C_j = A C_j-1 A^T + Q``, ``C_0 = P_T``. Returns the mean ``(h,)`` or ``(h, K)`` and the
    ``(h K, h K)`` covariance; for AR(1) ``phi^h x_T`` and ``noise_std^2 (1 - phi^2h) / (1 - phi^2)``."""
    h = _horizon(horizon)
    x, m = _series(values, mask, process.dim)
    mean, cov = _kalman_filter(process, x, m)[0][-1]
    A, Q, K = process.A, process.Q, process.dim
    means, diag = [], []
    for _ in range(h):
        mean, cov = A @ mean, A @ cov @ A.T + Q
        means.append(mean)
        diag.append(cov)
    C = torch.empty(h, K, h, K, dtype=D64)
    for j in range(h):
        block = diag[j]
        for i in range(j, h):
            C[i, :, j], C[j, :, i] = block, block.T
            block = A @ block
    shape = (h,) if values.ndim == 1 else (h, K)
    return torch.stack(means).reshape(shape), C.reshape(h * K, h * K)


class ExactConditionalDenoiser:
    """The exact CSDI denoiser of a Gaussian window law ``x_0 ~ N(mu, S)`` (a one-component mixture over
    the flattened window, e.g. :meth:`VAR1.window_prior`): ``E[x_0 | z]`` with ``z_i = x_0,i`` where
    observed and ``z_i = alpha x_0,i + sigma eps_i`` where not. With ``a = (1 or alpha)``,
    ``s2 = (0 or sigma^2)`` per entry, ``E[x_0 | z] = mu + S diag(a) G^-1 (z - a mu)``,
    ``G = diag(a) S diag(a) + diag(s2)`` (Bishop 2006, eq. 2.116, the observations being linear).

    Called as a CSDI model, ``(x_t, t, cond, mask) -> prediction`` with ``x_t`` ``(B, *window)`` and one
    mask per sample or one for all; ``prediction`` "x0" or "eps" (to score it with :func:`csdi_loss`)."""

    def __init__(self, prior: GaussianMixture, schedule: Schedule, prediction: str = "x0"):
        if prior.means.shape[0] != 1:
            raise ValueError(
                f"the exact conditional denoiser takes a one-component (Gaussian) prior; got "
                f"{prior.means.shape[0]} components."
            )
        if prediction not in ("x0", "eps"):
            raise ValueError(f"prediction must be 'x0' or 'eps'; got {prediction!r}.")
        self.prior, self.schedule, self.prediction = prior, schedule, prediction

    def __call__(self, x_t: torch.Tensor, t, cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, D = x_t.shape[0], self.prior.dim
        if x_t[0].numel() != D:
            raise ValueError(f"x_t must hold windows of {D} values each; got shape {tuple(x_t.shape)}.")
        mu, S = (v[0].to(device=x_t.device, dtype=x_t.dtype) for v in (self.prior.means, self.prior.covs))
        t = as_time(t, like=x_t)
        alpha, sigma = _col(self.schedule.alpha(t), x_t), _col(self.schedule.sigma(t), x_t)
        # one mask for the whole batch and one time: one D x D system for every sample (impute's case)
        m = mask.reshape(-1, D)
        a = torch.where(m, torch.ones_like(m, dtype=x_t.dtype), alpha.reshape(-1, 1))
        s2 = torch.where(m, torch.zeros_like(a), sigma.reshape(-1, 1) ** 2)
        z = torch.where(m, cond.reshape(-1, D), x_t.reshape(B, D))
        G = a[:, :, None] * S * a[:, None, :] + torch.diag_embed(s2)
        rhs = z - a * mu
        sol = (
            torch.linalg.solve(G[0], rhs.T).T
            if G.shape[0] == 1
            else torch.linalg.solve(G, rhs[..., None])[..., 0]
        )
        x0 = (mu + (a * sol) @ S).reshape(x_t.shape)  # S symmetric: (S diag(a) sol)^T = (a sol)^T S
        return x0 if self.prediction == "x0" else (x_t - alpha * x0) / sigma


# ------------------------------------------------------------------------------------------------
# CSDI: the conditional denoiser, its self-supervised loss, imputation with any sampler
# ------------------------------------------------------------------------------------------------


class CSDIDenoiser(nn.Module):
    """``eps_theta(x_t^ta, t | x_0^co, mask)`` for windows of shape ``window`` (``(L,)`` or ``(L, K)``): an
    MLP over ``[x_t * (1 - mask), x_0^co * mask, mask, emb(t)]`` (Tashiro et al. 2021, sec. 4.1, with an
    MLP in place of their transformer). The noisy input is zeroed where observed, as CSDI's is: the
    network sees each observed value once, clean."""

    prediction = "eps"

    def __init__(self, window, hidden: int = 128, depth: int = 3, time_dim: int = 32):
        super().__init__()
        _check_even(time_dim)
        self.window = tuple(_count("window size", w) for w in window)
        if len(self.window) not in (1, 2):
            raise ValueError(f"window must be (L,) or (L, K); got {window!r}.")
        self.config = dict(window=list(self.window), hidden=hidden, depth=depth, time_dim=time_dim)
        self.dim, self.time_dim = math.prod(self.window), time_dim
        self.net = _stack(3 * self.dim + time_dim, hidden, depth, self.dim)

    def forward(self, x_t: torch.Tensor, t, cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if tuple(x_t.shape[1:]) != self.window:
            raise ValueError(
                f"x_t must have shape (B, {', '.join(map(str, self.window))}); got {tuple(x_t.shape)}."
            )
        B, m = x_t.shape[0], mask.expand(x_t.shape).reshape(x_t.shape[0], -1)
        zero = torch.zeros((), dtype=x_t.dtype, device=x_t.device)
        noisy = torch.where(m, zero, x_t.reshape(B, -1))
        clean = torch.where(m, cond.expand(x_t.shape).reshape(B, -1), zero)  # NaN where missing never enters
        h = torch.cat([noisy, clean, m.to(x_t.dtype), embed_time(t, x_t, self.time_dim)], dim=1)
        return self.net(h).reshape(x_t.shape)


def csdi_loss(schedule: Schedule) -> Callable:
    """CSDI's self-supervised loss (Tashiro et al. 2021, sec. 4.2-4.3, Algorithm 1, random strategy) as
    ``loss(model, batch, generator)`` for :func:`dmlib.train.train`. ``batch``: windows ``(B, *window)``
    with NaN where a value was never observed. Per window a share ``r ~ U(0, 1)`` of the observed values
    becomes the target (hidden), the rest the condition; the loss is the mean of
    ``||eps - eps_theta(x_t, t | x_0^co)||^2`` over the targets only (never over missing values)."""

    def loss(model, batch: torch.Tensor, generator=None) -> torch.Tensor:
        observed = torch.isfinite(batch)
        x0 = torch.where(observed, batch, torch.zeros_like(batch))
        share = torch.rand(batch.shape[0], generator=generator, dtype=batch.dtype, device=batch.device)
        u = torch.rand(batch.shape, generator=generator, dtype=batch.dtype, device=batch.device)
        target = observed & (u < _col(share, batch))
        t, eps = uniform_time(x0, generator), noise_like(x0, generator)
        x_t = _col(schedule.alpha(t), x0) * x0 + _col(schedule.sigma(t), x0) * eps
        weight = target.to(batch.dtype)
        pred = model(x_t, t, x0, observed & ~target)
        return ((pred - eps) ** 2 * weight).sum() / weight.sum().clamp(min=1)

    return loss


def _sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.")
    return SAMPLERS[name]


def _prediction(model, prediction):
    kind = prediction if prediction is not None else getattr(model, "prediction", "eps")
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {kind!r}; choose one of {', '.join(PREDICTIONS)}.")
    return kind


@torch.no_grad()
def impute(model, schedule: Schedule, values: torch.Tensor, mask: torch.Tensor, n_samples: int, *,
           sampler: str = "ddim", n_steps: int = 50, prediction: str | None = None, generator=None,
           progress: bool = False) -> torch.Tensor:  # fmt: skip
    """``n_samples`` draws of the missing values of one window (Tashiro et al. 2021, sec. 4.1 and
    Algorithm 2): run ``SAMPLERS[sampler]`` on its own time grid with the denoiser
    ``x_t -> model(x_t, t, values, mask)``, then put the observed values back, so they are never changed
    (bit for bit). ``values``: one window ``(L,)`` or ``(L, K)``, NaN allowed only where ``mask`` (bool,
    True = observed) is False. Returns ``(n_samples, *values.shape)`` in ``values``' dtype and device."""
    mask, n = _check_mask(values, mask), _count("n_samples", n_samples)
    spec = _sampler(sampler)
    shape = (n, *values.shape)
    cond = torch.where(mask, values, torch.zeros_like(values))  # one window: models broadcast it
    denoiser = Denoiser(lambda x, t: model(x, t, cond, mask), schedule, _prediction(model, prediction))
    x_T = torch.randn(shape, generator=generator, dtype=values.dtype, device=values.device)
    ts = time_grid(schedule, _count("n_steps", n_steps), spec.grid)
    x = spec.fn(denoiser, x_T, ts, generator=generator, progress=progress, **spec.options)
    return torch.where(mask, cond, x)


# ------------------------------------------------------------------------------------------------
# TimeGrad: a recurrent state conditioning a per-step diffusion
# ------------------------------------------------------------------------------------------------


class TimeGrad(nn.Module):
    """``eps_theta(x_t^n, n, h_{t-1})`` (Rasul et al. 2021, sec. 3.1): a GRU state ``h_{t-1}`` of the
    values ``x_1 .. x_{t-1}`` conditions an MLP denoiser of the next value ``x_t`` (``channels`` values
    per step). ``forward`` is the teacher-forced training path, one prediction per position; sampling
    uses :meth:`encode`, :meth:`advance` and :meth:`denoise` (:func:`forecast`)."""

    prediction = "eps"

    def __init__(self, channels: int = 1, hidden: int = 64, depth: int = 2, time_dim: int = 32):
        super().__init__()
        _check_even(time_dim)
        self.config = dict(channels=channels, hidden=hidden, depth=depth, time_dim=time_dim)
        self.channels, self.time_dim = _count("channels", channels), time_dim
        self.rnn = nn.GRU(channels, hidden, batch_first=True)
        self.net = _stack(channels + time_dim + hidden, hidden, depth, channels)

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """The state after reading ``history`` ``(B, T, channels)``: ``(B, hidden)``."""
        return self.rnn(history)[1][0]

    def advance(self, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The state after one more value ``x`` ``(B, channels)``."""
        return self.rnn(x[:, None], state[None].contiguous())[1][0]

    def denoise(self, x_t: torch.Tensor, t, state: torch.Tensor) -> torch.Tensor:
        """The noise prediction for the next value, ``(B, channels)``, given the state."""
        return self.net(torch.cat([x_t, embed_time(t, x_t, self.time_dim), state], dim=1))

    def forward(self, x_t: torch.Tensor, t, history: torch.Tensor) -> torch.Tensor:
        """``x_t`` ``(B, T, channels)``: the noisy ``x_2 .. x_{T+1}``; ``history`` ``(B, T, channels)``: the
        clean ``x_1 .. x_T``; ``t`` one time per sample and position, ``(B, T)``. Position ``j`` is
        denoised with the state after ``x_1 .. x_j``."""
        if x_t.ndim != 3 or x_t.shape != history.shape or x_t.shape[-1] != self.channels:
            raise ValueError(
                f"x_t and history must both be (B, T, {self.channels}); got {tuple(x_t.shape)} and "
                f"{tuple(history.shape)}."
            )
        t = as_time(t, like=x_t)
        # a scalar, or one time per window (B,), is the same at every position
        times = (t[:, None] if t.ndim == 1 else t).expand(x_t.shape[:2]).reshape(-1)
        states = self.rnn(history)[0]
        flat = x_t.reshape(-1, self.channels)
        return self.denoise(flat, times, states.reshape(flat.shape[0], -1)).reshape(x_t.shape)


def _windows3(batch: torch.Tensor) -> torch.Tensor:
    if batch.ndim not in (2, 3) or batch.shape[1] < 2:
        raise ValueError(
            f"TimeGrad trains on windows (B, T) or (B, T, K) with T >= 2; got {tuple(batch.shape)}."
        )
    return batch if batch.ndim == 3 else batch[..., None]


def timegrad_loss(schedule: Schedule) -> Callable:
    """TimeGrad's loss (Rasul et al. 2021, sec. 3.1, Algorithm 1): for every position of a window, the
    eps-MSE of the diffusion model of ``x_{j+1}`` conditioned on the state after ``x_1 .. x_j``, each
    position with its own diffusion time; ``loss(model, batch, generator)`` for :func:`dmlib.train.train`."""

    def loss(model, batch: torch.Tensor, generator=None) -> torch.Tensor:
        x = _windows3(batch)
        target = x[:, 1:]
        t = uniform_time(target.reshape(-1, target.shape[-1]), generator).reshape(target.shape[:2])
        eps = noise_like(target, generator)
        x_t = schedule.alpha(t)[..., None] * target + schedule.sigma(t)[..., None] * eps
        return torch.mean((model(x_t, t, x[:, :-1]) - eps) ** 2)

    return loss


class ExactVARForecaster:
    """The exact TimeGrad of a :class:`VAR1`: the state is the last value ``x_T`` and the next value is
    ``N(A x_T, Q)``, whose denoiser is ``A x_T + E_{N(0, Q)}[x_0 | x_t - alpha A x_T]`` (the oracle of
    :mod:`dmlib.oracle`, shifted). It has TimeGrad's sampling methods, so :func:`forecast` runs on it."""

    prediction = "x0"

    def __init__(self, process: VAR1, schedule: Schedule):
        self.process, self.schedule = process, schedule
        noise = GaussianMixture(torch.zeros(1, process.dim, dtype=D64), process.Q[None])
        self.oracle = MixtureOracle(noise, schedule)

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        return history[:, -1]

    def advance(self, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x

    def denoise(self, x_t: torch.Tensor, t, state: torch.Tensor) -> torch.Tensor:
        mean = state @ self.process.A.to(state).T
        return mean + self.oracle.x0(x_t - _col(self.schedule.alpha(as_time(t, like=x_t)), x_t) * mean, t)


@torch.no_grad()
def forecast(model, schedule: Schedule, history: torch.Tensor, horizon: int, n_samples: int, *,
             increments: bool = False, sampler: str = "ddim", n_steps: int = 50, prediction: str | None = None,
             generator=None) -> torch.Tensor:  # fmt: skip
    """``n_samples`` sample paths of the next ``horizon`` values after ``history`` (Rasul et al. 2021,
    sec. 3.2, Algorithm 2): the state after the whole history, then per step one run of
    ``SAMPLERS[sampler]`` with the denoiser ``x_t -> model.denoise(x_t, t, state)``, the drawn value fed
    back with ``model.advance``. ``increments=True``: the model was trained on the differences
    ``x_t - x_{t-1}`` (as ARIMA's ``d = 1``; for trending series); the paths are then the last
    observation plus the cumulated drawn increments. ``history`` ``(T,)`` or ``(T, K)``, complete (no NaN:
    see :func:`fill_missing`); returns ``(n_samples, horizon)`` or ``(n_samples, horizon, K)``."""
    h, n, spec = _horizon(horizon), _count("n_samples", n_samples), _sampler(sampler)
    if not torch.is_tensor(history) or history.ndim not in (1, 2) or history.shape[0] < 1 + increments:
        raise ValueError(
            f"history must be a tensor (T,) or (T, K) with T >= {1 + increments}; got {history!r}."
        )
    if history.device.type == "cpu" and not bool(torch.isfinite(history).all()):
        raise ValueError("history has NaN or infinite values: fill them first (fill_missing).")
    x = history if history.ndim == 2 else history[:, None]
    z = x.diff(dim=0) if increments else x
    state = model.encode(z[None].expand(n, *z.shape).contiguous())
    ts, kind = time_grid(schedule, _count("n_steps", n_steps), spec.grid), _prediction(model, prediction)
    steps = []
    for _ in range(h):
        denoiser = Denoiser(lambda x_t, t, s=state: model.denoise(x_t, t, s), schedule, kind)
        noise = torch.randn(n, z.shape[1], generator=generator, dtype=z.dtype, device=z.device)
        steps.append(spec.fn(denoiser, noise, ts, generator=generator, **spec.options))
        state = model.advance(state, steps[-1])
    paths = torch.stack(steps, dim=1)
    if increments:
        paths = x[-1] + paths.cumsum(dim=1)  # the forecast starts from the last observation
    return paths if history.ndim == 2 else paths[..., 0]


# ------------------------------------------------------------------------------------------------
# Proper scores: CRPS and interval coverage
# ------------------------------------------------------------------------------------------------


def crps_samples(samples: torch.Tensor, y: torch.Tensor, fair: bool = False) -> torch.Tensor:
    """CRPS of the samples' distribution at ``y`` in its energy form (Gneiting & Raftery 2007, eq. 21),
    ``E|X - y| - 1/2 E|X - X'|``, per entry: ``samples`` ``(n, ...)``, ``y`` broadcastable to ``(...)``.

    ``sum_ij |x_i - x_j| = 2 sum_k (2k - n + 1) x_(k)`` over the sorted samples (O(n log n)). ``fair=False``
    divides it by ``n^2``: the CRPS of the empirical distribution (as ``properscoring.crps_ensemble``),
    which exceeds the model's CRPS by ``E|X - X'| / 2n`` on average. ``fair=True`` divides by
    ``n (n - 1)``: an unbiased estimate of the model's CRPS (Ferro 2014's fair score); compare a sampled
    model with a closed form that way."""
    n = samples.shape[0]
    if n < 1 + fair:
        raise ValueError(f"need at least {1 + fair} samples along the first dimension; got {n}.")
    spread = (samples - y).abs().mean(0)
    k = torch.arange(n, dtype=samples.dtype, device=samples.device)
    pair_sum = 2 * torch.einsum("k,k...->...", 2 * k - n + 1, samples.sort(dim=0).values)
    return spread - pair_sum / (2 * n * (n - 1 if fair else n))


def crps_gaussian(mean, std, y) -> torch.Tensor:
    """CRPS of ``N(mean, std^2)`` at ``y`` in closed form (Gneiting et al. 2005, eq. 5; Gneiting & Raftery
    2007, sec. 4.2): ``std [z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi)]`` with ``z = (y - mean) / std``."""
    z = (y - mean) / std
    pdf = torch.exp(-(z**2) / 2) / math.sqrt(2 * math.pi)
    return std * (z * (2 * torch.special.ndtr(z) - 1) + 2 * pdf - 1 / math.sqrt(math.pi))


def _level(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"an interval's level must lie in (0, 1), e.g. 0.9; got {level!r}.")
    return float(level)


def sample_interval(samples: torch.Tensor, level: float):
    """The central interval of the samples (their ``(1 -+ level) / 2`` quantiles, along dimension 0)."""
    q = torch.tensor([(1 - _level(level)) / 2, (1 + level) / 2], dtype=samples.dtype, device=samples.device)
    lo, hi = torch.quantile(samples, q, dim=0)
    return lo, hi


def gaussian_interval(mean, std, level: float):
    """``mean -+ z std`` with ``z = Phi^-1((1 + level) / 2)`` (1.645 for 90 %)."""
    z = torch.special.ndtri(torch.tensor((1 + _level(level)) / 2, dtype=D64)).item()
    return mean - z * std, mean + z * std


def coverage(lo: torch.Tensor, hi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The share of the finite ``y`` inside ``[lo, hi]`` (NaN in ``y``: not counted)."""
    seen = torch.isfinite(y)
    return ((y >= lo) & (y <= hi) & seen).sum() / seen.sum()


# ------------------------------------------------------------------------------------------------
# Real data from statsmodels, the classical baseline, and the comparison
# ------------------------------------------------------------------------------------------------

# Each data set: how to read it from the CSV files inside statsmodels, and the classical baseline fitted
# to it: a structural (Kalman) model with a trigonometric season, or Yule's (1927) AR(2) for sunspots.
DATASETS = {
    "co2": dict(freq="weekly", model="UnobservedComponents",
                options=dict(level="local linear trend", freq_seasonal=[{"period": 52.18, "harmonics": 2}])),
    "sunspots": dict(freq="yearly", model="SARIMAX", options=dict(order=(2, 0, 0), trend="c")),
    "elnino": dict(freq="monthly", model="UnobservedComponents",
                   options=dict(level="local level", freq_seasonal=[{"period": 12, "harmonics": 3}], autoregressive=1)),
}  # fmt: skip


@dataclass(frozen=True, eq=False)
class TimeSeries:
    """A univariate series, scaled by the mean and std of its training part: ``values`` (T,) float64 with
    NaN where missing, ``times`` in decimal years, and the time ``split``: train ``[:split]``, test after."""

    name: str
    values: torch.Tensor
    times: np.ndarray
    split: int
    mean: float
    std: float
    freq: str

    @property
    def observed(self) -> torch.Tensor:
        return torch.isfinite(self.values)

    def unscale(self, x):
        """Back to the data's units."""
        return x * self.std + self.mean


def _raw(name: str):
    """``(values, decimal-year times)`` as numpy arrays, read from the files statsmodels ships."""
    from statsmodels import datasets  # imported here: statsmodels takes seconds to import

    if name == "co2":
        frame = datasets.co2.load_pandas().data
        index = frame.index
        return frame["co2"].to_numpy(float), (index.year + (index.day_of_year - 1) / 365.25).to_numpy(float)
    if name == "sunspots":
        frame = datasets.sunspots.load_pandas().data
        return frame["SUNACTIVITY"].to_numpy(float), frame["YEAR"].to_numpy(float)
    frame = datasets.elnino.load_pandas().data  # one row per year, one column per month
    years = frame["YEAR"].to_numpy(float)
    return frame.iloc[:, 1:].to_numpy(float).reshape(-1), (years[:, None] + np.arange(12) / 12).reshape(-1)


def load_series(name: str, test_fraction: float = 0.2) -> TimeSeries:
    """One of :data:`DATASETS`, standardized with its training part's mean and std, with the last
    ``test_fraction`` of the time steps as the test part. ``co2`` (Mauna Loa, weekly, 1958-2001) misses 59
    weeks: they stay NaN (unobserved), which CSDI's mask and the Kalman baseline handle as they are; a
    model that needs a complete history reads it through :func:`fill_missing`, and scores skip them."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}.")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1); got {test_fraction!r}.")
    values, times = _raw(name)
    split = int(round(len(values) * (1 - test_fraction)))
    mean, std = float(np.nanmean(values[:split])), float(np.nanstd(values[:split]))
    scaled = torch.from_numpy((values - mean) / std)
    return TimeSeries(name, scaled, times, split, mean, std, DATASETS[name]["freq"])


def fill_missing(values: torch.Tensor) -> torch.Tensor:
    """NaN replaced by linear interpolation between the nearest observed values (the nearest one at the
    ends). CPU (numpy), for data preparation."""
    x = values.detach().cpu().numpy().astype(float)
    seen = np.isfinite(x)
    if not seen.any():
        raise ValueError("the series has no observed value to interpolate from.")
    idx = np.arange(len(x))
    return torch.from_numpy(np.interp(idx, idx[seen], x[seen])).to(values)


def windows(values: torch.Tensor, length: int, stride: int = 1) -> torch.Tensor:
    """All windows ``values[i : i + length]`` for ``i = 0, stride, ...``: ``(N, length, ...)``, NaN kept."""
    length, stride = _count("length", length), _count("stride", stride)
    if values.shape[0] < length:
        raise ValueError(f"the series has {values.shape[0]} steps, fewer than one window of {length}.")
    out = values.unfold(0, length, stride)  # (N, ..., length)
    return out.movedim(-1, 1)


def fit_baseline(series: TimeSeries):
    """The data set's classical model (:data:`DATASETS`), fitted by maximum likelihood to the training
    part with statsmodels' Kalman filter (missing values are skipped by the filter). CPU by design."""
    import warnings

    from statsmodels.tsa.statespace import sarimax, structural

    if series.name not in DATASETS:
        raise ValueError(f"no baseline for {series.name!r}; DATASETS has one for {', '.join(DATASETS)}.")
    spec = DATASETS[series.name]
    cls = structural.UnobservedComponents if spec["model"] == "UnobservedComponents" else sarimax.SARIMAX
    with warnings.catch_warnings():  # convergence chatter of the optimizer; the fit is checked by its use
        warnings.simplefilter("ignore")
        return cls(series.values[: series.split].numpy(), **spec["options"]).fit(disp=False)


def baseline_forecast(fitted, history: torch.Tensor, horizon: int):
    """The baseline's Gaussian forecast ``(mean, std)``, each ``(horizon,)``, after ``history`` (NaN
    allowed), with the parameters fitted on the training part (``fitted.apply``: filtering, no refit)."""
    pred = fitted.apply(history.cpu().numpy()).get_forecast(_horizon(horizon))
    mean, var = np.asarray(pred.predicted_mean), np.asarray(pred.var_pred_mean)
    return torch.from_numpy(mean), torch.from_numpy(np.sqrt(var))


def evaluate_forecasts(series: TimeSeries, forecaster: Callable, *, horizon: int, n_origins: int = 20,
                       n_samples: int = 100, levels=(0.5, 0.9), seed: int = 0, fitted=None) -> dict:  # fmt: skip
    """Mean CRPS and interval coverage of a model's forecasts and of the baseline's, on the same
    ``n_origins`` forecast origins spread evenly over the test part, ``horizon`` steps each (scaled units).

    ``forecaster(history, horizon, n_samples, generator) -> (n_samples, horizon)`` gets the complete
    history (:func:`fill_missing`), e.g. ``lambda h, H, n, g: forecast(model, schedule, h, H, n, generator=g)``;
    its CRPS is the fair one (:func:`crps_samples`), the baseline's the Gaussian closed form. Test
    values that are missing are not scored. ``fitted``: a :func:`fit_baseline` result to reuse."""
    h, n_origins = _horizon(horizon), _count("n_origins", n_origins)
    last = len(series.values) - h
    if last < series.split:
        raise ValueError(
            f"the test part ({len(series.values) - series.split} steps) is shorter than the horizon {h}."
        )
    origins = np.unique(np.linspace(series.split, last, n_origins).round().astype(int))
    fitted = fit_baseline(series) if fitted is None else fitted
    generator, filled = torch.Generator().manual_seed(seed), fill_missing(series.values)
    names = ["crps"] + [f"coverage_{round(100 * lv)}" for lv in levels]
    scores = {who: {k: [] for k in names} for who in ("model", "baseline")}
    for o in origins:
        truth = series.values[o : o + h]
        seen = torch.isfinite(truth)
        samples = forecaster(filled[:o], h, n_samples, generator).to(D64).cpu()
        if samples.shape != (n_samples, h):
            raise ValueError(
                f"the forecaster must return ({n_samples}, {h}) samples; got {tuple(samples.shape)}."
            )
        mean, std = baseline_forecast(fitted, series.values[:o], h)
        intervals = {"model": [sample_interval(samples, lv) for lv in levels]}
        intervals["baseline"] = [gaussian_interval(mean, std, lv) for lv in levels]
        crps = {"model": crps_samples(samples, truth, fair=True), "baseline": crps_gaussian(mean, std, truth)}
        for who, score in scores.items():
            inside = [((truth >= lo) & (truth <= hi)).to(D64) for lo, hi in intervals[who]]
            for k, v in zip(names, [crps[who], *inside]):
                score[k].append(v[seen])
    out = {who: {k: torch.cat(v).mean().item() for k, v in s.items()} for who, s in scores.items()}
    return {
        **out,
        "origins": origins.tolist(),
        "horizon": h,
        "scored": len(torch.cat(scores["model"]["crps"])),
    }
