"""Chapter 9's exercise checks: each passes on a solution, reports a stub as not implemented, and
fails on the typical mistakes with a message that points at the fix."""

import pytest
import torch
from exercise_harness import exercise_tests

from dmlib.exercises.ch09 import check_dps_gradient, check_gaussian_posterior, check_replacement_step
from dmlib.samplers import ddim_step

pytestmark = pytest.mark.usefixtures("one_thread")

# --- the replacement step -----------------------------------------------------------------------


def replacement_step(denoiser, x_t, t, s, y, observed, generator, mistake=None):
    sched = denoiser.schedule
    eta = 0.0 if mistake == "deterministic" else 1.0
    when = t if mistake == "paste at t" else s
    noise = torch.randn(x_t.shape[0], len(y), generator=generator, dtype=x_t.dtype)
    known = sched.alpha(when) * y + sched.sigma(when) * noise
    if mistake == "clean y":
        known = y.expand(x_t.shape[0], -1)
    if mistake == "paste before the step":
        x_t = x_t.clone()
        x_t[:, observed] = known
        return ddim_step(denoiser, x_t, t, s, eta=eta, generator=generator)
    x_s = ddim_step(denoiser, x_t, t, s, eta=eta, generator=generator).clone()
    x_s[:, observed] = known
    return x_s


# --- the DPS gradient ---------------------------------------------------------------------------


def dps_gradient(denoiser, A, y, x_t, t, mistake=None):
    x = x_t.detach().requires_grad_(True)
    x0 = denoiser.x0(x, t)
    if mistake == "no Jacobian":
        x0 = x0.detach().requires_grad_(True)
    resid = y - x0 @ A.T
    if mistake == "squared":
        loss = (resid**2).sum()
    elif mistake == "one norm for the batch":
        loss = resid.norm()
    else:
        loss = resid.norm(dim=1).sum()
    if mistake == "sign":
        loss = -loss
    (grad,) = torch.autograd.grad(loss, x0 if mistake == "no Jacobian" else x)
    return grad


# --- the Gaussian posterior ---------------------------------------------------------------------


def gaussian_posterior(mu, C, A, y, sigma_y, mistake=None):
    noise = {"std for variance": sigma_y, "no noise": 0.0}.get(mistake, sigma_y**2)
    S = A @ C @ A.T + noise * torch.eye(len(y), dtype=C.dtype)
    K = torch.linalg.solve(S, A @ C).T  # C A^T S^{-1}
    cov = C.clone() if mistake == "no shrinkage" else C - K @ A @ C
    if mistake == "K not transposed":
        cov = C - (A @ C).T @ torch.linalg.solve(S, A) @ C.T @ C
    return mu + K @ (y - A @ mu), cov


CHECKS = [
    (check_replacement_step, replacement_step),
    (check_dps_gradient, dps_gradient),
    (check_gaussian_posterior, gaussian_posterior),
]


MISTAKES = [
    (check_replacement_step, replacement_step, "clean y", "no noise"),
    (check_replacement_step, replacement_step, "paste at t", "noise level of t"),
    (check_replacement_step, replacement_step, "deterministic", "deterministically"),
    (check_replacement_step, replacement_step, "paste before the step", "observed coordinate"),
    (check_dps_gradient, dps_gradient, "squared", "squared norm"),
    (check_dps_gradient, dps_gradient, "no Jacobian", "differentiate through the denoiser"),
    (check_dps_gradient, dps_gradient, "one norm for the batch", "one norm per sample"),
    (check_dps_gradient, dps_gradient, "sign", "sign is flipped"),
    (check_gaussian_posterior, gaussian_posterior, "no noise", "noise of y is missing"),
    (check_gaussian_posterior, gaussian_posterior, "std for variance", "standard deviation"),
    (check_gaussian_posterior, gaussian_posterior, "no shrinkage", "did not shrink"),
    (check_gaussian_posterior, gaussian_posterior, "K not transposed", "off by"),
]


test_solution_passes_and_stub_fails, test_typical_mistakes_fail = exercise_tests(CHECKS, MISTAKES)
