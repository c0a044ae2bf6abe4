"""The misprints listed in the book's errata appendix (book/errata.md), each confirmed numerically.

Every test computes the formula as the survey prints it and the corrected formula, checks that the
corrected one agrees with dmlib (and, where cheap, with an independent derivation such as Bayes'
rule for Gaussians), and checks that the printed one does NOT. So each test documents one misprint,
and fails if dmlib ever adopted the printed form.

Surveys: 000 = Yang et al., "Diffusion Models: A Comprehensive Survey of Methods and Applications";
002 = Chang et al., "On the Design Fundamentals of Diffusion Models: A Survey" (arXiv 2306.04542,
2023 numbering). In the discrete formulas ``abar_t`` is the cumulative product of ``alpha_t = 1 - beta_t``.
"""

import pytest
import torch

from dmlib import ddpm
from dmlib.oracle import GaussianMixture, MixtureOracle
from dmlib.parameterization import from_x0_eps, to_x0_eps
from dmlib.schedules import ddpm_tables, get_schedule

F64 = torch.float64


def _far(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-3) -> bool:
    """True when ``||a - b|| > rel ||b||``: a misprint, far above float64 rounding (~1e-15)."""
    return torch.linalg.vector_norm(a - b).item() > rel * torch.linalg.vector_norm(b).item()


# --------------------------------------------------------------------------------------------------
# 002, eq. 13 and eq. 14: the x_t coefficient of the posterior mean
# --------------------------------------------------------------------------------------------------


def _posterior_mean_correct(abar, t, x_t, x0):
    """Ho et al. (2020) eq. 7: [sqrt(abar_{t-1}) beta_t x0 + sqrt(alpha_t) (1 - abar_{t-1}) x_t] / (1 - abar_t)."""
    a_prev, a_t = abar[t - 1], abar[t]
    alpha_t = a_t / a_prev
    beta_t = 1 - alpha_t
    return (a_prev.sqrt() * beta_t * x0 + alpha_t.sqrt() * (1 - a_prev) * x_t) / (1 - a_t)


def _posterior_mean_002(abar, t, x_t, x0, reading):
    """002 eq. 13 as printed: [sqrt(abar_{t-1})(1 - abar_{t-1}) x_t + sqrt(abar_{t-1})(1 - alpha_t) x0] / (1 - abar_t).

    The text copy does not show how far the first root reaches, so both readings are checked:
    ``sqrt(abar_{t-1}) * (1 - abar_{t-1})`` and ``sqrt(abar_{t-1} * (1 - abar_{t-1}))``.
    """
    a_prev, a_t = abar[t - 1], abar[t]
    alpha_t = a_t / a_prev
    coef_xt = a_prev.sqrt() * (1 - a_prev) if reading == "root of abar" else (a_prev * (1 - a_prev)).sqrt()
    return (coef_xt * x_t + a_prev.sqrt() * (1 - alpha_t) * x0) / (1 - a_t)


def _gaussian_bayes_mean(abar, t, x_t, x0):
    """Mean of q(x_{t-1} | x_t, x0) by Bayes' rule: prior N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}),
    likelihood x_t | x_{t-1} ~ N(sqrt(alpha_t) x_{t-1}, beta_t); precisions add, means are precision-weighted."""
    a_prev, a_t = abar[t - 1], abar[t]
    alpha_t = a_t / a_prev
    beta_t = 1 - alpha_t
    precision = 1 / (1 - a_prev) + alpha_t / beta_t
    return (a_prev.sqrt() * x0 / (1 - a_prev) + alpha_t.sqrt() * x_t / beta_t) / precision


@pytest.mark.parametrize("reading", ["root of abar", "root of product"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_002_eq13_posterior_mean_xt_coefficient(schedule, reading, gen):
    """002 (Chang et al.), sec. 4.2, eq. 13: the true reverse mean is printed with x_t coefficient
    sqrt(abar_{t-1})(1 - abar_{t-1}) / (1 - abar_t); it must be sqrt(alpha_t)(1 - abar_{t-1}) / (1 - abar_t).
    (The x0 coefficient, with 1 - alpha_t = beta_t, is right.)"""
    T = 1000
    sched = get_schedule(schedule)
    abar = ddpm_tables(sched, T).alphas_cumprod
    x0 = torch.randn(64, 2, generator=gen, dtype=F64)
    x_t = torch.randn(64, 2, generator=gen, dtype=F64)
    for t in (100, 300, 700, 950):
        correct = _posterior_mean_correct(abar, t, x_t, x0)
        printed = _posterior_mean_002(abar, t, x_t, x0, reading)
        dmlib_mean, _ = ddpm.posterior(sched, x_t, x0, t / T, (t - 1) / T)
        torch.testing.assert_close(correct, dmlib_mean, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(correct, _gaussian_bayes_mean(abar, t, x_t, x0), rtol=1e-9, atol=1e-9)
        assert _far(printed, dmlib_mean), f"printed eq. 13 unexpectedly matches the posterior mean at t={t}"


def test_002_eq14_reverse_mean_from_x0_hat(mixture, gen):
    """002 (Chang et al.), sec. 4.2.1, eq. 14 (and Table 5, "Data" row): the x0-parameterized reverse mean
    repeats eq. 13's wrong x_t coefficient sqrt(abar_{t-1})(1 - abar_{t-1}). With the exact denoiser of a
    Gaussian mixture, the corrected formula (coefficient sqrt(alpha_t)(1 - abar_{t-1})) gives the mean that
    dmlib's ancestral sampler uses, the noise form of eq. 20; the printed one does not."""
    T = 1000
    sched = get_schedule("cosine")
    abar = ddpm_tables(sched, T).alphas_cumprod
    denoiser = MixtureOracle(mixture, sched).denoiser()
    for t in (100, 500, 900):
        x_t = ddpm.q_sample(
            sched, mixture.sample(256, gen, F64), t / T, torch.randn(256, 2, generator=gen, dtype=F64)
        )
        x0_hat, eps_hat = denoiser.x0_eps(x_t, torch.tensor(t / T, dtype=F64))
        sampler_mean = ddpm.posterior_mean_from_eps(sched, x_t, eps_hat, t / T, (t - 1) / T)
        correct = _posterior_mean_correct(abar, t, x_t, x0_hat)
        printed = _posterior_mean_002(abar, t, x_t, x0_hat, "root of abar")
        torch.testing.assert_close(correct, sampler_mean, rtol=1e-8, atol=1e-8)
        assert _far(printed, sampler_mean)


# --------------------------------------------------------------------------------------------------
# 002, eq. 22: alpha_t eps_hat - sigma_t x0_hat is the v target, not the reverse mean
# --------------------------------------------------------------------------------------------------


def test_002_eq22_expression_is_v_target_not_reverse_mean(mixture, gen):
    """002 (Chang et al.), sec. 4.2.4, eq. 22: "mu_theta(x_t, t) := alpha_t eps_hat - sigma_t x0_hat" labels
    the velocity v = alpha eps - sigma x0 of Salimans & Ho (2022) as the reverse mean. The expression equals
    dmlib's v prediction; the reverse mean is a different vector, obtained from v through
    x0_hat = alpha x_t - sigma v (VP) and then the posterior mean."""
    T = 1000
    sched = get_schedule("cosine")
    denoiser = MixtureOracle(mixture, sched).denoiser()
    for t in (100, 500, 900):
        tt = torch.tensor(t / T, dtype=F64)
        alpha, sigma = sched.alpha(tt), sched.sigma(tt)
        x_t = ddpm.q_sample(
            sched, mixture.sample(256, gen, F64), tt, torch.randn(256, 2, generator=gen, dtype=F64)
        )
        x0_hat, eps_hat = denoiser.x0_eps(x_t, tt)
        printed = alpha * eps_hat - sigma * x0_hat  # eq. 22's right-hand side
        torch.testing.assert_close(printed, denoiser.v(x_t, tt), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(printed, from_x0_eps(x0_hat, eps_hat, "v", alpha, sigma))
        reverse_mean = ddpm.posterior_mean_from_eps(sched, x_t, eps_hat, t / T, (t - 1) / T)
        assert _far(printed, reverse_mean, rel=0.1), (
            f"eq. 22's expression is close to the reverse mean at t={t}"
        )
        # the right use of a v prediction: convert to x0_hat, then take the posterior mean
        x0_from_v, _ = to_x0_eps(printed, "v", x_t, alpha, sigma)
        mean_from_v, _ = ddpm.posterior(sched, x_t, x0_from_v, t / T, (t - 1) / T)
        torch.testing.assert_close(mean_from_v, reverse_mean, rtol=1e-7, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# 002, eq. 24: classifier-free guidance
# --------------------------------------------------------------------------------------------------


def _cfg_002(w, s_cond, s_uncond):
    """002 eq. 24, right-hand side: w s_c + (1 - w) s_u."""
    return w * s_cond + (1 - w) * s_uncond


def _cfg_ho_salimans(w, s_cond, s_uncond):
    """Ho & Salimans (2022), eq. 6, written for scores (eps = -sigma * score is linear): (1 + w) s_c - w s_u."""
    return (1 + w) * s_cond - w * s_uncond


def test_002_eq24_guidance_weight_is_one_plus_ho_salimans(gen):
    """002 (Chang et al.), sec. 5.1.3, eq. 24: the guidance weight w of 002 is 1 + w of Ho & Salimans (2022):
    w_002 = 0 is the unconditional model (Ho & Salimans: w = -1), w_002 = 1 the conditional one (Ho & Salimans:
    w = 0). At the same numerical w the two formulas differ by s_u - s_c, whatever w is."""
    s_cond = torch.randn(128, 5, generator=gen, dtype=F64)
    s_uncond = torch.randn(128, 5, generator=gen, dtype=F64)
    for w_hs in (0.0, 0.3, 1.0, 3.0, 7.5):
        torch.testing.assert_close(
            _cfg_002(1 + w_hs, s_cond, s_uncond),
            _cfg_ho_salimans(w_hs, s_cond, s_uncond),
            rtol=1e-12,
            atol=1e-12,
        )
        gap = _cfg_002(w_hs, s_cond, s_uncond) - _cfg_ho_salimans(w_hs, s_cond, s_uncond)
        torch.testing.assert_close(gap, s_uncond - s_cond, rtol=1e-12, atol=1e-12)
        assert _far(_cfg_002(w_hs, s_cond, s_uncond), _cfg_ho_salimans(w_hs, s_cond, s_uncond))
    torch.testing.assert_close(_cfg_002(0.0, s_cond, s_uncond), s_uncond)
    torch.testing.assert_close(_cfg_ho_salimans(0.0, s_cond, s_uncond), s_cond)


def test_002_eq24_left_side_is_the_guided_score(mixture, gen):
    """002 (Chang et al.), sec. 5.1.3, eq. 24: the left side is printed as the conditional score
    grad log p(x|c), which the right side w s_c + (1 - w) s_u equals only at w = 1. It is the guided score
    grad log [p(x) p(c|x)^w], the same as 002's own classifier guidance, eq. 23, with the same w.

    Checked on a Gaussian mixture whose class c is one component: s_c, s_u are the exact scores and
    grad log p(c|x) is computed separately, by autograd of log p(c|x) = log w_c + log p_c(x) - log p(x)."""
    sched = get_schedule("cosine")
    c = 1
    comp = GaussianMixture(mixture.means[c : c + 1], mixture.covs[c : c + 1])
    oracle_u, oracle_c = MixtureOracle(mixture, sched), MixtureOracle(comp, sched)
    t = torch.tensor(0.4, dtype=F64)
    x = ddpm.q_sample(sched, mixture.sample(256, gen, F64), t, torch.randn(256, 2, generator=gen, dtype=F64))
    x = x.requires_grad_(True)
    log_p_c_given_x = torch.log(mixture.weights[c]) + oracle_c.log_prob(x, t) - oracle_u.log_prob(x, t)
    (grad_classifier,) = torch.autograd.grad(log_p_c_given_x.sum(), x)
    x = x.detach()
    s_cond, s_uncond = oracle_c.score(x, t), oracle_u.score(x, t)
    torch.testing.assert_close(s_cond - s_uncond, grad_classifier, rtol=1e-8, atol=1e-8)  # Bayes' rule
    for w in (0.0, 0.5, 3.0):
        guided = s_uncond + w * grad_classifier  # eq. 23 with the same w
        torch.testing.assert_close(_cfg_002(w, s_cond, s_uncond), guided, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(_cfg_ho_salimans(w, s_cond, s_uncond), s_cond + w * grad_classifier)
        assert _far(_cfg_002(w, s_cond, s_uncond), s_cond), f"eq. 24 read literally holds at w={w}"
    torch.testing.assert_close(_cfg_002(1.0, s_cond, s_uncond), s_cond)  # the one w where it does hold


# --------------------------------------------------------------------------------------------------
# 002, eq. 4: the KL sum of the variational bound runs over t > 1
# --------------------------------------------------------------------------------------------------


def test_002_eq4_kl_sum_must_start_at_t2(mixture, gen):
    """002 (Chang et al.), sec. 2.1, eq. 4: the bound sums D_KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) over t >= 1
    and also has the decoder term -log p(x0|x1). The t = 1 term compares q(x0|x1,x0), a point mass
    (posterior variance betatilde_1 = 0), with a Gaussian: its KL is infinite and the printed bound is vacuous.
    Ho et al. (2020), eq. 5, sum over t > 1, and step 1 is the decoder term; that bound (dmlib.ddpm.vlb_terms)
    is finite."""
    T = 20
    sched = get_schedule("linear")
    x0 = mixture.sample(128, gen, F64)
    x1 = ddpm.q_sample(sched, x0, 1 / T, torch.randn(128, 2, generator=gen, dtype=F64))
    mean_q, var_q = ddpm.posterior(sched, x1, x0, 1 / T, 0.0)
    assert var_q.item() == 0.0
    torch.testing.assert_close(mean_q, x0)  # q(x0 | x1, x0) is the point mass at x0
    denoiser = MixtureOracle(mixture, sched).denoiser()
    mean_p, _ = ddpm.posterior(sched, x1, denoiser.x0(x1, torch.tensor(1 / T, dtype=F64)), 1 / T, 0.0)
    var_p = ddpm.reverse_variance(sched, 1 / T, 0.0, "beta")
    kl_t1 = ddpm.gaussian_kl(mean_q, var_q, mean_p, var_p)  # the extra t = 1 term of the printed sum
    assert torch.isinf(kl_t1).all() and (kl_t1 > 0).all()
    terms = ddpm.vlb_terms(denoiser, x0, T, generator=gen)  # decoder + KL for t = 2..T + prior term
    assert torch.isfinite(terms).all()


# --------------------------------------------------------------------------------------------------
# 002, supplement S1, eq. (1): one forward step starts from x_{t-1}, not from x_0
# --------------------------------------------------------------------------------------------------


def test_002_s1_eq1_forward_step_from_x_t_minus_1():
    """002 (Chang et al.), supplement S1, eq. (1): one forward step is printed
    x_t = sqrt(alpha_t) x_0 + sqrt(beta_t) eps_t; it must start from x_{t-1} (as S1's own eq. (2) and
    002's eq. 6 assume). Run with the same noise draws, the corrected step reproduces dmlib's forward chain
    exactly; the printed step does not, and its marginal N(sqrt(alpha_t) x_0, beta_t I) is not eq. (4)'s
    N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
    T, steps, seed = 100, 60, 7
    sched = get_schedule("linear")
    tables = ddpm_tables(sched, T)
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    chain = ddpm.q_sample_chain(tables, x0, steps, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    x_correct, x_printed = x0, x0
    for t in range(1, steps + 1):
        beta = tables.betas[t]
        z = torch.randn(x0.shape, generator=g, dtype=F64)
        x_correct = torch.sqrt(1 - beta) * x_correct + torch.sqrt(beta) * z  # from x_{t-1}
        x_printed = torch.sqrt(1 - beta) * x0 + torch.sqrt(beta) * z  # eq. (1) as printed: from x_0
    torch.testing.assert_close(x_correct, chain[-1], rtol=1e-12, atol=1e-12)
    assert _far(x_printed, chain[-1])
    # the marginals: the printed recursion's mean and variance are those of a single step
    abar = tables.alphas_cumprod[steps]
    t_cont = torch.tensor(steps / T, dtype=F64)
    torch.testing.assert_close(abar.sqrt(), sched.alpha(t_cont), rtol=1e-12, atol=1e-12)
    printed_mean_scale, printed_var = tables.alphas[steps].sqrt(), tables.betas[steps]
    assert abs(printed_mean_scale - sched.alpha(t_cont)) > 0.1
    assert abs(printed_var - sched.sigma(t_cont) ** 2) > 0.1


# --------------------------------------------------------------------------------------------------
# 000, eq. 28: DDIM's posterior mean uses x_t, not x_n
# --------------------------------------------------------------------------------------------------


def _ddim_mean_coefs(abar, t, var):
    """000 eq. 28 with its bars restored (betabar_t = 1 - abar_t, Table 1 of 000):
    mu = sqrt(abar_{t-1}) x0 + sqrt(betabar_{t-1} - sigma_t^2) (x - sqrt(abar_t) x0) / sqrt(betabar_t).
    Returns (coefficient of x, coefficient of x0)."""
    a_prev, a_t = abar[t - 1], abar[t]
    c = (1 - a_prev - var).sqrt() / (1 - a_t).sqrt()
    return c, a_prev.sqrt() - c * a_t.sqrt()


@pytest.mark.parametrize("n_offset", [0, -1, 1, -50])
def test_000_eq28_ddim_mean_uses_x_t(n_offset, gen):
    """000 (Yang et al.), sec. 3.1.2, eq. 28 (DDIM, Song et al. 2021, eq. 7): the posterior mean
    mu_t(x_t, x0) is printed with x_n in the bracket; x_n is not defined there and must be x_t.
    With x_t (n_offset = 0) the step keeps every marginal: if x_t ~ q(x_t|x0), then
    x_{t-1} ~ N(mu, sigma_t^2 I) has q(x_{t-1}|x0) = N(sqrt(abar_{t-1}) x0, (1 - abar_{t-1}) I) for every
    sigma_t, and with sigma_t^2 = betatilde_t (the DDPM case 000 names) mu is dmlib's posterior mean.
    Read with the state of any other step n in place of x_t, the marginal is wrong."""
    T, t = 1000, 400
    sched = get_schedule("cosine")
    tables = ddpm_tables(sched, T)
    abar = tables.alphas_cumprod
    betatilde = tables.posterior_variance[t]
    n = t + n_offset
    x0 = torch.randn(64, 2, generator=gen, dtype=F64)
    t_prev = torch.tensor((t - 1) / T, dtype=F64)
    target_mean, target_var = sched.alpha(t_prev) * x0, sched.sigma(t_prev) ** 2  # q(x_{t-1} | x0), dmlib
    for var in (torch.zeros((), dtype=F64), 0.5 * betatilde, betatilde):
        c_x, c_x0 = _ddim_mean_coefs(abar, t, var)
        # x ~ q(x_n | x0) = N(sqrt(abar_n) x0, (1 - abar_n) I); propagate mean and variance exactly
        mean = c_x * abar[n].sqrt() * x0 + c_x0 * x0
        variance = c_x**2 * (1 - abar[n]) + var
        if n_offset == 0:
            torch.testing.assert_close(mean, target_mean, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(variance, target_var, rtol=1e-9, atol=1e-12)
        else:
            assert (mean - target_mean).abs().max() > 1e-4 or abs(variance - target_var) > 1e-4
    # the DDPM case: eq. 28 with x_t equals Bayes' posterior mean (Ho et al. 2020, eq. 7) in dmlib
    if n_offset == 0:
        x_t = torch.randn(64, 2, generator=gen, dtype=F64)
        c_x, c_x0 = _ddim_mean_coefs(abar, t, betatilde)
        dmlib_mean, _ = ddpm.posterior(sched, x_t, x0, t / T, (t - 1) / T)
        torch.testing.assert_close(c_x * x_t + c_x0 * x0, dmlib_mean, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------------
# 000, eq. 52: the score of LSGM's latent marginal is the gradient of the LOG of the integral
# --------------------------------------------------------------------------------------------------


def test_000_eq52_score_is_grad_log_of_the_integral(mixture, gen):
    """000 (Yang et al.), sec. 5.3.1, eq. 52 prints ``grad log p_t(x) = int p_0t(x_t|x0) p_theta(x0) dz``:
    the right side is the marginal density itself (a number per point, not a vector) and integrates
    over ``z``, which is not the variable. Correct (Vahdat et al. 2021, LSGM):
    ``grad_{x_t} log int p_0t(x_t|x0) p_theta(x0) dx0``. With a Gaussian-mixture prior as
    ``p_theta(x0)`` the correct form, computed independently by Monte Carlo over ``x0 ~ p_theta`` and
    autograd through a log-mean-exp, equals the oracle's exact score; the printed integral is the
    density, and even its gradient ``grad p_t = p_t * score`` is not the score."""
    sched = get_schedule("cosine")
    oracle = MixtureOracle(mixture, sched)
    t = torch.tensor(0.5, dtype=F64)
    alpha, sigma = sched.alpha(t), sched.sigma(t)
    x0 = mixture.sample(200_000, generator=gen, dtype=F64)
    x = oracle.mixture.sample(16, generator=gen, dtype=F64) * alpha  # points where q_t has mass
    x = x.clone().requires_grad_(True)
    log_kernel = -((x[:, None, :] - alpha * x0[None]) ** 2).sum(-1) / (2 * sigma**2)  # up to a constant
    log_marginal = torch.logsumexp(log_kernel, dim=1)  # log int p_0t(x_t | x0) p_theta(x0) dx0 + const
    (corrected,) = torch.autograd.grad(log_marginal.sum(), x)
    exact = oracle.score(x.detach(), t)
    torch.testing.assert_close(corrected, exact, rtol=0.05, atol=0.05)
    # as printed: the integral is the density p_t(x), shape (B,), not a score of shape (B, D) ...
    xg = x.detach().clone().requires_grad_(True)
    density = oracle.log_prob(xg, t).exp()
    assert density.shape != exact.shape
    # ... and the closest vector reading, grad of the integral, is p_t * score, far from the score
    (grad_density,) = torch.autograd.grad(density.sum(), xg)
    torch.testing.assert_close(grad_density, density[:, None] * exact, rtol=1e-9, atol=1e-12)
    assert _far(grad_density, exact)
