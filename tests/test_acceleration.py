"""dmlib.acceleration: the ELBO-optimal sub-path by dynamic programming, truncated sampling from a fitted
Gaussian prior, progressive and consistency distillation. The exact oracle of a Gaussian mixture is
the teacher throughout, so every check except the short trainings needs no network."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dmlib import acceleration as acc
from dmlib import ddpm, metrics, samplers
from dmlib.data import eight_gaussians
from dmlib.nets.mlp import MLP
from dmlib.oracle import GaussianMixture, MixtureOracle
from dmlib.parameterization import Denoiser
from dmlib.schedules import get_schedule
from dmlib.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def eight():
    sched = get_schedule("linear")
    mix = eight_gaussians()
    return mix, sched, MixtureOracle(mix, sched).denoiser()


def _seed(s):
    return torch.Generator().manual_seed(s)


def _quality(x, mix, ref):
    """(sliced W2 to fresh data, mean squared distance to the nearest mode in component variances)."""
    d2 = torch.cdist(x.double(), mix.means).min(1).values ** 2
    spread = (d2.mean() / (mix.dim * mix.covs[0, 0, 0])).item()
    return metrics.sliced_wasserstein(x, ref, n_projections=128, generator=_seed(0)), spread


# ---------------------------------------------------------------------------------------------
# dynamic programming
# ---------------------------------------------------------------------------------------------

T = 100


@pytest.fixture(scope="module")
def costs(eight):
    mix, _, den = eight
    x0 = mix.sample(1000, _seed(0), dtype=torch.float64)
    return acc.vlb_step_costs(den, x0, torch.arange(T + 1, dtype=torch.float64) / T, generator=_seed(1)), x0


def test_full_path_bound_is_ddpm_vlb(eight, costs):
    """With the same seed the T-step path's bound is exactly dmlib.ddpm.vlb_terms' sum: the jump terms,
    decoder and prior are the bound of Ho et al. (2020), eq. 5, and not some other quantity."""
    c, x0 = costs
    ref = ddpm.vlb_terms(eight[2], x0, T, generator=_seed(1)).sum(1).mean().item()
    assert acc.path_bound(c, torch.arange(T, -1, -1, dtype=torch.float64) / T) == pytest.approx(ref, rel=1e-7)


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_dp_path_beats_uniform_and_random_paths(costs, k):
    c, _ = costs
    path, bound = acc.optimal_subsequence(c, k)
    assert len(path) == k + 1 and path[0] == 1 and path[-1] == 0 and (path[1:] < path[:-1]).all()
    assert acc.path_bound(c, path) == pytest.approx(bound, rel=1e-12)
    uniform = acc.path_bound(c, torch.linspace(T, 0, k + 1).round().double() / T)
    assert bound <= uniform
    g = _seed(k)
    for _ in range(5):
        inner = torch.randperm(T - 1, generator=g)[: k - 1].sort(descending=True).values + 1
        random_path = torch.cat([torch.tensor([T]), inner, torch.tensor([0])]).double() / T
        assert bound <= acc.path_bound(c, random_path)


def test_dp_equals_brute_force_on_a_small_matrix():
    n = 6
    jump = torch.rand(n + 1, n + 1, generator=_seed(3), dtype=torch.float64) * 3
    jump = torch.where(torch.arange(n + 1)[None, :] < torch.arange(n + 1)[:, None], jump, math.inf)
    c = acc.StepCosts(torch.arange(n + 1, dtype=torch.float64) / n, jump, 0.25)
    for k in range(1, n + 1):
        brute = min(
            sum(jump[a, b].item() for a, b in itertools.pairwise((n, *inner, 0))) + 0.25
            for inner in itertools.combinations(range(n - 1, 0, -1), k - 1)
        )
        assert acc.optimal_subsequence(c, k)[1] == pytest.approx(brute, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# truncation
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three():
    """Unequal weights: a wrong prior at t_trunc could shift mass between modes."""
    return GaussianMixture([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]], stds=0.15, weights=[0.5, 0.3, 0.2])


def test_fitted_prior_matches_exact_moments(three):
    sched, t, n = get_schedule("linear"), 0.4, 40_000
    prior = acc.fit_gaussian_prior(sched, three.sample(n, _seed(0), dtype=torch.float64), t)
    a, s = sched.alpha(torch.tensor(t)).item(), sched.sigma(torch.tensor(t)).item()
    w, mu = three.weights, three.means
    mean = w @ mu
    cov = (w[:, None, None] * (three.covs + mu[:, :, None] * mu[:, None, :])).sum(0) - torch.outer(mean, mean)
    assert torch.allclose(prior.mean, a * mean, atol=5 * a * 1.5 / math.sqrt(n))
    assert torch.allclose(prior.cov, a**2 * cov + s**2 * torch.eye(2, dtype=torch.float64), atol=0.02 * a**2)


def test_truncated_sampling_reproduces_the_data(three):
    """At t_trunc = 0.5 (linear VP, alpha = 0.28) the modes sit half a noise std apart, q_t is nearly
    Gaussian, and sampling from the fitted prior loses little against starting at t = 1 (measured:
    sliced W2 0.113 vs 0.101, the floor set by 50 DDIM steps); at t_trunc = 0.1 it is far from Gaussian
    and a third of the samples land between modes (measured: 62% near a mode, W2 0.23)."""
    sched = get_schedule("linear")
    den = MixtureOracle(three, sched).denoiser()
    data, ref = (
        three.sample(20_000, _seed(0), dtype=torch.float64),
        three.sample(4000, _seed(9), dtype=torch.float64),
    )
    out = {}
    for t in (0.1, 0.5, 1.0):
        prior = acc.fit_gaussian_prior(sched, data, t)
        ts = samplers.time_grid(sched, 50, "uniform", t_max=t)
        x = acc.sample_truncated(den, prior, (4000, 2), ts, generator=_seed(3))
        out[t] = metrics.mode_coverage(x, three), _quality(x, three, ref)[0]
    cover, sw = out[0.5]
    assert cover["near"] > 0.98 and max(abs(a - b) for a, b in zip(cover["weights"], [0.5, 0.3, 0.2])) < 0.02
    assert sw < 1.2 * out[1.0][1]
    assert out[0.1][0]["near"] < 0.8 and out[0.1][1] > 1.5 * out[1.0][1]


# ---------------------------------------------------------------------------------------------
# progressive distillation
# ---------------------------------------------------------------------------------------------


def test_distillation_target_makes_one_step_equal_two(eight):
    mix, sched, den = eight
    x_t = torch.randn(256, 2, generator=_seed(0), dtype=torch.float64) * 1.3
    for t, t_mid, s in [(1.0, 0.875, 0.75), (0.5, 0.4, 0.25), (0.25, 0.125, 0.0)]:
        target = acc.distillation_target(den, x_t, t, t_mid, s)
        student = Denoiser(lambda x, tt, target=target: target, sched, prediction="x0")
        ts = torch.tensor([t, t_mid, s], dtype=torch.float64)
        two = samplers.sample_ddim(den, x_t, ts)
        one = samplers.sample_ddim(student, x_t, ts[[0, 2]])
        assert (one - two).abs().max() < 1e-6


def test_distill_runs_each_round_for_its_own_number_of_steps(eight):
    mix, _, den = eight
    rounds = acc.distill(den, MLP(2, 8, 1), mix.sample(64, _seed(0)), n_teacher_steps=8, rounds=3,
                         steps_per_round=[3, 0, 2], config=TrainConfig(steps=1, batch_size=16, progress=False))
    assert [r.n_steps for r in rounds] == [4, 2, 1]
    assert [len(r.losses) for r in rounds] == [3, 0, 2]


@pytest.mark.slow
def test_one_round_of_distillation_beats_ddim(eight):
    """Oracle teacher, 8 -> 4 steps, a fresh MLP student. Measured (1000 steps per round, 3 rounds from
    16 steps): the 4-step student reaches sliced W2 0.124 and 8 of 8 modes where 4-step DDIM of the
    teacher gives 0.336 and no mode within 3 std; the 2-step student 0.124 where DDIM gives 0.94."""
    mix, sched, den = eight
    torch.manual_seed(0)
    (r,) = acc.distill(
        den,
        MLP(2, 128, 3),
        mix.sample(20_000, _seed(0)),
        n_teacher_steps=8,
        rounds=1,
        steps_per_round=600,
        config=TrainConfig(steps=600, lr=2e-3, ema_decay=0.99, progress=False),
    )
    assert r.n_steps == 4
    x_T, ref = torch.randn(2000, 2, generator=_seed(5)), mix.sample(2000, _seed(9))
    grid = samplers.time_grid(sched, 4)
    sw_student, spread_student = _quality(
        samplers.sample_ddim(Denoiser(r.model, sched, "v"), x_T, grid), mix, ref
    )
    sw_ddim, spread_ddim = _quality(samplers.sample_ddim(den, x_T, grid), mix, ref)
    assert sw_student < 0.6 * sw_ddim and spread_student < 0.5 * spread_ddim


# ---------------------------------------------------------------------------------------------
# consistency distillation
# ---------------------------------------------------------------------------------------------


def test_consistency_boundary_condition_is_exact(eight):
    _, sched, _ = eight
    f = acc.ConsistencyFunction(MLP(2, 32, 2).double(), sched, t_min=1e-3)
    x = torch.randn(64, 2, generator=_seed(0), dtype=torch.float64)
    assert torch.equal(f(x, 1e-3), x)
    f32 = acc.ConsistencyFunction(MLP(2, 32, 2), sched, t_min=1e-3)
    assert torch.equal(f32(x.float(), torch.tensor(1e-3)), x.float())
    assert not torch.allclose(f(x, 0.5), x)


def test_consistency_loss_vanishes_for_a_one_point_grid_step(eight):
    """With t_min as the only step, the target is f(x_s, t_min) = x_s, so the loss is ||f(x_t, t) - DDIM(x_t)||^2:
    zero exactly when f is the teacher's DDIM step (a consistency function on a one-step grid)."""
    _, sched, den = eight
    ts = torch.tensor([0.3, 1e-3], dtype=torch.float64)
    net = MLP(2, 16, 1).double()
    f = acc.ConsistencyFunction(net, sched, t_min=1e-3)
    exact = lambda x, t: samplers.ddim_step(den, x, t, torch.full_like(t, 1e-3))  # noqa: E731
    x0 = eight[0].sample(128, _seed(1), dtype=torch.float64)
    loss = acc.consistency_distillation_loss(den, ts, target=f)(exact, x0, _seed(2))
    assert loss.item() < 1e-20


@pytest.mark.slow
def test_consistency_training_improves_one_step_samples(eight):
    mix, sched, den = eight
    torch.manual_seed(0)
    f = acc.ConsistencyFunction(MLP(2, 128, 3), sched, sigma_data=1.4)
    ts = samplers.time_grid(sched, 18, "edm", t_min=1e-3)
    x_T, ref = torch.randn(2000, 2, generator=_seed(5)), mix.sample(2000, _seed(9))
    one_step = torch.tensor([1.0, 0.0])
    sw_before = _quality(acc.sample_consistency(f, x_T, one_step), mix, ref)[0]
    res = train(
        f,
        mix.sample(20_000, _seed(0)),
        acc.consistency_distillation_loss(den, ts),
        TrainConfig(steps=800, lr=1e-3, ema_decay=0.99, progress=False),
    )
    assert res.losses[-100:].mean() < 0.5 * res.losses[:100].mean()
    sw_after = _quality(acc.sample_consistency(res.ema, x_T, one_step), mix, ref)[0]
    assert sw_after < 0.5 * sw_before


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(eight, costs):
    mix, sched, den = eight
    c, _ = costs
    x0 = mix.sample(8, _seed(0), dtype=torch.float64)
    with pytest.raises(ValueError, match="k must be"):
        acc.optimal_subsequence(c, T + 1)
    with pytest.raises(ValueError, match="k must be"):
        acc.optimal_subsequence(c, 0)
    with pytest.raises(ValueError, match="strictly increasing"):
        acc.vlb_step_costs(den, x0, torch.tensor([0.0, 0.5, 0.5, 1.0]))
    with pytest.raises(ValueError, match="strictly increasing"):
        acc.vlb_step_costs(den, x0, torch.tensor([0.1, 0.5, 1.0]))
    with pytest.raises(ValueError, match="variance"):
        acc.vlb_step_costs(den, x0, torch.tensor([0.0, 1.0]), variance="learned")
    with pytest.raises(ValueError, match="grid times"):
        acc.path_bound(c, torch.tensor([1.0, 0.555, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="rounds"):
        acc.distill(den, MLP(2, 8, 1), x0, n_teacher_steps=8, rounds=0, steps_per_round=1)
    with pytest.raises(ValueError, match="steps_per_round"):
        acc.distill(den, MLP(2, 8, 1), x0, n_teacher_steps=8, rounds=2, steps_per_round=[1, 1, 1])
    with pytest.raises(ValueError, match="steps_per_round"):
        acc.distill(den, MLP(2, 8, 1), x0, n_teacher_steps=8, rounds=2, steps_per_round=[1, -1])
    with pytest.raises(ValueError, match="steps_per_round"):
        acc.distill(den, MLP(2, 8, 1), x0, n_teacher_steps=8, rounds=2, steps_per_round=2.5)
    with pytest.raises(ValueError, match="halved"):
        acc.distill(den, MLP(2, 8, 1), x0, n_teacher_steps=6, rounds=2, steps_per_round=1)
    prior = acc.fit_gaussian_prior(sched, x0, 0.5)
    with pytest.raises(ValueError, match="start at the prior"):
        acc.sample_truncated(den, prior, (4, 2), samplers.time_grid(sched, 4))
    with pytest.raises(ValueError, match="t_trunc"):
        acc.fit_gaussian_prior(sched, x0, 0.0)
    f = acc.ConsistencyFunction(MLP(2, 8, 1), sched, t_min=1e-3)
    with pytest.raises(ValueError, match="t_min"):
        f(x0.float(), torch.tensor(1e-4))
    with pytest.raises(ValueError, match="t_min"):
        acc.consistency_distillation_loss(den, torch.tensor([1.0, 0.0]))(f, x0.float())
