"""What a network predicts and the design space around it (dmlib.parameterization): conversions, the
Denoiser view, EDM preconditioning, loss weightings and their sampling densities, the irreducible loss."""

import math
import re

import pytest
import torch
from test_device import StrictDevices

from dmlib import score
from dmlib.ddpm import simple_loss, uniform_time
from dmlib.nets import MLP
from dmlib.oracle import GaussianMixture, MixtureOracle, _diffused_stats
from dmlib.parameterization import (
    LOSS_WEIGHTINGS,
    PREDICTIONS,
    SAMPLINGS,
    Denoiser,
    Preconditioned,
    _col,
    edm_coefficients,
    edm_noise_level,
    edm_target,
    eps_mse_factor,
    equivalent_density,
    excess_loss,
    from_x0_eps,
    irreducible_loss,
    irreducible_totals,
    log_snr_density,
    loss_weight,
    noise_level_sampler,
    to_edm,
    to_x0_eps,
    weighted_loss,
    weighted_total,
)
from dmlib.schedules import get_schedule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", PREDICTIONS)
@pytest.mark.parametrize("alpha,sigma", [(0.8, 0.6), (0.05, 0.9987), (1.0, 3.0)])  # VP, near-noise, VE-like
def test_conversions_round_trip(kind, alpha, sigma, gen):
    x0 = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    a, s = torch.tensor(alpha, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)
    x_t = a * x0 + s * eps
    pred = from_x0_eps(x0, eps, kind, a, s)
    x0_back, eps_back = to_x0_eps(pred, kind, x_t, a, s)
    torch.testing.assert_close(x0_back, x0)
    torch.testing.assert_close(eps_back, eps)


def test_known_forms():
    x0, eps = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]])
    a, s = torch.tensor(0.6), torch.tensor(0.8)
    torch.testing.assert_close(from_x0_eps(x0, eps, "v", a, s), a * eps - s * x0)  # Salimans & Ho (2022)
    torch.testing.assert_close(from_x0_eps(x0, eps, "score", a, s), -eps / s)


def test_denoiser_views_agree(mixture, gen):
    sched = get_schedule("cosine")
    oracle = MixtureOracle(mixture, sched)
    x = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    t = torch.rand(32, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    den = oracle.denoiser()
    torch.testing.assert_close(den.score(x, t), oracle.score(x, t))
    a, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    torch.testing.assert_close(a * den.x0(x, t) + s * den.eps(x, t), x)
    # the same model seen through an eps-parameterized wrapper gives identical views
    eps_model = Denoiser(lambda x_, t_: den.eps(x_, t_), sched, "eps")
    torch.testing.assert_close(eps_model.x0(x, t), den.x0(x, t))
    torch.testing.assert_close(eps_model.v(x, t), den.v(x, t))


def test_denoiser_rejects_bad_t_shape_and_kind():
    sched = get_schedule("linear")
    den = Denoiser(lambda x, t: x, sched)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        den.x0(torch.zeros(4, 2), torch.rand(3))
    with pytest.raises(ValueError, match="unknown prediction type 'noise'"):
        Denoiser(lambda x, t: x, sched, "noise")


def test_clip_x0_keeps_views_consistent():
    sched = get_schedule("cosine")
    den = Denoiser(lambda x, t: 10 * torch.ones_like(x), sched, "x0", clip_x0=(-1, 1))
    x, t = torch.randn(4, 2), torch.tensor(0.5)
    assert (den.x0(x, t) == 1).all()
    torch.testing.assert_close(sched.alpha(t) * den.x0(x, t) + sched.sigma(t) * den.eps(x, t), x)


# ------------------------------------------------------------------------------------------------
# The design space: EDM preconditioning, loss weightings, sampling densities, irreducible loss
# ------------------------------------------------------------------------------------------------

D = torch.float64
S = 0.7  # std of the single Gaussian N(0, S^2 I) whose irreducible loss is closed form
COSINE, LINEAR, VE = get_schedule("cosine"), get_schedule("linear"), get_schedule("ve")


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def gaussian_mmse(lam):
    """The irreducible eps-MSE per dimension of N(0, S^2 I): ``S^2 SNR / (1 + S^2 SNR)`` (closed form)."""
    snr = torch.as_tensor(lam, dtype=D).exp()
    return S**2 * snr / (1 + S**2 * snr)


def gaussian_eps_model(schedule, offset=0.0):
    """``E[eps | x_t] + offset`` for N(0, S^2 I): ``sigma x_t / (alpha^2 S^2 + sigma^2)``; its eps-MSE per
    dimension is ``gaussian_mmse + offset^2``."""

    def model(x_t, t):
        a, s = _col(schedule.alpha(t), x_t), _col(schedule.sigma(t), x_t)
        return s * x_t / (a**2 * S**2 + s**2) + offset

    return model


def edm_oracle(mixture, sigma_data):
    """EDM's ideal raw network ``F*(c_in y, c_noise)`` for a mixture, built in EDM's own (VE) view: the
    noise level from ``c_noise``, ``y`` from ``c_in y``, ``E[x0 | y]`` of the mixture diffused to
    ``(alpha, sigma) = (1, nu)``, then ``F* = (E[x0 | y] - c_skip y) / c_out``. No schedule involved."""

    def net(x_in, c_noise):
        nu = torch.exp(4 * c_noise)
        c_skip, c_out, c_in, _ = edm_coefficients(nu, sigma_data)
        y = x_in / _col(c_in, x_in)
        x0 = _diffused_stats(mixture, y, torch.ones_like(nu), nu)["x0"]
        return (x0 - _col(c_skip, y) * y) / _col(c_out, y)

    return net


@pytest.mark.parametrize("kind", PREDICTIONS)
def test_eps_mse_factor(kind, gen):
    """||eps_hat - eps||^2 = c ||pred - target||^2 for every kind (catches a wrong power of alpha or sigma)."""
    x0, eps, err = (torch.randn(64, 2, generator=gen, dtype=D) for _ in range(3))
    a, s = torch.rand(64, generator=gen, dtype=D) + 0.05, torch.rand(64, generator=gen, dtype=D) * 3 + 0.05
    x_t = _col(a, x0) * x0 + _col(s, x0) * eps
    target = from_x0_eps(x0, eps, kind, a, s)
    _, eps_hat = to_x0_eps(target + err, kind, x_t, a, s)
    torch.testing.assert_close(
        ((eps_hat - eps) ** 2).sum(1), eps_mse_factor(kind, a, s) * (err**2).sum(1), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("schedule", [COSINE, VE], ids=["cosine", "ve"])
@pytest.mark.parametrize("kind", PREDICTIONS + ("F",))
def test_every_prediction_gives_the_oracle_denoiser(kind, schedule, mixture, gen):
    """eps, x0, v, score and EDM's F, each built from the oracle by its own route (eps and score from the
    oracle's score, x0 from its posterior mean, F in EDM's VE view with no schedule), give one denoiser to
    1e-10 (catches a wrong conversion, a wrong c_skip/c_out/c_in or a wrong to_edm mapping)."""
    oracle = MixtureOracle(mixture, schedule)
    x = torch.randn(64, 2, generator=gen, dtype=D) * 2
    t = torch.rand(64, generator=gen, dtype=D) * 0.97 + 0.01

    def tweedie_eps(x_, t_):
        return -_col(schedule.sigma(t_), x_) * oracle.score(x_, t_)

    models = {
        "eps": tweedie_eps,
        "x0": oracle.x0,
        "score": oracle.score,
        "v": lambda x_, t_: from_x0_eps(
            oracle.x0(x_, t_), tweedie_eps(x_, t_), "v", schedule.alpha(t_), schedule.sigma(t_)
        ),
        "F": Preconditioned(edm_oracle(mixture, 0.5), schedule, sigma_data=0.5),
    }
    den = Denoiser(models[kind], schedule, "x0" if kind == "F" else kind)
    torch.testing.assert_close(den.x0(x, t), oracle.x0(x, t), rtol=0, atol=1e-10)
    torch.testing.assert_close(den.eps(x, t), tweedie_eps(x, t), rtol=0, atol=1e-10)


def test_edm_coefficients_unit_variance_exactly():
    """For data of variance sd^2: Var(c_in y) = c_in^2 (sd^2 + nu^2) = 1 and Var(F*) = ((1 - c_skip)^2 sd^2 +
    c_skip^2 nu^2) / c_out^2 = 1 at every nu, from the formulas (catches any wrong coefficient); and
    c_skip, c_out, c_noise at one nu against Table 1 typed out."""
    nu, sd = torch.logspace(-3, 2, 41, dtype=D), 0.37
    c_skip, c_out, c_in, c_noise = edm_coefficients(nu, sd)
    torch.testing.assert_close(c_in**2 * (sd**2 + nu**2), torch.ones_like(nu), rtol=1e-13, atol=0)
    var_target = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * nu**2) / c_out**2
    torch.testing.assert_close(var_target, torch.ones_like(nu), rtol=1e-12, atol=0)
    one = edm_coefficients(torch.tensor(2.0, dtype=D), 0.5)
    expected = (0.25 / 4.25, 2 * 0.5 / math.sqrt(4.25), 1 / math.sqrt(4.25), math.log(2) / 4)
    torch.testing.assert_close(torch.stack(one), torch.tensor(expected, dtype=D), rtol=1e-15, atol=0)


@pytest.mark.parametrize("t", [0.05, 0.4, 0.8, 0.99])
def test_edm_unit_variance_monte_carlo(t):
    """Data of std sd = 0.5 (a two-mode mixture), diffused by the cosine schedule: c_in y and the F target
    have variance 1 within 4 standard errors (catches a wrong y = x_t / alpha or nu = sigma / alpha)."""
    sd, n = 0.5, 40_000
    mix = GaussianMixture([[0.4, -0.4], [-0.4, 0.4]], stds=0.3)  # per dimension 0.4^2 + 0.3^2 = sd^2
    x0 = mix.sample(n, seeded(1), dtype=D)
    eps = torch.randn(n, 2, generator=seeded(2), dtype=D)
    tt = torch.tensor(t, dtype=D)
    alpha, sigma = COSINE.alpha(tt), COSINE.sigma(tt)
    x_t = alpha * x0 + sigma * eps
    y, nu = to_edm(x_t, alpha, sigma)
    _, _, c_in, _ = edm_coefficients(nu, sd)
    for z in (c_in * y, edm_target(x0, x_t, alpha, sigma, sd)):
        z = z.flatten()
        dev = (z - z.mean()) ** 2
        se = dev.std() / math.sqrt(z.numel())
        assert abs(dev.mean() - 1) < 4 * se, (dev.mean().item(), se.item())


def test_edm_target_turns_edm_loss_into_f_mse(gen):
    """lambda(nu) ||D - x0||^2 = ||F - F*||^2 with lambda = (nu^2 + sd^2) / (nu sd)^2 (Karras et al. 2022,
    Table 1 and eq. 8), D from Preconditioned around an arbitrary net (catches a wrong target, a wrong
    combination in the wrapper, or F evaluated at other inputs)."""
    sd = 0.5

    def net(x_in, c_noise):
        return torch.sin(3 * x_in) + c_noise[:, None]

    x0, eps = torch.randn(32, 2, generator=gen, dtype=D), torch.randn(32, 2, generator=gen, dtype=D)
    t = torch.rand(32, generator=gen, dtype=D) * 0.9 + 0.05
    alpha, sigma = COSINE.alpha(t), COSINE.sigma(t)
    x_t = _col(alpha, x0) * x0 + _col(sigma, x0) * eps
    y, nu = to_edm(x_t, alpha, sigma)
    _, _, c_in, c_noise = edm_coefficients(nu, sd)
    d = Preconditioned(net, COSINE, sd)(x_t, t)
    weight = (nu**2 + sd**2) / (nu * sd) ** 2
    f_err = ((net(_col(c_in, y) * y, c_noise) - edm_target(x0, x_t, alpha, sigma, sd)) ** 2).sum(1)
    torch.testing.assert_close(weight * ((d - x0) ** 2).sum(1), f_err, rtol=1e-11, atol=0)


def test_preconditioned_time_input_hands_the_net_t(gen):
    """time_input=True passes the schedule's t (what dmlib's MLP takes), the default passes ln(nu) / 4."""
    seen = {}

    def net(x_in, c):
        seen["c"] = c
        return torch.zeros_like(x_in)

    x, t = torch.randn(8, 2, generator=gen, dtype=D), torch.rand(8, generator=gen, dtype=D)
    Preconditioned(net, LINEAR, time_input=True)(x, t)
    torch.testing.assert_close(seen["c"], t)
    Preconditioned(net, LINEAR)(x, t)
    torch.testing.assert_close(seen["c"], torch.log(LINEAR.sigma(t) / LINEAR.alpha(t)) / 4)


def test_edm_noise_level_is_log_normal():
    """ln nu ~ N(-1.2, 1.2^2): mean and std within 4 SE; the "edm" weighting's density of lambda = -2 ln nu
    integrates to 1 (catches a forgotten factor 2 between ln nu and lambda)."""
    n = 40_000
    log_nu = edm_noise_level(torch.zeros(n, 1, dtype=D), seeded(3)).log()
    assert abs(log_nu.mean() + 1.2) < 4 * 1.2 / math.sqrt(n)
    assert abs(log_nu.std() - 1.2) < 4 * 1.2 / math.sqrt(2 * n)
    lam = torch.linspace(-30, 35, 20_001, dtype=D)
    base = loss_weight("edm", lam) / (1 + torch.exp(-lam) / 0.25)
    torch.testing.assert_close(torch.trapezoid(base, lam), torch.tensor(1.0, dtype=D), rtol=1e-9, atol=0)
    mean = torch.trapezoid(lam * base, lam)
    torch.testing.assert_close(mean, -2 * log_nu.mean(), rtol=0, atol=8 * 2.4 / math.sqrt(n))


def test_cosine_density_of_log_snr_is_sech():
    """p_t(lambda) of the cosine schedule without offset is sech(lambda / 2) / (2 pi) (derived by hand from
    abar = cos^2(pi t / 2)), so the "eps" weighting is it (catches 1 / p_t for p_t, or a lost minus sign)."""
    lam = torch.linspace(-12, 12, 49, dtype=D)
    sech = 1 / (2 * math.pi * torch.cosh(lam / 2))
    cosine0 = get_schedule("cosine", s=0.0)
    torch.testing.assert_close(log_snr_density(cosine0, lam), sech, rtol=1e-7, atol=0)
    torch.testing.assert_close(loss_weight("eps", lam, cosine0), sech, rtol=1e-7, atol=0)


def test_dsm_weightings_are_loss_weightings():
    """dmlib.score's omega(t) over time is sigma^2 w / p_t: "likelihood" is "elbo" and "sigma2" is "eps"
    (the relation both docstrings state; catches -d lambda / dt computed wrongly)."""
    t = torch.linspace(0.02, 0.98, 25, dtype=D)
    lam, var = LINEAR.log_snr(t), LINEAR.sigma(t) ** 2
    for dsm, ours in (("likelihood", "elbo"), ("sigma2", "eps")):
        omega = score.weighting(LINEAR, t, dsm)
        ratio = var * loss_weight(ours, lam, LINEAR) / log_snr_density(LINEAR, lam)
        torch.testing.assert_close(omega, ratio, rtol=1e-9, atol=0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_paper_losses_draw_for_draw(prediction, gen):
    """With the same generator, weighted_loss with t uniform is each paper's loss over 2, computed here in
    the paper's own terms: L_simple on eps, x0 and v (simple_loss), min(SNR, 5) ||x0_hat - x0||^2
    (Hang et al.), ||eps_hat - eps||^2 / (1 + SNR) (P2). Catches a wrong weight or a wrong eps_mse_factor."""
    x0 = torch.randn(256, 2, generator=gen, dtype=D)

    def model(x, t):
        return torch.sin(2 * x) * t[:, None] + 0.3

    def ours(weighting):
        return weighted_loss(COSINE, weighting, prediction=prediction)(model, x0, seeded(5))

    def theirs(per_sample_weight):  # the papers' losses: x0_hat and eps_hat through Denoiser algebra
        t = uniform_time(x0, g := seeded(5))
        noise = torch.randn(x0.shape, generator=g, dtype=D)
        a, s = COSINE.alpha(t), COSINE.sigma(t)
        x_t = _col(a, x0) * x0 + _col(s, x0) * noise
        x0_hat, eps_hat = to_x0_eps(model(x_t, t), prediction, x_t, a, s)
        return per_sample_weight(a**2 / s**2, ((x0_hat - x0) ** 2).mean(1), ((eps_hat - noise) ** 2).mean(1))

    same = dict(rtol=1e-10, atol=0)
    # weighting "eps" / "x0" / "v" is L_simple on that target (v: on a VP schedule)
    simple = simple_loss(COSINE, prediction=prediction)(model, x0, seeded(5))
    torch.testing.assert_close(ours(prediction), simple / 2, **same)
    torch.testing.assert_close(
        ours("min_snr"), theirs(lambda snr, e0, _: (snr.clamp(max=5) * e0).mean() / 2), **same
    )
    torch.testing.assert_close(ours("p2"), theirs(lambda snr, _, e: (e / (1 + snr)).mean() / 2), **same)


RANGE = (-6.0, 6.0)


@pytest.mark.parametrize("weighting", list(LOSS_WEIGHTINGS))
def test_uniform_and_importance_agree_by_quadrature(weighting):
    """Both samplings are inverse-CDF maps u -> (t, w / q), so each estimator's expectation with the exact
    per-level loss l = gaussian_mmse + 0.1 is int_0^1 (w / q) l du / 2 (midpoint rule, 20000 nodes). Both equal
    1/2 int w l dlambda (trapezoid on lambda) to 1e-5 (catches a wrong importance weight w / q, a wrong
    Delta t, or a density that is not the one sampled)."""
    reference = weighted_total(
        weighting,
        torch.linspace(*RANGE, 20_001, dtype=D),
        gaussian_mmse(torch.linspace(*RANGE, 20_001)) + 0.1,
        COSINE,
    )
    u = (torch.arange(20_000, dtype=D) + 0.5) / 20_000
    for sampling in SAMPLINGS:
        t, ratio = noise_level_sampler(COSINE, weighting, sampling, RANGE)(u)
        expectation = (ratio * (gaussian_mmse(COSINE.log_snr(t)) + 0.1)).mean() / 2
        torch.testing.assert_close(expectation, reference, rtol=1e-5, atol=0, msg=f"{weighting}, {sampling}")
    if weighting == "elbo":  # and w = 1 is the ELBO: 1/2 int mmse dlambda = I(x0; x_t) (Guo et al. 2005)
        info = 0.5 * math.log((1 + S**2 * math.exp(RANGE[1])) / (1 + S**2 * math.exp(RANGE[0])))
        torch.testing.assert_close(reference - 0.1 * (RANGE[1] - RANGE[0]) / 2, torch.tensor(info, dtype=D))


@pytest.mark.parametrize("weighting", list(LOSS_WEIGHTINGS))
def test_uniform_and_importance_agree_monte_carlo(weighting):
    """weighted_loss of a fixed model (the Gaussian's E[eps | x_t] + 0.1, per-level loss gaussian_mmse + 0.01)
    with t uniform and with importance sampling: each within 4.5 standard errors (over 24 batches of 2048)
    of 1/2 int w l dlambda (catches a loss whose expectation is not L_w)."""
    lam = torch.linspace(*RANGE, 4001, dtype=D)
    reference = weighted_total(weighting, lam, gaussian_mmse(lam) + 0.01, COSINE)
    model, g = gaussian_eps_model(COSINE, offset=0.1), seeded(7)
    x0 = torch.randn(24, 2048, 2, generator=g, dtype=D) * S
    for sampling in SAMPLINGS:
        loss = weighted_loss(COSINE, weighting, sampling=sampling, lambda_range=RANGE)
        values = torch.stack([loss(model, batch, g) for batch in x0])
        se = values.std() / math.sqrt(len(values))
        assert abs(values.mean() - reference) < 4.5 * se, (
            sampling,
            values.mean().item(),
            reference.item(),
            se.item(),
        )


def test_equivalent_density_is_normalized_and_inverts_its_cdf():
    """q = w / Z: its cells carry the trapezoid masses of w (pdf at cell midpoints equals w / Z to 1e-4),
    it integrates to 1, and quantile and the training sampler both map the CDF's knots back to the grid
    (catches a density that is not normalized, or a sampler that draws another density than pdf)."""
    q = equivalent_density("p2", RANGE, COSINE)
    mid = (q.edges[1:] + q.edges[:-1]) / 2
    torch.testing.assert_close(q.pdf(mid), loss_weight("p2", mid, COSINE) / q.normalizer, rtol=1e-4, atol=0)
    torch.testing.assert_close(
        (q.pdf(mid) * q.edges.diff()).sum(), torch.tensor(1.0, dtype=D), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(q.quantile(q.cdf[:-1]), q.edges[:-1], rtol=0, atol=1e-12)
    t, _ = noise_level_sampler(COSINE, "p2", "importance", RANGE)(q.cdf[:-1])  # what training draws
    torch.testing.assert_close(COSINE.log_snr(t), q.edges[:-1], rtol=0, atol=1e-9)
    assert q.pdf(torch.tensor([RANGE[0] - 1, RANGE[1] + 1], dtype=D)).eq(0).all()
    torch.testing.assert_close(
        torch.tensor(q.normalizer, dtype=D),
        2 * weighted_total("p2", q.edges, torch.ones_like(q.edges), COSINE),
    )


def test_irreducible_loss_of_a_gaussian():
    """For N(0, S^2 I) the irreducible eps-MSE is S^2 SNR / (1 + S^2 SNR) per dimension: matched within 4 SE
    at five levels (catches E[eps | x_t] of the wrong sign or scale); and it depends on lambda alone: cosine,
    linear and VE give the same numbers on the same draws to 1e-10 (catches a level read as a time)."""
    mix = GaussianMixture([[0.0, 0.0]], stds=S)
    lam = torch.tensor([-2.0, 0.0, 1.0, 3.0, 6.0], dtype=D)
    loss, se = irreducible_loss(mix, COSINE, lam, n=20_000, generator=seeded(9))
    assert ((loss - gaussian_mmse(lam)).abs() < 4 * se).all(), (loss, gaussian_mmse(lam), se)
    for other in (LINEAR, VE):
        torch.testing.assert_close(
            irreducible_loss(mix, other, lam, 20_000, seeded(9))[0], loss, rtol=0, atol=1e-10
        )


def test_excess_loss(mixture):
    """The oracle seen as an eps model has excess ~0 (1e-12); the oracle + 0.2 has excess 0.2^2 within 4 SE
    (catches a model and oracle compared on different draws, or a missing mean over dimensions)."""
    lam = torch.tensor([-4.0, 0.0, 4.0], dtype=D)
    oracle = MixtureOracle(mixture, COSINE)
    as_eps = Denoiser(lambda x, t: -_col(COSINE.sigma(t), x) * oracle.score(x, t), COSINE, "eps")
    excess, _ = excess_loss(as_eps, mixture, lam, n=4096, generator=seeded(10))
    torch.testing.assert_close(excess, torch.zeros_like(excess), rtol=0, atol=1e-12)
    shifted = Denoiser(lambda x, t: as_eps.eps(x, t) + 0.2, COSINE, "eps")
    excess, se = excess_loss(shifted, mixture, lam, n=4096, generator=seeded(10))
    assert ((excess - 0.04).abs() < 4 * se).all(), (excess, se)


def test_irreducible_totals_elbo_is_the_mutual_information():
    """The "elbo" floor of N(0, S^2 I) on RANGE is I(x0; x_t) between the two ends, 1/2 log((1 + S^2 e^6) /
    (1 + S^2 e^-6)) = 2.645 nats per dimension (I-MMSE, Guo et al. 2005), within 2% (Monte Carlo, n = 8192);
    the other floors equal weighted_total of the closed-form mmse within the same 2%."""
    mix = GaussianMixture([[0.0, 0.0]], stds=S)
    totals = irreducible_totals(mix, COSINE, RANGE, n=8192, generator=seeded(11))
    assert set(totals) == set(LOSS_WEIGHTINGS)
    lam = torch.linspace(*RANGE, 129, dtype=D)
    for name, total in totals.items():
        exact = float(weighted_total(name, lam, gaussian_mmse(lam), COSINE))
        assert abs(total / exact - 1) < 0.02, (name, total, exact)
    info = 0.5 * math.log((1 + S**2 * math.exp(6)) / (1 + S**2 * math.exp(-6)))
    assert abs(totals["elbo"] / info - 1) < 0.02


def test_bad_input_is_refused():
    """Unknown names, wrong parameters, sigma_data <= 0, a log-SNR outside a weighting's finite range and
    ranges that cannot be sampled: clear ValueErrors."""
    lam = torch.tensor([0.0], dtype=D)
    cases = [
        (lambda: loss_weight("snr", lam, COSINE), "unknown loss weighting 'snr'; choose one of elbo, eps"),
        (lambda: loss_weight("p2", lam, COSINE, gama=1), "takes k, gamma; got gama"),
        (lambda: loss_weight("eps", lam), "pass schedule="),
        (lambda: loss_weight("edm", lam, sigma_data=0.0), "sigma_data must be a positive number"),
        (lambda: loss_weight("min_snr", lam, COSINE, gamma=-1), "gamma must be a positive number"),
        (lambda: loss_weight("eps", torch.tensor([-25.0]), COSINE), "leaves the schedule's range"),
        (lambda: loss_weight("elbo", torch.tensor([math.inf])), "log-SNR must be finite"),
        (lambda: edm_coefficients(torch.tensor([1.0]), sigma_data=-0.5), "sigma_data must be a positive"),
        (lambda: edm_coefficients(torch.tensor([0.0, 1.0])), "nu = sigma / alpha must be positive"),
        (lambda: Preconditioned(lambda x, c: x, COSINE, sigma_data=0), "sigma_data must be a positive"),
        (lambda: edm_noise_level(torch.zeros(3, 1), p_std=0.0), "p_std must be a positive"),
        (lambda: weighted_loss(COSINE, "eps", prediction="F"), "unknown prediction type 'F'"),
        (lambda: eps_mse_factor("noise", 1.0, 1.0), "unknown prediction type 'noise'"),
        (lambda: weighted_loss(COSINE, "x0", sampling="importance"), "needs a finite lambda_range"),
        (lambda: weighted_loss(COSINE, "x0", sampling="stratified"), "unknown sampling 'stratified'"),
        (lambda: weighted_loss(COSINE, "x0", lambda_range=(3, -3)), "lo < hi"),
        (lambda: weighted_loss(VE, "elbo", lambda_range=(-5, 5)), "leaves the schedule's log-SNR range"),
        (lambda: equivalent_density("x0", (-10, 10), COSINE, n_grid=1), "n_grid must be an integer >= 2"),
        (lambda: weighted_total("elbo", [1.0, 0.0], [1.0, 1.0]), "increasing 1-D log-SNR grid"),
        (
            lambda: irreducible_loss(GaussianMixture([[0.0]], stds=1.0), COSINE, lam, n=1),
            "n must be an integer",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()


def test_meta_device():
    """edm_coefficients, Preconditioned, every loss weight and weighted_loss with both samplings (forward and
    backward) create every tensor on their inputs' device and read no value back."""
    t = torch.full((8,), 0.3, dtype=D, device="meta")
    x = torch.zeros(8, 2, dtype=D, device="meta")
    net = MLP(2, hidden=16, depth=1, time_dim=8).to(device="meta", dtype=D)
    with StrictDevices():
        outs = [*edm_coefficients(COSINE.sigma(t) / COSINE.alpha(t)), edm_noise_level(x)]
        outs += [Preconditioned(net, COSINE, time_input=True)(x, t), Preconditioned(net, VE)(x, t)]
        outs += [
            loss_weight(name, COSINE.log_snr(t), COSINE) for name in ("elbo", "min_snr", "edm")
        ]  # each base
        outs += [eps_mse_factor(kind, COSINE.alpha(t), COSINE.sigma(t)) for kind in PREDICTIONS]
        model = Preconditioned(net, COSINE, time_input=True)
        for name, sampling in [
            ("elbo", "uniform"),
            ("edm", "uniform"),
            ("v", "importance"),
            ("p2", "uniform"),
        ]:
            loss = weighted_loss(COSINE, name, prediction="x0", sampling=sampling, lambda_range=RANGE)(
                model, x
            )
            loss.backward()
            outs.append(loss)
    assert all(o.device.type == "meta" for o in outs)
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in net.parameters())
