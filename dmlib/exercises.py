"""Self-checking exercises: ``check_<name>(student_fn)`` raises :class:`ExerciseFailed` with feedback
until ``student_fn`` is right, and prints a confirmation when it is.

Each check compares the student's function with dmlib's on fixed random inputs, so the same call
grades in a notebook, in a course's autograder and in this project's tests.
"""

from __future__ import annotations

import math

import torch

from . import ddpm, samplers
from . import likelihood as _likelihood
from .data import eight_gaussians
from .oracle import MixtureOracle
from .schedules import Cosine, ddpm_tables, get_schedule


class ExerciseFailed(AssertionError):
    """The student's function is not yet right; the message says how."""


def _call(name: str, fn, *args):
    try:
        return fn(*args)
    except NotImplementedError as err:
        raise ExerciseFailed(
            f"{name}: not implemented yet. Replace the `raise NotImplementedError` with your code."
        ) from err


def _compare(name: str, got, want, what: str, hint: str, atol: float = 1e-5):
    if not torch.is_tensor(got):
        raise ExerciseFailed(f"{name}: {what} should be a torch.Tensor; got {type(got).__name__}.")
    if got.shape != want.shape:
        raise ExerciseFailed(f"{name}: {what} has shape {tuple(got.shape)}; expected {tuple(want.shape)}.")
    err = (got.double() - want.double()).abs().max().item()
    if not err <= atol:  # also catches NaN
        raise ExerciseFailed(f"{name}: {what} is off by up to {err:.3g} (tolerance {atol:g}). Hint: {hint}")


def check_forward_sample(fn) -> bool:
    """Exercise: ``fn(x0, alpha_bar_t, eps) -> x_t`` implements the closed-form forward marginal."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 2, generator=g, dtype=torch.float64)
    for abar in (0.9, 0.3, 0.01):
        want = abar**0.5 * x0 + (1 - abar) ** 0.5 * eps
        got = _call("forward_sample", fn, x0, torch.tensor(abar, dtype=torch.float64), eps)
        _compare(
            "forward_sample",
            got,
            want,
            f"x_t at alpha_bar_t={abar}",
            "x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps; mind the square roots.",
        )
    print("forward_sample: correct.")
    return True


def check_posterior(fn) -> bool:
    """Exercise: ``fn(x_t, x0, beta_t, alpha_bar_t, alpha_bar_prev) -> (mean, variance)`` of q(x_{t-1}|x_t,x_0)."""
    g = torch.Generator().manual_seed(1)
    tables = ddpm_tables(Cosine(), 50)
    abar = tables.alphas_cumprod
    x0 = torch.randn(64, 2, generator=g, dtype=torch.float64)
    x_t = torch.randn(64, 2, generator=g, dtype=torch.float64)
    for t in (2, 25, 50):
        want_mean, want_var = ddpm.posterior(Cosine(), x_t, x0, t / 50, (t - 1) / 50)
        got = _call("posterior", fn, x_t, x0, tables.betas[t], abar[t], abar[t - 1])
        if not (isinstance(got, tuple) and len(got) == 2):
            raise ExerciseFailed("posterior: return a pair (mean, variance).")
        _compare(
            "posterior",
            got[0],
            want_mean,
            f"the mean at t={t}",
            "mean = sqrt(abar_{t-1}) beta_t/(1-abar_t) x0 + sqrt(alpha_t)(1-abar_{t-1})/(1-abar_t) x_t, alpha_t = 1-beta_t.",
        )
        _compare(
            "posterior",
            torch.as_tensor(got[1]).reshape(()),
            want_var.reshape(()),
            f"the variance at t={t}",
            "variance = beta_t (1 - abar_{t-1}) / (1 - abar_t): smaller than beta_t.",
        )
    print("posterior: correct.")
    return True


def check_x0_from_eps(fn) -> bool:
    """Exercise: ``fn(x_t, eps_hat, alpha_bar_t) -> x0_hat`` inverts the forward marginal."""
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(64, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 2, generator=g, dtype=torch.float64)
    for abar in (0.99, 0.5, 0.05):
        want = (x_t - (1 - abar) ** 0.5 * eps) / abar**0.5
        got = _call("x0_from_eps", fn, x_t, eps, torch.tensor(abar, dtype=torch.float64))
        _compare(
            "x0_from_eps",
            got,
            want,
            f"x0_hat at alpha_bar_t={abar}",
            "solve x_t = sqrt(abar) x0 + sqrt(1 - abar) eps for x0.",
        )
    print("x0_from_eps: correct.")
    return True


def check_sde_coefficients(fn) -> bool:
    """Exercise (Chapter 2): ``fn(alpha, dalpha_dt, sigma, dsigma_dt) -> (f, g2)`` of the forward SDE."""
    from .schedules import Schedule, get_schedule

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
