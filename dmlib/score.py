"""Score matching and Langevin dynamics: learning ``grad log p`` and sampling with it.

Four ways to fit a score model ``s(x) ~ grad_x log p(x)``, per sample, so callers can average and
attach standard errors:

- explicit score matching (ESM), ``||s(x) - grad log p(x)||^2``: needs the true score, which only
  an oracle has (Hyvarinen 2005, eq. 2);
- implicit score matching (ISM), ``tr(grad_x s(x)) + ||s(x)||^2 / 2``: equal to ESM / 2 up to a
  constant, no true score needed (Hyvarinen 2005, Theorem 1), but a D-term trace;
- sliced score matching (SSM), ``v^T grad_x s(x) v + ||s(x)||^2 / 2`` with random ``v``: the trace
  estimated by random projections (Song et al. 2019, eq. 8, the variance-reduced "SSM-VR");
- denoising score matching (DSM), ``||s(x_t, t) + eps / sigma(t)||^2`` with ``x_t = alpha x_0 +
  sigma eps``: the score of the *noisy* data, equal to ESM at that noise level up to a constant
  (Vincent 2011, appendix), which is what diffusion models train.

Langevin dynamics turns a score into samples. The book writes every Langevin step in one convention,
with step size ``delta`` (Chapter 2, eq. ``eq-langevin``; the notation page)::

    x <- x + delta * score(x) + sqrt(2 delta) z,     z ~ N(0, I),

the Euler-Maruyama step of ``dx = grad log p(x) dt + sqrt(2) dw``, whose stationary law is ``p``.
The unadjusted Langevin algorithm of Roberts & Tweedie (1996) and Algorithm 1 of Song & Ermon
(2019) write ``x + (h / 2) score + sqrt(h) z``: the same step with ``delta = h / 2``.
Song & Ermon (2019) used it to sample with a learned score; the method itself is older.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm

from .ddpm import check_timesteps, uniform_time
from .parameterization import PREDICTIONS, Denoiser, _col, noise_like, to_x0_eps
from .schedules import Schedule, as_time

WEIGHTINGS = ("sigma2", "likelihood", "none")


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).sum(1)


def explicit_score_matching(score: torch.Tensor, true_score: torch.Tensor) -> torch.Tensor:
    """ESM per sample, ``||s(x) - grad log p(x)||^2`` (Hyvarinen 2005, eq. 2, without the 1/2)."""
    if score.shape != true_score.shape:
        raise ValueError(
            f"score and true_score differ in shape: {tuple(score.shape)} vs {tuple(true_score.shape)}."
        )
    return _per_sample((score - true_score) ** 2)


def denoising_score_matching(score: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """DSM per sample, ``||s(x_t) + eps / sigma||^2``: ``-eps / sigma`` is the score of
    ``q(x_t | x_0) = N(alpha x_0, sigma^2 I)`` at ``x_t`` (Vincent 2011, eq. 11)."""
    if score.shape != noise.shape:
        raise ValueError(f"score and noise differ in shape: {tuple(score.shape)} vs {tuple(noise.shape)}.")
    return _per_sample((score + noise / _col(torch.as_tensor(sigma), noise)) ** 2)


def implicit_score_matching(score_fn: Callable, x: torch.Tensor) -> torch.Tensor:
    """ISM per sample, ``tr(grad_x s(x)) + ||s(x)||^2 / 2``, the trace exact by one backward pass per
    dimension (Hyvarinen 2005, Theorem 1). Fine in 2D; for images use :func:`sliced_score_matching`."""
    x = x.detach().requires_grad_(True)
    s = score_fn(x)
    flat = s.flatten(1)
    trace = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for d in range(flat.shape[1]):
        grad = torch.autograd.grad(flat[:, d].sum(), x, create_graph=True)[0].flatten(1)
        trace = trace + grad[:, d]
    return trace + 0.5 * _per_sample(s**2)


def sliced_score_matching(
    score_fn: Callable, x: torch.Tensor, n_projections: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """SSM-VR per sample, ``E_v[v^T grad_x s(x) v] + ||s(x)||^2 / 2`` with Gaussian ``v``
    (Song et al. 2019, eq. 8): ``v^T grad_x s v = grad_x (v^T s) . v`` costs one backward pass per
    projection, whatever the dimension."""
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1; got {n_projections}.")
    x = x.detach().requires_grad_(True)
    s = score_fn(x)
    quad = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(n_projections):
        v = noise_like(x, generator)
        grad_vs = torch.autograd.grad(_per_sample(v * s).sum(), x, create_graph=True)[0]
        quad = quad + _per_sample(grad_vs * v) / n_projections
    return quad + 0.5 * _per_sample(s**2)


def weighting(schedule: Schedule, t, kind: str) -> torch.Tensor:
    """The weight ``omega(t)`` of the DSM loss: ``"sigma2"`` (``sigma(t)^2``, Song & Ermon 2019),
    ``"likelihood"`` (``g(t)^2``, Song et al. 2021b, which makes the loss a bound on the NLL) or
    ``"none"``. (Song et al. write the weight ``lambda(t)``; here ``lambda`` is the log-SNR.)

    These weight time; :func:`dmlib.parameterization.loss_weight` weights log-SNR, on the eps-MSE, and the
    two meet through ``omega / sigma^2 = w / p_t`` (``p_t`` the log-SNR density of uniform t): ``"sigma2"``
    is its ``"eps"`` and ``"likelihood"`` its ``"elbo"`` (Chapter 7)."""
    t = as_time(t)
    if kind == "sigma2":
        return schedule.sigma(t) ** 2
    if kind == "likelihood":
        return schedule.drift_diffusion(t)[1].to(t.dtype)
    if kind == "none":
        return torch.ones_like(t)
    raise ValueError(f"unknown weighting {kind!r}; choose one of {', '.join(WEIGHTINGS)}.")


_omega = weighting  # score_matching_loss's argument of the same name hides the function


def score_matching_loss(
    schedule: Schedule,
    *,
    weighting: str = "sigma2",
    prediction: str = "eps",
    t_min: float = 1e-3,
    importance: bool = False,
) -> Callable:
    """The training loss of a noise-conditional score model (Song et al. 2021, eq. 7),
    ``E_t[omega(t) E ||s(x_t, t) + eps / sigma(t)||^2] / D`` with ``t ~ U(t_min, 1]``, as a loss
    function ``loss(model, x0, generator=None)`` for :func:`dmlib.train.train`.

    ``model(x_t, t)`` predicts ``prediction`` (eps, x0, v or score), read as a score through
    :class:`~dmlib.parameterization.Denoiser` algebra. ``weighting`` names ``omega``
    (:func:`weighting`). With ``omega = sigma^2`` and an eps model the integrand is
    ``||eps_hat - eps||^2``: exactly DDPM's ``L_simple`` (divided by D, a mean over dimensions as in
    :func:`dmlib.ddpm.simple_loss`). ``t_min > 0`` keeps ``g^2 / sigma^2 ~ 1 / t`` of the likelihood
    weighting bounded; ``t`` never equals ``t_min`` (:func:`dmlib.ddpm.uniform_time`), so even
    ``t_min = 0`` never divides by ``sigma = 0``.

    ``importance=True`` (likelihood weighting only) draws t with density proportional to
    ``g^2 / sigma^2 = -d lambda / dt`` instead, i.e. log-SNR ``lambda`` uniform on
    ``[lambda(1), lambda(t_min)]`` (Song et al. 2021b, sec. 5 use importance sampling for the same
    reason): the integrand becomes ``||eps_hat - eps||^2`` times the constant
    ``(lambda(t_min) - lambda(1)) / (1 - t_min)``, with the same expectation and far less variance.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}.")
    if not 0 <= t_min < 1:
        raise ValueError(f"t_min must lie in [0, 1); got {t_min}.")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}.")
    if importance and weighting != "likelihood":
        raise ValueError("importance sampling of t is defined for weighting='likelihood' only.")
    if importance and not torch.isfinite(schedule.log_snr(torch.tensor(float(t_min)))):
        raise ValueError(f"importance sampling needs a finite log-SNR at t_min={t_min}; raise t_min.")

    def loss(model: Callable, x0: torch.Tensor, generator: torch.Generator | None = None):
        if importance:
            u = torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype, device=x0.device)
            lam_lo, lam_hi = (schedule.log_snr(torch.tensor(t, device=x0.device)) for t in (1.0, t_min))
            t = schedule.t_from_log_snr(lam_lo + u.double() * (lam_hi - lam_lo)).to(x0.dtype)
        else:
            t = uniform_time(x0, generator, t_min)
        noise = noise_like(x0, generator)
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        x_t = _col(alpha, x0) * x0 + _col(sigma, x0) * noise
        _, eps_hat = to_x0_eps(model(x_t, t), prediction, x_t, alpha, sigma)
        # omega ||s + eps/sigma||^2 = omega / sigma^2 ||eps_hat - eps||^2 with s = -eps_hat / sigma
        if importance:  # (g^2 / sigma^2) / p(t) is the constant (lambda(t_min) - lambda(1)) / (1 - t_min)
            omega_over_var = ((lam_hi - lam_lo) / (1 - t_min)).to(x0.dtype).expand(x0.shape[0])
        else:
            omega_over_var = _omega(schedule, t, weighting).to(x0.dtype) / sigma**2
        per_sample = (eps_hat - noise).flatten(1).pow(2).mean(1)
        return (omega_over_var * per_sample).mean()

    return loss


def langevin(
    score_fn: Callable,
    x: torch.Tensor,
    *,
    step_size: float,
    n_steps: int,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callable | None = None,
) -> torch.Tensor:
    """Langevin dynamics for a fixed density, in the book's convention (Chapter 2, eq.
    ``eq-langevin``): ``x <- x + delta score(x) + sqrt(2 delta) z`` with ``delta = step_size``.

    The unadjusted Langevin algorithm (Roberts & Tweedie 1996) and Song & Ermon (2019, eq. 4)
    write ``x + (h / 2) score + sqrt(h) z``; pass ``step_size = h / 2``. Exact as ``delta -> 0``
    and ``n_steps -> inf``; on ``N(m, s^2)`` the chain's stationary variance is
    ``s^2 / (1 - delta / (2 s^2))``. In practice it cannot cross the low-density gaps between
    modes (sec. 3.2.2 of Song & Ermon)."""
    if step_size <= 0 or n_steps < 1:
        raise ValueError(f"need step_size > 0 and n_steps >= 1; got {step_size}, {n_steps}.")
    for i in tqdm(range(n_steps), disable=not progress, desc="Langevin"):
        z = noise_like(x, generator)
        x = x + step_size * score_fn(x) + (2 * step_size) ** 0.5 * z
        if callback is not None:
            callback(i + 1, None, x)
    return x


@torch.no_grad()
def sample_annealed_langevin(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    timesteps,
    *,
    n_steps: int = 100,
    step_size: float = 1e-5,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callable | None = None,
) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1), with the sampler signature.

    Each time in ``timesteps`` is a noise level ``sigma_i = sigma(t_i)``; at each level it runs
    ``n_steps`` steps of :func:`langevin` (``x <- x + delta_i score + sqrt(2 delta_i) z``) with
    ``delta_i = step_size * sigma_i^2 / sigma_L^2`` (``sigma_L``: the last level above 0), so
    ``step_size`` is the step ``delta`` at the last level. Song & Ermon's Algorithm 1 writes
    ``alpha_i = eps sigma_i^2 / sigma_L^2`` in the ``x + (alpha_i / 2) score + sqrt(alpha_i) z``
    convention: ``delta_i = alpha_i / 2``, and their ``eps = 2e-5`` is the default
    ``step_size = 1e-5``. With a VE schedule, uniform times are NCSN's geometric sigmas. If the
    last time is 0 the result is the denoiser's ``E[x_0 | x]`` at the last level
    (Jolicoeur-Martineau et al. 2021's denoising step). Network evaluations: ``n_steps`` per
    positive level.
    """
    ts = check_timesteps(timesteps)
    levels = ts[ts > 0]
    sigmas = denoiser.schedule.sigma(levels.to(torch.float64))
    x = x_T
    if callback is not None:
        callback(0, ts[0], x)
    for i in tqdm(range(len(levels)), disable=not progress, desc="annealed Langevin"):
        t = levels[i].to(x.dtype)
        delta_i = step_size * (sigmas[i] / sigmas[-1]).item() ** 2

        def score_fn(y, t=t):
            return denoiser.score(y, t)

        x = langevin(score_fn, x, step_size=delta_i, n_steps=n_steps, generator=generator)
        if callback is not None:
            callback(i + 1, levels[i], x)
    if ts[-1] == 0:
        x = denoiser.x0(x, levels[-1].to(x.dtype))
        if callback is not None:
            callback(len(levels) + 1, ts[-1], x)
    return x
