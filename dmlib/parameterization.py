"""The design space of a Gaussian diffusion model (Chapter 7): what the network predicts, how it is
preconditioned, how its loss is weighted over noise levels, and which part of that loss no network
can remove. One :class:`Denoiser` view of any of them is what every sampler uses.

**Predictions.** With ``x_t = alpha x_0 + sigma eps`` a network may predict the noise ``eps`` (Ho et al.
2020), the data ``x_0``, the velocity ``v = alpha eps - sigma x_0`` (Salimans & Ho 2022, sec. 4) or the
score ``grad log q_t(x_t) = -eps / sigma`` (Tweedie's formula; Efron 2011). Any one determines the
others given ``x_t``; the formulas below hold for any ``alpha, sigma`` (not only VP).

**Preconditioning.** EDM (Karras et al. 2022, eq. 7 and Table 1) wraps a raw network ``F`` so that its
input and its training target have unit variance at every noise level: :class:`Preconditioned`,
:func:`edm_coefficients`, :func:`edm_target`. EDM's noise level is ``nu = sigma / alpha =
exp(-lambda / 2)`` and its state ``y = x_t / alpha`` (:func:`to_edm`; ``dmlib.samplers`` uses the same
``nu``).

**Weightings.** Every diffusion loss is one integral over the log-SNR ``lambda = log(alpha^2 / sigma^2)``
(Kingma & Gao 2023, sec. 2-4), written here in one basis, the weight ``w(lambda)`` on the eps-MSE::

    L_w = 1/2 int w(lambda) E ||eps_hat - eps||^2 / D dlambda = 1/2 E_{lambda ~ q} [w / q ||eps_hat - eps||^2 / D]

for any density ``q`` of training log-SNRs (``D``: the data dimension; a mean over dimensions, as in
:func:`dmlib.ddpm.simple_loss`). Constant convention: the ``1/2`` is the ELBO's, so ``w = 1`` is the
ELBO's diffusion term per dimension (VDM, Kingma et al. 2021, eq. 17) and every other weighting is half
its paper's loss (``"eps"`` is ``L_simple / 2``). :data:`LOSS_WEIGHTINGS` lists them,
:func:`loss_weight` evaluates them, :func:`equivalent_density` turns one into a sampling density
(importance sampling) and :func:`weighted_loss` trains with any of them. (``dmlib.score.weighting`` is
another thing: the weight ``omega(t)`` of the DSM loss over *time*, ``omega / sigma^2 = w / p_t``.)

**Irreducible loss.** With the Gaussian-mixture oracle the minimum of the eps-MSE at each noise level,
``E ||eps - E[eps | x_t]||^2``, is known (:func:`irreducible_loss`), and so is the part of a model's
loss that training can still remove (:func:`excess_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .schedules import Schedule, as_time

PREDICTIONS = ("eps", "x0", "v", "score")  # EDM's F enters as an x0 prediction, through Preconditioned


def noise_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise of x's shape, dtype and device, drawn from ``generator`` (reproducible)."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _col(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample coefficient of shape () or (B,) against x of shape (B, ...)."""
    c = c.to(dtype=x.dtype, device=x.device)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim)) if c.ndim else c


def to_x0_eps(pred: torch.Tensor, kind: str, x_t: torch.Tensor, alpha, sigma):
    """Convert a prediction of type ``kind`` into the pair ``(x0_hat, eps_hat)``.

    eps:   x0 = (x_t - sigma eps) / alpha
    x0:    eps = (x_t - alpha x0) / sigma
    v:     x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2),  eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)
    score: eps = -sigma * score
    """
    a, s = _col(alpha, x_t), _col(sigma, x_t)
    if kind == "eps":
        return (x_t - s * pred) / a, pred
    if kind == "x0":
        return pred, (x_t - a * pred) / s
    if kind == "v":
        norm = a**2 + s**2
        return (a * x_t - s * pred) / norm, (s * x_t + a * pred) / norm
    if kind == "score":
        eps = -s * pred
        return (x_t - s * eps) / a, eps
    raise ValueError(f"unknown prediction type {kind!r}; choose one of {', '.join(PREDICTIONS)}.")


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, kind: str, alpha, sigma) -> torch.Tensor:
    """The prediction of type ``kind`` that corresponds to ``(x0, eps)`` (inverse of :func:`to_x0_eps`)."""
    a, s = _col(alpha, x0), _col(sigma, x0)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return a * eps - s * x0
    if kind == "score":
        return -eps / s
    raise ValueError(f"unknown prediction type {kind!r}; choose one of {', '.join(PREDICTIONS)}.")


class Denoiser:
    """One view of a model ``model(x_t, t) -> prediction`` under a schedule.

    ``t`` reaches the model as a scalar tensor (one time for the batch) or with shape (B,).

    Samplers only call :meth:`x0`, :meth:`eps`, :meth:`v` and :meth:`score`, so a trained network,
    the exact oracle of a Gaussian mixture and a student's function all plug in the same way.
    ``clip_x0=(-1, 1)`` clamps the data estimate, as image models commonly do.
    """

    def __init__(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        schedule: Schedule,
        prediction: str = "eps",
        clip_x0: tuple[float, float] | None = None,
    ):
        if prediction not in PREDICTIONS:
            raise ValueError(
                f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}."
            )
        if clip_x0 is not None and not (len(clip_x0) == 2 and clip_x0[0] < clip_x0[1]):
            raise ValueError(f"clip_x0 must be a range (lo, hi) with lo < hi, e.g. (-1, 1); got {clip_x0!r}.")
        self.model, self.schedule, self.prediction, self.clip_x0 = model, schedule, prediction, clip_x0

    def x0_eps(self, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat, eps_hat)`` at ``(x_t, t)``; ``t`` is a scalar or one time per sample."""
        # a scalar t stays scalar: the oracle is much cheaper with one time per batch
        t = as_time(t, like=x_t)
        if t.ndim != 0 and t.shape != x_t.shape[:1]:
            raise ValueError(f"t must be a scalar or have shape ({x_t.shape[0]},); got {tuple(t.shape)}.")
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        pred = self.model(x_t, t)
        if not torch.is_tensor(pred) or pred.shape != x_t.shape:
            got = tuple(pred.shape) if torch.is_tensor(pred) else type(pred).__name__
            raise ValueError(
                f"the model must return a {self.prediction} prediction of x's shape {tuple(x_t.shape)}; "
                f"got {got}. (A network with extra outputs, e.g. a learned variance, needs a wrapper.)"
            )
        x0, eps = to_x0_eps(pred, self.prediction, x_t, alpha, sigma)
        if self.clip_x0 is not None:
            x0 = x0.clamp(*self.clip_x0)
            eps = (x_t - _col(alpha, x_t) * x0) / _col(sigma, x_t)
        return x0, eps

    def x0(self, x_t, t):
        return self.x0_eps(x_t, t)[0]

    def eps(self, x_t, t):
        return self.x0_eps(x_t, t)[1]

    def v(self, x_t, t):
        t = as_time(t, like=x_t)
        x0, eps = self.x0_eps(x_t, t)
        return from_x0_eps(x0, eps, "v", self.schedule.alpha(t), self.schedule.sigma(t))

    def score(self, x_t, t):
        """``grad_x log q_t(x) = -eps_hat / sigma(t)`` (Tweedie / denoising score matching)."""
        t = as_time(t, like=x_t)
        return -self.eps(x_t, t) / _col(self.schedule.sigma(t), x_t)


def eps_mse_factor(kind: str, alpha, sigma) -> torch.Tensor:
    """The factor ``c`` with ``||eps_hat - eps||^2 = c ||pred - target||^2`` for a prediction of type ``kind``
    (differentiate :func:`to_x0_eps` at fixed ``x_t``): ``1`` for eps, ``alpha^2 / sigma^2 = SNR`` for x0,
    ``alpha^2 / (alpha^2 + sigma^2)^2`` for v and ``sigma^2`` for the score. It moves a weighting from one
    prediction space to another: the x0-MSE is the eps-MSE weighted by ``1 / SNR``."""
    alpha, sigma = torch.as_tensor(alpha), torch.as_tensor(sigma)
    if kind == "eps":
        return torch.ones_like(alpha * sigma)
    if kind == "x0":
        return (alpha / sigma) ** 2
    if kind == "v":
        return (alpha / (alpha**2 + sigma**2)) ** 2
    if kind == "score":
        return sigma**2 * torch.ones_like(alpha)
    raise ValueError(f"unknown prediction type {kind!r}; choose one of {', '.join(PREDICTIONS)}.")


# ------------------------------------------------------------------------------------------------
# EDM preconditioning (Karras et al. 2022)
# ------------------------------------------------------------------------------------------------


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive number; got {value!r}.")


def to_edm(x_t: torch.Tensor, alpha, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM's view of ``x_t = alpha x_0 + sigma eps``: ``(y, nu) = (x_t / alpha, sigma / alpha)``, so that
    ``y = x_0 + nu eps`` (Karras et al. 2022, eq. 4's scaling ``x = s(t) y`` with ``s = alpha``; their noise
    level ``sigma`` is our ``nu = exp(-lambda / 2)``, as in :mod:`dmlib.samplers`)."""
    alpha, sigma = torch.as_tensor(alpha), torch.as_tensor(sigma)
    return x_t / _col(alpha, x_t), sigma / alpha


def edm_coefficients(nu, sigma_data: float = 0.5) -> tuple[torch.Tensor, ...]:
    """EDM's preconditioning at noise level ``nu`` (Karras et al. 2022, Table 1, who write it ``sigma``)::

        c_skip = sd^2 / (nu^2 + sd^2),   c_out = nu sd / sqrt(nu^2 + sd^2),
        c_in = 1 / sqrt(nu^2 + sd^2),    c_noise = ln(nu) / 4,

    with ``sd = sigma_data`` the data's standard deviation: for ``D = c_skip y + c_out F(c_in y, c_noise)``
    (eq. 7) they make F's input and F's training target unit-variance at every ``nu``, with the smallest
    ``c_out`` (their App. B.6). Returns ``(c_skip, c_out, c_in, c_noise)``."""
    _check_positive(sigma_data=sigma_data)
    nu = torch.as_tensor(nu)
    if nu.device.type == "cpu" and nu.numel() and not (nu > 0).all():
        raise ValueError(
            f"EDM's noise level nu = sigma / alpha must be positive (c_noise = ln(nu) / 4); got {nu}."
        )
    norm = (nu**2 + sigma_data**2).sqrt()
    return sigma_data**2 / norm**2, nu * sigma_data / norm, 1 / norm, nu.log() / 4


def edm_target(x0: torch.Tensor, x_t: torch.Tensor, alpha, sigma, sigma_data: float = 0.5) -> torch.Tensor:
    """The training target of EDM's raw network, ``F* = (x_0 - c_skip y) / c_out`` (Karras et al. 2022,
    eq. 8), with ``(y, nu)`` of :func:`to_edm`. Since ``D - x_0 = c_out (F - F*)``, EDM's loss
    ``lambda(nu) ||D - x_0||^2`` with ``lambda = 1 / c_out^2`` (Table 1) is ``||F - F*||^2``."""
    y, nu = to_edm(x_t, alpha, sigma)
    c_skip, c_out, _, _ = edm_coefficients(nu, sigma_data)
    return (x0 - _col(c_skip, y) * y) / _col(c_out, y)


def edm_noise_level(
    x0: torch.Tensor, generator=None, p_mean: float = -1.2, p_std: float = 1.2
) -> torch.Tensor:
    """EDM's training noise levels, one per sample: ``ln nu ~ N(P_mean, P_std^2)`` (Karras et al. 2022,
    Table 1, P_mean = -1.2, P_std = 1.2). Its log-SNR ``lambda = -2 ln nu ~ N(-2 P_mean, (2 P_std)^2)`` is
    the density the ``"edm"`` weighting is built on; a schedule's time is ``t_from_log_snr(-2 nu.log())``."""
    _check_positive(p_std=p_std)
    z = torch.randn(x0.shape[0], generator=generator, dtype=x0.dtype, device=x0.device)
    return torch.exp(p_mean + p_std * z)


class Preconditioned(nn.Module):
    """EDM's preconditioned denoiser around a raw network ``net(x_in, c_noise)`` (Karras et al. 2022, eq. 7):
    ``D(x_t, t) = c_skip y + c_out net(c_in y, c_noise)`` with ``(y, nu) = (x_t / alpha, sigma / alpha)``
    (:func:`to_edm`) and the coefficients of :func:`edm_coefficients`. ``D`` predicts ``x_0``, so
    ``Denoiser(Preconditioned(net, schedule, sigma_data), schedule, prediction="x0")`` samples with it.

    Why EDM's F is not a fifth entry of :data:`PREDICTIONS`: turning F into ``x_0`` needs ``sigma_data``,
    and F's network sees other inputs (``c_in y`` and ``c_noise`` instead of ``x_t`` and ``t``). F is another
    *interface* to the network, not another output of ``model(x_t, t)``; wrapped, it is an x0 prediction,
    and the denoiser, every sampler and :func:`weighted_loss` need nothing new. Trained with
    ``weighted_loss(schedule, "edm", prediction="x0")`` its loss is, in expectation, half of EDM's
    ``||F - F*||^2`` (:func:`edm_target`) over the schedule's log-SNR range.

    ``time_input=True`` hands the net the schedule's ``t`` in [0, 1] instead of ``c_noise`` (the choice of
    EDM's VP column of Table 1, ``c_noise`` proportional to ``t``), for the networks of :mod:`dmlib.nets`,
    whose time input lives in [0, 1].
    """

    def __init__(
        self, net: Callable, schedule: Schedule, sigma_data: float = 0.5, *, time_input: bool = False
    ):
        super().__init__()
        _check_positive(sigma_data=sigma_data)
        self.net, self.schedule = net, schedule
        self.sigma_data, self.time_input = float(sigma_data), time_input

    def forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        t = as_time(t, like=x_t)
        y, nu = to_edm(x_t, self.schedule.alpha(t), self.schedule.sigma(t))
        c_skip, c_out, c_in, c_noise = edm_coefficients(nu, self.sigma_data)
        raw = self.net(_col(c_in, y) * y, t if self.time_input else c_noise.to(x_t.dtype))
        return _col(c_skip, y) * y + _col(c_out, y) * raw


# ------------------------------------------------------------------------------------------------
# Loss weightings over log-SNR (Kingma & Gao 2023)
# ------------------------------------------------------------------------------------------------


def _ones(lam, **_):
    return torch.ones_like(lam)


# name -> (the density of lambda it is built on, its factor h(lambda), its parameters and their defaults);
# w(lambda) = density(lambda) * h(lambda). "schedule" is p_t(lambda) (:func:`log_snr_density`: the weight
# a loss gets from drawing t ~ U(0, 1)), "edm" is EDM's N(-2 P_mean, (2 P_std)^2) and "flat" is 1.
LOSS_WEIGHTINGS = {
    "elbo": ("flat", _ones, {}),
    "eps": ("schedule", _ones, {}),
    "x0": ("schedule", lambda lam: torch.exp(-lam), {}),
    "v": ("schedule", lambda lam: 1 + torch.exp(-lam), {}),
    "min_snr": ("schedule", lambda lam, gamma: (gamma * torch.exp(-lam)).clamp(max=1), {"gamma": 5.0}),
    "p2": ("schedule", lambda lam, k, gamma: (k + torch.exp(lam)) ** -gamma, {"k": 1.0, "gamma": 1.0}),
    "edm": (
        "edm",
        lambda lam, sigma_data, **_: 1 + torch.exp(-lam) / sigma_data**2,
        {"sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2},
    ),
}
SAMPLINGS = ("uniform", "importance")


def _weighting(name: str, params: dict, schedule: Schedule | None):
    """``(base, h, params)`` of a weighting, its parameters checked and completed with the defaults."""
    if name not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {name!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}.")
    base, h, defaults = LOSS_WEIGHTINGS[name]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        takes = ", ".join(defaults) or "no parameters"
        raise ValueError(f"weighting {name!r} takes {takes}; got {', '.join(unknown)}.")
    p = {**defaults, **params}
    _check_positive(**{k: v for k, v in p.items() if k in ("gamma", "sigma_data", "p_std")})
    if not p.get("k", 0) >= 0:
        raise ValueError(f"p2's k must be >= 0; got {p['k']!r}.")
    if base == "schedule" and schedule is None:
        raise ValueError(f"weighting {name!r} is built on the schedule's density of log-SNR; pass schedule=.")
    return base, (lambda lam: h(lam, **p)), p


def _schedule_range(schedule: Schedule) -> tuple[float, float]:
    """``(lambda(1), lambda(0))``: the log-SNRs that ``t in [0, 1]`` reaches."""
    lam = schedule.log_snr(torch.tensor([1.0, 0.0], dtype=torch.float64))
    return float(lam[0]), float(lam[1])


def _checked_log_snr(log_snr, schedule: Schedule | None = None) -> torch.Tensor:
    """``log_snr`` as a float tensor, checked on the CPU to be finite (and inside the schedule's range)."""
    lam = log_snr if torch.is_tensor(log_snr) else torch.tensor(log_snr, dtype=torch.float64)
    lam = lam if lam.is_floating_point() else lam.to(torch.float64)
    if lam.device.type == "cpu" and lam.numel():
        if not torch.isfinite(lam).all():
            raise ValueError(f"log-SNR must be finite; got {lam[~torch.isfinite(lam)].flatten()[0].item()}.")
        lo, hi = _schedule_range(schedule) if schedule is not None else (-math.inf, math.inf)
        if lam.min() < lo or lam.max() > hi:
            raise ValueError(
                f"log-SNR from {lam.min().item():.4g} to {lam.max().item():.4g} leaves the schedule's range "
                f"[{lo:.4g}, {hi:.4g}]: t in [0, 1] never reaches it (p_t = 0 there)."
            )
    return lam


def _rate(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """``-d lambda / dt = g(t)^2 / sigma(t)^2`` in float64 (differentiate ``lambda = log alpha^2 - log sigma^2``
    and use ``g^2 = d sigma^2 / dt - 2 f sigma^2`` of :meth:`~dmlib.schedules.Schedule.drift_diffusion`)."""
    t = t.to(torch.float64)
    return schedule.drift_diffusion(t)[1] / schedule.sigma(t) ** 2


def log_snr_density(schedule: Schedule, log_snr) -> torch.Tensor:
    """``p_t(lambda) = 1 / |d lambda / dt|`` at ``t(lambda)``: the density of ``lambda(t)`` when ``t ~ U(0, 1)``.
    A schedule is a sampling density of noise levels; drawing t uniformly weights the loss by it
    (the view of Kingma & Gao 2023; for the cosine schedule without offset ``p_t = sech(lambda / 2) / (2 pi)``)."""
    lam = _checked_log_snr(log_snr, schedule)
    return (1 / _rate(schedule, schedule.t_from_log_snr(lam.to(torch.float64)))).to(lam.dtype)


def _base_density(base: str, lam: torch.Tensor, schedule: Schedule | None, p: dict) -> torch.Tensor:
    if base == "flat":
        return torch.ones_like(lam)
    if base == "edm":  # lambda = -2 ln nu with ln nu ~ N(P_mean, P_std^2)
        mean, std = -2 * p["p_mean"], 2 * p["p_std"]
        return torch.exp(-0.5 * ((lam - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    return log_snr_density(schedule, lam)


def loss_weight(name: str, log_snr, schedule: Schedule | None = None, **params) -> torch.Tensor:
    """The weight ``w(lambda)`` on the eps-MSE of loss ``name`` (module docstring: ``L_w = 1/2 int w(lambda)
    E||eps_hat - eps||^2 / D dlambda``; Kingma & Gao 2023, Table 1 and App. D). ``p_t`` is the schedule's
    density of log-SNR (:func:`log_snr_density`), ``SNR = e^lambda``:

    ============  ==========================================  ================================================
    ``elbo``      ``1``                                       the ELBO (Kingma et al. 2021, eq. 17)
    ``eps``       ``p_t``                                     ``L_simple`` with ``t ~ U`` (Ho et al. 2020, eq. 14)
    ``x0``        ``p_t / SNR``                               ``||x0_hat - x0||^2 = ||eps_hat - eps||^2 / SNR``
    ``v``         ``p_t (1 + 1 / SNR)``                       ``||v_hat - v||^2`` (VP), "SNR+1" on the x0-MSE
                                                              (Salimans & Ho 2022, sec. 4)
    ``min_snr``   ``p_t min(1, gamma / SNR)``                 ``min(SNR, gamma)`` on the x0-MSE, gamma = 5
                                                              (Hang et al. 2023, min-SNR-gamma)
    ``p2``        ``p_t / (k + SNR)^gamma``                   P2 on ``L_simple``, k = gamma = 1 (Choi et al.
                                                              2022, ``lambda'_t = lambda_t / (k + SNR)^gamma``)
    ``edm``       ``N(lambda; -2 P_mean, 4 P_std^2)``         ``lambda(nu) ||D - x0||^2`` with ``nu^2 = 1 / SNR``,
                  ``(1 + 1 / (SNR sigma_data^2))``            ``ln nu ~ N(P_mean, P_std^2)`` (Karras et al. 2022,
                                                              Table 1)
    ============  ==========================================  ================================================

    Parameters (``gamma``, ``k``, ``sigma_data``, ``p_mean``, ``p_std``) go in ``params``. Weightings built on
    ``p_t`` need the schedule, and a log-SNR inside its range. ``dmlib.score.weighting`` is the same idea over
    time for the DSM loss: its ``omega(t)`` is ``sigma(t)^2 w / p_t``, so ``"sigma2"`` is ``"eps"`` and
    ``"likelihood"`` is ``"elbo"``.
    """
    base, h, p = _weighting(name, params, schedule)
    lam = _checked_log_snr(log_snr, schedule if base == "schedule" else None)
    return _base_density(base, lam, schedule, p) * h(lam)


def _log_snr_range(lambda_range, schedule: Schedule | None, *, finite: bool = False) -> tuple[float, float]:
    """``lambda_range`` checked (finite, increasing, inside the schedule's range); None: the schedule's range,
    which must then be finite if ``finite`` (a VP schedule's reaches +inf at t = 0)."""
    full = _schedule_range(schedule) if schedule is not None else (-math.inf, math.inf)
    if lambda_range is None:
        if finite and not all(map(math.isfinite, full)):
            raise ValueError(f"this needs a finite lambda_range, e.g. (-10, 10); the schedule's is {full}.")
        return full
    lo, hi = (float(v) for v in lambda_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(
            f"lambda_range must be finite (lo, hi) with lo < hi, e.g. (-10, 10); got {lambda_range!r}."
        )
    if lo < full[0] or hi > full[1]:
        raise ValueError(
            f"lambda_range ({lo:g}, {hi:g}) leaves the schedule's log-SNR range [{full[0]:.4g}, {full[1]:.4g}]."
        )
    return lo, hi


class LogSNRDensity:
    """A density ``q`` of log-SNR on ``[lo, hi]``, piecewise constant on a fine grid: each cell's mass is the
    trapezoid integral of a weight ``w`` over it, over the total ``normalizer = int w``. :meth:`quantile`
    samples exactly this ``q`` (inverse CDF), so the importance weights ``w / q`` built with :meth:`pdf` are
    unbiased; ``q`` is ``w / normalizer`` up to O(cell width)."""

    def __init__(self, edges: torch.Tensor, w: torch.Tensor):
        masses = (w[1:] + w[:-1]) / 2 * edges.diff()
        self.edges, self.normalizer = edges, float(masses.sum())
        self.cdf = torch.cat([masses.new_zeros(1), masses.cumsum(0)]) / self.normalizer
        self.cdf[-1] = 1.0  # exactly, so that every u in [0, 1) falls in a cell of positive mass

    def _cell(self, sorted_values: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        i = torch.searchsorted(sorted_values.to(v.device), v.to(torch.float64), right=True) - 1
        return i.clamp(0, len(self.edges) - 2)

    def pdf(self, log_snr) -> torch.Tensor:
        """``q(lambda)``: the mass of lambda's cell over its width; 0 outside ``[lo, hi]``."""
        lam = _checked_log_snr(log_snr)
        edges, cdf, i = self.edges.to(lam.device), self.cdf.to(lam.device), self._cell(self.edges, lam)
        q = (cdf[i + 1] - cdf[i]) / (edges[i + 1] - edges[i])
        return torch.where((lam >= edges[0]) & (lam <= edges[-1]), q, 0.0).to(lam.dtype)

    def quantile(self, u: torch.Tensor) -> torch.Tensor:
        """The inverse CDF at ``u in [0, 1)`` (in ``u``'s dtype): uniform ``u`` gives draws of ``q``."""
        edges, cdf, i = self.edges.to(u.device), self.cdf.to(u.device), self._cell(self.cdf, u)
        frac = (u.to(torch.float64) - cdf[i]) / (cdf[i + 1] - cdf[i])
        lam = edges[i] + frac * (edges[i + 1] - edges[i])
        return lam.clamp(edges[0], edges[-1]).to(u.dtype)  # rounding never leaves [lo, hi]


def equivalent_density(
    name: str, lambda_range, schedule: Schedule | None = None, *, n_grid: int = 4096, **params
) -> LogSNRDensity:
    """The density of training log-SNRs equivalent to weighting ``name`` (Kingma & Gao 2023, sec. 4):
    ``q = w / Z`` on ``lambda_range``, ``Z = int w dlambda``. With ``lambda ~ q`` the weighted loss is
    ``1/2 E_q[(w / q) ||eps_hat - eps||^2 / D] = Z/2 E_q ||eps_hat - eps||^2 / D``: the plain eps-MSE
    times a constant, with the weighting moved into which noise levels are drawn (importance sampling).
    Tabulated on ``n_grid`` cells (:class:`LogSNRDensity`)."""
    _weighting(name, params, schedule)  # clear errors before the grid is built
    lo, hi = _log_snr_range(lambda_range, schedule, finite=True)
    if isinstance(n_grid, bool) or int(n_grid) != n_grid or n_grid < 2:
        raise ValueError(f"n_grid must be an integer >= 2; got {n_grid!r}.")
    edges = torch.linspace(lo, hi, int(n_grid) + 1, dtype=torch.float64)
    w = loss_weight(name, edges, schedule, **params)
    if not (torch.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
        raise ValueError(f"weighting {name!r} is not a finite positive weight on {lambda_range}; narrow it.")
    return LogSNRDensity(edges, w)


def weighted_total(
    name: str, log_snr, per_level_loss, schedule: Schedule | None = None, **params
) -> torch.Tensor:
    """``L_w = 1/2 int w(lambda) l(lambda) dlambda`` by the trapezoid rule on the increasing grid ``log_snr``,
    with ``l`` the eps-MSE per dimension at each level (e.g. :func:`irreducible_loss`)."""
    lam = _checked_log_snr(log_snr).to(torch.float64)
    ell = torch.as_tensor(per_level_loss, dtype=torch.float64)
    if lam.ndim != 1 or lam.numel() < 2 or ell.shape != lam.shape or not (lam.diff() > 0).all():
        raise ValueError(
            f"need an increasing 1-D log-SNR grid and one loss per level; got shapes "
            f"{tuple(lam.shape)} and {tuple(ell.shape)}."
        )
    return 0.5 * torch.trapezoid(loss_weight(name, lam, schedule, **params) * ell, lam)


def noise_level_sampler(
    schedule: Schedule, weighting: str, sampling: str = "uniform", lambda_range=None, **params
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The map ``u -> (t, w(lambda) / q(lambda))`` from ``u ~ U[0, 1)`` to a training time and its importance
    weight, for the loss ``L_w`` (module docstring) on ``lambda_range`` (None: the schedule's whole range):

    * ``"uniform"``: ``t`` uniform between the times of the range's ends, ``q = p_t / Delta t``;
    * ``"importance"``: ``lambda ~ w / Z`` (:func:`equivalent_density`; needs a finite ``lambda_range``).

    Both draw ``t`` piecewise uniformly over cells of time (one cell for ``"uniform"``; the cells of
    the density's grid, with their masses, for ``"importance"``), so that the weight
    ``w |d lambda / dt| / q_t(t)`` needs no inversion of the schedule per draw: for a weighting built on
    ``p_t = |dt / d lambda|`` it is ``h(lambda)`` times the cell's width over its mass. Both are inverse-CDF
    maps of ``u``, so ``E_u`` of the weight times a per-level loss is a 1-D integral.
    """
    base, h, p = _weighting(weighting, params, schedule)
    if sampling == "uniform":
        lo, hi = _log_snr_range(lambda_range, schedule)
        ends = torch.tensor([1.0, 0.0], dtype=torch.float64)  # t at lambda = lo, hi
        t_edges = (
            ends
            if lambda_range is None
            else schedule.t_from_log_snr(torch.tensor([lo, hi], dtype=torch.float64))
        )
        cdf = torch.tensor([0.0, 1.0], dtype=torch.float64)
    elif sampling == "importance":
        q = equivalent_density(weighting, lambda_range, schedule, **params)
        t_edges, cdf = schedule.t_from_log_snr(q.edges), q.cdf
    else:
        raise ValueError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}.")

    def draw(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        edges, c, u64 = t_edges.to(u.device), cdf.to(u.device), u.to(torch.float64)
        i = (torch.searchsorted(c, u64, right=True) - 1).clamp(0, len(c) - 2)
        mass = c[i + 1] - c[i]  # > 0: u < c[i + 1]
        # never the cell's far end, so never t = 0 with the whole range (as dmlib.ddpm.uniform_time)
        t = (edges[i] + (u64 - c[i]) / mass * (edges[i + 1] - edges[i])).to(u.dtype)
        lam = schedule.log_snr(t)
        ratio = h(lam) * ((edges[i] - edges[i + 1]).abs() / mass).to(u.dtype)
        if base != "schedule":  # w |d lambda / dt| = base h / p_t, and 1 / p_t = -d lambda / dt
            ratio = ratio * (_rate(schedule, t) * _base_density(base, lam.double(), schedule, p)).to(u.dtype)
        return t, ratio

    return draw


def weighted_loss(
    schedule: Schedule,
    weighting: str,
    *,
    prediction: str = "eps",
    sampling: str = "uniform",
    lambda_range=None,
    **params,
) -> Callable:
    """The weighted diffusion loss ``L_w`` (module docstring; Kingma & Gao 2023) as a loss function
    ``loss(model, x0, generator=None)`` for :func:`dmlib.train.train`, in the style of
    :func:`dmlib.ddpm.simple_loss`: ``model(x_t, t)`` predicts ``prediction``, the noise level comes from
    :func:`noise_level_sampler` (``sampling``, ``lambda_range``), and each sample's loss is
    ``1/2 (w / q) c ||pred - target||^2 / D`` with ``c`` of :func:`eps_mse_factor` (the error is taken where
    the network answers, not through a division by a small alpha or sigma).

    ``weighted_loss(schedule, "eps")`` is ``simple_loss(schedule) / 2`` draw for draw; every weighting
    gives the same expectation whichever ``sampling``, which changes only the variance.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}.")
    draw = noise_level_sampler(schedule, weighting, sampling, lambda_range, **params)

    def loss(model: Callable, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype, device=x0.device)
        t, ratio = draw(u)
        noise = noise_like(x0, generator)
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        x_t = _col(alpha, x0) * x0 + _col(sigma, x0) * noise
        target = from_x0_eps(x0, noise, prediction, alpha, sigma)
        mse = (model(x_t, t) - target).flatten(1).pow(2).mean(1)
        return 0.5 * (ratio * eps_mse_factor(prediction, alpha, sigma) * mse).mean()

    return loss


# ------------------------------------------------------------------------------------------------
# The irreducible loss, with the Gaussian-mixture oracle
# ------------------------------------------------------------------------------------------------


def _eps_errors(mixture, schedule: Schedule, log_snr, n: int, generator, denoiser=None, dtype=torch.float64):
    """Per level: the mean and standard error over ``n`` draws of the oracle's squared eps error per
    dimension (or, given a denoiser, of the model's minus the oracle's, on the same draws)."""
    from .oracle import MixtureOracle  # oracle.py imports this module

    lam = _checked_log_snr(log_snr, schedule).to(torch.float64).reshape(-1)
    if isinstance(n, bool) or int(n) != n or n < 2:
        raise ValueError(f"n must be an integer >= 2 (a standard error needs two draws); got {n!r}.")
    oracle = MixtureOracle(mixture, schedule)
    # one set of (x0, eps) for every level: the curve over lambda is smooth, and levels compare fairly
    x0 = mixture.sample(int(n), generator, dtype=torch.float64)
    eps = noise_like(x0, generator)
    rows = []
    for t in schedule.t_from_log_snr(lam):
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        x_t = alpha * x0 + sigma * eps
        err = ((-sigma * oracle.score(x_t, t) - eps) ** 2).mean(1)  # E[eps | x_t] = -sigma score (Tweedie)
        if denoiser is not None:
            eps_hat = denoiser.eps(x_t.to(dtype), t.to(dtype)).to(torch.float64)
            err = ((eps_hat - eps) ** 2).mean(1) - err
        rows.append(err)
    errs = torch.stack(rows)
    return errs.mean(1), errs.std(1) / math.sqrt(n)


def irreducible_loss(mixture, schedule: Schedule, log_snr, n: int = 4096, generator=None):
    """The least eps-MSE any network can reach at each log-SNR, ``E ||eps - E[eps | x_t]||^2 / D``, with the
    exact ``E[eps | x_t]`` of the mixture oracle, by Monte Carlo over ``n`` draws of ``x_t`` (shared by all
    levels). It depends on ``lambda`` alone (``x_t / alpha = x_0 + e^{-lambda/2} eps``), not on the schedule;
    for ``N(0, s^2 I)`` it is ``s^2 SNR / (1 + s^2 SNR)``. Returns ``(loss, standard_error)``, one per level."""
    return _eps_errors(mixture, schedule, log_snr, n, generator)


@torch.no_grad()
def excess_loss(denoiser: Denoiser, mixture, log_snr, n: int = 4096, generator=None, dtype=torch.float64):
    """What training can still remove at each log-SNR: the model's eps-MSE per dimension minus the
    irreducible one (:func:`irreducible_loss`), on the same Monte Carlo draws (so their noise mostly
    cancels). ``dtype`` is the one the model takes. Returns ``(excess, standard_error)``, one per level;
    the share of the loss a network can still reduce is ``excess / (excess + irreducible)``."""
    return _eps_errors(mixture, denoiser.schedule, log_snr, n, generator, denoiser, dtype)


def irreducible_totals(
    mixture,
    schedule: Schedule,
    lambda_range,
    *,
    names=None,
    n_levels: int = 129,
    n: int = 4096,
    generator=None,
) -> dict[str, float]:
    """Each weighting's irreducible loss ``1/2 int w(lambda) irreducible(lambda) dlambda`` on ``lambda_range``
    (trapezoid rule on ``n_levels`` levels, default parameters): the floor of each training loss."""
    lo, hi = _log_snr_range(lambda_range, schedule, finite=True)
    lam = torch.linspace(lo, hi, n_levels, dtype=torch.float64)
    floor, _ = irreducible_loss(mixture, schedule, lam, n, generator)
    return {name: float(weighted_total(name, lam, floor, schedule)) for name in names or LOSS_WEIGHTINGS}
