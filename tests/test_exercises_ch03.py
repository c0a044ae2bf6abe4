"""Chapter 3's exercise checks catch the typical mistakes, each with a message that points at the fix.

The solutions below are the chapter's own (tests/test_exercises.py also runs those from the
chapter); here each check must pass on them and fail on the typical mistakes."""

import pytest
import torch

from dmlib.exercises import (
    ExerciseFailed,
    check_ddim_step,
    check_dpm_solver_1_step,
    check_dpm_solver_2,
    check_edm_grid,
    check_heun,
    check_optimal_path,
)

# --- the warm-ups -------------------------------------------------------------------------------


def _ddim_no_eps(x, eps, a_t, s_t, a_s, s_s):
    return a_s / a_t * x  # drops the noise term


def _ddim_sigma_t(x, eps, a_t, s_t, a_s, s_s):
    return a_s * (x - s_t * eps) / a_t + s_t * eps  # the old noise level


def _dpm1(x, eps, a_t, a_s, s_s, l_t, l_s, half=True, expm1=True):
    h = (l_s - l_t) / 2 if half else l_s - l_t
    return a_s / a_t * x - s_s * (torch.expm1(h) if expm1 else torch.exp(h)) * eps


def _edm(nu_max, nu_min, n, rho, up=False, points=None, linear=False):
    i = torch.arange(n + 1 if points is None else points, dtype=torch.float64) / n
    if linear:
        return nu_max + i * (nu_min - nu_max)
    out = (nu_max ** (1 / rho) + i * (nu_min ** (1 / rho) - nu_max ** (1 / rho))) ** rho
    return out.flip(0) if up else out


# --- DPM-Solver-2 -------------------------------------------------------------------------------


def dpm_solver_2(den, x, ts, where="mid", predictor=True, evals=2, combine="second"):
    sched = den.schedule
    for t, s in zip(ts[:-1], ts[1:]):
        a_t, a_s, sig_s = sched.alpha(t), sched.alpha(s), sched.sigma(s)
        if sig_s == 0:
            x = a_s * den.x0(x, t)
            continue
        ell_t, ell_s = sched.log_snr(t) / 2, sched.log_snr(s) / 2
        h = ell_s - ell_t
        r = {"mid": 0.5, "end": 1.0}[where]
        m = s if where == "end" else sched.t_from_log_snr(2 * (ell_t + r * h))
        eps_t = den.eps(x, t)
        if evals == 1:  # a first-order (DDIM) step
            x = a_s / a_t * x - sig_s * torch.expm1(h) * eps_t
            continue
        if evals == 3:
            eps_t = den.eps(x, t)
        u = sched.alpha(m) / a_t * x - sched.sigma(m) * torch.expm1(r * h) * eps_t
        eps_m = den.eps(u if predictor else x, m)
        e = eps_m if combine == "second" else (eps_t + eps_m) / 2
        x = a_s / a_t * x - sig_s * torch.expm1(h) * e
    return x


# --- Heun (EDM) ---------------------------------------------------------------------------------


def heun(den, x, ts, correct=True, at_euler=True, last_euler=True):
    sched = den.schedule
    for t, s in zip(ts[:-1], ts[1:]):
        a_t, a_s = sched.alpha(t), sched.alpha(s)
        nu_t, nu_s = sched.sigma(t) / a_t, sched.sigma(s) / a_s
        y = x / a_t
        d = (y - den.x0(x, t)) / nu_t
        y_next = y + (nu_s - nu_t) * d
        if correct and (nu_s > 0 or not last_euler):
            y_at = y_next if at_euler else y
            d_s = (y_at - den.x0(a_s * y_at, s)) / nu_s
            y_next = y + (nu_s - nu_t) * (d + d_s) / 2
        x = a_s * y_next
    return x


# --- Watson et al.'s dynamic program ------------------------------------------------------------


def optimal_path(cost, k, extra=0):
    n = cost.shape[0] - 1
    best = torch.full((n + 1,), float("inf"), dtype=cost.dtype)
    best[n] = 0.0
    back = []
    for _ in range(k + extra):
        best, arg = (best[:, None] + cost).min(0)
        back.append(arg)
    path = [0]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return path[::-1], best[0].item()


def greedy_path(cost, k):
    n, path, total = cost.shape[0] - 1, [cost.shape[0] - 1], 0.0
    for m in range(k, 0, -1):  # m jumps left: the next index must leave room for m - 1 more
        i = path[-1]
        options = range(0, 1) if m == 1 else range(m - 1, i)
        j = min(options, key=lambda j: cost[i, j].item())
        path.append(j)
        total += cost[i, j].item()
    assert path[-1] == 0 and len(path) == k + 1 and n == path[0]
    return path, total


def test_solutions_pass():
    assert check_dpm_solver_2(dpm_solver_2)
    assert check_heun(heun)
    assert check_optimal_path(optimal_path)


MISTAKES = [
    (check_ddim_step, _ddim_no_eps, "off by"),
    (check_ddim_step, _ddim_sigma_t, "off by"),
    (check_ddim_step, lambda *a: _ddim_sigma_t(*a).numpy(), "torch.Tensor"),
    (check_dpm_solver_1_step, lambda *a: _dpm1(*a, half=False), "halve h"),
    (check_dpm_solver_1_step, lambda *a: _dpm1(*a, expm1=False), "off by"),
    (check_edm_grid, lambda *a: _edm(*a, up=True), "runs upwards"),
    (check_edm_grid, lambda nu_max, nu_min, n, rho: _edm(nu_max, nu_min, n, rho, points=n), "shape"),
    (check_edm_grid, lambda *a: _edm(*a, linear=True), "off by"),
    (check_dpm_solver_2, lambda d, x, ts: dpm_solver_2(d, x, ts, evals=1), "measured order"),
    (check_dpm_solver_2, lambda d, x, ts: dpm_solver_2(d, x, ts, where="end"), "measured order|times that"),
    (check_dpm_solver_2, lambda d, x, ts: dpm_solver_2(d, x, ts, predictor=False), "measured order"),
    (check_dpm_solver_2, lambda d, x, ts: dpm_solver_2(d, x, ts, combine="mean"), "measured order"),
    (check_dpm_solver_2, lambda d, x, ts: dpm_solver_2(d, x, ts, evals=3), "evaluations"),
    (check_dpm_solver_2, lambda d, x, ts: dpm_solver_2(d, x, ts)[:1], "shape"),
    (check_heun, lambda d, x, ts: heun(d, x, ts, correct=False), "measured order"),
    (check_heun, lambda d, x, ts: heun(d, x, ts, at_euler=False), "measured order"),
    (check_heun, lambda d, x, ts: heun(d, x, ts, last_euler=False), "not finite"),
    (check_optimal_path, greedy_path, "exists"),
    (check_optimal_path, lambda c, k: optimal_path(c, k, extra=1), "visits"),
    (check_optimal_path, lambda c, k: (optimal_path(c, k)[0][::-1], optimal_path(c, k)[1]), "must start"),
    (check_optimal_path, lambda c, k: (optimal_path(c, k)[0], 0.0), "not the sum"),
]


@pytest.mark.parametrize("check,wrong,message", MISTAKES)
def test_checks_catch_typical_mistakes(check, wrong, message):
    with pytest.raises(ExerciseFailed, match=message):
        check(wrong)


def test_heun_check_times_the_last_step():
    """A Heun sampler that is right on interior steps but spends two evaluations on the last step
    (a wasted correction with the result discarded) is caught by the evaluation count."""

    def wasteful(den, x, ts):
        out = heun(den, x, ts)
        den.x0(x, ts[-2])  # one evaluation too many
        return out

    with pytest.raises(ExerciseFailed, match="evaluations"):
        check_heun(wasteful)
