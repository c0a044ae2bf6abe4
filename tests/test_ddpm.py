import math

import pytest
import torch

from dmlib import ddpm, metrics
from dmlib.oracle import MixtureOracle
from dmlib.parameterization import Denoiser
from dmlib.schedules import ddpm_tables, get_schedule


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_closed_form_equals_iterated_chain_in_distribution(name, gen):
    """q(x_t|x_0) in closed form (eq. 4) vs running eq. 2 step by step: same mean and variance."""
    T, steps, n = 100, 60, 40_000
    sched = get_schedule(name)
    x0 = torch.tensor([[1.5, -0.5]], dtype=torch.float64).expand(n, 2)
    chain = ddpm.q_sample_chain(ddpm_tables(sched, T), x0, steps, gen)[-1]
    t = torch.tensor(steps / T, dtype=torch.float64)
    closed = ddpm.q_sample(sched, x0, t, torch.randn(x0.shape, generator=gen, dtype=torch.float64))
    sd = sched.sigma(t).item()
    se = sd / math.sqrt(n)
    assert (chain.mean(0) - sched.alpha(t) * x0[0]).abs().max() < 5 * se
    assert (closed.mean(0) - sched.alpha(t) * x0[0]).abs().max() < 5 * se
    assert (chain.var(0) - sd**2).abs().max() < 5 * sd**2 * math.sqrt(2 / n)


def _bayes_on_grid(prior_mean, prior_var, lik_scale, lik_var, x_t):
    """Posterior of z given x_t = lik_scale * z + N(0, lik_var), prior z ~ N(prior_mean, prior_var), on a grid."""
    z = torch.linspace(-10, 10, 4_000_001, dtype=torch.float64)  # covers prior and likelihood; spacing 5e-6
    logp = -((z - prior_mean) ** 2) / (2 * prior_var) - (x_t - lik_scale * z) ** 2 / (2 * lik_var)
    w = torch.softmax(logp, 0)
    mean = (w * z).sum()
    return mean, (w * (z - mean) ** 2).sum()


@pytest.mark.parametrize("t_step,s_step", [(2, 1), (40, 39), (100, 99), (70, 20)])
def test_posterior_matches_bayes_rule(t_step, s_step):
    """eq. 6-7 against a numerical Bayes rule: prior q(x_s|x_0), likelihood q(x_t|x_s)."""
    T = 100
    sched = get_schedule("cosine")
    abar = ddpm_tables(sched, T).alphas_cumprod
    x0, x_t = 0.7, -0.4
    a_s, a_t = abar[s_step].item(), abar[t_step].item()
    mean_num, var_num = _bayes_on_grid(a_s**0.5 * x0, 1 - a_s, (a_t / a_s) ** 0.5, 1 - a_t / a_s, x_t)
    mean, var = ddpm.posterior(
        sched,
        torch.tensor([[x_t]], dtype=torch.float64),
        torch.tensor([[x0]], dtype=torch.float64),
        t_step / T,
        s_step / T,
    )
    assert abs(mean.item() - mean_num.item()) < 1e-6
    assert abs(var.item() - var_num.item()) / var_num.item() < 1e-4


@pytest.mark.parametrize("t,s", [(0.5, 0.49), (1.0, 0.999), (0.3, 0.1), (0.01, 0.0)])
def test_posterior_mean_from_eps_equals_posterior_with_x0_hat(t, s, gen):
    sched = get_schedule("cosine")
    x_t = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    x0_hat = (x_t - sched.sigma(t) * eps) / sched.alpha(t)
    torch.testing.assert_close(
        ddpm.posterior_mean_from_eps(sched, x_t, eps, t, s), ddpm.posterior(sched, x_t, x0_hat, t, s)[0]
    )


def test_posterior_variance_is_betatilde():
    sched = get_schedule("linear")
    tables = ddpm_tables(sched, 50)
    for t in (1, 10, 50):
        _, var = ddpm.posterior(
            sched,
            torch.zeros(1, 1, dtype=torch.float64),
            torch.zeros(1, 1, dtype=torch.float64),
            t / 50,
            (t - 1) / 50,
        )
        torch.testing.assert_close(var, tables.posterior_variance[t])


def test_vlb_term_reduces_to_weighted_eps_error(gen):
    """L_{t-1} = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) ||eps - eps_theta||^2 (Ho et al. eq. 12)."""
    T, t = 100, 37
    sched = get_schedule("cosine")
    tables = ddpm_tables(sched, T)
    beta, alpha, abar = tables.betas[t], tables.alphas[t], tables.alphas_cumprod[t]
    x0 = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    eps_hat = eps + 0.3 * torch.randn(8, 2, generator=gen, dtype=torch.float64)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    x0_hat = (x_t - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
    mean_q, var_q = ddpm.posterior(sched, x_t, x0, t / T, (t - 1) / T)
    mean_p, _ = ddpm.posterior(sched, x_t, x0_hat, t / T, (t - 1) / T)
    kl = ddpm.gaussian_kl(mean_q, var_q, mean_p, var_q)
    weight = beta**2 / (2 * tables.posterior_variance[t] * alpha * (1 - abar))
    torch.testing.assert_close(kl, weight * ((eps - eps_hat) ** 2).sum(1))


def test_gaussian_kl_closed_form():
    m_q, m_p = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    # KL(N(0,1)||N(1,4)) + KL(N(1,1)||N(1,4)) = [log 2 + 1/8 + 1/8 - 1/2] + [log 2 + 1/8 - 1/2]
    want = 2 * math.log(2) + 0.375 - 1.0
    assert abs(ddpm.gaussian_kl(m_q, 1.0, m_p, 4.0).item() - want) < 1e-6


def test_gaussian_nll_is_the_normal_log_density(gen):
    x, mean = (
        torch.randn(5, 3, generator=gen, dtype=torch.float64),
        torch.randn(5, 3, generator=gen, dtype=torch.float64),
    )
    want = -torch.distributions.Normal(mean, 0.3).log_prob(x).sum(1)
    torch.testing.assert_close(ddpm.gaussian_nll(x, mean, torch.tensor(0.09, dtype=torch.float64)), want)


def test_vlb_of_the_oracle_bounds_the_true_nll(eight, gen):
    sched = get_schedule("cosine")
    x0 = eight.sample(2000, gen, dtype=torch.float64)
    terms = ddpm.vlb_terms(MixtureOracle(eight, sched).denoiser(), x0, 50, generator=gen)
    assert terms.shape == (2000, 51)
    vlb, nll = terms.sum(1), -eight.log_prob(x0)
    se = (vlb - nll).std().item() / math.sqrt(2000)
    assert vlb.mean() - nll.mean() > 3 * se, "the variational bound must lie above the true NLL"
    # the prior term is the closed-form KL(N(a x0, s^2) || N(0, 1))
    a, s = sched.alpha(1.0).double(), sched.sigma(1.0).double()
    want = 0.5 * ((a * x0) ** 2 + s**2 - 1 - torch.log(s**2)).sum(1)
    torch.testing.assert_close(terms[:, -1], want)


@pytest.mark.parametrize("variance", ["betatilde", "beta"])
def test_ancestral_sampling_with_the_oracle_reaches_the_data(variance, eight):
    """No training: with the exact denoiser the 200-step chain must land on the mixture."""
    g = torch.Generator().manual_seed(0)
    sched = get_schedule("cosine")
    n = 4000
    x = ddpm.sample_ancestral(
        MixtureOracle(eight, sched).denoiser(),
        torch.randn(n, 2, generator=g),
        torch.linspace(1, 0, 201),
        variance=variance,
        generator=g,
    )
    floor = (
        sum(metrics.sliced_wasserstein(eight.sample(n, g), eight.sample(n, g), generator=g) for _ in range(5))
        / 5
    )
    sw = metrics.sliced_wasserstein(x, eight.sample(n, g), generator=g)
    assert sw < 1.5 * floor, f"SW to data {sw:.3f} vs data-to-data {floor:.3f}"
    cov = metrics.mode_coverage(x, eight)
    assert cov["modes"] == 8 and cov["near"] > 0.97


def test_sampler_callback_sees_every_state(eight):
    sched = get_schedule("linear")
    seen = []
    ddpm.sample_ancestral(
        MixtureOracle(eight, sched).denoiser(),
        torch.randn(5, 2),
        torch.linspace(1, 0, 11),
        callback=lambda i, t, x: seen.append((i, float(t))),
    )
    assert [i for i, _ in seen] == list(range(11)) and seen[-1][1] == 0.0


@pytest.mark.parametrize(
    "timesteps,match",
    [
        (torch.tensor([1.0, 0.5, 0.5, 0.0]), r"decrease strictly.*timesteps\[1\]=0.5"),
        (torch.tensor([0.0, 0.5, 1.0]), "decrease strictly"),
        (torch.tensor([1.2, 0.5, 0.0]), r"must lie in \[0, 1\]"),
        (torch.tensor([1.0]), "at least 2"),
    ],
)
def test_bad_timesteps_rejected(timesteps, match):
    den = Denoiser(lambda x, t: x, get_schedule("linear"))
    with pytest.raises(ValueError, match=match):
        ddpm.sample_ancestral(den, torch.zeros(3, 2), timesteps)


def test_bad_inputs_to_forward_and_loss():
    sched = get_schedule("linear")
    with pytest.raises(ValueError, match=r"noise must have the shape of x0 \(4, 2\)"):
        ddpm.q_sample(sched, torch.zeros(4, 2), 0.5, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="'score'"):
        ddpm.simple_loss(sched, prediction="score")
    with pytest.raises(ValueError, match="unknown reverse variance 'big'"):
        ddpm.sample_ancestral(
            Denoiser(lambda x, t: x, sched), torch.zeros(3, 2), torch.linspace(1, 0, 3), variance="big"
        )


def test_simple_loss_is_minimized_by_the_oracle(eight, gen):
    """For x0-prediction, E[x0|x_t] minimizes the loss: any perturbation must raise it."""
    sched = get_schedule("cosine")
    oracle = MixtureOracle(eight, sched)
    x0 = eight.sample(20_000, torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = ddpm.simple_loss(sched, prediction="x0")(oracle.x0, x0, torch.Generator().manual_seed(1))
    shrunk = ddpm.simple_loss(sched, prediction="x0")(
        lambda x, t: 0.9 * oracle.x0(x, t), x0, torch.Generator().manual_seed(1)
    )
    assert exact < shrunk
