"""Symmetry-aware diffusion for point clouds: permutation- and E(n)-equivariant denoisers, diffusion in
the zero-centre-of-mass subspace (Hoogeboom et al. 2022, "Equivariant Diffusion for Molecule Generation
in 3D"), and small particle systems with a reference MCMC sampler.

A batch of point clouds is a tensor ``(B, N, d)``: ``B`` clouds of ``N`` points in ``d`` dimensions. A
density that does not change when the points are permuted, rotated, reflected or translated cannot be
normalised over all of R^(N d) (translations have infinite volume), so, following Hoogeboom et al.
(sec. 3.2) and Köhler et al. (2020), data, noise and the prior live in the linear subspace

    X = {x in R^(N x d) : sum_i x_i = 0}   (zero centre of mass, dimension (N - 1) d),

and a translated cloud is scored by its projection :func:`remove_com`. A network whose eps prediction is
E(n)-equivariant and lies in X (:class:`EGNNDenoiser`) then defines a reverse process whose marginals
are invariant under O(d) and under permutations (Köhler et al. 2020, thm. 1; Hoogeboom et al. sec. 3.1).

Variable ``N``: a ``mask`` of shape ``(B, N)`` (1 for a real point, 0 for padding) enters every function
that takes one; padded entries must be zero and each cloud needs at least one point (two for a
non-empty subspace). Checks of values (NaN, zero centre of mass, masks) read the tensor back to Python,
so, as :func:`dmlib.schedules.as_time` does, they run on the CPU only, where that is free; the training
loss projects instead of checking.

The stochastic samplers of :mod:`dmlib.ddpm` and :mod:`dmlib.samplers` add full-space noise, which
leaves X; deterministic ones (DDIM, DPM-Solver, Heun) stay in X when x_T and the eps prediction do.
:func:`sample_ancestral_zero_com` is ancestral sampling with noise drawn in X.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .ddpm import check_timesteps, posterior_mean_from_eps, reverse_variance, run_steps, uniform_time
from .nets.mlp import _check_even, embed_time
from .parameterization import Denoiser, _col
from .schedules import Schedule, as_time

ACTIONS = ("orthogonal", "translation", "permutation")

# ---------------------------------------------------------------------------------------------
# Checks, the centre of mass and the zero-CoM subspace
# ---------------------------------------------------------------------------------------------


def _checkable(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"


def check_cloud(x: torch.Tensor, name: str = "x", d: int | None = None) -> torch.Tensor:
    """``x`` must be a floating tensor ``(B, N, d)`` (with the given ``d``), finite where checkable."""
    if not torch.is_tensor(x) or x.ndim != 3 or not x.is_floating_point():
        got = f"shape {tuple(x.shape)}, {x.dtype}" if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be a float tensor of point clouds (B, N, d); got {got}.")
    if d is not None and x.shape[2] != d:
        raise ValueError(
            f"{name} must hold points of dimension d={d}: shape (B, N, {d}); got {tuple(x.shape)}."
        )
    if _checkable(x) and not torch.isfinite(x).all():
        raise ValueError(f"{name} has NaN or infinite entries.")
    return x


def check_mask(mask: torch.Tensor | None, x: torch.Tensor, min_points: int = 1) -> torch.Tensor | None:
    """A mask ``(B, N)`` of 0/1 (bool or float), returned in ``x``'s dtype, broadcastable as ``(B, N, 1)``.

    Refused: another shape, values other than 0 and 1, a cloud with fewer than ``min_points`` points
    (an all-zero row has no centre of mass; a one-point cloud has a 0-dimensional subspace).
    """
    if mask is None:
        return None
    if not torch.is_tensor(mask) or mask.shape != x.shape[:2]:
        got = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"mask must have shape (B, N) = {tuple(x.shape[:2])}; got {got}.")
    m = mask.to(dtype=x.dtype, device=x.device)
    if _checkable(m):
        if not ((m == 0) | (m == 1)).all():
            raise ValueError("mask must hold only 0 (padding) and 1 (a point).")
        counts = m.sum(1)
        if (counts < min_points).any():
            row = int((counts < min_points).nonzero()[0])
            raise ValueError(
                f"mask row {row} has {int(counts[row])} points; the centre-of-mass handling needs at least "
                f"{min_points} (an all-zero row has no centre of mass)."
            )
    return m[..., None]


def _count(x: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Points per cloud, shape (B, 1, 1)."""
    if m is None:
        return torch.full((x.shape[0], 1, 1), x.shape[1], dtype=x.dtype, device=x.device)
    return m.sum(1, keepdim=True)


def remove_com(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Project onto the zero-centre-of-mass subspace: ``x_i - (1/N) sum_j x_j`` over the real points
    (Hoogeboom et al. 2022, sec. 3.2); padded entries become 0. An orthogonal projection, so it commutes
    with rotations, reflections and permutations and removes any translation."""
    check_cloud(x)
    m = check_mask(mask, x)
    if m is None:
        return x - x.mean(1, keepdim=True)
    com = (x * m).sum(1, keepdim=True) / _count(x, m)
    return (x - com) * m


def subspace_dim(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Degrees of freedom ``(N_i - 1) d`` of each cloud's zero-CoM subspace, shape (B,), in x's dtype."""
    m = check_mask(mask, check_cloud(x))
    return ((_count(x, m) - 1) * x.shape[2]).reshape(-1)


def check_zero_com(x: torch.Tensor, mask: torch.Tensor | None = None, name: str = "x") -> torch.Tensor:
    """Refuse (on the CPU) a cloud off the subspace: a centre of mass beyond rounding (tolerance
    ``sqrt(eps_dtype) (1 + max |x|)``), or nonzero padded entries."""
    check_cloud(x, name)
    m = check_mask(mask, x)
    if not _checkable(x):
        return x
    tol = math.sqrt(torch.finfo(x.dtype).eps) * (1 + float(x.abs().max()) if x.numel() else 1)
    if m is not None and (x * (1 - m)).abs().max() > 0:
        raise ValueError(f"{name} has nonzero entries at padded (mask = 0) points; project with remove_com.")
    com = (x.sum(1, keepdim=True) / _count(x, m)).abs().max() if x.numel() else 0
    if com > tol:
        raise ValueError(
            f"{name} must lie in the zero-centre-of-mass subspace; its centre of mass is {float(com):.3g} "
            f"from 0. Project it with remove_com(x, mask)."
        )
    return x


def zero_com_noise(x: torch.Tensor, mask: torch.Tensor | None = None, generator=None) -> torch.Tensor:
    """``eps ~ N(0, I)`` on the zero-CoM subspace, shaped like ``x``: a standard normal projected by
    :func:`remove_com`. The projection of ``N(0, I_{Nd})`` onto a subspace is the standard normal of that
    subspace, so ``E ||eps||^2 = (N - 1) d`` (Hoogeboom et al. 2022, sec. 3.2)."""
    check_cloud(x)
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return remove_com(z if mask is None else z * check_mask(mask, x), mask)


def zero_com_log_prob(
    x: torch.Tensor, mean: torch.Tensor | None = None, sigma=1.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``log N_X(x; mean, sigma^2 I)`` of the isotropic Gaussian *on the subspace* X, shape (B,):

        -||x - mean||^2 / (2 sigma^2) - (N - 1) d / 2 * log(2 pi sigma^2)

    with ``(N - 1) d``, not ``N d``, in the normalising constant (Hoogeboom et al. 2022, sec. 3.2 and
    appendix; the correction that makes the likelihood of zero-CoM data a density on X). ``x`` and
    ``mean`` must lie in X; ``sigma`` is a number or has shape (B,). The value is invariant under
    rotations, reflections and permutations of x and mean together (they preserve the norm and X); a
    translated cloud is scored through ``remove_com(x)``, which makes it translation invariant too.
    """
    check_zero_com(x, mask)
    diff = x if mean is None else x - check_zero_com(mean, mask, "mean")
    if diff.shape != x.shape:
        raise ValueError(f"mean must have x's shape {tuple(x.shape)}; got {tuple(mean.shape)}.")
    var = _col(torch.as_tensor(sigma, dtype=x.dtype), x[:, 0, 0]) ** 2
    dof = subspace_dim(x, mask)
    return -(diff**2).flatten(1).sum(1) / (2 * var) - dof / 2 * torch.log(2 * math.pi * var)


def zero_com_basis(n: int, d: int, dtype=torch.float64) -> torch.Tensor:
    """An orthonormal basis of X as columns, shape ``(n d, (n - 1) d)`` (flattening ``(n, d)`` row-major):
    the Helmert contrasts of the points, times the standard basis of R^d. For checks and teaching."""
    h = torch.zeros(n, n - 1, dtype=dtype)
    for k in range(1, n):
        h[:k, k - 1] = 1.0 / math.sqrt(k * (k + 1))
        h[k, k - 1] = -k / math.sqrt(k * (k + 1))
    return torch.kron(h, torch.eye(d, dtype=dtype))


# ---------------------------------------------------------------------------------------------
# Diffusion on the subspace
# ---------------------------------------------------------------------------------------------


def q_sample(schedule: Schedule, x0, t, noise, mask=None) -> torch.Tensor:
    """``x_t = alpha_t x_0 + sigma_t eps`` with ``x_0`` and ``eps`` in X (Hoogeboom et al. 2022, eq. 2 with
    ``eps`` drawn by :func:`zero_com_noise`); both are checked to lie in X."""
    check_zero_com(x0, mask, "x0")
    check_zero_com(noise, mask, "noise")
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}; got {tuple(noise.shape)}.")
    t = as_time(t, like=x0)
    return _col(schedule.alpha(t), x0) * x0 + _col(schedule.sigma(t), x0) * noise


def _unpack(batch):
    if torch.is_tensor(batch):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and set(batch) == {"x", "mask"}:
        return batch["x"], batch["mask"]
    raise ValueError("a point-cloud batch is a tensor (B, N, d), a pair (x, mask) or a dict {'x', 'mask'}.")


def en_diffusion_loss(schedule: Schedule) -> Callable:
    """The eps loss of E(n) equivariant diffusion (Hoogeboom et al. 2022, eq. 8 with ``w(t) = 1``),
    ``E_{t, x0, eps} ||eps - eps_hat(x_t, t)||^2 / ((N - 1) d)``, as ``loss(model, batch, generator=None)``
    for :func:`dmlib.train.train`: ``x0`` is projected to X, ``eps`` drawn in X, ``t ~ U(0, 1]``, and the
    squared error is averaged over the subspace's degrees of freedom (so the exact denoiser of unit
    data at high noise scores ~1, not ``(N - 1) / N``). ``batch`` is ``x0`` or ``(x0, mask)``; with a
    mask the model is called as ``model(x_t, t, mask=mask)``. Data off X are projected (translations
    do not matter); the loss reads no values back to Python, so it checks shapes only."""

    def loss(model: Callable, batch, generator=None) -> torch.Tensor:
        x0, mask = _unpack(batch)
        m = check_mask(mask, check_cloud(x0, "batch"), min_points=2)
        x0 = remove_com(x0, mask)
        t = uniform_time(x0, generator)
        eps = zero_com_noise(x0, mask, generator)
        x_t = _col(schedule.alpha(t), x0) * x0 + _col(schedule.sigma(t), x0) * eps
        pred = model(x_t, t) if mask is None else model(x_t, t, mask=mask)
        if pred.shape != x0.shape:
            raise ValueError(
                f"the model must return eps of shape {tuple(x0.shape)}; got {tuple(pred.shape)}."
            )
        err = (pred - eps) ** 2 if m is None else (pred - eps) ** 2 * m
        return (err.flatten(1).sum(1) / subspace_dim(x0, mask)).mean()

    return loss


@torch.no_grad()
def sample_ancestral_zero_com(
    denoiser: Denoiser, x_T, timesteps, *, mask=None, variance="betatilde", generator=None, progress=False,
    callback=None,
) -> torch.Tensor:  # fmt: skip
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) with every noise draw in X, as Hoogeboom et al.
    (2022, Algorithm 2) sample: ``x_s = mean(x_t, eps_hat) + sqrt(Sigma) eps``, ``eps`` from
    :func:`zero_com_noise`. Start from ``x_T = zero_com_noise(...)``; the model must predict eps in X
    (e.g. :class:`EGNNDenoiser`), and with a mask is called as ``model(x, t, mask=mask)``."""
    check_zero_com(x_T, mask, "x_T")
    ts = check_timesteps(timesteps)
    if mask is not None:
        model = denoiser.model
        denoiser = Denoiser(lambda x, t: model(x, t, mask=mask), denoiser.schedule, denoiser.prediction)

    def step(i, x):
        t, s = ts[i], ts[i + 1]
        _, eps_hat = denoiser.x0_eps(x, t.to(x.dtype))
        mean = posterior_mean_from_eps(denoiser.schedule, x, eps_hat, t, s)
        var = reverse_variance(denoiser.schedule, t, s, variance).to(x.dtype)
        return mean if s == 0 else mean + var.sqrt() * zero_com_noise(x, mask, generator)

    return run_steps(step, denoiser, x_T, ts, "ancestral sampling (zero CoM)", progress, callback)


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


def _mlp(i: int, width: int, o: int, act_last: bool = False) -> nn.Sequential:
    layers = [nn.Linear(i, width), nn.SiLU(), nn.Linear(width, o)]
    return nn.Sequential(*layers, nn.SiLU()) if act_last else nn.Sequential(*layers)


class _SetBlock(nn.Module):
    """Pre-norm transformer block (self-attention, then an MLP), no positional encoding."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = _mlp(width, 4 * width, width)

    def forward(self, h, attn_mask):
        B, N, D = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        h = h + self.proj(a.transpose(1, 2).reshape(B, N, D))
        return h + self.mlp(self.norm2(h))


class SetDenoiser(nn.Module):
    """A permutation-equivariant denoiser ``model(x_t, t) -> (B, N, d)``: a transformer over the N points
    with no positional encoding (Vaswani et al. 2017; as a set function, Lee et al. 2019, "Set
    Transformer"). Points are embedded by one linear map, the time features (:func:`embed_time`,
    through an MLP) are added to every token, ``depth`` pre-norm blocks of self-attention and MLP follow,
    and a linear map reads each token out. Self-attention and pointwise maps commute with permutations,
    so ``f(P x) = P f(x)``; the network is *not* rotation or translation equivariant. With ``mask``, padded
    points are neither attended to nor output (zeros)."""

    def __init__(self, d: int, width: int = 64, depth: int = 2, heads: int = 4, time_dim: int = 32):
        super().__init__()
        _check_even(time_dim)
        if width % heads:
            raise ValueError(f"width {width} does not split into {heads} heads.")
        self.config = dict(d=d, width=width, depth=depth, heads=heads, time_dim=time_dim)
        self.d, self.time_dim = d, time_dim
        self.embed, self.time = nn.Linear(d, width), _mlp(time_dim, width, width)
        self.blocks = nn.ModuleList(_SetBlock(width, heads) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, d))

    def forward(self, x: torch.Tensor, t, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_cloud(x, d=self.d)
        m = check_mask(mask, x)
        h = self.embed(x) + self.time(embed_time(t, x, self.time_dim))[:, None]
        attn = None if m is None else m[:, None, None, :, 0].bool()  # (B, 1, 1, N): keys a query may see
        for block in self.blocks:
            h = block(h, attn)
        out = self.out(h)
        return out if m is None else out * m


class EGNNLayer(nn.Module):
    """One E(n)-equivariant graph layer (Satorras, Hoogeboom & Welling 2021, eqs. 3-6) on the complete
    graph, with the time features ``a`` as edge attribute:

        m_ij = phi_e(h_i, h_j, ||x_i - x_j||^2, a)                                  (eq. 3)
        x_i <- x_i + C sum_{j != i} (x_i - x_j) / (||x_i - x_j|| + 1) phi_x(m_ij)   (eq. 4)
        m_i  = sum_{j != i} m_ij                                                      (eq. 5)
        h_i <- h_i + phi_h(h_i, m_i)                                                  (eq. 6, residual)

    with ``C = 1 / (N - 1)``. Stable normalisation: the difference vectors are divided by
    ``||x_i - x_j|| + 1`` (as in Hoogeboom et al. 2022's EGNN), so each term of the update is bounded by
    ``|phi_x|`` however far apart two points are, and the update stays smooth at ``x_i = x_j``. Only
    differences and distances of coordinates enter, so the layer is equivariant under rotations,
    reflections and translations of x and under permutations of the points."""

    def __init__(self, width: int, time_dim: int, update_features: bool = True):
        super().__init__()
        self.phi_e = _mlp(2 * width + 1 + time_dim, width, width, act_last=True)
        self.phi_x = _mlp(width, width, 1)
        # the last layer of a coordinate-output network has no use for eq. 6 (no unused weights)
        self.phi_h = _mlp(2 * width, width, width) if update_features else None

    def forward(self, h, x, a, edges):
        """``h (B, N, W)``, ``x (B, N, d)``, ``a (B, A)``, ``edges (B, N, N, 1)``: 1 on real edges ``i != j``."""
        B, N, W = h.shape
        diff = x[:, :, None] - x[:, None]  # (B, N, N, d): x_i - x_j
        dist2 = (diff**2).sum(-1, keepdim=True)
        pair = [h[:, :, None].expand(B, N, N, W), h[:, None].expand(B, N, N, W), dist2]
        m = self.phi_e(torch.cat(pair + [a[:, None, None].expand(B, N, N, a.shape[1])], -1)) * edges
        neighbours = edges.sum(2).clamp(min=1)  # N_i - 1, at least 1 (a lone point has no edges)
        unit = diff / (torch.sqrt(dist2 + 1e-12) + 1)  # (the 1e-12 keeps the gradient finite at i = j)
        x = x + (unit * self.phi_x(m) * edges).sum(2) / neighbours
        if self.phi_h is not None:
            h = h + self.phi_h(torch.cat([h, m.sum(2)], -1))
        return h, x


class EGNNDenoiser(nn.Module):
    """An E(n)-equivariant eps-prediction network ``model(x_t, t) -> (B, N, d)`` (Hoogeboom et al. 2022,
    sec. 3.3, "EGNN dynamics"): node features start from the time features (the points are identical
    particles; :meth:`node_features` is the hook for types or charges), ``depth`` :class:`EGNNLayer` s
    update features and coordinates, and the output is ``x_L - x_0`` projected to zero centre of mass.

    For any orthogonal Q, translation b and permutation P: ``f(P (x Q^T + b)) = P f(x) Q^T``, and the output
    lies in X. With ``mask``, padded points send and receive no messages and output 0."""

    def __init__(self, d: int, width: int = 64, depth: int = 4, time_dim: int = 32):
        super().__init__()
        _check_even(time_dim)
        self.config = dict(d=d, width=width, depth=depth, time_dim=time_dim)
        self.d, self.width, self.time_dim = d, width, time_dim
        self.h0 = _mlp(time_dim, width, width)
        self.layers = nn.ModuleList(EGNNLayer(width, time_dim, i < depth - 1) for i in range(depth))

    def node_features(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Initial features ``h_0`` (B, N, width) from the time features ``a``; they must not depend on
        the coordinates (that would break equivariance)."""
        return self.h0(a)[:, None].expand(x.shape[0], x.shape[1], self.width)

    def forward(self, x: torch.Tensor, t, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_cloud(x, d=self.d)
        m = check_mask(mask, x)
        a = embed_time(t, x, self.time_dim)
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        edges = (1 - eye)[None, :, :, None].expand(x.shape[0], -1, -1, 1)
        if m is not None:
            edges = edges * m[:, :, None] * m[:, None]
        h, y = self.node_features(x, a), x
        if m is not None:
            h = h * m
        for layer in self.layers:
            h, y = layer(h, y, a, edges)
        return remove_com(y - x, mask)


# ---------------------------------------------------------------------------------------------
# Group actions and the equivariance error
# ---------------------------------------------------------------------------------------------


def random_orthogonal(d: int, generator=None, *, det: int | None = None, dtype=torch.float64) -> torch.Tensor:
    """A Haar-random orthogonal ``(d, d)`` matrix (rotations and reflections, each with probability 1/2):
    the QR decomposition of a Gaussian matrix with the signs of R's diagonal moved into Q (Mezzadri 2007).
    ``det=+1`` gives a rotation, ``det=-1`` a reflection (the first column flipped if needed). On the CPU."""
    if det not in (None, 1, -1):
        raise ValueError(f"det must be None, 1 (a rotation) or -1 (a reflection); got {det!r}.")
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r))
    if det is not None and torch.linalg.det(q) * det < 0:
        q[:, 0] = -q[:, 0]
    return q


def equivariance_error(
    model: Callable, x: torch.Tensor, t, generator=None, *, trials: int = 4, actions=ACTIONS, det=None
) -> float:
    """``max |f(g x) - g f(x)|`` over ``trials`` random group elements ``g x = P (x Q^T + b)``: Q a random
    orthogonal matrix (``det`` as in :func:`random_orthogonal`), b a per-cloud Gaussian translation, P a
    random permutation of the points, each used only if named in ``actions``. The output is a vector
    field (eps), so ``g f(x) = P f(x) Q^T``: translations must leave it unchanged. Zero (to rounding) for
    an equivariant model; use float64 to test at 1e-5 or below."""
    check_cloud(x)
    unknown = set(actions) - set(ACTIONS)
    if unknown:
        raise ValueError(f"unknown actions {sorted(unknown)}; choose from {ACTIONS}.")
    B, N, d = x.shape
    with torch.no_grad():
        fx = model(x, t)
        worst = 0.0
        for _ in range(trials):
            q = random_orthogonal(d, generator, det=det, dtype=x.dtype) if "orthogonal" in actions else None
            q = torch.eye(d, dtype=x.dtype) if q is None else q
            b = torch.randn(B, 1, d, generator=generator, dtype=x.dtype)
            b = b if "translation" in actions else torch.zeros_like(b)
            p = torch.randperm(N, generator=generator) if "permutation" in actions else torch.arange(N)
            q, b, p = q.to(x.device), b.to(x.device), p.to(x.device)
            gx = (x @ q.T + b)[:, p]
            worst = max(worst, float((model(gx, t) - (fx @ q.T)[:, p]).abs().max()))
    return worst


# ---------------------------------------------------------------------------------------------
# Data: rings and the DW-4 system
# ---------------------------------------------------------------------------------------------


def ring_clouds(
    n: int, points: int = 8, radius: float = 1.0, noise: float = 0.05, generator=None, dtype=torch.float32
) -> torch.Tensor:
    """``n`` clouds of ``points`` 2D points evenly spaced on a circle of ``radius``, at a uniformly
    random rotation, with Gaussian jitter of std ``noise`` on every coordinate; zero centre of mass,
    shape ``(n, points, 2)``. Their law is invariant under O(2), translations (after projection) and
    permutations (the points are shuffled)."""
    k = torch.arange(points, dtype=torch.float64)
    theta = 2 * math.pi * (k / points + torch.rand(n, 1, generator=generator, dtype=torch.float64))
    x = radius * torch.stack([theta.cos(), theta.sin()], -1)
    x = x + noise * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    perm = torch.argsort(torch.rand(n, points, generator=generator), 1)
    x = torch.gather(x, 1, perm[..., None].expand(-1, -1, 2))
    return remove_com(x).to(dtype)


# The standard DW-4 constants (Köhler, Klein & Noé 2020, sec. 6): a (linear), b (quadratic), c (quartic),
# d0 (the offset) and the temperature tau. Checked against the authors' group's code, noegroup/bgflow's
# MultiDoubleWellPotential (a=0.9 quartic, b=-4 quadratic, c=0 constant, offset=4 in its naming, energy
# summed over pairs i < j) and the DW-4 set-ups that call it; the paper's own text was not available.
DW4 = dict(a=0.0, b=-4.0, c=0.9, d0=4.0, tau=1.0)


def interparticle_distances(x: torch.Tensor) -> torch.Tensor:
    """The ``N (N - 1) / 2`` distances ``||x_i - x_j||``, ``i < j``, of each cloud: shape (B, N (N - 1) / 2)."""
    check_cloud(x)
    i, j = torch.triu_indices(x.shape[1], x.shape[1], 1, device=x.device)
    return (x[:, i] - x[:, j]).norm(dim=-1)


def dw4_energy(x: torch.Tensor, a=DW4["a"], b=DW4["b"], c=DW4["c"], d0=DW4["d0"], tau=DW4["tau"]):
    """The reduced multi-particle double-well energy (Köhler et al. 2020, DW-4 for N = 4, d = 2), shape (B,):

        u(x) = (1 / tau) sum_{i<j} [a (d_ij - d0) + b (d_ij - d0)^2 + c (d_ij - d0)^4]

    (the paper writes ``1 / (2 tau) sum_{i, j}`` over ordered pairs: the same sum). The target density
    is ``exp(-u)`` on the zero-CoM subspace; each pair prefers ``d_ij = d0 +- sqrt(-b / (2 c))``, i.e.
    about 2.51 or 5.49 with the default constants (:data:`DW4`), across a barrier of ``b^2 / (4 c)``."""
    r = interparticle_distances(x) - d0
    return (a * r + b * r**2 + c * r**4).sum(1) / tau


class MCMCResult(NamedTuple):
    samples: torch.Tensor  # (n, N, d), zero centre of mass
    energies: torch.Tensor  # (n,)
    acceptance: float  # mean Metropolis acceptance rate after burn-in


def mcmc_sample(
    energy: Callable[[torch.Tensor], torch.Tensor], n: int, points: int, d: int, *, chains: int = 256,
    step_size: float = 0.2, burn_in: int = 1000, thin: int = 10, method: str = "rwm", init=None,
    init_scale: float = 2.0, generator=None, dtype=torch.float64,
) -> MCMCResult:  # fmt: skip
    """Reference samples of ``p(x) ∝ exp(-energy(x))`` on the zero-CoM subspace, from ``chains``
    independent seeded chains run in parallel: ``burn_in`` steps discarded, then every ``thin``-th state
    kept until ``n`` samples (taken chain-block by chain-block).

    ``method="rwm"``: random-walk Metropolis, ``y = x + step_size * eps`` with eps from
    :func:`zero_com_noise` (symmetric in X). ``"mala"``: Metropolis-adjusted Langevin (Roberts &
    Tweedie 1996) in X, ``y = x - h P grad u(x) + sqrt(2 h) eps`` with ``h = step_size`` and P the
    projection onto X, accepted with ``min(1, exp(-u(y) + u(x)) q(x | y) / q(y | x))``,
    ``log q(y | x) = -||y - x + h P grad u(x)||^2 / (4 h)``. Both leave ``exp(-u)`` on X invariant (and so
    keep zero centre of mass exactly); an O(d)- and permutation-invariant u gives invariant samples.
    ``init`` (chains, points, d) starts the chains; otherwise ``init_scale * zero_com_noise``. MALA needs
    a start in the typical set: in DW-4's quartic tails its drift overshoots and a chain can stall there
    (start it from RWM samples). For DW-4 (tau = 1), RWM with step 0.2 accepts ~30% of proposals."""
    if method not in ("mala", "rwm"):
        raise ValueError(f"method must be 'mala' or 'rwm'; got {method!r}.")
    if min(n, points - 1, d, chains, thin) < 1 or burn_in < 0 or not step_size > 0:
        raise ValueError("need n, chains, thin, d >= 1, points >= 2, burn_in >= 0 and step_size > 0.")
    shape = torch.zeros(chains, points, d, dtype=dtype)
    x = init_scale * zero_com_noise(shape, generator=generator) if init is None else init.to(dtype)
    check_zero_com(check_cloud(x, "init", d), name="init")
    if x.shape[:2] != (chains, points):
        raise ValueError(f"init must have shape ({chains}, {points}, {d}); got {tuple(x.shape)}.")

    def u_and_grad(z):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            u = energy(z)
            g = torch.autograd.grad(u.sum(), z)[0] if method == "mala" else None
        return u.detach(), (None if g is None else remove_com(g))

    h = step_size
    u, g = u_and_grad(x)
    keep = -(-n // chains)
    kept, kept_u, accepted = [], [], torch.zeros((), dtype=dtype)
    for step in range(burn_in + keep * thin):
        eps = zero_com_noise(x, generator=generator)
        if method == "rwm":
            y = x + h * eps
            uy, gy = u_and_grad(y)
            log_alpha = u - uy
        else:
            y = x - h * g + math.sqrt(2 * h) * eps
            uy, gy = u_and_grad(y)
            fwd = ((y - x + h * g) ** 2).flatten(1).sum(1)
            bwd = ((x - y + h * gy) ** 2).flatten(1).sum(1)
            log_alpha = u - uy + (fwd - bwd) / (4 * h)
        log_alpha = torch.nan_to_num(log_alpha, nan=-math.inf)  # an overflowing proposal is rejected
        accept = torch.log(torch.rand(chains, generator=generator, dtype=dtype)) < log_alpha
        x = torch.where(accept[:, None, None], y, x)
        u = torch.where(accept, uy, u)
        g = None if g is None else torch.where(accept[:, None, None], gy, g)
        if step >= burn_in:
            accepted = accepted + accept.to(dtype).mean()
            if (step - burn_in + 1) % thin == 0:
                kept.append(x)
                kept_u.append(u)
    samples = torch.cat(kept)[:n]
    return MCMCResult(samples, torch.cat(kept_u)[:n], float(accepted) / max(1, keep * thin))


def histogram(values: torch.Tensor, bins: int = 50, range: tuple[float, float] = (0.0, 8.0)):
    """``(density, edges)`` of the flattened ``values`` on ``bins`` equal bins over ``range`` (CPU, float64),
    normalised to integrate to the fraction of values inside ``range``."""
    v = values.detach().reshape(-1).to("cpu", torch.float64)
    counts, edges = torch.histogram(v, bins=bins, range=range)
    return counts / (v.numel() * (edges[1] - edges[0])), edges


def distance_histogram(x: torch.Tensor, bins: int = 50, range: tuple[float, float] = (0.0, 8.0)):
    """Histogram (:func:`histogram`) of all interparticle distances of the clouds ``x``."""
    return histogram(interparticle_distances(x), bins, range)


def energy_histogram(x: torch.Tensor, energy=dw4_energy, bins: int = 50, range=(-30.0, 10.0)):
    """Histogram (:func:`histogram`) of ``energy(x)`` over the clouds ``x`` (DW-4 by default)."""
    return histogram(energy(x), bins, range)
