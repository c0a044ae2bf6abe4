"""Likelihood: from the variational bound to exact log-likelihoods (Chapter 4).

Every number here is in nats per sample unless a name says bits; :func:`bits_per_dim` converts.
The pieces, in the order of the chapter:

* units and pixel data: :func:`bits_per_dim`, the discretized Gaussian decoder of Ho et al. (2020,
  eq. 13) and uniform dequantization;
* the discrete-time bound (Ho et al. 2020, eq. 5) with a choice of reverse variance: fixed ``beta``
  or ``betatilde``, iDDPM's learned interpolation (Nichol & Dhariwal 2021, eq. 15) or
  Analytic-DPM's optimal variance (Bao et al. 2022, Theorem 1), and iDDPM's hybrid loss;
* the continuous-time bound: VDM's diffusion loss (Kingma et al. 2021, eq. 17) with its learned
  monotone schedule, which equals the likelihood-weighted (``g^2``) denoising score matching bound
  of ScoreFlow (Song et al. 2021b, Theorem 3);
* the exact log-likelihood through the probability-flow ODE (Song et al. 2021, appendix D.2;
  Chen et al. 2018), with an exact divergence or the Skilling-Hutchinson estimator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .ddpm import (  # noqa: F401  (variance_table re-exported: Chapter 4 reads it here)
    _grid,
    _posterior_coefficients,
    gaussian_kl,
    gaussian_nll,
    q_sample,
    variance_table,
    vlb_terms,
)
from .nets.mlp import MLP
from .parameterization import Denoiser, _col, noise_like
from .schedules import Schedule, VarianceExploding, VariancePreserving, as_time
from .sde import pf_ode_drift

# ---------------------------------------------------------------------------------------------
# Units, pixel data, the prior
# ---------------------------------------------------------------------------------------------


def bits_per_dim(nats, dim: int):
    """``nats / (dim ln 2)``: a per-sample negative log-likelihood in bits per dimension."""
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be a positive integer (numbers per sample); got {dim!r}.")
    return nats / (dim * math.log(2))


def _check_bins(bins) -> int:
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2 (256 for 8-bit pixels); got {bins!r}.")
    return int(bins)


def _pixel_index(x: torch.Tensor, bins) -> tuple[torch.Tensor, int]:
    """The pixel value ``k`` of each coordinate of ``x = -1 + 2k / (bins - 1)``, checked to be on the grid."""
    bins = _check_bins(bins)
    k = (x + 1) * (bins - 1) / 2
    if (k < -1e-3).any() or (k > bins - 1 + 1e-3).any() or ((k - k.round()).abs() > 1e-3).any():
        raise ValueError(
            f"x must lie on the {bins}-level grid -1 + 2k/{bins - 1} (pixels scaled to [-1, 1]); "
            f"got values from {x.min().item():g} to {x.max().item():g}, not all on the grid."
        )
    return k.round(), bins


def _log_normal_mass(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(Phi(b) - Phi(a))`` for ``a < b``, stable in both tails: above 0 it uses the mirror
    image ``Phi(-a) - Phi(-b)``, so the difference is never taken between two numbers near 1."""
    flip = a > 0
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp(log_lo - log_hi))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, var, *, bins: int = 256):
    """``log p(x | mean, var)`` of the discretized Gaussian decoder, Ho et al. (2020) eq. 13, per sample.

    Pixel data ``0..bins-1`` scaled to ``[-1, 1]`` lies on the grid ``x_k = -1 + 2k / (bins - 1)``.
    Each coordinate gets the Gaussian mass of its bin ``[x - 1/(bins-1), x + 1/(bins-1)]``; the
    edge bins extend to ``-inf`` and ``+inf``, so the masses of all ``bins`` values sum to 1 and the
    result is a probability (a log-likelihood <= 0), not a density. ``var`` is a number, one per
    sample, or one per coordinate.
    """
    if mean.shape != x.shape:
        raise ValueError(f"mean must have the shape of x {tuple(x.shape)}; got {tuple(mean.shape)}.")
    k, bins = _pixel_index(x, bins)
    half = 1.0 / (bins - 1)
    std = _col(torch.as_tensor(var, dtype=x.dtype), x).sqrt()
    inf = torch.full_like(x, math.inf)
    upper = torch.where(k == bins - 1, inf, (x + half - mean) / std)
    lower = torch.where(k == 0, -inf, (x - half - mean) / std)
    return _log_normal_mass(lower, upper).flatten(1).sum(1)


def uniform_dequantize(x: torch.Tensor, *, bins: int = 256, generator=None):
    """Uniform dequantization (Theis et al. 2016), as behind published bits/dim: ``(y, log_volume)``.

    Pixel ``k`` (``x = -1 + 2k / (bins - 1)``) becomes ``y = -1 + 2 (k + u) / bins`` with
    ``u ~ U[0, 1)^D``, so the bins tile ``[-1, 1)``, each of volume ``(2 / bins)^D``. For any continuous
    density ``p``, Jensen's inequality gives ``-log P(k) <= E_u[-log p(y)] - log_volume``, with
    ``log_volume = D log(2 / bins)`` per sample; in bits/dim that is ``+ log2(bins / 2)`` (7 for 8-bit data).
    """
    k, bins = _pixel_index(x, bins)
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    dim = x[0].numel() if x.ndim else 1
    log_volume = torch.full(x.shape[:1], dim * math.log(2 / bins), dtype=x.dtype, device=x.device)
    return -1 + 2 * (k + u) / bins, log_volume


def prior_std(schedule: Schedule) -> float:
    """Scale of the prior ``N(0, s^2 I)`` for ``x_1``: ``sigma_max`` for VE (Song et al. 2021's VE prior),
    1 for the VP, sub-VP and learned VP schedules (there ``x_1`` is ``N(0, I)`` up to ``alpha(1) x_0``)."""
    return float(schedule.sigma(1.0)) if isinstance(schedule, VarianceExploding) else 1.0


def prior_log_prob(schedule: Schedule, x_T: torch.Tensor) -> torch.Tensor:
    """``log N(x_T; 0, s^2 I)`` per sample, ``s = prior_std(schedule)``."""
    s2 = prior_std(schedule) ** 2
    return -0.5 * (x_T**2 / s2 + math.log(2 * math.pi * s2)).flatten(1).sum(1)


def prior_kl(schedule: Schedule, x0: torch.Tensor) -> torch.Tensor:
    """``L_T = KL(q(x_1 | x_0) || N(0, s^2 I))`` per sample, in closed form (Ho et al. 2020, eq. 5)."""
    a, s = schedule.alpha(1.0).to(x0.dtype), schedule.sigma(1.0).to(x0.dtype)
    return gaussian_kl(a * x0, s**2, torch.zeros_like(x0), prior_std(schedule) ** 2)


# ---------------------------------------------------------------------------------------------
# Discrete time: the variational bound with four reverse variances
# ---------------------------------------------------------------------------------------------


@dataclass
class VLB:
    """The terms of a variational bound, in nats, shape ``(B, T + 1)``: column 0 is the decoder
    ``L_0 = -log p(x_0 | x_1)``, column ``i`` for ``1 <= i < T`` is ``KL(q(x_i | x_{i+1}, x_0) || p(x_i | x_{i+1}))``
    and column ``T`` the prior term (the layout of :func:`dmlib.ddpm.vlb_terms`)."""

    terms: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        """The negative ELBO per sample: an upper bound on ``-log p_theta(x_0)``."""
        return self.terms.sum(1)


def _chain_tables(schedule: Schedule, T: int) -> dict[str, torch.Tensor]:
    """Per-step coefficients of the ``T``-step chain in float64, indexed by ``i = 1..T`` (entry 0 unused):
    the marginal ``alpha_i, sigma_i``; the posterior of eq. 7 (``coef_x0``, ``coef_xt``, ``var_q``); the
    noise form of its mean (eq. 11: ``mean = (x_t - eps_coef eps) / sqrt_ratio``); and ``log beta``,
    ``log betatilde`` with iDDPM's clipping (``betatilde_1 = 0`` replaced by ``betatilde_2``, their
    ``posterior_log_variance_clipped``). One call per loss evaluation, not one per sample."""
    grid = _grid(T)
    t, s = grid[1:], grid[:-1]
    coef_x0, coef_xt, var_q = _posterior_coefficients(schedule, t, s)
    a_ts, var_ts = schedule.transition(t, s)
    sigma = schedule.sigma(grid)
    betatilde = var_q.clone()
    betatilde[0] = var_q[1] if T > 1 else var_ts[0]

    def pad(v):
        return torch.cat([v.new_zeros(1), v])

    return {
        "alpha": schedule.alpha(grid),
        "sigma": sigma,
        "coef_x0": pad(coef_x0),
        "coef_xt": pad(coef_xt),
        "var_q": pad(var_q),
        "eps_coef": pad(var_ts / sigma[1:]),
        "sqrt_ratio": pad(a_ts),
        "log_beta": pad(var_ts.log()),
        "log_betatilde": pad(betatilde.log()),
    }


def _sigma_at(schedule: Schedule, t: float) -> float:
    with torch.no_grad():  # a learned schedule's sigma carries a graph; only its value is wanted here
        return float(schedule.sigma(float(t)))


def _check_data_at_zero(schedule: Schedule):
    if _sigma_at(schedule, 0.0) > 0:
        raise ValueError(
            f"the discrete bound needs sigma(0) = 0 (the chain starts at the data); {type(schedule).__name__} "
            f"has sigma(0) = {_sigma_at(schedule, 0.0):g}: use continuous_vlb."
        )


def _decoder_nll(decoder: str, x0, mean, var, bins):
    if decoder == "gaussian":
        return gaussian_nll(x0, mean, var)
    if decoder == "discretized":
        return -discretized_gaussian_log_likelihood(x0, mean, var, bins=bins)
    raise ValueError(f"unknown decoder {decoder!r}; choose 'gaussian' (continuous data) or 'discretized'.")


def discrete_vlb(
    denoiser: Denoiser,
    x0: torch.Tensor,
    T: int,
    *,
    variance: str | torch.Tensor | Callable = "betatilde",
    decoder: str = "gaussian",
    bins: int = 256,
    generator: torch.Generator | None = None,
) -> VLB:
    """Monte Carlo estimate of the variational bound (Ho et al. 2020, eq. 5) on the ``T``-step chain.

    The reverse mean is always the posterior mean at ``x0_hat`` (eq. 7); ``variance`` picks the
    reverse variance:

    * ``"beta"`` or ``"betatilde"``: the fixed tables of :func:`variance_table`;
    * a tensor of shape ``(T + 1,)``: per-step variances, e.g. :func:`analytic_dpm_variances`;
    * a callable ``v(x_t, t)`` (e.g. :meth:`LearnedVarianceMLP.fraction`): iDDPM's learned variance
      ``Sigma = exp(v log beta + (1 - v) log betatilde)`` (Nichol & Dhariwal 2021, eq. 15).

    ``decoder="discretized"`` scores pixel data with eq. 13 (a probability, so the bound is on the
    discrete NLL); ``"gaussian"`` uses a density, for continuous data. The same ``generator`` seed
    gives the same ``x_t`` draws, so variants are compared on common random numbers.

    The cosine schedule's last step has ``beta_T`` within 1e-5 of 1 (``abar(1) = 2e-9``; iDDPM clips
    ``beta`` at 0.999 instead), so the mean divides ``eps`` by ``alpha_{T|T-1} ~ 3e-3`` and a trained
    model's last KL term dominates: 646 of 647 nats on eight_gaussians at ``T = 100`` (MLP, 1500 steps).
    """
    sched = denoiser.schedule
    _check_data_at_zero(sched)
    _grid(T)
    if isinstance(variance, str):
        table = variance_table(sched, T, variance)
    elif torch.is_tensor(variance):
        table = variance.to(torch.float64)  # on any device: only table[i] meets the data
        if table.shape != (T + 1,) or (~(table[1:] > 0)).any():
            raise ValueError(f"a variance tensor must have shape ({T + 1},) and positive entries 1..T.")
    elif callable(variance):
        tab, grid = _chain_tables(sched, T), _grid(T)

        def table(x_t, i):  # eq. 15: Sigma = exp(v log beta + (1 - v) log betatilde)
            v = variance(x_t, grid[i].to(x0.dtype))
            return torch.exp(v * tab["log_beta"][i].to(v) + (1 - v) * tab["log_betatilde"][i].to(v))

    else:
        raise ValueError(
            f"variance must be 'beta', 'betatilde', a ({T + 1},) tensor or a callable v(x_t, t)."
        )
    _decoder_nll(decoder, x0[:0], x0[:0], 1.0, bins)  # a clear error for a bad decoder before any work

    def decoder_nll(x, mean, var):
        return _decoder_nll(decoder, x, mean, var, bins)

    return VLB(vlb_terms(denoiser, x0, T, variance=table, decoder_nll=decoder_nll, generator=generator))


@torch.no_grad()
def analytic_dpm_variances(
    denoiser: Denoiser,
    data: torch.Tensor,
    T: int,
    *,
    estimator: str = "score",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Analytic-DPM's optimal reverse variance per step (Bao et al. 2022, Theorem 1), shape ``(T + 1,)``.

    Moment matching the reverse step ``t -> s`` whose mean is the posterior mean at
    ``x0_hat = E[x_0 | x_t]`` gives ``sigma*^2 = lambda^2 + c^2 E[tr Cov(x_0 | x_t)] / d`` with
    ``lambda^2 = betatilde`` and ``c = alpha_s sigma_{t|s}^2 / sigma_t^2`` (the ``x_0`` coefficient of
    eq. 7). ``estimator`` says how the covariance term is estimated by Monte Carlo over ``data``
    (draw them apart from the points you evaluate on):

    * ``"score"`` (Bao et al.): Tweedie's formula, ``E tr Cov(x_0 | x_t) / d = (sigma_t^2 / alpha_t^2)
      (1 - sigma_t^2 Gamma_t)`` with ``Gamma_t = E||grad log q_t||^2 / d = E||eps_hat||^2 / (d sigma_t^2)``.
      For DDPM this is their ``betatilde_n + (sqrt(bbar_n / alpha_n) - sqrt(bbar_{n-1} - betatilde_n))^2
      (1 - bbar_n Gamma_n) = betatilde_n + beta_n^2 / (alpha_n bbar_n) (1 - bbar_n Gamma_n)``, ``bbar = 1 - abar``.
      It assumes the score is exact.
    * ``"residual"``: ``E||x_0 - x0_hat||^2 / d = (sigma_t^2 / alpha_t^2) E||eps - eps_hat||^2 / d``, the
      optimal variance for the model's own, imperfect mean (the target of NPR-DPM, Bao et al. 2022b,
      here estimated instead of learned). Equal to ``"score"`` for an exact denoiser.

    Near ``t = 1`` the factor ``sigma^2 / alpha^2`` multiplies the Monte Carlo error of
    ``1 - sigma^2 Gamma`` by up to ``e^20``, so the covariance term is clipped to ``[0, Var(x_0)]``
    (``E Cov(x_0 | x_t) <= Cov(x_0)``, the law of total variance; ``Var`` is the per-coordinate
    variance of ``data``, averaged). That clip is this book's choice: Bao et al. clip to the bounds
    of their Theorem 2, which use the data's range (``[0, ((b - a) / 2)^2]`` for data in ``[a, b]``).
    Entry ``i`` is the variance of step ``i -> i - 1``; at ``i = 1`` (``betatilde_1 = 0``,
    ``c = 1``) it is the decoder variance.
    """
    if estimator not in ("score", "residual"):
        raise ValueError(f"unknown estimator {estimator!r}; choose 'score' (Bao et al.) or 'residual'.")
    sched = denoiser.schedule
    _check_data_at_zero(sched)
    grid = _grid(T)
    data_var = data.to(torch.float64).flatten(1).var(0).mean()
    out = torch.zeros(T + 1, dtype=torch.float64, device=data.device)
    for i in range(1, T + 1):
        t, s = grid[i], grid[i - 1]
        noise = noise_like(data, generator)
        eps_hat = denoiser.eps(q_sample(sched, data, t.to(data.dtype), noise), t.to(data.dtype))
        inv_snr = (sched.sigma(t) / sched.alpha(t)) ** 2
        if estimator == "score":
            cov = inv_snr * (1 - eps_hat.to(torch.float64).flatten(1).pow(2).mean())  # 1 - sigma^2 Gamma
        else:
            cov = inv_snr * (noise - eps_hat).to(torch.float64).flatten(1).pow(2).mean()
        c, _, lam2 = _posterior_coefficients(sched, t, s)
        out[i] = lam2 + c**2 * cov.clamp(min=0).minimum(data_var)
    return out


# ---------------------------------------------------------------------------------------------
# iDDPM: a network that also outputs the variance, and the hybrid loss
# ---------------------------------------------------------------------------------------------


class LearnedVarianceMLP(nn.Module):
    """An :class:`~dmlib.nets.mlp.MLP` whose head is widened to ``2 * dim`` outputs: ``eps`` and the
    raw interpolation ``r``, mapped to ``v = (r + 1) / 2`` as in iDDPM's code. ``v`` is not
    constrained to [0, 1] (Nichol & Dhariwal 2021, sec. 3.1 say they apply no constraint)."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 32):
        super().__init__()
        self.dim = dim
        self.body = MLP(dim, hidden, depth, time_dim)
        self.body.net[-1] = nn.Linear(self.body.net[-1].in_features, 2 * dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.body(x, t)

    def eps_v(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        eps, raw = self(x, t).split(self.dim, dim=1)
        return eps, (raw + 1) / 2

    def fraction(self, x: torch.Tensor, t) -> torch.Tensor:
        """The interpolation ``v(x_t, t)`` of eq. 15 (for :func:`discrete_vlb`'s ``variance``)."""
        return self.eps_v(x, t)[1]

    def denoiser(self, schedule: Schedule) -> Denoiser:
        """The noise prediction as a :class:`~dmlib.parameterization.Denoiser`."""
        return Denoiser(lambda x, t: self.eps_v(x, t)[0], schedule, prediction="eps")


def hybrid_loss(
    schedule: Schedule, T: int, *, lam: float = 1e-3, decoder: str = "gaussian", bins: int = 256
) -> Callable:
    """``L_hybrid = L_simple + lam L_vlb`` (Nichol & Dhariwal 2021, eq. 16, ``lam = 0.001``), as a
    loss function ``loss(model, x0, generator=None)`` of a :class:`LearnedVarianceMLP` for
    :func:`dmlib.train.train`.

    One step ``i ~ U{1..T}`` per sample: ``L_simple`` is the mean squared noise error and ``L_vlb``
    is ``T`` times that step's term (an unbiased estimate of the sum), with the mean computed from a
    detached ``eps`` so that ``L_vlb`` trains only the variance (their sec. 3.1 "stop-gradient").
    As in iDDPM's code the term is measured in bits per dimension, which sets the scale ``lam`` was tuned for.

    With few steps, avoid the cosine schedule: its last jump (``abar(1) ~ 2e-9``) divides the mean by
    ``alpha_{T|T-1}``, about 1e-3 at ``T = 20``, so the ``L_vlb`` term of an imperfect ``eps`` explodes
    (iDDPM trains cosine with ``T = 4000``). The linear schedule is safe at ``T = 10``.
    """
    _grid(T)
    _decoder_nll(decoder, torch.zeros(0, 1), torch.zeros(0, 1), 1.0, bins)  # a clear error now

    def loss(model: LearnedVarianceMLP, x0: torch.Tensor, generator=None) -> torch.Tensor:
        return _hybrid(model, x0, _chain_tables(schedule, T), T, lam, decoder, bins, generator)

    return loss


def _hybrid(model, x0, tables, T, lam, decoder, bins, generator):
    tab = {k: v.to(x0.device, x0.dtype) for k, v in tables.items()}
    i = torch.randint(1, T + 1, x0.shape[:1], generator=generator, device=x0.device)

    def col(name):
        return _col(tab[name][i], x0)

    noise = noise_like(x0, generator)
    x_t = col("alpha") * x0 + col("sigma") * noise
    eps_hat, v = model.eps_v(x_t, i.to(x0.dtype) / T)
    simple = ((noise - eps_hat) ** 2).mean()
    mean_p = (x_t - col("eps_coef") * eps_hat.detach()) / col("sqrt_ratio")  # eq. 11, stop-gradient
    var_p = torch.exp(v * col("log_beta") + (1 - v) * col("log_betatilde"))
    # both terms for every sample, each keeping its own: no boolean indexing, which waits for the device
    first = i == 1
    mean_q = col("coef_x0") * x0 + col("coef_xt") * x_t
    var_q = torch.where(first, 1.0, tab["var_q"][i])  # betatilde_1 = 0: a finite stand-in where unused
    term = torch.where(
        first, _decoder_nll(decoder, x0, mean_p, var_p, bins), gaussian_kl(mean_q, var_q, mean_p, var_p)
    )
    vlb_bits = bits_per_dim(term, x0[0].numel())
    return simple + lam * T * vlb_bits.mean()


# ---------------------------------------------------------------------------------------------
# Continuous time: VDM's diffusion loss = ScoreFlow's likelihood-weighted bound
# ---------------------------------------------------------------------------------------------


def _gamma_and_slope(schedule: Schedule, t: torch.Tensor):
    """``gamma(t) = -log SNR(t)`` and ``gamma'(t)`` by autograd. With gradients enabled the graph is
    kept, so a learned schedule trains through ``gamma'`` as well as through ``alpha`` and ``sigma``."""
    keep = torch.is_grad_enabled()
    with torch.enable_grad():
        t = t.detach().requires_grad_(True)
        gamma = -schedule.log_snr(t)
        (slope,) = torch.autograd.grad(gamma.sum(), t, create_graph=keep)
    return (gamma, slope) if keep else (gamma.detach(), slope.detach())


TIME_SAMPLING = ("uniform", "importance")


def diffusion_loss(
    denoiser: Denoiser,
    x0: torch.Tensor,
    *,
    t_min: float,
    t_max: float = 1.0,
    n_t: int = 1,
    time_sampling: str = "importance",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """VDM's continuous-time diffusion loss on ``[t_min, t_max]``, per sample (Kingma et al. 2021, eq. 17):

        L_inf(x) = 1/2 int gamma'(t) E_eps ||eps - eps_hat(alpha_t x + sigma_t eps, t)||^2 dt,

    ``gamma = -log SNR`` increasing (their eq. 15 writes the same with ``-SNR'(t) ||x - x_hat||^2``; the
    minus sign belongs there). With ``g^2 / sigma^2 = gamma'`` it is ScoreFlow's likelihood-weighted
    DSM term ``1/2 int g^2 E||s_theta - grad log q(x_t | x)||^2 dt`` (Song et al. 2021b, Theorem 3).

    ``n_t`` times per sample, stratified: the k-th is drawn from the k-th of ``n_t`` equal slices of
    the sampling distribution (unbiased; it removes most of the spread over time).
    ``time_sampling="uniform"`` draws ``t ~ U(t_min, t_max)`` with weight ``(t_max - t_min) gamma'(t)``;
    ``"importance"`` draws ``t`` with density proportional to ``g^2 / sigma^2 = gamma'``, which is the
    log-SNR drawn uniformly, weight ``gamma(t_max) - gamma(t_min)`` (ScoreFlow's
    ``sample_importance_weighted_time_for_likelihood``; VDM's loss "in log-SNR"). ``"importance"``
    inverts the schedule by bisection and so passes no gradient to a learned schedule's shape: train
    those with ``"uniform"``.

    Control variate: ``c(t) (||eps||^2 - d)`` has mean 0 for any ``c(t)``, so it is subtracted inside
    the expectation. ScoreFlow's code uses ``c = 1`` (its ``grad_norm`` term), which removes the noise
    at high SNR but adds it at low SNR, where ``eps_hat ~ eps``; here ``c = (SNR / (1 + SNR))^2``, the
    regression coefficient of ``||eps - eps_hat||^2`` on ``||eps||^2`` for unit-variance Gaussian data
    (our choice: on eight_gaussians it halves the variance of either).
    """
    if time_sampling not in TIME_SAMPLING:
        raise ValueError(
            f"unknown time_sampling {time_sampling!r}; choose one of {', '.join(TIME_SAMPLING)}."
        )
    if not 0 <= t_min < t_max <= 1:
        raise ValueError(f"need 0 <= t_min < t_max <= 1; got t_min={t_min}, t_max={t_max}.")
    if int(n_t) != n_t or n_t < 1:
        raise ValueError(f"n_t must be a positive integer; got {n_t!r}.")
    sched, B, dt = denoiser.schedule, x0.shape[0], x0.dtype
    if _sigma_at(sched, t_min) <= 0:
        raise ValueError(
            f"log-SNR is infinite at t_min={t_min} (sigma = 0 there); integrate from a t_min > 0, e.g. 1e-5."
        )
    g_ends, _ = _gamma_and_slope(sched, torch.tensor([t_min, t_max], dtype=dt, device=x0.device))
    g_lo, g_hi = g_ends[0], g_ends[1]
    d = x0[0].numel()
    total = torch.zeros(B, dtype=dt, device=x0.device)
    for k in range(int(n_t)):
        u = (k + torch.rand(B, generator=generator, dtype=dt, device=x0.device)) / n_t
        if time_sampling == "uniform":
            t = t_min + (t_max - t_min) * u
            weight = (t_max - t_min) * _gamma_and_slope(sched, t)[1]
        else:
            log_snr = -(g_lo + (g_hi - g_lo) * u).detach().to(torch.float64)
            t = sched.t_from_log_snr(log_snr).to(dt).clamp(t_min, t_max)
            weight = (g_hi - g_lo).expand(B)
        noise = noise_like(x0, generator)
        alpha, sigma = sched.alpha(t), sched.sigma(t)
        x_t = _col(alpha, x0) * x0 + _col(sigma, x0) * noise
        err = ((noise - denoiser.eps(x_t, t)) ** 2).flatten(1).sum(1)
        c = (alpha**2 / (alpha**2 + sigma**2)).detach() ** 2  # (SNR / (1 + SNR))^2
        total = total + 0.5 * weight * (err - c * (noise**2).flatten(1).sum(1) - (1 - c) * d)
    return total / n_t + 0.5 * d * (g_hi - g_lo)


@dataclass
class ContinuousVLB:
    """The continuous-time bound ``-log p(x) <= reconstruction + diffusion + prior``, each per sample, in nats."""

    reconstruction: torch.Tensor
    diffusion: torch.Tensor
    prior: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.reconstruction + self.diffusion + self.prior


def continuous_vlb(
    denoiser: Denoiser,
    x0: torch.Tensor,
    *,
    t_eps: float = 1e-5,
    n_t: int = 1,
    time_sampling: str = "importance",
    generator: torch.Generator | None = None,
) -> ContinuousVLB:
    """The continuous-time variational bound of VDM (Kingma et al. 2021: prior + reconstruction +
    diffusion loss with ``T -> inf``) for continuous data, per sample in nats:

    * reconstruction ``E[-log p(x | z_eps)]`` with the Gaussian decoder ``p(x | z) = N(z / alpha, sigma^2 /
      alpha^2 I)`` at ``t_eps``: in closed form ``d/2 (log 2 pi + 1 + gamma(t_eps))``;
    * diffusion: :func:`diffusion_loss` on ``[t_eps, 1]``;
    * prior ``KL(q(z_1 | x) || N(0, s^2 I))`` (:func:`prior_kl`).

    This is ScoreFlow's bound (Song et al. 2021b, Theorem 3 with their "eps offset" decoder): expanding
    ``-1/2 int (g^2 E||grad log q(x_t | x)||^2 + 2 div f) dt = -d/2 log(sigma_1^2 / sigma_eps^2)`` and
    the decoder gives the same constant. Above ``-log p_theta(x)`` for every ``x``; averaged over the
    data it is therefore above the true NLL (the data entropy) for any denoiser.
    ``t_eps`` may be 0 only where ``sigma(0) > 0`` (VE, a learned VDM schedule).
    """
    if not 0 <= t_eps < 1 or _sigma_at(denoiser.schedule, t_eps) <= 0:
        raise ValueError(f"t_eps must lie in [0, 1) with sigma(t_eps) > 0 (e.g. 1e-5); got {t_eps!r}.")
    diff = diffusion_loss(
        denoiser, x0, t_min=t_eps, n_t=n_t, time_sampling=time_sampling, generator=generator, t_max=1.0
    )
    gamma_eps, _ = _gamma_and_slope(denoiser.schedule, torch.tensor(t_eps, dtype=x0.dtype, device=x0.device))
    recon = 0.5 * x0[0].numel() * (math.log(2 * math.pi) + 1 + gamma_eps)
    return ContinuousVLB(recon.expand(x0.shape[0]), diff, prior_kl(denoiser.schedule, x0))


class LearnedSchedule(nn.Module, VariancePreserving):
    """VDM's learned variance-preserving schedule (Kingma et al. 2021, sec. 3.2 and appendix):
    ``sigma_t^2 = sigmoid(gamma(t))``, ``alpha_t^2 = sigmoid(-gamma(t))``, ``SNR = exp(-gamma)``.

    ``gamma`` is a monotone network as in VDM's ``NoiseSchedule_NNet``: ``gammahat(t) = |w1| t +
    mean_j |w3_j| phi(|w2_j| (2t - 1) + b2_j)``, ``phi(u) = 2 sigmoid(u) - 1``; positive weights make
    it increasing. Here it is rescaled to run exactly from the endpoint parameters ``gamma_0`` to
    ``gamma_1`` (``gamma = gamma_0 + (gamma_1 - gamma_0)(gammahat(t) - gammahat(0)) / (gammahat(1) - gammahat(0))``),
    so "fixed endpoints" means exactly fixed. Defaults: VDM's ``gamma_0 = -13.3``, ``gamma_1 = 5``,
    1024 features, and an initialization that is nearly linear in ``t``, as theirs is.
    """

    name = "learned"

    def __init__(
        self,
        gamma_0: float = -13.3,
        gamma_1: float = 5.0,
        *,
        learn_endpoints: bool = True,
        nonlinear: bool = True,
        features: int = 1024,
        generator: torch.Generator | None = None,
    ):
        nn.Module.__init__(self)
        if not gamma_0 < gamma_1:
            raise ValueError(f"need gamma_0 < gamma_1 (noise grows with t); got {gamma_0}, {gamma_1}.")
        ends = torch.tensor([gamma_0, gamma_1])
        if learn_endpoints:
            self.ends = nn.Parameter(ends)
        else:
            self.register_buffer("ends", ends)
        self.nonlinear = nonlinear
        self.w1 = nn.Parameter(torch.ones(()))
        if nonlinear:
            # VDM's init: l2 ~ N(0, 1), zero bias; l3 ~ N(0, 1) against a linear part of gamma_1 - gamma_0
            self.w2 = nn.Parameter(torch.randn(features, generator=generator))
            self.b2 = nn.Parameter(torch.zeros(features))
            self.w3 = nn.Parameter(torch.randn(features, generator=generator) / (gamma_1 - gamma_0))

    def _shape(self, t: torch.Tensor) -> torch.Tensor:
        # weights cast to t's dtype: float64 times (ddpm_tables, the ODE) keep float64 precision
        h = self.w1.abs().to(t.dtype) * t
        if self.nonlinear:
            u = (2 * t - 1)[..., None] * self.w2.abs().to(t.dtype) + self.b2.to(t.dtype)
            h = h + ((2 * torch.sigmoid(u) - 1) * self.w3.abs().to(t.dtype)).mean(-1)
        return h

    def gamma(self, t) -> torch.Tensor:
        """``gamma(t) = -log SNR(t)``, increasing from ``gamma_0`` to ``gamma_1``, on the module's device."""
        t = as_time(t).to(self.ends.device)
        h, h0, h1 = self._shape(t), self._shape(t.new_zeros(())), self._shape(t.new_ones(()))
        g0, g1 = self.ends.to(t.dtype).unbind()
        return g0 + (g1 - g0) * (h - h0) / (h1 - h0)

    def forward(self, t) -> torch.Tensor:
        return self.gamma(t)

    def log_snr(self, t):
        return -self.gamma(t)

    # the base class builds tensors next to its argument: bring times and log-SNRs to the module's device
    def t_from_log_snr(self, log_snr, iterations: int = 60) -> torch.Tensor:
        dtype = None if torch.is_tensor(log_snr) else torch.float64
        return super().t_from_log_snr(
            torch.as_tensor(log_snr, dtype=dtype, device=self.ends.device), iterations
        )

    def drift_diffusion(self, t):
        return super().drift_diffusion(as_time(t).to(self.ends.device))

    def log_alpha_bar(self, t):
        return nn.functional.logsigmoid(-self.gamma(t))

    def alpha_bar(self, t):
        return torch.sigmoid(-self.gamma(t))

    def alpha(self, t):
        return torch.sigmoid(-self.gamma(t)).sqrt()

    def sigma(self, t):
        return torch.sigmoid(self.gamma(t)).sqrt()


class VDM(nn.Module):
    """A noise-prediction network and its schedule, for :func:`vdm_loss`. A schedule that is a module
    (:class:`LearnedSchedule`) is registered and trained with the network; a fixed one is not."""

    def __init__(self, net: nn.Module, schedule: Schedule, t_eps: float = 1e-5):
        super().__init__()
        self.net, self.schedule, self.t_eps = net, schedule, t_eps

    def denoiser(self) -> Denoiser:
        return Denoiser(self.net, self.schedule, prediction="eps")


def vdm_loss(model: VDM, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The mean continuous-time bound in nats, a ``loss_fn`` for :func:`dmlib.train.train`, with uniform
    time sampling so that gradients reach a learned schedule. Here the network and the whole schedule
    (end points and interior) follow the bound's gradient. In VDM only the end points affect the
    bound; Kingma et al. learn the interior to minimize the estimator's variance (sec. 5.2), which
    is not reproduced here."""
    vlb = continuous_vlb(
        model.denoiser(), batch, t_eps=model.t_eps, time_sampling="uniform", generator=generator
    )
    return vlb.total.mean()


def transfer_by_log_snr(denoiser: Denoiser, schedule: Schedule) -> Denoiser:
    """The same denoiser as a function of log-SNR, driven by another ``schedule``.

    At time ``t`` of ``schedule`` it calls ``denoiser`` at the time ``t'`` of its own schedule with the
    same log-SNR, with ``z`` rescaled by ``alpha'(t') / alpha(t)`` (equal log-SNR means equal
    ``z / alpha``). The exact oracle is such a function already; a trained network becomes one.
    """
    src = denoiser.schedule

    def model(x, t):
        t_src = src.t_from_log_snr(schedule.log_snr(t).to(torch.float64)).to(t.dtype)
        scale = src.alpha(t_src) / schedule.alpha(t)
        return denoiser.eps(_col(scale, x) * x, t_src)

    return Denoiser(model, schedule, prediction="eps")


@torch.no_grad()
def endpoint_invariance(
    denoiser: Denoiser,
    x0: torch.Tensor,
    other: Schedule,
    *,
    t_eps: float = 1e-5,
    n_t: int = 8,
    generator: torch.Generator | None = None,
) -> dict:
    """VDM's result (Kingma et al. 2021, sec. 5.1): with the denoiser a fixed function of
    log-SNR, ``L_inf`` depends on the schedule only through its log-SNR endpoints.

    Evaluates :func:`diffusion_loss` under the denoiser's schedule on ``[t_eps, 1]`` with ``t`` drawn
    uniformly in log-SNR, and under ``other`` on the times where it spans the same log-SNR interval
    (with :func:`transfer_by_log_snr`) with ``t`` drawn uniformly in time: different times, weights
    and noise, one expectation. Near ``sigma = 0`` every VP schedule has ``gamma' ~ 1/t``, so uniform
    times give a heavy-tailed estimate there: keep ``t_eps`` at 1e-3 or so for such an ``other``,
    or use schedules with finite endpoints (:class:`LearnedSchedule`). Returns ``{"log_snr": (hi, lo),
    "own": (mean, se), "other": (mean, se), "difference": (mean, se)}`` in nats per sample, the last
    paired over ``x0``: its mean is 0 within Monte Carlo error.
    """
    sched = denoiser.schedule
    hi, lo = (float(sched.log_snr(torch.tensor(t, dtype=torch.float64))) for t in (t_eps, 1.0))
    t_lo, t_hi = (float(other.t_from_log_snr(torch.tensor(v, dtype=torch.float64))) for v in (hi, lo))
    reached = [float(other.log_snr(torch.tensor(t, dtype=torch.float64))) for t in (t_lo, t_hi)]
    if abs(reached[0] - hi) > 1e-6 * max(1, abs(hi)) or abs(reached[1] - lo) > 1e-6 * max(1, abs(lo)):
        raise ValueError(
            f"{type(other).__name__} does not span the log-SNR interval [{lo:g}, {hi:g}] of "
            f"{type(sched).__name__} (it reaches {reached})."
        )
    out: dict = {"log_snr": (hi, lo)}
    losses = {}
    for key, den, (a, b), how in (
        ("own", denoiser, (t_eps, 1.0), "importance"),
        ("other", transfer_by_log_snr(denoiser, other), (t_lo, t_hi), "uniform"),
    ):
        losses[key] = diffusion_loss(
            den, x0, t_min=a, t_max=b, n_t=n_t, time_sampling=how, generator=generator
        )
    losses["difference"] = losses["own"] - losses["other"]  # paired: the spread over x0 cancels
    for key, loss in losses.items():
        out[key] = (loss.mean().item(), loss.std().item() / math.sqrt(len(loss)))
    return out


# ---------------------------------------------------------------------------------------------
# Exact log-likelihood through the probability-flow ODE
# ---------------------------------------------------------------------------------------------

PROBES = ("rademacher", "gaussian")


def hutchinson_probe(
    shape, kind: str = "rademacher", generator=None, dtype=torch.float64, device=None
) -> torch.Tensor:
    """A probe ``v`` with ``E[v v^T] = I``: Rademacher (+-1, the lower-variance choice) or Gaussian,
    drawn on ``device``."""
    if kind == "rademacher":
        return torch.randint(0, 2, tuple(shape), generator=generator, device=device).to(dtype) * 2 - 1
    if kind == "gaussian":
        return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
    raise ValueError(f"unknown probe {kind!r}; choose one of {', '.join(PROBES)}.")


def divergence(fn: Callable, x: torch.Tensor, probe: torch.Tensor | None = None):
    """``(fn(x), div fn(x))`` per sample for a map acting on each sample separately.

    With ``probe=None`` the divergence is exact: one backward pass per coordinate (fine in 2D).
    With a probe ``v`` it is the Skilling-Hutchinson estimate ``v^T (d fn / dx) v`` (Skilling 1989;
    Hutchinson 1990), unbiased since ``E[v v^T] = I``; one backward pass (Grathwohl et al. 2019).
    """
    if probe is not None and probe.shape != x.shape:
        raise ValueError(f"probe must have the shape of x {tuple(x.shape)}; got {tuple(probe.shape)}.")
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x)
        if out.shape != x.shape:
            raise ValueError(f"fn must map x {tuple(x.shape)} to the same shape; got {tuple(out.shape)}.")
        if probe is None:
            flat, div = out.flatten(1), torch.zeros(x.shape[0], dtype=out.dtype, device=x.device)
            for j in range(flat.shape[1]):
                (grad,) = torch.autograd.grad(flat[:, j].sum(), x, retain_graph=True)
                div = div + grad.flatten(1)[:, j]
        else:
            (grad,) = torch.autograd.grad((out * probe.to(out)).sum(), x)
            div = (grad * probe.to(grad)).flatten(1).sum(1)
    return out.detach(), div.detach()


@dataclass
class ODELikelihood:
    """``log_prob = prior_log_prob + delta`` per sample, in nats; ``x_T`` the encoding at ``t = 1``."""

    log_prob: torch.Tensor
    prior_log_prob: torch.Tensor
    delta: torch.Tensor
    x_T: torch.Tensor
    nfe: int


def ode_log_likelihood(
    denoiser: Denoiser,
    x: torch.Tensor,
    *,
    t_eps: float = 1e-5,
    trace: str = "exact",
    generator: torch.Generator | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    dtype: torch.dtype = torch.float64,
    prior: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ODELikelihood:
    """``log p(x)`` of the probability-flow ODE model (Song et al. 2021, appendix D.2), per sample in nats.

    The instantaneous change of variables (Chen et al. 2018, Theorem 1) along the ODE
    ``dx/dt = ftilde(x, t) = f x - g^2 score / 2`` gives ``d log p_t(x_t) / dt = -div ftilde``, so

        log p_{t_eps}(x) = log N(x_1; 0, s^2 I) + int_{t_eps}^1 div ftilde(x_t, t) dt,

    solved forward from the data on the augmented state ``(x, int div)`` by scipy's RK45 in ``dtype``
    (float64 by default: pass a float64 model, e.g. ``copy.deepcopy(net).double()``).
    ``trace="exact"`` differentiates each coordinate; ``"rademacher"`` or ``"gaussian"`` uses one
    Hutchinson probe per sample held fixed over the solve (FFJORD), an unbiased estimate of ``log p``.

    The ``[0, t_eps]`` end: the score is infinite at ``sigma = 0``, so the result is the model's density
    at ``t_eps`` evaluated at the data point, as in Song et al. (``t_eps = 1e-5``). For data with a
    smooth density it differs from ``log p_0`` by ``O(sigma(t_eps)^2)`` (about 1e-6 nats for the
    default); for pixel data, dequantize first (:func:`uniform_dequantize`). With the exact oracle the
    result is ``log q_{t_eps}(x)`` up to the prior mismatch ``q_1 != N(0, s^2 I)`` and solver tolerance;
    ``prior`` (a function ``x_T -> log density``, default :func:`prior_log_prob`) can replace the prior,
    e.g. by the oracle's exact ``log q_1`` to measure the solver alone.

    The model runs on ``x``'s device and the results are returned there (``x_T`` in ``x``'s dtype, the
    log-densities in float64); the solver's state goes through the CPU at every evaluation.
    """
    from scipy.integrate import solve_ivp

    sched = denoiser.schedule
    if not 0 <= t_eps < 1 or _sigma_at(sched, t_eps) <= 0:
        raise ValueError(
            f"t_eps must lie in [0, 1) with sigma(t_eps) > 0, where the score is finite (e.g. 1e-5); got {t_eps!r}."
        )
    if trace != "exact" and trace not in PROBES:
        raise ValueError(f"unknown trace {trace!r}; choose 'exact' or one of {', '.join(PROBES)}.")
    shape, B, device = x.shape, x.shape[0], x.device
    probe = None if trace == "exact" else hutchinson_probe(shape, trace, generator, dtype, device)
    nfe = 0

    def rhs(t, y):
        nonlocal nfe
        nfe += 1
        xt = torch.from_numpy(y[:-B]).reshape(shape).to(device, dtype)
        tt = torch.tensor(t, dtype=dtype)
        drift, div = divergence(lambda z: pf_ode_drift(denoiser, z, tt), xt, probe)
        return np.concatenate([drift.reshape(-1).cpu().double().numpy(), div.cpu().double().numpy()])

    y0 = np.concatenate([x.detach().cpu().double().reshape(-1).numpy(), np.zeros(B)])
    sol = solve_ivp(rhs, (float(t_eps), 1.0), y0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"the ODE solver failed: {sol.message}")
    end = torch.from_numpy(sol.y[:, -1].copy()).to(device)  # the results live where x does
    x_T, delta = end[:-B].reshape(shape), end[-B:]
    log_prior = prior_log_prob(sched, x_T) if prior is None else prior(x_T).to(torch.float64)
    return ODELikelihood(log_prior + delta, log_prior, delta, x_T.to(x.dtype), nfe)
