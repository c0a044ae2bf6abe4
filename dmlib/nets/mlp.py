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


def _stack(width: int, hidden: int, depth: int, out: int) -> nn.Sequential:
    """``(Linear, SiLU) x depth -> Linear``: the body of both MLPs (same parameter names as before)."""
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, out))


class MLP(nn.Module):
    """``f(x, t)`` for vectors: ``[x, emb(t)] -> (Linear, SiLU) x depth -> Linear``."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 32):
        super().__init__()
        _check_even(time_dim)
        self.dim, self.time_dim = dim, time_dim
        self.net = _stack(dim + time_dim, hidden, depth, dim)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        """``x`` of shape (B, dim); ``t`` in [0, 1], a scalar or shape (B,) (:func:`embed_time`)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP expects x of shape (B, {self.dim}); got {tuple(x.shape)}.")
        return self.net(torch.cat([x, embed_time(t, x, self.time_dim)], dim=1))


class ConditionalMLP(nn.Module):
    """``f(x, t, y)``: the :class:`MLP` with a learned class embedding, ``[x, emb(t), E[y]] -> ...``.

    Labels ``0..num_classes-1`` and the null class ``num_classes`` (also used for ``y=None``), which a
    trainer for classifier-free guidance substitutes for dropped labels (Ho & Salimans 2022), checked
    as :func:`dmlib.nets.adm.class_labels` checks them. ``x`` has shape (B, dim) or (B, ...) with
    ``dim`` values per sample (e.g. an 8x8 image for ``dim=64``): flattened in, the output reshaped
    to ``x``'s shape.
    """

    def __init__(
        self, dim: int = 2, num_classes: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 32,
        class_dim: int = 32,
    ):  # fmt: skip
        super().__init__()
        _check_even(time_dim)
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}.")
        self.config = dict(dim=dim, num_classes=num_classes, hidden=hidden, depth=depth, time_dim=time_dim,
                           class_dim=class_dim)  # fmt: skip
        self.dim, self.num_classes, self.time_dim = dim, int(num_classes), time_dim
        self.label_embed = nn.Embedding(self.num_classes + 1, class_dim)  # + 1: the null class
        self.net = _stack(dim + time_dim + class_dim, hidden, depth, dim)

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` as above; ``t`` in [0, 1] (:func:`embed_time`); ``y`` integer labels (B,) or ``None``."""
        from .adm import class_labels  # here, not at the top: adm imports this module

        if x.ndim < 2 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError(
                f"ConditionalMLP expects x of shape (B, {self.dim}) or (B, ...) with {self.dim} values per "
                f"sample; got {tuple(x.shape)}."
            )
        flat = x.reshape(x.shape[0], -1)
        labels = self.label_embed(class_labels(y, flat, self.num_classes)).to(flat.dtype)
        return self.net(torch.cat([flat, embed_time(t, flat, self.time_dim), labels], dim=1)).reshape(x.shape)
