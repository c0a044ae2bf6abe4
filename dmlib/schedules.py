"""Noise schedules: a Gaussian diffusion is a pair of curves ``x_t = alpha(t) x_0 + sigma(t) eps``.

Time is continuous, ``t in [0, 1]``. The variance-preserving schedules (``alpha^2 + sigma^2 = 1``:
linear, cosine, sigmoid) are defined by their cumulative signal fraction ``abar(t) = alpha(t)^2``
(Ho et al. 2020 write ``abar_t``; Kingma et al. 2021 write the same curve as the log-SNR
``lambda(t) = log(alpha^2 / sigma^2)``). The discrete DDPM chain with ``T`` steps is such a
schedule read at ``t = i / T`` (:func:`ddpm_tables`). The variance-exploding and sub-VP schedules
of Song et al. (2021) are pairs of curves too; each schedule also gives its forward SDE
``dx = f(t) x dt + g(t) dw`` (:meth:`Schedule.drift_diffusion`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# cosine and sigmoid reach abar = 0 exactly at t = 1, where eps -> x0 conversions divide by zero.
# iDDPM clips betas at 0.999 for the same reason; capping log abar at -20 (abar >= 2e-9,
# log-SNR >= -20) matches the abar_T that clipping gives for T = 1000.
LOG_ABAR_MIN = -20.0


def as_time(t, like: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` as a float tensor (on ``like``'s device if given), checked to lie in [0, 1] (a clear error
    instead of a NaN later).

    The check reads the values back to Python, which is free for numbers and CPU tensors but would stall
    an accelerator at every call: times that already live on another device (those the losses draw there)
    are not checked.
    """
    if not torch.is_tensor(t):  # python numbers: float64, so t = i / T is exact enough for any T
        t = torch.tensor(t, dtype=like.dtype if like is not None else torch.float64)
    if not torch.is_floating_point(t):
        t = t.to(torch.get_default_dtype())
    if t.device.type == "cpu" and t.numel() and (not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1):
        raise ValueError(
            f"time t must lie in [0, 1] (continuous time; discrete step i is t = i / T); "
            f"got values from {t.min().item():g} to {t.max().item():g}."
        )
    return t if like is None else t.to(like.device)


class Schedule:
    """Base class: a Gaussian diffusion ``x_t = alpha(t) x_0 + sigma(t) eps`` on ``t in [0, 1]``.

    Subclasses define :meth:`alpha` and :meth:`sigma`; the log-SNR, its inverse, the transition
    ``q(x_t | x_s)`` and the SDE coefficients ``(f, g^2)`` (:meth:`drift_diffusion`) follow from them.
    """

    name = "schedule"
    variance_preserving = False

    def alpha(self, t) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t) -> torch.Tensor:
        raise NotImplementedError

    def alpha_bar(self, t) -> torch.Tensor:
        """``abar(t) = alpha(t)^2`` (Ho et al. 2020 write it for the cumulative product of eq. 4)."""
        return self.alpha(t) ** 2

    def log_snr(self, t) -> torch.Tensor:
        """``lambda(t) = log(alpha^2 / sigma^2)`` (Kingma et al. 2021, eq. 3); +inf where sigma = 0."""
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def snr(self, t) -> torch.Tensor:
        return self.log_snr(t).exp()

    def t_from_log_snr(self, log_snr: torch.Tensor, iterations: int = 60) -> torch.Tensor:
        """Inverse of :meth:`log_snr` by bisection in float64 (log-SNR decreases monotonically in t).

        Values above ``lambda(0)`` map to 0 and below ``lambda(1)`` map to 1.
        """
        target = torch.as_tensor(log_snr, dtype=torch.float64)
        lo = torch.zeros_like(target)
        hi = torch.ones_like(target)
        for _ in range(iterations):  # 60 halvings: interval below float64 resolution
            mid = (lo + hi) / 2
            too_early = self.log_snr(mid) > target  # still too much signal: answer lies later
            lo = torch.where(too_early, mid, lo)
            hi = torch.where(too_early, hi, mid)
        return ((lo + hi) / 2).to(
            torch.as_tensor(log_snr).dtype if torch.is_tensor(log_snr) else torch.float64
        )

    def transition(self, t, s) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2 I)`` for ``s < t``, in float64.

        ``alpha_{t|s} = alpha_t / alpha_s`` and ``sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2``
        (Kingma et al. 2021, eq. 20-21). Returns ``(alpha_{t|s}, sigma_{t|s}^2)``.
        """
        t, s = as_time(t).to(torch.float64), as_time(s).to(torch.float64)
        a_ts = self.alpha(t) / self.alpha(s)
        return a_ts, self.sigma(t) ** 2 - a_ts**2 * self.sigma(s) ** 2

    def drift_diffusion(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward SDE ``dx = f(t) x dt + g(t) dw`` whose marginals are this schedule: ``(f, g^2)``.

        For any pair of curves, ``f = d log alpha / dt`` and ``g^2 = d sigma^2 / dt - 2 f sigma^2``
        (Kingma et al. 2021, appendix A.1; Song et al. 2021, eq. 5.50-5.51 solved for f and g). This
        generic version differentiates with autograd in float64; the schedules of Song et al. (2021)
        override it with their printed closed forms, and a test checks that both agree.
        """
        # samplers run under torch.no_grad(); without enable_grad every derivative would be 0
        with torch.enable_grad():
            t = as_time(t).to(torch.float64).detach().requires_grad_(True)
            log_alpha, var = torch.log(self.alpha(t)), self.sigma(t) ** 2

            def d_dt(y):  # a constant curve (VE's alpha = 1) carries no graph: its derivative is 0
                if not y.requires_grad:
                    return torch.zeros_like(t)
                return torch.autograd.grad(y.sum(), t, retain_graph=True)[0]

            f, dvar = d_dt(log_alpha), d_dt(var)
        return f.detach(), (dvar - 2 * f * var).detach()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class VarianceExploding(Schedule):
    """VE SDE of Song et al. (2021), eq. 30: ``alpha = 1``, ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``
    (the geometric noise levels of NCSN, Song & Ermon 2019), with
    ``f = 0`` and ``g^2 = d sigma^2 / dt = 2 sigma(t)^2 log(sigma_max / sigma_min)``.

    ``sigma_max`` should be about the largest distance between data points (Song & Ermon 2020,
    technique 1), so that ``N(0, sigma_max^2 I)`` covers the data.
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 5.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}."
            )
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def alpha(self, t):
        return torch.ones_like(as_time(t))

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** as_time(t)

    def log_snr(self, t):
        return -2 * torch.log(self.sigma(t))

    def transition(self, t, s):
        t, s = as_time(t).to(torch.float64), as_time(s).to(torch.float64)
        return torch.ones_like(t), self.sigma(t) ** 2 - self.sigma(s) ** 2

    def drift_diffusion(self, t):
        sig = self.sigma(as_time(t).to(torch.float64))
        return torch.zeros_like(sig), 2 * sig**2 * math.log(self.sigma_max / self.sigma_min)


class VariancePreserving(Schedule):
    """A variance-preserving schedule (``alpha^2 + sigma^2 = 1``), defined by ``log abar(t)``.

    Subclasses define ``log_alpha_bar(t)``; ``alpha = sqrt(abar)`` and ``sigma = sqrt(1 - abar)``.
    Its SDE is the VP SDE, ``f = -beta(t) / 2`` and ``g^2 = beta(t) = -d log abar / dt``
    (Song et al. 2021, eq. 11).
    """

    variance_preserving = True

    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _log_abar(self, t) -> torch.Tensor:
        # clamped into [LOG_ABAR_MIN, 0]: rounding can give log abar(0) = +1e-17, and sigma = sqrt(-1e-17) is NaN
        return self.log_alpha_bar(as_time(t)).clamp(LOG_ABAR_MIN, 0.0)

    def alpha_bar(self, t) -> torch.Tensor:
        """``abar(t) = alpha(t)^2``, Ho et al. (2020) eq. 4's cumulative product in continuous time."""
        return self._log_abar(t).exp()

    def alpha(self, t) -> torch.Tensor:
        """Signal scale ``alpha(t) = sqrt(abar(t))``."""
        return self.alpha_bar(t).sqrt()

    def sigma(self, t) -> torch.Tensor:
        """Noise scale ``sigma(t) = sqrt(1 - abar(t))`` (computed with expm1 to keep precision near t = 0)."""
        return (-torch.expm1(self._log_abar(t))).sqrt()

    def log_snr(self, t) -> torch.Tensor:
        """``lambda(t) = log(abar / (1 - abar))``; +inf at t = 0."""
        log_abar = self._log_abar(t)
        return log_abar - torch.log(-torch.expm1(log_abar))

    def transition(self, t, s):
        """As :meth:`Schedule.transition`, with ``sigma_{t|s}^2 = beta_{t|s} = 1 - abar_t / abar_s``
        computed as ``-expm1(log abar_t - log abar_s)``: the plain difference of two numbers near 1
        loses float32 precision for the small steps of a 1000-step chain."""
        t, s = as_time(t).to(torch.float64), as_time(s).to(torch.float64)
        log_ratio = self._log_abar(t) - self._log_abar(s)
        return (log_ratio / 2).exp(), -torch.expm1(log_ratio)


class Linear(VariancePreserving):
    """VP schedule with linear ``beta(t) = beta_min + t (beta_max - beta_min)`` (Song et al. 2021, VP SDE).

    ``abar(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2))``. Read at T = 1000 steps its
    betas are close to Ho et al.'s ``linspace(1e-4, 0.02, 1000)`` (Chapter 1 measures how close).
    """

    name = "linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 < beta_min <= beta_max:
            raise ValueError(f"need 0 < beta_min <= beta_max; got beta_min={beta_min}, beta_max={beta_max}.")
        self.beta_min, self.beta_max = beta_min, beta_max

    def log_alpha_bar(self, t):
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def t_from_log_snr(self, log_snr, iterations: int = 60) -> torch.Tensor:
        """Closed-form inverse: ``abar = sigmoid(lambda)``, so ``B(t) = softplus(-lambda)``, a quadratic in t
        (``B(t) = beta_min t + (beta_max - beta_min) t^2 / 2``). Values outside ``[lambda(1), lambda(0)]``
        clamp to 1 and 0, as for the bisection of the base class."""
        lam = torch.as_tensor(log_snr, dtype=torch.float64)
        B = torch.nn.functional.softplus(-lam)
        d = self.beta_max - self.beta_min
        if d == 0:
            t = B / self.beta_min
        else:
            t = (-self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * B)) / d
        out = t.clamp(0.0, 1.0)
        return out.to(log_snr.dtype) if torch.is_tensor(log_snr) else out

    def beta(self, t) -> torch.Tensor:
        """``beta(t) = beta_min + t (beta_max - beta_min)``."""
        return self.beta_min + as_time(t) * (self.beta_max - self.beta_min)

    def drift_diffusion(self, t):
        """VP SDE (Song et al. 2021, eq. 11): ``f = -beta(t) / 2``, ``g^2 = beta(t)``."""
        beta = self.beta(as_time(t).to(torch.float64))
        return -beta / 2, beta


class SubVP(Schedule):
    """sub-VP SDE of Song et al. (2021), eq. 32: ``dx = -beta x / 2 dt + sqrt(beta (1 - e^{-2 B(t)})) dw``
    with ``B(t) = int_0^t beta`` and the linear ``beta`` of :class:`Linear`.

    Its mean is the VP mean, ``alpha = e^{-B/2}``, but its variance is ``sigma^2 = (1 - e^{-B})^2``,
    below the VP variance ``1 - e^{-B}`` at every t (hence the name).
    """

    name = "subvp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self._vp = Linear(beta_min, beta_max)  # validates the betas
        self.beta_min, self.beta_max = beta_min, beta_max

    def alpha(self, t):
        return self._vp.alpha(t)

    def sigma(self, t):
        return -torch.expm1(self._vp._log_abar(t))  # 1 - e^{-B(t)}

    def drift_diffusion(self, t):
        t = as_time(t).to(torch.float64)
        beta = self._vp.beta(t)
        return -beta / 2, beta * -torch.expm1(2 * self._vp._log_abar(t))


class Cosine(VariancePreserving):
    """Cosine schedule of Nichol & Dhariwal (2021), eq. 17: ``abar(t) = f(t) / f(0)``,
    ``f(t) = cos^2(((t + s) / (1 + s)) pi / 2)`` with offset ``s = 0.008``."""

    name = "cosine"

    def __init__(self, s: float = 0.008):
        if s < 0:
            raise ValueError(f"cosine offset s must be >= 0; got {s}.")
        self.s = s

    def log_alpha_bar(self, t):
        log_f0 = 2 * math.log(math.cos(self.s / (1 + self.s) * math.pi / 2))
        return 2 * torch.log(torch.cos((t + self.s) / (1 + self.s) * math.pi / 2).clamp(min=1e-20)) - log_f0


class Sigmoid(VariancePreserving):
    """Sigmoid schedule (Jabri et al. 2023; Chen 2023, Algorithm 1):
    ``abar(t) = (sig(e/tau) - sig((t (e - s) + s)/tau)) / (sig(e/tau) - sig(s/tau))``."""

    name = "sigmoid"

    def __init__(self, start: float = -3.0, end: float = 3.0, tau: float = 1.0):
        if not (start < end and tau > 0):
            raise ValueError(f"need start < end and tau > 0; got start={start}, end={end}, tau={tau}.")
        self.start, self.end, self.tau = start, end, tau

    def log_alpha_bar(self, t):
        v_start = torch.sigmoid(torch.tensor(self.start / self.tau, dtype=t.dtype, device=t.device))
        v_end = torch.sigmoid(torch.tensor(self.end / self.tau, dtype=t.dtype, device=t.device))
        v = torch.sigmoid((t * (self.end - self.start) + self.start) / self.tau)
        return torch.log(((v_end - v) / (v_end - v_start)).clamp(min=1e-20))


SCHEDULES = {"linear": Linear, "cosine": Cosine, "sigmoid": Sigmoid, "ve": VarianceExploding, "subvp": SubVP}


def get_schedule(name: str, **kwargs) -> Schedule:
    """A schedule by name: ``get_schedule("cosine")``; ``"linear_path"`` is flow matching's straight path
    (:class:`dmlib.flows.LinearPath`)."""
    if name == "linear_path":  # defined in dmlib.flows, which imports this module: imported on request
        from .flows import LinearPath

        return LinearPath(**kwargs)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}, linear_path.")
    return SCHEDULES[name](**kwargs)


@dataclass(frozen=True)
class DDPMTables:
    """The discrete DDPM tables of Ho et al. (2020), indexed so that ``betas[t]`` is ``beta_t``.

    Index 0 is the data: ``betas[0] = 0`` and ``alphas_cumprod[0] = 1``; steps are ``t = 1..T``.
    """

    betas: torch.Tensor  # (T + 1,)

    def __post_init__(self):
        b = self.betas
        if b.ndim != 1 or b.numel() < 2:
            raise ValueError(
                f"betas must be a 1-D tensor [0, beta_1, ..., beta_T]; got shape {tuple(b.shape)}."
            )
        if b[0] != 0:
            raise ValueError(f"betas[0] is the data step and must be 0; got {b[0].item():g}.")
        inner = b[1:]
        bad = ~((inner > 0) & (inner < 1))
        if bad.any():
            i = int(bad.nonzero()[0]) + 1
            raise ValueError(f"every beta_t must lie in (0, 1); beta_{i} = {b[i].item():g}.")

    @classmethod
    def from_betas(cls, betas) -> DDPMTables:
        """Tables from ``[beta_1, ..., beta_T]`` as printed in a paper (a 0 is prepended for index 0)."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        return cls(torch.cat([betas.new_zeros(1), betas]))

    @property
    def T(self) -> int:
        return self.betas.numel() - 1

    @property
    def alphas(self) -> torch.Tensor:
        """``alpha_t = 1 - beta_t``."""
        return 1 - self.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """``abar_t = prod_{s <= t} alpha_s`` (Ho et al. 2020, eq. 4)."""
        return torch.cumprod(self.alphas, 0)

    @property
    def posterior_variance(self) -> torch.Tensor:
        """``betatilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)`` (Ho et al. 2020, eq. 7); 0 at t = 0."""
        abar = self.alphas_cumprod
        out = torch.zeros_like(self.betas)
        out[1:] = self.betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])
        return out


def ddpm_tables(schedule: Schedule, T: int) -> DDPMTables:
    """Read a continuous schedule at ``t = i / T``: ``beta_i = 1 - abar(i/T) / abar((i-1)/T)``."""
    if not schedule.variance_preserving:
        raise ValueError(
            f"DDPM tables need a variance-preserving schedule (linear, cosine, sigmoid); got {schedule!r}."
        )
    if int(T) != T or T < 1:
        raise ValueError(f"T must be a positive integer number of steps; got {T!r}.")
    t = torch.arange(T + 1, dtype=torch.float64) / T
    abar = schedule.alpha_bar(t)
    betas = torch.cat([abar.new_zeros(1), 1 - abar[1:] / abar[:-1]])
    return DDPMTables(betas)
