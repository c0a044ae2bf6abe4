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
    half = dim // 2
    dtype = t.dtype if t.is_floating_point() else torch.float32  # float64 times keep their precision
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = 1000 * t.to(dtype)[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class MLP(nn.Module):
    """``f(x, t)`` for vectors: ``[x, emb(t)] -> (Linear, SiLU) x depth -> Linear``."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 32):
        super().__init__()
        self.dim, self.time_dim = dim, time_dim
        layers, width = [], dim + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP expects x of shape (B, {self.dim}); got {tuple(x.shape)}.")
        emb = timestep_embedding(t.expand(x.shape[0]) if t.ndim == 0 else t, self.time_dim)
        return self.net(torch.cat([x, emb.to(x.dtype)], dim=1))
