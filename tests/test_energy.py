"""dmlib.energy against exact answers: the energy network's score by finite differences, MALA and HMC
against the oracle's diffused mixture (invariance, statistically), the product of two mixtures in closed
form, and composition by summed scores vs MCMC-corrected sampling measured against the exact product."""

from __future__ import annotations

import math

import pytest
import torch

from dmlib import energy as en
from dmlib.ddpm import simple_loss
from dmlib.metrics import sliced_wasserstein
from dmlib.oracle import GaussianMixture, MixtureOracle
from dmlib.parameterization import Denoiser
from dmlib.samplers import sample_ddim, time_grid
from dmlib.schedules import Cosine, Linear, VarianceExploding

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def energy_net(seed=0) -> en.EnergyEps:
    torch.manual_seed(seed)
    return en.EnergyEps(en.EnergyMLP(2, hidden=32, depth=2, time_dim=8).double(), Cosine())


def moments(x: torch.Tensor):
    """Per-sample statistics whose means are the first and second moments: x1, x2, x1^2, x2^2, x1 x2."""
    return torch.stack([x[:, 0], x[:, 1], x[:, 0] ** 2, x[:, 1] ** 2, x[:, 0] * x[:, 1]], 1)


def exact_moments(mix: GaussianMixture) -> torch.Tensor:
    second = torch.einsum("k,kij->ij", mix.weights, mix.covs + mix.means[:, :, None] * mix.means[:, None, :])
    mean = mix.weights @ mix.means
    return torch.stack([mean[0], mean[1], second[0, 0], second[1, 1], second[0, 1]])


def z_scores(x: torch.Tensor, mix: GaussianMixture) -> torch.Tensor:
    """(sample moment - exact moment) / standard error, for i.i.d. rows of x."""
    m = moments(x)
    return (m.mean(0) - exact_moments(mix)) / (m.std(0) / math.sqrt(len(x)))


# ---------------------------------------------------------------------------------------------
# The energy parameterization
# ---------------------------------------------------------------------------------------------


def test_energy_model_score_is_minus_the_energy_gradient():
    """score = -grad_x E by central differences (1e-7), eps = -sigma score, and the Denoiser view agrees
    (catches a sign, a missing 1/sigma between F and E, or eps read as the score)."""
    model = energy_net()
    den = model.denoiser()
    x = torch.randn(16, 2, generator=gen(), dtype=F64)
    t, h = torch.tensor(0.4, dtype=F64), 1e-5
    fd = torch.stack(
        [-(den.energy(x + h * e, t) - den.energy(x - h * e, t)) / (2 * h) for e in torch.eye(2, dtype=F64)],
        1,
    )
    torch.testing.assert_close(den.score(x, t), fd, rtol=1e-7, atol=1e-8)
    sigma = model.schedule.sigma(t)
    torch.testing.assert_close(model(x, t), -sigma * den.score(x, t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Denoiser(model, Cosine()).score(x, t), fd, rtol=1e-7, atol=1e-8)


def test_energy_model_trains_with_the_books_loss():
    """simple_loss on the energy model reaches its parameters (double backpropagation): the autograd
    gradient of a parameter equals the central difference of the loss (catches a score computed without
    create_graph, which would leave the loss constant in the parameters)."""
    model = energy_net()
    x0 = torch.randn(64, 2, generator=gen(1), dtype=F64)
    loss_fn = simple_loss(Cosine())
    loss = loss_fn(model, x0, gen(2))
    loss.backward()
    param = model.net.f.net[0].weight
    for idx in [(0, 0), (5, 1), (17, 3)]:
        h = 1e-6
        with torch.no_grad():
            param[idx] += h
            up = loss_fn(model, x0, gen(2))
            param[idx] -= 2 * h
            down = loss_fn(model, x0, gen(2))
            param[idx] += h
        assert abs(param.grad[idx] - (up - down) / (2 * h)) < 1e-6 * (1 + abs(param.grad[idx]))


def test_oracle_energy_gives_the_oracle_score(mixture):
    """-grad of the oracle's -log q_t by autograd equals its closed-form score (1e-10): the energy is the
    one the MCMC tests use (catches a sign or a t mix-up in the energy view)."""
    oracle = MixtureOracle(mixture, Cosine())
    den = en.EnergyDenoiser(lambda x, t: -oracle.log_prob(x, t), oracle.schedule)
    x = torch.randn(32, 2, generator=gen(), dtype=F64)
    for t in (0.1, 0.6):
        torch.testing.assert_close(den.score(x, t), oracle.score(x, t), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        den.eps(x, 0.6), oracle.denoiser().eps(x, torch.tensor(0.6, dtype=F64)), rtol=1e-9, atol=1e-10
    )


# ---------------------------------------------------------------------------------------------
# MCMC at a fixed t
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mala", "hmc"])
def test_mala_and_hmc_leave_the_oracle_marginal_invariant(kind, mixture):
    """From 4000 exact samples of q_t (t = 0.3, an anisotropic 3-component mixture), 10 steps with h = 0.5
    (MALA accepts 53%, HMC 40%) keep the 5 first and second moments within 4.5 standard errors (seeds 0-9:
    at most 1.9 and 2.9); unadjusted Langevin at the same step drifts by 14-16 (asserted > 8). Catches a
    wrong Hastings correction: Du et al.'s code's 2 h^2 for 4 h in q(y|x) drifts by 38, no correction by 17."""
    sched, t = Cosine(), 0.3
    den = en.EnergyDenoiser.from_oracle(MixtureOracle(mixture, sched))
    q_t = en.diffused_mixture(mixture, sched, t)
    g = gen(3)
    x = q_t.sample(4000, g, dtype=F64)
    h = 0.5
    y, rates = x, []
    for _ in range(10):
        y, acc = en.mcmc_step(den, y, t, kind, math.sqrt(2 * h) if kind == "hmc" else h, generator=g)
        rates.append(acc.mean())
    rate = torch.stack(rates).mean()
    assert 0.3 < rate < 0.7, rate
    assert z_scores(y, q_t).abs().max() < 4.5, z_scores(y, q_t)
    y = x
    for _ in range(10):
        y = en.mcmc_step(den, y, t, "langevin", h, generator=g).x
    assert z_scores(y, q_t).abs().max() > 8, z_scores(y, q_t)


def test_one_leapfrog_step_is_mala(mixture):
    """HMC with one leapfrog step of size eps is MALA with h = eps^2 / 2: the same proposal and the same
    acceptance, to rounding (catches an error in either acceptance ratio)."""
    den = en.EnergyDenoiser.from_oracle(MixtureOracle(mixture, Cosine()))
    energy = lambda x: den.energy(x, 0.2)  # noqa: E731
    x = torch.randn(500, 2, generator=gen(), dtype=F64)
    eps = 0.7
    mala = en.mala_step(energy, x, eps**2 / 2, generator=gen(5))
    hmc = en.hmc_step(energy, x, eps, 1, generator=gen(5))
    torch.testing.assert_close(hmc.accept, mala.accept, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hmc.x, mala.x, rtol=0, atol=1e-12)
    assert 0.2 < mala.accept.mean() < 0.95  # a step large enough that the ratio matters


@pytest.mark.parametrize("kind", ["mala", "hmc"])
def test_acceptance_rates(kind, mixture):
    """Acceptance probabilities lie in (0, 1]; at a tiny step the rate is above 0.9999 and at a large one
    below 0.5 (catches an acceptance reported as exp(log r) unclipped, or as the 0/1 outcome)."""
    den = en.EnergyDenoiser.from_oracle(MixtureOracle(mixture, Cosine()))
    x = en.diffused_mixture(mixture, Cosine(), 0.5).sample(1000, gen(), dtype=F64)
    for size, lo, hi in [(1e-6, 0.9999, 1.0), (1.5, 0.0, 0.5)]:
        acc = en.mcmc_step(den, x, 0.5, kind, size, generator=gen(1)).accept
        assert (acc > 0).all() and (acc <= 1).all()
        assert lo < acc.mean() <= hi, acc.mean()


# ---------------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------------


def test_product_of_mixtures_is_the_normalized_product(mixture):
    """log(a b / Z) by the closed form equals log a + log b - log Z on points, with Z integrated on a grid
    (1e-8); for two Gaussians it is the precision-weighted Gaussian (catches a wrong weight N(m_i; m_j,
    S_i + S_j) or covariance)."""
    b = GaussianMixture([[0.5, 0.5], [-1.0, 1.0]], stds=[0.7, 0.4], weights=[0.6, 0.4])
    prod = en.product_of_mixtures(mixture, b)
    u = torch.linspace(-6, 6, 1201, dtype=F64)
    grid = torch.cartesian_prod(u, u)
    dens = (mixture.log_prob(grid) + b.log_prob(grid)).exp()
    log_z = torch.log(dens.sum() * (u[1] - u[0]) ** 2)
    x = torch.randn(50, 2, generator=gen(), dtype=F64)
    torch.testing.assert_close(
        prod.log_prob(x), mixture.log_prob(x) + b.log_prob(x) - log_z, rtol=0, atol=1e-8
    )
    assert abs(prod.weights.sum() - 1) < 1e-12
    S1, S2 = (
        torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=F64),
        torch.tensor([[0.4, 0.0], [0.0, 2.0]], dtype=F64),
    )
    m1, m2 = torch.tensor([1.0, -1.0], dtype=F64), torch.tensor([0.0, 2.0], dtype=F64)
    g2 = en.product_of_mixtures(GaussianMixture(m1[None], S1[None]), GaussianMixture(m2[None], S2[None]))
    C = torch.linalg.inv(torch.linalg.inv(S1) + torch.linalg.inv(S2))
    torch.testing.assert_close(g2.covs[0], C, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g2.means[0], C @ (torch.linalg.solve(S1, m1) + torch.linalg.solve(S2, m2)))


def test_summed_scores_are_the_product_of_diffused_not_the_diffused_product(mixture):
    """The composed score at t is exactly that of q1_t q2_t (1e-10); it equals the diffused product's only at
    t = 0. For two N(0, I) the closed forms give variance 1/2 against alpha^2/2 + sigma^2 (catches a
    composition that is not a plain sum of scores, or a diffused_mixture with the wrong covariance)."""
    sched = Cosine()
    b = GaussianMixture([[0.5, 0.5], [-1.0, 1.0]], stds=[0.7, 0.4], weights=[0.6, 0.4])
    poe = en.product_of_experts(
        *(en.EnergyDenoiser.from_oracle(MixtureOracle(m, sched)) for m in (mixture, b))
    )
    prod = en.product_of_mixtures(mixture, b)
    x = torch.randn(64, 2, generator=gen(), dtype=F64)
    for t in (0.0, 0.5):
        of_diffused = en.product_of_mixtures(
            en.diffused_mixture(mixture, sched, t), en.diffused_mixture(b, sched, t)
        )
        torch.testing.assert_close(poe.score(x, t), of_diffused.score(x), rtol=1e-10, atol=1e-10)
        gap = (poe.score(x, t) - en.diffused_mixture(prod, sched, t).score(x)).abs().max()
        assert gap < 1e-10 if t == 0 else gap > 0.1
    std = GaussianMixture([[0.0, 0.0]], stds=1.0)
    a, s = sched.alpha(torch.tensor(0.5, dtype=F64)), sched.sigma(torch.tensor(0.5, dtype=F64))
    d = en.diffused_mixture(std, sched, 0.5)
    torch.testing.assert_close(en.product_of_mixtures(d, d).covs[0, 0, 0], torch.tensor(0.5, dtype=F64))
    diffused_product = en.diffused_mixture(en.product_of_mixtures(std, std), sched, 0.5)
    torch.testing.assert_close(diffused_product.covs[0, 0, 0], a**2 / 2 + s**2)


def test_mcmc_corrected_composition_beats_score_summing():
    """Sampling p1 p2 (p1: two blobs on the x-axis, p2: two elongated ones on the y-axis; the product is a
    4-mode mixture) from the summed oracle scores, Linear VP, 30 ancestral steps, 2000 samples, fixed seed.
    Measured over seeds 0-7, error |E[x1^2] - exact| + |E[x2^2] - exact| (exact 2.23 and 0.60, SE about
    0.03): plain 0.73-0.79, MALA (4 steps per level, 51% accepted) 0.05-0.13, HMC (41%) 0.02-0.10;
    sliced W2 to exact samples: plain 0.18-0.20, MALA 0.04-0.12, HMC 0.04-0.09, two exact sets 0.03-0.11
    (the floor); deterministic DDIM 1.15. ULA does about as well here: the gain is the annealed MCMC,
    the Metropolis test is what keeps each level exact (see the invariance test). Asserted: corrected
    moment error below a quarter of plain's (worst seen 0.18 of it), SW below 0.8 of plain's (worst 0.69).
    Catches an MCMC that does not target q1_t q2_t, or none at all."""
    sched = Linear()
    p1 = GaussianMixture([[-1.5, 0.0], [1.5, 0.0]], stds=[0.5, 0.5])
    elongated = [[[4.0, 0.0], [0.0, 0.3]]] * 2
    p2 = GaussianMixture([[0.0, -1.5], [0.0, 1.5]], covs=elongated)
    prod = en.product_of_mixtures(p1, p2)
    poe = en.product_of_experts(*(en.EnergyDenoiser.from_oracle(MixtureOracle(p, sched)) for p in (p1, p2)))
    g = gen(0)
    n = 2000
    ref = prod.sample(n, g, dtype=F64)
    x_T = torch.randn(n, 2, generator=g, dtype=F64)
    ts = time_grid(sched, 30)
    plain = sample_ddim(poe, x_T, ts, eta=1.0, generator=g)
    exact = exact_moments(prod)[2:4]

    def errors(x):
        sw = sliced_wasserstein(x, ref, generator=gen(1))
        return sw, (moments(x).mean(0)[2:4] - exact).abs().sum().item()

    sw_plain, err_plain = errors(plain)
    assert err_plain > 0.5 and sw_plain > 0.12  # score summing is far off: the baseline's error is real
    for kind in ("mala", "hmc"):
        rates = []
        out = en.sample_mcmc(
            poe, x_T, ts, mcmc=kind, n_mcmc=4, step_scale=1.0, generator=g, accept_rates=rates
        )
        sw, err = errors(out)
        assert err < err_plain / 4 and sw < 0.8 * sw_plain, (kind, sw, err, sw_plain, err_plain)
        assert 0.3 < torch.stack(rates).mean() < 0.7


def test_sampler_contract(mixture):
    """sample_mcmc has the library's sampler signature: callback sees every level, acceptance rates are
    collected per MCMC step, Langevin runs on any Denoiser, MALA asks for an energy."""
    sched = Cosine()
    oracle = MixtureOracle(mixture, sched)
    ts = time_grid(sched, 5)
    seen, rates = [], []
    x = torch.randn(100, 2, generator=gen(), dtype=F64)
    en.sample_mcmc(
        en.EnergyDenoiser.from_oracle(oracle),
        x,
        ts,
        n_mcmc=3,
        callback=lambda i, t, y: seen.append(i),
        accept_rates=rates,
        generator=gen(1),
    )
    assert seen == list(range(6)) and len(rates) == 3 * 4  # no MCMC at t = 0 (sigma = 0)
    out = en.sample_mcmc(oracle.denoiser(), x, ts, mcmc="langevin", generator=gen(1))
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(TypeError, match="needs the model's energy"):
        en.sample_mcmc(oracle.denoiser(), x, ts, mcmc="mala")


# ---------------------------------------------------------------------------------------------
# Device and bad input
# ---------------------------------------------------------------------------------------------


def test_runs_on_meta(mixture):
    """The energy model's score, MALA / HMC (accept/reject as tensor ops), the composed score and the
    corrected sampler create every tensor on the inputs' device and read nothing back."""
    from test_device import StrictDevices

    dev = "meta"
    sched = Cosine()
    x = torch.zeros(8, 2, dtype=F64, device=dev)
    t = torch.tensor(0.4, dtype=F64, device=dev)
    model = energy_net().to(dev)
    oracle_den = en.EnergyDenoiser.from_oracle(MixtureOracle(mixture, sched))
    poe = en.product_of_experts(oracle_den, model.denoiser())
    with StrictDevices():
        out = [model(x, t), model.denoiser().score(x, t), model.denoiser().energy(x, t)]
        for den in (oracle_den, model.denoiser(), poe):
            for kind, size in (("langevin", 0.1), ("mala", 0.1), ("hmc", 0.3)):
                out += list(en.mcmc_step(den, x, t, kind, size))
        out += [poe.score(x, t), poe.eps(x, t), poe.energy(x, t)]
        out.append(en.sample_mcmc(poe, x, time_grid(sched, 3), mcmc="hmc"))
        out.append(en.diffused_mixture(mixture.to(dev), sched, 0.3).covs)
        out.append(en.product_of_mixtures(mixture.to(dev), mixture.to(dev)).weights)
    assert all(o.device.type == dev for o in out)


def test_bad_inputs_raise_clear_errors(mixture):
    den = en.EnergyDenoiser.from_oracle(MixtureOracle(mixture, Cosine()))
    energy = lambda x: den.energy(x, 0.3)  # noqa: E731
    x = torch.zeros(4, 2, dtype=F64)
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="step_size must be a positive finite number"):
            en.mala_step(energy, x, bad)
        with pytest.raises(ValueError, match="step_size must be a positive finite number"):
            en.hmc_step(energy, x, bad)
        with pytest.raises(ValueError, match="step_size must be a positive finite number"):
            en.langevin_step(lambda y: -y, x, bad)
    with pytest.raises(TypeError, match="step_size must be a positive number"):
        en.mala_step(energy, x, "0.1")
    with pytest.raises(ValueError, match="n_leapfrog must be an integer >= 1"):
        en.hmc_step(energy, x, 0.1, 0)
    with pytest.raises(ValueError, match=r"shape \(B, \.\.\.\)"):
        en.mala_step(energy, torch.zeros(4, dtype=F64), 0.1)
    with pytest.raises(ValueError, match=r"one number per sample, shape \(4,\)"):
        en.mala_step(lambda y: y, x, 0.1)
    ts = time_grid(Cosine(), 4)
    with pytest.raises(ValueError, match="n_mcmc must be an integer >= 1"):
        en.sample_mcmc(den, x, ts, n_mcmc=0)
    with pytest.raises(ValueError, match="step_scale must be a positive finite number"):
        en.sample_mcmc(den, x, ts, step_scale=0)
    with pytest.raises(ValueError, match="unknown MCMC kind 'gibbs'"):
        en.sample_mcmc(den, x, ts, mcmc="gibbs")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        en.sample_mcmc(den, x, ts, eta=-1.0)
    with pytest.raises(ValueError, match="at least two models"):
        en.product_of_experts(den)
    with pytest.raises(ValueError, match="one weight per model"):
        en.product_of_experts(den, den, weights=[1.0])
    other = en.EnergyDenoiser.from_oracle(MixtureOracle(mixture, VarianceExploding()))
    with pytest.raises(ValueError, match="share one schedule"):
        en.product_of_experts(den, other)
    with pytest.raises(ValueError, match="one space"):
        en.product_of_mixtures(mixture, GaussianMixture([[0.0, 0.0, 0.0]], stds=1.0))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        en.diffused_mixture(mixture, Cosine(), 1.5)
    with pytest.raises(ValueError, match="one time"):
        en.diffused_mixture(mixture, Cosine(), torch.tensor([0.1, 0.2]))
