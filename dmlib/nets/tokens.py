"""Small transformers for token sequences: a bidirectional denoiser for discrete diffusion and a causal
next-token model of the same size, the autoregressive baseline.

Tokens are ids ``0..K-1`` in a LongTensor (B, D); the mask (absorbing) token of :mod:`dmlib.discrete` is
the extra id ``K``. Both networks are the same stack: token embedding + learned position embedding,
``depth`` pre-LayerNorm blocks (multi-head self-attention by ``scaled_dot_product_attention``, then a
GELU MLP), a final LayerNorm and a linear head to K logits per position.

* :class:`TokenDenoiser` ``model(x_t, t) -> (B, D, K)``: ``x_t`` in ``0..K`` (the mask is an input),
  ``t`` in [0, 1] (``t = 0`` is data), embedded by :func:`~dmlib.nets.mlp.embed_time` and an MLP and
  added to every token; attention sees the whole sequence. The logits are over clean tokens only.
* :class:`CausalTokenModel` ``model(x) -> (B, D, K)``: the logits at position ``i`` are those of
  ``p(x_i | x_<i)`` (a causal mask; the inputs are shifted right behind a learned start embedding), so
  they depend only on the tokens before ``i``. :func:`ar_loss`, :func:`ar_log_likelihood` and
  :func:`ar_sample` train, score and sample it.

At equal ``width`` and ``depth`` the two differ only by the denoiser's time MLP (``2 (width^2 + width)``
parameters) and its mask embedding, a few percent of a small model (:func:`count_parameters`).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn
from torch.nn import functional as F

from .flops import count_parameters
from .mlp import embed_time

__all__ = [
    "TokenDenoiser",
    "CausalTokenModel",
    "ar_loss",
    "ar_log_likelihood",
    "ar_sample",
    "count_parameters",
]


def _check_size(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}; got {value!r}.")
    return int(value)


def check_tokens(x, D: int, ids: int, what: str = "x") -> None:
    """``x`` is a LongTensor (B, D) of ids ``0..ids-1``; the values are checked on the CPU only (on an
    accelerator the check would wait for the device)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.long:
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a LongTensor (torch.int64) of token ids; got {kind}.")
    if x.ndim != 2 or x.shape[1] != D:
        raise ValueError(f"{what} must have shape (B, {D}); got {tuple(x.shape)}.")
    if x.device.type == "cpu" and x.numel() and bool(((x < 0) | (x >= ids)).any()):
        raise ValueError(
            f"{what} must hold ids in 0..{ids - 1}; got values from {x.min().item()} to {x.max().item()}."
        )


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``h + attn(LN(h))``, then ``h + mlp(LN(h))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
        )

    def attention(self, h: torch.Tensor, causal: bool) -> torch.Tensor:
        B, N, W = h.shape
        q, k, v = self.qkv(h).reshape(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, heads, N, W / heads)
        return self.proj(out.transpose(1, 2).reshape(B, N, W))

    def forward(self, h: torch.Tensor, causal: bool = False) -> torch.Tensor:
        h = h + self.attention(self.norm1(h), causal)
        return h + self.mlp(self.norm2(h))


class _TokenTransformer(nn.Module):
    """The stack both models share; subclasses embed their inputs and call :meth:`head_logits`."""

    causal = False

    def __init__(self, K: int, D: int, width: int, depth: int, heads: int, inputs: int):
        super().__init__()
        self.K, self.D = _check_size("K", K, 2), _check_size("D", D)
        width, depth, heads = (
            _check_size("width", width, 2),
            _check_size("depth", depth, 0),
            _check_size("heads", heads),
        )
        if width % heads or width % 2:
            raise ValueError(f"width must be even and split into {heads} heads; got {width}.")
        self.config = dict(K=self.K, D=self.D, width=width, depth=depth, heads=heads)
        self.width = width
        self.embed = nn.Embedding(inputs, width)
        self.pos = nn.Parameter(torch.zeros(self.D, width))
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, self.K)
        for m in self.modules():  # GPT-2's initialization: N(0, 0.02) weights, zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos, std=0.02)

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, self.causal)
        return self.head(self.norm(h))  # (B, D, K)


class TokenDenoiser(_TokenTransformer):
    """``model(x_t, t) -> (B, D, K)`` logits of the clean tokens, for ``x_t`` (B, D) in ``0..K`` (``K`` is
    the mask) and ``t`` in [0, 1], a scalar or shape (B,). Bidirectional attention."""

    def __init__(self, K: int, D: int, width: int = 128, depth: int = 3, heads: int = 4):
        super().__init__(K, D, width, depth, heads, inputs=K + 1)
        self.time_mlp = nn.Sequential(
            nn.Linear(self.width, self.width), nn.SiLU(), nn.Linear(self.width, self.width)
        )
        for m in self.time_mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        check_tokens(x_t, self.D, self.K + 1, "x_t")
        h = self.embed(x_t) + self.pos
        return self.head_logits(h + self.time_mlp(embed_time(t, h, self.width))[:, None])


class CausalTokenModel(_TokenTransformer):
    """``model(x) -> (B, D, K)``: at position ``i`` the logits of ``p(x_i | x_<i)``, for ``x`` (B, D) in
    ``0..K-1``. Position 0 sees only a learned start embedding; a causal mask does the rest."""

    causal = True

    def __init__(self, K: int, D: int, width: int = 128, depth: int = 3, heads: int = 4):
        super().__init__(K, D, width, depth, heads, inputs=K)
        self.start = nn.Parameter(0.02 * torch.randn(self.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tokens(x, self.D, self.K)
        B = x.shape[0]
        shifted = torch.cat([self.start.expand(B, 1, self.width), self.embed(x[:, :-1])], dim=1)
        return self.head_logits(shifted + self.pos)


def _check_causal(model) -> None:
    inner = getattr(model, "module", model)  # DistributedDataParallel / compiled wrappers
    inner = getattr(inner, "_orig_mod", inner)
    if not isinstance(inner, CausalTokenModel):
        raise TypeError(f"expected a CausalTokenModel; got {type(inner).__name__}.")


def ar_loss(model: CausalTokenModel, batch: torch.Tensor, generator: torch.Generator | None = None):
    """Mean next-token cross-entropy in nats per token, for :func:`dmlib.train.train` (``generator`` unused:
    the loss draws no noise). ``batch``: tokens (B, D)."""
    logits = model(batch).float()  # in float32 under autocast too
    return F.cross_entropy(logits.flatten(0, 1), batch.flatten())


def ar_log_likelihood(model: CausalTokenModel, x: torch.Tensor) -> torch.Tensor:
    """``log p(x) = sum_i log p(x_i | x_<i)`` in nats, shape (B,), float64 (the sum is exact, not a bound).
    Gradients flow; wrap it in ``torch.no_grad()`` for evaluation."""
    _check_causal(model)
    logp = model(x).double().log_softmax(-1)
    return logp.gather(-1, x[..., None]).squeeze(-1).sum(1)


@torch.no_grad()
def ar_sample(model: CausalTokenModel, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` sequences (n, D) drawn from the model one position at a time, on its device.

    Each token is drawn by inverse CDF in float64 from ``softmax(logits)``: the smallest ``j`` with
    ``F(j) > u * F(K-1)``, ``u ~ U[0, 1)`` from ``generator``. The positions not yet drawn hold 0; causal
    attention never lets them reach the position being drawn. ``D`` forward passes, without a cache.
    """
    _check_causal(model)
    n = _check_size("n", n, 0)
    device = next(model.parameters()).device
    x = torch.zeros(n, model.D, dtype=torch.long, device=device)
    for i in range(model.D):
        cdf = model(x)[:, i].double().softmax(-1).cumsum(-1)  # (n, K)
        u = torch.rand(n, 1, dtype=torch.float64, device=device, generator=generator) * cdf[:, -1:]
        x[:, i] = (cdf <= u).sum(-1).clamp(max=model.K - 1)
    return x
