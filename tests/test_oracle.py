import math

import pytest
import torch

from dmlib.oracle import GaussianMixture, MixtureOracle
from dmlib.schedules import SCHEDULES, get_schedule


@pytest.mark.parametrize("name", SCHEDULES)
def test_score_is_gradient_of_log_density(name, mixture, gen):
    oracle = MixtureOracle(mixture, get_schedule(name))
    x = (2 * torch.randn(64, 2, generator=gen, dtype=torch.float64)).requires_grad_()
    t = torch.rand(64, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(oracle.log_prob(x, t).sum(), x)
    torch.testing.assert_close(oracle.score(x.detach(), t), grad, atol=1e-10, rtol=1e-8)


def test_density_at_t0_integrates_to_one_and_is_the_data_density(mixture):
    g = torch.linspace(-5, 5, 801, dtype=torch.float64)
    xy = torch.cartesian_prod(g, g)
    p = MixtureOracle(mixture, get_schedule("linear")).log_prob(xy, 0.0).exp()
    assert abs(p.sum().item() * (g[1] - g[0]).item() ** 2 - 1) < 1e-4
    torch.testing.assert_close(
        mixture.log_prob(xy[:100]), MixtureOracle(mixture, get_schedule("linear")).log_prob(xy[:100], 0.0)
    )


def test_diffused_density_is_the_density_of_noised_samples(mixture, gen):
    """At t the oracle's log q_t should be the log-likelihood of x_t = alpha x0 + sigma eps: check its mean."""
    sched = get_schedule("cosine")
    oracle = MixtureOracle(mixture, sched)
    t = torch.tensor(0.4, dtype=torch.float64)
    x0 = mixture.sample(200_000, gen, dtype=torch.float64)
    x_t = sched.alpha(t) * x0 + sched.sigma(t) * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    # a 2D histogram of x_t compared with the oracle density at bin centres
    edges = torch.linspace(-3, 3, 31, dtype=torch.float64)
    h, _ = torch.histogramdd(x_t, bins=[edges, edges])
    width = (edges[1] - edges[0]).item()
    centres = (edges[:-1] + edges[1:]) / 2
    p = oracle.log_prob(torch.cartesian_prod(centres, centres), t).exp().reshape(30, 30)
    empirical = h / (x0.shape[0] * width**2)
    assert (empirical - p).abs().max() < 0.02  # bin width 0.2: curvature and MC error are below this


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_denoiser_matches_monte_carlo_posterior_mean(t, mixture, gen):
    """E[x0 | x_t] by importance weighting prior samples with q(x_t | x0), against the closed form."""
    sched = get_schedule("linear")
    oracle = MixtureOracle(mixture, sched)
    a, s = sched.alpha(torch.tensor(t)).double(), sched.sigma(torch.tensor(t)).double()
    x0 = mixture.sample(400_000, gen, dtype=torch.float64)
    x_t = torch.tensor([[0.3, -0.2], [1.2, 0.8], [-1.0, 0.4]], dtype=torch.float64) * a
    logw = -((x_t[:, None, :] - a * x0[None]) ** 2).sum(-1) / (2 * s**2)  # (3, N)
    w = torch.softmax(logw, dim=1)
    mc = w @ x0
    ess = 1 / (w**2).sum(1)
    assert (ess > 2000).all(), "too few effective samples for a meaningful comparison"
    tol = 5 * math.sqrt(mixture.covs.diagonal(dim1=1, dim2=2).max().item() / ess.min().item())
    torch.testing.assert_close(oracle.x0(x_t, t), mc, atol=tol, rtol=0)


def test_bad_shapes_rejected(mixture):
    oracle = MixtureOracle(mixture, get_schedule("linear"))
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        oracle.score(torch.zeros(4, 3), 0.5)
    with pytest.raises(ValueError, match=r"covs must have shape \(2, 2, 2\)"):
        GaussianMixture([[0, 0], [1, 1]], torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match="summing to 1"):
        GaussianMixture([[0, 0], [1, 1]], stds=0.1, weights=[0.5, 0.6])
