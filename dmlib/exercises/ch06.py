"""Exercises of Chapter 6 (data with structure: symmetries and known manifolds).

Each check measures behaviour where the answer is known: the torus heat-kernel score against
:class:`dmlib.manifolds.Torus` and against finite differences of the exact log-kernel, across small
and large times and across the seam at ``±π``; a zero-centre-of-mass log-density by its invariances
and by integrating it over the subspace (it must integrate to 1 there); an equivariance test by
running it on equivariant networks (it must report ~0) and on models that break exactly one
symmetry (it must report each of them).
"""

from __future__ import annotations

import math

import torch

from .. import equivariant as _eq
from .. import manifolds as _mf
from ._common import ExerciseFailed, _call, _expect_tensor


def check_torus_score(fn) -> bool:
    """Exercise (Chapter 6): ``fn(x, y, t) -> ∇_x log p_t(x, y)`` on the flat torus Tᵈ, for angles
    ``x, y`` of shape ``(B, d)`` in ``[−π, π)`` and times ``t`` of shape ``(B,)``, with the generator
    ``½Δ`` (the kernel is the wrapped Gaussian of variance ``t`` per coordinate). Graded against
    :meth:`dmlib.manifolds.Torus.heat_kernel_score` at times from 0.01 to 8, and by periodicity."""
    g = torch.Generator().manual_seed(60)
    d, n = 2, 600
    torus = _mf.Torus(d)
    x = torus.uniform(n, g)
    y = torus.uniform(n, g)
    # points on both sides of the seam: x - y close to ±π and beyond
    y[:100] = _mf._wrap(x[:100] + math.pi + 0.3 * torch.randn(100, d, generator=g, dtype=x.dtype))
    small = torch.exp(torch.empty(n, dtype=x.dtype).uniform_(math.log(0.01), 0.0, generator=g))
    big = torch.empty(n, dtype=x.dtype).uniform_(1.0, 8.0, generator=g)
    for what, t in (("times in [0.01, 1]", small), ("times in [1, 8]", big)):
        want = torus.heat_kernel_score(x, y, t)
        got = _call("torus_score", fn, x.clone(), y.clone(), t.clone())
        got = _expect_tensor("torus_score", got, want.shape, "the score, one tangent vector per point")
        err = (got - want).abs().max().item()
        if not err < 1e-6:
            ratio = (got * want).sum() / (want * want).sum()
            hint = (
                "the score is half of dmlib's everywhere: your kernel has variance 2t, the "
                "convention of ∂p/∂t = Δp. Here the generator is ½Δ: the variance is t."
                if abs(ratio.item() - 0.5) < 0.05
                else "far from y (near the seam at ±π) and at large t the kernel is a sum "
                "over images k of N(δ + 2πk; 0, t), δ = wrap(x − y): the score is the "
                "softmax-weighted average of −(δ + 2πk)/t over enough k that the "
                "neglected images are negligible (|2πk| up to several √t)."
            )
            raise ExerciseFailed(f"torus_score: for {what} the score is off by up to {err:.3g}. Hint: {hint}")
    shifted = _call("torus_score", fn, _mf._wrap(x + 2 * math.pi - 1e-9), y.clone(), big.clone())
    base = _call("torus_score", fn, x.clone(), y.clone(), big.clone())
    if not (shifted.double() - base.double()).abs().max().item() < 1e-5:
        raise ExerciseFailed("torus_score: the score is not periodic in x; wrap the displacement.")
    # finite differences of the exact log-kernel, as a second opinion on one coordinate
    h = 1e-5
    e = torch.zeros(d, dtype=x.dtype)
    e[0] = h
    fd = (
        torus.log_heat_kernel(_mf._wrap(x + e), y, small) - torus.log_heat_kernel(_mf._wrap(x - e), y, small)
    ) / (2 * h)
    got0 = _call("torus_score", fn, x.clone(), y.clone(), small.clone())[:, 0].double()
    fd_err = ((got0 - fd).abs() / (1 + fd.abs())).max().item()
    if not fd_err < 1e-4:
        raise ExerciseFailed(
            f"torus_score: the first coordinate differs from finite differences of log p_t by up to "
            f"{fd_err:.3g} (relative)."
        )
    print("torus_score: correct (against dmlib, finite differences and periodicity, t from 0.01 to 8).")
    return True


def check_zero_com_log_prob(fn) -> bool:
    """Exercise (Chapter 6): ``fn(x, sigma) -> log N_X(P x; 0, sigma² I)``, shape ``(B,)``, for point
    clouds ``x`` of shape ``(B, N, d)`` (not necessarily centred): project onto the zero-centre-of-mass
    subspace X, then the isotropic Gaussian density *on X*, of dimension ``(N − 1) d``. Graded by
    invariance (translations, rotations, reflections, permutations), by its value, and by integrating
    ``exp(fn)`` over X, which must give 1."""
    g = torch.Generator().manual_seed(61)
    B, N, d, sigma = 64, 5, 3, 1.3
    x = torch.randn(B, N, d, generator=g, dtype=torch.float64)
    got = _call("zero_com_log_prob", fn, x.clone(), sigma)
    got = _expect_tensor("zero_com_log_prob", got, (B,), "one log-density per cloud")
    q = _eq.random_orthogonal(d, g, det=-1)
    b = 5 * torch.randn(B, 1, d, generator=g, dtype=torch.float64)
    perm = torch.randperm(N, generator=g)
    moved = _call("zero_com_log_prob", fn, (x @ q.T + b)[:, perm], sigma).double()
    inv = (moved - got).abs().max().item()
    if not inv < 1e-8:
        raise ExerciseFailed(
            f"zero_com_log_prob: moving the clouds (a reflection, a translation, a permutation) changes "
            f"the log-density by up to {inv:.3g}. Hint: project first, x − mean over the points."
        )
    # normalisation: N = 3 points on a line (d = 1), X is a plane; integrate exp(fn) on a grid of it
    basis = _eq.zero_com_basis(3, 1)  # (3, 2), orthonormal columns
    u = torch.linspace(-8 * sigma, 8 * sigma, 321, dtype=torch.float64)
    uu = torch.cartesian_prod(u, u)
    pts = (uu @ basis.T)[:, :, None]  # (M, 3, 1), zero centre of mass
    logp = _call("zero_com_log_prob", fn, pts, sigma).double()
    mass = (logp.exp().sum() * (u[1] - u[0]) ** 2).item()
    if not abs(mass - 1) < 1e-3:
        extra = math.log(mass)
        per = extra / (-0.5 * math.log(2 * math.pi * sigma**2))
        raise ExerciseFailed(
            f"zero_com_log_prob: exp(log p) integrates to {mass:.4g} over the subspace, not 1 "
            f"(N = 3 points in d = 1). Hint: the normalising constant counts the subspace's "
            f"dimensions; yours is off by {per:.2g} dimension(s): the subspace has (N − 1) d, "
            "not N d."
        )
    want = _eq.zero_com_log_prob(_eq.remove_com(x), sigma=sigma)
    err = (got - want).abs().max().item()
    if not err < 1e-8:
        raise ExerciseFailed(
            f"zero_com_log_prob: the log-density differs from the Gaussian on X by up to {err:.3g}. "
            "Hint: -|P x|² / (2 sigma²) - (N - 1) d / 2 log(2 pi sigma²)."
        )
    print("zero_com_log_prob: correct (invariant, normalised on the subspace, right values).")
    return True


def _equivariant_models(d):
    torch.manual_seed(62)
    egnn = _eq.EGNNDenoiser(d, width=16, depth=2).double()
    return [
        ("a linear equivariant map (x - centre of mass)", lambda x, t: _eq.remove_com(x)),
        ("an EGNN", egnn),
    ]


def _broken_models(d):
    def chiral(x, t):  # commutes with rotations of the plane, not with reflections
        c = _eq.remove_com(x)
        return torch.stack([-c[..., 1], c[..., 0]], -1)

    def positional(x, t):  # the point's index enters: not permutation equivariant
        c = _eq.remove_com(x)
        w = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
        return c * w

    return [
        ("a model that returns x itself (not translation invariant)", lambda x, t: x.clone()),
        ("a model that weights each point by its index (not permutation equivariant)", positional),
        ("a model that rotates by 90 degrees (equivariant under rotations, not reflections)", chiral),
        ("a model that squares coordinates (not rotation equivariant)", lambda x, t: _eq.remove_com(x) ** 2),
    ]


def check_equivariance_error(fn) -> bool:
    """Exercise (Chapter 6): ``fn(model, x, t, generator) -> float``, the largest
    ``|f(g x) − g f(x)|`` over a few random group elements ``g`` of E(d) × S_N acting on clouds ``x``
    ``(B, N, d)``: orthogonal maps (rotations *and* reflections), translations (which must not move
    the output, a vector field) and permutations. Graded on equivariant models (it must report < 1e-9
    in float64) and on four models that each break one symmetry (it must report each one)."""
    d = 2
    g = torch.Generator().manual_seed(63)
    x = _eq.remove_com(torch.randn(6, 5, d, generator=g, dtype=torch.float64))
    t = torch.full((6,), 0.5, dtype=torch.float64)
    for what, model in _equivariant_models(d):
        err = _call("equivariance_error", fn, model, x.clone(), t, torch.Generator().manual_seed(64))
        if not isinstance(err, (int, float)) and not (torch.is_tensor(err) and err.numel() == 1):
            raise ExerciseFailed(f"equivariance_error: return one number; got {type(err).__name__}.")
        if not float(err) < 1e-9:
            raise ExerciseFailed(
                f"equivariance_error: for {what}, which is equivariant, you report {float(err):.3g}. "
                "Hint: the output is a vector field, so g f(x) rotates and permutes f(x) but does not "
                "translate it; with points as rows, x ↦ x Q^T applies Q, and the permutation must be "
                "the same on both sides."
            )
    for what, model in _broken_models(d):
        err = _call("equivariance_error", fn, model, x.clone(), t, torch.Generator().manual_seed(65))
        if not float(err) > 1e-3:
            raise ExerciseFailed(
                f"equivariance_error: for {what} you report {float(err):.3g}; it is not equivariant. "
                "Hint: draw each kind of action (orthogonal maps including reflections, a "
                "translation, a permutation) in every trial, over a few trials."
            )
    print("equivariance_error: correct (~0 on two equivariant models; flags four broken ones).")
    return True
