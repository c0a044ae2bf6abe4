"""Exercises of Chapter 1 (DDPM)."""

from __future__ import annotations

import torch

from .. import ddpm
from ..schedules import Cosine, ddpm_tables
from ._common import ExerciseFailed, _call, _compare, _expect_tensor


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
    """Exercise: ``fn(x_i, x0, beta_i, alpha_bar_i, alpha_bar_prev) -> (mean, variance)`` of
    q(x_{i-1} | x_i, x_0)."""
    g = torch.Generator().manual_seed(1)
    tables = ddpm_tables(Cosine(), 50)
    abar = tables.alphas_cumprod
    x0 = torch.randn(64, 2, generator=g, dtype=torch.float64)
    x_i = torch.randn(64, 2, generator=g, dtype=torch.float64)
    for i in (2, 25, 50):
        want_mean, want_var = ddpm.posterior(Cosine(), x_i, x0, i / 50, (i - 1) / 50)
        got = _call("posterior", fn, x_i, x0, tables.betas[i], abar[i], abar[i - 1])
        if not (isinstance(got, tuple) and len(got) == 2):
            raise ExerciseFailed("posterior: return a pair (mean, variance).")
        _compare(
            "posterior",
            got[0],
            want_mean,
            f"the mean at step i={i}",
            "mean = sqrt(abar_{i-1}) beta_i/(1-abar_i) x0 + sqrt(alpha_i)(1-abar_{i-1})/(1-abar_i) x_i, alpha_i = 1-beta_i.",
        )
        _compare(
            "posterior",
            torch.as_tensor(got[1]).reshape(()),
            want_var.reshape(()),
            f"the variance at step i={i}",
            "variance = beta_i (1 - abar_{i-1}) / (1 - abar_i): smaller than beta_i.",
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


# ---------------------------------------------------------------------------------------------
# Algorithms: an ancestral sampler, a Monte Carlo variational bound, a per-time noise error
# ---------------------------------------------------------------------------------------------


def _eight_gaussians_oracle(schedule):
    from ..data import eight_gaussians
    from ..oracle import MixtureOracle

    mixture = eight_gaussians()
    return mixture, MixtureOracle(mixture, schedule)


def _spread(x: torch.Tensor, mixture) -> float:
    """Root mean square distance of samples to their nearest mode (per coordinate)."""
    d = torch.cdist(x.double(), mixture.means.double()).min(dim=1).values
    return (d.pow(2).mean() / x.shape[1]).sqrt().item()


def check_ancestral_sampler(fn) -> bool:
    """Exercise: ``fn(eps_fn, x_T, tables, generator) -> x_0``, Algorithm 2 of Ho et al. with
    ``Sigma_i = betatilde_i``, run on the exact denoiser of eight Gaussians."""
    from ..metrics import mode_coverage
    from ..schedules import Linear

    name, T, n = "ancestral_sampler", 100, 2000
    sched = Linear()
    mixture, oracle = _eight_gaussians_oracle(sched)
    den = oracle.denoiser()
    tables = ddpm_tables(sched, T)
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    want = ddpm.sample_ancestral(
        den,
        x_T,
        torch.linspace(1, 0, T + 1, dtype=torch.float64),
        generator=torch.Generator().manual_seed(12),
    )
    got = _call(name, fn, den.eps, x_T.clone(), tables, torch.Generator().manual_seed(12))
    got = _expect_tensor(name, got, want.shape, "the samples x_0")
    if not torch.isfinite(got).all():
        raise ExerciseFailed(
            f"{name}: your samples contain NaN or inf. Which table entries does step i read, and "
            "is there a division by a quantity that can be 0?"
        )
    if (got.double() - want).abs().max().item() <= 1e-8 * (1 + want.abs().max().item()):
        cov = mode_coverage(got, mixture)
        print(
            f"{name}: correct (equal to dmlib.ddpm.sample_ancestral with the same noise).\n"
            f"With the exact denoiser and T = {T}: {cov['modes']}/8 modes, "
            f"{cov['near']:.3f} of the samples within 3 std of a mode."
        )
        return True
    # not the library's samples: say what the samples look like, measured against the mixture
    spread, target = _spread(got, mixture), _spread(want, mixture)
    where = (
        f"samples lie {spread:.3f} (rms per coordinate) from their nearest mode; expected about {target:.3f}"
    )
    if spread > 1.15 * target:
        raise ExerciseFailed(
            f"{name}: too much noise: your {where}. Check the variance of the noise you add at "
            "each step (the posterior's, which is smaller than beta_i) and what happens at i = 1."
        )
    if spread < 0.85 * target:
        raise ExerciseFailed(
            f"{name}: too little noise: your {where}. Every step i > 1 adds fresh noise "
            "sqrt(Sigma_i) z; only the last step adds none."
        )
    raise ExerciseFailed(
        f"{name}: your samples differ from dmlib's given the same generator ({where}). Check that "
        "step i reads the tables at index i and calls eps_fn at t = i / T, loops i = T, ..., 1, and "
        "draws z = torch.randn(x.shape, generator=generator, dtype=x.dtype) once per step i > 1."
    )


def check_vlb_terms(fn) -> bool:
    """Exercise: ``fn(x0_fn, x0, tables, generator) -> (B, T + 1)`` Monte Carlo terms of the
    variational bound: column 0 ``L_0``, column ``i - 1`` for ``2 <= i <= T`` the KL of step ``i``,
    column ``T`` the prior term ``L_T``; checked against dmlib's bound for the exact denoiser."""
    from ..schedules import Linear

    name, T, n = "vlb_terms", 20, 4000
    sched = Linear()
    mixture, oracle = _eight_gaussians_oracle(sched)
    den = oracle.denoiser()
    tables = ddpm_tables(sched, T)
    x0 = mixture.sample(n, torch.Generator().manual_seed(21), dtype=torch.float64)
    # the library's bound terms (B, T + 1): Sigma_i = betatilde_i, a Gaussian decoder with beta_1
    want = ddpm.vlb_terms(den, x0, T, generator=torch.Generator().manual_seed(22))
    got = _call(name, fn, den.x0, x0, tables, torch.Generator().manual_seed(23))
    what = f"one row per sample and one column per term (L_0, the {T - 1} KL terms, L_T)"
    got = _expect_tensor(name, got, want.shape, what)
    # L_T has a closed form: no Monte Carlo error, so it must agree to rounding
    _compare(
        name,
        got[:, T],
        want[:, T],
        f"column {T} (L_T)",
        "L_T = KL(q(x_T | x_0) || N(0, I)) per sample, with q(x_T | x_0) from abar_T; "
        "sum over the coordinates.",
        atol=1e-9,
    )
    labels = ["L_0 (column 0)"] + [f"the KL of step i = {i} (column {i - 1})" for i in range(2, T + 1)]
    for col, label in enumerate(labels):
        a, b = got[:, col], want[:, col]
        se = (a.var() / n + b.var() / n).sqrt().item()
        diff = (a.mean() - b.mean()).item()
        if not abs(diff) <= 5 * se + 1e-6:  # also catches NaN
            raise ExerciseFailed(
                f"{name}: the mean of {label} is {a.mean().item():.4f} nats; the bound gives "
                f"{b.mean().item():.4f} (standard error {se:.4f}). Hint: step i compares "
                "q(x_{i-1} | x_i, x_0) with N(mu_theta(x_i), Sigma_i) where mu_theta is the posterior mean "
                "at x0_hat = x0_fn(x_i, i / T) and Sigma_i = betatilde_i; L_0 is -log N(x_0; mu_theta(x_1), beta_1)."
            )
    total = got.sum(1).mean().item()
    print(
        f"{name}: correct.\nBound of the exact denoiser with T = {T}: {total:.3f} nats per point "
        f"(true NLL {-mixture.log_prob(x0).mean().item():.3f})."
    )
    return True


def check_eps_error_curve(fn) -> bool:
    """Exercise: ``fn(eps_fn, schedule, x0, ts, generator) -> (err, stderr)``: for each time in ``ts``
    the Monte Carlo mean of ``||eps - eps_fn(x_t, t)||^2 / D`` and its standard error."""
    from ..schedules import get_schedule

    name = "eps_error_curve"
    sched = get_schedule("cosine")
    mixture, oracle = _eight_gaussians_oracle(sched)
    den = oracle.denoiser()
    n = 4000
    x0 = mixture.sample(n, torch.Generator().manual_seed(31), dtype=torch.float64)
    ts = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.7, 0.95], dtype=torch.float64)
    g = torch.Generator().manual_seed(32)
    ref, ref_se = [], []  # the reference: SNR(t) * (squared error of the exact E[x0 | x_t]) per dim
    for t in ts:
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        a, s = sched.alpha(t), sched.sigma(t)
        per = (a / s) ** 2 * ((x0 - oracle.x0(a * x0 + s * eps, t)) ** 2).mean(1)
        ref.append(per.mean())
        ref_se.append(per.std() / n**0.5)
    ref, ref_se = torch.stack(ref), torch.stack(ref_se)

    def run(eps_fn, what):
        out = _call(name, fn, eps_fn, sched, x0, ts, torch.Generator().manual_seed(33))
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ExerciseFailed(f"{name}: return a pair (err, stderr), each with one entry per time.")
        err, se = (torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in out)
        if err.shape != ts.shape or se.shape != ts.shape:
            raise ExerciseFailed(f"{name}: err and stderr need one entry per time in ts ({len(ts)}).")
        if not (torch.isfinite(err).all() and torch.isfinite(se).all() and (se > 0).all()):
            raise ExerciseFailed(f"{name}: {what}: err and stderr must be finite, stderr positive.")
        return err, se

    # a network that always answers 0 makes an error of exactly 1 per coordinate in expectation
    err, se = run(lambda x, t: torch.zeros_like(x), "for eps_fn = 0")
    bad = (err - 1).abs() > 5 / n**0.5 * 2**0.5
    if bad.any():
        k = int(bad.nonzero()[0])
        raise ExerciseFailed(
            f"{name}: for eps_fn = 0 the error at t = {ts[k].item():g} is {err[k].item():.3f}; "
            "E||eps||^2 / D is 1 there. Hint: average the squared error over coordinates and samples."
        )
    # the exact denoiser: the irreducible error, SNR(t) mmse(t)
    err, se = run(den.eps, "for the exact denoiser")
    tol = 5 * (se**2 + ref_se**2).sqrt() + 1e-4
    bad = (err - ref).abs() > tol
    if bad.any():
        k = int(bad.nonzero()[0])
        raise ExerciseFailed(
            f"{name}: for the exact denoiser the error at t = {ts[k].item():g} is {err[k].item():.4f}; "
            f"expected {ref[k].item():.4f} +- {tol[k].item():.4f}. Hint: x_t = alpha(t) x0 + sigma(t) eps "
            "with fresh eps, and compare eps_fn(x_t, t) with that same eps."
        )
    ratio = se / ref_se
    if not ((ratio > 0.7) & (ratio < 1.4)).all():
        k = int(((ratio <= 0.7) | (ratio >= 1.4)).nonzero()[0])
        raise ExerciseFailed(
            f"{name}: the standard error at t = {ts[k].item():g} is {se[k].item():.2e}; expected about "
            f"{ref_se[k].item():.2e}. Hint: the standard error of a mean of n per-sample values is "
            "their standard deviation divided by sqrt(n), per sample, not per coordinate."
        )
    peak = int(err.argmax())
    print(
        f"{name}: correct.\nThe exact denoiser's noise error per coordinate is "
        f"{err[0].item():.3f} at t = {ts[0].item():g}, {err[-1].item():.4f} at t = {ts[-1].item():g};\n"
        f"of these times it is largest at t = {ts[peak].item():g}."
    )
    return True
