"""dmlib.discrete against exact answers: closed forms vs products, posteriors vs Bayes by enumeration,
and every sampler and bound run with :class:`DiscreteOracle`'s exact denoiser on a 2-token distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.overrides import TorchFunctionMode

from dmlib import discrete as dd

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
LIKE = torch.empty(0, dtype=F64)
K, D = 4, 2


def data_probs(K=K, D=D, seed=0) -> torch.Tensor:
    """A fixed distribution over K^D sequences with full support (ratios stay finite at t = 0)."""
    p = 0.2 + torch.rand((K,) * D, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return p / p.sum()


def tv(a, b) -> float:
    return 0.5 * (a - b).abs().sum().item()


def on_states(p_data: torch.Tensor, n: int) -> torch.Tensor:
    """The data law as a vector over all n^D states (zero on those holding a mask)."""
    states = dd.all_states(n, D)
    out = torch.zeros(n**D, dtype=F64)
    ok = (states < K).all(1)
    out[ok] = p_data.reshape(-1)[(states[ok] * K ** torch.arange(D - 1, -1, -1)).sum(1)]
    return out


def quadrature(n=48, power=4):
    """Gauss-Legendre nodes and weights for t in (0, 1), with t = u^power to tame the log t of the
    uniform bound's integrand at t = 0."""
    u, w = np.polynomial.legendre.leggauss(n)
    u, w = (u + 1) / 2, w / 2
    return torch.tensor(u**power, dtype=F64), torch.tensor(w * power * u ** (power - 1), dtype=F64)


# ---------------------------------------------------------------------------------------------
# D3PM: matrices, closed forms, posteriors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", dd.KINDS)
def test_qbar_equals_product_of_steps(kind):
    """Closed form (uniform, absorbing) or accumulated Qbar_i = Q_1 ... Q_i, rows stochastic (catches a
    wrong abar, e.g. abar_{i-1} for abar_i, or a matrix whose rows do not sum to 1)."""
    proc = dd.D3PM(kind, 5, 20)
    Q, Qbar = proc.tables(LIKE)
    dd.check_transition_matrix(Q[1:], atol=1e-12)
    prod = torch.eye(proc.n, dtype=F64)
    for i in range(1, proc.T + 1):
        prod = prod @ Q[i]
        torch.testing.assert_close(Qbar[i], prod, rtol=0, atol=1e-12)
    if kind == "absorbing":  # the jsd schedule sends everything to the mask at T
        torch.testing.assert_close(Qbar[-1][:, -1], torch.ones(proc.n, dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", dd.KINDS)
def test_posterior_is_bayes(kind):
    """q(x_{i-1} | x_i, x_0) = Qbar_{i-1}[x0, a] Q_i[a, x_i] / Qbar_i[x0, x_i] for every (x0, x_i) pair,
    per step and with per-sample steps; and with probabilities over x0, the mixture of eq. 4."""
    proc = dd.D3PM(kind, 5, 10)
    Q, _ = proc.tables(LIKE)
    prods = [torch.eye(proc.n, dtype=F64)]
    for i in range(1, proc.T + 1):
        prods.append(prods[-1] @ Q[i])
    x0, x_t = torch.cartesian_prod(torch.arange(proc.K), torch.arange(proc.n)).unbind(1)
    x0, x_t = x0[:, None], x_t[:, None]  # D = 1, every pair
    for i in (1, 2, 7, 10):
        joint = prods[i - 1][x0[:, 0]] * Q[i][:, x_t[:, 0]].T
        possible = joint.sum(1, keepdim=True) > 0
        bayes = torch.where(possible, joint / joint.sum(1, keepdim=True).clamp_min(1e-300), 0.0)
        torch.testing.assert_close(proc.posterior(x_t, x0, i)[:, 0], bayes, rtol=0, atol=1e-12)
        steps = torch.full((len(x0),), i)
        torch.testing.assert_close(proc.posterior(x_t, x0, steps)[:, 0], bayes, rtol=0, atol=1e-12)
    # eq. 4 with a distribution over x0: the q(x_i | x0)-weighted Bayes mixture
    probs = torch.softmax(
        torch.randn(3, 1, proc.K, generator=torch.Generator().manual_seed(1), dtype=F64), -1
    )
    x_t = torch.tensor([[0], [1], [proc.n - 1]])
    i = 4
    w = probs[:, 0] * (prods[i][: proc.K, x_t[:, 0]].T > 0)
    mix = sum(w[:, k, None] * proc.posterior(x_t, torch.full_like(x_t, k), i)[:, 0] for k in range(proc.K))
    torch.testing.assert_close(
        proc.posterior(x_t, probs, i)[:, 0], mix / mix.sum(1, keepdim=True), rtol=0, atol=1e-12
    )


def test_multinomial_diffusion_is_d3pm_uniform():
    """Hoogeboom et al.'s posterior is D3PM's uniform one (catches abar_i used for abar_{i-1})."""
    proc, g = dd.D3PM("uniform", 6, 10), torch.Generator().manual_seed(0)
    x0, x_t = torch.randint(0, 6, (50, 3), generator=g), torch.randint(0, 6, (50, 3), generator=g)
    for i in (1, 4, 10):
        abar_prev = torch.prod(1 - proc.betas[: i - 1])
        ours = dd.multinomial_posterior(x_t, x0, proc.betas[i - 1], abar_prev, 6)
        torch.testing.assert_close(ours, proc.posterior(x_t, x0, i), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["uniform", "absorbing"])
def test_d3pm_reverse_chain_converges_to_data(kind):
    """The factorized reverse chain driven by the exact denoiser, propagated exactly over all n^D states,
    approaches the data as T grows (one token changes per step, where factorization is exact); the
    bound's terms and the hybrid loss are finite (catches a wrong posterior mixture or prior)."""
    oracle = dd.DiscreteOracle(data_probs())
    errors = []
    for T in (4, 16, 64):
        proc = dd.D3PM(kind, K, T)
        model, states = oracle.denoiser(proc), dd.all_states(proc.n, D)
        dist = dd.joint_from_factors(proc.prior(LIKE).expand(1, D, -1))[0]
        for i in range(T, 0, -1):
            dist = dist @ dd.joint_from_factors(proc.reverse_probs(model, states, i))
        errors.append(tv(dist, on_states(oracle.p, proc.n)))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01, errors
    x0 = dd.all_states(K, D)
    nelbo = proc.vlb_terms(model, x0, torch.Generator().manual_seed(0)).sum(1)
    assert torch.isfinite(nelbo).all() and proc.loss()(model, x0).isfinite()


# ---------------------------------------------------------------------------------------------
# Continuous time: reverse rates, bounds, samplers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uniform", "absorbing"])
def test_reverse_rate_from_denoiser_is_time_reversal(kind):
    """Campbell et al.'s Prop. 3 from the exact denoiser equals R_t(y, x) q_t(y) / q_t(x) by enumeration;
    the denoiser's concrete scores equal the oracle's ratios wherever a forward rate leads into x."""
    proc = dd.CTMC(kind, K, dd.KeepSchedule("cosine", eps=1e-2))
    oracle = dd.DiscreteOracle(data_probs())
    x = dd.all_states(proc.n, D)
    for t in (0.0625, 0.375, 0.875):  # exact in float32, the dtype the network is given t in
        exact = oracle.reverse_rates(proc, x, t)
        ours = proc.reverse_rates(oracle.denoiser(proc), x, t)
        torch.testing.assert_close(ours, exact, rtol=1e-10, atol=1e-12)
        assert (exact > 0).sum() > 0
        into = proc.rates_into(x, dd._times(t, x)) > 0
        probs = oracle.x0_probs(proc, x, t)
        scores = proc.scores(probs, x, dd._times(t, x))
        torch.testing.assert_close(scores[into], oracle.ratios(proc, x, t)[into], rtol=1e-10, atol=0)


def test_score_entropy_zero_at_truth_positive_elsewhere():
    """Score entropy with K(a) = a (log a - 1) is 0 at the exact concrete scores and > 0 for any other."""
    proc = dd.CTMC("uniform", K, dd.KeepSchedule("exponential", rate=2.0))
    oracle = dd.DiscreteOracle(data_probs())
    x = dd.all_states(K, D)
    t = dd._times(0.3, x)
    w, r = proc.rates_into(x, t), oracle.ratios(proc, x, 0.3)
    torch.testing.assert_close(dd.score_entropy(w, r, r), torch.zeros(len(x), dtype=F64), rtol=0, atol=1e-12)
    for scale in (0.9, 1.1):
        assert (dd.score_entropy(w, r * scale, r) > 1e-6).all()
    noisy = r * torch.exp(0.1 * torch.randn(r.shape, generator=torch.Generator().manual_seed(0), dtype=F64))
    assert (dd.score_entropy(w, noisy, r) > 0).all()


def _exact_expectation(proc, oracle, integrand, n_nodes=48):
    """int_0^1 E_{x_t ~ q_t(. | x0)} integrand(x0, x_t, t) dt for every x0, by enumerating x_t and quadrature."""
    x0s, xts = dd.all_states(K, D), dd.all_states(proc.n, D)
    t, wt = quadrature(n_nodes)
    x0 = x0s.repeat_interleave(len(xts) * len(t), 0)
    xt = xts.repeat_interleave(len(t), 0).repeat(len(x0s), 1)
    tt = t.repeat(len(x0s) * len(xts))
    P = proc.transition(tt, like=xt)  # q(x_t | x0) per row, factorized
    q = torch.ones(len(x0), dtype=F64)
    for d in range(D):
        q = q * P[torch.arange(len(x0)), x0[:, d], xt[:, d]]
    vals = torch.where(q > 0, q * integrand(x0, xt, tt), 0.0)
    return (vals.reshape(len(x0s), len(xts), len(t)).sum(1) * wt).sum(1)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_masked_elbo_is_exact_with_the_exact_denoiser(schedule):
    """NELBO = int_0^1 E[(-alpha' / (1 - alpha)) sum_masked -log p(x0_d | x_t)] dt = -log p(x) for every x
    (catches a missing or wrong weight, e.g. -alpha'/alpha, or loss on unmasked tokens); and it is the
    absorbing case of the general DWDSE."""
    sched = dd.KeepSchedule(schedule)
    proc, oracle = dd.CTMC("absorbing", K, sched), dd.DiscreteOracle(data_probs())
    model = oracle.denoiser(proc)
    nelbo = _exact_expectation(
        proc, oracle, lambda x0, xt, t: dd.masked_nelbo_integrand(model, x0, xt, t, K, sched)
    )
    torch.testing.assert_close(nelbo, -oracle.log_prob(dd.all_states(K, D)), rtol=0, atol=1e-6)
    x0 = dd.all_states(K, D)
    xt = dd.mask_tokens(x0, 0.5, K, sched, torch.Generator().manual_seed(0))
    t = torch.full((len(x0),), 0.5, dtype=F64)
    torch.testing.assert_close(
        dd.dwdse(proc, model, x0, xt, t),
        dd.masked_nelbo_integrand(model, x0, xt, t, K, sched),
        rtol=1e-10,
        atol=1e-12,
    )


def test_uniform_ctmc_elbo_with_the_exact_denoiser():
    """For the uniform chain with exact reverse rates, the NELBO (int DWDSE + prior KL) exceeds -log p(x0)
    by exactly E_{x_1 | x_0}[log q_1(x_1) / pi(x_1)] (the only gap: the chain starts from pi, not q_1)."""
    proc = dd.CTMC("uniform", K, dd.KeepSchedule("exponential", rate=1.5))
    oracle = dd.DiscreteOracle(data_probs())
    model = oracle.denoiser(proc)
    x0 = dd.all_states(K, D)
    integral = _exact_expectation(
        proc, oracle, lambda x0, xt, t: dd.dwdse(proc, model, x0, xt, t), n_nodes=64
    )
    nelbo = integral + dd.ctmc_prior_kl(proc, x0)
    P1 = proc.transition(torch.ones(1, dtype=F64))[0]
    q1 = oracle.marginal(proc, x0, 1.0)  # x_1 ranges over the same K^D states
    kernel = dd.joint_from_factors(P1[x0])  # q(x_1 | x_0), rows x_0
    gap = kernel @ torch.log(q1 * K**D)
    torch.testing.assert_close(nelbo, -oracle.log_prob(x0) + gap, rtol=0, atol=1e-6)


def test_tau_leaping_is_first_order_and_the_exact_sampler_is_exact():
    """From the exact q_1, tau-leaping's output law (propagated exactly) approaches the data with error
    halving as the step halves; uniformization's samples match the data up to Monte Carlo error."""
    proc = dd.CTMC("uniform", K, dd.KeepSchedule("exponential", rate=2.0))
    oracle = dd.DiscreteOracle(data_probs())
    model, states = oracle.denoiser(proc), dd.all_states(K, D)
    q1 = oracle.marginal(proc, states, 1.0)
    errors = []
    for steps in (8, 16, 32, 64):
        dist = q1
        for k in range(steps, 0, -1):
            dist = dist @ dd.joint_from_factors(
                dd.tau_leaping_probs(proc, model, states, k / steps, 1 / steps)
            )
        errors.append(tv(dist, oracle.p))
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(1.6 < r < 2.4 for r in ratios), (errors, ratios)
    g = torch.Generator().manual_seed(0)
    n = 4000
    x1 = states[dd.sample_categorical(q1, g, (n,))]
    x0 = dd.exact_sample(proc, model, x1, g, windows=16)
    counts = torch.bincount((x0 * torch.tensor([K, 1])).sum(1), minlength=K**D).double()
    assert stats.chisquare(counts.numpy(), (n * oracle.p).numpy()).pvalue > 1e-3
    x_tau = dd.tau_leaping_sample(
        proc, model, x1, 2, g
    )  # two steps: visibly off (a check that the test can fail)
    counts = torch.bincount((x_tau * torch.tensor([K, 1])).sum(1), minlength=K**D).double()
    assert stats.chisquare(counts.numpy(), (n * oracle.p).numpy()).pvalue < 1e-3


def test_masked_sampler_carries_over_and_matches_data():
    """Ancestral masked sampling with the exact denoiser: every token ends unmasked, a token once unmasked
    never changes, and with D = 2 and many steps the law is the data's."""
    sched = dd.KeepSchedule("cosine")
    proc, oracle = dd.CTMC("absorbing", K, sched), dd.DiscreteOracle(data_probs())
    seen = []

    def model(x, t):
        seen.append(x.clone())
        return oracle.denoiser(proc)(x, t)

    n = 4000
    x = dd.masked_sample(model, K, (n, D), 64, sched, torch.Generator().manual_seed(0))
    seen.append(x)
    for a, b in zip(seen, seen[1:]):
        assert ((a == K) | (a == b)).all()
    counts = torch.bincount((x * torch.tensor([K, 1])).sum(1), minlength=K**D).double()
    assert (x < K).all() and stats.chisquare(counts.numpy(), (n * oracle.p).numpy()).pvalue > 1e-3
    x = dd.masked_sample(oracle.denoiser(proc), K, (8, D), 4, sched, unmask="confidence")
    assert (x < K).all()


# ---------------------------------------------------------------------------------------------
# Categorical sampling in the tail
# ---------------------------------------------------------------------------------------------


def test_sample_categorical_exact_in_the_tail():
    """1e6 draws from [1 - 2e-4, 1e-4, then 10^4 categories of 1e-8]: the 1e-4 class and the 1e-4 tail
    mass are each hit 100 +- 10 times (binomial, 5 sigma). float32 Gumbel-max hits the tail almost never
    (e^-6 of the time): its noise cannot exceed -log(-log(1 - 2^-24)) = 16.6. It is simulated exactly at
    O(draws): the tail's best Gumbel is g(max of 10^4 float32 uniforms), and that max, on torch.rand's
    float32 grid k 2^-24, is floor(2^24 W^(1/C)) 2^-24 for a uniform W."""
    C, N = 10_000, 1_000_000
    probs = torch.cat([torch.tensor([1 - 2e-4, 1e-4], dtype=F64), torch.full((C,), 1e-8, dtype=F64)])
    g = torch.Generator().manual_seed(0)
    x = dd.sample_categorical(probs, g, (N,))
    hits_rare, hits_tail = (x == 1).sum().item(), (x >= 2).sum().item()
    assert abs(hits_rare - 100) < 50 and abs(hits_tail - 100) < 50, (hits_rare, hits_tail)

    def g32(u):
        return -torch.log(-torch.log(u))

    u_mode = torch.rand(N, generator=g)  # float32, as a float32 implementation would draw
    u_rare = torch.rand(N, generator=g)
    w = torch.rand(N, generator=g, dtype=F64)
    u_tail = (torch.floor(2.0**24 * w ** (1 / C)).clamp_max(2**24 - 1) / 2.0**24).float()
    scores = torch.stack([g32(u_mode), g32(u_rare), g32(u_tail)], 1) + torch.log(
        torch.tensor([1 - 2e-4, 1e-4, 1e-8], dtype=torch.float32)
    )
    gumbel32 = scores.argmax(1)
    assert abs((gumbel32 == 1).sum().item() - 100) < 50  # the 1e-4 class is fine in float32
    assert (gumbel32 == 2).sum().item() < 20  # the 1e-8 tail is lost
    rows = dd.sample_categorical(
        torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]], dtype=F64).expand(1000, 2, 3), g
    )
    assert (rows[:, 0] == 1).all() and (rows[:, 1] != 1).all()


# ---------------------------------------------------------------------------------------------
# Device: every public path on meta without a CPU tensor (as tests/test_device.py)
# ---------------------------------------------------------------------------------------------


class StrictDevices(TorchFunctionMode):
    """Refuse any op mixing devices (0-dim CPU tensors and moves allowed), as CUDA does; see tests/test_device.py."""

    MOVES = {"to", "type_as", "copy_", "__setitem__", "__getitem__", "index_put", "index_put_", "as_tensor"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) not in self.MOVES:
            flat = torch.utils._pytree.tree_leaves((args, kwargs))
            devices = {
                str(x.device) for x in flat if torch.is_tensor(x) and (x.ndim or x.device.type != "cpu")
            }
            if len(devices) > 1:
                raise RuntimeError(f"{getattr(func, '__name__', func)} mixes tensors on {sorted(devices)}")
        return func(*args, **kwargs)


def test_runs_on_meta():
    dev = "meta"
    x0 = torch.zeros(8, 3, dtype=torch.long, device=dev)
    out = []

    def model(x, t):
        return torch.zeros(*x.shape, K, device=x.device)

    with StrictDevices():
        out.append(dd.sample_categorical(torch.ones(8, 5, device=dev)))
        for kind in dd.KINDS:
            out.append(dd.transition_matrix(kind, torch.full((3,), 0.1, device=dev), K))
            proc = dd.D3PM(kind, K, 5)
            x_t = proc.q_sample(x0, 3)
            steps = torch.full((8,), 2, device=dev)
            out += [
                x_t,
                proc.posterior(x_t, x0, 3),
                proc.posterior(x_t, x0, steps),
                proc.reverse_probs(model, x_t, 2),
            ]
            out += [proc.vlb_terms(model, x0), proc.loss()(model, x0), proc.sample(model, (8, 3), device=dev)]
        for kind in ("uniform", "absorbing"):
            proc = dd.CTMC(kind, K)
            t = torch.full((8,), 0.5, dtype=F64, device=dev)
            x_t = proc.q_sample(x0, t)
            out += [x_t, proc.transition(t, like=x0), proc.rate_matrix(t), proc.reverse_rates(model, x_t, t)]
            out += [
                dd.dwdse(proc, model, x0, x_t, t),
                dd.ctmc_prior_kl(proc, x0),
                dd.ctmc_loss(proc)(model, x0),
            ]
            out += [
                dd.tau_leaping_probs(proc, model, x_t, 0.5, 0.1),
                dd.tau_leaping_sample(proc, model, x_t, 3),
            ]
            w = proc.rates_into(x_t, t)
            out.append(dd.score_entropy(w, w, w))
        sched = dd.KeepSchedule("cosine")
        x_t = dd.mask_tokens(x0, 0.5, K, sched)
        out += [
            x_t,
            dd.masked_nelbo_integrand(model, x0, x_t, 0.5, K, sched),
            dd.masked_loss(K, sched)(model, x0),
        ]
        for rule in ("posterior", "confidence"):
            out.append(dd.masked_sample(model, K, (8, 3), 4, sched, device=dev, unmask=rule))
        oracle = dd.DiscreteOracle(torch.ones((K,) * 3, dtype=F64, device=dev))
        for proc in (dd.CTMC("absorbing", K), dd.D3PM("uniform", K, 5)):
            out += [oracle.marginal(proc, x_t.clamp_max(proc.n - 1), 0.4), oracle.ratios(proc, x0, 0.4)]
            out += [oracle.denoiser(proc)(x0, torch.full((8,), 0.4, device=dev)), oracle.log_prob(x0)]
        out.append(oracle.reverse_rates(dd.CTMC("uniform", K), x0, 0.4))
    for x in out:
        assert x.device.type == dev


# ---------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    proc = dd.D3PM("absorbing", K, 5)
    x0 = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"tokens in 0\.\.4"):
        proc.posterior(torch.full((2, 3), K + 1), x0, 2)
    with pytest.raises(ValueError, match=r"tokens in 0\.\.3"):
        proc.q_sample(torch.full((2, 3), K), 2)  # the mask is not a data token
    with pytest.raises(ValueError, match="integer"):
        proc.q_sample(x0.float(), 2)
    bad = torch.eye(3, dtype=F64).repeat(2, 1, 1)
    bad[0, 0, 1] = 0.5
    with pytest.raises(ValueError, match="sum to 1"):
        dd.D3PM("custom", 3, 2, matrices=bad)
    bad[0, 0, 0] = 0.5
    bad[0, 0, 2] = 0.5
    bad[0, 0, 1] = -0.5
    with pytest.raises(ValueError, match="negative"):
        dd.D3PM("custom", 3, 2, matrices=bad + 0 * bad)
    with pytest.raises(ValueError, match="inside the vocabulary"):
        dd.D3PM("custom", 2, 2, matrices=torch.eye(3, dtype=F64).repeat(2, 1, 1), mask_id=1)
    with pytest.raises(ValueError, match="inside the vocabulary"):
        dd.masked_sample(lambda x, t: None, K, (2, 3), 4, mask_id=0)
    with pytest.raises(ValueError, match="too many to enumerate"):
        dd.DiscreteOracle(torch.zeros(1), K=10, D=6)
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        dd.CTMC("uniform", K).q_sample(x0, 1.5)
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        dd.mask_tokens(x0, torch.tensor([-0.1, 0.5]), K, dd.KeepSchedule())
    with pytest.raises(ValueError, match="unknown D3PM kind"):
        dd.D3PM("gaussain", K, 5)
    with pytest.raises(ValueError, match="sum to 1"):
        dd.DiscreteOracle(torch.ones(K, K))
    assert math.isfinite(proc.prior_kl(x0).sum().item())
