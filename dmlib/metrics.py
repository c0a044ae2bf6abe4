"""Sample-quality metrics for 2D and small data: exact where the density is known, two-sample otherwise.

Each is computed on the samples' device and converted to Python numbers once, at the end.
"""

from __future__ import annotations

import torch

from .oracle import GaussianMixture


def _check_pair(x: torch.Tensor, y: torch.Tensor):
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"need two (N, D) sample sets of equal D; got {tuple(x.shape)} and {tuple(y.shape)}."
        )


def sliced_wasserstein(x, y, n_projections: int = 512, generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance (Bonneel et al. 2015): the W2 of 1D projections, averaged over directions.

    ``SW_2(x, y)^2 = E_u W_2(u.x, u.y)^2`` with ``u`` uniform on the sphere; in 1D, W2 matches sorted samples.
    Both sets must have the same size.
    """
    _check_pair(x, y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"sliced_wasserstein needs equal sample counts; got {x.shape[0]} and {y.shape[0]}.")
    u = torch.randn(x.shape[1], n_projections, generator=generator, dtype=torch.float64, device=x.device)
    u = u / u.norm(dim=0, keepdim=True)
    px, _ = torch.sort((x.double() @ u).T.contiguous(), dim=1)  # sort along rows: much faster than dim 0
    py, _ = torch.sort((y.double() @ u).T.contiguous(), dim=1)
    return ((px - py) ** 2).mean().sqrt().item()


def energy_distance(x, y) -> float:
    """Energy distance (Szekely & Rizzo 2013): ``2 E|X - Y| - E|X - X'| - E|Y - Y'|``, zero iff equal laws."""
    _check_pair(x, y)
    x, y = x.double(), y.double()
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


def mode_coverage(samples, mixture: GaussianMixture, n_std: float = 3.0, min_share: float = 0.2) -> dict:
    """How a sample set covers an isotropic mixture's modes.

    A sample is *near* its closest mode if within ``n_std`` of that mode's standard deviation.
    A mode is *covered* if it holds at least ``min_share`` of its expected number of near samples
    (``weight * N``). Returns ``modes`` (covered count), ``n_modes``, ``near`` (fraction of samples
    near some mode) and ``weights`` (share of the near samples per mode, for weight errors).
    """
    stds = torch.diagonal(mixture.covs, dim1=1, dim2=2).sqrt().to(samples.dtype)  # (K, D)
    if not torch.allclose(stds, stds[:, :1].expand_as(stds)):  # checked where the mixture lives
        raise ValueError("mode_coverage needs isotropic components (equal std in every direction).")
    means, stds = mixture.means.to(samples.device, samples.dtype), stds.to(samples.device)
    dist = torch.cdist(samples, means)  # (N, K)
    d, k = dist.min(dim=1)
    near = d <= n_std * stds[k, 0]
    # counts[k] += near: the near samples per mode, without a boolean index (its size depends on the data)
    counts = torch.zeros(means.shape[0], dtype=torch.float64, device=samples.device)
    counts = counts.index_add(0, k, near.double())
    expected = mixture.weights.to(samples.device) * samples.shape[0]
    return {
        "modes": int((counts >= min_share * expected).sum()),
        "n_modes": means.shape[0],
        "near": near.double().mean().item(),
        "weights": (counts / counts.sum().clamp(min=1)).tolist(),
    }


def cross_entropy(samples, log_prob) -> float:
    """``-E_{x ~ samples} log p(x)`` for a known density ``log_prob`` (e.g. ``mixture.log_prob``), in nats.

    On data drawn from p itself this is p's entropy; model samples that stray into low-density
    regions raise it.
    """
    return -log_prob(samples.double()).mean().item()
