"""Exercises of Chapter 8 (connections: flow matching, rectified flow, the 1D transport map).

Each check measures behaviour where the answer is known. The conditional flow-matching loss is
graded on data whose exact marginal velocity is a closed form: a point mass (the loss of the exact
velocity is 0) and a Gaussian ``N(0, s^2 I)``, for which the loss of the marginal velocity is
``pi s / 2`` per coordinate and a velocity shifted by ``c`` costs exactly ``|c|^2`` more (Lipman et al.
2023, Theorem 2). A reflow step is graded by where its pairs end (the exact ODE endpoints of the
oracle's velocity) and by what they do: a velocity trained on them with :func:`dmlib.flows.cfm_loss`
must be far straighter (:func:`dmlib.flows.straightness`) than the flow it came from (Liu et al. 2023,
sec. 2.2). The 1D monotone map ``F^-1(Phi(z))`` is graded by the CDF identity and against the exact
probability-flow ODE endpoints, solved by scipy's RK45 on the oracle's marginal velocity.
"""

from __future__ import annotations

import math

import torch

from .. import flows as _fl
from .. import samplers as _sm
from ..nets.mlp import MLP
from ..oracle import GaussianMixture, MixtureOracle
from ..train import TrainConfig, train
from ._common import ExerciseFailed, _call, _expect_tensor

F64 = torch.float64
PATH = _fl.LinearPath()


def _scalar(name: str, got) -> torch.Tensor:
    if not torch.is_tensor(got) or got.numel() != 1:
        found = tuple(got.shape) if torch.is_tensor(got) else type(got).__name__
        raise ExerciseFailed(f"{name}: return the loss as a one-number tensor (a mean); got {found}.")
    return got.reshape(())


def _per_sample_time(t, x: torch.Tensor) -> torch.Tensor:
    """The model's time as a column (B, 1): the student may pass a scalar or one time per sample."""
    t = torch.as_tensor(t, dtype=x.dtype)
    return (t.expand(x.shape[0]) if t.ndim == 0 else t.reshape(-1))[:, None]


def check_cfm_loss(fn) -> bool:
    """Exercise (Chapter 8): ``fn(model, x0, generator) -> loss``, the conditional flow-matching loss on
    the linear path ``x_t = (1 - t) x_0 + t eps`` (data at t = 0), with ``eps ~ N(0, I)`` and ``t ~ U(0, 1]``
    drawn from ``generator``: the mean over the batch and the coordinates of
    ``|model(x_t, t) - (eps - x_0)|^2``. Graded by its value on a point mass (0 for the exact
    velocity), its expectation for Gaussian data with the exact marginal velocity (``pi s / 2``), and
    the paired excess ``|c|^2`` of a velocity shifted by ``c`` (the marginal velocity is the minimizer)."""
    mu = torch.tensor([1.5, -0.5], dtype=F64)
    x0 = mu.expand(512, 2).clone()

    def point_velocity(x, t):
        return (x - mu) / _per_sample_time(t, x)

    loss = _scalar("cfm_loss", _call("cfm_loss", fn, point_velocity, x0, torch.Generator().manual_seed(80)))
    if not loss.abs().item() < 1e-10:  # also catches NaN
        flipped = _call(
            "cfm_loss", fn, lambda x, t: -point_velocity(x, t), x0.clone(), torch.Generator().manual_seed(80)
        )
        hint = (
            "the sign of the target is flipped: with the data at t = 0 and the noise at t = 1 the "
            "velocity dx_t/dt points from the data to the noise (flow-matching papers, with the noise "
            "at t = 0, write the opposite)."
            if torch.is_tensor(flipped) and abs(float(flipped)) < 1e-10
            else "with the data at t = 0, x_t = (1 - t) x0 + t eps; the model sees x_t (not eps or "
            "x0) and the target is d x_t / dt; the time t must be the one x_t was made with."
        )
        raise ExerciseFailed(
            f"cfm_loss: data at one point mu, and a model that returns the exact velocity (x_t - mu) / t "
            f"of that data; the loss should be 0 but is {float(loss):.3g}. Hint: {hint}"
        )
    # Gaussian data N(0, s^2 I): E[eps - x0 | x_t] = k(t) x_t, and the residual variance integrates to pi s / 2
    s, n, calls = 0.5, 4096, 8

    def exact(x, t):
        t = _per_sample_time(t, x)
        return (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2) * x

    c = torch.tensor([0.4, -0.4], dtype=F64)
    g = torch.Generator().manual_seed(81)
    base, excess = [], []
    for k in range(calls):
        x0 = s * torch.randn(n, 2, generator=g, dtype=F64)
        a = _call("cfm_loss", fn, exact, x0, torch.Generator().manual_seed(100 + k))
        b = _call("cfm_loss", fn, lambda x, t: exact(x, t) + c, x0, torch.Generator().manual_seed(100 + k))
        base.append(_scalar("cfm_loss", a).double())
        excess.append(_scalar("cfm_loss", b).double() - base[-1])
    base, excess = torch.stack(base), torch.stack(excess)
    want, se = math.pi * s / 2, base.std().item() / math.sqrt(calls)
    if not abs(base.mean().item() - want) < 4 * se + 0.01:
        ratio = base.mean().item() / want
        hint = (
            "your loss is about twice the mean over coordinates: average over the coordinates too "
            "(the mean of the squared error), not their sum."
            if abs(ratio - 2) < 0.15
            else "draw t uniformly in (0, 1] and eps ~ N(0, I), one per sample, from the generator, and "
            "average |model(x_t, t) - (eps - x0)|^2 over the batch and the coordinates."
        )
        raise ExerciseFailed(
            f"cfm_loss: for Gaussian data N(0, {s**2:g} I) and its exact marginal velocity your loss averages "
            f"{base.mean().item():.4f} +- {se:.4f} over {calls} batches. Hint: {hint}"
        )
    want_excess, se_excess = (c**2).mean().item(), excess.std().item() / math.sqrt(calls)
    if not abs(excess.mean().item() - want_excess) < 4 * se_excess + 0.01:
        raise ExerciseFailed(
            f"cfm_loss: shifting the exact velocity by c raises the loss by {excess.mean().item():.4f} on "
            f"average; the marginal velocity is the minimizer, so the excess should be |c|^2 averaged over "
            f"the coordinates. Hint: the loss must be an unweighted mean of the squared error."
        )
    model = MLP(2, hidden=8, depth=1).double()
    out = _call("cfm_loss", fn, model, x0[:64], torch.Generator().manual_seed(82))
    if not (torch.is_tensor(out) and out.requires_grad):
        raise ExerciseFailed(
            "cfm_loss: the loss of a network does not carry a gradient to its parameters; keep it a tensor "
            "(no .item(), no torch.no_grad()) so that it can be trained."
        )
    print(
        f"cfm_loss: correct (0 for a point mass; {base.mean().item():.4f} against pi s / 2 = {want:.4f} for "
        f"Gaussian data; a shift by c costs {excess.mean().item():.4f} against {want_excess:.4f})."
    )
    return True


def check_reflow_pairs(fn) -> bool:
    """Exercise (Chapter 8): ``fn(velocity, noise, n_steps) -> (x0, eps)``, the coupling of one reflow
    step (Liu et al. 2023, sec. 2.2): integrate ``dx/dt = velocity(x, t)`` with ``n_steps`` Euler steps
    from ``x = noise`` at ``t = 1`` down to ``t = 0`` (the data end, in this book's time) and pair each
    end point with the noise it started from. Graded with the exact velocity of eight Gaussians: the
    end points against an accurate solver, and a small network trained on the pairs with
    ``dmlib.flows.cfm_loss(path, "pairs")``, whose flow must be far straighter than the one the pairs
    came from."""
    mixture = GaussianMixture(
        2.0 * torch.tensor([[math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)] for k in range(8)]),
        stds=0.2,
    )
    oracle = MixtureOracle(mixture, PATH)
    g = torch.Generator().manual_seed(83)
    noise = torch.randn(2000, 2, generator=g, dtype=F64)

    def velocity(x, t):
        return _fl.marginal_velocity(oracle, x, t)

    got = _call("reflow_pairs", fn, velocity, noise.clone(), 100)
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise ExerciseFailed(f"reflow_pairs: return a pair (x0, eps) of tensors; got {type(got).__name__}.")
    x0 = _expect_tensor("reflow_pairs", got[0], noise.shape, "x0, the ODE's end points, one per noise row")
    eps = _expect_tensor("reflow_pairs", got[1], noise.shape, "eps, the noise each x0 came from")
    ref = _sm.sample_dpm_solver(oracle.denoiser(), noise, _sm.time_grid(PATH, 40, "uniform"), order=3)
    err = (x0 - ref).norm(dim=1).mean().item()
    if not err < 0.05:  # 100 Euler steps: 0.008
        raise ExerciseFailed(
            f"reflow_pairs: the end points are {err:.3g} from the exact ODE's on average (100 Euler steps "
            "reach 0.01). Hint: in this book's time the noise is at t = 1 and the data at t = 0: the Euler "
            "steps run t downwards from 1 to 0, so every time step is negative."
        )
    probe = torch.randn(500, 2, generator=g, dtype=F64)
    grid = _sm.time_grid(PATH, 40, "uniform")
    before = _fl.straightness(oracle.denoiser(), probe, grid).item()
    cfg = TrainConfig(steps=400, batch_size=256, lr=3e-3, ema_decay=0.0, device="cpu", progress=False, seed=0)
    with torch.random.fork_rng(devices=[]):  # a fixed initialization, without touching the caller's RNG
        torch.manual_seed(0)
        net = train(
            MLP(2, hidden=64, depth=2), torch.stack([x0, eps], 1).float(), _fl.cfm_loss(PATH, "pairs"), cfg
        )
    after = _fl.straightness(_fl.velocity_denoiser(net.model.double().eval(), PATH), probe, grid).item()
    if not after < before / 4:  # measured: 1.39 -> 0.02; with fresh noise as eps, 1.14
        raise ExerciseFailed(
            f"reflow_pairs: a velocity trained on your pairs has straightness {after:.3g}, against {before:.3g} "
            "for the flow the pairs came from; one reflow should straighten it many times over. Hint: "
            "pair each end point with the very noise its path started from, not with fresh noise."
        )
    print(
        f"reflow_pairs: correct (end points {err:.3f} from the exact ODE's; straightness {before:.2f} "
        f"before, {after:.3f} after one reflow)."
    )
    return True


def _ode_endpoints(mixture: GaussianMixture, z: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE of the linear path from ``z`` (n,) at t = 1 to t = 0, by RK45 at tolerance 1e-11."""
    from scipy.integrate import solve_ivp

    oracle = MixtureOracle(mixture, PATH)

    def rhs(t, y):
        x = torch.from_numpy(y)[:, None]  # (n, 1): points of the 1D space
        return _fl.marginal_velocity(oracle, x, torch.tensor(t, dtype=F64))[:, 0].numpy()

    sol = solve_ivp(rhs, (1.0, 0.0), z.numpy(), rtol=1e-11, atol=1e-11)
    return torch.from_numpy(sol.y[:, -1].copy())


def check_monotone_map(fn) -> bool:
    """Exercise (Chapter 8): ``fn(means, stds, weights, z) -> x = F^-1(Phi(z))`` for the 1D mixture
    ``sum_k w_k N(m_k, s_k^2)`` (parameters as (K,) tensors), ``z`` of shape (n,): the increasing map that
    pushes N(0, 1) to the mixture. Graded by the CDF identity ``F(x) = Phi(z)``, by monotonicity, and
    against the exact end points of the probability-flow ODE of the linear path (RK45 on the oracle)."""
    means = torch.tensor([-2.0, 0.5, 3.0], dtype=F64)
    stds = torch.tensor([0.3, 0.6, 0.4], dtype=F64)
    weights = torch.tensor([0.3, 0.5, 0.2], dtype=F64)
    mixture = GaussianMixture(means[:, None], stds=stds, weights=weights)
    z = torch.linspace(-3.0, 3.0, 121, dtype=F64)
    got = _call("monotone_map", fn, means.clone(), stds.clone(), weights.clone(), z.clone())
    x = _expect_tensor("monotone_map", got, z.shape, "one point x per z")
    cdf = _fl.mixture_cdf_1d(mixture, x)
    gap = (cdf - torch.special.ndtr(z)).abs().max().item()
    if not gap < 1e-8:
        moments = (weights * means).sum()
        sd = ((weights * (stds**2 + means**2)).sum() - moments**2).sqrt()
        if (x - (moments + sd * z)).abs().max() < 1e-6:
            hint = "this is the Gaussian with the mixture's mean and variance, not the mixture."
        elif (x - (weights * (means + stds * z[:, None])).sum(1)).abs().max() < 1e-6:
            hint = "the quantile of a mixture is not the weighted sum of its components' quantiles."
        else:
            hint = "solve F(x) = Phi(z) for x: F, the mixture's CDF, is increasing, so bisection works."
        raise ExerciseFailed(
            f"monotone_map: the mixture's CDF at your points differs from Phi(z) by up to {gap:.3g}: the "
            f"map does not push N(0, 1) to the mixture. Hint: {hint}"
        )
    if not (x.diff() > 0).all():
        raise ExerciseFailed("monotone_map: the map must increase with z (it is the monotone transport map).")
    err = (x - _ode_endpoints(mixture, z)).abs().max().item()
    if not err < 1e-5:
        raise ExerciseFailed(
            f"monotone_map: your points are up to {err:.3g} from the end points of the exact probability-flow "
            "ODE. Hint: refine the root of F(x) = Phi(z) to float64 precision."
        )
    print(f"monotone_map: correct (F(x) = Phi(z) to {gap:.1e}; the ODE's end points to {err:.1e}).")
    return True
