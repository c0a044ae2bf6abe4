"""Diffusion on discrete states: D3PM, continuous-time Markov chains, masked diffusion, score entropy.

Conventions, shared by every function here (and by the modules that use them):

* states are integer tokens ``0..K-1``; a sequence is a LongTensor ``(B, D)``. A process with a mask
  (absorbing state) has ``n = K + 1`` states, the mask being the extra index ``K``;
* time is continuous, ``t in [0, 1]``, ``t = 0`` the data; step ``i`` of a ``T``-step chain is ``t = i / T``;
* a denoiser is a callable ``model(x_t, t) -> logits`` of shape ``(B, D, K)`` over the clean token
  ``x_0`` (never over the mask), with ``x_t`` a ``(B, D)`` LongTensor in ``0..K`` and ``t`` of shape ``(B,)``,
  given in torch's default dtype (float32 unless changed; the rest of the arithmetic is float64).

Every process corrupts the ``D`` coordinates independently with the same per-token kernel, written as a
row-stochastic matrix: ``q(x_t | x_s) = Cat(x_s Q)`` (row ``x_s``). Kernels and rates are built on the
device, and in the dtype, of the tensors they meet. :class:`DiscreteOracle` enumerates a distribution
over all ``K^D`` sequences and answers exactly (float64) what a perfectly trained network would.

Papers: Austin et al. 2021 (D3PM), Hoogeboom et al. 2021 (multinomial diffusion), Campbell et al. 2022
(continuous time, tau-leaping), Sahoo et al. 2024 (MDLM), Shi et al. 2024 (MD4), Lou et al. 2024 (SEDD);
Hoogeboom et al. 2022 (ARDM: order-agnostic autoregression is absorbing diffusion).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import torch

from .schedules import as_time

KINDS = ("uniform", "absorbing", "gaussian", "nearest")


# ---------------------------------------------------------------------------------------------
# Checks and small helpers
# ---------------------------------------------------------------------------------------------


def check_tokens(x: torch.Tensor, n: int, name: str = "x") -> torch.Tensor:
    """``x`` must be an integer tensor of tokens in ``0..n-1`` (values checked on the CPU only, as
    :func:`dmlib.schedules.as_time` does: reading them from an accelerator would stall it)."""
    if not torch.is_tensor(x) or x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(
            f"{name} must be an integer (Long) tensor of tokens; got {getattr(x, 'dtype', type(x))}."
        )
    if x.device.type == "cpu" and x.numel() and (x.min() < 0 or x.max() >= n):
        raise ValueError(
            f"{name} must hold tokens in 0..{n - 1} (K = {n} states here; a mask, if any, is the extra "
            f"index K); got values from {int(x.min())} to {int(x.max())}."
        )
    return x.long()


def check_mask_id(mask_id: int, K: int) -> int:
    """The mask is the extra index ``K`` (so masked processes have ``K + 1`` states); refuse any other."""
    if mask_id != K:
        where = "inside the vocabulary 0..K-1" if 0 <= mask_id < K else "not K"
        raise ValueError(f"mask id {mask_id} is {where}; the mask must be the extra state K = {K}.")
    return mask_id


def check_transition_matrix(Q: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
    """A (batch of) square row-stochastic matrices: entries >= 0, rows summing to 1 (checked on the CPU)."""
    if Q.ndim < 2 or Q.shape[-1] != Q.shape[-2]:
        raise ValueError(f"a transition matrix must be square (..., n, n); got shape {tuple(Q.shape)}.")
    if Q.device.type == "cpu":
        if (Q < 0).any():
            raise ValueError(
                f"transition matrix has negative entries (min {Q.min().item():g}); use probabilities."
            )
        err = (Q.sum(-1) - 1).abs().max().item()
        if err > atol:
            raise ValueError(
                f"transition matrix rows must sum to 1 (q(x_t|x_s) = Cat(x_s Q)); off by {err:g}."
            )
    return Q


def _times(t, x: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """``t`` (a number, 0-dim or (B,) tensor, checked in [0, 1]) as a ``(B,)`` tensor on ``x``'s device."""
    t = as_time(t if torch.is_tensor(t) else torch.tensor(float(t), dtype=torch.float64))
    t = t.to(device=x.device, dtype=dtype)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def _rows(M: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``M[idx]`` for ``M`` of shape (n, n) or per-sample (B, n, n) and ``idx`` (B, D): shape (B, D, n)."""
    if M.ndim == 2:
        return M[idx]
    return torch.gather(M, 1, idx.unsqueeze(-1).expand(-1, -1, M.shape[-1]))


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` with ``0 / 0 = 0`` (an impossible state given ``x_0`` carries no weight)."""
    return a / torch.where(b > 0, b, torch.ones_like(b))


def categorical_kl(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``KL(q || p) = sum_j q_j (log q_j - log p_j)`` over the last dim, with ``0 log 0 = 0``."""
    return (torch.xlogy(q, q) - torch.xlogy(q, p)).sum(-1)


def sample_categorical(
    probs: torch.Tensor, generator: torch.Generator | None = None, sample_shape: tuple = ()
) -> torch.Tensor:
    """Draws from each categorical ``probs[..., :]`` (unnormalized is fine), by inverse CDF in float64,
    shape ``sample_shape + probs.shape[:-1]`` (the CDF is built once, however many draws).

    Why not Gumbel-max in float32: ``argmax(log p + g)`` with ``g = -log(-log u)`` from float32 ``u``
    can never exceed ``-log(-log(1 - 2^-24)) = 16.6`` (the largest float32 below 1), nor fall below
    about -2.8, so a category whose log-odds against the mode are below about -19 is never drawn, and
    categories with p ~ 1e-7 are drawn half as often as they should be; a long tail of such tokens
    (a large vocabulary) then loses its mass. Here ``u`` is a float64 uniform (53 bits) and the
    cumulative sums are float64, so any probability above ~1e-16 is drawn at its rate. A category of
    probability 0 is never drawn.
    """
    p = probs.to(torch.float64)
    cdf = p.cumsum(-1)
    u = torch.rand(
        tuple(sample_shape) + p.shape[:-1], generator=generator, dtype=torch.float64, device=p.device
    )
    if p.ndim == 1:
        idx = torch.searchsorted(cdf, u * cdf[-1], right=True)
    else:
        idx = torch.searchsorted(
            cdf.expand(u.shape + cdf.shape[-1:]), (u * cdf[..., -1]).unsqueeze(-1), right=True
        )
        idx = idx.squeeze(-1)
    n = p.shape[-1]  # u * total may round up to total: fall back to the last category with p > 0
    last = n - 1 - (p > 0).flip(-1).to(torch.int64).argmax(-1)
    return torch.minimum(idx, last)


def all_states(n: int, D: int, device=None) -> torch.Tensor:
    """Every sequence in ``{0..n-1}^D``, shape ``(n^D, D)``, in lexicographic order (dim 0 slowest)."""
    idx = torch.arange(n**D, device=device)
    return torch.stack([(idx // n ** (D - 1 - d)) % n for d in range(D)], dim=1)


def joint_from_factors(probs: torch.Tensor) -> torch.Tensor:
    """The product law ``prod_d probs[:, d]`` over all ``n^D`` sequences, shape ``(B, n^D)``, in the
    order of :func:`all_states`: how a factorized reverse step acts on the enumerable space."""
    out = probs[:, 0]
    for d in range(1, probs.shape[1]):
        out = (out[:, :, None] * probs[:, d, None, :]).reshape(probs.shape[0], -1)
    return out


def _mix(alpha: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """``alpha I + (1 - alpha) 1 pi^T`` for a batch of ``alpha``: keep the token, else redraw it from ``pi``."""
    eye = torch.eye(pi.shape[0], dtype=pi.dtype, device=pi.device)
    a = alpha[..., None, None]
    return a * eye + (1 - a) * pi


def _stationary(kind: str, K: int, like: torch.Tensor) -> torch.Tensor:
    """The limit law ``pi``: uniform over the K tokens, or all mass on the mask (index K)."""
    if kind == "absorbing":
        pi = torch.zeros(K + 1, dtype=like.dtype, device=like.device)
        pi[K] = 1
        return pi
    return torch.full((K,), 1 / K, dtype=like.dtype, device=like.device)


# ---------------------------------------------------------------------------------------------
# D3PM (Austin et al. 2021)
# ---------------------------------------------------------------------------------------------


def transition_matrix(kind: str, beta: torch.Tensor, K: int) -> torch.Tensor:
    """One-step matrices ``Q_t`` of D3PM (Austin et al. 2021, sec. 3 and app. A.2), shape ``(*beta.shape, n, n)``,
    rows summing to 1, ``q(x_t | x_{t-1}) = Cat(x_{t-1} Q_t)``:

    * ``uniform``: ``(1 - beta) I + beta 11^T / K`` (app. A.2.1);
    * ``absorbing``: ``(1 - beta) I + beta 1 e_m^T``, ``n = K + 1``, the mask ``m = K`` absorbing (A.2.3);
    * ``gaussian``: discretized Gaussian on ordinal tokens, ``Q_ij ∝ exp(-4 (i-j)^2 / ((K-1)^2 beta))``
      normalized over offsets ``-(K-1)..K-1``, the rest on the diagonal (A.2.2);
    * ``nearest``: a nearest-neighbour band, ``beta / 2`` to each neighbour ``i ± 1``, the rest on the diagonal.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown D3PM kind {kind!r}; choose one of {KINDS}.")
    beta = torch.as_tensor(beta)
    b = beta[..., None, None]
    i = torch.arange(K, dtype=beta.dtype, device=beta.device)
    diff = i[:, None] - i[None, :]
    eye = torch.eye(K, dtype=beta.dtype, device=beta.device)
    if kind == "uniform":
        return (1 - b) * eye + b / K
    if kind == "absorbing":
        pi = _stationary("absorbing", K, beta)
        return _mix(1 - beta, pi)
    if kind == "gaussian":
        scale = 4 / ((K - 1) ** 2 * b.clamp_min(torch.finfo(beta.dtype).tiny))
        offsets = torch.arange(-(K - 1), K, dtype=beta.dtype, device=beta.device)
        norm = torch.exp(-(offsets**2) * scale).sum(-1, keepdim=True)
        off = torch.exp(-(diff**2) * scale) / norm * (1 - eye)
    else:  # nearest
        off = (diff.abs() == 1).to(beta.dtype) * b / 2
    return off + eye * (1 - off.sum(-1, keepdim=True))


def d3pm_betas(
    T: int, schedule: str = "cosine", beta_min: float = 0.02, beta_max: float = 1.0
) -> torch.Tensor:
    """Per-step ``beta_i``, ``i = 1..T`` (float64, shape ``(T,)``): ``"jsd"``, ``1 / (T - i + 1)`` (Austin
    et al. sec. 4; for absorbing, ``alphabar_i = 1 - i / T``); ``"cosine"``, ``beta_i = 1 - abar_i / abar_{i-1}``
    with ``abar(t) = cos(pi/2 (t + s)/(1 + s))``, ``s = 0.008`` (Nichol & Dhariwal 2021, used by Austin et
    al. for uniform); ``"linear"``, from ``beta_min`` to ``beta_max`` (their Gaussian-kernel schedule)."""
    if isinstance(T, bool) or int(T) != T or T < 1:
        raise ValueError(f"T must be a positive integer number of steps; got {T!r}.")
    i = torch.arange(1, int(T) + 1, dtype=torch.float64)
    if schedule == "jsd":
        return 1 / (T - i + 1)
    if schedule == "cosine":
        f = torch.cos(math.pi / 2 * (torch.cat([i.new_zeros(1), i]) / T + 0.008) / 1.008)
        return (1 - f[1:] / f[:-1]).clamp(0, 1)
    if schedule == "linear":
        return torch.linspace(beta_min, beta_max, int(T), dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {schedule!r}; choose 'jsd', 'cosine' or 'linear'.")


class D3PM:
    """A T-step discrete chain with one matrix kind (:data:`KINDS`) and per-step ``betas`` (T numbers in
    (0, 1]; default: ``"jsd"`` for absorbing, ``"cosine"`` for uniform, ``"linear"`` otherwise), or
    explicit ``matrices`` (T, n, n) (with ``mask_id`` if one state is an absorbing mask)."""

    def __init__(self, kind: str, K: int, T: int, betas=None, *, matrices=None, mask_id: int | None = None):
        if K < 2:
            raise ValueError(f"K must be at least 2 tokens; got {K}.")
        self.K, self.T, self.kind = int(K), int(T), kind
        if matrices is not None:
            self.matrices = check_transition_matrix(torch.as_tensor(matrices, dtype=torch.float64))
            n = self.matrices.shape[-1]
            self.mask = None if mask_id is None else check_mask_id(mask_id, K)
            if self.matrices.shape[0] != T or n != K + (mask_id is not None):
                raise ValueError(
                    f"matrices must have shape ({T}, n, n), n = K (+1 with a mask); got {tuple(self.matrices.shape)}."
                )
            self.kind = "custom"
        else:
            if kind not in KINDS:
                raise ValueError(f"unknown D3PM kind {kind!r}; choose one of {KINDS} or give matrices.")
            default = {"absorbing": "jsd", "uniform": "cosine"}.get(kind, "linear")
            betas = d3pm_betas(T, default) if betas is None else torch.as_tensor(betas, dtype=torch.float64)
            if betas.shape != (T,) or (betas <= 0).any() or (betas > 1).any():
                raise ValueError(f"betas must be {T} numbers in (0, 1]; got shape {tuple(betas.shape)}.")
            self.betas, self.matrices = betas, None
            self.mask = K if kind == "absorbing" else None
        self.n = self.K + (self.mask is not None)
        self._cache: dict = {}

    def tables(self, like: torch.Tensor):
        """``(Q, Qbar)``, each ``(T + 1, n, n)`` on ``like``'s device and dtype, entry ``i`` being ``Q_i``
        and ``Qbar_i = Q_1 ... Q_i`` (``Q_0 = Qbar_0 = I``). Uniform and absorbing use the closed form
        ``Qbar_i = abar_i I + (1 - abar_i) 1 pi^T``, ``abar_i = prod_{j<=i} (1 - beta_j)``
        (Austin et al. app. A.2.1, A.2.3)."""
        key = (like.device, like.dtype)
        if key not in self._cache:
            eye = torch.eye(self.n, dtype=like.dtype, device=like.device)
            if self.matrices is not None:
                Q = torch.cat([eye[None], self.matrices.to(device=like.device, dtype=like.dtype)])
            else:
                beta = self.betas.to(device=like.device, dtype=like.dtype)
                Q = torch.cat([eye[None], transition_matrix(self.kind, beta, self.K)])
            if self.kind in ("uniform", "absorbing"):
                abar = torch.cat([beta.new_ones(1), torch.cumprod(1 - beta, 0)])
                Qbar = _mix(abar, _stationary(self.kind, self.K, beta))
            else:
                Qbar = [eye]
                for i in range(1, self.T + 1):
                    Qbar.append(Qbar[-1] @ Q[i])
                Qbar = torch.stack(Qbar)
            self._cache[key] = (Q, Qbar)
        return self._cache[key]

    def step_of(self, t: torch.Tensor) -> torch.Tensor:
        """The step index ``i = round(t T)`` of times ``t`` (on their device)."""
        return torch.round(t * self.T).long()

    def transition(self, t, like: torch.Tensor | None = None) -> torch.Tensor:
        """``Qbar`` at times ``t = i / T`` (shape (B,)): per-sample ``q(x_t | x_0)`` matrices ``(B, n, n)``."""
        like = t if like is None else like
        return self.tables(like)[1][self.step_of(t)]

    def prior(self, like: torch.Tensor) -> torch.Tensor:
        """``pi``, the law ``x_T`` is compared to (uniform over K, or the mask)."""
        return _stationary("absorbing" if self.mask is not None else "uniform", self.K, like)

    def _step(self, i, like):
        Q, Qbar = self.tables(like)
        if torch.is_tensor(i):
            i = i.to(like.device)
        return Q[i], Qbar[i - 1], Qbar[i]

    def q_probs(self, x0: torch.Tensor, i, like: torch.Tensor) -> torch.Tensor:
        """``q(x_i | x_0) = Cat(x_0 Qbar_i)`` (Austin et al. eq. 2), shape (B, D, n)."""
        x0 = check_tokens(x0, self.K, "x0")
        return _rows(self._step(i, like)[2], x0)

    def q_sample(self, x0: torch.Tensor, i, generator=None, dtype=torch.float64) -> torch.Tensor:
        """A draw of ``x_i ~ q(x_i | x_0)`` (eq. 2); ``i`` an int or a (B,) LongTensor of steps."""
        return sample_categorical(
            self.q_probs(x0, i, torch.empty(0, dtype=dtype, device=x0.device)), generator
        )

    def posterior(self, x_t: torch.Tensor, x0: torch.Tensor, i) -> torch.Tensor:
        """``q(x_{i-1} | x_i, x_0) ∝ (x_i Q_i^T) ⊙ (x_0 Qbar_{i-1})`` (Austin et al. eq. 3), shape (B, D, n).

        ``x0`` is tokens (B, D) or probabilities (B, D, K) over ``x_0``; then the result is the mixture
        ``sum_{x_0} q(x_{i-1} | x_i, x_0) p(x_0)`` (eq. 4's x0-parameterization, with the posterior,
        not the joint, weighted: exact when ``p`` is the true ``q(x_0 | x_i)``). Rows where ``x_i`` is
        impossible given ``x_0`` are zero.
        """
        x_t = check_tokens(x_t, self.n, "x_t")
        probs = x0 if torch.is_floating_point(x0) else None
        if probs is None:
            probs = torch.nn.functional.one_hot(check_tokens(x0, self.K, "x0"), self.K).to(torch.float64)
        if probs.shape != x_t.shape + (self.K,):
            raise ValueError(
                f"x0 probabilities must have shape {tuple(x_t.shape) + (self.K,)}; got {tuple(probs.shape)}."
            )
        Q, Qbar_prev, Qbar = self._step(i, probs)
        fact1 = _rows(Q.mT, x_t)  # q(x_i | x_{i-1}) as a function of x_{i-1}
        w = _safe_div(probs, _rows(Qbar.mT, x_t)[..., : self.K])  # p(x0) / q(x_i | x0)
        fact2 = (
            w @ Qbar_prev[..., : self.K, :]
            if Qbar_prev.ndim == 2
            else torch.einsum("bdk,bkn->bdn", w, Qbar_prev[:, : self.K])
        )
        out = fact1 * fact2
        return out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)

    def model_time(self, i, x: torch.Tensor) -> torch.Tensor:
        """The network's time ``t = i / T`` for step ``i``, shape (B,)."""
        i = torch.as_tensor(i, device=x.device)
        return (i.to(torch.get_default_dtype()) / self.T).expand(x.shape[0])

    def reverse_probs(self, model: Callable, x_t: torch.Tensor, i, logits=None) -> torch.Tensor:
        """``p(x_{i-1} | x_i) = sum_{x_0} q(x_{i-1} | x_i, x_0) p(x_0 | x_i)`` (eq. 4), from the denoiser's logits."""
        logits = model(x_t, self.model_time(i, x_t)) if logits is None else logits
        return self.posterior(x_t, torch.softmax(logits, -1), i)

    def vlb_terms(self, model: Callable, x0: torch.Tensor, generator=None) -> torch.Tensor:
        """Each term of ``L_vb`` (Austin et al. eq. 1; Ho et al. 2020 eq. 5), one draw of ``x_i`` per term,
        shape ``(B, T + 1)`` in nats, laid out as :func:`dmlib.ddpm.vlb_terms`: column 0 the decoder
        ``-log p(x_0 | x_1)``, column ``i`` (``1 <= i < T``) ``KL(q(x_i | x_{i+1}, x_0) || p(x_i | x_{i+1}))``,
        column T the prior term ``KL(q(x_T | x_0) || pi)``. Their sum bounds ``-log p(x_0)``."""
        terms = [self._term(model, x0, i, generator)[0] for i in range(1, self.T + 1)]
        return torch.stack(terms + [self.prior_kl(x0)], dim=1)

    def _term(self, model, x0, i, generator):
        """The term at step ``i`` (int or (B,)) per sample, and the logits: ``KL(q(x_{i-1} | x_i, x_0) ||
        p(x_{i-1} | x_i))``, which at ``i = 1`` (``q`` one-hot on ``x_0``) is the decoder ``-log p(x_0 | x_1)``."""
        x_t = self.q_sample(x0, i, generator)
        logits = model(x_t, self.model_time(i, x_t))
        p = self.reverse_probs(model, x_t, i, logits)
        return categorical_kl(self.posterior(x_t, x0, i).to(p.dtype), p).sum(1), logits

    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """``KL(q(x_T | x_0) || pi)`` summed over dims, per sample (zero for absorbing with ``beta_T = 1``)."""
        like = torch.empty(0, dtype=torch.float64, device=x0.device)
        return categorical_kl(self.q_probs(x0, self.T, like), self.prior(like)).sum(1)

    def loss(self, hybrid: float = 0.001) -> Callable:
        """A trainer loss: ``L_vb`` estimated with one random step per sample (``T L_{i-1}`` + prior), plus
        ``hybrid * CE(x_0 | x_i)``, Austin et al.'s hybrid loss ``L_lambda`` (eq. 5); ``hybrid = 0`` is pure L_vb."""

        def loss(model, batch, generator=None):
            x0 = check_tokens(batch, self.K, "batch")
            i = torch.randint(1, self.T + 1, (x0.shape[0],), generator=generator, device=x0.device)
            term, logits = self._term(model, x0, i, generator)
            ce = -torch.gather(torch.log_softmax(logits, -1), -1, x0.unsqueeze(-1)).squeeze(-1).sum(1)
            return (self.T * term + self.prior_kl(x0) + hybrid * ce).mean().to(logits.dtype)

        return loss

    def sample(self, model: Callable, shape, generator=None, device=None) -> torch.Tensor:
        """Ancestral sampling (Austin et al. sec. 3): ``x_T ~ pi``, then ``x_{i-1} ~ p(x_{i-1} | x_i)`` down to ``x_0``."""
        like = torch.empty(0, dtype=torch.float64, device=device)
        x = sample_categorical(self.prior(like).expand(*shape, self.n), generator)
        for i in range(self.T, 0, -1):
            x = sample_categorical(self.reverse_probs(model, x, i), generator)
        return x


def multinomial_posterior(x_t: torch.Tensor, x0: torch.Tensor, beta_t, alphabar_prev, K: int) -> torch.Tensor:
    """Multinomial diffusion's posterior (Hoogeboom et al. 2021, eq. 13-14):
    ``theta ∝ [alpha_t x_t + (1 - alpha_t)/K] ⊙ [abar_{t-1} x_0 + (1 - abar_{t-1})/K]``, ``alpha_t = 1 - beta_t``:
    D3PM's uniform kind (``D3PM("uniform", ...).posterior``) written with one-hot vectors."""
    oh = lambda x: torch.nn.functional.one_hot(check_tokens(x, K), K).to(torch.float64)  # noqa: E731
    a = 1 - torch.as_tensor(beta_t, dtype=torch.float64)
    theta = (a * oh(x_t) + (1 - a) / K) * (alphabar_prev * oh(x0) + (1 - alphabar_prev) / K)
    return theta / theta.sum(-1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# Continuous time (Campbell et al. 2022), masked diffusion (MDLM, MD4), score entropy (SEDD)
# ---------------------------------------------------------------------------------------------


class KeepSchedule:
    """``alpha(t)``, the probability that a token is untouched at time ``t`` (``alpha(0) = 1``):
    ``"linear"`` ``1 - t`` (MDLM), ``"cosine"`` ``1 - sin(pi t / 2)`` (MD4's ``1 - cos(pi/2 (1 - t))``),
    both scaled to ``eps + (1 - eps) alpha`` so that ``alpha(1) = eps``; or ``"exponential"``
    ``exp(-rate t)``, a constant rate. The rate of the forward chain is ``beta(t) = -alpha'(t) / alpha(t)``."""

    def __init__(self, kind: str = "linear", eps: float = 0.0, rate: float = 1.0):
        if kind not in ("linear", "cosine", "exponential"):
            raise ValueError(f"unknown keep schedule {kind!r}; choose 'linear', 'cosine' or 'exponential'.")
        if not 0 <= eps < 1 or rate <= 0:
            raise ValueError(f"need 0 <= eps < 1 and rate > 0; got eps={eps}, rate={rate}.")
        self.kind, self.eps, self.rate_ = kind, eps, rate

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "exponential":
            return torch.exp(-self.rate_ * t)
        a = 1 - t if self.kind == "linear" else 1 - torch.sin(math.pi / 2 * t)
        return self.eps + (1 - self.eps) * a

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha'(t)``."""
        if self.kind == "exponential":
            return -self.rate_ * torch.exp(-self.rate_ * t)
        d = -torch.ones_like(t) if self.kind == "linear" else -math.pi / 2 * torch.cos(math.pi / 2 * t)
        return (1 - self.eps) * d

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """The forward rate ``beta(t) = -alpha'(t) / alpha(t)`` (infinite where ``alpha = 0``)."""
        return -self.dalpha(t) / self.alpha(t)


class CTMC:
    """A continuous-time chain per token with rates ``R(t) = beta(t) R_base``, ``R_base = 1 pi^T - I``
    (Campbell et al. 2022, sec. 4; Lou et al. 2024, sec. 3.3): ``"uniform"`` (pi uniform over K) or
    ``"absorbing"`` (pi on the mask K). Then ``q(x_t | x_s) = a I + (1 - a) 1 pi^T`` with
    ``a = alpha(t) / alpha(s)`` in closed form (``R_base`` is minus a projector's complement)."""

    def __init__(self, kind: str, K: int, schedule: KeepSchedule | None = None):
        if kind not in ("uniform", "absorbing"):
            raise ValueError(f"unknown CTMC kind {kind!r}; choose 'uniform' or 'absorbing'.")
        if K < 2:
            raise ValueError(f"K must be at least 2 tokens; got {K}.")
        self.kind, self.K = kind, int(K)
        self.schedule = KeepSchedule("linear", eps=1e-3) if schedule is None else schedule
        self.mask = K if kind == "absorbing" else None
        self.n = self.K + (self.mask is not None)

    def prior(self, like: torch.Tensor) -> torch.Tensor:
        return _stationary(self.kind, self.K, like)

    def transition(self, t, like: torch.Tensor | None = None) -> torch.Tensor:
        """``q(x_t | x_0) = alpha(t) I + (1 - alpha(t)) 1 pi^T`` for times of shape (B,) (on ``like``'s
        device): ``(B, n, n)``."""
        t = as_time(t).to(torch.float64) if like is None else _times(t, like)
        return _mix(self.schedule.alpha(t), self.prior(t))

    def rate_matrix(self, t: torch.Tensor) -> torch.Tensor:
        """``R(t) = beta(t) (1 pi^T - I)``, rows summing to 0, shape ``(*t.shape, n, n)``."""
        eye = torch.eye(self.n, dtype=t.dtype, device=t.device)
        return self.schedule.beta(t)[..., None, None] * (self.prior(t) - eye)

    def rates_into(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``R_t(y, x_d)`` for every ``y != x_d``, the forward rate into the current token (B, D, n), 0 at ``y = x_d``."""
        R = _rows(self.rate_matrix(t).mT, x)
        return R * (1 - torch.nn.functional.one_hot(x, self.n).to(R.dtype))

    def q_sample(self, x0: torch.Tensor, t, generator=None) -> torch.Tensor:
        """``x_t ~ q(x_t | x_0)`` for times ``t`` (number or (B,))."""
        x0 = check_tokens(x0, self.K, "x0")
        return sample_categorical(_rows(self.transition(t, like=x0), x0), generator)

    def scores(self, probs: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Concrete scores from a denoiser's ``p(x_0 | x)`` (Lou et al. 2024, sec. 3.3; Campbell et al. Prop. 3):
        ``s(x)_{d,y} = p_t(x^{d<-y}) / p_t(x) = sum_{x_0} q_t(y | x_0) / q_t(x_d | x_0) p(x_0 | x)``, shape (B, D, n)."""
        P = self.transition(t, like=x)[:, : self.K]  # (B, K, n), rows x_0
        w = _safe_div(probs, _rows(P.mT, x)[..., : self.K])
        return torch.einsum("bdk,bkn->bdn", w, P)

    def reverse_rates(self, model: Callable, x: torch.Tensor, t) -> torch.Tensor:
        """``Rhat_t(x, x^{d<-y}) = R_t(y, x_d) sum_{x_0} q_t(y | x_0) / q_t(x_d | x_0) p(x_0 | x)`` (Campbell et al.
        2022 eq. 3 / Prop. 3, factorized: one coordinate changes at a time), shape (B, D, n), 0 at ``y = x_d``."""
        x = check_tokens(x, self.n, "x")
        t = _times(t, x)
        probs = torch.softmax(model(x, t.to(torch.get_default_dtype())).to(torch.float64), -1)
        return self.rates_into(x, t) * self.scores(probs, x, t)


def score_entropy(weights: torch.Tensor, scores: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """Score entropy (Lou et al. 2024, eq. 8-9): ``sum w_y (s_y - r_y log s_y + K(r_y))`` with
    ``K(a) = a (log a - 1)``, summed over all but the batch dim. Each term is ``>= 0`` and zero iff
    ``s_y = r_y``; with ``r`` the true ratios ``p_t(y) / p_t(x)`` it is the score entropy, with the
    conditional ``q_t(y | x_0) / q_t(x | x_0)`` the denoising score entropy (Prop. 3.2)."""
    terms = scores - torch.xlogy(ratios, scores) + torch.xlogy(ratios, ratios) - ratios
    terms = torch.where(weights > 0, weights * terms, torch.zeros_like(terms))  # no 0 * inf where w = 0
    return terms.flatten(1).sum(1)


def dwdse(process: CTMC, model: Callable, x0: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
    """The integrand of the diffusion-weighted denoising score entropy (Lou et al. 2024, eq. 11 / Thm 3.6),
    per sample: ``sum_d sum_{y != x_t^d} R_t(y, x_t^d) [s_y - r_y log s_y + K(r_y)]`` with ``r_y =
    q_t(y | x_0^d) / q_t(x_t^d | x_0^d)`` and ``s`` the concrete scores of ``model``. Its t-integral plus
    the prior KL is the continuous-time NELBO (Campbell et al.'s ``L_CT``, written in scores)."""
    x_t = check_tokens(x_t, process.n, "x_t")
    t = _times(t, x_t)
    probs = torch.softmax(model(x_t, t.to(torch.get_default_dtype())).to(torch.float64), -1)
    onehot = torch.nn.functional.one_hot(check_tokens(x0, process.K, "x0"), process.K).to(torch.float64)
    return score_entropy(
        process.rates_into(x_t, t), process.scores(probs, x_t, t), process.scores(onehot, x_t, t)
    )


def ctmc_prior_kl(process: CTMC, x0: torch.Tensor) -> torch.Tensor:
    """``KL(q_1(. | x_0) || pi)`` summed over dims, per sample: the prior term of the continuous NELBO."""
    P = _rows(process.transition(1.0, like=x0), x0)
    return categorical_kl(P, process.prior(P)).sum(1)


def ctmc_loss(process: CTMC) -> Callable:
    """A trainer loss: the continuous NELBO ``E_t[DWDSE_t] + KL(q_1 || pi)`` (SEDD, Lou et al. eq. 11), one
    time ``t ~ U(0, 1]`` and one ``x_t`` per sample; an upper bound on ``-log p(x_0)`` in expectation."""

    def loss(model, batch, generator=None):
        x0 = check_tokens(batch, process.K, "batch")
        t = 1 - torch.rand(x0.shape[0], generator=generator, dtype=torch.float64, device=x0.device)
        x_t = process.q_sample(x0, t, generator)
        return (dwdse(process, model, x0, x_t, t) + ctmc_prior_kl(process, x0)).mean().float()

    return loss


def tau_leaping_probs(process: CTMC, model: Callable, x: torch.Tensor, t, h: float) -> torch.Tensor:
    """One tau-leaping step ``t -> t - h`` (Campbell et al. 2022, sec. 4.1), per dimension (B, D, n):
    rates frozen at ``t``, dimension d jumps ``N_d ~ Poisson(h lambda_d)`` times, ``lambda_d = sum_y Rhat(x,
    x^{d<-y})``; a token cannot add jumps, so ``N_d`` is clamped to 1: it stays w.p. ``exp(-h lambda_d)``
    and else moves to ``y`` w.p. ``Rhat_y / lambda_d``. First order in ``h``."""
    rates = process.reverse_rates(model, x, t)
    lam = rates.sum(-1, keepdim=True)
    out = -torch.expm1(-h * lam) * _safe_div(rates, lam)
    stay = torch.exp(-h * lam) * torch.nn.functional.one_hot(x, process.n).to(lam.dtype)
    return out + stay


def tau_leaping_sample(
    process: CTMC, model: Callable, x: torch.Tensor, steps: int, generator=None
) -> torch.Tensor:
    """Tau-leaping from ``x`` at ``t = 1`` (draw it from ``process.prior``) to ``t = 0`` in ``steps`` equal steps."""
    x = check_tokens(x, process.n, "x")
    for k in range(steps, 0, -1):
        x = sample_categorical(tau_leaping_probs(process, model, x, k / steps, 1 / steps), generator)
    return x


def exact_sample(
    process: CTMC, model: Callable, x: torch.Tensor, generator=None, windows: int = 64, safety: float = 2.0
) -> torch.Tensor:
    """The reverse chain from ``t = 1`` to 0 without time discretization: uniformization by thinning
    (Lewis & Shedler 1979; Campbell et al. sec. 4). In each of ``windows`` time windows a per-sample
    bound ``lambda* = safety * max(lambda(x, t), lambda(x, window end))`` on the total reverse rate is
    set (re-set after each jump), candidate times arrive at rate ``lambda*``, and a candidate at ``u`` is a
    jump w.p. ``lambda(x, u) / lambda*``, to ``x^{d<-y}`` w.p. ``Rhat_{d,y} / lambda``. Exact whenever the
    bound holds, which is checked at every candidate (a clear error otherwise). For small D: one network
    call per candidate; it reads values (loops until every sample is done), so it cannot run on ``meta``;
    rates must be finite on [0, 1] (not masked diffusion with ``alpha(1) = 0``: use :func:`masked_sample`)."""
    x = check_tokens(x, process.n, "x").clone()
    B = x.shape[0]
    lam_of = lambda x, t: process.reverse_rates(model, x, t).sum((1, 2))  # noqa: E731
    for w in range(windows):
        lo = 1 - (w + 1) / windows
        t = torch.full((B,), 1 - w / windows, dtype=torch.float64, device=x.device)
        active = torch.ones(B, dtype=torch.bool, device=x.device)
        while bool(active.any()):
            bound = safety * torch.maximum(lam_of(x, t), lam_of(x, torch.full_like(t, lo)))
            if not torch.isfinite(bound).all():
                raise ValueError(
                    "reverse rates are infinite in [0, 1]; use a schedule with alpha > 0 or masked_sample."
                )
            e = -torch.log1p(-torch.rand(B, generator=generator, dtype=torch.float64, device=x.device))
            t_new = t - e / bound.clamp_min(1e-300)
            active = active & (t_new > lo)
            rates = process.reverse_rates(model, x, torch.where(active, t_new, t).clamp_min(lo))
            lam = rates.sum((1, 2))
            if bool((active & (lam > bound * (1 + 1e-9))).any()):
                raise ValueError(
                    "the total reverse rate exceeded its thinning bound; raise windows or safety."
                )
            u = torch.rand(B, generator=generator, dtype=torch.float64, device=x.device)
            jump = active & (u * bound < lam)
            flat = sample_categorical(rates.flatten(1) + (~jump)[:, None], generator)  # any value if no jump
            d, y = flat // process.n, flat % process.n
            rows = torch.arange(B, device=x.device)
            x[rows[jump], d[jump]] = y[jump]
            t = torch.where(active, t_new, t)
    return x


def masked_weight(schedule: KeepSchedule, t: torch.Tensor) -> torch.Tensor:
    """The NELBO weight ``-alpha'(t) / (1 - alpha(t))`` of masked diffusion (MDLM eq. 10, MD4 eq. 5)."""
    return -schedule.dalpha(t) / (1 - schedule.alpha(t))


def mask_tokens(x0: torch.Tensor, t, K: int, schedule: KeepSchedule, generator=None) -> torch.Tensor:
    """``x_t ~ q(x_t | x_0)``: each token is kept w.p. ``alpha(t)``, else replaced by the mask ``K``."""
    x0 = check_tokens(x0, K, "x0")
    t = _times(t, x0)
    u = torch.rand(x0.shape, generator=generator, dtype=torch.float64, device=x0.device)
    return torch.where(u < schedule.alpha(t)[:, None], x0, torch.full_like(x0, K))


def masked_nelbo_integrand(
    model: Callable, x0: torch.Tensor, x_t: torch.Tensor, t, K: int, schedule: KeepSchedule
) -> torch.Tensor:
    """``(-alpha'(t) / (1 - alpha(t))) sum_{d: x_t^d = K} -log p(x_0^d | x_t)`` per sample: the
    integrand of masked diffusion's NELBO = ``E_{t ~ U(0,1), x_t ~ q(. | x_0)}[...]`` (MDLM eq. 10, MD4 eq. 5);
    it is the absorbing case of :func:`dwdse`."""
    x_t = check_tokens(x_t, K + 1, "x_t")
    t = _times(t, x_t)
    logp = torch.log_softmax(model(x_t, t.to(torch.get_default_dtype())).to(torch.float64), -1)
    nll = -torch.gather(logp, -1, check_tokens(x0, K, "x0").unsqueeze(-1)).squeeze(-1)
    nll = torch.where(x_t == K, nll, torch.zeros_like(nll))  # unmasked tokens carry no loss (and no NaN)
    return masked_weight(schedule, t) * nll.sum(1)


def masked_loss(K: int, schedule: KeepSchedule | None = None) -> Callable:
    """A trainer loss: masked diffusion's NELBO (MDLM eq. 10) with one ``t ~ U(0, 1]`` per sample."""
    schedule = KeepSchedule("linear") if schedule is None else schedule

    def loss(model, batch, generator=None):
        x0 = check_tokens(batch, K, "batch")
        t = 1 - torch.rand(x0.shape[0], generator=generator, dtype=torch.float64, device=x0.device)
        x_t = mask_tokens(x0, t, K, schedule, generator)
        return masked_nelbo_integrand(model, x0, x_t, t, K, schedule).mean().float()

    return loss


def masked_sample(
    model: Callable,
    K: int,
    shape,
    steps: int,
    schedule: KeepSchedule | None = None,
    generator=None,
    device=None,
    unmask: str = "posterior",
    mask_id: int | None = None,
) -> torch.Tensor:
    """Ancestral sampling of masked diffusion from ``t = 1`` (all masked) to 0 over ``steps`` steps (MDLM
    sec. 3.2, MD4 sec. 4). At step ``t -> s``, unmasked tokens carry over unchanged; with ``"posterior"``
    each masked token unmasks w.p. ``(alpha_s - alpha_t) / (1 - alpha_t)`` (the exact ``q(x_s | x_t, x_0)``)
    to ``x_0 ~ p(x_0 | x_t)``; with ``"confidence"`` the expected number of masked tokens (rounded) unmask,
    those whose drawn token is most probable (MaskGIT-style, not exact). All unmask at ``s = 0``."""
    schedule = KeepSchedule("linear") if schedule is None else schedule
    check_mask_id(K if mask_id is None else mask_id, K)
    if unmask not in ("posterior", "confidence"):
        raise ValueError(f"unknown unmask rule {unmask!r}; choose 'posterior' or 'confidence'.")
    x = torch.full(tuple(shape), K, dtype=torch.long, device=device)
    for k in range(steps, 0, -1):
        t = torch.full(x.shape[:1], k / steps, dtype=torch.float64, device=x.device)
        a_t, a_s = schedule.alpha(t), schedule.alpha(t - 1 / steps)
        p_unmask = ((a_s - a_t) / (1 - a_t))[:, None] if k > 1 else torch.ones_like(t)[:, None]
        probs = torch.softmax(model(x, t.to(torch.get_default_dtype())).to(torch.float64), -1)
        draw = sample_categorical(probs, generator)
        masked = x == K
        if unmask == "posterior":
            go = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=x.device) < p_unmask
        else:
            conf = torch.where(
                masked, torch.gather(probs, -1, draw.unsqueeze(-1)).squeeze(-1), -torch.ones_like(t)[:, None]
            )
            count = torch.round(p_unmask * masked.sum(1, keepdim=True)).long()
            go = conf.argsort(1, descending=True).argsort(1) < count
        x = torch.where(masked & go, draw, x)
    return x


# ---------------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------------


class DiscreteOracle:
    """Exact answers for a distribution ``p`` over all ``K^D`` sequences (``probs`` of shape ``(K,) * D``,
    or flat with ``K`` and ``D`` given), diffused by a :class:`D3PM` (at ``t = i / T``) or a :class:`CTMC`.

    Everything is enumeration with the per-token kernel ``P = q(x_t | x_0)``, since the forward kernel
    factorizes, ``q_t(x) = sum_{x_0} p(x_0) prod_d P[x_0^d, x^d]``, in float64 on ``probs``' device;
    cost ``B K^D D`` per query, so ``K^D`` is capped at :attr:`MAX_STATES`.
    """

    MAX_STATES = 100_000

    def __init__(self, probs, K: int | None = None, D: int | None = None):
        probs = torch.as_tensor(probs, dtype=torch.float64)
        if K is None or D is None:
            if probs.ndim == 0 or len(set(probs.shape)) != 1:
                raise ValueError(
                    f"give probs of shape (K,) * D, or flat with K and D; got {tuple(probs.shape)}."
                )
            K, D = probs.shape[0], probs.ndim
        if K**D > self.MAX_STATES:
            raise ValueError(
                f"K^D = {K}^{D} = {K**D} states is too many to enumerate (max {self.MAX_STATES}); "
                "use fewer tokens or a shorter sequence."
            )
        if probs.numel() != K**D:
            raise ValueError(f"probs must hold K^D = {K**D} numbers; got {probs.numel()}.")
        self.p, self.K, self.D = probs.reshape(-1), int(K), int(D)
        if self.p.device.type == "cpu" and ((self.p < 0).any() or abs(self.p.sum().item() - 1) > 1e-9):
            raise ValueError("probs must be non-negative and sum to 1.")
        self.states = all_states(self.K, self.D, self.p.device)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` of the data, shape (B,)."""
        x = check_tokens(x, self.K, "x")
        return torch.log(self.p[self._index(x, self.K)])

    def _index(self, x, n):
        powers = n ** torch.arange(self.D - 1, -1, -1, device=x.device)
        return (x * powers).sum(-1)

    def _weights(self, process, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``p(x_0) q(x | x_0)`` for every ``x_0`` (B, K^D): the joint, by enumeration."""
        P = (
            process.transition(t, like=torch.empty(0, dtype=torch.float64, device=x.device))
            if isinstance(process, D3PM)
            else process.transition(t, like=x)
        )
        P = P.to(torch.float64).expand(x.shape[0], -1, -1)
        cols = _rows(P.mT, x)[..., : self.K]  # (B, D, K): q(x^d | x_0^d = k)
        w = self.p.to(x.device).expand(x.shape[0], -1)
        for d in range(self.D):
            w = w * cols[:, d, self.states[:, d].to(x.device)]
        return w

    def marginal(self, process, x: torch.Tensor, t) -> torch.Tensor:
        """``q_t(x)``, exact, shape (B,)."""
        x = check_tokens(x, process.n, "x")
        return self._weights(process, x, _times(t, x)).sum(1)

    def x0_probs(self, process, x: torch.Tensor, t) -> torch.Tensor:
        """``p(x_0^d = k | x_t = x)``, shape (B, D, K): the exact denoiser, also on masked states (all
        zero where ``q_t(x) = 0``)."""
        x = check_tokens(x, process.n, "x")
        w = self._weights(process, x, _times(t, x))
        w = _safe_div(w, w.sum(1, keepdim=True))  # an impossible x_t: zeros (uniform logits)
        onehot = torch.nn.functional.one_hot(self.states.to(x.device), self.K).to(w.dtype)  # (N, D, K)
        return torch.einsum("bn,ndk->bdk", w, onehot)

    def denoiser(self, process) -> Callable:
        """The exact denoiser as a ``model(x_t, t) -> logits`` (B, D, K) callable: a perfectly trained network."""

        def model(x_t, t):
            return torch.log(self.x0_probs(process, x_t, t).clamp_min(torch.finfo(torch.float64).tiny))

        return model

    def ratios(self, process, x: torch.Tensor, t) -> torch.Tensor:
        """``q_t(x^{d<-y}) / q_t(x)`` for every ``d, y`` (B, D, n): the exact concrete scores."""
        x = check_tokens(x, process.n, "x")
        B, D, n = x.shape[0], self.D, process.n
        t = _times(t, x)
        y = torch.arange(n, device=x.device)
        nb = x[:, None, None, :].expand(B, D, n, D).clone()  # nb[b, d, y] = x^{d<-y}
        for d in range(D):
            nb[:, d, :, d] = y
        q_nb = self.marginal(process, nb.reshape(-1, D), t.repeat_interleave(D * n)).reshape(B, D, n)
        return q_nb / self.marginal(process, x, t)[:, None, None]

    def reverse_rates(self, process: CTMC, x: torch.Tensor, t) -> torch.Tensor:
        """The exact time reversal ``Rhat_t(x, y) = R_t(y, x) q_t(y) / q_t(x)`` for neighbours ``y = x^{d<-y}``
        (Campbell et al. 2022, Prop. 1), shape (B, D, n), 0 at ``y = x_d``."""
        return process.rates_into(x, _times(t, x)) * self.ratios(process, x, t)


# ---------------------------------------------------------------------------------------------
# Order-agnostic autoregressive models as absorbing diffusion (ARDM, Hoogeboom et al. 2022)
# ---------------------------------------------------------------------------------------------


def _conditionals(model: Callable, x: torch.Tensor, n_masked: torch.Tensor, K: int) -> torch.Tensor:
    """``log p(x_0^d = k | visible tokens of x)`` (B, D, K) in float64 from a denoiser ``model(x_t, t)``,
    called at ``t = n_masked / D``: the time at which the linear schedule masks that share on average.
    (The exact absorbing denoiser does not depend on ``t``; see :func:`ardm_log_likelihood_bound`.)"""
    t = (n_masked.to(torch.float64) / x.shape[1]).to(torch.get_default_dtype())
    logits = model(x, t)
    if not torch.is_tensor(logits) or logits.shape != x.shape + (K,):
        got = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise ValueError(
            f"the model must return logits of shape {tuple(x.shape) + (K,)} (B, D, K); got {got}."
        )
    return torch.log_softmax(logits.to(torch.float64), -1)


def ardm_log_likelihood_bound(
    model: Callable, x: torch.Tensor, K: int, *, method: str = "subsets"
) -> torch.Tensor:
    """The order-agnostic autoregressive bound (ARDM: Hoogeboom et al. 2022, sec. 3, eq. 4-6), exactly, per
    sample (B,) in nats, for a conditional model given as a masked-diffusion denoiser (``model(x_t, t)``,
    masked tokens ``= K``, logits over the clean tokens):

        log p(x) >= E_{sigma ~ U(S_D)} sum_{t=1}^{D} log p(x_sigma(t) | x_sigma(<t))                 (eq. 4)
                  = D E_{t ~ U{1..D}} E_sigma [1 / (D - t + 1) sum_{k not in sigma(<t)} log p(x_k | x_sigma(<t))]

    (eq. 5-6: at step t every one of the ``D - t + 1`` tokens not yet generated is equally likely to be next).
    The visible set ``sigma(<t)`` is a uniform subset of size ``t - 1``, so with ``m = D - t + 1`` masked
    tokens the bound is ``sum_{m=1}^{D} (1 / m) C(D, m)^-1 sum_{|M| = m} sum_{k in M} log p(x_k | x_{not M})``:
    ``method="subsets"`` sums this over all ``2^D - 1`` mask sets; ``"orders"`` sums eq. 4 over all ``D!``
    orders (an independent check, for small D). With the true conditionals of a joint every order gives
    ``log p(x)`` by the chain rule, so the bound is tight.

    It equals minus masked diffusion's continuous-time NELBO (:func:`masked_nelbo_exact`) for any keep
    schedule with ``alpha(0) = 1``, ``alpha(1) = 0``, when the denoiser does not depend on ``t`` (the exact one
    does not: ``p(x_0 | x_t)`` depends only on which tokens are visible). Given ``m`` of ``D`` tokens masked,
    the NELBO weighs them by ``int_0^1 (-alpha' / (1 - alpha)) C(D, m) (1 - alpha)^m alpha^(D - m) dt =
    C(D, m) B(m, D - m + 1) = 1 / m`` (substitute ``u = alpha``), the weight above (Ou et al. 2024, "Your
    absorbing discrete diffusion secretly models the conditional distributions of clean data", make the
    same point). The model is called at ``t = m / D``, so a ``t``-dependent one gets its time at that share.
    """
    x = check_tokens(x, K, "x")
    B, D = x.shape
    if method == "subsets":
        masks = all_states(2, D, x.device)[1:].bool()  # every non-empty mask set M, (2^D - 1, D)
        m = masks.sum(1)  # |M|
        comb = torch.tensor([math.comb(D, k) for k in range(D + 1)], dtype=torch.float64, device=x.device)
        weight = 1 / (m * comb[m])  # 1 / (m C(D, m)): the share of step t = D - m + 1, over its C(D, m) sets
        x_in = torch.where(masks[None], torch.full_like(x, K)[:, None], x[:, None]).reshape(-1, D)
        logp = _conditionals(model, x_in, m.repeat(B), K).reshape(B, len(masks), D, K)
        own = torch.gather(logp, -1, x[:, None, :, None].expand(B, len(masks), D, 1)).squeeze(-1)
        terms = torch.where(masks[None], own, torch.zeros_like(own)).sum(
            -1
        )  # sum_{k in M} log p(x_k | x_{not M})
        return (terms * weight).sum(1)
    if method == "orders":
        if D > 8:
            raise ValueError(f"method='orders' enumerates D! orders; D = {D} is too many (use 'subsets').")
        orders = torch.tensor(list(itertools.permutations(range(D))), device=x.device)  # (D!, D)
        total = torch.zeros(B, dtype=torch.float64, device=x.device)
        rank = orders.argsort(1)  # rank[o, d]: the step at which order o generates token d
        for step in range(D):  # the conditional of the token generated at this step, for every order
            masked = rank >= step  # not yet generated: sigma(>= step)
            x_in = torch.where(masked[None], torch.full_like(x, K)[:, None], x[:, None]).reshape(-1, D)
            logp = _conditionals(model, x_in, (D - step) * torch.ones_like(x_in[:, 0]), K)
            logp = logp.reshape(B, len(orders), D, K)
            pos = orders[:, step]  # the token generated now
            idx = x[:, pos]  # (B, D!)
            total = total + logp[:, torch.arange(len(orders), device=x.device), pos, :].gather(
                -1, idx.unsqueeze(-1)
            ).squeeze(-1).mean(1)
        return total
    raise ValueError(f"unknown method {method!r}; choose 'subsets' or 'orders'.")


def masked_nelbo_exact(
    model: Callable, x0: torch.Tensor, K: int, schedule: KeepSchedule | None = None, n_nodes: int = 32
) -> torch.Tensor:
    """Masked diffusion's continuous-time NELBO ``int_0^1 E_{x_t ~ q(. | x_0)}[`` :func:`masked_nelbo_integrand`
    ``] dt`` (MDLM eq. 10, MD4 eq. 5) per sample (B,), with the expectation over ``x_t`` exact (all ``2^D``
    mask sets, set ``M`` having probability ``(1 - alpha)^|M| alpha^(D - |M|)``) and the ``t``-integral by
    ``n_nodes``-point Gauss-Legendre quadrature (exact for the linear schedule, whose integrand is then a
    polynomial of degree ``D - 1``; spectrally accurate for the cosine one). Needs ``alpha(1) = 0``: with
    tokens left unmasked at ``t = 1`` the bound would need a prior term. For small ``D``."""
    schedule = KeepSchedule("linear") if schedule is None else schedule
    alpha_end = float(schedule.alpha(torch.tensor(1.0, dtype=torch.float64)))
    if alpha_end > 0:
        raise ValueError(
            f"the masked NELBO without a prior term needs alpha(1) = 0 (every token masked at t = 1); this "
            f"schedule keeps alpha(1) = {alpha_end:g}. Use KeepSchedule('linear') or ('cosine') with eps = 0."
        )
    if isinstance(n_nodes, bool) or not isinstance(n_nodes, int) or n_nodes < 1:
        raise ValueError(f"n_nodes must be a positive integer; got {n_nodes!r}.")
    x0 = check_tokens(x0, K, "x0")
    B, D = x0.shape
    u, w = np.polynomial.legendre.leggauss(n_nodes)  # nodes on (-1, 1): never t = 0, where the weight is 1/t
    t = torch.tensor((u + 1) / 2, dtype=torch.float64, device=x0.device)
    w = torch.tensor(w / 2, dtype=torch.float64, device=x0.device)
    masks = all_states(2, D, x0.device).bool()  # (2^D, D)
    m = masks.sum(1).to(torch.float64)
    a = schedule.alpha(t)[:, None]  # (J, 1)
    p_mask = (1 - a) ** m * a ** (D - m)  # (J, 2^D): probability of each mask set at each node
    x_t = torch.where(masks[None], torch.full_like(x0, K)[:, None], x0[:, None])  # (B, 2^D, D)
    J, M = len(t), len(masks)
    rows_x0 = x0[:, None, None].expand(B, J, M, D).reshape(-1, D)
    rows_xt = x_t[:, None].expand(B, J, M, D).reshape(-1, D)
    rows_t = t[None, :, None].expand(B, J, M).reshape(-1)
    vals = masked_nelbo_integrand(model, rows_x0, rows_xt, rows_t, K, schedule).reshape(B, J, M)
    return ((vals * p_mask).sum(2) * w).sum(1)


def ardm_loss(K: int) -> Callable:
    """A trainer loss: the ARDM step estimator (Hoogeboom et al. 2022, eq. 6 / Algorithm 1), one step ``t ~
    U{1..D}`` and one order per sample: ``-D / (D - t + 1) sum_{k not in sigma(<t)} log p(x_k | x_sigma(<t))``,
    unbiased for minus :func:`ardm_log_likelihood_bound`."""

    def loss(model, batch, generator=None):
        x0 = check_tokens(batch, K, "batch")
        B, D = x0.shape
        step = torch.randint(1, D + 1, (B,), generator=generator, device=x0.device)
        rank = (
            torch.rand(x0.shape, generator=generator, device=x0.device).argsort(1).argsort(1)
        )  # uniform order
        masked = rank >= (step - 1)[:, None]  # the D - t + 1 tokens not in sigma(<t)
        n_masked = D - step + 1
        logp = _conditionals(model, torch.where(masked, torch.full_like(x0, K), x0), n_masked, K)
        nll = -torch.gather(logp, -1, x0.unsqueeze(-1)).squeeze(-1)
        nll = torch.where(masked, nll, torch.zeros_like(nll))
        return (D / n_masked.to(torch.float64) * nll.sum(1)).mean().float()

    return loss


def ardm_sample(model: Callable, K: int, shape, *, order=None, generator=None, device=None) -> torch.Tensor:
    """Autoregressive sampling in any order (Hoogeboom et al. 2022, sec. 3): from all masked, ``D`` steps,
    each drawing the next token of ``order`` from ``p(x_k | visible)``. ``order``: None (a uniform random
    order per sample), a permutation of ``0..D-1`` (one order for all) or a (B, D) LongTensor of them.
    With the true conditionals the output law is the joint, whatever the order."""
    B, D = (int(s) for s in shape)
    x = torch.full((B, D), K, dtype=torch.long, device=device)
    if order is None:
        order = torch.rand((B, D), generator=generator, device=x.device).argsort(1)
    order = torch.as_tensor(order, device=x.device).long().expand(B, D)
    if order.device.type == "cpu" and not (order.sort(1).values == torch.arange(D)).all():
        raise ValueError(
            f"order must be a permutation of 0..{D - 1} (or one per sample); got {order[:1].tolist()}."
        )
    rows = torch.arange(B, device=x.device)
    for step in range(D):
        pos = order[:, step]
        logp = _conditionals(model, x, torch.full_like(pos, D - step), K)[rows, pos]  # (B, K)
        x[rows, pos] = sample_categorical(logp.exp(), generator)
    return x
