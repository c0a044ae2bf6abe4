"""ARDM (order-agnostic autoregression) as absorbing diffusion, exactly, on an enumerable space: the bound
summed over mask sets equals the sum over all orders, equals minus the masked-diffusion NELBO (mask sets
enumerated, time by quadrature) for a random time-independent model, and equals log p(x) with the true
conditionals of a known joint (:class:`dmlib.discrete.DiscreteOracle`)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from dmlib import discrete as dd

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
K = 3


def joint(D, seed=0) -> torch.Tensor:
    """A fixed law over the K^D sequences, full support."""
    p = 0.1 + torch.rand((K,) * D, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return p / p.sum()


def table_model(D, seed=1, time_dependent=False):
    """A fixed random conditional model: logits looked up from the masked sequence (a table over all (K+1)^D
    inputs); it ignores t unless ``time_dependent`` (then the logits are scaled by 1 + t)."""
    table = 2 * torch.randn((K + 1) ** D, D, K, generator=torch.Generator().manual_seed(seed), dtype=F64)
    powers = (K + 1) ** torch.arange(D - 1, -1, -1)

    def model(x, t):
        logits = table.to(x.device)[(x * powers.to(x.device)).sum(1)]
        return logits * (1 + t.to(F64))[:, None, None] if time_dependent else logits

    return model


def oracle_model(D):
    """The true conditionals p(x_k | visible) of :func:`joint`: the exact absorbing denoiser."""
    oracle = dd.DiscreteOracle(joint(D))
    return oracle, oracle.denoiser(dd.CTMC("absorbing", K, dd.KeepSchedule("linear")))


@pytest.mark.parametrize("D", [3, 4])
def test_bound_over_mask_sets_equals_sum_over_all_orders(D):
    """The combinatorial form sum_m (1/m) C(D,m)^-1 sum_{|M|=m} equals eq. 4 summed over all D! orders
    (catches a wrong weight, e.g. 1/C(D,m) without 1/m, or conditioning on the wrong set)."""
    x = dd.all_states(K, D)
    model = table_model(D)
    by_sets = dd.ardm_log_likelihood_bound(model, x, K)
    by_orders = dd.ardm_log_likelihood_bound(model, x, K, method="orders")
    torch.testing.assert_close(by_sets, by_orders, rtol=0, atol=1e-12)
    assert (by_sets < 0).all()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("D", [3, 4])
def test_ardm_bound_is_minus_the_masked_diffusion_nelbo(D, schedule):
    """For a random t-independent model, -NELBO (exact over mask sets, Gauss-Legendre in t) equals the ARDM
    bound to 1e-10 for both schedules (the 1/m weight is schedule-free); a t-dependent model breaks it by
    far more (catches a NELBO weight other than -alpha'/(1 - alpha), or an expectation over x_t that
    is not exact)."""
    x = dd.all_states(K, D)
    sched = dd.KeepSchedule(schedule)
    bound = dd.ardm_log_likelihood_bound(table_model(D), x, K)
    nelbo = dd.masked_nelbo_exact(table_model(D), x, K, sched, n_nodes=40)
    torch.testing.assert_close(-nelbo, bound, rtol=0, atol=1e-10)
    nelbo_t = dd.masked_nelbo_exact(table_model(D, time_dependent=True), x, K, sched, n_nodes=40)
    bound_t = dd.ardm_log_likelihood_bound(table_model(D, time_dependent=True), x, K)
    assert (nelbo_t + bound_t).abs().max() > 1e-2


@pytest.mark.parametrize("D", [3, 4])
def test_true_conditionals_give_the_exact_nll(D):
    """With the true conditionals both the ARDM bound and the masked NELBO are tight: log p(x) for all K^D
    sequences (catches a chain rule that loses a term, e.g. conditioning on masked tokens)."""
    oracle, model = oracle_model(D)
    x = dd.all_states(K, D)
    log_p = oracle.log_prob(x)
    torch.testing.assert_close(dd.ardm_log_likelihood_bound(model, x, K), log_p, rtol=0, atol=1e-10)
    nelbo = dd.masked_nelbo_exact(model, x, K, dd.KeepSchedule("cosine"), n_nodes=40)
    torch.testing.assert_close(nelbo, -log_p, rtol=0, atol=1e-8)


def test_ardm_loss_is_unbiased_for_the_bound():
    """The one-step estimator D/(D-t+1) sum_masked -log p averages to minus the exact bound within 4 standard
    errors (20 batches of 4000; catches a weight D/(D-t) or a non-uniform order)."""
    D = 4
    model, loss = table_model(D), dd.ardm_loss(K)
    x = dd.all_states(K, D)[torch.tensor([5, 40, 77])]
    g = torch.Generator().manual_seed(0)
    for row in x:
        batch = row.expand(4000, D)
        means = torch.tensor([loss(model, batch, g).item() for _ in range(20)], dtype=F64)
        target = -dd.ardm_log_likelihood_bound(model, row[None], K)[0]
        se = means.std() / math.sqrt(len(means))
        assert abs(means.mean() - target) < 4 * se, (means.mean().item(), target.item(), se.item())


@pytest.mark.parametrize("order", [None, [2, 0, 1]])
def test_any_order_sampler_draws_the_joint(order):
    """With the true conditionals, sampling in random or fixed order gives the joint: chi-square over the 27
    states, 20000 draws, p-value > 1e-3; the same test rejects a sampler that ignores the visible tokens
    (catches conditioning on the wrong tokens, or drawing at the wrong position)."""
    D, n = 3, 20_000
    oracle, model = oracle_model(D)
    x = dd.ardm_sample(model, K, (n, D), order=order, generator=torch.Generator().manual_seed(0))
    index = (x * K ** torch.arange(D - 1, -1, -1)).sum(1)
    counts = torch.bincount(index, minlength=K**D).double()
    assert stats.chisquare(counts.numpy(), (n * oracle.p).numpy()).pvalue > 1e-3

    def blind(x_t, t):  # the marginals p(x_k), whatever is visible
        return model(torch.full_like(x_t, K), t)

    x = dd.ardm_sample(blind, K, (n, D), order=order, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount((x * K ** torch.arange(D - 1, -1, -1)).sum(1), minlength=K**D).double()
    assert stats.chisquare(counts.numpy(), (n * oracle.p).numpy()).pvalue < 1e-6


def test_runs_on_meta():
    """Bound, NELBO, loss and sampler create every tensor on their inputs' device, reading nothing back."""
    from test_device import StrictDevices

    dev, D = "meta", 3

    def model(x, t):
        return torch.zeros(*x.shape, K, device=x.device)

    x = torch.zeros(5, D, dtype=torch.long, device=dev)
    with StrictDevices():
        out = [
            dd.ardm_log_likelihood_bound(model, x, K),
            dd.ardm_log_likelihood_bound(model, x, K, method="orders"),
            dd.masked_nelbo_exact(model, x, K, dd.KeepSchedule("cosine"), n_nodes=4),
            dd.ardm_loss(K)(model, x),
            dd.ardm_sample(model, K, (5, D), device=dev),
        ]
    assert all(o.device.type == dev for o in out)


def test_bad_inputs_raise_clear_errors():
    model = table_model(3)
    x = dd.all_states(K, 3)
    with pytest.raises(ValueError, match="unknown method"):
        dd.ardm_log_likelihood_bound(model, x, K, method="sampled")
    with pytest.raises(ValueError, match=r"tokens in 0\.\.2"):
        dd.ardm_log_likelihood_bound(model, x + 1, K)
    with pytest.raises(ValueError, match=r"logits of shape \(189, 3, 3\)"):
        dd.ardm_log_likelihood_bound(lambda x, t: torch.zeros(len(x), 3, 2), x, K)
    with pytest.raises(ValueError, match=r"needs alpha\(1\) = 0"):
        dd.masked_nelbo_exact(model, x, K, dd.KeepSchedule("linear", eps=0.01))
    with pytest.raises(ValueError, match=r"needs alpha\(1\) = 0"):
        dd.masked_nelbo_exact(model, x, K, dd.KeepSchedule("exponential"))
    with pytest.raises(ValueError, match="n_nodes must be a positive integer"):
        dd.masked_nelbo_exact(model, x, K, n_nodes=0)
    with pytest.raises(ValueError, match="permutation of 0..2"):
        dd.ardm_sample(model, K, (4, 3), order=[0, 0, 1])
    with pytest.raises(ValueError, match="D = 9 is too many"):
        dd.ardm_log_likelihood_bound(model, torch.zeros(1, 9, dtype=torch.long), K, method="orders")
