"""Chapter 1's exercise checks catch the typical mistakes, each with a message that points at the fix."""

import pytest
import torch

from dmlib.exercises import ExerciseFailed, check_forward_sample, check_posterior, check_x0_from_eps

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
