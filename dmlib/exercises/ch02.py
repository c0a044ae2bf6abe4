"""Exercises of Chapter 2 (score-based models and SDEs)."""

from __future__ import annotations

import torch

from ._common import ExerciseFailed, _call, _compare


def check_sde_coefficients(fn) -> bool:
    """Exercise (Chapter 2): ``fn(alpha, dalpha_dt, sigma, dsigma_dt) -> (f, g2)`` of the forward SDE."""
    from ..schedules import Schedule, get_schedule

    for name, kwargs in (("linear", {}), ("ve", {"sigma_max": 5.0}), ("subvp", {}), ("cosine", {})):
        sched = get_schedule(name, **kwargs)
        t = torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64, requires_grad=True)
        alpha, sigma = sched.alpha(t), sched.sigma(t)
        dalpha = torch.autograd.grad(alpha.sum(), t)[0] if alpha.requires_grad else torch.zeros_like(t)
        dsigma = torch.autograd.grad(sigma.sum(), t)[0]
        got = _call("sde_coefficients", fn, alpha.detach(), dalpha, sigma.detach(), dsigma)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise ExerciseFailed("sde_coefficients: return a pair (f, g2).")
        f, g2 = Schedule.drift_diffusion(sched, t.detach())
        _compare(
            "sde_coefficients", got[0], f, f"f for the {name} schedule", "f = d log(alpha)/dt = alpha'/alpha."
        )
        _compare(
            "sde_coefficients",
            got[1],
            g2,
            f"g^2 for the {name} schedule",
            "g^2 = d(sigma^2)/dt - 2 f sigma^2, and d(sigma^2)/dt = 2 sigma sigma'.",
        )
    print("sde_coefficients: correct for VP, VE, sub-VP and cosine.")
    return True


def check_dsm_loss(fn) -> bool:
    """Exercise (Chapter 2): ``fn(score_model, x0, alpha, sigma, eps)``, the denoising score-matching loss."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(128, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(128, 2, generator=g, dtype=torch.float64)

    def model(x):  # any fixed function will do; this one is the exact score of N(0, 2 I)
        return -x / 2

    for alpha, sigma in ((0.9, 0.3), (0.5, 0.8), (1.0, 2.0)):
        x_t = alpha * x0 + sigma * eps
        want = ((model(x_t) + eps / sigma) ** 2).sum(1).mean()
        got = _call(
            "dsm_loss",
            fn,
            model,
            x0,
            torch.tensor(alpha, dtype=torch.float64),
            torch.tensor(sigma, dtype=torch.float64),
            eps,
        )
        _compare(
            "dsm_loss",
            torch.as_tensor(got).reshape(()),
            want,
            f"the loss at alpha={alpha}, sigma={sigma}",
            "the target is the score of q(x_t|x0), -(x_t - alpha x0)/sigma^2 = -eps/sigma; "
            "sum the squares over dimensions and average over the batch.",
            atol=1e-6,
        )
    print("dsm_loss: correct.")
    return True


def check_langevin_step(fn) -> bool:
    """Exercise (Chapter 2): ``fn(x, score, step_size, z)``, one step of Langevin dynamics."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 2, generator=g, dtype=torch.float64)
    z = torch.randn(256, 2, generator=g, dtype=torch.float64)
    for step in (0.01, 0.3):
        want = x + step / 2 * (-x) + step**0.5 * z
        got = _call("langevin_step", fn, x, -x, step, z)
        _compare(
            "langevin_step",
            got,
            want,
            f"the step with step_size={step}",
            "x + (step_size / 2) * score + sqrt(step_size) * z: half the step on the score, "
            "the square root of the step on the noise.",
        )
    # run it: on N(0, 1) with step e the chain's stationary variance is 1 / (1 - e / 4), not 1
    e, x = 0.2, torch.zeros(20_000, 1, dtype=torch.float64)
    for _ in range(300):
        x = fn(x, -x, e, torch.randn(x.shape, generator=g, dtype=torch.float64))
    print(
        f"langevin_step: correct. On N(0, 1) with step {e}: variance {x.var().item():.3f} "
        f"(finite-step theory {1 / (1 - e / 4):.3f}; the bias vanishes as the step shrinks)."
    )
    return True
