"""The ADM U-Net: DDPM's image network (Ho et al. 2020, App. B) with the improvements of
Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs", sec. 3): several residual blocks per
resolution, multi-head self-attention at chosen resolutions, scale-shift ("adaptive group")
normalization; plus a class embedding with a null class for classifier-free guidance (Ho & Salimans
2022). With ``scale_shift=False`` and DDPM's CIFAR-10 settings it is DDPM's 35.7M-parameter net."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .mlp import embed_time


def class_labels(y, x: torch.Tensor, num_classes: int | None) -> torch.Tensor | None:
    """Checked labels, with ``y=None`` mapped to the null class ``num_classes`` (Ho & Salimans 2022)."""
    if num_classes is None:
        if y is not None:
            raise ValueError("y was given but the network was built with num_classes=None.")
        return None
    if y is None:
        return torch.full((x.shape[0],), num_classes, dtype=torch.long, device=x.device)
    if y.shape != (x.shape[0],) or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(
            f"y must be integer labels of shape ({x.shape[0]},); got {y.dtype} {tuple(y.shape)}."
        )
    # Checking the values would make a GPU wait for the host (and cannot run on meta), so only CPU
    # labels are checked here; elsewhere the embedding lookup itself fails on a bad label.
    if y.device.type == "cpu" and bool(((y < 0) | (y > num_classes)).any()):
        raise ValueError(f"labels must lie in [0, {num_classes}] ({num_classes} = null class).")
    return y.long()


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with the embedding in between: added to the features (DDPM), or with
    ``scale_shift`` setting the second norm's scale and shift, ``GN(h) * (1 + s) + b`` ("AdaGN",
    Dhariwal & Nichol 2021, sec. 3.1)."""

    def __init__(self, c_in, c_out, emb_dim, groups, dropout, scale_shift):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * c_out if scale_shift else c_out))
        self.norm2, self.dropout = nn.GroupNorm(groups, c_out), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as its skip path: a deep net starts shallow
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        return self.skip(x) + self.conv2(self.dropout(F.silu(h)))


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, output projection zero-initialized."""

    def __init__(self, channels, num_heads, groups):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads.")
        self.num_heads = num_heads
        self.norm, self.qkv = nn.GroupNorm(groups, channels), nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C): one token per position
        # (B, heads, HW, head_dim) with head_dim contiguous, as the fused attention kernels want
        q, k, v = self.qkv(h).reshape(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        return x + self.proj(h).transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Conv2d):
    def __init__(self, channels):
        super().__init__(channels, channels, 3, stride=2, padding=1)


class Upsample(nn.Conv2d):
    def __init__(self, channels):
        super().__init__(channels, channels, 3, padding=1)

    def forward(self, x):
        return super().forward(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """Layers in turn, passing the embedding to the residual blocks (ADM's TimestepEmbedSequential)."""

    def forward(self, h, emb):
        for layer in self:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h


class ADMUNet(nn.Module):
    """``f(x, t, y)`` for ``(B, C, H, W)`` images, ``t`` in [0, 1], optional labels ``y`` (B,).

    Level ``i`` works at ``image_size / 2**i`` pixels with ``base * channel_mults[i]`` channels and
    ``num_res_blocks`` residual blocks. Every block's output on the way down is a skip connection,
    concatenated onto the input of its mirror block on the way up (so the up path has one block more
    per level, for the skip of each down-sampling). Self-attention follows each block at the
    ``attention_resolutions`` (pixels at ``image_size``) and sits in the middle block,
    ResBlock-Attention-ResBlock. H and W may differ from ``image_size`` but must be divisible by
    ``2**(levels - 1)``.
    With ``num_classes=K`` the labels ``0..K-1`` and the null class ``K`` (also used for ``y=None``)
    are embedded and added to the time embedding; a trainer for classifier-free guidance replaces
    some labels by ``K``. ``out_channels=2 * in_channels`` serves a learned
    variance (Nichol & Dhariwal 2021). The output layer and the residual and attention branches start
    at zero.
    """

    def __init__(self, *, in_channels=3, out_channels=None, image_size=32, base=64, channel_mults=(1, 2, 2),
                 num_res_blocks=2, attention_resolutions=(16,), dropout=0.0, num_heads=4, head_channels=None,
                 groups=32, num_classes=None, scale_shift=True):  # fmt: skip
        super().__init__()
        out_channels = out_channels or in_channels
        self.factor = 2 ** (len(channel_mults) - 1)
        if image_size % self.factor:
            raise ValueError(f"image_size {image_size} is not divisible by 2**(levels - 1) = {self.factor}.")
        levels = [image_size // 2**i for i in range(len(channel_mults))]
        if unknown := set(attention_resolutions) - set(levels):
            raise ValueError(f"attention_resolutions {sorted(unknown)} are not among the levels' {levels}.")
        self.config = dict(in_channels=in_channels, out_channels=out_channels, image_size=image_size, base=base,
                           channel_mults=list(channel_mults), num_res_blocks=num_res_blocks,
                           attention_resolutions=list(attention_resolutions), dropout=dropout,
                           num_heads=num_heads, head_channels=head_channels, groups=groups,
                           num_classes=num_classes, scale_shift=scale_shift)  # fmt: skip
        self.in_channels, self.base, self.num_classes = in_channels, base, num_classes
        emb_dim = 4 * base
        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None

        def res(c_in, c_out):
            return ResBlock(c_in, c_out, emb_dim, groups, dropout, scale_shift)

        def attn(c):
            if head_channels and c % head_channels:
                raise ValueError(f"{c} channels do not split into heads of {head_channels}.")
            return Attention(c, c // head_channels if head_channels else num_heads, groups)

        self.down = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, base, 3, padding=1))])
        skips, c = [base], base
        for level, (mult, size) in enumerate(zip(channel_mults, levels)):
            for _ in range(num_res_blocks):
                layers = [res(c, base * mult)]
                c = base * mult
                layers += [attn(c)] if size in attention_resolutions else []
                self.down.append(EmbedSequential(*layers))
                skips.append(c)
            if level < len(channel_mults) - 1:
                self.down.append(EmbedSequential(Downsample(c)))
                skips.append(c)
        self.middle = EmbedSequential(res(c, c), attn(c), res(c, c))
        self.up = nn.ModuleList()
        for level, (mult, size) in reversed(list(enumerate(zip(channel_mults, levels)))):
            for i in range(num_res_blocks + 1):
                layers = [res(c + skips.pop(), base * mult)]
                c = base * mult
                layers += [attn(c)] if size in attention_resolutions else []
                layers += [Upsample(c)] if level > 0 and i == num_res_blocks else []
                self.up.append(EmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # start as the zero function: a calm first loss
        nn.init.zeros_(self.out[-1].bias)

    @classmethod
    def from_config(cls, config: dict) -> ADMUNet:
        return cls(**config)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ADMUNet expects x of shape (B, {self.in_channels}, H, W); got {tuple(x.shape)}."
            )
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"ADMUNet needs H and W divisible by {self.factor}; got {tuple(x.shape[2:])}.")
        emb = self.time_embed(embed_time(t, x, self.base))
        labels = class_labels(y, x, self.num_classes)
        if labels is not None:
            emb = emb + self.label_embed(labels)
        skips, h = [], x
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
