"""Fast samplers (dmlib.samplers) against exact answers: the oracle denoiser of a Gaussian mixture,
an accurate probability-flow ODE solution (scipy, tight tolerances) and each other's identities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmlib import ddpm, metrics, samplers, sde
from dmlib.data import eight_gaussians
from dmlib.oracle import MixtureOracle
from dmlib.parameterization import Denoiser
from dmlib.schedules import get_schedule

T_END = 0.02  # order tests stop here: the stiff end near t = 0 would dominate the error otherwise


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def smooth():
    """Wide components (std 0.4) keep the probability-flow ODE smooth, so errors follow the theory."""
    return eight_gaussians(std=0.4)


@pytest.fixture(scope="module")
def reference(smooth):
    """64 starting points and their ODE solution at T_END by RK45 at tolerance 1e-11 (linear VP, float64)."""
    den = MixtureOracle(smooth, get_schedule("linear")).denoiser()
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_ref, _ = sde.solve_pf_ode(den, x_T, 1.0, T_END, rtol=1e-11, atol=1e-11)
    return den, x_T, x_ref


def sw(x, y, generator=None):
    """Sliced Wasserstein with 128 directions: plenty in 2D, and sorting dominates these tests' time."""
    return metrics.sliced_wasserstein(x, y, n_projections=128, generator=generator)


def run(name, den, x_T, timesteps, **kwargs):
    spec = samplers.SAMPLERS[name]
    return spec.fn(den, x_T, timesteps, **{**spec.options, **kwargs})


def states(name, den, x_T, timesteps, **kwargs):
    seen = []
    run(name, den, x_T, timesteps, callback=lambda i, t, x: seen.append(x), **kwargs)
    return torch.stack(seen)


@pytest.mark.parametrize("schedule", ["linear", "ve", "subvp"])
def test_ddim_is_dpm_solver_1_and_edm_euler_step_for_step(schedule, smooth):
    """Three derivations of one update (DDIM eq. 12, DPM-Solver eq. 3.7, Euler in EDM form): equal states.
    Catches a log-SNR used where DPM-Solver's half log-SNR is meant, or a wrong rho or alpha."""
    den = MixtureOracle(smooth, get_schedule(schedule)).denoiser()
    x_T = (
        den.schedule.sigma(1.0).item()
        * torch.randn(32, 2, generator=torch.Generator().manual_seed(1)).double()
    )
    ts = samplers.time_grid(den.schedule, 12, "logsnr")
    ddim = states("ddim", den, x_T, ts)
    assert ddim.shape == (13, 32, 2)
    torch.testing.assert_close(states("dpm_solver_1", den, x_T, ts), ddim, atol=1e-10, rtol=0)
    torch.testing.assert_close(states("euler", den, x_T, ts), ddim, atol=1e-10, rtol=0)


def test_ddim_eta1_is_ancestral_ddpm(eight):
    """eta = 1 makes DDIM's variance the posterior's and its mean the posterior mean (Song et al. 2021,
    sec. 4.1): pathwise equal to ddpm.sample_ancestral given the same noise draws (both draw one normal
    per step, in the same order), and equal in law with independent noise."""
    den = MixtureOracle(eight, get_schedule("linear")).denoiser()
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ts = torch.linspace(1, 0, 21, dtype=torch.float64)
    a = samplers.sample_ddim(den, x_T, ts, eta=1.0, generator=torch.Generator().manual_seed(3))
    b = ddpm.sample_ancestral(den, x_T, ts, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, atol=1e-9, rtol=0)

    n, g = 2000, torch.Generator().manual_seed(4)
    ts = torch.linspace(1, 0, 51)
    a = samplers.sample_ddim(den, torch.randn(n, 2, generator=g), ts, eta=1.0, generator=g)
    b = ddpm.sample_ancestral(den, torch.randn(n, 2, generator=g), ts, generator=g)
    floor = np.mean([sw(eight.sample(n, g), eight.sample(n, g), generator=g) for _ in range(4)])
    assert sw(a, b, generator=g) < 1.5 * floor
    # second moments agree within 5 standard errors of a difference of two means
    ra, rb = a.double().pow(2).sum(1), b.double().pow(2).sum(1)
    assert abs(ra.mean() - rb.mean()) < 5 * math.sqrt(ra.var() / n + rb.var() / n)


def measured_order(name, reference, steps, **options):
    den, x_T, x_ref = reference
    errors = []
    for n in steps:
        x = run(name, den, x_T, samplers.time_grid(den.schedule, n, "logsnr", t_min=T_END), **options)
        errors.append((x - x_ref).norm(dim=1).max().item())
    nfes = [samplers.nfe(name, n, to_zero=False) for n in steps]
    slope = -np.polyfit(np.log(nfes), np.log(errors), 1)[0]
    return slope, errors


# (sampler, options, order the theory predicts, step counts in the asymptotic range)
ORDERS = [
    ("ddim", {}, 1, (16, 24, 32, 48)),
    ("euler", {}, 1, (16, 24, 32, 48)),
    ("heun", {}, 2, (16, 24, 32, 48)),
    ("dpm_solver_2", {}, 2, (16, 24, 32, 48)),
    ("dpm_solver_pp_2m", {}, 2, (16, 24, 32, 48)),
    ("dpm_solver_3", {}, 3, (16, 24, 32, 48)),
    ("deis", {"order": 2}, 2, (32, 48, 64, 96)),
    ("deis", {"order": 3}, 3, (48, 64, 96, 128)),
    # PLMS: 4th order only on steps equal in rho = sigma / alpha (see its docstring); 2nd on this grid
    ("plms", {}, 2, (24, 32, 48, 64)),
]


@pytest.mark.parametrize(
    "name,options,theory,steps", ORDERS, ids=[f"{n}{o.get('order', '')}" for n, o, *_ in ORDERS]
)
def test_convergence_order(name, options, theory, steps, reference):
    """The slope of log(error) against log(NFE) on a log-SNR-uniform grid, against the RK45 reference.
    Catches any wrong coefficient: a first-order slip turns an order-2 or order-3 method into order 1."""
    slope, errors = measured_order(name, reference, steps, **options)
    print(f"{name}{options}: measured order {slope:.2f} (theory {theory}); errors {errors}")
    assert min(errors) > 1e-7, "errors must stay far above the reference's tolerance (1e-11) for the fit"
    assert abs(slope - theory) < 0.3, f"{name}: measured order {slope:.2f}, theory {theory}"


@pytest.mark.parametrize("schedule", ["ve", "subvp"])
def test_high_order_solvers_match_the_ode_for_other_schedules(schedule, smooth):
    den = MixtureOracle(smooth, get_schedule(schedule)).denoiser()
    x_T = (
        den.schedule.sigma(1.0).item()
        * torch.randn(16, 2, generator=torch.Generator().manual_seed(5)).double()
    )
    x_ref, _ = sde.solve_pf_ode(den, x_T, 1.0, T_END, rtol=1e-10, atol=1e-10)
    ts = samplers.time_grid(den.schedule, 24, "logsnr", t_min=T_END)
    first = (run("ddim", den, x_T, ts) - x_ref).norm(dim=1).max().item()
    for name, tol in (("dpm_solver_3", 1e-3), ("dpm_solver_pp_2m", 5e-2), ("heun", 5e-2), ("deis", 5e-2)):
        err = (run(name, den, x_T, ts) - x_ref).norm(dim=1).max().item()
        assert err < min(tol, first / 3), f"{name} on {schedule}: error {err:.2e} (DDIM: {first:.2e})"


def counting_denoiser(oracle):
    calls = []

    def model(x, t):
        calls.append(1)
        return oracle.x0(x, t)

    return Denoiser(model, oracle.schedule, prediction="x0"), calls


@pytest.mark.parametrize("schedule", ["linear", "cosine", "ve", "subvp"])
def test_every_sampler_runs_with_the_same_arguments(schedule, eight):
    """One loop over SAMPLERS: finite output of the right shape, a callback for every state, and exactly
    the network evaluations that nfe() promises (grids that end at t = 0 and grids that stop short)."""
    oracle = MixtureOracle(eight, get_schedule(schedule))
    g = torch.Generator().manual_seed(6)
    x_T = oracle.schedule.sigma(1.0).item() * torch.randn(64, 2, generator=g)
    for name, spec in samplers.SAMPLERS.items():
        for t_min in (0.0,) if spec.evals_per_step is None else (0.0, 0.05):  # the adaptive one is slow
            den, calls = counting_denoiser(oracle)
            ts = samplers.time_grid(oracle.schedule, 8, spec.grid, t_min=t_min)
            seen, info = [], {}
            extra = {"info": info, "eps_rel": 0.2} if spec.evals_per_step is None else {}
            x = run(
                name,
                den,
                x_T,
                ts,
                generator=g,
                callback=lambda i, t, x, seen=seen: seen.append((i, t)),
                **extra,
            )
            assert x.shape == x_T.shape and x.dtype == x_T.dtype and torch.isfinite(x).all(), name
            assert [i for i, _ in seen] == list(range(len(seen))) and torch.all(seen[-1][1] == ts[-1]), name
            to_zero = oracle.schedule.sigma(ts[-1]).item() == 0
            if spec.evals_per_step is None:
                assert len(calls) == info["nfe"] and len(seen) == info["iterations"] + 1 + to_zero, name
            else:
                assert len(seen) == 9 and len(calls) == samplers.nfe(name, 8, to_zero=to_zero), name


def latin_hypercube_normal(n, g):
    """An N(0, I) sample in 2D stratified in angle and radius quantile: from it, a deterministic sampler
    puts almost exactly n / 8 points on each mode, so SW measures its error, not mode-count noise."""
    angle = 2 * math.pi * (torch.arange(n) + torch.rand(n, generator=g)) / n
    q = (torch.randperm(n, generator=g) + torch.rand(n, generator=g)) / n
    radius = torch.sqrt(-2 * torch.log1p(-q))
    return torch.stack([radius * angle.cos(), radius * angle.sin()], 1)


def balanced_sample(mix, n, g, std=0.1):
    """A sample of an equal-weight isotropic mixture with exactly n / K points per component."""
    k = torch.arange(n) % mix.means.shape[0]
    return (mix.means[k] + std * torch.randn(n, mix.dim, generator=g, dtype=torch.float64)).float()


def test_every_sampler_reaches_the_data(eight):
    """With ~50 evaluations every sampler must land on the data. Deterministic ones start from a stratified
    x_T and are compared with a balanced data set: SW between two balanced sets is ~0.02 and a sampler
    error of that size shows. Stochastic ones re-draw the mode counts, so they get the i.i.d. noise floor."""
    den = MixtureOracle(eight, get_schedule("linear")).denoiser()
    n, g = 1000, torch.Generator().manual_seed(7)
    floor_balanced = np.mean(
        [sw(balanced_sample(eight, n, g), balanced_sample(eight, n, g), generator=g) for _ in range(4)]
    )
    floor_iid = np.mean([sw(eight.sample(n, g), eight.sample(n, g), generator=g) for _ in range(4)])
    x_T, data = latin_hypercube_normal(n, g), balanced_sample(eight, n, g)
    for name, spec in samplers.SAMPLERS.items():
        if spec.evals_per_step is None:
            x = run(name, den, x_T, torch.tensor([1.0, 0.0]), generator=g, eps_abs=0.02)
        else:
            steps = max(k for k in range(1, 51) if samplers.nfe(name, k) <= 50)
            x = run(name, den, x_T, samplers.time_grid(den.schedule, steps, spec.grid), generator=g)
        dist = sw(x, data, generator=torch.Generator().manual_seed(0))
        stochastic = name in ("ddim_eta1", "heun_churn", "adaptive_sde")
        limit = 1.6 * floor_iid if stochastic else 2.0 * floor_balanced
        assert dist < limit and metrics.mode_coverage(x, eight)["modes"] == 8, (name, dist, limit)


def test_adaptive_solver_spends_more_for_tighter_tolerance_and_ends_exactly(eight):
    den = MixtureOracle(eight, get_schedule("linear")).denoiser()
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(8))
    nfes = []
    for eps_rel in (0.2, 0.02):
        info, times = {}, []
        samplers.sample_adaptive_sde(
            den, x_T, torch.tensor([1.0, 0.0]), eps_rel=eps_rel, eps_abs=0.02, info=info,
            generator=torch.Generator().manual_seed(9), callback=lambda i, t, x, times=times: times.append(t),
        )  # fmt: skip
        assert torch.all(times[-2] == 1e-3) and times[-1] == 0  # every sample stops at t_eps, then denoises
        assert all(torch.all(b <= a) for a, b in zip(times[:-2], times[1:-1])), "time never runs backwards"
        nfes.append(info["nfe"])
    assert nfes[1] > 1.5 * nfes[0]


def test_churn_only_inside_its_noise_window(smooth):
    den = MixtureOracle(smooth, get_schedule("linear")).denoiser()
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    ts = samplers.time_grid(den.schedule, 10, "edm")
    plain = samplers.sample_heun(den, x_T, ts)
    outside = samplers.sample_heun(den, x_T, ts, s_churn=40.0, s_tmin=1e3, s_tmax=1e4)  # no rho up there
    torch.testing.assert_close(outside, plain, atol=0, rtol=0)
    inside = samplers.sample_heun(den, x_T, ts, s_churn=40.0, s_tmin=0.05, s_tmax=50.0)
    assert (inside - plain).abs().max() > 1e-3


def test_ccdf_start_is_the_forward_marginal_and_a_short_run_reaches_the_data(eight):
    sched = get_schedule("linear")
    n, g = 2000, torch.Generator().manual_seed(11)
    x0 = torch.tensor([[1.0, -0.5]], dtype=torch.float64).expand(n, 2)
    xt = samplers.ccdf_start(sched, x0, 0.4, generator=g)
    a, s = sched.alpha(0.4).item(), sched.sigma(0.4).item()
    assert (xt.mean(0) - a * x0[0]).abs().max() < 5 * s / math.sqrt(n)
    assert (xt.var(0) - s**2).abs().max() < 5 * s**2 * math.sqrt(2 / n)
    # from a noised guess that is a data set itself, a 10-step run from t0 = 0.4 must stay on the data
    den = MixtureOracle(eight, sched).denoiser()
    start = samplers.ccdf_start(sched, eight.sample(n, g), 0.4, generator=g)
    x = samplers.sample_dpm_solver_pp_2m(den, start, samplers.time_grid(sched, 10, "logsnr", t_max=0.4))
    floor = np.mean([sw(eight.sample(n, g), eight.sample(n, g), generator=g) for _ in range(4)])
    assert sw(x, eight.sample(n, g), generator=g) < 1.5 * floor
    with pytest.raises(ValueError, match=r"t0 must lie in \(0, 1\]"):
        samplers.ccdf_start(sched, x0, 0.0)


@pytest.mark.parametrize("kind", samplers.GRIDS)
@pytest.mark.parametrize("schedule", ["linear", "cosine", "ve", "subvp"])
def test_time_grid_ends_and_monotone(kind, schedule):
    sched = get_schedule(schedule)
    for t_max, t_min in ((1.0, 0.0), (0.7, 0.05)):
        ts = samplers.time_grid(sched, 10, kind, t_max=t_max, t_min=t_min)
        assert ts.dtype == torch.float64 and ts.shape == (11,)
        assert ts[0] == t_max and ts[-1] == t_min and (ts[1:] < ts[:-1]).all()


def test_time_grid_formulas():
    sched = get_schedule("linear")
    lam = sched.log_snr(samplers.time_grid(sched, 10, "logsnr", t_min=0.01))
    torch.testing.assert_close(lam.diff(), lam.diff()[:1].expand(10), atol=1e-9, rtol=0)  # uniform in log-SNR
    # ending at sigma = 0: nine log-SNR-uniform steps down to t_eps, then a step to 0
    ts = samplers.time_grid(sched, 10, "logsnr")
    assert ts[-1] == 0 and ts[-2] == 1e-3
    torch.testing.assert_close(sched.log_snr(ts[:-1]).diff(), sched.log_snr(ts[:-1]).diff()[:1].expand(9))
    # EDM (Karras et al. 2022, eq. 5) on rho = sigma / alpha, with its sigma_N = 0 appended
    ts = samplers.time_grid(sched, 10, "edm", rho=7.0)
    rho = sched.sigma(ts) / sched.alpha(ts)
    r_max, r_min = rho[0].item(), rho[-2].item()
    i = torch.arange(10, dtype=torch.float64)
    want = (r_max ** (1 / 7) + i / 9 * (r_min ** (1 / 7) - r_max ** (1 / 7))) ** 7
    torch.testing.assert_close(rho[:-1], want, atol=0, rtol=1e-9)
    assert rho[-1] == 0 and ts[-2] == 1e-3
    torch.testing.assert_close(
        samplers.time_grid(sched, 4, "quadratic"), torch.tensor([1, 9 / 16, 1 / 4, 1 / 16, 0.0]).double()
    )


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
@pytest.mark.parametrize(
    "timesteps,match",
    [
        (torch.tensor([1.0, 0.6, 0.6, 0.3, 0.2, 0.0]), r"decrease strictly.*timesteps\[1\]=0.6"),
        (torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]), "decrease strictly"),
        (torch.tensor([1.5, 0.8, 0.6, 0.4, 0.2, 0.0]), r"must lie in \[0, 1\]"),
    ],
)
def test_bad_timesteps_rejected_by_every_sampler(name, timesteps, match, eight):
    den = MixtureOracle(eight, get_schedule("linear")).denoiser()
    with pytest.raises(ValueError, match=match):
        run(name, den, torch.zeros(3, 2), timesteps)


def test_bad_options_rejected(eight):
    sched = get_schedule("linear")
    den, x = MixtureOracle(eight, sched).denoiser(), torch.zeros(3, 2)
    ts = torch.linspace(1, 0, 4)
    cases = [
        (lambda: samplers.sample_plms(den, x, ts), "PLMS needs at least 4 steps"),
        (
            lambda: samplers.sample_deis(den, x, torch.linspace(1, 0, 3), order=3),
            "DEIS of order 3 needs at least 3",
        ),
        (lambda: samplers.sample_deis(den, x, ts, order=5), "DEIS order must be 1, 2, 3 or 4"),
        (lambda: samplers.sample_ddim(den, x, ts, eta=-0.5), "eta must be >= 0"),
        (lambda: samplers.sample_dpm_solver(den, x, ts, order=4), "order must be 1, 2 or 3"),
        (lambda: samplers.sample_heun(den, x, ts, s_churn=-1.0), "need s_churn >= 0"),
        (lambda: samplers.sample_adaptive_sde(den, x, ts, eps_rel=0, eps_abs=0), "not both 0"),
        (lambda: samplers.time_grid(sched, 10, "cubic"), "unknown time grid kind 'cubic'"),
        (lambda: samplers.time_grid(sched, 0), "n_steps must be a positive integer"),
        (lambda: samplers.time_grid(sched, 10, t_max=0.2, t_min=0.5), "need 0 <= t_min < t_max <= 1"),
        (lambda: samplers.time_grid(sched, 1, "logsnr"), "needs n_steps >= 2"),
        (lambda: samplers.nfe("rk4", 10), "unknown sampler 'rk4'"),
        (lambda: samplers.nfe("adaptive_sde", 10), "picks its own steps"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
