"""Chapter 6's exercise checks: each passes on a solution, reports a stub as not implemented, and
fails on the typical mistakes with a message that points at the fix."""

import math

import torch
from exercise_harness import exercise_tests

from dmlib import equivariant as E
from dmlib.exercises import (
    check_equivariance_error,
    check_torus_score,
    check_zero_com_log_prob,
)

# --- the torus heat-kernel score ----------------------------------------------------------------


def torus_score(x, y, t, mistake=None):
    var = 2 * t if mistake == "Delta" else t
    delta = x - y if mistake == "no wrap" else torch.remainder(x - y + math.pi, 2 * math.pi) - math.pi
    K = {"few images": 1, "no wrap": 0}.get(mistake, 12)  # "no wrap": -(x - y) / t
    k = torch.arange(-K, K + 1, dtype=x.dtype)
    shifted = delta[..., None] + 2 * math.pi * k  # (B, d, 2K + 1)
    logw = -(shifted**2) / (2 * var[:, None, None])
    w = torch.softmax(logw, -1)
    return -(w * shifted).sum(-1) / var[:, None]


# --- the zero-CoM log-density -------------------------------------------------------------------


def zero_com_log_prob(x, sigma, mistake=None):
    c = x if mistake == "no projection" else x - x.mean(1, keepdim=True)
    N, d = x.shape[1], x.shape[2]
    dof = N * d if mistake == "N d" else (N - 1) * d
    return -(c**2).flatten(1).sum(1) / (2 * sigma**2) - dof / 2 * math.log(2 * math.pi * sigma**2)


# --- the equivariance test ----------------------------------------------------------------------


def equivariance_error(model, x, t, generator, mistake=None):
    B, N, d = x.shape
    fx = model(x, t)
    worst = 0.0
    for _ in range(4):
        det = 1 if mistake == "rotations only" else None
        q = E.random_orthogonal(d, generator, det=det)
        b = torch.randn(B, 1, d, generator=generator, dtype=x.dtype)
        if mistake == "no translation":
            b = torch.zeros_like(b)
        p = torch.arange(N) if mistake == "no permutation" else torch.randperm(N, generator=generator)
        gfx = (fx @ q)[:, p] if mistake == "Q not transposed" else (fx @ q.T)[:, p]
        if mistake == "translate output":
            gfx = gfx + b
        worst = max(worst, (model((x @ q.T + b)[:, p], t) - gfx).abs().max().item())
    return worst


CHECKS = [
    (check_torus_score, torus_score),
    (check_zero_com_log_prob, zero_com_log_prob),
    (check_equivariance_error, equivariance_error),
]


MISTAKES = [
    (check_torus_score, torus_score, "Delta", "variance 2t"),
    (check_torus_score, torus_score, "no wrap", "off by|periodic"),
    (check_torus_score, torus_score, "few images", "images"),
    (check_zero_com_log_prob, zero_com_log_prob, "N d", "integrates to"),
    (check_zero_com_log_prob, zero_com_log_prob, "no projection", "changes"),
    (check_equivariance_error, equivariance_error, "rotations only", "reflections"),
    (check_equivariance_error, equivariance_error, "no translation", "translation invariant"),
    (check_equivariance_error, equivariance_error, "no permutation", "permutation"),
    (check_equivariance_error, equivariance_error, "Q not transposed", "which is equivariant"),
    (check_equivariance_error, equivariance_error, "translate output", "which is equivariant"),
]


test_solution_passes_and_stub_fails, test_typical_mistakes_fail = exercise_tests(CHECKS, MISTAKES)
