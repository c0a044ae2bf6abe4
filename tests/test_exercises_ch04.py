"""Chapter 4's exercise checks catch the typical mistakes, each with a message that points at the fix.

The solutions below are the chapter's own (tests/test_exercises.py also runs those from the
chapter); here each check must pass on them, report a stub as not implemented, and fail on the
typical mistakes."""

import math

import pytest
import torch

import dmlib
from dmlib.exercises import (
    ExerciseFailed,
    check_analytic_dpm_variances,
    check_discretized_log_likelihood,
    check_gaussian_kl,
    check_hutchinson_divergence,
    check_hutchinson_ode_likelihood,
    check_importance_sampled_bound,
)

# --- the warm-ups -------------------------------------------------------------------------------


def gaussian_kl(mean_q, var_q, mean_p, var_p, minus_one=True):
    var_q, var_p = torch.as_tensor(var_q), torch.as_tensor(var_p)
    kl = 0.5 * (torch.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - float(minus_one))
    return kl.expand_as(mean_q).flatten(1).sum(1)


def hutchinson_divergence(f, x, v, square=False):
    x = x.detach().requires_grad_(True)
    (vjp,) = torch.autograd.grad((f(x) * v).sum(), x)
    return (vjp * (vjp if square else v)).sum(1)


def discretized_log_likelihood(x, mean, std, bins, edges=True):
    half = 1 / (bins - 1)
    upper = torch.special.ndtr((x + half - mean) / std)
    lower = torch.special.ndtr((x - half - mean) / std)
    if edges:
        upper = torch.where(x > 1 - half, torch.ones_like(upper), upper)
        lower = torch.where(x < -1 + half, torch.zeros_like(lower), lower)
    return torch.log(upper - lower).flatten(1).sum(1)


# --- Analytic-DPM's variances -------------------------------------------------------------------


def analytic_dpm_variances(den, data, T, generator, mistake=None):
    sched = den.schedule
    grid = torch.arange(T + 1, dtype=torch.float64) / T
    data_var = data.var(0).mean()
    out = torch.zeros(T + 1, dtype=torch.float64)
    for i in range(1, T + 1):
        t, s = grid[i], grid[i - 1]
        a_t, sig_t = sched.alpha(t), sched.sigma(t)
        eps = torch.randn(data.shape, generator=generator, dtype=data.dtype)
        eps_hat = den.eps(a_t * data + sig_t * eps, t)
        if mistake == "sigma not squared":
            cov = (sig_t / a_t) * (1 - eps_hat.pow(2).mean())
        elif mistake == "sigma times Gamma":  # 1 - sigma Gamma instead of 1 - sigma^2 Gamma
            cov = (sig_t / a_t) ** 2 * (1 - sig_t * (eps_hat / sig_t).pow(2).mean())
        else:
            cov = (sig_t / a_t) ** 2 * (1 - eps_hat.pow(2).mean())
        beta = sched.transition(t, s)[1]
        c = sched.alpha(s) * beta / sig_t**2
        betatilde = beta * sched.sigma(s) ** 2 / sig_t**2
        if mistake == "no c^2":
            c = torch.ones_like(c)
        elif mistake == "c not squared":
            c = c.sqrt()
        if mistake != "no clipping":
            cov = cov.clamp(0, data_var)
        out[i] = betatilde + c**2 * cov
    return out


# --- the importance-sampled bound ---------------------------------------------------------------


def importance_sampled_bound(den, x0, generator, t_eps, mistake=None):
    sched = den.schedule
    lam_1 = sched.log_snr(torch.tensor(1.0, dtype=torch.float64))
    lam_eps = sched.log_snr(torch.tensor(t_eps, dtype=torch.float64))
    u = torch.rand(x0.shape[0], generator=generator, dtype=torch.float64)
    t = sched.t_from_log_snr(lam_1 + (lam_eps - lam_1) * u)  # log-SNR uniform
    weight = lam_eps - lam_1
    if mistake == "uniform t":  # right weight for uniform times: unbiased but heavy-tailed
        t = t_eps + (1 - t_eps) * u
        weight = (1 - t_eps) * sched.drift_diffusion(t)[1] / sched.sigma(t) ** 2
    elif mistake == "uniform t, constant weight":
        t = t_eps + (1 - t_eps) * u
    elif mistake == "no weight":
        weight = 1.0
    elif mistake == "density instead of weight":  # multiplies by p(t) = 1 / (integral of w)
        weight = 1 / weight
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    a, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    err = ((eps - den.eps(a * x0 + s * eps, t)) ** 2).sum(1)
    half = 1.0 if mistake == "no 1/2" else 0.5
    recon = 0.5 * x0.shape[1] * (math.log(2 * math.pi) + 1 - lam_eps)
    return recon + half * weight * err + dmlib.likelihood.prior_kl(sched, x0)


# --- the PF-ODE likelihood with Hutchinson's estimator ------------------------------------------


def ode_log_likelihood(den, x, n_steps, generator, t_eps, mistake=None):
    v = torch.randint(0, 2, x.shape, generator=generator).to(x.dtype) * 2 - 1

    def drift_div(z, t):
        z = z.detach().requires_grad_(True)
        drift = dmlib.sde.pf_ode_drift(den, z, t)
        if mistake == "exact trace":
            div = sum(
                torch.autograd.grad(drift[:, j].sum(), z, retain_graph=True)[0][:, j]
                for j in range(z.shape[1])
            )
            return drift.detach(), div
        (vjp,) = torch.autograd.grad((drift * v).sum(), z)
        return drift.detach(), (vjp * v).sum(1)

    ts = torch.linspace(t_eps, 1, n_steps + 1, dtype=torch.float64)
    if mistake == "from 1 to 0":
        ts = ts.flip(0)
    z, integral = x, torch.zeros(x.shape[0], dtype=torch.float64)
    for t, s in zip(ts[:-1], ts[1:]):  # Heun
        h = s - t
        d1, div1 = drift_div(z, t)
        d2, div2 = drift_div(z + h * d1, s)
        z = z + h * (d1 + d2) / 2
        integral = integral + h * (div1 + div2) / 2
    log_prior = -0.5 * (z**2).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi)
    return log_prior - integral if mistake == "sign" else log_prior + integral


CHECKS = [
    (check_gaussian_kl, gaussian_kl),
    (check_hutchinson_divergence, hutchinson_divergence),
    (check_discretized_log_likelihood, discretized_log_likelihood),
    (check_analytic_dpm_variances, analytic_dpm_variances),
    (check_importance_sampled_bound, importance_sampled_bound),
    (check_hutchinson_ode_likelihood, ode_log_likelihood),
]


@pytest.mark.parametrize("check,solution", CHECKS, ids=[c.__name__ for c, _ in CHECKS])
def test_solutions_pass(check, solution):
    assert check(solution)


def _stub(*args):
    raise NotImplementedError


@pytest.mark.parametrize("check", [c for c, _ in CHECKS], ids=[c.__name__ for c, _ in CHECKS])
def test_stub_is_reported_as_not_implemented(check):
    with pytest.raises(ExerciseFailed, match="not implemented yet"):
        check(_stub)


def _with(fn, mistake):
    return lambda *args: fn(*args, mistake=mistake)


MISTAKES = [
    (check_gaussian_kl, lambda *a: gaussian_kl(*a, minus_one=False), "off by"),
    (check_hutchinson_divergence, lambda *a: hutchinson_divergence(*a, square=True), "off by"),
    (check_discretized_log_likelihood, lambda *a: discretized_log_likelihood(*a, edges=False), "off by"),
    (check_analytic_dpm_variances, _with(analytic_dpm_variances, "no c^2"), "off the exact optimum"),
    (check_analytic_dpm_variances, _with(analytic_dpm_variances, "c not squared"), "off the exact optimum"),
    (check_analytic_dpm_variances, _with(analytic_dpm_variances, "no clipping"), "below betatilde"),
    (check_analytic_dpm_variances, _with(analytic_dpm_variances, "sigma not squared"), "off the exact"),
    (check_analytic_dpm_variances, _with(analytic_dpm_variances, "sigma times Gamma"), "off the exact"),
    (check_analytic_dpm_variances, lambda *a: analytic_dpm_variances(*a)[1:], r"shape \(21,\)"),
    (check_importance_sampled_bound, _with(importance_sampled_bound, "no weight"), "mean bound is off"),
    (
        check_importance_sampled_bound,
        _with(importance_sampled_bound, "density instead of weight"),
        "mean bound is off",
    ),
    (check_importance_sampled_bound, _with(importance_sampled_bound, "no 1/2"), "mean bound is off"),
    (check_importance_sampled_bound, _with(importance_sampled_bound, "uniform t"), "variance is only"),
    (
        check_importance_sampled_bound,
        _with(importance_sampled_bound, "uniform t, constant weight"),
        "mean bound is off",
    ),
    (check_hutchinson_ode_likelihood, _with(ode_log_likelihood, "sign"), "mean log-density is off"),
    (check_hutchinson_ode_likelihood, _with(ode_log_likelihood, "exact trace"), "same log-densities"),
    (check_hutchinson_ode_likelihood, _with(ode_log_likelihood, "from 1 to 0"), "mean log-density is off"),
    (check_hutchinson_ode_likelihood, lambda *a: ode_log_likelihood(*a).mean(), "one log-density per point"),
]


@pytest.mark.parametrize(
    "check,wrong,message", MISTAKES, ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(MISTAKES)]
)
def test_checks_catch_typical_mistakes(check, wrong, message):
    with pytest.raises(ExerciseFailed, match=message):
        check(wrong)
