"""Steering a diffusion model with a class label: classifier guidance and classifier-free guidance
(CFG), proved on an exact labelled Gaussian-mixture oracle.

**One convention for the guidance weight.** Everything here takes Ho & Salimans' (2022, eq. 6)
weight ``w >= 0``; ``w = 0`` is the plain conditional model::

    eps_tilde(x, c) = (1 + w) eps(x, c) - w eps(x)
    score_tilde     = score(x | c) + w (score(x | c) - score(x))
                    = score(x) + (1 + w) grad log p_t(c | x)

(the second line by Bayes' rule, ``grad log p_t(c|x) = score(x|c) - score(x)``). Dhariwal & Nichol's
classifier scale ``s`` (2021, sec. 4, Algorithms 1-2) multiplies the classifier gradient,
``score(x) + s grad log p_t(c|x)``; diffusers' ``guidance_scale`` and DiT's ``cfg_scale`` write CFG as
``eps(x) + s (eps(x, c) - eps(x))``. Both are ``s = 1 + w`` (:func:`scale_from_w`, :func:`w_from_scale`).

**Classifier guidance** (Dhariwal & Nichol 2021, Algorithm 2) adds a noise-conditional classifier's
gradient, ``eps_tilde = eps(x) - (1 + w) sigma grad log p_phi(c | x_t)``; with the exact classifier
it is exactly CFG at the same ``w``. **Guidance interval** (Kynkäänniemi et al. 2024): guide only
for ``t`` in ``[t_lo, t_hi]`` and use the conditional model elsewhere.

**Guidance does not sample the tilted distribution.** At ``t = 0`` the guided score is the score of
``p(x|c)^{1+w} p(x)^{-w} / Z``, but at ``t > 0`` it is not the score of that density diffused
(diffusing does not commute with powers), so the guided probability-flow ODE ends elsewhere
(Chidambaram et al. 2024; Bradley & Nakkiran 2024, whose "gamma-powered" distribution is this one
with ``gamma = 1 + w``). For two 1D Gaussians both ends are closed forms
(:func:`tilted_gaussian_1d`, :func:`guided_gaussian_1d`); for a labelled mixture in 1D or 2D,
:func:`tilted_vs_guided` measures the gap and :func:`mode_statistics` what guidance does to
diversity.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from scipy import integrate
from torch import nn
from torch.nn import functional as F

from .ddpm import q_sample, simple_loss, uniform_time
from .nets.mlp import _check_even, embed_time
from .oracle import GaussianMixture, MixtureOracle, _diffused_stats
from .parameterization import Denoiser, _col, noise_like
from .samplers import SAMPLERS, time_grid
from .schedules import Schedule

# ------------------------------------------------------------------------------------------------
# The scale convention
# ------------------------------------------------------------------------------------------------


def check_w(w) -> float:
    """The guidance weight ``w`` (Ho & Salimans 2022, eq. 6) as a float, refused unless finite and >= 0."""
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
        raise TypeError(f"the guidance weight w must be a finite real number; got {w!r}.")
    if w < 0:
        raise ValueError(
            f"the guidance weight w must be >= 0 (w = 0 is the conditional model, Ho & Salimans 2022); got "
            f"{w}. A weight in [-1, 0) would interpolate towards the unconditional model (w = -1), which "
            f"is meaningful but is not guidance; if your w counts from the unconditional model (a "
            f"'guidance scale' s, where s = 1 is conditional), convert it with w_from_scale(s)."
        )
    return float(w)


def scale_from_w(w: float) -> float:
    """``s = 1 + w`` for Ho & Salimans' ``w``: the scale of ``eps(x) + s (eps(x, c) - eps(x))`` (diffusers'
    ``guidance_scale``, DiT's ``cfg_scale``) and of ``score(x) + s grad log p(c|x)`` (Dhariwal & Nichol
    2021's classifier scale)."""
    return 1.0 + check_w(w)


def w_from_scale(s: float) -> float:
    """``w = s - 1``, the inverse of :func:`scale_from_w`; ``s < 1`` (weaker than conditional) is refused."""
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s):
        raise TypeError(f"the guidance scale s must be a finite real number; got {s!r}.")
    if s < 1:
        raise ValueError(
            f"a guidance scale s = 1 + w must be >= 1 (s = 1 is the conditional model, s = 0 the "
            f"unconditional one); got {s}. Values in [0, 1) interpolate, they do not guide."
        )
    return float(s) - 1.0


def check_interval(interval) -> tuple[float, float] | None:
    """``None`` (guide at every t) or ``(t_lo, t_hi)`` with ``0 <= t_lo <= t_hi <= 1``."""
    if interval is None:
        return None
    if len(interval) != 2:
        raise ValueError(f"interval must be a pair (t_lo, t_hi); got {interval!r}.")
    lo, hi = (float(v) for v in interval)
    if not 0 <= lo <= hi <= 1:
        raise ValueError(
            f"the guidance interval (t_lo, t_hi) needs 0 <= t_lo <= t_hi <= 1; got ({lo}, {hi}). (Kynkäänniemi "
            f"et al. give theirs in EDM noise levels: convert with interval_from_noise_levels.)"
        )
    return lo, hi


def interval_from_noise_levels(schedule: Schedule, nu_lo: float, nu_hi: float) -> tuple[float, float]:
    """The times where EDM's noise level ``nu = sigma / alpha`` is ``nu_lo`` and ``nu_hi``: Kynkäänniemi et
    al. (2024) state their interval in ``nu`` (EDM's sigma); ``lambda = -2 log nu`` inverts to ``t``."""
    if not 0 < nu_lo <= nu_hi:
        raise ValueError(f"need 0 < nu_lo <= nu_hi; got nu_lo={nu_lo}, nu_hi={nu_hi}.")
    log_snr = -2 * torch.log(torch.tensor([nu_lo, nu_hi], dtype=torch.float64))  # less noise: earlier
    t_lo, t_hi = schedule.t_from_log_snr(log_snr).tolist()
    return t_lo, t_hi


def _weight_at(w: float, t: torch.Tensor, interval, x: torch.Tensor):
    """``w`` where ``t`` lies in the interval, else 0: a number, or a tensor of t's shape (no read-back)."""
    if interval is None:
        return w
    inside = (t >= interval[0]) & (t <= interval[1])
    return _col(w * inside.to(x.dtype), x)


# ------------------------------------------------------------------------------------------------
# Guided denoisers
# ------------------------------------------------------------------------------------------------


def cfg_denoiser(conditional: Denoiser, unconditional: Denoiser, w: float, *, interval=None) -> Denoiser:
    """Classifier-free guidance, Ho & Salimans (2022) eq. 6: ``eps_tilde = (1 + w) eps_c - w eps_u``.

    ``conditional`` and ``unconditional`` are :class:`~dmlib.parameterization.Denoiser` views of the
    same schedule (one network called with the label and with the null label, or the oracle's two
    denoisers). The combination is the same in every parameterization: at fixed ``x_t`` the score
    ``-eps / sigma`` and the data estimate ``(x_t - sigma eps) / alpha`` are affine in ``eps`` with
    coefficients that do not depend on the model, and an affine map ``f`` keeps affine combinations,
    ``f((1 + w) eps_c - w eps_u) = (1 + w) f(eps_c) - w f(eps_u)`` since ``(1 + w) - w = 1``. So
    combining scores or x0-predictions with the same weights gives this denoiser.

    ``interval=(t_lo, t_hi)``: guidance only for ``t_lo <= t <= t_hi``, the conditional model elsewhere
    (Kynkäänniemi et al. 2024). Both models are evaluated at every step.
    """
    w, interval = check_w(w), check_interval(interval)
    if repr(conditional.schedule) != repr(unconditional.schedule):
        raise ValueError(
            f"the conditional and unconditional denoisers must share one schedule; got "
            f"{conditional.schedule!r} and {unconditional.schedule!r}."
        )

    def guided_eps(x_t, t):
        eps_c, eps_u = conditional.eps(x_t, t), unconditional.eps(x_t, t)
        return eps_c + _weight_at(w, t, interval, x_t) * (eps_c - eps_u)

    return Denoiser(guided_eps, conditional.schedule, prediction="eps")


def _labels(c, x: torch.Tensor, num_classes: int | None = None, *, allow_null: bool = False):
    """``c`` as ``None``, a Python int, or a checked long tensor of shape (B,) on its own device."""
    top = None if num_classes is None else num_classes + (1 if allow_null else 0)
    if c is None:
        return None
    if isinstance(c, numbers.Integral) and not isinstance(c, bool):
        if c < 0 or (top is not None and c >= top):
            raise ValueError(
                f"label {c} is out of range: classes are 0..{num_classes - 1}" + _null(allow_null)
            )
        return int(c)
    if not torch.is_tensor(c) or c.is_floating_point() or c.dtype == torch.bool or c.shape != x.shape[:1]:
        got = f"{c.dtype} {tuple(c.shape)}" if torch.is_tensor(c) else repr(c)
        raise TypeError(f"a label must be an int or integer labels of shape ({x.shape[0]},); got {got}.")
    if c.device.type == "cpu" and len(c) and (c.min() < 0 or (top is not None and c.max() >= top)):
        valid = f"0..{top - 1}" if top is not None else "0 or above"
        raise ValueError(
            f"labels must lie in {valid}; got values from {c.min().item()} to {c.max().item()}"
            + _null(allow_null)
        )
    return c.long()


def _null(allow_null: bool) -> str:
    return " (and the null label num_classes means unconditional)." if allow_null else "."


def conditional_denoiser(model: Callable, schedule: Schedule, c, *, prediction: str = "eps", clip_x0=None):
    """A :class:`~dmlib.parameterization.Denoiser` of a label-conditional network ``model(x, t, y)`` with
    the label bound: ``c`` an int (every sample), integer labels of shape (B,), or ``None`` (the null
    label: the unconditional model, as :func:`dmlib.nets.adm.class_labels` maps it). Works for any
    ``x`` shape, e.g. vectors for :class:`~dmlib.nets.ConditionalMLP` or (B, 1, 8, 8) images for
    :class:`~dmlib.nets.ADMUNet`. With it CFG of a trained net reads::

        cfg_denoiser(conditional_denoiser(net, sched, c), conditional_denoiser(net, sched, None), w)
    """

    def predict(x_t, t):
        y = _labels(c, x_t)
        if isinstance(y, int):
            y = torch.full((x_t.shape[0],), y, dtype=torch.long, device=x_t.device)
        return model(x_t, t, y)

    return Denoiser(predict, schedule, prediction=prediction, clip_x0=clip_x0)


def classifier_gradient(classifier: Callable, x_t: torch.Tensor, t, c) -> torch.Tensor:
    """``grad_x log p(c | x_t)`` by autograd, for ``classifier(x_t, t) -> (B, C)`` logits or log-probabilities
    (``log_softmax`` normalizes either). Runs under ``torch.no_grad`` samplers too."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        logits = classifier(x, t)
        if not torch.is_tensor(logits) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            got = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise ValueError(f"the classifier must return (B, C) logits for B = {x.shape[0]}; got {got}.")
        labels = _labels(c, x, logits.shape[1])
        if labels is None:
            raise ValueError(
                "classifier guidance needs a class c (an int or labels of shape (B,)); got None."
            )
        if isinstance(labels, int):
            log_p = torch.log_softmax(logits, dim=1)[:, labels]
        else:
            log_p = torch.log_softmax(logits, dim=1).gather(1, labels.to(logits.device)[:, None])
        (grad,) = torch.autograd.grad(log_p.sum(), x)
    return grad


def classifier_guided_denoiser(
    denoiser: Denoiser, classifier: Callable, c, w: float, *, interval=None
) -> Denoiser:
    """Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2, scale ``s = 1 + w``):
    ``eps_tilde = eps(x_t) - (1 + w) sigma_t grad log p_phi(c | x_t)``, i.e. the score
    ``score(x) + (1 + w) grad log p(c | x)``, the gradient by autograd (:func:`classifier_gradient`).

    ``denoiser`` is the unconditional model: then ``w = 0`` gives the conditional score, and with the
    exact classifier the result equals :func:`cfg_denoiser` at the same ``w``. (Dhariwal & Nichol also
    guide a conditional model; that adds the classifier term to ``score(x|c)`` instead.) ``classifier``
    maps ``(x_t, t)`` to (B, C) logits or log-probabilities, e.g. a trained :class:`NoisyClassifier` or
    :meth:`LabelledMixture.classifier`. ``interval``: as in :func:`cfg_denoiser` (scale 1 outside).
    """
    w, interval = check_w(w), check_interval(interval)
    sched = denoiser.schedule

    def guided_eps(x_t, t):
        grad = classifier_gradient(classifier, x_t, t, c).to(x_t.dtype)
        scale = 1 + _weight_at(w, t, interval, x_t)
        return denoiser.eps(x_t, t) - scale * _col(sched.sigma(t), x_t) * grad

    return Denoiser(guided_eps, sched, prediction="eps")


# ------------------------------------------------------------------------------------------------
# The exact oracle
# ------------------------------------------------------------------------------------------------


class LabelledMixture:
    """A :class:`~dmlib.oracle.GaussianMixture` whose components carry class labels: class ``c`` is the
    sub-mixture of its components, ``p(x_0 | c) = sum_{k in c} w_k N(mu_k, S_k) / p(c)`` with
    ``p(c) = sum_{k in c} w_k``.

    Diffused by any schedule (:mod:`dmlib.oracle`), everything is exact: ``log p_t(x | c)`` and
    ``log p_t(x)`` (:meth:`log_prob`), ``log p_t(c | x)`` (:meth:`log_class_posterior`, a softmax over
    classes of ``log p(c) + log p_t(x | c)``), the conditional and unconditional scores and
    denoisers, and the guided score. A label ``c`` is ``None`` (unconditional), an int in
    ``0..num_classes-1``, or integer labels of shape (B,) where the null label ``num_classes`` means
    unconditional (the convention of :func:`dmlib.nets.adm.class_labels`).
    """

    def __init__(self, mixture: GaussianMixture, labels, num_classes: int | None = None):
        K = mixture.means.shape[0]
        labels = torch.as_tensor(labels)
        if labels.shape != (K,) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be {K} integers, one class per component; got {labels.tolist()}.")
        labels = labels.long().cpu()
        num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
        if (labels < 0).any() or (labels >= num_classes).any():
            raise ValueError(f"labels must lie in 0..{num_classes - 1}; got {labels.tolist()}.")
        if missing := sorted(set(range(num_classes)) - set(labels.tolist())):
            raise ValueError(f"classes {missing} have no component: every class needs one.")
        weights = mixture.weights.cpu()
        class_weights = torch.zeros(num_classes, dtype=weights.dtype).index_add(0, labels, weights)
        if (class_weights <= 0).any():
            raise ValueError(f"every class needs positive weight p(c); got {class_weights.tolist()}.")
        self.mixture, self.labels, self.num_classes = mixture, labels, num_classes
        self.class_weights = class_weights.to(mixture.weights.device)
        self.class_mixtures = []
        for c in range(num_classes):
            idx = (labels == c).nonzero().squeeze(1).to(mixture.means.device)
            self.class_mixtures.append(
                GaussianMixture._unchecked(
                    mixture.means[idx], mixture.covs[idx], mixture.weights[idx] / self.class_weights[c]
                )
            )

    def to(self, device=None, dtype=None) -> LabelledMixture:
        """The same labelled mixture with its tensors on ``device`` and/or in ``dtype`` (values unchecked:
        reading them back from the device would stall it)."""
        moved = LabelledMixture.__new__(LabelledMixture)
        moved.labels, moved.num_classes = self.labels, self.num_classes
        moved.mixture = self.mixture.to(device, dtype)
        moved.class_weights = self.class_weights.to(device=device, dtype=dtype)
        moved.class_mixtures = [m.to(device, dtype) for m in self.class_mixtures]
        return moved

    @property
    def dim(self) -> int:
        return self.mixture.dim

    def sample(self, n: int, generator=None, c: int | None = None, dtype=torch.float32):
        """``(x, y)``: ``n`` samples and their classes, on the mixture's device; all of class ``c`` if given."""
        dev = self.mixture.means.device
        if c is not None:
            c = _labels(c, torch.empty(0), self.num_classes)
            return self.class_mixtures[c].sample(n, generator, dtype), torch.full((n,), c, device=dev)
        y = torch.multinomial(self.class_weights, n, replacement=True, generator=generator)
        x = torch.empty(n, self.dim, dtype=dtype, device=dev)
        for k, mix in enumerate(self.class_mixtures):
            idx = (y == k).nonzero().squeeze(1)
            x[idx] = mix.sample(len(idx), generator, dtype)
        return x, y

    # --- exact quantities, all from dmlib.oracle -------------------------------------------------

    def _stats(self, schedule: Schedule, x: torch.Tensor, t, c, key: str) -> torch.Tensor:
        """``key`` of :func:`dmlib.oracle._diffused_stats` for label(s) ``c`` (per-sample labels: all
        classes computed, then each sample's picked)."""
        c = _labels(c, x, self.num_classes, allow_null=True)
        c = None if isinstance(c, int) and c == self.num_classes else c

        def stats(mix):
            return MixtureOracle(mix, schedule)._stats(x, t)[key]

        if c is None:
            return stats(self.mixture)
        if isinstance(c, int):
            return stats(self.class_mixtures[c])
        values = torch.stack([stats(m) for m in (*self.class_mixtures, self.mixture)], dim=1)  # (B, C+1, ...)
        index = c.to(x.device).reshape(-1, 1, *(1,) * (values.ndim - 2)).expand(-1, 1, *values.shape[2:])
        return values.gather(1, index).squeeze(1)

    def log_prob(self, schedule: Schedule, x: torch.Tensor, t, c=None) -> torch.Tensor:
        """``log p_t(x | c)``, or ``log p_t(x)`` for ``c=None``; shape (B,)."""
        return self._stats(schedule, x, t, c, "log_prob")

    def score(self, schedule: Schedule, x: torch.Tensor, t, c=None) -> torch.Tensor:
        """``grad_x log p_t(x | c)``, or the unconditional score for ``c=None``."""
        return self._stats(schedule, x, t, c, "score")

    def x0(self, schedule: Schedule, x: torch.Tensor, t, c=None) -> torch.Tensor:
        """``E[x_0 | x_t = x, c]``, or ``E[x_0 | x_t = x]`` for ``c=None``: the optimal denoisers."""
        return self._stats(schedule, x, t, c, "x0")

    def log_class_posterior(self, schedule: Schedule, x: torch.Tensor, t) -> torch.Tensor:
        """``log p_t(c | x)`` for every class, shape (B, C): Bayes' rule, a softmax over classes of
        ``log p(c) + log p_t(x | c)``."""
        log_joint = torch.stack([self.log_prob(schedule, x, t, c) for c in range(self.num_classes)], dim=1)
        return torch.log_softmax(log_joint + self.class_weights.to(log_joint).log(), dim=1)

    def guided_score(self, schedule: Schedule, x: torch.Tensor, t, c, w: float) -> torch.Tensor:
        """The CFG score ``(1 + w) score(x | c) - w score(x)`` (Ho & Salimans 2022, eq. 6 in score form)."""
        w = check_w(w)
        return (1 + w) * self.score(schedule, x, t, c) - w * self.score(schedule, x, t)

    def denoiser(self, schedule: Schedule, c=None) -> Denoiser:
        """The exact conditional (or, for ``c=None``, unconditional) denoiser."""
        return Denoiser(lambda x, t: self.x0(schedule, x, t, c), schedule, prediction="x0")

    def guided_denoiser(self, schedule: Schedule, c, w: float, *, interval=None) -> Denoiser:
        """The exact CFG denoiser: :func:`cfg_denoiser` of the exact conditional and unconditional ones."""
        return cfg_denoiser(self.denoiser(schedule, c), self.denoiser(schedule), w, interval=interval)

    def classifier(self, schedule: Schedule) -> Callable:
        """The exact noise-conditional classifier ``(x_t, t) -> log p_t(c | x_t)``, shape (B, C)."""
        return lambda x, t: self.log_class_posterior(schedule, x, t)

    def _log_joint_data(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(c) + log p(x_0 = x | c)`` at t = 0 for every class, (B, C), whatever the schedule."""
        log_cond = torch.stack([m.log_prob(x) for m in self.class_mixtures], dim=1)
        return log_cond + self.class_weights.to(log_cond).log()

    def bayes_classify(self, x: torch.Tensor) -> torch.Tensor:
        """The exact Bayes classifier of clean data, ``argmax_c p(c | x_0 = x)``: which class a generated
        sample landed in (its accuracy on data of known class is the best any classifier can do)."""
        return self._log_joint_data(x.to(self.mixture.means.dtype)).argmax(1)


# ------------------------------------------------------------------------------------------------
# The tilted distribution and the guided ODE
# ------------------------------------------------------------------------------------------------


def _log_tilted_unnormalized(lm: LabelledMixture, c: int, w: float, x: torch.Tensor) -> torch.Tensor:
    """``(1 + w) log p(x|c) - w log p(x)``, written ``log p(x|c) + w log p(c|x) - w log p(c)``: each term
    is bounded where the first is (``log p(c|x) <= 0``), so no difference of large numbers."""
    log_joint = lm._log_joint_data(x)
    log_post = torch.log_softmax(log_joint, dim=1)[:, c]
    return lm.class_mixtures[c].log_prob(x) + w * (log_post - lm.class_weights[c].to(x).log())


def _box(lm: LabelledMixture, c: int, n_std: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A box (CPU, float64) holding class ``c`` to ``n_std`` of its widest component: it holds the tilted
    density too, which is at most ``p(x|c) / p(c)^w`` (since ``p(c|x) <= 1``)."""
    mix = lm.class_mixtures[c].to("cpu", torch.float64)
    spread = n_std * torch.linalg.eigvalsh(mix.covs).max().sqrt()
    return mix.means.min(0).values - spread, mix.means.max(0).values + spread


def _grid(lo: torch.Tensor, hi: torch.Tensor, n: int):
    """Cell centres of an ``n``-per-dimension grid on the box ``[lo, hi]`` (1D or 2D), and the cell widths."""
    widths = (hi - lo) / n
    axes = [lo[d] + widths[d] * (torch.arange(n, dtype=lo.dtype) + 0.5) for d in range(len(lo))]
    points = torch.cartesian_prod(*axes) if len(axes) > 1 else axes[0][:, None]
    return points, widths


class _TiltedGrid:
    """The tilted density of class ``c`` on an ``n_grid``-per-dimension grid over :func:`_box` (CPU,
    float64): ``log_z`` by the midpoint rule (spectrally accurate for Gaussians), cell probabilities
    ``log_cell`` to draw exact samples from."""

    def __init__(self, lm: LabelledMixture, c, w, n_grid: int):
        if lm.dim not in (1, 2):
            raise ValueError(
                f"the tilted density is normalized by quadrature on a grid: 1D or 2D only; got {lm.dim}D."
            )
        c = _labels(c, torch.empty(0), lm.num_classes)
        if c is None:
            raise ValueError("the tilted density needs a class c; got None.")
        self.lm, self.c, self.w = lm.to("cpu", torch.float64), c, check_w(w)
        self.points, self.widths = _grid(*_box(lm, c), n_grid)
        log_f = _log_tilted_unnormalized(self.lm, c, self.w, self.points)
        self.log_cell = torch.log_softmax(log_f, 0)
        self.log_z = torch.logsumexp(log_f, 0) + self.widths.log().sum()

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        return _log_tilted_unnormalized(self.lm, self.c, self.w, x) - self.log_z

    def sample(self, n: int, generator=None) -> torch.Tensor:
        """A cell drawn with its probability, then a uniform point in it."""
        cell = torch.multinomial(self.log_cell.exp(), n, replacement=True, generator=generator)
        jitter = torch.rand(n, self.lm.dim, generator=generator, dtype=torch.float64) - 0.5
        return self.points[cell] + jitter * self.widths


def tilted_log_density(lm: LabelledMixture, c: int, w: float, x: torch.Tensor, *, n_grid: int = 512):
    """``log [p(x|c)^{1+w} p(x)^{-w} / Z]`` at t = 0, the "tilted" density whose score is the guided score
    at t = 0 (Bradley & Nakkiran 2024's gamma-powered distribution, ``gamma = 1 + w``). ``Z`` by the
    midpoint rule on an ``n_grid``-per-dimension grid over a box holding class ``c`` (1D or 2D)."""
    log_p = _TiltedGrid(lm, c, w, n_grid).log_density(x.to("cpu", torch.float64))
    return log_p.to(device=x.device, dtype=x.dtype)


def sample_tilted(lm: LabelledMixture, c: int, w: float, n: int, generator=None, *, n_grid: int = 512):
    """``n`` exact samples of the tilted density (float64, CPU): a grid cell drawn with its probability,
    then a uniform point in it (the cell width, box width / n_grid, is the only approximation: for a
    one-component class, 1/32 of its widest std at the default grid)."""
    return _TiltedGrid(lm, c, w, n_grid).sample(n, generator)


def sample_guided(
    lm: LabelledMixture,
    schedule: Schedule,
    c: int,
    w: float,
    n: int,
    generator=None,
    *,
    sampler: str = "dpm_solver_3",
    steps: int = 64,
    interval=None,
) -> torch.Tensor:
    """``n`` samples (float64) of the exact CFG probability-flow ODE: :meth:`LabelledMixture.guided_denoiser`
    integrated by ``SAMPLERS[sampler]`` on its time grid of ``steps`` steps (on a 2D two-class mixture,
    64 steps of DPM-Solver-3 gave the KL of :func:`tilted_vs_guided` at w = 7 within 0.1% of 256 steps;
    Heun with 64 steps was 1.5% off). The start is the exact ``p_1(x | c)`` (data of class c, diffused),
    so that at ``w = 0`` the end is ``p(x | c)`` up to the solver's error and any gap at ``w > 0`` is
    guidance's own."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    c = _labels(c, torch.empty(0), lm.num_classes)
    if c is None:
        raise ValueError("guided sampling needs a class c; got None.")
    spec = SAMPLERS[sampler]
    lm64 = lm.to(dtype=torch.float64)
    x0, _ = lm64.sample(n, generator, c=c, dtype=torch.float64)
    x_start = q_sample(schedule, x0, 1.0, noise_like(x0, generator))
    ts = time_grid(schedule, steps, spec.grid)
    den = lm64.guided_denoiser(schedule, c, w, interval=interval)
    return spec.fn(den, x_start, ts, generator=generator, **spec.options)


def mode_statistics(lm: LabelledMixture, x: torch.Tensor) -> dict:
    """Diversity of samples ``x`` (N, D), measured with the exact mixture at t = 0. Per component ``k``,
    with responsibilities ``r_k(x)`` as soft assignments: ``weights``, the share of samples
    (``mean_n r_k(x_n)``); ``within_var``, the variance per dimension about the samples' own weighted
    mean; ``shift``, the distance of that mean from ``mu_k``; ``component_var``, ``tr S_k / D`` for
    comparison. Guidance moves the weights, shrinks ``within_var`` and pushes the modes apart."""
    x = x.to(lm.mixture.means)
    resp = _diffused_stats(lm.mixture, x, x.new_ones(1), x.new_zeros(1))["responsibilities"]  # (N, K)
    mass = resp.sum(0)
    mean = (resp.T @ x) / mass.clamp(min=torch.finfo(x.dtype).tiny)[:, None]  # (K, D)
    sq = ((x[:, None, :] - mean[None]) ** 2).sum(-1) / lm.dim  # (N, K)
    return {
        "weights": (mass / x.shape[0]).tolist(),
        "within_var": ((resp * sq).sum(0) / mass.clamp(min=torch.finfo(x.dtype).tiny)).tolist(),
        "shift": (mean - lm.mixture.means).norm(dim=1).tolist(),
        "component_var": (torch.diagonal(lm.mixture.covs, dim1=1, dim2=2).sum(-1) / lm.dim).tolist(),
    }


def _histogram_kl(grid: _TiltedGrid, x: torch.Tensor, bins: int, refine: int) -> float:
    """Plug-in ``KL(q_hat || p)`` of the samples' histogram (``bins`` per dimension) against the exact
    tilted bin probabilities, each bin integrated by ``refine^D`` midpoints. The box holds class c and
    every sample, so each sample falls in a bin of positive probability."""
    lo, hi = _box(grid.lm, grid.c)
    lo, hi = torch.minimum(lo, x.min(0).values - 1e-9), torch.maximum(hi, x.max(0).values + 1e-9)
    fine, widths = _grid(lo, hi, bins * refine)
    log_p = grid.log_density(fine) + widths.log().sum()

    def flat_index(i):  # (N, D) bin coordinates -> one index
        return i[:, 0] * bins + i[:, 1] if grid.lm.dim == 2 else i[:, 0]

    fine_bin = flat_index(
        ((fine - lo) / widths).floor().long() // refine
    )  # fine cell i lies in bin i // refine
    log_bin = torch.full((bins**grid.lm.dim,), -math.inf, dtype=torch.float64)
    log_bin = log_bin.scatter_reduce(0, fine_bin, log_p, "amax")
    # log-sum-exp per bin, its largest term factored out
    log_bin = (
        log_bin + torch.zeros_like(log_bin).index_add(0, fine_bin, (log_p - log_bin[fine_bin]).exp()).log()
    )
    sample_bin = flat_index(((x - lo) / (refine * widths)).floor().long().clamp(0, bins - 1))
    q = torch.bincount(sample_bin, minlength=bins**grid.lm.dim).double() / x.shape[0]
    seen = q > 0
    return (q[seen] * (q[seen].log() - log_bin[seen])).sum().item()


def tilted_vs_guided(
    lm: LabelledMixture,
    schedule: Schedule,
    c: int,
    w: float,
    n: int = 4000,
    generator=None,
    *,
    sampler: str = "dpm_solver_3",
    steps: int = 64,
    bins: int = 32,
    refine: int = 8,
    n_grid: int = 512,
) -> dict:
    """How far the exact guided ODE's samples are from the tilted density, for one ``w`` (call it for
    ``w`` in 0, 1, 3, 7 for the table).

    Returns ``kl``, the histogram KL (``bins`` per dimension) of ``n`` :func:`sample_guided` samples
    against the exact tilted bin probabilities, and ``kl_floor``, the same for ``n`` exact tilted
    samples (the plug-in estimate's own bias, about ``(occupied bins - 1) / 2n``): at ``w = 0`` the two
    agree, for ``w > 0`` they do not. Also :func:`mode_statistics` of both sample sets (``guided``,
    ``tilted``), the tilted density's exact component weights (``tilted_weights``, by quadrature of
    ``r_k(x)``), and the samples.
    """
    grid = _TiltedGrid(lm, c, w, n_grid)
    guided = sample_guided(lm, schedule, grid.c, grid.w, n, generator, sampler=sampler, steps=steps).cpu()
    tilted = grid.sample(n, generator)
    resp = _diffused_stats(grid.lm.mixture, grid.points, grid.points.new_ones(1), grid.points.new_zeros(1))
    return {
        "w": grid.w,
        "kl": _histogram_kl(grid, guided, bins, refine),
        "kl_floor": _histogram_kl(grid, tilted, bins, refine),
        "guided": mode_statistics(lm, guided),
        "tilted": mode_statistics(lm, tilted),
        "tilted_weights": (grid.log_cell.exp() @ resp["responsibilities"]).tolist(),
        "guided_samples": guided,
        "tilted_samples": tilted,
    }


def tilted_gaussian_1d(mean_c: float, std_c: float, mean: float, std: float, w: float) -> dict:
    """The tilted density ``N(mean_c, std_c^2)^{1+w} N(mean, std^2)^{-w} / Z``: a Gaussian of precision
    ``(1 + w) / std_c^2 - w / std^2`` and mean ``((1 + w) mean_c / std_c^2 - w mean / std^2) / precision``
    (product of Gaussian exponents), when that precision is positive."""
    w = check_w(w)
    precision = (1 + w) / std_c**2 - w / std**2
    if precision <= 0:
        raise ValueError(
            f"the tilted density is not normalizable for w = {w}: its precision (1+w)/std_c^2 - w/std^2 = "
            f"{precision:g} <= 0 (a conditional wider than the marginal limits w to "
            f"std^2 / (std_c^2 - std^2))."
        )
    return {"mean": ((1 + w) * mean_c / std_c**2 - w * mean / std**2) / precision, "var": 1 / precision}


def guided_gaussian_1d(
    mean_c: float, std_c: float, mean: float, std: float, w: float, nu_max: float = math.inf
) -> dict:
    """Mean and variance where the CFG probability-flow ODE ends, for a conditional ``N(mean_c, std_c^2)``
    and an unconditional ``N(mean, std^2)`` model (exact scores), started from ``p(x | c)`` diffused to
    EDM noise level ``nu_max = sigma / alpha`` (``inf``: the limit).

    In EDM's variables ``y = x / alpha``, ``nu = sigma / alpha`` the ODE is ``dy/dnu = eps_tilde`` (Karras
    et al. 2022, eq. 4), here linear, ``dy/dnu = a(nu) y + b(nu)`` with
    ``a = (1 + w) nu / (std_c^2 + nu^2) - w nu / (std^2 + nu^2)``. Its integrating factor is
    ``Phi(nu) = (std_c^2 + nu^2)^{(1+w)/2} (std^2 + nu^2)^{-w/2}``, so, with ``N = nu_max``,

        Var y_0 = (std_c^2 + N^2) Phi(0)^2 / Phi(N)^2          (-> std_c^2 (std_c^2 / std^2)^w as N -> inf)
        E y_0   = mean_c + w (mean_c - mean) Phi(0) int_0^N nu / ((std^2 + nu^2) Phi(nu)) dnu

    (the integral by adaptive quadrature). Compare :func:`tilted_gaussian_1d`: the two agree at ``w = 0``
    only. The endpoint does not depend on the schedule: every schedule is the same ODE in ``nu``.
    """
    w = check_w(w)
    if not (std_c > 0 and std > 0 and nu_max > 0):
        raise ValueError(f"need std_c, std, nu_max > 0; got {std_c}, {std}, {nu_max}.")
    vc, v = std_c**2, std**2

    def log_phi(nu):
        return (1 + w) / 2 * math.log(vc + nu**2) - w / 2 * math.log(v + nu**2)

    if math.isinf(nu_max):
        var = vc * (vc / v) ** w
    else:
        var = (vc + nu_max**2) * math.exp(2 * (log_phi(0.0) - log_phi(nu_max)))
    integral, _ = integrate.quad(
        lambda nu: nu / (v + nu**2) * math.exp(log_phi(0.0) - log_phi(nu)),
        0,
        nu_max,
        epsabs=1e-13,
        epsrel=1e-12,
    )
    return {"mean": mean_c + w * (mean_c - mean) * integral, "var": var}


# ------------------------------------------------------------------------------------------------
# Training: condition dropout and a noise-conditional classifier
# ------------------------------------------------------------------------------------------------


def _labelled_batch(batch, num_classes: int):
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            "a labelled loss needs batches (x0, y): pass train() a DataLoader over TensorDataset(x, y); "
            f"got {type(batch).__name__}."
        )
    x0, y = batch
    return x0, _labels(y, x0, num_classes)


def cfg_loss(
    schedule: Schedule, num_classes: int, *, p_uncond: float = 0.1, prediction: str = "eps", null_label=None
) -> Callable:
    """``loss(model, (x0, y), generator)`` for :func:`dmlib.train.train`: L_simple of ``model(x_t, t, y)``
    with condition dropout, each label replaced by the null label with probability ``p_uncond`` (Ho &
    Salimans 2022, Algorithm 1), so one network learns the conditional and the unconditional model.

    ``null_label`` defaults to ``num_classes`` (the convention of :class:`~dmlib.nets.ConditionalMLP`,
    :class:`~dmlib.nets.ADMUNet` and DiT). Labelled data go to the trainer as a DataLoader with a seeded
    generator, which the trainer re-seeds per epoch, so a run resumes exactly::

        loader = DataLoader(TensorDataset(x, y), batch_size=256, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        net = ConditionalMLP(dim=2, num_classes=4)
        train(net, loader, cfg_loss(sched, num_classes=4), TrainConfig(steps=2000))
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}.")
    null = num_classes if null_label is None else null_label
    if isinstance(null, bool) or not isinstance(null, numbers.Integral) or null < 0:
        raise ValueError(f"null_label must be a non-negative integer; got {null_label!r}.")
    if null < num_classes:
        raise ValueError(
            f"null_label {null} collides with class {null} of 0..{num_classes - 1}: the dropped label must "
            f"differ from every class (the library's nets use null_label = num_classes = {num_classes})."
        )
    if not 0 <= p_uncond <= 1:
        raise ValueError(
            f"p_uncond is a probability in [0, 1] (Ho & Salimans use 0.1 or 0.2); got {p_uncond}."
        )
    denoise_loss = simple_loss(schedule, prediction=prediction)

    def loss(model: Callable, batch, generator=None) -> torch.Tensor:
        x0, y = _labelled_batch(batch, num_classes)
        drop = torch.rand(y.shape, generator=generator, device=y.device) < p_uncond
        y = y.masked_fill(drop, null)
        return denoise_loss(lambda x_t, t: model(x_t, t, y), x0, generator)

    return loss


class NoisyClassifier(nn.Module):
    """A noise-conditional classifier ``p_phi(c | x_t)`` (Dhariwal & Nichol 2021, sec. 4): an MLP on
    ``[x_t, emb(t)]`` giving (B, num_classes) logits. ``x`` of shape (B, dim) or (B, ...) with ``dim``
    values per sample (e.g. an 8x8 image for ``dim=64``), flattened."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 128, depth: int = 3, time_dim: int = 32):
        super().__init__()
        _check_even(time_dim)
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
            raise ValueError(f"a classifier needs num_classes >= 2; got {num_classes!r}.")
        self.config = dict(dim=dim, num_classes=num_classes, hidden=hidden, depth=depth, time_dim=time_dim)
        self.dim, self.num_classes, self.time_dim = dim, num_classes, time_dim
        layers, width = [], dim + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError(
                f"NoisyClassifier expects x of shape (B, {self.dim}) or (B, ...) with {self.dim} values."
            )
        flat = x.reshape(x.shape[0], -1)
        return self.net(torch.cat([flat, embed_time(t, flat, self.time_dim)], dim=1))


def classifier_loss(schedule: Schedule, num_classes: int) -> Callable:
    """``loss(classifier, (x0, y), generator)``: the cross-entropy of ``classifier(x_t, t)`` for
    ``x_t = alpha x0 + sigma eps``, ``t ~ U(0, 1]``, training a classifier for every noise level
    (Dhariwal & Nichol 2021, sec. 4)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"a classifier needs num_classes >= 2; got {num_classes!r}.")

    def loss(model: Callable, batch, generator=None) -> torch.Tensor:
        x0, y = _labelled_batch(batch, num_classes)
        t = uniform_time(x0, generator)
        x_t = q_sample(schedule, x0, t, noise_like(x0, generator))
        return F.cross_entropy(model(x_t, t), y)

    return loss


__all__ = [
    "check_w",
    "scale_from_w",
    "w_from_scale",
    "check_interval",
    "interval_from_noise_levels",
    "cfg_denoiser",
    "conditional_denoiser",
    "classifier_gradient",
    "classifier_guided_denoiser",
    "LabelledMixture",
    "tilted_log_density",
    "sample_tilted",
    "sample_guided",
    "mode_statistics",
    "tilted_vs_guided",
    "tilted_gaussian_1d",
    "guided_gaussian_1d",
    "cfg_loss",
    "NoisyClassifier",
    "classifier_loss",
]
