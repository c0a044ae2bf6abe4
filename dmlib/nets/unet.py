from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .mlp import _check_even, embed_time


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between (Ho et al. 2020, App. B)."""

    def __init__(self, c_in: int, c_out: int, time_dim: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """A small U-Net (Ronneberger et al. 2015) for ``(B, C, H, W)`` images.

    One residual block per resolution on the way down and up, skip connections by concatenation;
    ``channel_mults=(1, 2, 2)`` halves the resolution twice, so H and W must be divisible by 4
    (8x8 digits, 28x28 Fashion-MNIST, 32x32 CIFAR-10 all are).
    """

    def __init__(self, in_channels: int = 1, base: int = 32, channel_mults=(1, 2, 2), groups: int = 8):
        super().__init__()
        _check_even(base)  # the time features have base dimensions
        self.in_channels, self.factor = in_channels, 2 ** (len(channel_mults) - 1)
        self.time_dim = 4 * base
        self.time_mlp = nn.Sequential(
            nn.Linear(base, self.time_dim), nn.SiLU(), nn.Linear(self.time_dim, self.time_dim)
        )
        self.base = base
        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)
        chans = [base * m for m in channel_mults]
        self.down = nn.ModuleList()
        c = base
        for c_out in chans:
            self.down.append(ResBlock(c, c_out, self.time_dim, groups))
            c = c_out
        self.mid = ResBlock(c, c, self.time_dim, groups)
        self.up = nn.ModuleList()
        for c_skip in reversed(chans):
            self.up.append(ResBlock(c + c_skip, c_skip, self.time_dim, groups))
            c = c_skip
        self.norm_out = nn.GroupNorm(groups, c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # start as the zero function: a calm first loss
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects x of shape (B, {self.in_channels}, H, W); got {tuple(x.shape)}.")
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"UNet needs H and W divisible by {self.factor}; got {tuple(x.shape[2:])}.")
        emb = self.time_mlp(embed_time(t, x, self.base))
        h = self.conv_in(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.down) - 1:
                h = F.avg_pool2d(h, 2)
        h = self.mid(h, emb)
        for i, block in enumerate(self.up):
            if i > 0:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))
