"""Chapter 2's exercise checks catch the typical mistakes, each with a message that points at the fix."""

import pytest

from dmlib.exercises import ExerciseFailed, check_dsm_loss, check_langevin_step, check_sde_coefficients

MISTAKES = [
    (check_sde_coefficients, lambda a, da, s, ds: (da / a, 2 * s * ds), "g\\^2"),  # forgot -2 f sigma^2
    (check_sde_coefficients, lambda a, da, s, ds: (da, 2 * s * ds - 2 * da * s**2), "f for"),  # f = alpha'
    (check_sde_coefficients, lambda a, da, s, ds: da / a, "pair"),
    (
        check_dsm_loss,
        lambda m, x0, a, s, e: ((m(a * x0 + s * e) - e / s) ** 2).sum(1).mean(),
        "off by",
    ),  # sign
    (
        check_dsm_loss,
        lambda m, x0, a, s, e: ((m(a * x0 + s * e) + e / s) ** 2).mean(),
        "off by",
    ),  # mean over dims
    (check_langevin_step, lambda x, sc, h, z: x + h * sc + h**0.5 * z, "off by"),  # full step on the score
    (
        check_langevin_step,
        lambda x, sc, h, z: x + h / 2 * sc + h * z,
        "off by",
    ),  # no square root on the noise
]


@pytest.mark.parametrize("check,wrong,message", MISTAKES)
def test_checks_catch_typical_mistakes(check, wrong, message):
    with pytest.raises(ExerciseFailed, match=message):
        check(wrong)
