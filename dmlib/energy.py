"""Energy-based views of diffusion: an energy-parameterized denoiser, MCMC at a fixed noise level, and
composition of models as a product of experts.

A diffusion model learns the scores ``s_t = grad log q_t`` of a family of densities. Writing
``q_t(x) ∝ exp(-E(x, t))`` with a scalar network ``E`` (Salimans & Ho 2021, "Should EBMs model the
energy or the score?"; Du et al. 2023, sec. 4) gives the score as ``-grad_x E`` and, what a score alone
cannot give, energy differences: ``E(y, t) - E(x, t) = log q_t(x) - log q_t(y)``. With them a move can be
Metropolis-corrected, so that MCMC at a fixed ``t`` leaves ``q_t`` exactly invariant:

* unadjusted Langevin (ULA), ``x' = x + h s(x) + sqrt(2 h) z``: the score only, biased for any ``h > 0``;
* MALA (Roberts & Tweedie 1996; Besag 1994): the same proposal, with a Metropolis-Hastings test, accepted w.p.
  ``min(1, exp(E(x) - E(x')) q(x | x') / q(x' | x))``, ``q(y | x) = N(y; x + h s(x), 2 h I)``;
* HMC (Duane et al. 1987; Neal 2011, "MCMC using Hamiltonian dynamics", sec. 5.2-5.3): ``L`` leapfrog
  steps of size ``eps`` on ``H(x, p) = E(x) + |p|^2 / 2``, accepted w.p. ``min(1, exp(H - H'))``. One
  leapfrog step of size ``eps`` *is* MALA with ``h = eps^2 / 2`` (a test checks it to rounding).

Composition (Du et al. 2023, sec. 3): a product of experts ``p(x) ∝ p1(x) p2(x)`` has energy
``E1 + E2`` and score ``s1 + s2``. Summing the two models' scores at every ``t`` does *not* sample it: the
summed score is that of ``q1_t q2_t``, the product of the diffused densities, while a sampler needs the
diffused product ``(p1 p2)_t``; they agree only at ``t = 0``. (Two Gaussians ``N(0, 1)`` show it: at the
noise end ``q1_1 q2_1 ∝ N(0, 1/2)`` but ``(p1 p2)_1 = N(0, 1)``.) Read as a path of densities that ends at
``p1 p2``, though, the ``q1_t q2_t`` are a fine annealing sequence, and MCMC steps that target each of them
(:func:`sample_mcmc`) correct most of the error; Metropolis-corrected ones need the energies. With
:class:`~dmlib.oracle.GaussianMixture` everything is exact: the product of two mixtures is a mixture
(:func:`product_of_mixtures`), so the error of each sampler is measurable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from .ddpm import check_timesteps, run_steps
from .nets.mlp import MLP
from .oracle import GaussianMixture, MixtureOracle
from .parameterization import Denoiser, _col, noise_like
from .samplers import ddim_step
from .schedules import Schedule, as_time

MCMC_KINDS = ("langevin", "mala", "hmc")


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _check_batch(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    if not torch.is_tensor(x) or not torch.is_floating_point(x) or x.ndim < 2:
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(
            f"{name} must be a floating-point batch of shape (B, ...) with B samples; got {got}."
        )
    return x


def _check_step(step_size, name: str = "step_size") -> float:
    """Step sizes are Python numbers (read once, on the host): positive and finite."""
    if torch.is_tensor(step_size) and step_size.ndim == 0 and step_size.device.type == "cpu":
        step_size = step_size.item()
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
        raise TypeError(f"{name} must be a positive number; got {type(step_size).__name__}.")
    if not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"{name} must be a positive finite number; got {step_size}.")
    return float(step_size)


def _check_count(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {n!r}.")
    return n


def _energy_of(energy: Callable, x: torch.Tensor) -> torch.Tensor:
    """``energy(x)``, checked to give one number per sample."""
    E = energy(x)
    if not torch.is_tensor(E) or E.shape != x.shape[:1]:
        got = tuple(E.shape) if torch.is_tensor(E) else type(E).__name__
        raise ValueError(f"an energy must return one number per sample, shape ({x.shape[0]},); got {got}.")
    return E


def _sq(v: torch.Tensor) -> torch.Tensor:
    """``|v|^2`` per sample, over every non-batch dim."""
    return (v**2).flatten(1).sum(1)


# ---------------------------------------------------------------------------------------------
# Energy parameterization (Salimans & Ho 2021; Du et al. 2023, sec. 4)
# ---------------------------------------------------------------------------------------------


def energy_score(energy: Callable, x: torch.Tensor, *args, create_graph: bool | None = None) -> torch.Tensor:
    """The score ``-grad_x E(x, *args)`` of an energy ``E -> (B,)``, by autograd (samplers run under
    ``torch.no_grad``, so the gradient is taken under ``enable_grad``). ``create_graph`` (default: whether
    gradients are enabled at the call, i.e. during training) keeps the graph so that a loss on the score
    reaches the energy's parameters (double backpropagation)."""
    _check_batch(x)
    create_graph = torch.is_grad_enabled() if create_graph is None else create_graph
    with torch.enable_grad():
        x_in = x if create_graph and x.requires_grad else x.detach().requires_grad_(True)
        E = _energy_of(lambda y: energy(y, *args), x_in)
        (grad,) = torch.autograd.grad(E.sum(), x_in, create_graph=create_graph)
    return -grad if create_graph else -grad.detach()


class EnergyMLP(nn.Module):
    """A scalar network ``F_theta(x, t) = |x - f_theta(x, t)|^2 / 2 -> (B,)`` with ``f`` a
    :class:`~dmlib.nets.MLP`: the squared-residual form of Du et al. (2023, sec. 4; their code's
    ``neg_logp_unnorm``), which makes ``grad_x F = x`` where ``f = 0``: the right noise prediction for
    ``q_1 = N(0, I)``, a good start. ``F`` is the noise level times the energy, ``F = sigma(t) E(x, t)``,
    so that its gradient is the eps-prediction ``sigma grad E = -sigma s_t`` and stays O(1) at every
    ``t``; :class:`EnergyEps` makes it a model for :class:`~dmlib.parameterization.Denoiser`."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 32):
        super().__init__()
        self.dim = dim
        self.f = MLP(dim, hidden, depth, time_dim)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        return 0.5 * _sq(x - self.f(x, t))


class EnergyEps(nn.Module):
    """An energy network as an eps-prediction model: ``eps(x, t) = grad_x F(x, t)`` with ``F = sigma(t)
    E(x, t)`` (:class:`EnergyMLP`), so ``score = -eps / sigma = -grad_x E``. Train it with any loss of the
    book (``train(EnergyEps(EnergyMLP(), sched), data, dmlib.ddpm.simple_loss(sched), cfg)``: the graph of
    the gradient is kept while gradients are enabled), sample it with ``Denoiser(model, sched)``, and use
    :meth:`energy` (or :meth:`denoiser`) for Metropolis-corrected MCMC."""

    def __init__(self, net: nn.Module, schedule: Schedule):
        super().__init__()
        self.net, self.schedule = net, schedule

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = as_time(t, like=x)
        return -energy_score(self.net, x, t)  # grad_x F = sigma grad_x E = eps

    def energy(self, x: torch.Tensor, t) -> torch.Tensor:
        """``E(x, t) = F(x, t) / sigma(t)``, up to a constant in ``x``: ``-log q_t(x) + c(t)``."""
        t = as_time(t, like=x)
        return self.net(x, t) / self.schedule.sigma(t).to(x.dtype)

    def denoiser(self) -> EnergyDenoiser:
        """This model as an :class:`EnergyDenoiser` (a Denoiser that also answers energies)."""
        return EnergyDenoiser(self.energy, self.schedule, eps=self)


class EnergyDenoiser(Denoiser):
    """A :class:`~dmlib.parameterization.Denoiser` that also knows its energy ``E(x, t) = -log q_t(x) +
    c(t)`` (shape (B,)): ``score = -grad_x E`` (or the exact ``score(x, t)`` if given), ``eps = -sigma
    score``. Every sampler of the library runs on it; :func:`sample_mcmc`'s MALA and HMC also need the energy.

    ``energy(x, t)``, ``score(x, t)`` and ``eps(x, t)`` see ``t`` as the Denoiser passes it (a scalar or
    (B,) tensor)."""

    def __init__(self, energy: Callable, schedule: Schedule, score: Callable | None = None, eps=None):
        self._energy, self._score, self._eps = energy, score, eps
        super().__init__(self._eps_prediction, schedule, prediction="eps")

    @classmethod
    def from_oracle(cls, oracle: MixtureOracle) -> EnergyDenoiser:
        """The exact energy ``-log q_t`` and score of a :class:`~dmlib.oracle.MixtureOracle`."""
        return cls(lambda x, t: -oracle.log_prob(x, t), oracle.schedule, score=oracle.score)

    def energy(self, x: torch.Tensor, t) -> torch.Tensor:
        t = as_time(t, like=x)
        return _energy_of(lambda y: self._energy(y, t), _check_batch(x))

    def score(self, x: torch.Tensor, t) -> torch.Tensor:
        """``-grad_x E(x, t)``: exact if a score was given, else by autograd."""
        t = as_time(t, like=x)
        if self._score is not None:
            return self._score(x, t)
        return energy_score(self._energy, x, t)

    def _eps_prediction(self, x, t):
        if self._eps is not None:
            return self._eps(x, t)
        return -_col(self.schedule.sigma(as_time(t, like=x)), x) * self.score(x, t)


# ---------------------------------------------------------------------------------------------
# MCMC at a fixed noise level
# ---------------------------------------------------------------------------------------------


class MCMCStep(NamedTuple):
    """The new state and, per sample, the acceptance probability ``min(1, r)`` of its proposal (its mean is
    the acceptance rate; the probability has less variance than the 0/1 outcome)."""

    x: torch.Tensor
    accept: torch.Tensor


def _score_fn(energy: Callable, score: Callable | None) -> Callable:
    return score if score is not None else (lambda y: energy_score(energy, y))


def _metropolis(x, proposal, log_ratio, generator) -> MCMCStep:
    """Accept ``proposal`` w.p. ``min(1, exp(log_ratio))`` per sample, without reading a value (a NaN
    ratio, e.g. from an infinite energy, rejects)."""
    log_ratio = torch.nan_to_num(log_ratio, nan=-math.inf)
    u = torch.rand(log_ratio.shape, generator=generator, dtype=log_ratio.dtype, device=log_ratio.device)
    take = torch.log(u) < log_ratio
    x_new = torch.where(take.reshape(take.shape + (1,) * (x.ndim - 1)), proposal, x)
    return MCMCStep(x_new, torch.exp(log_ratio.clamp(max=0.0)))


@torch.no_grad()
def langevin_step(score: Callable, x: torch.Tensor, step_size: float, generator=None) -> torch.Tensor:
    """Unadjusted Langevin: ``x' = x + h s(x) + sqrt(2 h) z`` (the Euler-Maruyama step of
    ``dx = s(x) dt + sqrt(2) dW``, whose invariant law is ``exp(-E)``; Roberts & Tweedie 1996).
    Only the score is needed; the chain's own invariant law is off by O(h)."""
    h = _check_step(step_size)
    x = _check_batch(x)
    return x + h * score(x) + math.sqrt(2 * h) * noise_like(x, generator)


@torch.no_grad()
def mala_step(
    energy: Callable, x: torch.Tensor, step_size: float, *, score: Callable | None = None, generator=None
) -> MCMCStep:
    """One MALA step (Roberts & Tweedie 1996): propose ``y = x + h s(x) + sqrt(2 h) z`` and
    accept w.p. ``min(1, r)``, ``log r = E(x) - E(y) + log q(x | y) - log q(y | x)`` with
    ``log q(y | x) = -|y - x - h s(x)|^2 / (4 h)``, which leaves ``exp(-E)`` invariant for any ``h``.
    ``energy(x) -> (B,)`` at a fixed time; ``score`` defaults to ``-grad E`` by autograd."""
    h = _check_step(step_size)
    x = _check_batch(x)
    s = _score_fn(energy, score)
    z = noise_like(x, generator)
    g_x = s(x)
    y = x + h * g_x + math.sqrt(2 * h) * z
    g_y = s(y)
    log_q_forward = -_sq(z) / 2  # |y - x - h s(x)|^2 / (4h) with y - x - h s(x) = sqrt(2h) z
    log_q_backward = -_sq(x - y - h * g_y) / (4 * h)
    log_ratio = _energy_of(energy, x) - _energy_of(energy, y) + log_q_backward - log_q_forward
    return _metropolis(x, y, log_ratio, generator)


@torch.no_grad()
def hmc_step(
    energy: Callable,
    x: torch.Tensor,
    step_size: float,
    n_leapfrog: int = 5,
    *,
    score: Callable | None = None,
    generator=None,
) -> MCMCStep:
    """One HMC step (Neal 2011, sec. 5.2-5.3: the leapfrog method and the algorithm), unit mass: draw ``p ~
    N(0, I)``, run ``n_leapfrog`` leapfrog steps ``p += eps/2 s(x); x += eps p; p += eps/2 s(x)`` on
    ``H = E(x) + |p|^2 / 2``, and accept the end point w.p. ``min(1, exp(H(x, p) - H(x', p')))``.
    The leapfrog map is volume-preserving and reversible, so this leaves ``exp(-E)`` invariant for any
    step size; its error in ``H`` only lowers the acceptance rate."""
    eps = _check_step(step_size)
    n_leapfrog = _check_count(n_leapfrog, "n_leapfrog")
    x = _check_batch(x)
    s = _score_fn(energy, score)
    p0 = noise_like(x, generator)
    y, p = x, p0 + eps / 2 * s(x)
    for k in range(n_leapfrog):
        y = y + eps * p
        p = p + (eps if k < n_leapfrog - 1 else eps / 2) * s(y)  # full kicks inside, a half kick at the end
    log_ratio = _energy_of(energy, x) + _sq(p0) / 2 - _energy_of(energy, y) - _sq(p) / 2
    return _metropolis(x, y, log_ratio, generator)


def _energy_at(model, t) -> Callable | None:
    """``x -> E(x, t)`` of a model that has an energy (an :class:`EnergyDenoiser`, or a Denoiser whose
    network has ``energy``), else None."""
    energy = getattr(model, "energy", None) or getattr(getattr(model, "model", None), "energy", None)
    return None if energy is None else (lambda x: energy(x, t))


def mcmc_step(
    model, x: torch.Tensor, t, kind: str, step_size: float, *, n_leapfrog: int = 3, generator=None
) -> MCMCStep:
    """One MCMC step of ``kind`` (:data:`MCMC_KINDS`) targeting ``q_t`` of ``model`` (a Denoiser; MALA and
    HMC need its energy). ULA's acceptance is 1 by definition."""
    if kind not in MCMC_KINDS:
        raise ValueError(f"unknown MCMC kind {kind!r}; choose one of {', '.join(MCMC_KINDS)}.")
    t = as_time(t, like=x)
    score = lambda y: model.score(y, t)  # noqa: E731
    if kind == "langevin":
        return MCMCStep(langevin_step(score, x, step_size, generator), x.new_ones(x.shape[0]))
    energy = _energy_at(model, t)
    if energy is None:
        raise TypeError(
            f"{kind!r} needs the model's energy for its accept/reject test; give an EnergyDenoiser "
            "(EnergyDenoiser.from_oracle, EnergyEps.denoiser, product_of_experts) or use kind='langevin'."
        )
    if kind == "mala":
        return mala_step(energy, x, step_size, score=score, generator=generator)
    return hmc_step(energy, x, step_size, n_leapfrog, score=score, generator=generator)


@torch.no_grad()
def sample_mcmc(
    model,
    x_T,
    timesteps,
    *,
    mcmc: str = "mala",
    n_mcmc: int = 2,
    step_scale: float = 0.1,
    n_leapfrog: int = 3,
    eta: float = 1.0,
    generator=None,
    progress=False,
    callback=None,
    accept_rates: list | None = None,
) -> torch.Tensor:
    """Annealed MCMC in the reverse process (Du et al. 2023, sec. 4; the predictor-corrector pattern of
    Song et al. 2021, sec. 4.2): a DDIM step (``eta = 1``: ancestral; ``eta = 0``: deterministic) from
    ``t_i`` to ``t_{i+1}``, then ``n_mcmc`` MCMC steps of kind ``mcmc`` (:data:`MCMC_KINDS`) targeting
    ``q_{t_{i+1}}``. Step sizes follow the noise level: Langevin and MALA use ``h = step_scale
    sigma^2``, HMC the leapfrog step ``eps = sqrt(2 h)`` (so one leapfrog step is MALA with the same
    ``h``). No MCMC runs where ``sigma = 0`` (the data end, reached by the denoising step). If a list
    ``accept_rates`` is given, the mean acceptance probability of every MCMC step is appended to it (as
    a tensor on the samples' device: nothing is read back). The sampler signature of
    :mod:`dmlib.samplers`."""
    if mcmc not in MCMC_KINDS:
        raise ValueError(f"unknown MCMC kind {mcmc!r}; choose one of {', '.join(MCMC_KINDS)}.")
    n_mcmc, n_leapfrog = _check_count(n_mcmc, "n_mcmc"), _check_count(n_leapfrog, "n_leapfrog")
    _check_step(step_scale, "step_scale")
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: ancestral); got {eta}.")
    ts = check_timesteps(timesteps)
    sigmas = model.schedule.sigma(ts.to(torch.float64)).tolist()  # the grid lives on the host

    def step(i, x):
        x = ddim_step(model, x, ts[i], ts[i + 1], eta=eta, generator=generator)
        if sigmas[i + 1] > 0:
            h = step_scale * sigmas[i + 1] ** 2
            size = math.sqrt(2 * h) if mcmc == "hmc" else h
            t = ts[i + 1].to(x.dtype)
            for _ in range(n_mcmc):
                x, accept = mcmc_step(model, x, t, mcmc, size, n_leapfrog=n_leapfrog, generator=generator)
                if accept_rates is not None:
                    accept_rates.append(accept.mean())
        return x

    return run_steps(step, model, x_T, ts, f"reverse steps + {n_mcmc} {mcmc} steps", progress, callback)


# ---------------------------------------------------------------------------------------------
# Composition and its exact answers
# ---------------------------------------------------------------------------------------------


def product_of_experts(*models, weights=None) -> EnergyDenoiser:
    """``p(x) ∝ prod_k p_k(x)^{w_k}`` as a model (Hinton 2002; Du et al. 2023, sec. 3): energy ``sum_k w_k
    E_k(x, t)``, score ``sum_k w_k s_k(x, t)`` at every ``t`` (weights default to 1). As the module
    docstring says, this is the score of ``prod_k q_{k,t}``, not of the diffused product, except at ``t
    = 0``. Models without an energy still compose for ULA and the plain samplers (then :meth:`energy`
    raises). All must share one schedule (checked by value on a few times)."""
    if len(models) < 2:
        raise ValueError(f"a product of experts needs at least two models; got {len(models)}.")
    weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models):
        raise ValueError(f"give one weight per model: {len(models)} models, {len(weights)} weights.")
    schedule = models[0].schedule
    probe = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    for m in models[1:]:
        same = all(
            torch.allclose(getattr(m.schedule, c)(probe), getattr(schedule, c)(probe))
            for c in ("alpha", "sigma")
        )
        if not same:
            raise ValueError("the models of a product must share one schedule (alpha, sigma differ).")

    def energy(x, t):
        total = 0
        for w, m in zip(weights, models, strict=True):
            e = _energy_at(m, t)
            if e is None:
                raise TypeError(f"{type(m).__name__} has no energy; wrap it as an EnergyDenoiser.")
            total = total + w * e(x)
        return total

    def score(x, t):
        return sum(w * m.score(x, t) for w, m in zip(weights, models, strict=True))

    return EnergyDenoiser(energy, schedule, score=score)


def diffused_mixture(mixture: GaussianMixture, schedule: Schedule, t) -> GaussianMixture:
    """``q_t`` of a mixture as a mixture (the oracle's closed form): means ``alpha mu_k``, covariances
    ``alpha^2 S_k + sigma^2 I``, the same weights; ``t`` a number in [0, 1]. For exact ``q_t`` samples."""
    t = as_time(t).to(torch.float64)
    if t.ndim != 0:
        raise ValueError(f"t must be one time (a number); got shape {tuple(t.shape)}.")
    mu, S, w = mixture.means, mixture.covs, mixture.weights
    a, s = (c.to(device=mu.device, dtype=mu.dtype) for c in (schedule.alpha(t), schedule.sigma(t)))
    eye = torch.eye(mixture.dim, dtype=mu.dtype, device=mu.device)
    return GaussianMixture._unchecked(a * mu, a**2 * S + s**2 * eye, w)


def product_of_mixtures(a: GaussianMixture, b: GaussianMixture) -> GaussianMixture:
    """The normalized product ``a(x) b(x) / Z`` of two Gaussian mixtures: a mixture of ``K_a K_b``
    components (Petersen & Pedersen, "The Matrix Cookbook", sec. 8.1.8; Bishop 2006, eq. 2.115-2.116):
    ``N(x; m1, S1) N(x; m2, S2) = N(m1; m2, S1 + S2) N(x; m, C)`` with ``C = (S1^-1 + S2^-1)^-1`` and
    ``m = C (S1^-1 m1 + S2^-1 m2)``, so component ``(i, j)`` has weight ``∝ w_i v_j N(m_i; m_j, S_i +
    S_j)``; ``Z = sum_ij w_i v_j N(m_i; m_j, S_i + S_j)``. Computed in ``a``'s dtype and device."""
    if a.dim != b.dim:
        raise ValueError(f"the mixtures must live in one space; got dimensions {a.dim} and {b.dim}.")
    dt, dev = a.means.dtype, a.means.device
    m2, S2, w2 = (v.to(device=dev, dtype=dt) for v in (b.means, b.covs, b.weights))
    P1, P2 = torch.linalg.inv(a.covs), torch.linalg.inv(S2)  # precisions
    C = torch.linalg.inv(P1[:, None] + P2[None])  # (Ka, Kb, D, D)
    rhs = torch.einsum("kij,kj->ki", P1, a.means)[:, None] + torch.einsum("kij,kj->ki", P2, m2)[None]
    means = torch.einsum("abij,abj->abi", C, rhs)
    log_n = _gauss_log_pdf(a.means[:, None], m2[None], a.covs[:, None] + S2[None])  # (Ka, Kb)
    log_w = torch.log(a.weights)[:, None] + torch.log(w2)[None] + log_n
    weights = torch.softmax(log_w.flatten(), 0)
    D = a.dim
    return GaussianMixture._unchecked(means.reshape(-1, D), C.reshape(-1, D, D), weights)


def _gauss_log_pdf(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``log N(x; mean, cov)`` over broadcast batch dims (x, mean (..., D), cov (..., D, D))."""
    diff = x - mean
    sol = torch.linalg.solve(cov, diff.unsqueeze(-1)).squeeze(-1)
    logdet = torch.linalg.slogdet(cov).logabsdet
    return -0.5 * ((diff * sol).sum(-1) + logdet + x.shape[-1] * math.log(2 * math.pi))
