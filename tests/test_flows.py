"""Flow matching (dmlib.flows) against exact answers: closed forms, the Gaussian-mixture oracle, an accurate
ODE solution (scipy), finite differences and the 1D transport map."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy.integrate import solve_ivp
from test_device import StrictDevices

from dmlib import data, metrics, samplers, sde
from dmlib import flows as F
from dmlib.nets import MLP
from dmlib.oracle import GaussianMixture, MixtureOracle
from dmlib.schedules import Cosine, Linear, SubVP, VarianceExploding, get_schedule
from dmlib.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py
D = torch.float64
PATH = F.LinearPath()
ODE_SAMPLERS = [name for name in samplers.SAMPLERS if name not in F.STOCHASTIC_SAMPLERS]
# the order each ODE sampler shows on the linear path (on its own grid): the error ratio between 20 and
# 40 steps must reach 0.85 * 2^order (second order is the most any shows cleanly there)
ORDER = {"ddim": 1, "euler": 1, "dpm_solver_1": 1}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def solve_velocity(oracle, x, t_start=1.0, t_end=0.0, tol=1e-11):
    """``dx/dt = u(x, t)`` with the exact marginal velocity, by RK45 at a tight tolerance (float64)."""

    def rhs(t, y):
        xt = torch.from_numpy(y).reshape(x.shape)
        return F.marginal_velocity(oracle, xt, torch.tensor(t, dtype=D)).reshape(-1).numpy()

    sol = solve_ivp(rhs, (t_start, t_end), x.reshape(-1).numpy(), rtol=tol, atol=tol)
    assert sol.success
    return torch.from_numpy(sol.y[:, -1].copy()).reshape(x.shape)


@pytest.fixture(scope="module")
def smooth_reference():
    """64 starts and their exact ODE endpoints at t = 0 on the linear path, for wide components (std 0.4)."""
    oracle = MixtureOracle(data.eight_gaussians(std=0.4), PATH)
    x_T = torch.randn(64, 2, generator=gen(0), dtype=D)
    return oracle, x_T, solve_velocity(oracle, x_T)


# ------------------------------------------------------------------------------------------------
# The path
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_min", [0.0, 0.01])
def test_linear_path_curves_and_log_snr_inverse(sigma_min):
    """alpha = 1 - t, sigma = sigma_min + (1 - sigma_min) t exactly (floor e^-10 at t = 1), and the closed-form
    inverse of the log-SNR round-trips to 1e-12 on both branches. Catches a wrong branch or floor."""
    path = get_schedule("linear_path", sigma_min=sigma_min)
    assert isinstance(path, F.LinearPath)
    t = torch.cat([torch.linspace(0, 1, 101, dtype=D), torch.tensor([1 - 1e-5, 1 - 4e-5, 1 - 5e-5], dtype=D)])
    torch.testing.assert_close(path.alpha(t[:-3]), (1 - t[:-3]).clamp(min=F.ALPHA_MIN), atol=0, rtol=0)
    torch.testing.assert_close(path.sigma(t), sigma_min + (1 - sigma_min) * t, atol=1e-15, rtol=0)
    assert path.alpha(1.0).item() == pytest.approx(math.exp(-10))
    assert path.log_snr(1.0).item() == pytest.approx(-20 - 2 * math.log(path.sigma(1.0).item()))
    torch.testing.assert_close(path.t_from_log_snr(path.log_snr(t)), t, atol=1e-12, rtol=0)
    ends = path.t_from_log_snr(torch.tensor([math.inf, -math.inf, -60.0], dtype=D))
    assert ends.tolist() == [0, 1, 1]  # beyond lambda(1) = -20: t = 1


# ------------------------------------------------------------------------------------------------
# Every sampler runs on the linear path
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ODE_SAMPLERS)
def test_ode_samplers_converge_to_the_exact_endpoint(name, smooth_reference):
    """Every deterministic sampler, on its own grid, reaches the exact ODE endpoint (RK45 on the oracle's
    marginal velocity) within 0.3 at 40 steps and converges at its order between 20 and 40 steps. Catches a
    sampler that divides by alpha(1) = 0 or a log-SNR of -inf (NaN), or a path whose curves do not match
    the velocity (a wrong endpoint at any budget)."""
    oracle, x_T, x_ref = smooth_reference
    spec = samplers.SAMPLERS[name]
    err = {}
    for n in (20, 40):
        out = spec.fn(oracle.denoiser(), x_T, samplers.time_grid(PATH, n, spec.grid), **spec.options)
        err[n] = (out - x_ref).norm(dim=1).max().item()
    assert err[40] < 0.3, f"{name}: endpoint error {err[40]:.3g} at 40 steps"
    ratio = err[20] / err[40]
    assert ratio > 0.85 * 2 ** ORDER.get(name, 2), f"{name}: error ratio {ratio:.2f} for doubled steps"


# what each stochastic sampler should reach at 40 steps: the exact law has 98.9% of its mass within 3 std of
# a mode (1 - e^-4.5); ancestral DDIM samples it, churned Heun and the adaptive solver (eps_rel = 0.05, its
# default; 0.97 at 0.01) lose some samples between modes. Binomial standard error at N = 1000: 0.004.
NEAR = {"ddim_eta1": 0.98, "heun_churn": 0.95, "adaptive_sde": 0.9}


@pytest.mark.parametrize("name", F.STOCHASTIC_SAMPLERS)
def test_stochastic_samplers_reach_the_data_law(name):
    """With the oracle of eight narrow Gaussians, each stochastic sampler puts its share of 1000 samples
    within 3 std of a mode and covers all eight. Catches a sampler that cannot start at alpha(1) ~ 0 or an
    SDE whose (f, g^2) do not match the path (samples scattered between the modes)."""
    mixture = data.eight_gaussians()
    spec = samplers.SAMPLERS[name]
    x_T = torch.randn(1000, 2, generator=gen(0), dtype=D)
    den = MixtureOracle(mixture, PATH).denoiser()
    out = spec.fn(den, x_T, samplers.time_grid(PATH, 40, spec.grid), generator=gen(1), **spec.options)
    cover = metrics.mode_coverage(out, mixture)
    assert cover["modes"] == 8 and cover["near"] >= NEAR[name], f"{name}: {cover}"


def test_ddim_on_the_linear_path_is_euler_on_the_velocity(smooth_reference):
    """On x_t = (1 - t) x0 + t eps, a DDIM step is x_s = x_t + (s - t) u(x_t, t), Euler's method on the
    rectified flow (Liu et al. 2023): equal step for step (1e-12). Catches a velocity with the wrong sign
    or time convention."""
    oracle, x_T, _ = smooth_reference
    ts = torch.linspace(0.999, 0, 13, dtype=D)  # from below the floor of alpha, where the path is the line
    states = []
    samplers.sample_ddim(oracle.denoiser(), x_T, ts, callback=lambda i, t, x: states.append(x))
    x = x_T
    for i in range(len(ts) - 1):
        x = x + (ts[i + 1] - ts[i]) * F.marginal_velocity(oracle, x, ts[i])
        torch.testing.assert_close(states[i + 1], x, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------
# The velocity and its conversions
# ------------------------------------------------------------------------------------------------

SCHEDULES = {
    "linear_path": PATH,
    "linear_path sigma_min": F.LinearPath(0.01),
    "vp linear": Linear(),
    "cosine": Cosine(),
    "ve": VarianceExploding(),
    "subvp": SubVP(),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_marginal_velocity_is_the_probability_flow_drift(name, mixture):
    """u = alpha' E[x0|x] + sigma' E[eps|x] equals f x - g^2 score / 2 of the same path (Song et al. 2021,
    eq. 13) to 1e-10 (float64): the velocity's derivatives (closed form or autograd) against the SDE's
    (f, g^2) (autograd or printed closed forms). Catches a wrong derivative or a sign in either."""
    oracle = MixtureOracle(mixture, SCHEDULES[name])
    x = 2 * torch.randn(200, 2, generator=gen(1), dtype=D)
    for t in (0.01, 0.3, 0.5, 0.9, 0.99):
        u = F.marginal_velocity(oracle, x, t)
        drift = sde.pf_ode_drift(oracle.denoiser(), x, t)
        torch.testing.assert_close(u, drift, atol=1e-10, rtol=1e-10)
    t = torch.rand(200, generator=gen(2), dtype=D) * 0.98 + 0.01  # one time per sample
    torch.testing.assert_close(
        F.marginal_velocity(oracle, x, t),
        F.denoiser_velocity(oracle.denoiser(), x, t),
        atol=1e-10,
        rtol=1e-10,
    )


def test_marginal_velocity_at_the_data_end(mixture):
    """At t = 0, E[x0|x] = x and E[eps|x] = 0 (eps is independent of x0): u(x, 0) = -x on the linear path,
    finite although sigma = 0. Catches computing E[eps|x] as (x - alpha x0) / sigma (0/0 = NaN)."""
    x = torch.randn(50, 2, generator=gen(3), dtype=D)
    torch.testing.assert_close(
        F.marginal_velocity(MixtureOracle(mixture, PATH), x, 0.0), -x, atol=1e-14, rtol=0
    )


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_velocity_round_trips_and_is_the_time_derivative(name):
    """u = alpha' x0 + sigma' eps is d x_t / dt (central differences, 1e-7), and (u, x_t) give back
    (x0, eps) (1e-9) and the score -eps / sigma. Catches a wrong derivative or a wrong 2x2 solve."""
    sched = SCHEDULES[name]
    x0, eps = torch.randn(2, 64, 3, generator=gen(4), dtype=D)
    t = torch.rand(64, generator=gen(5), dtype=D) * 0.9 + 0.05

    def x_at(s):
        return sched.alpha(s)[:, None] * x0 + sched.sigma(s)[:, None] * eps

    u = F.velocity_from_x0_eps(sched, x0, eps, t)
    h = 1e-5
    torch.testing.assert_close(u, (x_at(t + h) - x_at(t - h)) / (2 * h), atol=1e-7, rtol=1e-7)
    x0_back, eps_back = F.velocity_to_x0_eps(sched, u, x_at(t), t)
    torch.testing.assert_close(x0_back, x0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(eps_back, eps, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(F.velocity_to_score(sched, u, x_at(t), t), -eps / sched.sigma(t)[:, None])


def test_linear_path_conversions_are_exact_at_both_ends():
    """With sigma_min = 0, x0 = x_t - t u and eps = x_t + (1 - t) u (det = alpha + sigma = 1 on the line), and
    the round trip is exact at t = 0 and at t = 1 too (where the floor makes det = 1 + e^-10). Catches a
    conversion through 1 / alpha, which is 2e4 at t = 1."""
    x0, eps = torch.randn(2, 32, 2, generator=gen(6), dtype=D)
    for t in (0.0, 0.25, 1.0):
        x_t = PATH.alpha(t) * x0 + PATH.sigma(t) * eps
        u = F.velocity_from_x0_eps(PATH, x0, eps, t)
        torch.testing.assert_close(u, eps - x0, atol=0, rtol=0)
        x0_back, eps_back = F.velocity_to_x0_eps(PATH, u, x_t, t)
        torch.testing.assert_close(x0_back, x0, atol=1e-14, rtol=0)
        torch.testing.assert_close(eps_back, eps, atol=1e-14, rtol=0)
        if t < 1:
            torch.testing.assert_close(x0_back, x_t - t * u, atol=1e-15, rtol=0)
            torch.testing.assert_close(eps_back, x_t + (1 - t) * u, atol=1e-15, rtol=0)


def test_velocity_denoiser_of_the_exact_velocity_is_the_oracle(mixture):
    """A velocity model that returns the exact marginal velocity, wrapped by velocity_denoiser, gives the
    oracle's E[x0|x_t] (1e-10) and the same samples. Catches a wrong u -> x0 conversion in the wrapper."""
    oracle = MixtureOracle(mixture, PATH)
    den = F.velocity_denoiser(lambda x, t: F.marginal_velocity(oracle, x, t), PATH)
    x = torch.randn(100, 2, generator=gen(7), dtype=D)
    for t in (0.05, 0.5, 1.0):
        torch.testing.assert_close(den.x0(x, t), oracle.x0(x, t), atol=1e-10, rtol=1e-10)
    ts = samplers.time_grid(PATH, 10, "uniform")
    torch.testing.assert_close(
        samplers.sample_plms(den, x, ts), samplers.sample_plms(oracle.denoiser(), x, ts), atol=1e-9, rtol=0
    )


# ------------------------------------------------------------------------------------------------
# The conditional flow-matching loss and the OT coupling
# ------------------------------------------------------------------------------------------------


def test_cfm_loss_is_zero_for_the_exact_velocity_of_a_point_mass():
    """Data = one point mu: the target -mu + eps is (x_t - mu) / t, which a model can return exactly, so the
    loss is 0 (1e-20). Catches a target with the wrong sign, the noise-at-0 convention or x_t mixed up."""
    mu = torch.tensor([1.5, -0.5], dtype=D)
    loss = F.cfm_loss(PATH)(lambda x, t: (x - mu) / t[:, None], mu.expand(512, 2), gen(8))
    assert loss.item() < 1e-20


def test_cfm_loss_is_minimized_by_the_marginal_velocity(mixture):
    """Lipman et al. (2023), Theorem 2: the CFM loss is ||model - u||^2 + const with u the marginal velocity,
    so shifting the exact u by c raises the loss by mean(c^2) (same draws; the cross term 2 c.E[u - target]
    has mean 0, checked to 4 standard errors). Catches a marginal velocity that is not E[target | x_t]."""
    oracle = MixtureOracle(mixture, PATH)
    x0 = mixture.sample(20_000, gen(9), dtype=D)
    c = torch.tensor([0.3, -0.2], dtype=D)
    loss = F.cfm_loss(PATH)
    exact = loss(lambda x, t: F.marginal_velocity(oracle, x, t), x0, gen(10))
    shifted = loss(lambda x, t: F.marginal_velocity(oracle, x, t) + c, x0, gen(10))
    # the same draws as the loss (noise, then times) give the residuals u - target, and so the standard error
    g = gen(10)
    eps = torch.randn(x0.shape, generator=g, dtype=D)
    t = 1 - torch.rand(x0.shape[0], generator=g, dtype=D)
    x_t = PATH.alpha(t)[:, None] * x0 + PATH.sigma(t)[:, None] * eps
    resid = F.marginal_velocity(oracle, x_t, t) - (eps - x0)
    assert exact.item() == pytest.approx((resid**2).mean().item(), rel=1e-12)
    se = (2 * c * resid).mean(1).std().item() / math.sqrt(x0.shape[0])
    assert abs(shifted.item() - exact.item() - (c**2).mean().item()) < 4 * se


def test_ot_coupling_in_1d_is_sorting():
    """In 1D the optimal pairing for squared cost matches order statistics (sort both). Catches a coupling
    that maximizes instead, or pairs by index."""
    x0, eps = torch.randn(2, 300, 1, generator=gen(11), dtype=D)
    paired_x0, paired_eps = F.ot_coupling(x0, eps)
    assert torch.equal(paired_x0, x0)
    order = x0[:, 0].argsort()
    assert torch.equal(paired_eps[order, 0], eps[:, 0].sort().values)


def test_ot_coupling_is_optimal():
    """The cost never exceeds the identity pairing's (20 random 2D batches), and for 6 points it equals the
    best of all 720 permutations. Catches a plan that is feasible but not optimal."""
    for seed in range(20):
        x0, eps = torch.randn(2, 64, 2, generator=gen(100 + seed), dtype=D)
        _, paired = F.ot_coupling(x0, eps)
        assert ((x0 - paired) ** 2).sum() <= ((x0 - eps) ** 2).sum()
        assert torch.equal(paired.sort(0).values, eps.sort(0).values)  # a permutation of eps
    x0, eps = torch.randn(2, 6, 2, generator=gen(12), dtype=D)
    best = min(((x0 - eps[list(p)]) ** 2).sum().item() for p in itertools.permutations(range(6)))
    assert ((x0 - F.ot_coupling(x0, eps)[1]) ** 2).sum().item() == pytest.approx(best, rel=1e-14)


def test_cfm_loss_couplings():
    """Data at the point 2 in 1D and a zero model: the target is eps - 2 whatever the pairing (a coupling
    permutes or reflects eps, keeping its law), so the loss is E(eps - 2)^2 = 5 for the independent, OT and
    a callable coupling (to 3 standard errors, Var = 2 + 16). "pairs" reads (x0, eps) from the batch: with
    eps = x0 the target is 0. Catches a coupling that drops or duplicates noise, or pairs read in the
    wrong order."""
    x0 = torch.full((500, 1), 2.0, dtype=D)

    def zero(x, t):
        return torch.zeros_like(x)

    for coupling in (None, "independent", "ot", lambda a, b: (a, -b)):
        loss = F.cfm_loss(PATH, coupling)(zero, x0, gen(13)).item()
        assert abs(loss - 5) < 3 * math.sqrt(2 + 16) / math.sqrt(500), coupling
    pairs = torch.stack([x0, x0], 1)
    assert F.cfm_loss(PATH, "pairs")(zero, pairs, gen(14)).item() == 0


# ------------------------------------------------------------------------------------------------
# The 1D monotone map
# ------------------------------------------------------------------------------------------------


def test_pf_map_in_1d_is_the_monotone_transport_map():
    """In 1D the ODE with the exact velocity, from z at t = 1 to t = 0, is F^{-1}(Phi(z)) with F the data CDF
    (measured to 1.4e-8; asserted to 1e-6), and from any t0 it is F^{-1}(F_t0(x)) with F_t0 the CDF of q_t0
    (1e-9). Catches a velocity that transports the wrong law, or a map that is not monotone."""
    mixture = GaussianMixture([[-2.0], [0.5], [3.0]], stds=[0.3, 0.6, 0.4], weights=[0.3, 0.5, 0.2])
    oracle = MixtureOracle(mixture, PATH)
    z = torch.linspace(-2.5, 2.5, 11, dtype=D)[:, None]
    mapped = F.monotone_map_1d(mixture, z)
    assert (mapped.diff(dim=0) > 0).all()
    torch.testing.assert_close(F.mixture_cdf_1d(mixture, mapped), torch.special.ndtr(z), atol=1e-13, rtol=0)
    assert (solve_velocity(oracle, z, tol=1e-12) - mapped).abs().max().item() < 1e-6
    t0 = 0.9  # q_t0 = sum_k w_k N(alpha mu_k, alpha^2 s_k^2 + sigma^2)
    a, sig = 1 - t0, t0
    mu, s, w = mixture.means[:, 0], mixture.covs[:, 0, 0].sqrt(), mixture.weights
    x = 1.5 * z
    p = (w * torch.special.ndtr((x - a * mu) / (a**2 * s**2 + sig**2).sqrt())).sum(-1, keepdim=True)
    flowed = solve_velocity(oracle, x, t_start=t0, tol=1e-12)
    assert (flowed - F.monotone_map_1d(mixture, torch.special.ndtri(p))).abs().max().item() < 1e-9


# ------------------------------------------------------------------------------------------------
# Rectified flow: straightness and reflow
# ------------------------------------------------------------------------------------------------


def test_straightness_is_zero_for_a_point_mass():
    """Data = one point: every path x_t = (1 - t) mu + t z is straight, so S = 0 up to the floor alpha(1) =
    e^-10 (S <= alpha_min^2 |mu|^2 = 1e-8), and one DDIM step lands exactly on mu. Catches a straightness
    that is not zero for straight paths (e.g. displacement of the wrong sign)."""
    mu = torch.tensor([[1.0, -2.0]], dtype=D)
    den = MixtureOracle(GaussianMixture(mu, torch.zeros(1, 2, 2, dtype=D)), PATH).denoiser()
    noise = torch.randn(16, 2, generator=gen(15), dtype=D)
    s = F.straightness(den, noise, samplers.time_grid(PATH, 10, "uniform")).item()
    assert 0 <= s <= F.ALPHA_MIN**2 * 5
    one_step = samplers.sample_ddim(den, noise, torch.tensor([1.0, 0.0], dtype=D))
    torch.testing.assert_close(one_step, mu.expand(16, 2), atol=0, rtol=0)


def test_straightness_of_a_gaussian_has_its_closed_form():
    """Data N(0, 1) in 1D: Z_t = std(t) z with std(t)^2 = (1 - t)^2 + t^2, Z_1 = Z_0, so S = z^2 int std'^2 dt
    = z^2 (2 - pi/2) exactly; with PLMS on 200 steps, to 1e-4 (relative). Catches a wrong quadrature weight
    or a velocity evaluated off the trajectory."""
    den = MixtureOracle(GaussianMixture([[0.0]], stds=1.0), PATH).denoiser()
    z = torch.linspace(-2, 2, 9, dtype=D)[:, None]
    s = F.straightness(den, z, samplers.time_grid(PATH, 200, "uniform")).item()
    assert s == pytest.approx((z**2).mean().item() * (2 - math.pi / 2), rel=1e-4)


def test_reflow_straightens_the_flow():
    """One reflow (Liu et al. 2023, sec. 2.2): an MLP trained for 1000 steps with cfm_loss on 4000 (x0, eps)
    pairs from the exact ODE of eight Gaussians has straightness below 1/10 of the exact independent-coupling
    flow's (measured: 1.5 -> ~0.01), and its one Euler step lands within 1/4 of the exact flow's one-step
    error from the exact ODE endpoint (measured: 2.0 -> ~0.2). Catches pairs that are not the ODE's
    coupling, or a loss that does not learn from them."""
    mixture = data.eight_gaussians()
    den = MixtureOracle(mixture, PATH).denoiser()
    x0, eps = F.reflow_pairs(den, torch.randn(4000, 2, generator=gen(16)), sampler="dpm_solver_3", n_steps=10)
    torch.manual_seed(0)
    result = train(
        MLP(2, hidden=64, depth=3),
        torch.stack([x0, eps], 1),
        F.cfm_loss(PATH, "pairs"),
        TrainConfig(steps=1000, batch_size=256, lr=2e-3, ema_decay=0.99, progress=False, device="cpu"),
    )
    reflowed = F.velocity_denoiser(result.ema.double(), PATH)
    noise = torch.randn(500, 2, generator=gen(17), dtype=D)
    grid = samplers.time_grid(PATH, 100, "uniform")
    before, after = F.straightness(den, noise, grid).item(), F.straightness(reflowed, noise, grid).item()
    assert after < before / 10, (before, after)
    target, _ = F.reflow_pairs(den, noise, sampler="dpm_solver_3", n_steps=40)
    one = torch.tensor([1.0, 0.0], dtype=D)
    err_before = (samplers.sample_ddim(den, noise, one) - target).norm(dim=1).mean().item()
    err_after = (samplers.sample_ddim(reflowed, noise, one) - target).norm(dim=1).mean().item()
    assert err_after < err_before / 4, (err_before, err_after)


# ------------------------------------------------------------------------------------------------
# Stochastic interpolants
# ------------------------------------------------------------------------------------------------


def test_linear_interpolant_is_the_linear_path():
    """alpha = 1 - t, beta = t, gamma = 0 with x1 = eps gives the linear path's x_t and velocity (1e-15), and
    its Gaussian schedule is the path's curves. Catches swapped ends (x1 at t = 0)."""
    interp = F.StochasticInterpolant.linear()
    x0, eps, z = torch.randn(3, 40, 2, generator=gen(18), dtype=D)
    t = torch.rand(40, generator=gen(19), dtype=D)
    x_t = PATH.alpha(t)[:, None] * x0 + PATH.sigma(t)[:, None] * eps
    torch.testing.assert_close(interp.sample(x0, eps, t, z), x_t, atol=1e-15, rtol=0)
    torch.testing.assert_close(interp.velocity(x0, eps, z, t), F.velocity_from_x0_eps(PATH, x0, eps, t))
    sched, grid = interp.gaussian_schedule(), torch.linspace(0, 0.999, 50, dtype=D)
    torch.testing.assert_close(sched.alpha(grid), PATH.alpha(grid), atol=1e-15, rtol=0)
    torch.testing.assert_close(sched.sigma(grid), PATH.sigma(grid), atol=1e-15, rtol=0)
    from_path = F.StochasticInterpolant.from_schedule(PATH)
    torch.testing.assert_close(from_path.sample(x0, eps, t, z), x_t, atol=1e-15, rtol=0)


def test_stochastic_interpolant_with_noise():
    """gamma(t) = sqrt(2 t (1 - t)) (Albergo et al. 2023): the velocity is d x_t / dt (central differences,
    1e-7), and with Gaussian x1 the marginal is the diffusion alpha, sqrt(beta^2 + gamma^2) (variance
    checked to 4 standard errors). Catches a missing gamma' z term or a wrong Gaussian schedule."""
    interp = F.StochasticInterpolant(lambda t: 1 - t, lambda t: t, lambda t: (2 * t * (1 - t)).sqrt())
    x0, x1, z = torch.randn(3, 40, 2, generator=gen(20), dtype=D)
    t, h = torch.rand(40, generator=gen(21), dtype=D) * 0.8 + 0.1, 1e-5
    fd = (interp.sample(x0, x1, t + h, z) - interp.sample(x0, x1, t - h, z)) / (2 * h)
    torch.testing.assert_close(interp.velocity(x0, x1, z, t), fd, atol=1e-7, rtol=1e-7)
    n, t_half = 40_000, 0.5
    x1 = torch.randn(n, 1, generator=gen(22), dtype=D)
    x_t = interp.sample(torch.zeros(n, 1, dtype=D), x1, t_half, generator=gen(23))
    var = interp.gaussian_schedule().sigma(t_half).item() ** 2  # 0.25 + 0.5
    assert var == pytest.approx(0.75)
    assert abs(x_t.var().item() - var) < 4 * var * math.sqrt(2 / n)


def test_interpolant_schedule_samples_from_t_one():
    """The Gaussian schedule of an interpolant floors alpha(1) = 0 as LinearPath does, so a sampler stepping in
    sigma / alpha (PLMS) starts at t = 1 and gives finite samples matching the linear path's. Catches an
    unfloored alpha (NaN from the first step)."""
    sched = F.StochasticInterpolant.linear().gaussian_schedule()
    assert sched.alpha(torch.tensor(1.0, dtype=D)).item() == F.ALPHA_MIN
    mix = data.eight_gaussians(std=0.4)
    oracle = MixtureOracle(mix, sched)
    x_T = torch.randn(64, 2, generator=gen(24), dtype=D)
    spec = samplers.SAMPLERS["plms"]
    out = spec.fn(oracle.denoiser(), x_T, samplers.time_grid(sched, 20, spec.grid), **spec.options)
    ref = spec.fn(MixtureOracle(mix, PATH).denoiser(), x_T, samplers.time_grid(PATH, 20, spec.grid))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-8, rtol=0)


def test_interpolant_boundary_conditions():
    """Def. 2.1's boundary conditions are enforced with a message naming the end that fails: a VP schedule
    (alpha(1) = 0.0066) is not an exact bridge to noise, nor is VE (alpha = 1); gamma must vanish at the
    ends and be >= 0. Catches a check that lets a wrong bridge through."""
    with pytest.raises(ValueError, match=r"alpha\(1\) = 0"):
        F.StochasticInterpolant.from_schedule(Linear())
    with pytest.raises(ValueError, match=r"alpha\(1\) = 0"):
        F.StochasticInterpolant.from_schedule(VarianceExploding())
    with pytest.raises(ValueError, match=r"gamma\(1\) = 0"):
        F.StochasticInterpolant(lambda t: 1 - t, lambda t: t, lambda t: t)
    with pytest.raises(ValueError, match=r"beta\(1\) = 1"):
        F.StochasticInterpolant(lambda t: 1 - t, lambda t: t / 2)
    with pytest.raises(ValueError, match=">= 0"):
        F.StochasticInterpolant(lambda t: 1 - t, lambda t: t, lambda t: -t * (1 - t))


# ------------------------------------------------------------------------------------------------
# Bad input and devices
# ------------------------------------------------------------------------------------------------


def test_bad_input_gets_clear_errors(mixture):
    """Times outside [0, 1], mismatched shapes, unknown names and stochastic samplers for the ODE: each a
    ValueError that says what was wrong."""
    oracle = MixtureOracle(mixture, PATH)
    x = torch.randn(8, 2, dtype=D)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        F.velocity_from_x0_eps(PATH, x, x, 1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        F.marginal_velocity(oracle, x, torch.full((8,), -0.1, dtype=D))
    with pytest.raises(ValueError, match="same shape"):
        F.velocity_from_x0_eps(PATH, x, x[:4], 0.5)
    with pytest.raises(ValueError, match="same shape"):
        F.velocity_to_x0_eps(PATH, x[:, :1], x, 0.5)
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        F.velocity_from_x0_eps(PATH, x, x, torch.full((9,), 0.5, dtype=D))
    with pytest.raises(ValueError, match="equal size"):
        F.ot_coupling(x, x[:5])
    with pytest.raises(ValueError, match="batch axis"):
        F.ot_coupling(x[0], x[0])
    with pytest.raises(ValueError, match="unknown coupling 'sinkhorn'"):
        F.cfm_loss(PATH, "sinkhorn")
    with pytest.raises(ValueError, match=r"\(B, 2, \.\.\.\)"):
        F.cfm_loss(PATH, "pairs")(lambda a, t: a, x, gen())
    with pytest.raises(ValueError, match="coupling's x0 and eps"):
        F.cfm_loss(PATH, lambda a, b: (a, b[:4]))(lambda a, t: a, x, gen())
    with pytest.raises(ValueError, match="draws noise"):
        F.reflow_pairs(oracle.denoiser(), x, sampler="adaptive_sde")
    with pytest.raises(ValueError, match="unknown sampler"):
        F.straightness(oracle.denoiser(), x, samplers.time_grid(PATH, 4), sampler="rk4")
    with pytest.raises(ValueError, match="from 1 to 0"):
        F.straightness(oracle.denoiser(), x, torch.linspace(1, 0.1, 5, dtype=D))
    with pytest.raises(ValueError, match="sigma_min"):
        F.LinearPath(sigma_min=1.0)
    with pytest.raises(ValueError, match="1D mixtures"):
        F.monotone_map_1d(mixture, x[:, 0])
    with pytest.raises(ValueError, match="velocity model must return"):
        F.velocity_denoiser(lambda a, t: a[:, :1], PATH).x0(x, 0.5)
    with pytest.raises(ValueError, match="linear_path"):
        get_schedule("rectified")


@pytest.mark.parametrize("sched", [PATH, Cosine()], ids=["linear_path", "cosine (autograd derivatives)"])
def test_meta_device(sched, mixture):
    """The path, the conversions, the marginal velocity and cfm_loss (forward and backward) create every
    tensor on their inputs' device and read no value back (the OT coupling goes through the CPU by design,
    and is not run here)."""
    x = torch.zeros(16, 2, dtype=D, device="meta")
    t = torch.full((16,), 0.5, dtype=D, device="meta")
    oracle = MixtureOracle(mixture.to("meta"), sched)
    model = MLP(2, hidden=16, depth=1).to("meta")
    with StrictDevices():
        u = F.velocity_from_x0_eps(sched, x, x, t)
        outs = [
            sched.alpha(t),
            sched.sigma(t),
            sched.log_snr(t),
            *F.curve_derivatives(sched, t),
            u,
            *F.velocity_to_x0_eps(sched, u, x, t),
            F.velocity_to_score(sched, u, x, 0.5),
            F.marginal_velocity(oracle, x, t),
            F.marginal_velocity(oracle, x, 0.5),
            F.velocity_denoiser(lambda a, s: F.marginal_velocity(oracle, a, s), sched).x0(x, t),
        ]
        loss = F.cfm_loss(sched)(model, x.float())
        loss.backward()
    assert all(o.device.type == "meta" for o in [*outs, loss])
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())
