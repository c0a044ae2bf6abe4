"""The time-conditioned MLP for 2D data, and the time features every network of the library uses."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of continuous time (Vaswani et al. 2017, sec. 3.5), shape (B, dim).

    ``t in [0, 1]`` is scaled by 1000 so the frequencies resolve the 1000 steps of a DDPM chain.
    """
    if t.ndim != 1:
        raise ValueError(f"t must have shape (B,); got {tuple(t.shape)}.")
    _check_even(dim)
    half = dim // 2
    dtype = t.dtype if t.is_floating_point() else torch.float32  # float64 times keep their precision
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = 1000 * t.to(dtype)[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


def _check_even(dim) -> None:
    if isinstance(dim, bool) or int(dim) != dim or dim < 2 or dim % 2:
        raise ValueError(
            f"the sinusoidal time embedding needs an even dimension >= 2 (a sine and a cosine per "
            f"frequency); got {dim!r}."
        )


def embed_time(t, x: torch.Tensor, dim: int) -> torch.Tensor:
    """The checked sinusoidal features of a network's time input, shape ``(B, dim)`` in ``x``'s dtype.

    Every network here takes continuous time ``t`` in [0, 1] (step ``i`` of a ``T``-step chain is
    ``t = i / T``): a Python number or a tensor, a scalar (one time for the batch) or of shape (B,).
    An integer tensor (a step index) or, on the CPU where it costs no device wait, a value outside
    [0, 1] is refused with a clear error. The features are computed in at least float32, then cast:
    casting ``t`` to bf16 first would be a silent bug, since 0.500 and 0.501 are one bf16 number.
    """
    t = torch.as_tensor(t, device=x.device)
    if not t.is_floating_point():
        raise ValueError(
            f"t must be a continuous time in [0, 1] (a float); got a {t.dtype} tensor. "
            f"For step i of a T-step chain pass t = i / T."
        )
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},); got {tuple(t.shape)}.")
    if t.device.type == "cpu" and bool(((t < 0) | (t > 1)).any()):
        raise ValueError(
            f"t must lie in [0, 1]; got values up to {t.max().item():g}. "
            f"For step i of a T-step chain pass t = i / T."
        )
    return timestep_embedding(t.to(torch.promote_types(t.dtype, torch.float32)), dim).to(x.dtype)


class MLP(nn.Module):
    """``f(x, t)`` for vectors: ``[x, emb(t)] -> (Linear, SiLU) x depth -> Linear``."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 32):
        super().__init__()
        _check_even(time_dim)
        self.dim, self.time_dim = dim, time_dim
        layers, width = [], dim + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        """``x`` of shape (B, dim); ``t`` in [0, 1], a scalar or shape (B,) (:func:`embed_time`)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP expects x of shape (B, {self.dim}); got {tuple(x.shape)}.")
        return self.net(torch.cat([x, embed_time(t, x, self.time_dim)], dim=1))
