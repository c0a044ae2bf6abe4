"""Exercises of Chapter 3 (fast sampling)."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .. import samplers
from ..acceleration import StepCosts, optimal_subsequence
from ..data import eight_gaussians
from ..oracle import MixtureOracle
from ..parameterization import Denoiser
from ..schedules import get_schedule
from ..sde import solve_pf_ode
from ._common import ExerciseFailed, _call, _compare


def check_ddim_step(fn) -> bool:
    """Exercise (Chapter 3): ``fn(x_t, eps_hat, alpha_t, sigma_t, alpha_s, sigma_s) -> x_s``, one
    deterministic DDIM step (eta = 0) from time t to an earlier time s, for any schedule."""
    g = torch.Generator().manual_seed(5)
    x_t = torch.randn(64, 2, generator=g, dtype=torch.float64)
    for name in ("linear", "ve"):
        sched = get_schedule(name)
        den = MixtureOracle(eight_gaussians(std=0.4), sched).denoiser()
        for t, s in ((0.9, 0.6), (0.5, 0.45), (0.2, 0.05)):
            tt, ss = torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
            x = sched.sigma(tt) * x_t if name == "ve" else x_t
            eps = den.eps(x, tt)
            want = samplers.sample_ddim(den, x, torch.stack([tt, ss]))
            got = _call(
                "ddim_step", fn, x, eps, sched.alpha(tt), sched.sigma(tt), sched.alpha(ss), sched.sigma(ss)
            )
            _compare(
                "ddim_step",
                got,
                want,
                f"x_s for the {name} schedule from t={t} to s={s}",
                "first recover x0_hat = (x_t - sigma_t eps_hat) / alpha_t, then "
                "x_s = alpha_s x0_hat + sigma_s eps_hat: the same noise, a new noise level.",
                atol=1e-8,
            )
    print("ddim_step: correct for VP and VE.")
    return True


def check_dpm_solver_1_step(fn) -> bool:
    """Exercise (Chapter 3): ``fn(x_t, eps_hat, alpha_t, alpha_s, sigma_s, log_snr_t, log_snr_s) -> x_s``,
    the first-order DPM-Solver step written with dmlib's log-SNR ``log(alpha^2 / sigma^2)``."""
    g = torch.Generator().manual_seed(6)
    x_t = torch.randn(64, 2, generator=g, dtype=torch.float64)
    for name in ("linear", "cosine", "subvp"):
        sched = get_schedule(name)
        den = MixtureOracle(eight_gaussians(std=0.4), sched).denoiser()
        for t, s in ((0.8, 0.5), (0.3, 0.1)):
            tt, ss = torch.tensor(t, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
            eps = den.eps(x_t, tt)
            want = samplers.sample_dpm_solver(den, x_t, torch.stack([tt, ss]), order=1)
            args = (
                x_t,
                eps,
                sched.alpha(tt),
                sched.alpha(ss),
                sched.sigma(ss),
                sched.log_snr(tt),
                sched.log_snr(ss),
            )
            got = _call("dpm_solver_1_step", fn, *args)
            # the most common slip: h = log_snr_s - log_snr_t, twice DPM-Solver's h
            h_wrong = (sched.log_snr(ss) - sched.log_snr(tt)).item()
            slip = (sched.alpha(ss) / sched.alpha(tt)) * x_t - sched.sigma(ss) * math.expm1(h_wrong) * eps
            if torch.is_tensor(got) and got.shape == want.shape and torch.allclose(got, slip, atol=1e-8):
                raise ExerciseFailed(
                    "dpm_solver_1_step: you used h = log_snr_s - log_snr_t. DPM-Solver's lambda is "
                    "log(alpha / sigma), half of dmlib's log-SNR log(alpha^2 / sigma^2): halve h."
                )
            _compare(
                "dpm_solver_1_step",
                got,
                want,
                f"x_s for the {name} schedule from t={t} to s={s}",
                "h = (log_snr_s - log_snr_t) / 2 and x_s = (alpha_s / alpha_t) x_t - sigma_s (e^h - 1) eps_hat; "
                "math.expm1 or torch.expm1 computes e^h - 1 accurately for small h.",
                atol=1e-8,
            )
    print("dpm_solver_1_step: correct (and equal to a DDIM step, as it should be).")
    return True


def check_edm_grid(fn) -> bool:
    """Exercise (Chapter 3): ``fn(nu_max, nu_min, n, rho) -> tensor`` of the ``n + 1`` noise levels
    ``nu = sigma / alpha`` of Karras et al.'s eq. 5 (grid exponent ``rho``), from ``nu_max`` down to
    ``nu_min``."""
    sched = get_schedule("linear")
    for n, r, t_min in ((10, 7.0, 0.01), (4, 3.0, 0.05), (25, 7.0, 0.002)):
        ts = samplers.time_grid(sched, n, "edm", t_min=t_min, rho=r)
        want = sched.sigma(ts) / sched.alpha(ts)
        got = _call("edm_grid", fn, want[0].item(), want[-1].item(), n, r)
        got = torch.as_tensor(got, dtype=torch.float64) if not torch.is_tensor(got) else got
        if got.shape == want.shape and torch.allclose(got.double(), want.flip(0), rtol=1e-6):
            raise ExerciseFailed("edm_grid: your grid runs upwards; start at nu_max and end at nu_min.")
        hint = (
            "interpolate linearly between nu_max^(1/rho) and nu_min^(1/rho), then raise to the "
            f"power rho: {n + 1} levels for i = 0..n, both ends included."
        )
        if got.shape != want.shape:
            raise ExerciseFailed(
                f"edm_grid: got shape {tuple(got.shape)}; expected {tuple(want.shape)}. {hint}"
            )
        # relative error: the levels span five orders of magnitude
        _compare(
            "edm_grid",
            got.double() / want,
            torch.ones_like(want),
            f"nu_i / expected (n={n}, rho={r})",
            hint,
            1e-6,
        )
    print("edm_grid: correct; dmlib.samplers.time_grid(schedule, n, 'edm') maps these levels back to times.")
    return True


# ---------------------------------------------------------------------------------------------
# Algorithms: a full sampler whose measured order is checked, Watson et al.'s dynamic program
# ---------------------------------------------------------------------------------------------

_ORDER_STEPS = (12, 16, 24, 32)  # step counts in the asymptotic range of a second-order method
_T_END = 0.02  # the order is measured away from t = 0, where the ODE is stiff


class _Counted:
    """The exact denoiser of the std-0.4 mixture, counting its network evaluations."""

    def __init__(self, schedule):
        den = MixtureOracle(eight_gaussians(std=0.4), schedule).denoiser()
        self.calls = 0

        def model(x, t):
            self.calls += 1
            return den.model(x, t)

        self.denoiser = Denoiser(model, schedule, den.prediction)


@functools.lru_cache(maxsize=1)
def _order_reference() -> tuple[torch.Tensor, torch.Tensor]:
    """32 starting points and their end points at ``_T_END`` by RK45 at tolerance 1e-10 (computed
    once per process: every order check shares them)."""
    den = MixtureOracle(eight_gaussians(std=0.4), get_schedule("linear")).denoiser()
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_ref, _ = solve_pf_ode(den, x_T, 1.0, _T_END, rtol=1e-10, atol=1e-10)
    return x_T, x_ref


def _measure_order(name: str, fn, kind: str, reference_fn) -> tuple[float, list, list]:
    """(slope of log error against log steps, the student's errors, the reference sampler's errors)
    on ``kind`` grids from t = 1 to ``_T_END``, against RK45 at tolerance 1e-10. The student's
    function must also spend at most two evaluations per step."""
    sched = get_schedule("linear")
    counted = _Counted(sched)
    den = counted.denoiser
    x_T, x_ref = _order_reference()
    errors, reference = [], []
    for k in _ORDER_STEPS:
        ts = samplers.time_grid(sched, k, kind, t_min=_T_END)
        counted.calls = 0
        got = _call(name, fn, den, x_T.clone(), ts)
        if not torch.is_tensor(got) or got.shape != x_T.shape:
            raise ExerciseFailed(
                f"{name}: return the final samples, a tensor of shape {tuple(x_T.shape)} like x_T; "
                f"got {type(got).__name__} {tuple(getattr(got, 'shape', ()))}."
            )
        if counted.calls > 2 * k:
            raise ExerciseFailed(
                f"{name}: {counted.calls} network evaluations on {k} steps; the method needs two "
                "per step. Reuse the evaluation at the start of a step instead of repeating it."
            )
        err = (got.double() - x_ref).norm(dim=1).max().item()
        if not math.isfinite(err):
            raise ExerciseFailed(f"{name}: the samples contain NaN or inf on {k} steps.")
        errors.append(err)
        reference.append((reference_fn(den, x_T, ts) - x_ref).norm(dim=1).max().item())
    slope = -float(np.polyfit(np.log(_ORDER_STEPS), np.log(errors), 1)[0])
    return slope, errors, reference


def _judge_order(name: str, slope: float, errors, reference, hint: str):
    table = ", ".join(f"{k} steps: {e:.2g}" for k, e in zip(_ORDER_STEPS, errors))
    if not slope >= 1.75:
        raise ExerciseFailed(
            f"{name}: measured order {slope:.2f} (largest end-point error against the exact ODE "
            f"solution: {table}); a second-order method's error falls about fourfold each time "
            f"the steps double. Hint: {hint}"
        )
    if not errors[-1] <= 2.5 * reference[-1]:
        raise ExerciseFailed(
            f"{name}: the order is right ({slope:.2f}) but the error on {_ORDER_STEPS[-1]} steps is "
            f"{errors[-1]:.2g}, {errors[-1] / reference[-1]:.1f} times that of a correct "
            f"implementation. Hint: {hint}"
        )


def check_dpm_solver_2(fn) -> bool:
    """Exercise (Chapter 3): ``fn(denoiser, x_T, timesteps) -> x``, the singlestep DPM-Solver-2
    sampler over a decreasing grid (two evaluations per step). The check measures its convergence
    order against an accurate solution of the probability-flow ODE of the exact oracle."""
    slope, errors, reference = _measure_order(
        "dpm_solver_2",
        fn,
        "logsnr",
        lambda d, x, ts: samplers.sample_dpm_solver(d, x, ts, order=2),
    )
    _judge_order(
        "dpm_solver_2",
        slope,
        errors,
        reference,
        "the second evaluation must sit halfway through the step in the half log-SNR "
        "ell = log(alpha / sigma) (not in t, not at the end), at the state u that a first-order "
        "step of half the length reaches; the full step then uses only that second eps.",
    )
    print(f"dpm_solver_2: measured order {slope:.2f} (theory 2).")
    return True


def check_heun(fn) -> bool:
    """Exercise (Chapter 3): ``fn(denoiser, x_T, timesteps) -> x``, Heun's method in EDM's
    variables (Karras et al. 2022, Algorithm 1): two evaluations per step, an Euler step on the
    last step to sigma = 0. The check measures the order and runs a grid down to t = 0."""
    slope, errors, reference = _measure_order("heun", fn, "edm", samplers.sample_heun)
    _judge_order(
        "heun",
        slope,
        errors,
        reference,
        "take an Euler step in (nu, y) to the next noise level, evaluate the slope (y - D) / nu "
        "again there, and move from the *start* of the step with the average of the two slopes.",
    )
    sched = get_schedule("linear")
    counted = _Counted(sched)
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ts = samplers.time_grid(sched, 6, "edm")
    got = _call("heun", fn, counted.denoiser, x_T, ts)
    if not torch.is_tensor(got) or not torch.isfinite(got).all():
        raise ExerciseFailed(
            "heun: on a grid that ends at t = 0 the samples are not finite. There nu = 0: the "
            "slope (y - D) / nu cannot be evaluated, so the last step must be an Euler step."
        )
    if counted.calls != 2 * 6 - 1:
        raise ExerciseFailed(
            f"heun: {counted.calls} evaluations on 6 steps ending at t = 0; Heun needs two per "
            "step and one for the last (Euler) step."
        )
    want = samplers.sample_heun(counted.denoiser, x_T, ts)
    _compare("heun", got, want, "the samples on a grid ending at t = 0", "see the last step.", 1e-6)
    print(f"heun: measured order {slope:.2f} (theory 2), and the last step is right.")
    return True


def _random_costs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    i, j = torch.meshgrid(torch.arange(n + 1), torch.arange(n + 1), indexing="ij")
    # a jump over d grid intervals costs about d^2 (long jumps are expensive), randomly perturbed
    jump = ((i - j).double() ** 2 / n) * torch.rand(n + 1, n + 1, generator=g, dtype=torch.float64)
    jump = jump + torch.rand(n + 1, n + 1, generator=g, dtype=torch.float64)
    jump[j >= i] = math.inf
    return StepCosts(grid, jump, 0.0)


def check_optimal_path(fn) -> bool:
    """Exercise (Chapter 3): ``fn(cost, k) -> (path, total)``. ``cost`` is an ``(N + 1, N + 1)``
    tensor: ``cost[i, j]`` is the cost of a jump from grid index ``i`` down to ``j < i`` (``inf``
    where ``j >= i``). Return the cheapest path of exactly ``k`` jumps from ``N`` down to ``0``, as
    the ``k + 1`` indices visited (decreasing), and its total cost (Watson et al. 2021)."""
    for n, seed in ((8, 0), (12, 1), (20, 2)):
        costs = _random_costs(n, seed)
        for k in sorted({1, 2, 3, n // 2, n - 1, n}):
            times, best = optimal_subsequence(costs, k)
            got = _call("optimal_path", fn, costs.jump.clone(), k)
            if not (isinstance(got, tuple) and len(got) == 2):
                raise ExerciseFailed("optimal_path: return a pair (path, total).")
            path = [int(v) for v in torch.as_tensor(got[0]).reshape(-1).tolist()]
            total = float(got[1])
            what = f"N = {n}, k = {k}"
            if len(path) != k + 1:
                raise ExerciseFailed(
                    f"optimal_path: {what}: your path visits {len(path)} indices; a path of "
                    f"k = {k} jumps visits k + 1. Count the jumps, not the points."
                )
            if path[0] != n or path[-1] != 0 or any(a <= b for a, b in zip(path, path[1:])):
                raise ExerciseFailed(
                    f"optimal_path: {what}: the path must start at index N = {n}, end at 0 and "
                    f"decrease; got {path}."
                )
            along = sum(costs.jump[a, b].item() for a, b in zip(path, path[1:]))
            if not abs(along - total) <= 1e-9 * max(1.0, abs(along)):
                raise ExerciseFailed(
                    f"optimal_path: {what}: the total you return ({total:.6g}) is not the sum of "
                    f"the costs along your path ({along:.6g})."
                )
            if not along <= best + 1e-9:
                raise ExerciseFailed(
                    f"optimal_path: {what}: your path costs {along:.6g}, but a path of {k} "
                    f"jumps costing {best:.6g} exists. Hint: a cheap first jump can force "
                    "expensive later ones; keep, for every index and every number of jumps "
                    "taken so far, the cheapest cost of reaching it, and decide at the end."
                )
    print("optimal_path: optimal on every table, for every k (as dmlib.acceleration's).")
    return True
