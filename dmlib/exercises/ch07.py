"""Exercises of Chapter 7 (the design space: preconditioning, guidance, loss weightings).

Each check measures behaviour where the answer is known exactly: EDM's ``c_skip`` and ``c_out`` by
the variance of the training target they make (exact second moments, at noise levels from 1e-3 to
1e3) and by whether ``c_out`` is the smallest that gives unit variance; CFG's combination in eps and
in score form against the guided score of the exact labelled-mixture oracle
(:class:`dmlib.guidance.LabelledMixture`); a weighting's equivalent noise-level density by the law
of its draws (a Kolmogorov-Smirnov distance to the exact CDF) and by the weighted loss it
reproduces in expectation.
"""

from __future__ import annotations

import math

import torch

from .. import guidance as _G
from .. import parameterization as _P
from ..oracle import GaussianMixture
from ..schedules import Cosine, Linear
from ._common import ExerciseFailed, _call, _expect_tensor


def check_edm_skip_out(fn) -> bool:
    """Exercise (Chapter 7): ``fn(nu, sigma_data) -> (c_skip, c_out)``, EDM's skip and output scales
    (Karras et al. 2022, App. B.6) at noise levels ``nu`` (a float64 tensor of shape (B,)) for data of
    standard deviation ``sigma_data`` (a float). With ``y = x_0 + nu eps`` the raw network's target is
    ``F* = (x_0 - c_skip y) / c_out``; graded by its exact variance, ``((1 - c_skip)^2 sd^2 + c_skip^2
    nu^2) / c_out^2``, which must be 1, and by ``c_out`` being the smallest scale that achieves it."""
    nu = torch.logspace(-3, 3, 61, dtype=torch.float64)
    for sd in (0.5, 1.7):
        got = _call("edm_skip_out", fn, nu.clone(), sd)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise ExerciseFailed(f"edm_skip_out: return the pair (c_skip, c_out); got {type(got).__name__}.")
        c_skip = _expect_tensor("edm_skip_out", got[0], nu.shape, "c_skip, one per noise level")
        c_out = _expect_tensor("edm_skip_out", got[1], nu.shape, "c_out, one per noise level")
        # the target's second moment for zero-mean data: E x0^2 = sd^2, E y^2 = sd^2 + nu^2, E x0 y = sd^2
        var = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * nu**2) / c_out**2
        worst = (var - 1).abs().max().item()
        if not worst < 1e-8:  # also catches NaN
            i = int((var - 1).abs().nan_to_num(math.inf).argmax())
            hint = (
                "c_out is a standard deviation: the square root of the target's variance before "
                "scaling, sqrt((1 - c_skip)^2 sd^2 + c_skip^2 nu^2)."
                if abs(var[i].item() * (sd**2 + nu[i].item() ** 2) - 1) < 1e-6
                or abs(var[i].item() - (sd**2 + nu[i].item() ** 2)) < 1e-6 * (sd**2 + nu[i].item() ** 2)
                else "write the variance of x_0 - c_skip (x_0 + nu eps) with E x_0^2 = sd^2 and eps "
                "independent of x_0, and choose c_out to make it 1 after dividing by c_out^2."
            )
            raise ExerciseFailed(
                f"edm_skip_out: for sigma_data = {sd} the target's variance is {var[i].item():.4g} at "
                f"nu = {nu[i].item():.3g}, not 1. Hint: {hint}"
            )
        # the smallest c_out: d/dc_skip of (1 - c_skip)^2 sd^2 + c_skip^2 nu^2 must vanish
        slope = (c_skip * (sd**2 + nu**2) - sd**2).abs() / (sd**2 + nu**2)
        if not slope.max().item() < 1e-8:
            i = int(slope.argmax())
            raise ExerciseFailed(
                f"edm_skip_out: the target has unit variance, but c_out = {c_out[i].item():.4g} at nu = "
                f"{nu[i].item():.3g} (sigma_data = {sd}) is not the smallest scale that gives it: the "
                f"network's errors are multiplied by c_out. Hint: minimize the variance of "
                "x_0 - c_skip y over c_skip before you divide by c_out (a derivative set to zero)."
            )
    print("edm_skip_out: correct (unit-variance target with the smallest c_out, nu from 1e-3 to 1e3).")
    return True


def _labelled_mixture() -> _G.LabelledMixture:
    """Three classes over five anisotropic components of unequal weights (float64)."""
    covs = torch.tensor(
        [
            [[0.30, 0.10], [0.10, 0.20]],
            [[0.05, 0.0], [0.0, 0.40]],
            [[0.1, -0.05], [-0.05, 0.1]],
            [[0.2, 0.0], [0.0, 0.2]],
            [[0.15, 0.05], [0.05, 0.25]],
        ],
        dtype=torch.float64,
    )
    means = [[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5], [1.5, -0.5], [-0.5, 1.5]]
    mix = GaussianMixture(means, covs, weights=[0.3, 0.2, 0.15, 0.2, 0.15])
    return _G.LabelledMixture(mix, [0, 1, 2, 2, 0])


def check_cfg_eps_score(fn) -> bool:
    """Exercise (Chapter 7): ``fn(x0_c, x0_u, x_t, alpha, sigma, w) -> (eps, score)``, classifier-free
    guidance (Ho & Salimans 2022, eq. 6, weight ``w >= 0``, ``w = 0`` the conditional model) from a
    conditional and an unconditional data prediction ``x0_c``, ``x0_u`` (B, D) at ``x_t`` (B, D), with
    ``alpha``, ``sigma`` scalar tensors: the guided noise prediction and the guided score. Graded
    against the exact guided score ``(1 + w) grad log p_t(x|c) - w grad log p_t(x)`` of a labelled
    Gaussian mixture, at four times, four weights and three classes."""
    lm, sched = _labelled_mixture(), Linear()
    g = torch.Generator().manual_seed(70)
    for t in (0.05, 0.3, 0.7, 0.95):
        tt = torch.tensor(t, dtype=torch.float64)
        alpha, sigma = sched.alpha(tt), sched.sigma(tt)
        x0, _ = lm.sample(96, g, dtype=torch.float64)
        x_t = alpha * x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        x0_u = lm.x0(sched, x_t, tt)
        for c in range(3):
            x0_c = lm.x0(sched, x_t, tt, c)
            for w in (0.0, 0.5, 3.0, 7.0):
                got = _call("cfg_eps_score", fn, x0_c.clone(), x0_u.clone(), x_t.clone(), alpha, sigma, w)
                if not isinstance(got, (tuple, list)) or len(got) != 2:
                    raise ExerciseFailed(
                        f"cfg_eps_score: return the pair (eps, score); got {type(got).__name__}."
                    )
                eps = _expect_tensor("cfg_eps_score", got[0], x_t.shape, "the guided eps, one per point")
                score = _expect_tensor("cfg_eps_score", got[1], x_t.shape, "the guided score, one per point")
                want = lm.guided_score(sched, x_t, tt, c, w)
                scale = want.abs().max().item()
                where = f"at t = {t}, class {c}, w = {w}"
                err_s = (score - want).abs().max().item() / scale
                err_e = (eps + sigma * want).abs().max().item() / (sigma.item() * scale)
                if err_s < 1e-8 and err_e < 1e-8:
                    continue
                cond, uncond = lm.score(sched, x_t, tt, c), lm.score(sched, x_t, tt)
                if err_e < 1e-8:
                    hint = "eps is right; the score of a noise prediction is -eps / sigma (Tweedie)."
                elif w == 0.0 and (score - uncond).abs().max().item() < 1e-8 * scale:
                    hint = (
                        "at w = 0 you return the unconditional model: you used w as the scale "
                        "s = 1 + w of eps_u + s (eps_c - eps_u). Here w = 0 is the conditional model: "
                        "eps = (1 + w) eps_c - w eps_u."
                    )
                elif w == 0.0:
                    hint = (
                        "at w = 0 the guided eps is the conditional one, eps_c = (x_t - alpha x0_c) / "
                        "sigma (from x_t = alpha x0 + sigma eps), and the score -eps_c / sigma."
                    )
                elif (score - cond).abs().max().item() < 1e-8 * scale:
                    hint = "you return the conditional model at w > 0: add w (eps_c - eps_u)."
                else:
                    hint = "eps = (1 + w) eps_c - w eps_u with eps_k = (x_t - alpha x0_k) / sigma."
                raise ExerciseFailed(
                    f"cfg_eps_score: {where} the score is off by {err_s:.3g} and eps by {err_e:.3g} "
                    f"(relative). Hint: {hint}"
                )
    print("cfg_eps_score: correct (the exact guided score and eps, 4 times x 4 weights x 3 classes).")
    return True


def _gaussian_floor(lam: torch.Tensor, s: float = 0.5) -> torch.Tensor:
    """The least eps-MSE per dimension for N(0, s^2) data at log-SNR lam: s^2 SNR / (1 + s^2 SNR)."""
    snr = s**2 * lam.exp()
    return snr / (1 + snr)


def check_equivalent_density(fn) -> bool:
    """Exercise (Chapter 7): ``fn(weight, lam_range, n, generator) -> (lam, ratio)``: ``n`` draws of the
    log-SNR from the density ``q = Omega / Z`` on ``lam_range = (lo, hi)`` equivalent to the weighting
    ``weight`` (a function of a float64 log-SNR tensor; ``Z`` its integral over the range; Kingma & Gao
    2023, sec. 4), and each draw's importance weight ``Omega(lam) / q(lam)``, both of shape (n,).
    Graded on three weightings by the law of the draws (Kolmogorov-Smirnov distance to the exact CDF)
    and by ``mean(ratio * l(lam))``, which must reproduce ``int Omega l dlam`` for a per-level loss l."""
    cos = Cosine()
    cases = [
        ("EDM's weighting on (-10, 10)", lambda lam: _P.loss_weight("edm", lam), (-10.0, 10.0)),
        ("the eps weighting of the cosine schedule on (-10, 10)", lambda lam: _P.loss_weight("eps", lam, cos),
         (-10.0, 10.0)),
        ("min-SNR-5 of the cosine schedule on (-6, 8)", lambda lam: _P.loss_weight("min_snr", lam, cos),
         (-6.0, 8.0)),
    ]  # fmt: skip
    n = 40_000
    for i, (what, weight, (lo, hi)) in enumerate(cases):
        g = torch.Generator().manual_seed(71 + i)
        got = _call("equivalent_density", fn, weight, (lo, hi), n, g)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise ExerciseFailed(
                f"equivalent_density: return the pair (lam, ratio); got {type(got).__name__}."
            )
        lam = _expect_tensor("equivalent_density", got[0], (n,), "the log-SNR draws")
        ratio = _expect_tensor("equivalent_density", got[1], (n,), "the importance weights Omega / q")
        if not (lam.min() >= lo and lam.max() <= hi):
            raise ExerciseFailed(
                f"equivalent_density: for {what} draws fall outside the range ({lo}, {hi}): "
                f"from {lam.min().item():.4g} to {lam.max().item():.4g}."
            )
        # the exact CDF by the trapezoid rule on a fine grid, interpolated at the sorted draws
        grid = torch.linspace(lo, hi, 20_001, dtype=torch.float64)
        om = weight(grid)
        cdf = torch.cat([om.new_zeros(1), ((om[1:] + om[:-1]) / 2 * grid.diff()).cumsum(0)])
        Z = cdf[-1].item()
        cdf = cdf / Z
        srt = lam.sort().values
        j = torch.searchsorted(grid, srt).clamp(1, len(grid) - 1)
        frac = (srt - grid[j - 1]) / (grid[j] - grid[j - 1])
        F = cdf[j - 1] + frac * (cdf[j] - cdf[j - 1])
        k = torch.arange(1, n + 1, dtype=torch.float64) / n
        ks = torch.maximum((k - F).abs(), (k - 1 / n - F).abs()).max().item()
        if not ks < 2.0 / math.sqrt(n) + 2e-3:  # 2/sqrt(n): a KS p-value of about 0.001
            raise ExerciseFailed(
                f"equivalent_density: for {what} the draws do not follow Omega / Z: their CDF is "
                f"{ks:.3g} from the exact one (Kolmogorov-Smirnov; draws of q would be within "
                f"{2 / math.sqrt(n):.3g}). Hint: tabulate the CDF of Omega on a fine grid (the "
                "trapezoid rule), draw u ~ U(0, 1) and invert it, interpolating inside each cell."
            )
        ell = _gaussian_floor(grid)
        want = torch.trapezoid(om * ell, grid).item()
        vals = ratio * _gaussian_floor(lam)
        mean, se = vals.mean().item(), vals.std().item() / math.sqrt(n)
        if not abs(mean - want) < 4 * se + 2e-3 * abs(want):
            factor = mean / want if want else float("nan")
            hint = (
                f"your estimate is {factor:.3g} times the integral, about 1 / Z (Z = {Z:.4g}): the "
                "ratio Omega / q equals the normalizer Z, not 1."
                if abs(factor * Z - 1) < 0.05
                else "the importance weight of a draw is Omega(lam) / q(lam), with q = Omega / Z the "
                "density you drew it from."
            )
            raise ExerciseFailed(
                f"equivalent_density: for {what} mean(ratio * l(lam)) = {mean:.5g} +- {se:.2g}, but the "
                f"weighted loss int Omega l dlam is {want:.5g}. Hint: {hint}"
            )
    print("equivalent_density: correct (draws follow Omega / Z; the weighted loss is reproduced).")
    return True
