"""Exercises of Chapter 5 (diffusion on discrete data).

Each check measures behaviour on a small enumerable distribution, where the exact answer is known:
the D3PM posterior against Bayes' rule by enumeration, a masked sampler by the law of its samples
(with the exact denoiser of :class:`dmlib.discrete.DiscreteOracle`) and by what it does to tokens it
has already unmasked, and a masked-diffusion NELBO estimator against ``-log p(x)``, which it must
equal in expectation when the conditionals are exact.
"""

from __future__ import annotations

import math

import torch

from .. import discrete as _dd
from ._common import ExerciseFailed, _call, _expect_tensor


def _table(K: int, D: int, seed: int) -> torch.Tensor:
    """A fixed law over K^D sequences with full support and visible dependence between tokens."""
    g = torch.Generator().manual_seed(seed)
    p = 0.05 + torch.rand((K,) * D, generator=g, dtype=torch.float64) ** 3
    return p / p.sum()


def _random_stochastic(n: int, g: torch.Generator) -> torch.Tensor:
    """A dense, non-symmetric row-stochastic matrix with a heavy diagonal."""
    M = torch.rand(n, n, generator=g, dtype=torch.float64) + 3 * torch.eye(n, dtype=torch.float64)
    return M / M.sum(1, keepdim=True)


def check_d3pm_posterior(fn) -> bool:
    """Exercise (Chapter 5): ``fn(Q_i, Qbar_prev, x_t, x0) -> q(x_{i-1} | x_i = x_t, x_0)``, shape
    ``(B, D, n)``, for one-step matrix ``Q_i`` and ``Qbar_prev = Qbar_{i-1}``, both ``(n, n)``
    row-stochastic (``q(x_i | x_{i-1}) = Cat(x_{i-1} Q_i)``). Graded against Bayes' rule by
    enumeration, on non-symmetric matrices and on D3PM's absorbing kind (n = K + 1)."""
    g = torch.Generator().manual_seed(50)
    cases = []
    for n in (5, 9):
        Q = _random_stochastic(n, g)
        Qbar_prev = torch.linalg.matrix_power(_random_stochastic(n, g), 3)
        cases.append((f"random non-symmetric {n}x{n} matrices", n, n, Q, Qbar_prev))
    K = 6
    Q_all, Qbar_all = _dd.D3PM("absorbing", K, 10).tables(torch.empty(0, dtype=torch.float64))
    cases.append(("D3PM's absorbing matrices (step 4 of 10)", K + 1, K, Q_all[4], Qbar_all[3]))
    for what, n, K, Q, Qbar_prev in cases:
        x0 = torch.randint(0, K, (400, 3), generator=g)
        Qbar = Qbar_prev @ Q
        x_t = _dd.sample_categorical(Qbar[x0], g)  # a possible x_t for each x_0
        # Bayes by enumeration: q(x_{i-1} = k | x_i, x_0) ∝ q(x_i | x_{i-1} = k) q(x_{i-1} = k | x_0)
        want = torch.zeros(x0.shape + (n,), dtype=torch.float64)
        for k in range(n):
            want[..., k] = Q[k][x_t] * Qbar_prev[x0, k]
        want = want / want.sum(-1, keepdim=True)
        got = _call("d3pm_posterior", fn, Q, Qbar_prev, x_t, x0)
        dist = f"one distribution over the n states per token (for {what})"
        got = _expect_tensor("d3pm_posterior", got, want.shape, dist)
        sums = (got.sum(-1) - 1).abs().max().item()
        if not sums < 1e-6:
            raise ExerciseFailed(
                f"d3pm_posterior: for {what} the rows sum to 1 only up to {sums:.3g}. Hint: the two "
                "factors give an unnormalized distribution; divide by its sum over the n states."
            )
        err = (got - want).abs().max().item()
        if not err < 1e-8:
            raise ExerciseFailed(
                f"d3pm_posterior: for {what} the posterior is off by up to {err:.3g}. Hint: the "
                "first factor is q(x_i | x_{i-1}) as a function of x_{i-1}, a column of Q_i (a "
                "row of its transpose); the second is q(x_{i-1} | x_0), a row of Qbar_{i-1}, "
                "not of Qbar_i."
            )
    print("d3pm_posterior: correct (Bayes' rule by enumeration, three sets of matrices).")
    return True


def _tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * (counts / counts.sum() - p).abs().sum().item()


def check_masked_sampler(fn) -> bool:
    """Exercise (Chapter 5): ``fn(model, K, shape, steps, schedule, generator)`` draws ``shape = (B, D)``
    sequences by ancestral masked sampling: every token ends unmasked, a token once unmasked never
    changes, and with the exact denoiser the samples' law is the data's (measured by the total
    variation distance of their histogram, against the distance of as many exact draws)."""
    K, D, n, steps = 4, 2, 8000, 64
    table = _table(K, D, 51)
    oracle = _dd.DiscreteOracle(table)
    sched = _dd.KeepSchedule("cosine")
    exact = oracle.denoiser(_dd.CTMC("absorbing", K, sched))
    seen = []

    def spy(x_t, t):  # the exact denoiser, recording every state the sampler shows it
        seen.append(x_t.clone())
        # at unmasked positions a network's logits need not copy the token (the exact ones do):
        # uniform logits there, so a sampler that redraws unmasked tokens is seen to change them
        logits = exact(x_t, t)
        return torch.where((x_t == K)[..., None], logits, torch.zeros_like(logits))

    x = _call("masked_sampler", fn, spy, K, (n, D), steps, sched, torch.Generator().manual_seed(52))
    if not torch.is_tensor(x) or x.shape != (n, D) or x.dtype != torch.long:
        raise ExerciseFailed(
            "masked_sampler: return the sequences as a LongTensor of shape (B, D); got "
            f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}"
            f"{'' if not torch.is_tensor(x) else ' ' + str(x.dtype)}."
        )
    if bool((x == K).any()):
        raise ExerciseFailed(
            "masked_sampler: some tokens are still masked at the end. Hint: at the last step "
            "(s = 0) every remaining mask must be replaced."
        )
    if not seen or not bool((seen[0] == K).all()):
        raise ExerciseFailed(
            "masked_sampler: the first call to the model should see every token masked (t = 1)."
        )
    states = seen + [x]
    for a, b in zip(states, states[1:]):
        changed = (a != K) & (a != b)
        if bool(changed.any()):
            raise ExerciseFailed(
                f"masked_sampler: {int(changed.sum())} tokens that were already unmasked changed "
                "at a later step. Hint: carry unmasked tokens over unchanged; only masked ones "
                "may be replaced by the model's draw."
            )
    if len(seen) < steps // 2:
        raise ExerciseFailed(
            f"masked_sampler: the model was called {len(seen)} times for {steps} steps; "
            "unmask a few tokens at each step, one model call per step."
        )
    counts = torch.bincount(x[:, 0] * K + x[:, 1], minlength=K**D).double()
    tv = _tv(counts, oracle.p)
    ref = _tv(
        torch.bincount(_dd.sample_categorical(oracle.p, torch.Generator().manual_seed(53), (n,)),
                       minlength=K**D).double(),
        oracle.p,
    )  # fmt: skip
    if not tv < 2 * ref + 0.01:
        raise ExerciseFailed(
            f"masked_sampler: with the exact denoiser the samples are {tv:.3f} from the data in "
            f"total variation; {n} exact draws are {ref:.3f} from it. Hint: from t to s a masked "
            "token unmasks with probability (kappa(s) - kappa(t)) / (1 - kappa(t)), with "
            "kappa = schedule.alpha; tokens that unmask at the same step are drawn independently, "
            "so unmasking many at once loses the dependence between them."
        )
    print(
        f"masked_sampler: correct. TV to the data {tv:.3f} ({n} exact draws: {ref:.3f}); "
        "unmasked tokens never changed."
    )
    return True


def check_masked_nelbo(fn) -> bool:
    """Exercise (Chapter 5): ``fn(model, x0, K, schedule, generator)`` returns one Monte Carlo estimate per
    sample of masked diffusion's NELBO (one time and one masking per sample). With the exact
    conditionals its mean must equal ``-log p(x)`` (paired, within Monte Carlo error) for two schedules."""
    K, D, n = 4, 3, 40_000
    table = _table(K, D, 54)
    oracle = _dd.DiscreteOracle(table)
    g = torch.Generator().manual_seed(55)
    for kind in ("linear", "cosine"):
        sched = _dd.KeepSchedule(kind)
        model = oracle.denoiser(_dd.CTMC("absorbing", K, sched))
        x0 = oracle.states[_dd.sample_categorical(oracle.p, g, (n,))]
        est = _call("masked_nelbo", fn, model, x0, K, sched, g)
        if not torch.is_tensor(est) or est.shape != (n,):
            raise ExerciseFailed(
                "masked_nelbo: return one estimate per sample, shape (B,); got "
                f"{tuple(est.shape) if torch.is_tensor(est) else type(est).__name__}."
            )
        diff = est.double() - (-oracle.log_prob(x0))
        if not bool(torch.isfinite(diff).all()):
            raise ExerciseFailed(
                f"masked_nelbo: some estimates are infinite or NaN with the {kind} schedule. Hint: "
                "the weight must stay finite where few tokens are masked; check what you divide by."
            )
        m, se = diff.mean().item(), diff.std().item() / math.sqrt(n)
        # the library's estimator on a fresh draw: how noisy a right answer is
        t = 1 - torch.rand(n, generator=g, dtype=torch.float64)
        x_t = _dd.mask_tokens(x0, t, K, sched, g)
        ref = _dd.masked_nelbo_integrand(model, x0, x_t, t, K, sched)
        se_ref = ref.std().item() / math.sqrt(n)
        if not se < 3 * se_ref:
            raise ExerciseFailed(
                f"masked_nelbo: with the {kind} schedule the estimates are far noisier than they "
                f"should be (standard error {se:.3f} nats, expected about {se_ref:.3f}): a few "
                "huge values dominate. Hint: the weight of a masked token's -log p(x_0 | x_t) is "
                "-kappa'(t) / (1 - kappa(t)), kappa = schedule.alpha; what does your weight do "
                "as t -> 1?"
            )
        if not abs(m) < 4 * se + 0.02:
            raise ExerciseFailed(
                f"masked_nelbo: with exact conditionals and the {kind} schedule the mean estimate "
                f"differs from -log p(x) by {m:.3f} +- {se:.3f} nats; it should be 0. Hint: the "
                "weight of a masked token's -log p(x_0 | x_t) is -kappa'(t) / (1 - kappa(t)), "
                "kappa = schedule.alpha, kappa' = schedule.dalpha, with t uniform on (0, 1]."
            )
    print("masked_nelbo: correct (unbiased for -log p(x) with exact conditionals, two schedules).")
    return True
