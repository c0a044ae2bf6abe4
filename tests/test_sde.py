"""dmlib.sde against closed forms and the exact oracle: no training anywhere."""

import math

import pytest
import torch

from dmlib import sde
from dmlib.oracle import MixtureOracle
from dmlib.schedules import get_schedule

SDES = {"vp": ("linear", {}), "ve": ("ve", {"sigma_min": 0.01, "sigma_max": 5.0}), "subvp": ("subvp", {})}


def _schedule(kind):
    name, kw = SDES[kind]
    return get_schedule(name, **kw)


def _within_mode_spread(x, mix):
    """Mean squared distance to the nearest mode in units of the component variance: 1 for the data.
    A sampler that collapses onto the modes (the ODE with g^2 instead of g^2/2) gives far less."""
    d2 = torch.cdist(x.double(), mix.means).min(1).values ** 2
    return (d2.mean() / (mix.dim * mix.covs[0, 0, 0])).item()


@pytest.mark.parametrize("kind", SDES)
def test_euler_maruyama_forward_matches_closed_form_marginal(kind, gen):
    """Simulating dx = f x dt + g dw from a point mass gives N(alpha x0, sigma^2 I) (moments);
    a wrong f or g (say g^2 = beta for sub-VP) moves the variance by far more than the tolerance."""
    sched, n = _schedule(kind), 20_000
    x0 = torch.tensor([[1.5, -0.5]], dtype=torch.float64).expand(n, 2)
    path = sde.simulate_forward(sched, x0, torch.linspace(0, 0.6, 301, dtype=torch.float64), gen)
    t = torch.tensor(0.6, dtype=torch.float64)
    a, s = sched.alpha(t).item(), sched.sigma(t).item()
    x = path[-1]
    assert (x.mean(0) - a * x0[0]).abs().max() < 5 * s / math.sqrt(n) + 2e-3
    # Euler-Maruyama's weak error is O(dt): allow 2% on top of 5 standard errors of a variance
    assert (x.var(0) / s**2 - 1).abs().max() < 5 * math.sqrt(2 / n) + 0.02


@pytest.mark.parametrize("kind", SDES)
@pytest.mark.parametrize(
    "sampler,steps,kw",
    [
        (sde.sample_euler_maruyama, 250, {}),
        (sde.sample_reverse_diffusion, 250, {}),
        (sde.sample_pc, 125, {}),
        (sde.sample_pf_ode, 60, {"method": "heun"}),
    ],
    ids=["em", "reverse_diffusion", "pc", "pf_ode"],
)
def test_samplers_with_the_exact_score_reproduce_the_data(kind, sampler, steps, kw, eight, gen):
    """Reverse SDE, PC and PF-ODE carry the prior to the data: all eight modes with the right weights,
    and the right spread inside each mode (measured about 0.9-1.05; a collapse would give < 0.5)."""
    sched = _schedule(kind)
    den = MixtureOracle(eight, sched).denoiser()
    x_T = sched.sigma(1.0).float() * torch.randn(2000, 2, generator=gen)
    # stop at t = 1e-3 before the last (Tweedie) step: from t = 1/steps, E[x0|x_t] would visibly
    # shrink each mode for VP, where sigma(t)^2 ~ 0.1 t is not small against the mode variance 0.01
    ts = torch.cat([torch.linspace(1, 1e-3, steps), torch.zeros(1)])
    x = sampler(den, x_T, ts, generator=gen, **kw)
    near = torch.cdist(x.double(), eight.means).min(1)
    counts = torch.bincount(near.indices, minlength=8) / len(x)
    assert (counts - 1 / 8).abs().max() < 0.03
    assert 0.8 < _within_mode_spread(x, eight) < 1.2


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_pf_ode_transports_the_forward_marginals(kind, mixture, gen):
    """Start from exact samples of q_1 and solve the ODE accurately: at every intermediate t the
    states are distributed as q_t. Checked by the cross-entropy E[-log q_t(x)] against that of fresh
    forward samples (within 5 standard errors) and the second moment."""
    sched, n = _schedule(kind), 2000
    oracle = MixtureOracle(mixture, sched)
    den = oracle.denoiser()

    def forward(t):
        x0 = mixture.sample(n, gen, dtype=torch.float64)
        return sched.alpha(t) * x0 + sched.sigma(t) * torch.randn(n, 2, generator=gen, dtype=torch.float64)

    times = [0.7, 0.4, 0.1]
    states, _ = sde.solve_pf_ode(den, forward(torch.tensor(1.0, dtype=torch.float64)), 1.0, 0.1, t_eval=times)
    for t, x in zip(times, states):
        fresh = forward(torch.tensor(t, dtype=torch.float64))
        ce, ce_ref = -oracle.log_prob(x, t), -oracle.log_prob(fresh, t)
        se = math.sqrt(ce.var() / n + ce_ref.var() / n)
        assert abs(ce.mean() - ce_ref.mean()) < 5 * se, f"t={t}"
        m2, m2_ref = x.pow(2).sum(1), fresh.pow(2).sum(1)
        assert abs(m2.mean() - m2_ref.mean()) < 5 * math.sqrt(m2.var() / n + m2_ref.var() / n), f"t={t}"


def test_pf_ode_drift_has_half_the_score_term(eight):
    """eq. 13 vs eq. 6: the two drifts differ by exactly g^2 score / 2."""
    sched = get_schedule("linear")
    den = MixtureOracle(eight, sched).denoiser()
    x, t = torch.randn(5, 2, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    _, g2 = sched.drift_diffusion(t)
    diff = sde.pf_ode_drift(den, x, t) - sde.reverse_drift(den, x, t)
    torch.testing.assert_close(diff, g2 / 2 * den.score(x, t))


def test_fixed_step_ode_converges_to_the_reference(eight, gen):
    """Heun's error against the RK45 reference shrinks about 4x when the steps halve (order 2)."""
    sched = get_schedule("linear")
    den = MixtureOracle(eight, sched).denoiser()
    x_T = torch.randn(50, 2, generator=gen, dtype=torch.float64)
    ref, _ = sde.solve_pf_ode(den, x_T, 1.0, 0.05, rtol=1e-9, atol=1e-9)
    errs = []
    for n in (20, 40):
        x = sde.sample_pf_ode(den, x_T, torch.linspace(1.0, 0.05, n + 1, dtype=torch.float64), method="heun")
        errs.append((x - ref).norm(dim=1).mean().item())
    assert 3.0 < errs[0] / errs[1] < 5.5


def test_pc_corrector_steps_count(eight, gen):
    """PC spends 1 + corrector_steps evaluations per step (the chapter's equal-NFE comparison relies on it)."""
    sched = get_schedule("ve", sigma_max=5.0)
    calls = []
    den = MixtureOracle(eight, sched).denoiser()
    model = den.model
    den.model = lambda x, t: calls.append(1) or model(x, t)
    sde.sample_pc(
        den, torch.randn(10, 2, generator=gen), torch.linspace(1, 0, 11), corrector_steps=2, generator=gen
    )
    # 9 steps to positive times with 3 evaluations each, then one noiseless predictor step to
    # t = 0 without a corrector (VE: sigma(0) > 0, an ordinary step; VP: Tweedie's denoising step)
    assert len(calls) == 9 * 3 + 1


def test_corrector_step_rule_belongs_to_the_books_langevin_update(gen):
    """Song et al.'s delta = 2 a (r ||z|| / ||s||)^2 with x + delta s + sqrt(2 delta) z (eq.
    eq-langevin), norms averaged over the batch. On N(0, v I) the corrector's fixed point is then
    w = v (1 + a r^2): 1.25 v for r = 0.5, a = 1. The same rule with Song & Ermon's convention
    x + (delta / 2) s + sqrt(delta) z would settle at v (1 + a r^2 / 2) = 1.125 v."""
    from types import SimpleNamespace

    v, r = 2.0, 0.5
    den = SimpleNamespace(score=lambda x, t: -x / v)
    x = v**0.5 * torch.randn(5000, 4, generator=gen, dtype=torch.float64)
    for a in (1.0, 0.5):
        y = sde.langevin_correct(den, x, 0.5, snr=r, n_steps=100, alpha_ratio=a, generator=gen)
        assert abs(y.var().item() / v - (1 + a * r**2)) < 0.04, a  # standard error about 0.011


def test_bad_inputs_are_clear_errors(eight, gen):
    sched = get_schedule("linear")
    den = MixtureOracle(eight, sched).denoiser()
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="decrease strictly"):
        sde.sample_euler_maruyama(den, x, torch.tensor([1.0, 0.5, 0.7, 0.0]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        sde.solve_pf_ode(den, x.double(), 1.5, 0.0)
    with pytest.raises(ValueError, match="must differ"):
        sde.solve_pf_ode(den, x.double(), 0.5, 0.5)
    with pytest.raises(ValueError, match="unknown predictor"):
        sde.sample_pc(den, x, torch.linspace(1, 0, 5), predictor="langevin")
    with pytest.raises(ValueError, match="unknown ODE method"):
        sde.sample_pf_ode(den, x, torch.linspace(1, 0, 5), method="rk4")
    with pytest.raises(ValueError, match="snr > 0"):
        sde.langevin_correct(den, x, 0.5, snr=0.0)
    with pytest.raises(ValueError, match="shape"):
        sde.reverse_drift(den, torch.randn(4, 3), 0.5)
