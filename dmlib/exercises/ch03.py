"""Exercises of Chapter 3 (fast sampling)."""

from __future__ import annotations

import math

import torch

from .. import samplers
from ..data import eight_gaussians
from ..oracle import MixtureOracle
from ..schedules import get_schedule
from ._common import ExerciseFailed, _call, _compare


def check_ddim_step(fn) -> bool:
    """Exercise (Chapter 3): ``fn(x_t, eps_hat, alpha_t, sigma_t, alpha_s, sigma_s) -> x_s``, one
    deterministic DDIM step (eta = 0) from time t to an earlier time s, for any schedule."""
    g = torch.Generator().manual_seed(5)
    x_t = torch.randn(64, 2, generator=g, dtype=torch.float64)
    for name in ("linear", "ve"):
        sched = get_schedule(name)
        den = MixtureOracle(eight_gaussians(std=0.4), sched).denoiser()
        for t, s in ((0.9, 0.6), (0.5, 0.45), (0.2, 0.05)):
            tt, ss = torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
            x = sched.sigma(tt) * x_t if name == "ve" else x_t
            eps = den.eps(x, tt)
            want = samplers.sample_ddim(den, x, torch.stack([tt, ss]))
            got = _call(
                "ddim_step", fn, x, eps, sched.alpha(tt), sched.sigma(tt), sched.alpha(ss), sched.sigma(ss)
            )
            _compare(
                "ddim_step",
                got,
                want,
                f"x_s for the {name} schedule from t={t} to s={s}",
                "first recover x0_hat = (x_t - sigma_t eps_hat) / alpha_t, then "
                "x_s = alpha_s x0_hat + sigma_s eps_hat: the same noise, a new noise level.",
                atol=1e-8,
            )
    print("ddim_step: correct for VP and VE.")
    return True


def check_dpm_solver_1_step(fn) -> bool:
    """Exercise (Chapter 3): ``fn(x_t, eps_hat, alpha_t, alpha_s, sigma_s, log_snr_t, log_snr_s) -> x_s``,
    the first-order DPM-Solver step written with dmlib's log-SNR ``log(alpha^2 / sigma^2)``."""
    g = torch.Generator().manual_seed(6)
    x_t = torch.randn(64, 2, generator=g, dtype=torch.float64)
    for name in ("linear", "cosine", "subvp"):
        sched = get_schedule(name)
        den = MixtureOracle(eight_gaussians(std=0.4), sched).denoiser()
        for t, s in ((0.8, 0.5), (0.3, 0.1)):
            tt, ss = torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
            eps = den.eps(x_t, tt)
            want = samplers.sample_dpm_solver(den, x_t, torch.stack([tt, ss]), order=1)
            args = (
                x_t,
                eps,
                sched.alpha(tt),
                sched.alpha(ss),
                sched.sigma(ss),
                sched.log_snr(tt),
                sched.log_snr(ss),
            )
            got = _call("dpm_solver_1_step", fn, *args)
            # the most common slip: h = log_snr_s - log_snr_t, twice DPM-Solver's h
            h_wrong = (sched.log_snr(ss) - sched.log_snr(tt)).item()
            slip = (sched.alpha(ss) / sched.alpha(tt)) * x_t - sched.sigma(ss) * math.expm1(h_wrong) * eps
            if torch.is_tensor(got) and got.shape == want.shape and torch.allclose(got, slip, atol=1e-8):
                raise ExerciseFailed(
                    "dpm_solver_1_step: you used h = log_snr_s - log_snr_t. DPM-Solver's lambda is "
                    "log(alpha / sigma), half of dmlib's log-SNR log(alpha^2 / sigma^2): halve h."
                )
            _compare(
                "dpm_solver_1_step",
                got,
                want,
                f"x_s for the {name} schedule from t={t} to s={s}",
                "h = (log_snr_s - log_snr_t) / 2 and x_s = (alpha_s / alpha_t) x_t - sigma_s (e^h - 1) eps_hat; "
                "math.expm1 or torch.expm1 computes e^h - 1 accurately for small h.",
                atol=1e-8,
            )
    print("dpm_solver_1_step: correct (and equal to a DDIM step, as it should be).")
    return True


def check_edm_grid(fn) -> bool:
    """Exercise (Chapter 3): ``fn(rho_max, rho_min, n, r) -> tensor`` of the ``n + 1`` noise levels of
    Karras et al.'s eq. 5, from ``rho_max`` down to ``rho_min``."""
    sched = get_schedule("linear")
    for n, r, t_min in ((10, 7.0, 0.01), (4, 3.0, 0.05), (25, 7.0, 0.002)):
        ts = samplers.time_grid(sched, n, "edm", t_min=t_min, rho=r)
        want = sched.sigma(ts) / sched.alpha(ts)
        got = _call("edm_grid", fn, want[0].item(), want[-1].item(), n, r)
        got = torch.as_tensor(got, dtype=torch.float64) if not torch.is_tensor(got) else got
        if got.shape == want.shape and torch.allclose(got.double(), want.flip(0), rtol=1e-6):
            raise ExerciseFailed("edm_grid: your grid runs upwards; start at rho_max and end at rho_min.")
        hint = (
            "rho_i = (rho_max^(1/r) + i/n (rho_min^(1/r) - rho_max^(1/r)))^r for i = 0..n: "
            f"{n + 1} levels, both ends included."
        )
        if got.shape != want.shape:
            raise ExerciseFailed(
                f"edm_grid: got shape {tuple(got.shape)}; expected {tuple(want.shape)}. {hint}"
            )
        # relative error: the levels span five orders of magnitude
        _compare(
            "edm_grid",
            got.double() / want,
            torch.ones_like(want),
            f"rho_i / expected (n={n}, r={r})",
            hint,
            1e-6,
        )
    print("edm_grid: correct; dmlib.samplers.time_grid(schedule, n, 'edm') maps these levels back to times.")
    return True
