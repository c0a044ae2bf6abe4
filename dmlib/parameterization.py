"""What a network predicts, and one :class:`Denoiser` view that every sampler uses.

With ``x_t = alpha x_0 + sigma eps`` a network may predict the noise ``eps`` (Ho et al. 2020),
the data ``x_0``, the velocity ``v = alpha eps - sigma x_0`` (Salimans & Ho 2022, sec. 4) or the
score ``grad log q_t(x_t) = -eps / sigma`` (Tweedie's formula; Efron 2011). Any one determines
the others given ``x_t``; the formulas below hold for any ``alpha, sigma`` (not only VP).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .schedules import Schedule, as_time

PREDICTIONS = ("eps", "x0", "v", "score")


def noise_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise of x's shape, dtype and device, drawn from ``generator`` (reproducible)."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _col(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample coefficient of shape () or (B,) against x of shape (B, ...)."""
    c = c.to(dtype=x.dtype, device=x.device)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim)) if c.ndim else c


def to_x0_eps(pred: torch.Tensor, kind: str, x_t: torch.Tensor, alpha, sigma):
    """Convert a prediction of type ``kind`` into the pair ``(x0_hat, eps_hat)``.

    eps:   x0 = (x_t - sigma eps) / alpha
    x0:    eps = (x_t - alpha x0) / sigma
    v:     x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2),  eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)
    score: eps = -sigma * score
    """
    a, s = _col(alpha, x_t), _col(sigma, x_t)
    if kind == "eps":
        return (x_t - s * pred) / a, pred
    if kind == "x0":
        return pred, (x_t - a * pred) / s
    if kind == "v":
        norm = a**2 + s**2
        return (a * x_t - s * pred) / norm, (s * x_t + a * pred) / norm
    if kind == "score":
        eps = -s * pred
        return (x_t - s * eps) / a, eps
    raise ValueError(f"unknown prediction type {kind!r}; choose one of {', '.join(PREDICTIONS)}.")


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, kind: str, alpha, sigma) -> torch.Tensor:
    """The prediction of type ``kind`` that corresponds to ``(x0, eps)`` (inverse of :func:`to_x0_eps`)."""
    a, s = _col(alpha, x0), _col(sigma, x0)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return a * eps - s * x0
    if kind == "score":
        return -eps / s
    raise ValueError(f"unknown prediction type {kind!r}; choose one of {', '.join(PREDICTIONS)}.")


class Denoiser:
    """One view of a model ``model(x_t, t) -> prediction`` under a schedule.

    ``t`` reaches the model as a scalar tensor (one time for the batch) or with shape (B,).

    Samplers only call :meth:`x0`, :meth:`eps`, :meth:`v` and :meth:`score`, so a trained network,
    the exact oracle of a Gaussian mixture and a student's function all plug in the same way.
    ``clip_x0=(-1, 1)`` clamps the data estimate, as image models commonly do.
    """

    def __init__(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        schedule: Schedule,
        prediction: str = "eps",
        clip_x0: tuple[float, float] | None = None,
    ):
        if prediction not in PREDICTIONS:
            raise ValueError(
                f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}."
            )
        if clip_x0 is not None and not (len(clip_x0) == 2 and clip_x0[0] < clip_x0[1]):
            raise ValueError(f"clip_x0 must be a range (lo, hi) with lo < hi, e.g. (-1, 1); got {clip_x0!r}.")
        self.model, self.schedule, self.prediction, self.clip_x0 = model, schedule, prediction, clip_x0

    def x0_eps(self, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat, eps_hat)`` at ``(x_t, t)``; ``t`` is a scalar or one time per sample."""
        # a scalar t stays scalar: the oracle is much cheaper with one time per batch
        t = as_time(t, like=x_t)
        if t.ndim != 0 and t.shape != x_t.shape[:1]:
            raise ValueError(f"t must be a scalar or have shape ({x_t.shape[0]},); got {tuple(t.shape)}.")
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        pred = self.model(x_t, t)
        if not torch.is_tensor(pred) or pred.shape != x_t.shape:
            got = tuple(pred.shape) if torch.is_tensor(pred) else type(pred).__name__
            raise ValueError(
                f"the model must return a {self.prediction} prediction of x's shape {tuple(x_t.shape)}; "
                f"got {got}. (A network with extra outputs, e.g. a learned variance, needs a wrapper.)"
            )
        x0, eps = to_x0_eps(pred, self.prediction, x_t, alpha, sigma)
        if self.clip_x0 is not None:
            x0 = x0.clamp(*self.clip_x0)
            eps = (x_t - _col(alpha, x_t) * x0) / _col(sigma, x_t)
        return x0, eps

    def x0(self, x_t, t):
        return self.x0_eps(x_t, t)[0]

    def eps(self, x_t, t):
        return self.x0_eps(x_t, t)[1]

    def v(self, x_t, t):
        t = as_time(t, like=x_t)
        x0, eps = self.x0_eps(x_t, t)
        return from_x0_eps(x0, eps, "v", self.schedule.alpha(t), self.schedule.sigma(t))

    def score(self, x_t, t):
        """``grad_x log q_t(x) = -eps_hat / sigma(t)`` (Tweedie / denoising score matching)."""
        t = as_time(t, like=x_t)
        return -self.eps(x_t, t) / _col(self.schedule.sigma(t), x_t)
