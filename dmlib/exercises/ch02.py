"""Exercises of Chapter 2 (score-based models and SDEs)."""

from __future__ import annotations

import torch

from ._common import ExerciseFailed, _call, _compare


def check_sde_coefficients(fn) -> bool:
    """Exercise (Chapter 2): ``fn(alpha, dalpha_dt, sigma, dsigma_dt) -> (f, g2)`` of the forward SDE."""
    from ..schedules import Schedule, get_schedule

    for name, kwargs in (("linear", {}), ("ve", {"sigma_max": 5.0}), ("subvp", {}), ("cosine", {})):
        sched = get_schedule(name, **kwargs)
        t = torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64, requires_grad=True)
        alpha, sigma = sched.alpha(t), sched.sigma(t)
        dalpha = torch.autograd.grad(alpha.sum(), t)[0] if alpha.requires_grad else torch.zeros_like(t)
        dsigma = torch.autograd.grad(sigma.sum(), t)[0]
        got = _call("sde_coefficients", fn, alpha.detach(), dalpha, sigma.detach(), dsigma)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise ExerciseFailed("sde_coefficients: return a pair (f, g2).")
        f, g2 = Schedule.drift_diffusion(sched, t.detach())
        _compare(
            "sde_coefficients", got[0], f, f"f for the {name} schedule", "f = d log(alpha)/dt = alpha'/alpha."
        )
        _compare(
            "sde_coefficients",
            got[1],
            g2,
            f"g^2 for the {name} schedule",
            "g^2 = d(sigma^2)/dt - 2 f sigma^2, and d(sigma^2)/dt = 2 sigma sigma'.",
        )
    print("sde_coefficients: correct for VP, VE, sub-VP and cosine.")
    return True


def check_dsm_loss(fn) -> bool:
    """Exercise (Chapter 2): ``fn(score_model, x0, alpha, sigma, eps)``, the denoising score-matching loss."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(128, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(128, 2, generator=g, dtype=torch.float64)

    def model(x):  # any fixed function will do; this one is the exact score of N(0, 2 I)
        return -x / 2

    for alpha, sigma in ((0.9, 0.3), (0.5, 0.8), (1.0, 2.0)):
        x_t = alpha * x0 + sigma * eps
        want = ((model(x_t) + eps / sigma) ** 2).sum(1).mean()
        got = _call(
            "dsm_loss",
            fn,
            model,
            x0,
            torch.tensor(alpha, dtype=torch.float64),
            torch.tensor(sigma, dtype=torch.float64),
            eps,
        )
        _compare(
            "dsm_loss",
            torch.as_tensor(got).reshape(()),
            want,
            f"the loss at alpha={alpha}, sigma={sigma}",
            "the target is the score of q(x_t|x0), -(x_t - alpha x0)/sigma^2 = -eps/sigma; "
            "sum the squares over dimensions and average over the batch.",
            atol=1e-6,
        )
    print("dsm_loss: correct.")
    return True


def check_langevin_step(fn) -> bool:
    """Exercise (Chapter 2): ``fn(x, score, step_size, z)``, one step of Langevin dynamics in the
    book's convention, ``x + delta score + sqrt(2 delta) z`` (eq. eq-langevin)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 2, generator=g, dtype=torch.float64)
    z = torch.randn(256, 2, generator=g, dtype=torch.float64)
    for step in (0.01, 0.3):
        want = x + step * (-x) + (2 * step) ** 0.5 * z
        got = _call("langevin_step", fn, x, -x, step, z)
        _compare(
            "langevin_step",
            got,
            want,
            f"the step with step_size={step}",
            "use the book's convention (eq. eq-langevin, the notation page), not Song & Ermon's: "
            "the step size multiplies the score once, and the noise has variance twice the step.",
        )
    # run it: on N(0, 1) with step d the chain's stationary variance is 1 / (1 - d / 2), not 1
    d, x = 0.2, torch.zeros(20_000, 1, dtype=torch.float64)
    for _ in range(300):
        x = fn(x, -x, d, torch.randn(x.shape, generator=g, dtype=torch.float64))
    print(
        f"langevin_step: correct. On N(0, 1) with step {d}: variance {x.var().item():.3f}\n"
        f"(finite-step theory {1 / (1 - d / 2):.3f}; the bias vanishes as the step shrinks)."
    )
    return True


# Algorithms: an annealed Langevin sampler, a reverse-SDE sampler whose weak order the check
# measures, and a sliced score-matching estimator checked against the exact Fisher divergence.


def _noisy_mixture(means, std: float, weights, sigma: float):
    """The isotropic mixture ``sum_k w_k N(mu_k, std^2 I)`` plus ``N(0, sigma^2 I)`` noise (VE)."""
    from ..oracle import GaussianMixture

    return GaussianMixture(means, stds=(std**2 + sigma**2) ** 0.5, weights=weights)


def check_annealed_langevin(fn) -> bool:
    """Exercise (Chapter 2): ``fn(score, x, sigmas, n_steps, step_size, generator)``, annealed
    Langevin dynamics in the book's convention, run on Song & Ermon's two-mode mixture."""
    from ..metrics import mode_coverage

    name = "annealed_langevin"
    means, weights = [[-5.0, -5.0], [5.0, 5.0]], [0.2, 0.8]
    mu, log_w = torch.tensor(means, dtype=torch.float64), torch.tensor(weights).log().double()

    def score(x, sigma):  # exact score of the data plus N(0, sigma^2 I) noise, in closed form
        v = 1.0 + float(sigma) ** 2  # every component is N(mu_k, v I) after the noise
        r = torch.softmax(log_w - torch.cdist(x.double(), mu) ** 2 / (2 * v), dim=1)
        return (-(x.double() - r @ mu) / v).to(x.dtype)

    # 1. one level on a Gaussian: the stationary variance pins the step convention of eq-langevin
    g = torch.Generator().manual_seed(21)
    var, delta = 2.0, 1.0

    def gauss_score(x, sigma):
        return -x / var

    x = _call(
        name,
        fn,
        gauss_score,
        torch.zeros(20_000, 1, dtype=torch.float64),
        torch.tensor([1.0]),
        200,
        delta,
        g,
    )
    if not (torch.is_tensor(x) and x.shape == (20_000, 1)):
        raise ExerciseFailed(f"{name}: return the final particles, a tensor shaped like x.")
    want = var / (1 - delta / (2 * var))  # the finite-step stationary variance of eq-langevin
    got = x.var().item()
    if not abs(got - want) < 0.1:  # standard error about 0.03
        raise ExerciseFailed(
            f"{name}: with one level, score -x/{var:g} and step_size {delta:g}, your chain's "
            f"variance settles at {got:.3f}, off by {abs(got - want):.3f} from what eq. eq-langevin "
            "gives at this finite step. Hint: use the book's convention, the step size multiplies "
            "the score once and the noise has variance twice the step; at a single level the step "
            "is step_size itself."
        )
    # 2. the two-mode mixture from a uniform start: annealing must recover the weights 0.2 / 0.8
    sigmas = 20.0 * (0.17 / 20.0) ** torch.linspace(0, 1, 10, dtype=torch.float64)
    g = torch.Generator().manual_seed(22)
    x_init = torch.rand(2000, 2, generator=g, dtype=torch.float64) * 16 - 8
    x = _call(name, fn, score, x_init.clone(), sigmas, 50, 0.01, g)
    if not (torch.is_tensor(x) and x.shape == x_init.shape) or not torch.isfinite(x).all():
        raise ExerciseFailed(f"{name}: return finite particles shaped like x.")
    target = _noisy_mixture(means, 1.0, weights, sigmas[-1].item())
    w_big = mode_coverage(x, target)["weights"][1]
    if not abs(w_big - 0.8) < 0.06:
        raise ExerciseFailed(
            f"{name}: the weight of the 0.8 mode is {w_big:.3f}. Hint: the levels must run from "
            "the largest sigma to the smallest, and the step at level i must grow with sigma_i^2 "
            "(relative to the last level), or the particles cannot move between the modes."
        )
    # spread inside the modes, in units of the last level's variance 1 + sigma_L^2: 1 if exact
    d2 = torch.cdist(x.double(), target.means).min(1).values ** 2
    spread = (d2.mean() / (2 * (1 + sigmas[-1] ** 2))).item()
    if not abs(spread - 1) < 0.15:
        raise ExerciseFailed(
            f"{name}: the mode weights are right but the spread inside the modes is {spread:.3f} "
            "times that of the noisy data at the last level. Hint: end at the smallest sigma, "
            "and run n_steps steps at every level."
        )
    print(
        f"{name}: correct. One-level variance {got:.3f} (finite-step theory {want:.3f});\n"
        f"0.8-mode weight {w_big:.3f}; spread inside the modes {spread:.3f} (data: 1)."
    )
    return True


def check_reverse_sde_sampler(fn) -> bool:
    """Exercise (Chapter 2): ``fn(score, drift_diffusion, x_T, ts, generator)``, Euler-Maruyama
    on the reverse SDE; the check measures its weak error and its order on Gaussian data."""
    from ..schedules import get_schedule

    name = "reverse_sde_sampler"
    sched = get_schedule("linear")
    m, s, dim, n = 1.0, 0.5, 4, 100_000

    def score(x, t):  # the exact score of q_t = N(alpha m, alpha^2 s^2 + sigma^2) per coordinate
        t = torch.as_tensor(t, dtype=torch.float64)
        a, sig = sched.alpha(t), sched.sigma(t)
        return -(x - a * m) / (a**2 * s**2 + sig**2)

    t_end = 1e-3
    a_end = sched.alpha(torch.tensor(t_end, dtype=torch.float64)).item()
    mean_end, var_end = a_end * m, a_end**2 * s**2 + sched.sigma(torch.tensor(t_end)).item() ** 2
    a1 = sched.alpha(torch.tensor(1.0, dtype=torch.float64)).item()
    v1 = a1**2 * s**2 + sched.sigma(torch.tensor(1.0)).item() ** 2
    errors, steps = [], (8, 16, 32)
    for k, n_steps in enumerate(steps):
        g = torch.Generator().manual_seed(30 + k)
        x_T = a1 * m + v1**0.5 * torch.randn(n, dim, generator=g, dtype=torch.float64)  # exact q_1
        ts = torch.linspace(1.0, t_end, n_steps + 1, dtype=torch.float64)
        x = _call(name, fn, score, sched.drift_diffusion, x_T, ts, g)
        if not (torch.is_tensor(x) and x.shape == x_T.shape) or not torch.isfinite(x).all():
            raise ExerciseFailed(f"{name}: return finite samples shaped like x_T at the last time.")
        errors.append(abs(x.mean().item() - mean_end) + abs(x.var().item() - var_end))
    ratio = errors[-2] / errors[-1]
    table = ", ".join(f"N={k}: {e:.4f}" for k, e in zip(steps, errors))
    if not (errors[-1] < 0.05 and 1.5 < ratio < 3.0):
        raise ExerciseFailed(
            f"{name}: weak errors |mean error| + |variance error| at t = {t_end:g}: {table} "
            "(a first-order method: about halved when N doubles, and small). Hint: step backwards "
            "with dt = t - s > 0 using the full reverse drift f x - g^2 score (not the ODE's "
            "half), evaluated at the current time t, and add noise of variance g^2 dt."
        )
    print(
        f"{name}: correct. Weak errors {table};\n"
        f"halving the step divides the error by {ratio:.2f} (first order)."
    )
    return True


def check_sliced_score_matching(fn) -> bool:
    """Exercise (Chapter 2): ``fn(score_fn, x, n_projections, generator)``, the per-sample sliced
    score-matching objective; the check compares its mean with the exact ESM on the oracle."""
    from ..data import eight_gaussians
    from ..oracle import MixtureOracle
    from ..schedules import get_schedule

    name = "sliced_score_matching"
    sched, t, n = get_schedule("linear"), 0.2, 4000
    mix = eight_gaussians()
    oracle = MixtureOracle(mix, sched)
    g = torch.Generator().manual_seed(40)
    a = sched.alpha(torch.tensor(t, dtype=torch.float64))
    sig = sched.sigma(torch.tensor(t, dtype=torch.float64))
    x = a * mix.sample(n, g, dtype=torch.float64) + sig * torch.randn(n, 2, generator=g, dtype=torch.float64)
    true = oracle.score(x, t)
    shift = torch.tensor([0.3, -0.2], dtype=torch.float64)
    models = {
        "the exact score": lambda y: oracle.score(y, t),
        "half the score": lambda y: 0.5 * oracle.score(y, t),
        "the score shifted": lambda y: oracle.score(y, t) + shift,
        "a linear field": lambda y: -1.5 * y + torch.stack([y[:, 1], -y[:, 0]], 1) * 0.5,
    }
    lines = []
    for label, model in models.items():
        got = _call(name, fn, model, x, 4, torch.Generator().manual_seed(41))
        if not torch.is_tensor(got) or got.shape != (n,):
            raise ExerciseFailed(f"{name}: return one value per sample, shape ({n},).")
        got = got.detach()
        with torch.no_grad():
            esm = ((model(x) - true) ** 2).sum(1)
        # Hyvarinen: ESM / 2 = J + E||grad log p||^2 / 2, so J - ESM / 2 + ||true||^2 / 2 has mean 0
        gap = got - esm / 2 + true.pow(2).sum(1) / 2
        se = gap.std().item() / n**0.5
        if not abs(gap.mean().item()) < 5 * se + 1e-6:
            raise ExerciseFailed(
                f"{name}: for {label}, your objective's mean is {got.mean().item():.3f}, which is "
                f"{abs(gap.mean().item()):.3f} ({abs(gap.mean().item()) / se:.0f} standard errors) "
                "from what the exact Fisher divergence implies. Hint: SSM estimates "
                "tr(grad_x s) + ||s||^2 / 2 per sample; the trace is v^T (grad_x s) v for Gaussian "
                "v, which one backward pass of v^T s gives (create the graph on x)."
            )
        lines.append(f"{label}: {got.mean().item():.3f}")
    print(
        f"{name}: correct; its mean equals ESM/2 minus the same constant for every "
        "model:\n" + "\n".join(lines)
    )
    return True
