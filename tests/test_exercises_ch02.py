"""Chapter 2's exercise checks catch the typical mistakes, each with a message that points at the fix."""

import pytest
import torch

from dmlib.exercises import (
    ExerciseFailed,
    check_annealed_langevin,
    check_dsm_loss,
    check_langevin_step,
    check_reverse_sde_sampler,
    check_sde_coefficients,
    check_sliced_score_matching,
)

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
    # Song & Ermon's convention x + (h / 2) s + sqrt(h) z instead of the book's
    (check_langevin_step, lambda x, sc, h, z: x + h / 2 * sc + h**0.5 * z, "off by"),
    (check_langevin_step, lambda x, sc, h, z: x + h * sc + h**0.5 * z, "off by"),  # sqrt(h) noise
    (check_langevin_step, lambda x, sc, h, z: x + h * sc + 2 * h * z, "off by"),  # no square root
]


def _annealed(convention="book", scale=True, order=1, last_only=False):
    """An annealed Langevin sampler with one typical mistake switched on."""

    def fn(score, x, sigmas, n_steps, step_size, generator):
        levels = list(sigmas)[::order]
        for sigma in levels[-1:] if last_only else levels:
            d = step_size * (sigma / sigmas[-1]) ** 2 if scale else step_size
            for _ in range(n_steps):
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
                if convention == "book":
                    x = x + d * score(x, sigma) + (2 * d) ** 0.5 * z
                else:  # Song & Ermon's alpha convention read as the book's delta
                    x = x + d / 2 * score(x, sigma) + d**0.5 * z
        return x

    return fn


def _reverse_sde(ode_drift=False, noise="sqrt", sign=-1):
    def fn(score, drift_diffusion, x, ts, generator):
        for t, s in zip(ts[:-1], ts[1:]):
            f, g2 = drift_diffusion(t)
            dt = t - s
            drift = f * x - (0.5 if ode_drift else 1.0) * g2 * score(x, t)
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            amp = (g2 * dt).sqrt() if noise == "sqrt" else g2.sqrt() * dt
            x = x + sign * drift * dt + amp * z
        return x

    return fn


def _ssm(half_norm=True, quad="jacobian"):
    def fn(score_fn, x, n_projections, generator):
        x = x.detach().requires_grad_(True)
        s = score_fn(x)
        total = torch.zeros(len(x), dtype=x.dtype)
        for _ in range(n_projections):
            v = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            if quad == "jacobian":
                grad = torch.autograd.grad((v * s).sum(), x, create_graph=True)[0]
                total = total + (grad * v).sum(1) / n_projections
            else:  # v^T s instead of v^T (grad s) v
                total = total + (v * s).sum(1) / n_projections
        return total + (0.5 if half_norm else 1.0) * (s**2).sum(1)

    return fn


MISTAKES += [
    (check_annealed_langevin, _annealed(convention="song-ermon"), "variance settles"),
    (check_annealed_langevin, _annealed(scale=False), "weight of the 0.8 mode"),
    (check_annealed_langevin, _annealed(order=-1), "weight of the 0.8 mode|spread"),
    (check_annealed_langevin, _annealed(last_only=True), "weight of the 0.8 mode"),
    (check_reverse_sde_sampler, _reverse_sde(ode_drift=True), "weak errors"),  # the ODE's drift
    (check_reverse_sde_sampler, _reverse_sde(noise="dt"), "weak errors"),  # g dt, not g sqrt(dt)
    (check_reverse_sde_sampler, _reverse_sde(sign=1), "weak errors|finite"),  # forward in time
    (check_sliced_score_matching, _ssm(half_norm=False), "standard errors"),
    (check_sliced_score_matching, _ssm(quad="linear"), "standard errors"),
]


@pytest.mark.parametrize("check,wrong,message", MISTAKES)
def test_checks_catch_typical_mistakes(check, wrong, message):
    with pytest.raises(ExerciseFailed, match=message):
        check(wrong)
