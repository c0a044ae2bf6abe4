"""Chapter 1's exercise checks catch the typical mistakes, each with a message that points at the fix."""

import math
from functools import partial

import pytest
import torch

from dmlib.exercises import (
    ExerciseFailed,
    check_ancestral_sampler,
    check_eps_error_curve,
    check_forward_sample,
    check_posterior,
    check_vlb_terms,
    check_x0_from_eps,
)

MISTAKES = [
    (check_forward_sample, lambda x0, abar, eps: abar * x0 + (1 - abar) * eps, "square roots"),
    (check_forward_sample, lambda x0, abar, eps: (abar.sqrt() * x0 + (1 - abar).sqrt() * eps)[:1], "shape"),
    (
        check_posterior,
        lambda x_t, x0, b, ab, abp: (
            (abp.sqrt() * b * x0 + abp.sqrt() * (1 - abp) * x_t) / (1 - ab),
            b * (1 - abp) / (1 - ab),
        ),
        "the mean",
    ),  # the misprint of Chang et al. eq. 13: sqrt(abar_{t-1}) where sqrt(alpha_t) belongs
    (
        check_posterior,
        lambda x_t, x0, b, ab, abp: (((1 - b) ** 0.5 * (1 - abp) * x_t + abp.sqrt() * b * x0) / (1 - ab), b),
        "the variance",
    ),
    (check_posterior, lambda x_t, x0, b, ab, abp: x_t, "pair"),
    (check_x0_from_eps, lambda x_t, eps, ab: x_t - (1 - ab).sqrt() * eps, "off by"),
    (check_x0_from_eps, lambda x_t, eps, ab: torch.full_like(x_t, float("nan")), "off by"),
    (check_x0_from_eps, lambda x_t, eps, ab: x_t.numpy(), "torch.Tensor"),
]


@pytest.mark.parametrize("check,wrong,message", MISTAKES)
def test_checks_catch_typical_mistakes(check, wrong, message):
    with pytest.raises(ExerciseFailed, match=message):
        check(wrong)


# --- the algorithms: Chapter 1's solutions, and each typical mistake as a switch -----------------


def ancestral_sampler(eps_fn, x_T, tables, generator, variance="betatilde", last_noise=False):
    T = tables.T
    b, a, ab = tables.betas, tables.alphas, tables.alphas_cumprod
    x = x_T
    for i in range(T, 0, -1):
        eps = eps_fn(x, torch.tensor(i / T, dtype=x.dtype))
        mean = (x - b[i] / (1 - ab[i]).sqrt() * eps) / a[i].sqrt()
        if i > 1 or last_noise:
            # (betatilde_1 = 0, so noise on the last step means beta_1's)
            var = b[i] if variance == "beta" or i == 1 else b[i] * (1 - ab[i - 1]) / (1 - ab[i])
            var = var if variance != "none" else torch.zeros_like(var)
            x = mean + var.sqrt() * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        else:
            x = mean
    return x


def vlb_terms(x0_fn, x0, tables, generator, decoder_var="beta", drop_prior=False):
    T = tables.T
    b, a, ab = tables.betas, tables.alphas, tables.alphas_cumprod
    cols = []
    for i in range(1, T + 1):
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        x_i = ab[i].sqrt() * x0 + (1 - ab[i]).sqrt() * eps

        def mean(x0_, i=i, x_i=x_i):  # eq. (eq-posterior)
            return (ab[i - 1].sqrt() * b[i] * x0_ + a[i].sqrt() * (1 - ab[i - 1]) * x_i) / (1 - ab[i])

        mu = mean(x0_fn(x_i, torch.tensor(i / T, dtype=x0.dtype)))
        if i == 1:
            var = b[1] if decoder_var == "beta" else torch.tensor(1e-4, dtype=x0.dtype)
            cols.append((0.5 * ((x0 - mu) ** 2 / var + torch.log(2 * math.pi * var))).sum(1))
        else:
            var = b[i] * (1 - ab[i - 1]) / (1 - ab[i])
            cols.append(((mean(x0) - mu) ** 2 / (2 * var)).sum(1))  # equal variances: the means
    v = 1 - ab[T]
    prior = 0.5 * (ab[T] * x0**2 + v - 1 - torch.log(v)).sum(1)
    cols.append(torch.zeros_like(prior) if drop_prior else prior)
    return torch.stack(cols, 1)


def eps_error_curve(eps_fn, schedule, x0, ts, generator, reduce="mean", se_per="sample", same_eps=True):
    err, se = [], []
    for t in ts:
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        x_t = schedule.alpha(t) * x0 + schedule.sigma(t) * eps
        target = eps if same_eps else torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        sq = (target - eps_fn(x_t, t)) ** 2
        per = sq.mean(1) if reduce == "mean" else sq.sum(1)
        n = per.numel() if se_per == "sample" else sq.numel()
        err.append(per.mean())
        se.append((sq.std() if se_per == "coordinate" else per.std()) / n**0.5)
    return torch.stack(err), torch.stack(se)


def test_algorithm_solutions_pass():
    assert check_ancestral_sampler(ancestral_sampler)
    assert check_vlb_terms(vlb_terms)
    assert check_eps_error_curve(eps_error_curve)


ALGORITHM_MISTAKES = [
    (check_ancestral_sampler, partial(ancestral_sampler, variance="beta"), "too much noise"),
    (check_ancestral_sampler, partial(ancestral_sampler, variance="none"), "too little noise"),
    (check_ancestral_sampler, partial(ancestral_sampler, last_noise=True), "differ"),
    (check_ancestral_sampler, lambda e, x, tab, g: x[:10], "shape"),
    (check_vlb_terms, partial(vlb_terms, drop_prior=True), "L_T"),
    (check_vlb_terms, partial(vlb_terms, decoder_var="tiny"), "L_0"),
    (check_vlb_terms, lambda f, x0, tab, g: vlb_terms(f, x0, tab, g)[:, 1:], "shape"),
    (check_eps_error_curve, partial(eps_error_curve, reduce="sum"), "eps_fn = 0"),
    (check_eps_error_curve, partial(eps_error_curve, same_eps=False), "exact denoiser"),
    (check_eps_error_curve, partial(eps_error_curve, se_per="coordinate"), "standard error"),
]


@pytest.mark.parametrize("check,wrong,message", ALGORITHM_MISTAKES)
def test_algorithm_checks_catch_typical_mistakes(check, wrong, message):
    with pytest.raises(ExerciseFailed, match=message):
        check(wrong)
