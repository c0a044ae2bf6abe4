"""Exercises of Chapter 4 (likelihood)."""

from __future__ import annotations

import torch

from .. import ddpm
from .. import likelihood as _likelihood
from ._common import ExerciseFailed, _call, _compare, _expect_tensor


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


# ---------------------------------------------------------------------------------------------
# Algorithms: Analytic-DPM's variances, an importance-sampled bound, a Hutchinson ODE likelihood
# ---------------------------------------------------------------------------------------------


def _gaussian_oracle():
    """A 2D Gaussian data distribution N(m, diag(s^2)) and its exact denoiser on the linear
    schedule: E tr Cov(x_0 | x_t) / d is known in closed form, so the optimal variances are too."""
    from ..oracle import GaussianMixture, MixtureOracle
    from ..schedules import get_schedule

    stds = torch.tensor([0.3, 1.2], dtype=torch.float64)
    mix = GaussianMixture([[0.5, -0.3]], covs=torch.diag(stds**2)[None])
    return mix, MixtureOracle(mix, get_schedule("linear")).denoiser(), stds


def _exact_analytic_variances(schedule, stds, T):
    """Sigma*_i = betatilde_i + c_i^2 E tr Cov(x_0 | x_i) / d for Gaussian data, in closed form."""
    grid = torch.arange(T + 1, dtype=torch.float64) / T
    out = torch.zeros(T + 1, dtype=torch.float64)
    for i in range(1, T + 1):
        t, s = grid[i], grid[i - 1]
        a, sig = schedule.alpha(t), schedule.sigma(t)
        cov = (stds**2 * sig**2 / (a**2 * stds**2 + sig**2)).mean()
        c, _, betatilde = ddpm._posterior_coefficients(schedule, t, s)
        out[i] = betatilde + c**2 * cov
    return out


def check_analytic_dpm_variances(fn) -> bool:
    """Exercise (Chapter 4): ``fn(denoiser, data, T, generator) -> Sigma`` of shape ``(T + 1,)``,
    Analytic-DPM's optimal reverse variances estimated by Monte Carlo over ``data`` (entry 0 unused).

    Graded on Gaussian data, where ``E tr Cov(x_0 | x_i) / d`` is known exactly: every entry within
    10% of the exact optimum (the Monte Carlo error of 4000 points is about 5%), never below
    ``betatilde_i``, and a discrete bound below the one of both fixed variances.
    """
    mix, den, stds = _gaussian_oracle()
    sched, T = den.schedule, 20
    g = torch.Generator().manual_seed(43)
    data_ = mix.sample(4000, g, dtype=torch.float64)
    got = _call("analytic_dpm_variances", fn, den, data_, T, torch.Generator().manual_seed(44))
    what = "one variance per step i = 0..T (entry 0 unused)"
    got = _expect_tensor("analytic_dpm_variances", got, (T + 1,), what)
    if not torch.isfinite(got[1:]).all():
        raise ExerciseFailed("analytic_dpm_variances: some variances are NaN or infinite.")
    want = _exact_analytic_variances(sched, stds, T)
    betatilde = ddpm.variance_table(sched, T, "betatilde")
    betatilde[1] = 0.0  # the decoder step: betatilde_1 = 0, c_1 = 1
    below = (got[1:] < betatilde[1:] * (1 - 1e-9)).nonzero()
    if len(below):
        i = int(below[0]) + 1
        raise ExerciseFailed(
            f"analytic_dpm_variances: Sigma_{i} is below betatilde_{i}. Hint: the term added to "
            "betatilde is c^2 times a variance of x_0, which cannot be negative; Monte Carlo noise "
            "can make its estimate negative where the signal is faint, so clip it (this book clips "
            "to [0, Var(x_0)])."
        )
    rel = ((got[1:] - want[1:]).abs() / want[1:]).max().item()
    if not rel <= 0.1:
        i = int(((got[1:] - want[1:]).abs() / want[1:]).argmax()) + 1
        raise ExerciseFailed(
            f"analytic_dpm_variances: Sigma_{i} is off the exact optimum by {100 * rel:.0f}% "
            "(tolerance 10%). Hint: E tr Cov(x_0 | x_i) / d = (sigma^2 / alpha^2)(1 - sigma^2 "
            "Gamma_i) with alpha, sigma at t = i/T and Gamma_i = E||score||^2 / d = "
            "E||eps_hat||^2 / (d sigma^2); add it to betatilde_i times the square of the x_0 "
            "coefficient c_i of the posterior mean."
        )
    x_eval = mix.sample(1000, g, dtype=torch.float64)
    bounds = {
        name: _likelihood.discrete_vlb(
            den, x_eval, T, variance=v, generator=torch.Generator().manual_seed(45)
        ).total.mean()
        for name, v in (("beta", "beta"), ("betatilde", "betatilde"), ("yours", got))
    }
    for name in ("beta", "betatilde"):
        if not bounds["yours"] < bounds[name]:
            raise ExerciseFailed(
                f"analytic_dpm_variances: the bound with your variances ({bounds['yours']:.3f} "
                f"nats) is not below the one with {name} ({bounds[name]:.3f})."
            )
    print(
        f"analytic_dpm_variances: correct (within {100 * rel:.1f}% of the exact optimum). "
        f"Bound at T = {T}: {bounds['yours']:.3f} nats, against {bounds['beta']:.3f} (beta) "
        f"and {bounds['betatilde']:.3f} (betatilde)."
    )
    return True


def _uniform_time_bound(denoiser, x0, generator, t_eps):
    """The same bound with t ~ U(t_eps, 1) and weight (1 - t_eps) (-lambda'(t)), no control variate."""
    import math

    sched = denoiser.schedule
    t = t_eps + (1 - t_eps) * torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype)
    f, g2 = sched.drift_diffusion(t)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    a, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    err = ((eps - denoiser.eps(a * x0 + s * eps, t)) ** 2).sum(1)
    lam_eps = sched.log_snr(torch.tensor(t_eps, dtype=torch.float64))
    recon = 0.5 * x0.shape[1] * (math.log(2 * math.pi) + 1 - lam_eps)
    return recon + 0.5 * (1 - t_eps) * g2 / s[:, 0] ** 2 * err + _likelihood.prior_kl(sched, x0)


def check_importance_sampled_bound(fn) -> bool:
    """Exercise (Chapter 4): ``fn(denoiser, x0, generator, t_eps) -> bound`` per sample, one time
    per sample drawn with density proportional to the likelihood weight, no control variate.

    Graded with the exact denoiser of eight_gaussians (linear schedule): the mean over 20000 points
    must match :func:`dmlib.likelihood.continuous_vlb` on the same points within 4 standard errors,
    and the spread must be far below that of uniform time sampling.
    """
    from .. import data
    from ..oracle import MixtureOracle
    from ..schedules import get_schedule

    mix = data.eight_gaussians()
    den = MixtureOracle(mix, get_schedule("linear")).denoiser()
    g = torch.Generator().manual_seed(46)
    x0 = mix.sample(20_000, g, dtype=torch.float64)
    t_eps = 1e-5
    got = _call("importance_sampled_bound", fn, den, x0, torch.Generator().manual_seed(47), t_eps)
    got = _expect_tensor("importance_sampled_bound", got, (x0.shape[0],), "one bound per sample")
    if not torch.isfinite(got).all():
        raise ExerciseFailed(
            "importance_sampled_bound: some values are NaN or infinite. Hint: draw the log-SNR in "
            "[lambda(1), lambda(t_eps)], never at t = 0 where it is infinite."
        )
    want = _likelihood.continuous_vlb(den, x0, t_eps=t_eps, n_t=4, generator=g).total
    diff = got - want
    se = diff.std().item() / len(diff) ** 0.5
    off = diff.mean().item()
    if not abs(off) < 4 * se:
        raise ExerciseFailed(
            f"importance_sampled_bound: the mean bound is off by {off:.2f} nats (4 standard errors: "
            f"{4 * se:.2f}). Hint: a time drawn with density p(t) must carry the weight "
            "w(t) / p(t), w(t) = -lambda'(t), for the estimate to be unbiased: check that p is "
            "normalized on [t_eps, 1] and that your weight is that ratio; the diffusion term "
            "carries a 1/2, and the reconstruction and prior terms are added once."
        )
    uniform = _uniform_time_bound(den, x0, torch.Generator().manual_seed(48), t_eps)
    ratio = (uniform.var() / got.var()).item()
    if not ratio > 10:
        raise ExerciseFailed(
            f"importance_sampled_bound: the mean is right but the variance is only {ratio:.1f}x "
            "below that of uniform times. Hint: the spread over t vanishes when the weight "
            "w(t) / p(t) is the same for every t; which density p does that, and how do you "
            "draw t from it with the schedule's methods?"
        )
    print(
        f"importance_sampled_bound: correct. Mean {got.mean().item():.3f} nats, standard error "
        f"{got.std().item() / len(got) ** 0.5:.3f}; uniform times: variance {ratio:.0f}x larger."
    )
    return True


def check_hutchinson_ode_likelihood(fn) -> bool:
    """Exercise (Chapter 4): ``fn(denoiser, x, n_steps, generator, t_eps) -> log p(x)`` per sample,
    the PF-ODE log-likelihood by a fixed-step solver from ``t_eps`` to 1 with one Rademacher probe
    per sample for the divergence.

    Graded with the exact denoiser of eight_gaussians, whose log-density is known: the mean error
    over 300 points must be within 4 standard errors plus 0.05 nats of zero, and the result must
    change with the generator (one random probe per sample, not the exact trace).
    """
    from .. import data
    from ..oracle import MixtureOracle
    from ..schedules import get_schedule

    mix = data.eight_gaussians()
    den = MixtureOracle(mix, get_schedule("linear")).denoiser()
    x = mix.sample(300, torch.Generator().manual_seed(49), dtype=torch.float64)
    got = _call("ode_log_likelihood", fn, den, x, 40, torch.Generator().manual_seed(50), 1e-5)
    got = _expect_tensor("ode_log_likelihood", got, (x.shape[0],), "one log-density per point")
    err = got - mix.log_prob(x)
    if not torch.isfinite(err).all():
        raise ExerciseFailed("ode_log_likelihood: some values are NaN or infinite.")
    se = err.std().item() / len(err) ** 0.5
    off = err.mean().item()
    if not abs(off) < 4 * se + 0.05:
        raise ExerciseFailed(
            f"ode_log_likelihood: the mean log-density is off by {off:.2f} nats (tolerance "
            f"{4 * se + 0.05:.2f}). Hint: the solve starts at the data (t = t_eps) and ends at "
            "the prior (t = 1), where log N(x_1; 0, I) is evaluated; then check the sign with which "
            "the divergence integral enters: where the flow spreads points apart, the density "
            "at the start must be higher than at the end."
        )
    # a probe drawn from the generator makes the answer depend on it; an exact trace does not
    again = _call("ode_log_likelihood", fn, den, x, 40, torch.Generator().manual_seed(51), 1e-5)
    if torch.is_tensor(again) and (again.detach().double() - got.detach().double()).abs().max() < 1e-9:
        raise ExerciseFailed(
            "ode_log_likelihood: two different generators give the same log-densities, so no random "
            "probe is used; estimate the divergence with one Rademacher probe per sample drawn "
            "from `generator` (Hutchinson's estimator), not with the exact trace."
        )
    print(
        f"ode_log_likelihood: correct. Mean error {off:.3f} +- {se:.3f} nats over {len(err)} "
        f"points; one probe per point leaves {err.std().item():.2f} nats of noise per point."
    )
    return True
