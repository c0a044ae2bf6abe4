"""The exact answers for a Gaussian mixture diffused by any schedule: the book's oracle.

If ``x_0 ~ sum_k w_k N(mu_k, S_k)`` and ``x_t = alpha x_0 + sigma eps``, then ``x_t`` is again a
mixture, ``q_t(x) = sum_k w_k N(x; alpha mu_k, C_k)`` with ``C_k = alpha^2 S_k + sigma^2 I``. Its
log-density, score and denoiser are closed forms:

    score(x)      = -sum_k r_k(x) C_k^{-1} (x - alpha mu_k)
    E[x_0 | x_t]  =  sum_k r_k(x) (mu_k + alpha S_k C_k^{-1} (x - alpha mu_k))

with responsibilities ``r_k(x) = w_k N(x; alpha mu_k, C_k) / q_t(x)`` (Bishop 2006, eq. 2.116 for the
Gaussian conditional). With these, sampler and likelihood errors are measured with no training.
"""

from __future__ import annotations

import math

import torch

from .parameterization import Denoiser
from .schedules import Schedule, as_time


class GaussianMixture:
    """``sum_k w_k N(mu_k, S_k)`` in D dimensions.

    ``means`` (K, D); ``covs`` (K, D, D), or ``stds`` (a number or K numbers) for isotropic components;
    ``weights`` (K,) summing to 1 (uniform if omitted). The tensors live where ``means`` does;
    :meth:`to` moves the mixture, and the oracle computes on the device of the points it is given.
    """

    def __init__(self, means, covs=None, *, stds=None, weights=None, dtype=torch.float64):
        self.means = torch.as_tensor(means, dtype=dtype)
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape (K, D); got {tuple(self.means.shape)}.")
        (K, D), dev = self.means.shape, self.means.device
        if (covs is None) == (stds is None):
            raise ValueError("give exactly one of covs (K, D, D) or stds (a number or K numbers).")
        if covs is None:
            stds = torch.as_tensor(stds, dtype=dtype, device=dev).expand(K)
            if (stds <= 0).any():
                raise ValueError(f"stds must be positive; got {stds.tolist()}.")
            covs = stds[:, None, None] ** 2 * torch.eye(D, dtype=dtype, device=dev)
        self.covs = torch.as_tensor(covs, dtype=dtype, device=dev)
        if self.covs.shape != (K, D, D):
            raise ValueError(f"covs must have shape ({K}, {D}, {D}); got {tuple(self.covs.shape)}.")
        w = torch.full((K,), 1 / K, dtype=dtype) if weights is None else weights
        w = torch.as_tensor(w, dtype=dtype, device=dev)
        if w.shape != (K,) or (w < 0).any() or abs(w.sum().item() - 1) > 1e-6:
            raise ValueError(f"weights must be {K} non-negative numbers summing to 1; got {w.tolist()}.")
        self.weights = w

    @classmethod
    def _unchecked(cls, means, covs, weights) -> GaussianMixture:
        """A mixture from tensors derived from a checked one, kept where they are (checking their values
        would read them back from the device)."""
        mix = cls.__new__(cls)
        mix.means, mix.covs, mix.weights = means, covs, weights
        return mix

    def to(self, device=None, dtype=None) -> GaussianMixture:
        """The same mixture with its tensors on ``device`` and/or in ``dtype``."""
        return self._unchecked(
            *(v.to(device=device, dtype=dtype) for v in (self.means, self.covs, self.weights))
        )

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
        """``n`` samples, drawn on the mixture's device (:meth:`to`) from ``generator``."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype, device=self.means.device)
        L = torch.linalg.cholesky(self.covs)
        return (self.means[k] + (L[k] * z[:, None, :]).sum(-1)).to(dtype)  # mu_k + L_k z

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x_0)`` of the undiffused mixture (shape (B,))."""
        return _diffused_stats(self, x, x.new_ones(1), x.new_zeros(1))["log_prob"]

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``grad_x log p(x)`` of the undiffused mixture (shape (B, D))."""
        return _diffused_stats(self, x, x.new_ones(1), x.new_zeros(1))["score"]


def _diffused_stats(mix: GaussianMixture, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
    """Log-density, score and posterior mean of the mixture diffused to ``(alpha, sigma)`` (per sample)."""
    if x.ndim != 2 or x.shape[1] != mix.dim:
        raise ValueError(f"x must have shape (B, {mix.dim}); got {tuple(x.shape)}.")
    dt, dev = x.dtype, x.device  # computed in x's dtype, on x's device, wherever the mixture lives
    mu, S, w = (v.to(device=dev, dtype=dt) for v in (mix.means, mix.covs, mix.weights))
    # alpha, sigma have shape (B,) or (1,): one time for the whole batch (what samplers use) inverts
    # K small matrices instead of B * K
    a = alpha.to(dt).reshape(-1, 1, 1, 1)
    s2 = sigma.to(dt).reshape(-1, 1, 1, 1) ** 2
    C = a**2 * S + s2 * torch.eye(mix.dim, dtype=dt, device=dev)  # (B or 1, K, D, D)
    C_inv = torch.linalg.inv(C)
    diff = x[:, None, :] - a[..., 0] * mu  # (B, K, D)
    # C^{-1} (x - alpha mu) by einsum: faster than a broadcast product and sum over a dim of size D,
    # and far faster than B*K tiny matmuls
    sol = torch.einsum("...kij,...kj->...ki", C_inv, diff)
    logdet = torch.linalg.slogdet(C).logabsdet
    log_comp = (
        -0.5 * torch.einsum("bki,bki->bk", diff, sol) - 0.5 * logdet - 0.5 * mix.dim * math.log(2 * math.pi)
    )
    joint = torch.log(w) + log_comp  # (B, K)
    resp = torch.softmax(joint, dim=1)
    post_mean = mu + a[..., 0] * torch.einsum("kij,bkj->bki", S, sol)  # E[x0 | x_t, component k]
    return {
        "log_prob": torch.logsumexp(joint, dim=1),
        "score": -torch.einsum("bk,bki->bi", resp, sol),
        "x0": torch.einsum("bk,bki->bi", resp, post_mean),
        "responsibilities": resp,
    }


class MixtureOracle:
    """Exact ``log q_t``, score and ``E[x_0 | x_t]`` of a :class:`GaussianMixture` under ``schedule``."""

    def __init__(self, mixture: GaussianMixture, schedule: Schedule):
        self.mixture, self.schedule = mixture, schedule

    def _stats(self, x, t):
        t = as_time(t, like=x)
        t = t.reshape(1) if t.ndim == 0 else t
        if t.shape != x.shape[:1] and t.shape != (1,):
            raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},); got {tuple(t.shape)}.")
        return _diffused_stats(self.mixture, x, self.schedule.alpha(t), self.schedule.sigma(t))

    def log_prob(self, x: torch.Tensor, t) -> torch.Tensor:
        """``log q_t(x)``, exact."""
        return self._stats(x, t)["log_prob"]

    def score(self, x: torch.Tensor, t) -> torch.Tensor:
        """``grad_x log q_t(x)``, exact."""
        return self._stats(x, t)["score"]

    def x0(self, x: torch.Tensor, t) -> torch.Tensor:
        """``E[x_0 | x_t = x]``, the optimal denoiser (the minimizer of the x0-prediction loss)."""
        return self._stats(x, t)["x0"]

    def denoiser(self) -> Denoiser:
        """The oracle as a :class:`~dmlib.parameterization.Denoiser`: a perfectly trained network."""
        return Denoiser(self.x0, self.schedule, prediction="x0")
