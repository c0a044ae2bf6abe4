"""Chapter 5's exercise checks: each passes on a solution, reports a stub as not implemented, and
fails on the typical mistakes with a message that points at the fix."""

import pytest
import torch

from dmlib.exercises import (
    ExerciseFailed,
    check_d3pm_posterior,
    check_masked_nelbo,
    check_masked_sampler,
)

# --- the D3PM posterior -------------------------------------------------------------------------


def d3pm_posterior(Q_i, Qbar_prev, x_t, x0, mistake=None):
    fact1 = Q_i[x_t] if mistake == "row of Q" else Q_i.T[x_t]  # q(x_t | x_{i-1} = k) over k
    prev = Qbar_prev @ Q_i if mistake == "Qbar_i" else Qbar_prev
    out = fact1 * prev[x0]
    return out if mistake == "unnormalized" else out / out.sum(-1, keepdim=True)


# --- the masked sampler -------------------------------------------------------------------------


def masked_sampler(model, K, shape, steps, schedule, generator, mistake=None):
    x = torch.full(shape, K, dtype=torch.long)
    for k in range(steps, 0, -1):
        t = torch.full((shape[0],), k / steps, dtype=torch.float64)
        a_t, a_s = schedule.alpha(t), schedule.alpha(t - 1 / steps)
        p = ((a_s - a_t) / (1 - a_t))[:, None]
        if k == 1 and mistake == "no final step":
            break
        if k == 1 or (mistake == "all at once" and k == steps):
            p = torch.ones_like(p)
        probs = torch.softmax(model(x, t.float()).double(), -1)
        cdf = probs.cumsum(-1)
        u = torch.rand(shape + (1,), generator=generator, dtype=torch.float64)
        draw = (cdf <= u * cdf[..., -1:]).sum(-1).clamp(max=K - 1)
        go = torch.rand(shape, generator=generator, dtype=torch.float64) < p
        if mistake == "no carry-over":
            x = torch.where(go | (x != K), draw, x)
        else:
            x = torch.where((x == K) & go, draw, x)
    return x


# --- the masked NELBO estimator -----------------------------------------------------------------


def masked_nelbo(model, x0, K, schedule, generator, mistake=None):
    B = x0.shape[0]
    t = 1 - torch.rand(B, generator=generator, dtype=torch.float64)
    keep = schedule.alpha(t)
    x_t = torch.where(
        torch.rand(x0.shape, generator=generator, dtype=torch.float64) < keep[:, None],
        x0,
        torch.full_like(x0, K),
    )
    logp = torch.log_softmax(model(x_t, t.float()).double(), -1)
    nll = -logp.gather(-1, x0[..., None]).squeeze(-1)
    nll = torch.where(x_t == K, nll, torch.zeros_like(nll)).sum(1)
    weight = -schedule.dalpha(t) / (1 - keep)
    if mistake == "-alpha'/alpha":
        weight = -schedule.dalpha(t) / keep
    elif mistake == "no weight":
        weight = torch.ones_like(t)
    elif mistake == "1/t":  # the linear schedule's weight, used for every schedule
        weight = 1 / t
    return weight * nll


def _stub(*args):
    raise NotImplementedError


CHECKS = [
    (check_d3pm_posterior, d3pm_posterior, ["row of Q", "Qbar_i", "unnormalized"]),
    (check_masked_sampler, masked_sampler, ["no carry-over", "all at once", "no final step"]),
    (check_masked_nelbo, masked_nelbo, ["-alpha'/alpha", "no weight", "1/t"]),
]


@pytest.mark.parametrize("check,solution,_", CHECKS, ids=[c.__name__ for c, _, _ in CHECKS])
def test_solution_passes_and_stub_fails(check, solution, _):
    assert check(solution)
    with pytest.raises(ExerciseFailed, match="not implemented yet"):
        check(_stub)


MISTAKES = [
    (check, solution, m, match)
    for (check, solution, ms), matches in zip(
        CHECKS,
        [
            ["off by", "off by", "sum to 1"],
            ["already unmasked", "total variation", "still masked"],
            ["noisier|differs|infinite", "differs", "differs"],
        ],
    )
    for m, match in zip(ms, matches)
]


@pytest.mark.parametrize(
    "check,solution,mistake,match", MISTAKES, ids=[f"{c.__name__}-{m}" for c, _, m, _ in MISTAKES]
)
def test_typical_mistakes_fail(check, solution, mistake, match):
    with pytest.raises(ExerciseFailed, match=match):
        check(lambda *a: solution(*a, mistake=mistake))
