"""Robustness with a diffusion prior (Chapter 9): adversarial purification and anomaly detection.

**Purification** (DiffPure; Nie et al. 2022, sec. 3.1). An input ``x`` that an adversary nudged off the
data is diffused with the forward marginal to a moderate time ``t*``,
``x_t* = alpha(t*) x + sigma(t*) eps`` (``q(x_t* | x)``, Ho et al. 2020 eq. 4), and brought back with
the reverse process from ``t*`` to 0. The noise drowns the small perturbation while ``t*`` is small
enough to keep the class; the classifier then sees the purified sample. With an exact reverse process
the output law is ``int p(x_0 | x_t*) q(x_t* | x) dx_t*``, which the Gaussian-mixture oracle samples
exactly (:func:`purify_exact`). Nie et al. solve the reverse SDE; :func:`purify` runs the ancestral
(DDPM) chain or deterministic DDIM from ``t*`` with any :class:`~dmlib.parameterization.Denoiser`.

**Attacks.** PGD (Madry et al. 2018, sec. 2: the saddle-point problem, eq. 2.1, solved on the inside
by projected gradient ascent, ``x <- Pi_{x + S}(x + alpha sgn grad_x L)`` for ``S`` the L_inf ball, and
the normalized gradient for the L_2 ball), from a random start in the ball (:func:`pgd`). A randomized
defence has a random gradient; Expectation over Transformation (EOT; Athalye et al. 2018, sec. 4.2)
attacks ``E_T[L(f(T(x)), y)]``, whose gradient is the average of the draws' gradients
(:func:`eot_gradient`). The *adaptive* attack differentiates through the purifier itself: here by
plain backpropagation through its few steps (memory grows with the steps; Nie et al., sec. 3.2,
get the exact gradient of their SDE solver in constant memory with the stochastic adjoint method of
Li et al. 2020). Where a defence is not differentiable, BPDA (Athalye et al. 2018, sec. 4.1) replaces
its backward pass by the identity; every step here is differentiable, so it is not needed.

**Why a non-adaptive evaluation overstates robustness.** Attacking the classifier alone and then
purifying measures the defence against an adversary who ignores it: the perturbation, tuned to the
classifier's gradient at ``x``, is small next to ``sigma(t*)`` and is washed out. An adversary who
knows the defence (the white-box threat model of Madry et al. and Athalye et al.) maximizes the loss of
the whole pipeline ``classifier(purify(x))`` and, with EOT over its randomness, finds perturbations
that survive the noise. :func:`robustness_report` gives both numbers; only the adaptive one is a claim
of robustness (Lee & Kim 2023 show that even DiffPure's own adaptive numbers drop under stronger
gradient estimates).

**Anomaly detection** (AnoDDPM; Wyatt et al. 2022, their partial-diffusion strategy): diffuse partially to
``t < 1``, reconstruct, and score by the squared reconstruction error ``||x - x_hat||^2``
(:func:`anomaly_score`); a model of the normal data reconstructs normal inputs and pulls anomalies toward
normal ones. (AnoDDPM's main model diffuses with simplex noise; this is their Gaussian-noise variant.) On a Gaussian-mixture
toy the exact ``-log p(x)`` is the ceiling (:func:`box_anomalies`), compared by :func:`auroc`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .connections import reverse_kernel
from .data import load_digits
from .ddpm import q_sample, run_steps, simple_loss
from .nets import UNet
from .oracle import GaussianMixture
from .parameterization import Denoiser, _col, noise_like
from .samplers import ddim_step, time_grid
from .schedules import Schedule, get_schedule
from .train import TrainConfig, train

NORMS = ("linf", "l2")
REVERSE = ("ancestral", "ddim")  # ddim_step with eta = 1 (DDPM with Sigma = betatilde) or eta = 0
DATA_RANGE = (-1.0, 1.0)  # the digits' pixel range (dmlib.data.load_digits)


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return int(value)


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a positive finite number; got {value!r}.")
    return float(value)


def _check_time(t) -> float:
    """A diffusion time for purification or reconstruction: a number in (0, 1] (at 0 nothing is done)."""
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0 < t <= 1:
        raise ValueError(f"t* must be a number in (0, 1] (how far to diffuse the input); got {t!r}.")
    return float(t)


def _check_reverse(sampler: str) -> float:
    if sampler not in REVERSE:
        raise ValueError(f"unknown reverse process {sampler!r}; choose one of {', '.join(REVERSE)}.")
    return 1.0 if sampler == "ancestral" else 0.0


def _check_labelled(x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> None:
    """``x`` of shape (B, ...) and integer labels ``y`` of shape (B,), in range when on the CPU."""
    if not torch.is_tensor(x) or x.ndim < 2 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor of shape (B, ...); got {getattr(x, 'shape', type(x))}.")
    if not torch.is_tensor(y) or y.shape != x.shape[:1] or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(
            f"y must be integer labels of shape ({x.shape[0]},); got {getattr(y, 'dtype', type(y))} "
            f"of shape {tuple(getattr(y, 'shape', ()))}."
        )
    if num_classes is None or y.device.type != "cpu" or not y.numel():
        return  # values on an accelerator are not read back
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}; got {int(y.min())} to {int(y.max())}.")


# ------------------------------------------------------------------------------------------------
# A digits classifier
# ------------------------------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """An MLP for 8x8 digits, ``(B, 1, 8, 8) -> (B, 10)`` logits: ``64 -> hidden -> hidden -> 10``."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 10))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (1, 8, 8):
            raise ValueError(f"DigitClassifier expects digits of shape (B, 1, 8, 8); got {tuple(x.shape)}.")
        return self.net(x)


def digits_split(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's digits (:func:`dmlib.data.load_digits`) split at random into
    ``(x_train, y_train, x_test, y_test)``; ``seed`` fixes the split."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1); got {test_fraction!r}.")
    x, y = load_digits(with_labels=True)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(x))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def train_classifier(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
) -> DigitClassifier:
    """A :class:`DigitClassifier` fitted by Adam on the cross-entropy, in a plain loop (about a second);
    returned in eval mode. ``seed`` fixes the initialization and the minibatches."""
    _check_labelled(x, y, 10)
    steps, batch_size = _check_count("steps", steps), _check_count("batch_size", batch_size)
    with torch.random.fork_rng(devices=[]):  # the initialization, without touching the global stream
        torch.manual_seed(seed)
        model = DigitClassifier().to(device=x.device, dtype=x.dtype)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=_check_positive("lr", lr))
    for _ in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def accuracy(model: Callable, x: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of ``x`` that ``model`` (logits) labels ``y``."""
    _check_labelled(x, y)
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


# ------------------------------------------------------------------------------------------------
# Attacks: PGD with EOT
# ------------------------------------------------------------------------------------------------


def eot_gradient(model: Callable, x: torch.Tensor, y: torch.Tensor, draws: int = 1) -> torch.Tensor:
    """EOT (Athalye et al. 2018, sec. 4.2): ``grad_x E_T[L(model_T(x), y)] = E_T[grad_x L(model_T(x), y)]``,
    estimated by averaging the gradients of ``draws`` calls of a randomized ``model`` (one call is plain
    autograd for a deterministic one). ``L`` is the cross-entropy of each sample (summed over the batch, so
    every sample gets its own gradient). Returns a tensor of ``x``'s shape."""
    draws = _check_count("draws", draws)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = 0
        for _ in range(draws):
            logits = model(x)
            if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(
                    f"the model must return (B, C) logits for B = {x.shape[0]}; got {tuple(logits.shape)}."
                )
            _check_labelled(x, y, logits.shape[1])
            loss = loss + F.cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss / draws, x)
    return grad


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The nearest point of the ``norm`` ball of radius ``eps``: clamp (L_inf) or rescale (L_2)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    size = delta.flatten(1).norm(dim=1)
    return delta * _col((eps / size.clamp(min=1e-12)).clamp(max=1.0), delta)


def _ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest ascent direction of unit ``norm``: ``sgn(grad)`` (L_inf) or ``grad / ||grad||`` (L_2)."""
    if norm == "linf":
        return grad.sign()
    return grad / _col(grad.flatten(1).norm(dim=1).clamp(min=1e-12), grad)


def _random_start(x: torch.Tensor, eps: float, norm: str, generator) -> torch.Tensor:
    """A point uniform in the ball: uniform coordinates (L_inf), or a uniform direction at radius
    ``eps U^(1/d)`` (L_2)."""
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return eps * (2 * u - 1)
    d = x[0].numel()
    direction = _ascent_direction(noise_like(x, generator), "l2")
    radius = eps * torch.rand(x.shape[0], generator=generator, dtype=x.dtype, device=x.device) ** (1 / d)
    return direction * _col(radius, x)


def pgd(
    model: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 10,
    norm: str = "linf",
    step_size: float | None = None,
    random_start: bool = True,
    draws: int = 1,
    clip: tuple[float, float] | None = DATA_RANGE,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient ascent on the cross-entropy (Madry et al. 2018, sec. 2, the inner maximization
    of eq. 2.1): ``x' <- Pi_{B(x, eps)}(x' + step_size d)`` with ``d = sgn(g)`` for ``norm="linf"`` and
    ``g / ||g||_2`` for ``"l2"``, ``g`` the EOT gradient over ``draws`` calls (:func:`eot_gradient`), from a
    uniform point of the ball (``random_start``), ``steps`` times. ``clip`` keeps the image in the data
    range (None for none). ``step_size`` defaults to ``2.5 eps / steps``, enough to cross the ball (the rule
    of Madry et al.'s robustness library). Returns the adversarial ``x'`` (detached), ``||x' - x|| <= eps``.
    """
    _check_labelled(x, y)
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}.")
    eps, steps = _check_positive("eps", eps), _check_count("steps", steps)
    step_size = 2.5 * eps / steps if step_size is None else _check_positive("step_size", step_size)
    if clip is not None and not (len(clip) == 2 and clip[0] < clip[1]):
        raise ValueError(f"clip must be a range (lo, hi) with lo < hi, or None; got {clip!r}.")
    x = x.detach()
    delta = _random_start(x, eps, norm, generator) if random_start else torch.zeros_like(x)
    # clamping each coordinate toward x (inside the range) never leaves the ball, so the order is safe
    x_adv = x + delta if clip is None else (x + delta).clamp(*clip)
    for _ in range(steps):
        grad = eot_gradient(model, x_adv, y, draws)
        x_adv = x + _project(x_adv + step_size * _ascent_direction(grad, norm) - x, eps, norm)
        x_adv = x_adv if clip is None else x_adv.clamp(*clip)
    return x_adv.detach()


# ------------------------------------------------------------------------------------------------
# Purification (DiffPure)
# ------------------------------------------------------------------------------------------------


def purify(
    denoiser: Denoiser,
    x: torch.Tensor,
    t_star: float,
    *,
    steps: int = 10,
    sampler: str = "ancestral",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DiffPure (Nie et al. 2022, sec. 3.1): ``x_t* ~ q(x_t* | x) = N(alpha(t*) x, sigma(t*)^2 I)``, then the
    reverse process on ``steps`` equal steps from ``t*`` to 0: ancestral DDPM (``"ancestral"``: DDIM's
    eq. 12 with eta = 1, the step of Ho et al. 2020, Algorithm 2) or deterministic DDIM (``"ddim"``). The
    last step is the denoising step ``x = alpha(0) E[x_0 | x_t]`` of :func:`dmlib.ddpm.run_steps`.

    Differentiable end to end (no ``no_grad`` anywhere, unlike the samplers of :mod:`dmlib.samplers`), so
    an attack can backpropagate through it. The same call is AnoDDPM's partial diffusion and
    reconstruction (:func:`anomaly_score`).
    """
    t_star, steps, eta = _check_time(t_star), _check_count("steps", steps), _check_reverse(sampler)
    x_t = q_sample(denoiser.schedule, x, t_star, noise_like(x, generator))
    ts = time_grid(denoiser.schedule, steps, "uniform", t_max=t_star)

    def step(i, x):
        return ddim_step(denoiser, x, ts[i], ts[i + 1], eta=eta, generator=generator)

    return run_steps(step, denoiser, x_t, ts, "purification")


def purify_exact(
    mixture: GaussianMixture, schedule: Schedule, x: torch.Tensor, t_star: float, generator=None
) -> torch.Tensor:
    """Exact samples of the purifier's output law on a Gaussian mixture,
    ``int p(x_0 | x_t*) q(x_t* | x) dx_t*``: ``x_t* ~ q(x_t* | x)``, then ``x_0 ~ p(x_0 | x_t*)``, the
    mixture posterior of :func:`dmlib.connections.reverse_kernel` with ``s = 0``. ``x`` of shape (B, D)."""
    t_star = _check_time(t_star)
    x_t = q_sample(schedule, x, t_star, noise_like(x, generator))
    return reverse_kernel(mixture, schedule, x_t, t_star, 0.0).sample(generator)


def purified(
    classifier: Callable,
    denoiser: Denoiser,
    t_star: float,
    *,
    steps: int = 10,
    sampler: str = "ancestral",
    generator: torch.Generator | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The defended (randomized) model ``x -> classifier(purify(x))``: what an adaptive attack differentiates."""
    _check_time(t_star)  # checked now, not at the first call
    _check_count("steps", steps)
    _check_reverse(sampler)

    def defended(x: torch.Tensor) -> torch.Tensor:
        return classifier(purify(denoiser, x, t_star, steps=steps, sampler=sampler, generator=generator))

    return defended


def robustness_report(
    classifier: Callable,
    denoiser: Denoiser,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    t_star: float,
    eps: float,
    norm: str = "linf",
    attack_steps: int = 10,
    purify_steps: int = 5,
    sampler: str = "ancestral",
    draws: int = 4,
    clip: tuple[float, float] | None = DATA_RANGE,
    generator: torch.Generator | None = None,
) -> dict:
    """Clean and robust accuracy of ``classifier`` with and without purification to ``t_star``
    (Nie et al. 2022, sec. 4's evaluation), under PGD of radius ``eps`` (:func:`pgd`):

    ``clean``, ``clean_purified``: no attack; ``undefended``: PGD on the classifier, no defence;
    ``non_adaptive``: the same adversarial inputs, then purified (the attacker ignores the defence);
    ``adaptive``: PGD through ``classifier(purify(.))`` with EOT over ``draws`` purifications.

    The defended accuracies average ``draws`` evaluations of the randomized defence. ``non_adaptive``
    overstates robustness (module docstring); ``adaptive`` is the number to report.
    """
    _check_labelled(x, y)
    defended = purified(
        classifier, denoiser, t_star, steps=purify_steps, sampler=sampler, generator=generator
    )
    attack = dict(eps=eps, steps=attack_steps, norm=norm, clip=clip, generator=generator)
    x_fixed = pgd(classifier, x, y, **attack)
    x_adaptive = pgd(defended, x, y, draws=draws, **attack)

    def defended_accuracy(z):
        return sum(accuracy(defended, z, y) for _ in range(draws)) / draws

    return {
        "clean": accuracy(classifier, x, y),
        "clean_purified": defended_accuracy(x),
        "undefended": accuracy(classifier, x_fixed, y),
        "non_adaptive": defended_accuracy(x_fixed),
        "adaptive": defended_accuracy(x_adaptive),
    }


# ------------------------------------------------------------------------------------------------
# Anomaly detection (AnoDDPM)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def anomaly_score(
    denoiser: Denoiser,
    x: torch.Tensor,
    t: float,
    *,
    steps: int = 10,
    sampler: str = "ancestral",
    draws: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """AnoDDPM's score (Wyatt et al. 2022): partial diffusion to ``t`` and reconstruction
    (:func:`purify`), scored by the squared error ``||x - x_hat||^2`` per sample, averaged over ``draws``
    reconstructions. Shape (B,); larger means more anomalous."""
    draws = _check_count("draws", draws)
    total = 0
    for _ in range(draws):
        x_hat = purify(denoiser, x, t, steps=steps, sampler=sampler, generator=generator)
        total = total + (x - x_hat).flatten(1).pow(2).sum(1)
    return total / draws


def auroc(scores_normal: torch.Tensor, scores_anomalous: torch.Tensor) -> float:
    """The area under the ROC curve of a score (larger: anomalous), ``P(S_a > S_n) + P(S_a = S_n) / 2``,
    which is the Mann-Whitney statistic ``U / (n_a n_n)`` (Hanley & McNeil 1982; Mann & Whitney 1947):
    for each anomalous score, the normal scores below it count 1 and the ties 1/2 (two binary searches)."""
    for name, s in (("scores_normal", scores_normal), ("scores_anomalous", scores_anomalous)):
        if not torch.is_tensor(s) or s.ndim != 1 or s.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D tensor; got {getattr(s, 'shape', type(s))}.")
        if s.device.type == "cpu" and not torch.isfinite(s).all():
            raise ValueError(f"{name} has NaN or infinite entries; an AUROC needs finite scores.")
    normal = torch.sort(scores_normal.double()).values
    anomalous = scores_anomalous.double().to(normal.device)
    below = torch.searchsorted(normal, anomalous, side="left")
    at_most = torch.searchsorted(normal, anomalous, side="right")
    return ((below + at_most).double().sum() / (2 * normal.numel() * anomalous.numel())).item()


def box_anomalies(mixture: GaussianMixture, n: int, *, n_std: float = 4.0, generator=None) -> torch.Tensor:
    """``n`` points uniform on the box that holds every component's mean within ``n_std`` of its standard
    deviation, shape (n, D), float64. Against them the most powerful test at every level thresholds the
    likelihood ratio ``U(x) / p(x)`` (Neyman-Pearson), which is monotone in ``-log p(x)`` on the box: so
    ``-log p`` has the largest AUROC of any score, the ceiling for a reconstruction score (up to the
    normal mass outside the box, about 1e-4 per dimension at ``n_std = 4``)."""
    n, n_std = _check_count("n", n), _check_positive("n_std", n_std)
    std = torch.diagonal(mixture.covs, dim1=1, dim2=2).sqrt()
    lo, hi = (mixture.means - n_std * std).min(0).values, (mixture.means + n_std * std).max(0).values
    u = torch.rand(n, mixture.dim, generator=generator, dtype=lo.dtype, device=lo.device)
    return lo + (hi - lo) * u


def one_class_split(held_out: int, *, test_fraction: float = 0.25, seed: int = 0):
    """Digits for one-class detection: ``(train, test_normal, anomalous)``, the training split without the
    digit ``held_out``, the test split without it, and every ``held_out`` digit (never seen in training)."""
    if isinstance(held_out, bool) or not isinstance(held_out, numbers.Integral) or not 0 <= held_out <= 9:
        raise ValueError(f"held_out must be a digit 0..9; got {held_out!r}.")
    x_train, y_train, x_test, y_test = digits_split(test_fraction, seed)
    anomalous = torch.cat([x_train[y_train == held_out], x_test[y_test == held_out]])
    return x_train[y_train != held_out], x_test[y_test != held_out], anomalous


def one_class_digits(
    held_out: int,
    *,
    train_steps: int,
    t: float = 0.3,
    steps: int = 10,
    draws: int = 1,
    base: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Train a digits DDPM (:class:`dmlib.nets.UNet`, cosine schedule, ``L_simple``) without the digit
    ``held_out`` (:func:`one_class_split`) for ``train_steps`` steps, then score the held-out test digits
    and every ``held_out`` digit with :func:`anomaly_score` at ``t``. Returns ``auroc``, the two score
    tensors and the trained ``denoiser``; the chapter sets the budget."""
    train_x, normal, anomalous = one_class_split(held_out, seed=seed)
    schedule = get_schedule("cosine")
    config = TrainConfig(
        steps=_check_count("train_steps", train_steps), batch_size=128, seed=seed, progress=progress
    )
    with torch.random.fork_rng(devices=[]):  # the initialization, without touching the global stream
        torch.manual_seed(seed)
        net = UNet(in_channels=1, base=base, channel_mults=(1, 2, 2))
    result = train(net, train_x, simple_loss(schedule), config)
    denoiser = Denoiser(result.ema.eval(), schedule, "eps", clip_x0=DATA_RANGE)
    device = next(result.ema.parameters()).device  # the trainer's: CUDA when there is one
    normal, anomalous = normal.to(device), anomalous.to(device)
    generator = torch.Generator(device).manual_seed(seed)
    score = dict(steps=steps, draws=draws, generator=generator)
    s_normal, s_anomalous = (
        anomaly_score(denoiser, normal, t, **score),
        anomaly_score(denoiser, anomalous, t, **score),
    )
    return {"auroc": auroc(s_normal, s_anomalous), "scores_normal": s_normal, "scores_anomalous": s_anomalous,
            "denoiser": denoiser}  # fmt: skip


__all__ = [
    "DigitClassifier",
    "digits_split",
    "train_classifier",
    "accuracy",
    "eot_gradient",
    "pgd",
    "purify",
    "purify_exact",
    "purified",
    "robustness_report",
    "anomaly_score",
    "auroc",
    "box_anomalies",
    "one_class_split",
    "one_class_digits",
]
