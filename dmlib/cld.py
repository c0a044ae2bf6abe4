"""Critically-damped Langevin diffusion (CLD; Dockhorn, Vahdat & Kreis 2022).

The data ``x`` gets a velocity ``v`` and the pair follows Hamiltonian dynamics coupled to a heat
bath; noise enters only through the velocity (eq. 5 of the paper):

    dx = beta M^{-1} v dt
    dv = -beta x dt - beta Gamma M^{-1} v dt + sqrt(2 Gamma beta) dw

Critical damping, ``Gamma^2 = 4 M``, is the fastest approach to the equilibrium
``N(0, I) x N(0, M I)`` without oscillation. The SDE is linear, so every coordinate's pair
``(x, v)`` evolves by one 2x2 system ``u_t = F u dt + (noise)``: its mean is ``exp(t F) u_0`` and
its covariance follows from Van Loan's (1978) block-exponential formula. With ``x_0`` from a
Gaussian mixture and ``v_0 ~ N(0, gamma M I)`` the state ``(x_t, v_t)`` is again a Gaussian
mixture, so the book can run the reverse SDE with the *exact* score, as for the other SDEs.

Defaults are the paper's: ``M = 0.25``, ``Gamma = 1`` (critical), ``beta = 4``, ``gamma = 0.04``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .ddpm import check_timesteps
from .oracle import GaussianMixture
from .parameterization import noise_like


@dataclass(frozen=True)
class CLD:
    M: float = 0.25
    Gamma: float = 1.0
    beta: float = 4.0
    gamma: float = 0.04  # initial velocity variance is gamma * M

    def __post_init__(self):
        if min(self.M, self.Gamma, self.beta, self.gamma) <= 0:
            raise ValueError(f"M, Gamma, beta and gamma must be positive; got {self}.")

    @property
    def F(self) -> torch.Tensor:
        """The 2x2 drift of one coordinate's ``(x, v)``."""
        return self.beta * torch.tensor(
            [[0.0, 1 / self.M], [-1.0, -self.Gamma / self.M]], dtype=torch.float64
        )

    @property
    def D(self) -> torch.Tensor:
        """The 2x2 diffusion ``G G^T``: noise ``2 Gamma beta`` on the velocity only."""
        return torch.tensor([[0.0, 0.0], [0.0, 2 * self.Gamma * self.beta]], dtype=torch.float64)

    def transition(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_t, Sigma_t)``: ``u_t | u_0 ~ N(A_t u_0, Sigma_t)`` per coordinate, ``A_t = exp(t F)``,
        ``Sigma_t = int_0^t exp(s F) D exp(s F)^T ds`` by Van Loan's block exponential
        ``exp(t [[-F, D], [0, F^T]]) = [[., B12], [0, B22]]``, ``Sigma_t = B22^T B12``."""
        if not 0 <= t <= 1:
            raise ValueError(f"CLD time t must lie in [0, 1]; got {t}.")
        F, D = self.F, self.D
        block = torch.zeros(4, 4, dtype=torch.float64)
        block[:2, :2], block[:2, 2:], block[2:, 2:] = -F, D, F.T
        B = torch.linalg.matrix_exp(t * block)
        return torch.linalg.matrix_exp(t * F), B[2:, 2:].T @ B[:2, 2:]

    def marginal(self, mixture: GaussianMixture, t: float) -> GaussianMixture:
        """The exact law of ``(x_t, v_t)`` (a mixture in 2D dimensions, ``x`` first) when
        ``x_0 ~ mixture`` and ``v_0 ~ N(0, gamma M I)``, on the mixture's device."""
        dev = mixture.means.device
        A, Sigma = (m.to(dev) for m in self.transition(t))
        D = mixture.dim
        eye = torch.eye(D, dtype=torch.float64, device=dev)
        A_full, Sigma_full = torch.kron(A, eye), torch.kron(Sigma, eye)  # (x, v) blocks of size D
        means = torch.cat([mixture.means, torch.zeros_like(mixture.means)], dim=1) @ A_full.T
        start = torch.zeros(mixture.means.shape[0], 2 * D, 2 * D, dtype=torch.float64, device=dev)
        start[:, :D, :D] = mixture.covs
        start[:, D:, D:] = self.gamma * self.M * eye
        covs = A_full @ start @ A_full.T + Sigma_full
        return GaussianMixture._unchecked(means, covs, mixture.weights)  # valid: derived from a valid one

    def equilibrium(
        self, n: int, dim: int, generator: torch.Generator | None = None, device=None
    ) -> torch.Tensor:
        """Samples of the prior ``N(0, I) x N(0, M I)``, shape ``(n, 2 dim)``, drawn on ``device``."""
        z = torch.randn(n, 2 * dim, generator=generator, device=device)
        return torch.cat([z[:, :dim], self.M**0.5 * z[:, dim:]], dim=1)

    def drift(self, u: torch.Tensor) -> torch.Tensor:
        """``F u`` for states ``u = (x, v)`` of shape (B, 2 dim)."""
        D = u.shape[1] // 2
        x, v = u[:, :D], u[:, D:]
        b = self.beta
        return torch.cat([b / self.M * v, -b * x - b * self.Gamma / self.M * v], dim=1)


def simulate_forward(cld: CLD, x0: torch.Tensor, timesteps, generator: torch.Generator | None = None):
    """Euler–Maruyama on the forward CLD from ``(x_0, v_0 ~ N(0, gamma M I))``: all states, (N, B, 2 dim)."""
    ts = torch.as_tensor(timesteps, dtype=torch.float64)
    v0 = (cld.gamma * cld.M) ** 0.5 * noise_like(x0, generator)
    states = [torch.cat([x0, v0], dim=1)]
    D = x0.shape[1]
    for t, s in zip(ts[:-1], ts[1:]):
        dt = (s - t).item()
        if dt <= 0:
            raise ValueError("timesteps of the forward simulation must increase strictly.")
        u = states[-1]
        noise = torch.zeros_like(u)
        noise[:, D:] = (2 * cld.Gamma * cld.beta * dt) ** 0.5 * noise_like(x0, generator)
        states.append(u + cld.drift(u) * dt + noise)
    return torch.stack(states)


@torch.no_grad()
def sample_cld(
    cld: CLD,
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    u_T: torch.Tensor,
    timesteps,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callable | None = None,
) -> torch.Tensor:
    """Euler–Maruyama on the reverse CLD, ``du = [F u - G G^T grad log p_t(u)] dt + G dwbar``
    (Anderson 1982; the paper's eq. 7). Only the velocity score ``grad_v log p_t`` enters, because
    noise acts on ``v`` alone. ``score_fn(u, t)`` returns the full score, shape (B, 2 dim).
    Returns the final state ``(x, v)``; the sample is its first half."""
    ts = check_timesteps(timesteps)
    D = u_T.shape[1] // 2
    u = u_T
    if callback is not None:
        callback(0, ts[0], u)
    for i in tqdm(range(len(ts) - 1), disable=not progress, desc="reverse CLD"):
        t, s = ts[i], ts[i + 1]
        dt = (t - s).item()
        score_v = score_fn(u, t)[:, D:]
        drift = cld.drift(u)
        drift[:, D:] -= 2 * cld.Gamma * cld.beta * score_v
        u = u - drift * dt
        if s > 0:  # no noise on the last step (the usual "denoising" end of a reverse SDE)
            u[:, D:] += (2 * cld.Gamma * cld.beta * dt) ** 0.5 * noise_like(u[:, D:], generator)
        if callback is not None:
            callback(i + 1, s, u)
    return u
