"""Datasets: 2D toy distributions (some with exact densities), 8x8 digits, and the image datasets.

Toy sets are scaled to roughly unit standard deviation so one schedule suits all of them. Files on
disk (checksums, downloads, IDX and CIFAR readers, MNIST / Fashion-MNIST / CIFAR-10, image batches)
live in :mod:`dmlib.image_data`; their public names are re-exported here, so ``dmlib.data`` is the
one place a chapter imports data from.
"""

from __future__ import annotations

import math

import torch

from .image_data import (  # noqa: F401  (re-exported)
    DATA_DIR,
    IMAGE_DATASETS,
    ImageDatasetSpec,
    RemoteFile,
    data_root,
    download,
    extract_tar,
    image_loader,
    load_cifar10,
    load_fashion_mnist,
    load_image_dataset,
    load_mnist,
    normalize_images,
    pad_images,
    random_hflip,
    read_idx,
    sha256,
    verify_file,
)
from .oracle import GaussianMixture


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


# toy sets defined by a sampling function (no closed-form density), beside the MIXTURES above
SAMPLED_TOYS = {
    "swiss_roll": _swiss_roll,
    "two_moons": _two_moons,
    "checkerboard": _checkerboard,
    "spirals": _spirals,
}
TOY_DATASETS = tuple(MIXTURES) + tuple(SAMPLED_TOYS)


def make_toy(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` samples, shape (n, 2), float32, from the toy set ``name`` (see ``TOY_DATASETS``)."""
    if name in MIXTURES:
        return MIXTURES[name]().sample(n, generator)
    if name in SAMPLED_TOYS:
        return SAMPLED_TOYS[name](n, generator).float()
    raise ValueError(f"unknown toy dataset {name!r}; choose one of {', '.join(TOY_DATASETS)}.")


def toy_mixture(name: str) -> GaussianMixture:
    """The exact mixture behind a toy set, for the oracle (only the Gaussian-mixture sets have one)."""
    if name not in MIXTURES:
        raise ValueError(f"{name!r} has no closed-form density; mixtures are: {', '.join(MIXTURES)}.")
    return MIXTURES[name]()


def load_digits(with_labels: bool = False):
    """scikit-learn's 1797 handwritten digits, shape (1797, 1, 8, 8), scaled from 0..16 to [-1, 1];
    with ``with_labels=True``, ``(images, labels)`` with int64 labels 0..9.

    They ship inside scikit-learn, so this works offline.
    """
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = (torch.tensor(bunch.images, dtype=torch.float32) / 8 - 1)[:, None]
    return (x, torch.as_tensor(bunch.target, dtype=torch.long)) if with_labels else x
