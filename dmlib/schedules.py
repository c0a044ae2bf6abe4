"""Noise schedules: a Gaussian diffusion is a pair of curves ``x_t = alpha(t) x_0 + sigma(t) eps``.

Every schedule here is variance preserving (``alpha^2 + sigma^2 = 1``) and is defined by its
cumulative signal fraction ``abar(t) = alpha(t)^2`` on continuous time ``t in [0, 1]``
(Ho et al. 2020 write ``abar_t``; Kingma et al. 2021 write the same curve as the log-SNR
``lambda(t) = log(alpha^2 / sigma^2)``). The discrete DDPM chain with ``T`` steps is the
schedule read at ``t = i / T`` (:func:`ddpm_tables`).
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
    """``t`` as a float tensor, checked to lie in [0, 1] (a clear error instead of a NaN later)."""
    if not torch.is_tensor(t):  # python numbers: float64, so t = i / T is exact enough for any T
        t = torch.tensor(t, dtype=like.dtype if like is not None else torch.float64)
    if not torch.is_floating_point(t):
        t = t.to(torch.get_default_dtype())
    if like is not None:
        t = t.to(like.device)
    if t.numel() and (not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1):
        raise ValueError(
            f"time t must lie in [0, 1] (continuous time; discrete step i is t = i / T); "
            f"got values from {t.min().item():g} to {t.max().item():g}."
        )
    return t


class Schedule:
    """Base class: subclasses define ``log_alpha_bar(t)``; everything else derives from it."""

    name = "schedule"

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
        """``lambda(t) = log(alpha^2 / sigma^2)`` (Kingma et al. 2021, eq. 3); +inf at t = 0."""
        log_abar = self._log_abar(t)
        return log_abar - torch.log(-torch.expm1(log_abar))

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

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Linear(Schedule):
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


class Cosine(Schedule):
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


class Sigmoid(Schedule):
    """Sigmoid schedule (Jabri et al. 2023; Chen 2023, Algorithm 1):
    ``abar(t) = (sig(e/tau) - sig((t (e - s) + s)/tau)) / (sig(e/tau) - sig(s/tau))``."""

    name = "sigmoid"

    def __init__(self, start: float = -3.0, end: float = 3.0, tau: float = 1.0):
        if not (start < end and tau > 0):
            raise ValueError(f"need start < end and tau > 0; got start={start}, end={end}, tau={tau}.")
        self.start, self.end, self.tau = start, end, tau

    def log_alpha_bar(self, t):
        v_start = torch.sigmoid(torch.tensor(self.start / self.tau, dtype=t.dtype))
        v_end = torch.sigmoid(torch.tensor(self.end / self.tau, dtype=t.dtype))
        v = torch.sigmoid((t * (self.end - self.start) + self.start) / self.tau)
        return torch.log(((v_end - v) / (v_end - v_start)).clamp(min=1e-20))


SCHEDULES = {"linear": Linear, "cosine": Cosine, "sigmoid": Sigmoid}


def get_schedule(name: str, **kwargs) -> Schedule:
    """A schedule by name: ``get_schedule("cosine")``."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}.")
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
    if int(T) != T or T < 1:
        raise ValueError(f"T must be a positive integer number of steps; got {T!r}.")
    t = torch.arange(T + 1, dtype=torch.float64) / T
    abar = schedule.alpha_bar(t)
    betas = torch.cat([abar.new_zeros(1), 1 - abar[1:] / abar[:-1]])
    return DDPMTables(betas)
