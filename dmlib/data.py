"""Datasets: 2D toy distributions (some with exact densities), 8x8 digits, IDX files and downloads.

Toy sets are scaled to roughly unit standard deviation so one schedule suits all of them.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from .oracle import GaussianMixture

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def eight_gaussians(radius: float = 2.0, std: float = 0.1) -> GaussianMixture:
    """Eight equal-weight Gaussians on a circle."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    return GaussianMixture(radius * torch.stack([angles.cos(), angles.sin()], 1), stds=std)


def twenty_five_gaussians(spacing: float = 1.0, std: float = 0.1) -> GaussianMixture:
    """A 5x5 grid of equal-weight Gaussians."""
    g = torch.arange(-2, 3, dtype=torch.float64) * spacing
    return GaussianMixture(torch.cartesian_prod(g, g), stds=std)


MIXTURES = {"eight_gaussians": eight_gaussians, "twenty_five_gaussians": twenty_five_gaussians}


def _swiss_roll(n, g):
    u = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    x = torch.stack([u * u.cos(), u * u.sin()], 1) / 5
    return x + 0.05 * torch.randn(n, 2, generator=g)


def _two_moons(n, g):
    u = math.pi * torch.rand(n, generator=g)
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(
        upper[:, None], torch.stack([u.cos(), u.sin()], 1), torch.stack([1 - u.cos(), 0.5 - u.sin()], 1)
    )
    return (x - torch.tensor([0.5, 0.25])) * 1.5 + 0.05 * torch.randn(n, 2, generator=g)


def _checkerboard(n, g):
    x1 = 4 * torch.rand(n, generator=g) - 2
    x2 = torch.rand(n, generator=g) - 2 * torch.randint(0, 2, (n,), generator=g) + torch.floor(x1) % 2
    return torch.stack([x1, x2], 1)


def _spirals(n, g):
    u = torch.sqrt(torch.rand(n, generator=g)) * 3 * math.pi
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x = sign[:, None] * torch.stack([u * u.cos(), u * u.sin()], 1) / (1.5 * math.pi)
    return x + 0.05 * torch.randn(n, 2, generator=g)


SAMPLERS = {
    "swiss_roll": _swiss_roll,
    "two_moons": _two_moons,
    "checkerboard": _checkerboard,
    "spirals": _spirals,
}
TOY_DATASETS = tuple(MIXTURES) + tuple(SAMPLERS)


def make_toy(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` samples, shape (n, 2), float32, from the toy set ``name`` (see ``TOY_DATASETS``)."""
    if name in MIXTURES:
        return MIXTURES[name]().sample(n, generator)
    if name in SAMPLERS:
        return SAMPLERS[name](n, generator).float()
    raise ValueError(f"unknown toy dataset {name!r}; choose one of {', '.join(TOY_DATASETS)}.")


def toy_mixture(name: str) -> GaussianMixture:
    """The exact mixture behind a toy set, for the oracle (only the Gaussian-mixture sets have one)."""
    if name not in MIXTURES:
        raise ValueError(f"{name!r} has no closed-form density; mixtures are: {', '.join(MIXTURES)}.")
    return MIXTURES[name]()


def load_digits() -> torch.Tensor:
    """scikit-learn's 1797 handwritten digits, shape (1797, 1, 8, 8), scaled from 0..16 to [-1, 1].

    They ship inside scikit-learn, so this works offline.
    """
    from sklearn.datasets import load_digits as _load

    x = torch.tensor(_load().images, dtype=torch.float32)
    return (x / 8 - 1)[:, None]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, sha256_hex: str) -> Path:
    """Download ``url`` to ``dest`` once, verify its SHA-256, and write it atomically.

    A file already at ``dest`` with the right checksum is reused; a wrong one is an error, never
    silently used.
    """
    dest = Path(dest)
    if dest.exists():
        if sha256(dest) == sha256_hex:
            return dest
        raise ValueError(f"{dest} exists but its SHA-256 is not {sha256_hex}: delete it and download again.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
        got = sha256(Path(tmp))
        if got != sha256_hex:
            raise ValueError(f"download of {url} has SHA-256 {got}, expected {sha256_hex}; not saved.")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format, optionally gzipped) into a numpy array."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no IDX file at {path}.")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path} is not an unsigned-byte IDX file (header {zero:#x} {dtype_code:#x}).")
        shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != math.prod(shape):
        raise ValueError(f"{path} is truncated: header says shape {shape}, found {data.size} values.")
    return data.reshape(shape)


FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"), DATA_DIR / "cache" / "fashion-mnist")


def load_fashion_mnist(split: str = "train", root: Path | None = None) -> torch.Tensor:
    """Fashion-MNIST images, shape (N, 1, 28, 28) in [-1, 1], from IDX files on disk.

    Looks in ``root`` or in Debian's ``dataset-fashion-mnist`` location and ``data/cache``.
    """
    if split not in ("train", "t10k"):
        raise ValueError(f"split must be 'train' or 't10k'; got {split!r}.")
    names = [f"{split}-images-idx3-ubyte.gz", f"{split}-images-idx3-ubyte"]
    for d in [Path(root)] if root else FASHION_MNIST_DIRS:
        for name in names:
            if (d / name).exists():
                x = torch.from_numpy(read_idx(d / name).copy()).float()
                return (x / 127.5 - 1)[:, None]
    where = ", ".join(str(d) for d in ([Path(root)] if root else FASHION_MNIST_DIRS))
    raise FileNotFoundError(
        f"Fashion-MNIST ({split}) not found in {where}. Install Debian's 'dataset-fashion-mnist' "
        f"package or put {names[0]} in one of those folders."
    )
