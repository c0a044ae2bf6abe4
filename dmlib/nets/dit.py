"""The diffusion transformer (DiT, Peebles & Xie 2023): a ViT on image patches, conditioned on time
and class by adaptive layer norm with zero-initialized gates ("adaLN-Zero", sec. 3.2)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .adm import class_labels, embed_time

TIME_FEATURES = 256  # sinusoidal features of t before the time MLP, as in DiT


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos positional embedding, shape (grid*grid, dim): a quarter of the channels for
    each of sin/cos of the row and of the column, frequencies ``10000**(-k / (dim/4))`` (MAE, He et al. 2022)."""
    if dim % 4:
        raise ValueError(f"hidden must be divisible by 4 for the 2D sin-cos embedding; got {dim}.")
    freqs = 10_000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    r, c = rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1).float()


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """Pre-norm transformer block; the condition ``c`` sets shift, scale and gate of both branches.

    The gates start at zero, so a fresh block is the identity (adaLN-Zero).
    """

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        width = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, width), nn.GELU(approximate="tanh"), nn.Linear(width, hidden)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def attention(self, h):
        B, N, D = h.shape
        q, k, v = self.qkv(h).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=2)
        x = x + gate1 * self.attention(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """``f(x, t, y)`` for ``(B, C, image_size, image_size)`` images, ``t`` in [0, 1], optional labels.

    The image is cut into ``(image_size / patch_size)**2`` patches (a strided conv), each a token
    with a fixed sin-cos position; ``depth`` adaLN-Zero blocks follow, then a final adaLN layer maps
    each token to its ``patch_size**2 * out_channels`` values. ``c = emb(t) + emb(y)``, with the
    null class ``num_classes`` for ``y=None``; a trainer for classifier-free guidance replaces some
    labels by it. DiT-S/2 is ``hidden=384, depth=12, num_heads=6, patch_size=2``, DiT-XL/2
    ``hidden=1152, depth=28, num_heads=16`` (Peebles & Xie 2023, Table 1). A fresh DiT outputs zero.
    """

    def __init__(self, *, in_channels=3, out_channels=None, image_size=32, patch_size=2, hidden=384, depth=12,
                 num_heads=6, mlp_ratio=4.0, num_classes=None):  # fmt: skip
        super().__init__()
        out_channels = out_channels or in_channels
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}.")
        if hidden % num_heads:
            raise ValueError(f"hidden {hidden} does not split into {num_heads} heads.")
        self.config = dict(in_channels=in_channels, out_channels=out_channels, image_size=image_size,
                           patch_size=patch_size, hidden=hidden, depth=depth, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, num_classes=num_classes)  # fmt: skip
        self.in_channels, self.out_channels, self.num_classes = in_channels, out_channels, num_classes
        self.image_size, self.patch_size = image_size, patch_size
        self.patchify = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_2d(hidden, image_size // patch_size), persistent=False)
        self.time_embed = nn.Sequential(
            nn.Linear(TIME_FEATURES, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.label_embed = nn.Embedding(num_classes + 1, hidden) if num_classes is not None else None
        self.blocks = nn.ModuleList([DiTBlock(hidden, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear_out = nn.Linear(hidden, patch_size**2 * out_channels)
        for m in self.modules():  # transformer init as in ViT/DiT; then zero every gate and the output
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for layer in [b.ada[-1] for b in self.blocks] + [self.ada_out[-1], self.linear_out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_config(cls, config: dict) -> DiT:
        return cls(**config)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        C, S = self.in_channels, self.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (C, S, S):
            raise ValueError(f"DiT expects x of shape (B, {C}, {S}, {S}); got {tuple(x.shape)}.")
        c = self.time_embed(embed_time(t, x, TIME_FEATURES))
        labels = class_labels(y, x, self.num_classes)
        if labels is not None:
            c = c + self.label_embed(labels)
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)  # (B, tokens, hidden)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada_out(c)[:, None].chunk(2, dim=2)
        h = self.linear_out(modulate(self.norm_out(h), shift, scale))
        # unpatchify: token (i, j) holds the p x p x C_out patch at rows i*p.., columns j*p..
        B, g, p = x.shape[0], S // self.patch_size, self.patch_size
        h = h.reshape(B, g, g, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(B, self.out_channels, S, S)
