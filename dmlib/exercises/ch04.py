"""Exercises of Chapter 4 (likelihood)."""

from __future__ import annotations

import torch

from .. import ddpm
from .. import likelihood as _likelihood
from ._common import _call, _compare


def check_gaussian_kl(fn) -> bool:
    """Exercise (Chapter 4): ``fn(mean_q, var_q, mean_p, var_p)`` is ``KL(N(mean_q, var_q) || N(mean_p,
    var_p))`` for diagonal Gaussians, per sample in nats (summed over all but the batch dim)."""
    g = torch.Generator().manual_seed(40)
    cases = []
    for shape in ((64, 2), (8, 1, 8, 8)):
        mq, mp = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
        vq, vp = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.05 for _ in range(2))
        cases.append((f"shape {shape}, per-coordinate variances", mq, vq, mp, vp))
    mq, mp = (torch.randn(64, 2, generator=g, dtype=torch.float64) for _ in range(2))
    cases.append(
        (
            "one variance per distribution",
            mq,
            torch.tensor(0.3, dtype=torch.float64),
            mp,
            torch.tensor(0.7, dtype=torch.float64),
        )
    )
    cases.append(
        (
            "identical distributions (KL = 0)",
            mq,
            torch.full_like(mq, 0.4),
            mq,
            torch.full_like(mq, 0.4),
        )
    )
    for what, mq, vq, mp, vp in cases:
        got = _call("gaussian_kl", fn, mq, vq, mp, vp)
        _compare(
            "gaussian_kl",
            torch.as_tensor(got),
            ddpm.gaussian_kl(mq, vq, mp, vp),
            f"the KL for {what}",
            "per coordinate 0.5 * (log(var_p / var_q) + (var_q + (mean_q - mean_p)^2) / var_p - 1); "
            "sum over every dimension but the first (x.flatten(1).sum(1)).",
            atol=1e-8,
        )
    print("gaussian_kl: correct.")
    return True


def check_hutchinson_divergence(fn) -> bool:
    """Exercise (Chapter 4): ``fn(f, x, v) -> v^T (df/dx) v`` per sample, with one backward pass."""
    g = torch.Generator().manual_seed(41)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64)

    def f(z):  # a nonlinear map acting on each sample separately
        return torch.tanh(z @ A.T) + 0.5 * z**2

    x = torch.randn(256, 3, generator=g, dtype=torch.float64)
    for kind in _likelihood.PROBES:
        v = _likelihood.hutchinson_probe(x.shape, kind, g)
        got = _call("hutchinson_divergence", fn, f, x, v)
        _, want = _likelihood.divergence(f, x, v)
        _compare(
            "hutchinson_divergence",
            torch.as_tensor(got).detach(),
            want,
            f"the estimate with {kind} probes",
            "make x require grad, compute (f(x) * v).sum(), take its gradient w.r.t. x (that is "
            "v^T J for every sample) and return (grad * v).sum(1).",
            atol=1e-8,
        )
    # unbiased: averaged over many probes it is the exact divergence
    point = x[:1].repeat(20_000, 1)
    est = torch.as_tensor(
        _call(
            "hutchinson_divergence", fn, f, point, _likelihood.hutchinson_probe(point.shape, "rademacher", g)
        )
    )
    _, exact = _likelihood.divergence(f, x[:1])
    se = est.std().item() / len(est) ** 0.5
    print(
        f"hutchinson_divergence: correct. Mean of 20000 Rademacher estimates {est.mean().item():.4f} "
        f"+- {se:.4f}; exact divergence {exact.item():.4f}."
    )
    return True


def check_discretized_log_likelihood(fn) -> bool:
    """Exercise (Chapter 4): ``fn(x, mean, std, bins) -> log P(x)`` per sample for the discretized
    Gaussian decoder, with the edge bins extended to -inf and +inf."""
    g = torch.Generator().manual_seed(42)
    for bins, std in ((17, 0.2), (256, 0.05), (4, 0.6)):
        k = torch.randint(0, bins, (64, 3), generator=g)
        k[0] = torch.tensor([0, bins - 1, bins // 2])  # both edge bins are always tested
        x = (-1 + 2 * k / (bins - 1)).double()
        mean = x + 1.5 * std * torch.randn(x.shape, generator=g, dtype=torch.float64)  # within a few std
        got = _call("discretized_log_likelihood", fn, x, mean, std, bins)
        want = _likelihood.discretized_gaussian_log_likelihood(x, mean, std**2, bins=bins)
        _compare(
            "discretized_log_likelihood",
            torch.as_tensor(got),
            want,
            f"log P(x) with {bins} levels and std {std}",
            "bin k covers [x - 1/(bins-1), x + 1/(bins-1)]; P = Phi(upper) - Phi(lower) with "
            "(edge - mean) / std, upper = +inf for x = 1 and lower = -inf for x = -1; "
            "sum the logs over all but the batch dim.",
            atol=1e-6,
        )
    print("discretized_log_likelihood: correct.")
    return True
