"""Chapter 4's library: bounds and exact likelihoods, checked against the exact mixture density.

Monte Carlo checks compare means within a few standard errors. The data and the Monte Carlo draws
always use different seeds: with the same seed, torch's generator can hand the "noise" the very
normal numbers that placed the data points, which correlates them and biases the estimate.
"""

import math

import pytest
import torch

from dmlib import data, ddpm
from dmlib import likelihood as L
from dmlib.oracle import GaussianMixture, MixtureOracle
from dmlib.schedules import get_schedule
from dmlib.sde import pf_ode_drift

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mean_se(v):
    return v.mean().item(), v.std().item() / math.sqrt(len(v))


# --- units, decoder, KL ----------------------------------------------------------------------


def test_gaussian_kl_matches_torch_distributions(gen):
    mq, mp = (torch.randn(6, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    vq, vp = (torch.rand(6, 3, generator=gen, dtype=torch.float64) + 0.1 for _ in range(2))
    want = torch.distributions.kl_divergence(
        torch.distributions.Normal(mq, vq.sqrt()), torch.distributions.Normal(mp, vp.sqrt())
    ).sum(1)
    torch.testing.assert_close(ddpm.gaussian_kl(mq, vq, mp, vp), want)


@pytest.mark.parametrize("mean,var", [(0.3, 0.04), (-0.999, 1e-6), (0.95, 4.0), (0.0, 1e-4)])
def test_discretized_decoder_is_a_distribution_over_the_256_bins(mean, var):
    x = (torch.arange(256, dtype=torch.float64) / 127.5 - 1)[:, None]
    logp = L.discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), var)
    assert torch.isfinite(logp).all() and (logp <= 1e-12).all()
    assert abs(logp.exp().sum().item() - 1) < 1e-9
    # an inner bin is the Gaussian mass between its edges, computed here with erf
    k = 100
    lo, hi = (x[k, 0] - 1 / 255 - mean) / math.sqrt(var), (x[k, 0] + 1 / 255 - mean) / math.sqrt(var)
    mass = 0.5 * (torch.erf(hi / math.sqrt(2)) - torch.erf(lo / math.sqrt(2)))
    if mass > 1e-300:
        assert abs(logp[k].item() - math.log(mass.item())) < 1e-6


def test_discretized_decoder_in_the_bound_is_a_probability(gen):
    """On pixel data the decoder term is -log of a probability (>= 0) where a density's would be negative."""
    pixels = torch.randint(0, 256, (300, 2), generator=gen).double() / 127.5 - 1
    mix = GaussianMixture(pixels[:4], stds=1e-3)
    x0 = pixels[:4].repeat(25, 1)
    den = MixtureOracle(mix, get_schedule("cosine")).denoiser()
    disc = L.discrete_vlb(den, x0, 20, decoder="discretized", generator=_gen(1)).terms[:, 0]
    dens = L.discrete_vlb(den, x0, 20, decoder="gaussian", generator=_gen(1)).terms[:, 0]
    assert (disc >= 0).all() and (dens < 0).any()


def test_dequantization_bound_in_bits_per_dim(gen):
    """Uniform density on [-1, 1]^D: -log p = D log 2 nats, i.e. exactly 8 bits/dim after dequantization."""
    D = 12
    x = torch.randint(0, 256, (50, D), generator=gen).double() / 127.5 - 1
    y, log_volume = L.uniform_dequantize(x, generator=gen)
    k = ((x + 1) * 127.5).round()
    assert ((y >= -1 + 2 * k / 256) & (y < -1 + 2 * (k + 1) / 256)).all(), "y must lie in pixel k's bin"
    nll_continuous = torch.full((50,), D * math.log(2), dtype=torch.float64)
    torch.testing.assert_close(L.bits_per_dim(nll_continuous - log_volume, D), torch.full_like(y[:, 0], 8.0))


# --- discrete-time bound ---------------------------------------------------------------------


def test_discrete_vlb_reproduces_ddpm_vlb_terms(eight):
    den = MixtureOracle(eight, get_schedule("cosine")).denoiser()
    x0 = eight.sample(64, _gen(1), dtype=torch.float64)
    got = L.discrete_vlb(den, x0, 12, variance="betatilde", generator=_gen(2)).terms
    torch.testing.assert_close(got, ddpm.vlb_terms(den, x0, 12, generator=_gen(2)))


@pytest.mark.parametrize("T", [4, 16, 40])
def test_discrete_vlb_of_the_oracle_bounds_the_true_nll(T, eight):
    den = MixtureOracle(eight, get_schedule("cosine")).denoiser()
    x0 = eight.sample(500, _gen(1), dtype=torch.float64)
    nll = -eight.log_prob(x0)
    for variance in ("beta", "betatilde"):
        gap, se = _mean_se(L.discrete_vlb(den, x0, T, variance=variance, generator=_gen(2)).total - nll)
        assert gap > 3 * se, f"T={T}, {variance}: VLB - NLL = {gap:.3f} +- {se:.3f}"


def test_analytic_variance_of_gaussian_data_is_beta():
    """For N(0, I) data the reverse process is exactly N(sqrt(alpha_t) x_t, beta_t): Bao et al.'s
    formula must return beta_t (derivation in analytic_dpm_variances), not betatilde."""
    sched = get_schedule("linear")
    gauss = GaussianMixture([[0.0, 0.0]], stds=1.0)
    ref = gauss.sample(20_000, _gen(1), dtype=torch.float64)
    got = L.analytic_dpm_variances(MixtureOracle(gauss, sched).denoiser(), ref, 50, generator=_gen(2))
    beta = L.variance_table(sched, 50, "beta")
    assert ((got[1:] / beta[1:] - 1).abs() < 0.03).all()
    betatilde = L.variance_table(sched, 50, "betatilde")
    assert (betatilde[2:] < 0.9 * beta[2:]).any(), "the check must be able to tell beta from betatilde"


def test_analytic_variance_improves_the_oracle_bound(eight):
    """Measured (cosine, T = 16, 500 points): beta 0.97, betatilde 0.90, Analytic-DPM 0.23 nats above the NLL."""
    den = MixtureOracle(eight, get_schedule("cosine")).denoiser()
    x0, ref = (
        eight.sample(500, _gen(1), dtype=torch.float64),
        eight.sample(1000, _gen(3), dtype=torch.float64),
    )
    variances = {
        "beta": "beta",
        "betatilde": "betatilde",
        "analytic": L.analytic_dpm_variances(den, ref, 16, generator=_gen(4)),
    }
    vlb = {k: L.discrete_vlb(den, x0, 16, variance=v, generator=_gen(2)).total for k, v in variances.items()}
    for fixed in ("beta", "betatilde"):
        gain, se = _mean_se(vlb[fixed] - vlb["analytic"])  # paired: same x_t draws
        assert gain > 0.3 and gain > 5 * se, f"{fixed}: gain {gain:.3f} +- {se:.3f}"


def test_learned_variance_interpolates_between_the_fixed_ones(eight):
    """eq. 15 at v = 1 is beta; at v = 0 it is betatilde, with iDDPM's clipping betatilde_1 -> betatilde_2."""
    sched, T = get_schedule("linear"), 8
    den = MixtureOracle(eight, sched).denoiser()
    x0 = eight.sample(32, _gen(1), dtype=torch.float64)

    def vlb(variance):
        return L.discrete_vlb(den, x0, T, variance=variance, generator=_gen(2)).terms

    clipped = L.variance_table(sched, T, "betatilde")
    clipped[1] = clipped[2]
    torch.testing.assert_close(vlb(lambda x, t: torch.ones_like(x)), vlb("beta"))
    torch.testing.assert_close(vlb(lambda x, t: torch.zeros_like(x)), vlb(clipped))


class _OracleWithConstantV:
    """Duck-types LearnedVarianceMLP.eps_v: the exact noise prediction and a fixed interpolation v."""

    def __init__(self, denoiser, v):
        self.den, self.v = denoiser, v

    def eps_v(self, x, t):
        return self.den.eps(x, t), torch.full_like(x, self.v)


def test_hybrid_loss_vlb_term_is_the_discrete_bound(eight):
    """lam * T * (one random step's term) must average to lam * (sum of the bound's terms), in bits/dim."""
    sched, T, v = get_schedule("linear"), 6, 0.3
    den = MixtureOracle(eight, sched).denoiser()
    model = _OracleWithConstantV(den, v)
    reps = []
    for seed in range(6):
        x0 = eight.sample(4000, _gen(10 + seed), dtype=torch.float64)
        with_vlb = L.hybrid_loss(sched, T, lam=1.0)(model, x0, _gen(seed))
        reps.append(with_vlb - L.hybrid_loss(sched, T, lam=0.0)(model, x0, _gen(seed)))
    hybrid, hybrid_se = _mean_se(torch.stack(reps))
    x0 = eight.sample(2000, _gen(20), dtype=torch.float64)
    terms = L.discrete_vlb(den, x0, T, variance=lambda x, t: torch.full_like(x, v), generator=_gen(21)).terms
    want, want_se = _mean_se(L.bits_per_dim(terms[:, :T].sum(1), 2))
    assert abs(hybrid - want) < 4 * math.hypot(hybrid_se, want_se), (hybrid, hybrid_se, want, want_se)


def test_hybrid_loss_stops_the_vlb_gradient_at_the_mean(gen):
    model = L.LearnedVarianceMLP(hidden=16, depth=2)
    x0, sched = torch.randn(64, 2, generator=gen), get_schedule("linear")
    vlb_part = L.hybrid_loss(sched, 10, lam=1.0)(model, x0, _gen(5)) - L.hybrid_loss(sched, 10, lam=0.0)(
        model, x0, _gen(5)
    )
    head = model.body.net[-1].weight
    (grad,) = torch.autograd.grad(vlb_part, head)
    assert (grad[:2] == 0).all(), "L_vlb must not train the noise prediction (iDDPM's stop-gradient)"
    assert grad[2:].abs().sum() > 0, "L_vlb must train the variance outputs"


@pytest.mark.slow
def test_learned_and_analytic_variances_beat_fixed_ones_on_a_trained_model():
    """1000 hybrid steps on eight_gaussians (linear, T = 10). Measured over two seeds: beta 2.90-2.94,
    betatilde 4.29-4.32, Analytic-DPM 2.79-2.87, learned 2.76-2.79 nats per point (true NLL 0.33)."""
    from dmlib.train import TrainConfig, train

    torch.manual_seed(0)
    mix, sched, T = data.eight_gaussians(), get_schedule("linear"), 10
    result = train(
        L.LearnedVarianceMLP(hidden=64),
        mix.sample(20_000, _gen(0)),
        L.hybrid_loss(sched, T),
        TrainConfig(steps=1000, batch_size=256, lr=2e-3, ema_decay=0.99, progress=False),
    )
    model = result.ema
    x0, ref = mix.sample(1000, _gen(1)), mix.sample(1000, _gen(2))
    den = model.denoiser(sched)
    with torch.no_grad():
        analytic = L.analytic_dpm_variances(den, ref, T, generator=_gen(4))
        variances = {
            "beta": "beta",
            "betatilde": "betatilde",
            "analytic": analytic,
            "learned": model.fraction,
        }
        vlb = {
            k: L.discrete_vlb(den, x0, T, variance=v, generator=_gen(3)).total for k, v in variances.items()
        }
    best_fixed = min(vlb["beta"].mean(), vlb["betatilde"].mean())
    assert vlb["analytic"].mean() < best_fixed - 0.02, {k: v.mean().item() for k, v in vlb.items()}
    assert vlb["learned"].mean() < best_fixed - 0.05, {k: v.mean().item() for k, v in vlb.items()}


# --- continuous-time bound and VDM --------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_continuous_bound_of_the_oracle_is_tight_and_above_the_nll(name, eight):
    den = MixtureOracle(eight, get_schedule(name)).denoiser()
    x0 = eight.sample(500, _gen(1), dtype=torch.float64)
    nll = -eight.log_prob(x0)
    gap, se = _mean_se(L.continuous_vlb(den, x0, t_eps=1e-5, n_t=8, generator=_gen(2)).total - nll)
    assert abs(gap) < 3.5 * se + 0.05, f"with the exact score the bound is tight: gap {gap:.3f} +- {se:.3f}"
    # from a noisier t_eps the Gaussian decoder no longer fits q(x_0 | x_t): the bound lies visibly above
    gap, se = _mean_se(L.continuous_vlb(den, x0, t_eps=0.05, n_t=8, generator=_gen(3)).total - nll)
    assert gap > 3 * se and gap > 0.2, f"gap {gap:.3f} +- {se:.3f}"


@pytest.mark.parametrize(
    "name,t_eps,sampling",
    [
        ("linear", 1e-5, "importance"),
        ("linear", 1e-5, "uniform"),
        ("cosine", 1e-5, "importance"),
        ("ve", 0.0, "uniform"),
    ],
)
def test_diffusion_loss_of_gaussian_data_has_its_closed_form(name, t_eps, sampling):
    """For x ~ N(0, s^2 I) the exact denoiser leaves E||eps - eps_hat||^2 = d s^2 SNR / (1 + s^2 SNR);
    integrated over gamma = -log SNR: L_inf = d/2 [log(1 + s^2 SNR(t_eps)) - log(1 + s^2 SNR(1))].
    Measured standard error: 0.03-0.05 nats."""
    s, sched = 0.7, get_schedule(name)
    gauss = GaussianMixture([[0.0, 0.0]], stds=s)
    x0 = gauss.sample(2000, _gen(1), dtype=torch.float64)
    vlb = L.continuous_vlb(
        MixtureOracle(gauss, sched).denoiser(),
        x0,
        t_eps=t_eps,
        n_t=8,
        time_sampling=sampling,
        generator=_gen(2),
    )
    snr = [sched.snr(torch.tensor(t, dtype=torch.float64)).item() for t in (t_eps, 1.0)]
    want = math.log1p(s**2 * snr[0]) - math.log1p(s**2 * snr[1])  # d/2 = 1
    got, se = _mean_se(vlb.diffusion)
    assert abs(got - want) < 4 * se, (got, se, want)
    # and the whole bound sits on the entropy of N(0, s^2 I), up to the prior mismatch
    entropy = math.log(2 * math.pi * math.e * s**2)
    assert abs(vlb.total.mean().item() - entropy) < 4 * se + 0.02


def test_importance_sampling_of_time_reduces_the_variance(eight):
    """Measured on cosine: standard error about 2.3 nats with uniform t, about 0.2 with t ~ g^2 / sigma^2."""
    den = MixtureOracle(eight, get_schedule("cosine")).denoiser()
    x0 = eight.sample(500, _gen(1), dtype=torch.float64)
    uni = _mean_se(L.continuous_vlb(den, x0, n_t=8, time_sampling="uniform", generator=_gen(2)).total)
    imp = _mean_se(L.continuous_vlb(den, x0, n_t=8, time_sampling="importance", generator=_gen(3)).total)
    assert imp[1] < uni[1] / 3
    assert abs(uni[0] - imp[0]) < 4 * math.hypot(uni[1], imp[1])


def test_vdm_loss_depends_only_on_the_snr_endpoints(mixture):
    """Two VDM schedules with the same endpoints: one linear in gamma, one nearly flat up to t = 0.4
    and then steep (its weights set by hand). Measured: L_inf about 9.2 nats; the paired difference of
    the two estimates over 3000 points was -0.02 to 0.04 with standard error 0.04."""
    straight = L.LearnedSchedule(-10.0, 8.0, learn_endpoints=False, nonlinear=False)
    curved = L.LearnedSchedule(-10.0, 8.0, learn_endpoints=False, features=16)
    with torch.no_grad():
        curved.w1.fill_(0.2)
        curved.w2.fill_(4.0)
        curved.b2.fill_(-2.0)
        curved.w3.fill_(1.0)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert (curved.gamma(t) - straight.gamma(t)).abs().max() > 4, "the shapes must differ visibly"
    x0 = mixture.sample(2000, _gen(2), dtype=torch.float64)
    res = L.endpoint_invariance(
        MixtureOracle(mixture, straight).denoiser(), x0, curved, t_eps=0.0, generator=_gen(3)
    )
    diff, se = res["difference"]
    assert abs(diff) < 3.5 * se and se < 0.1, res
    with pytest.raises(ValueError, match="does not span"):
        L.endpoint_invariance(MixtureOracle(mixture, straight).denoiser(), x0, L.LearnedSchedule(-5.0, 8.0))


def test_learned_schedule_is_monotone_with_exact_endpoints_and_trains():
    sched = L.LearnedSchedule(-13.3, 5.0, generator=_gen(0))
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    gamma = sched.gamma(t).detach()
    assert (gamma.diff() > 0).all()
    torch.testing.assert_close(gamma[[0, -1]], torch.tensor([-13.3, 5.0], dtype=torch.float64))
    torch.testing.assert_close((sched.alpha(t) ** 2 + sched.sigma(t) ** 2).detach(), torch.ones_like(t))
    from dmlib.nets.mlp import MLP

    model = L.VDM(MLP(hidden=16, depth=2), sched)
    L.vdm_loss(model, data.make_toy("eight_gaussians", 128, _gen(1)), _gen(2)).backward()
    for p in (sched.ends, sched.w2, sched.w3, model.net.net[0].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0, "the bound must train network and schedule"


# --- exact likelihood ----------------------------------------------------------------------------


def test_pf_ode_log_likelihood_equals_the_mixture_density(mixture):
    sched = get_schedule("cosine")
    oracle = MixtureOracle(mixture, sched)
    x = mixture.sample(32, _gen(1), dtype=torch.float64)
    res = L.ode_log_likelihood(oracle.denoiser(), x, t_eps=1e-5, rtol=1e-6, atol=1e-6)
    assert (res.log_prob - mixture.log_prob(x)).abs().max() < 1e-3
    assert (res.log_prob - oracle.log_prob(x, 1e-5)).abs().max() < 2e-4
    assert res.x_T.shape == x.shape and res.nfe > 10


def test_exact_divergence_of_a_linear_map_is_its_trace(gen):
    A = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    value, div = L.divergence(lambda z: z @ A.T, x)
    torch.testing.assert_close(value, x @ A.T)
    torch.testing.assert_close(div, torch.full((5,), A.trace().item(), dtype=torch.float64))


@pytest.mark.parametrize("kind", L.PROBES)
def test_hutchinson_estimate_is_unbiased(kind, mixture):
    den = MixtureOracle(mixture, get_schedule("linear")).denoiser()
    t = torch.tensor(0.3, dtype=torch.float64)

    def drift(z):
        return pf_ode_drift(den, z, t)

    points = torch.tensor([[0.2, -0.4], [-1.3, 0.5]], dtype=torch.float64)
    _, exact = L.divergence(drift, points)
    n = 4000
    x = points.repeat_interleave(n, 0)
    _, est = L.divergence(drift, x, L.hutchinson_probe(x.shape, kind, _gen(3)))
    for j in range(2):
        mean, se = _mean_se(est[j * n : (j + 1) * n])
        assert abs(mean - exact[j].item()) < 3 * se + 1e-9, (kind, j, mean, se, exact[j].item())


# --- clear errors ---------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(mixture):
    sched = get_schedule("linear")
    den = MixtureOracle(mixture, sched).denoiser()
    x = mixture.sample(4, _gen(1), dtype=torch.float64)
    grid_x = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="bins must be an integer"):
        L.discretized_gaussian_log_likelihood(grid_x, grid_x, 0.1, bins=256.0)
    with pytest.raises(ValueError, match="bins must be an integer"):
        L.uniform_dequantize(grid_x, bins=True)
    with pytest.raises(ValueError, match="mean must have the shape"):
        L.discretized_gaussian_log_likelihood(grid_x, grid_x[:, :1], 0.1)
    with pytest.raises(ValueError, match="grid"):
        L.discretized_gaussian_log_likelihood(grid_x + 0.003, grid_x, 0.1)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        L.bits_per_dim(1.0, 0)
    with pytest.raises(ValueError, match="T must be a positive integer"):
        L.discrete_vlb(den, x, 2.5)
    with pytest.raises(ValueError, match="unknown fixed variance"):
        L.discrete_vlb(den, x, 4, variance="large")
    with pytest.raises(ValueError, match="shape \\(5,\\)"):
        L.discrete_vlb(den, x, 4, variance=torch.ones(4))
    with pytest.raises(ValueError, match="unknown decoder"):
        L.discrete_vlb(den, x, 4, decoder="laplace")
    with pytest.raises(ValueError, match="sigma\\(0\\) = 0"):
        L.discrete_vlb(MixtureOracle(mixture, get_schedule("ve")).denoiser(), x, 4)
    with pytest.raises(ValueError, match="unknown estimator"):
        L.analytic_dpm_variances(den, x, 4, estimator="exact")
    with pytest.raises(ValueError, match="t_eps must lie"):
        L.ode_log_likelihood(den, x, t_eps=0.0)  # sigma(0) = 0: infinite score
    with pytest.raises(ValueError, match="t_eps must lie"):
        L.ode_log_likelihood(den, x, t_eps=1.0)
    with pytest.raises(ValueError, match="unknown trace"):
        L.ode_log_likelihood(den, x, trace="hutchinson")
    with pytest.raises(ValueError, match="t_eps must lie"):
        L.continuous_vlb(den, x, t_eps=-0.1)
    with pytest.raises(ValueError, match="unknown time_sampling"):
        L.diffusion_loss(den, x, t_min=0.1, time_sampling="stratified")
    with pytest.raises(ValueError, match="infinite at t_min"):
        L.diffusion_loss(den, x, t_min=0.0)
    with pytest.raises(ValueError, match="probe must have the shape"):
        L.divergence(lambda z: z, x, torch.ones(4, 3))
    with pytest.raises(ValueError, match="same shape"):
        L.divergence(lambda z: z[:, :1], x)
    with pytest.raises(ValueError, match="unknown probe"):
        L.hutchinson_probe((4, 2), "uniform")
    with pytest.raises(ValueError, match="gamma_0 < gamma_1"):
        L.LearnedSchedule(5.0, -13.3)
