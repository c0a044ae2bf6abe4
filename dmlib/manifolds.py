"""Riemannian diffusion on two known manifolds: the sphere S² and the flat torus Tᵈ.

**Time convention (used everywhere in this module).** The forward process is Brownian motion with
generator ``½Δ`` (Δ the Laplace–Beltrami operator), so on Rⁿ its kernel is ``N(x, t I)`` and the heat
equation reads ``∂_t p = ½ Δ p``. Papers that write ``∂_t p = Δ p`` (the kernel ``e^{tΔ}``, e.g. the
Legendre series with ``e^{−l(l+1)t}``) use half our time: their ``t`` is our ``2t``, so substitute
``t → t/2`` into their formulas (or, reading ours in their units, ``t → 2t``). With this convention the
reverse SDE of De Bortoli et al. (2022, "Riemannian score-based generative modelling", eq. 4) has drift
``+score`` and unit noise, and the probability-flow ODE has drift ``½ score`` (Song et al. 2021, eq. 13
with ``g = 1``).

Points: on S², unit vectors in R³ (shape ``(..., 3)``); on Tᵈ, angles in ``[−π, π)`` (shape ``(..., d)``).
Tangent vectors on S² are ambient vectors orthogonal to the point; on Tᵈ any vector is tangent.
Points are checked (a clear error with the advice to call ``project``) only when they live on the CPU:
reading values back from an accelerator would stall it, as in :func:`dmlib.schedules.as_time`.

Heat kernels, to a relative tolerance ``tol`` of the peak value ``(2πt)^{-d/2}`` (default 1e-12):

* S²: the Legendre series ``p_t = Σ_l (2l+1)/(4π) e^{−l(l+1)t/2} P_l(x·y)`` (Hobson 1931; e.g. Grigor'yan,
  "Heat kernel and analysis on manifolds", 2009) for ``t ≥ SPHERE_SWITCH_T``; below it the small-time
  asymptotic (Varadhan 1967; the Minakshisundaram–Pleijel parametrix with its first correction)
  ``p_t ≈ (2πt)^{-1} (θ/sin θ)^{1/2} e^{−θ²/(2t)} (1 + t b₁(θ)/2)``,
  ``b₁(θ) = 1/4 + (1 − θ cot θ)/(4θ²)``, whose relative error is about ``0.02 t²``.
* Tᵈ: the wrapped Gaussian ``Π_i Σ_k N(x_i − y_i + 2πk; 0, t)`` for ``t ≤ TORUS_SWITCH_T`` and the
  Fourier series ``Π_i (2π)^{-1} (1 + 2 Σ_{n≥1} e^{−n²t/2} cos n(x_i − y_i))`` above it (both exact series).

Absolute accuracy relative to the peak means ``log p_t`` is accurate only where ``p_t`` is well above
``tol`` × peak (within a few ``√t`` of the centre), which is where samples and training targets live.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from scipy import special
from tqdm import tqdm

TOL = 1e-12  # default truncation tolerance of every series, relative to the peak density
MAX_TERMS = 20_000  # beyond this a series raises instead of running on (or returning NaN)
SPHERE_SWITCH_T = 2e-3  # small-t form below, Legendre series above; they agree to ~1e-7 (relative)
FLOOR = 1e-10  # below this fraction of the peak a series is roundoff: S² falls back to the small-t form
TORUS_SWITCH_T = 1.0  # wrapped Gaussian (images) at or below, Fourier series above


# ------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------


def _time(t, like: torch.Tensor, *, allow_zero: bool = False) -> torch.Tensor:
    """``t`` as a tensor in ``like``'s dtype and on its device, checked (when on the CPU) to be finite and
    positive (or non-negative with ``allow_zero``)."""
    t = torch.as_tensor(t, dtype=like.dtype) if not torch.is_tensor(t) else t.to(like.dtype)
    if t.device.type == "cpu" and t.numel():
        bad = ~torch.isfinite(t) | (t < 0 if allow_zero else t <= 0)
        if bad.any():
            kind = "non-negative" if allow_zero else "positive (the kernel at t = 0 is a point mass)"
            raise ValueError(f"time t must be finite and {kind}; got {t[bad].flatten()[0].item():g}.")
    return t.to(like.device)


def _lower(t: torch.Tensor, t_min: float | None) -> float:
    """The smallest time, to size a series: ``t_min`` if given (no read-back), else ``t.min()``."""
    return float(t_min) if t_min is not None else float(t.min())


def _too_many(n: int, what: str, t: float, max_terms: int, advice: str) -> None:
    if n > max_terms:
        raise ValueError(
            f"the {what} at t = {t:g} needs {n} terms for the requested tolerance, more than "
            f"max_terms={max_terms}; {advice}"
        )


def _legendre_sum(z: torch.Tensor, coef: Callable[[int], torch.Tensor], L: int):
    """``S = Σ_{l≤L} c_l P_l(z)`` and ``S' = Σ_l c_l P_l'(z)`` by Bonnet's recurrence
    ``(l+1) P_{l+1} = (2l+1) z P_l − l P_{l−1}`` and ``P'_{l+1} = P'_{l−1} + (2l+1) P_l``
    (Abramowitz & Stegun 8.5.3, 8.5.5; no division by ``1 − z²``)."""
    p_prev, p = torch.ones_like(z), z
    d_prev, d = torch.zeros_like(z), torch.ones_like(z)
    S, dS = coef(0) * p_prev, torch.zeros_like(z)
    for l in range(1, L + 1):
        c = coef(l)
        S, dS = S + c * p, dS + c * d
        p_prev, p, d_prev, d = p, ((2 * l + 1) * z * p - l * p_prev) / (l + 1), d, d_prev + (2 * l + 1) * p
    return S, dS


def _sphere_terms(t: float, tol: float, max_terms: int) -> int:
    """Legendre degree L with tail ``Σ_{l>L} (2l+1)/(4π) e^{−l(l+1)t/2} ≤ e^{−L(L+1)t/2}/(2πt) ≤ tol/(2πt)``
    (the tail is bounded by its integral since the terms decrease once ``(2L+1)²t > 4``)."""
    L = math.ceil((-1 + math.sqrt(1 + 8 * math.log(1 / tol) / t)) / 2)
    _too_many(L, "Legendre series of the S² heat kernel", t, max_terms, "use method='auto' or a larger tol.")
    return max(L, 2)


def _w_terms(theta: torch.Tensor):
    """``w = (1 − θ cot θ)/θ²`` and ``w'/θ``, by their Taylor series below θ = 0.1 (no cancellation)."""
    small = theta < 0.1
    th = torch.where(small, torch.ones_like(theta), theta)  # a safe value where the series is used
    t2 = theta**2
    w_series = 1 / 3 + t2 * (1 / 45 + t2 * (2 / 945 + t2 * (1 / 4725 + t2 * 2 / 93555)))
    dw_series = 2 / 45 + t2 * (8 / 945 + t2 * (6 / 4725 + t2 * 16 / 93555))
    cot, sin = torch.cos(th) / torch.sin(th), torch.sin(th)
    w = (1 - th * cot) / th**2
    dw = -2 / th**4 + 1 / (th * sin) ** 2 + cot / th**3
    return torch.where(small, w_series, w), torch.where(small, dw_series, dw)


def _sphere_small_t(z, s, theta, t):
    """Small-t form of the S² kernel (module docstring): ``log p`` and ``d log p / dz`` with ``z = cos θ``.

    ``d log p/dθ = ½θw − θ/t + (t/8) w'/(1 + t/8 + t w/8)`` and ``dθ/dz = −1/sin θ``. θ is capped at
    π − 10⁻³, where the form (singular at the antipode) is wrong but ``p_t < e^{−2400}`` for ``t ≤ 2e-3``."""
    theta = theta.clamp(max=math.pi - 1e-3)
    w, dw_over = _w_terms(theta)
    ratio = 1 / torch.sinc(theta / math.pi)  # θ / sin θ, 1 at θ = 0
    corr = 1 + t / 8 + t * w / 8
    log_p = -torch.log(2 * math.pi * t) + 0.5 * torch.log(ratio) - theta**2 / (2 * t) + torch.log(corr)
    dlogp_dz = -ratio * (0.5 * w - 1 / t + (t / 8) * dw_over / corr)
    return log_p, dlogp_dz


def _sphere_series(z, t, L):
    """Legendre series of the S² kernel: ``log p`` and ``d log p/dz`` (``S'/S``; clamped where roundoff
    makes the tail non-positive)."""
    S, dS = _legendre_sum(z, lambda l: (2 * l + 1) / (4 * math.pi) * torch.exp(-l * (l + 1) * t / 2), L)
    S = S.clamp(min=torch.finfo(z.dtype).tiny)
    return torch.log(S), dS / S


def _zonal_cdf(z, t, L):
    """``G(z) = P(x·y ≤ z)`` under the S² kernel and its density ``g = G' = 2π p_t``, from
    ``∫_z^1 P_l = (P_{l−1}(z) − P_{l+1}(z))/(2l+1)``:
    ``G = 1 − ½[(1 − z) + Σ_{l≥1} e^{−l(l+1)t/2} (P_{l−1}(z) − P_{l+1}(z))]``, ``g = ½ Σ_l (2l+1) e^{..} P_l``."""
    p_prev, p = torch.ones_like(z), z
    tail, g = torch.zeros_like(z), 0.5 * torch.ones_like(z)
    for l in range(1, L + 1):
        e = torch.exp(-l * (l + 1) * t / 2)
        p_next = ((2 * l + 1) * z * p - l * p_prev) / (l + 1)
        tail, g = tail + e * (p_prev - p_next), g + 0.5 * (2 * l + 1) * e * p
        p_prev, p = p, p_next
    return 1 - 0.5 * ((1 - z) + tail), g


def _wrap(x: torch.Tensor) -> torch.Tensor:
    """Angles to ``[−π, π)``."""
    return torch.remainder(x + math.pi, 2 * math.pi) - math.pi


def _images(delta, t, t_hi: float, tol: float, max_terms: int):
    """Wrapped Gaussian on T¹, ``log Σ_k N(δ + 2πk; 0, t)`` and its δ-derivative ``−Σ_k softmax_k (δ+2πk)/t``;
    the nearest omitted image lies at ``|δ + 2π(K+1)| ≥ (2K+1)π``, so ``K`` has ``((2K+1)π)²/(2t) ≥ ln(2/tol)``."""
    K = max(1, math.ceil((math.sqrt(2 * t_hi * math.log(2 / tol)) / math.pi - 1) / 2))
    _too_many(2 * K + 1, "wrapped Gaussian (images) on T^d", t_hi, max_terms, "use method='auto'.")
    k = torch.arange(-K, K + 1, dtype=delta.dtype, device=delta.device)
    d = delta[..., None] + 2 * math.pi * k
    e = -(d**2) / (2 * t[..., None])
    log_p = torch.logsumexp(e, -1) - 0.5 * torch.log(2 * math.pi * t)
    return log_p, -(torch.softmax(e, -1) * d).sum(-1) / t


def _fourier(delta, t, t_lo: float, tol: float, max_terms: int):
    """Fourier series on T¹, ``(2π)^{-1} (1 + 2 Σ_{n≤N} e^{−n²t/2} cos nδ)``, with tail
    ``(1/π) Σ_{n>N} e^{−n²t/2} ≤ e^{−N²t/2}/(π N t) ≤ tol/(2π)``, i.e. ``N² ≥ 2 ln(2/(tol t))/t``."""
    N = max(2, math.ceil(math.sqrt(max(2 * math.log(2 / (tol * t_lo)), 0) / t_lo)))
    _too_many(N, "Fourier series on T^d", t_lo, max_terms, "use method='auto' or a larger tol.")
    n = torch.arange(1, N + 1, dtype=delta.dtype, device=delta.device)
    a = torch.exp(-(n**2) * t[..., None] / 2)
    p = (1 + 2 * (a * torch.cos(n * delta[..., None])).sum(-1)) / (2 * math.pi)
    dp = -2 * (n * a * torch.sin(n * delta[..., None])).sum(-1) / (2 * math.pi)
    p = p.clamp(min=torch.finfo(delta.dtype).tiny)
    return torch.log(p), dp / p


def _check_times_grid(timesteps) -> torch.Tensor:
    """Sampler grids run strictly downwards through non-negative finite times (t = 0 is data); float64, CPU."""
    ts = torch.as_tensor(timesteps.cpu() if torch.is_tensor(timesteps) else timesteps, dtype=torch.float64)
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(
            f"timesteps must be a 1-D tensor with at least 2 times; got shape {tuple(ts.shape)}."
        )
    if not torch.isfinite(ts).all() or (ts < 0).any():
        raise ValueError("timesteps must be finite and non-negative (t = 0 is the data).")
    if not (ts[1:] < ts[:-1]).all():
        raise ValueError("timesteps must decrease strictly (from noise to data).")
    return ts


# ------------------------------------------------------------------------------------------------
# The manifolds
# ------------------------------------------------------------------------------------------------


class Sphere:
    """The unit sphere S² ⊂ R³ with its round metric; points are unit vectors, shape ``(..., 3)``."""

    dim, ambient_dim, volume = 2, 3, 4 * math.pi

    def check(self, x: torch.Tensor, atol: float = 1e-5) -> torch.Tensor:
        """``x`` itself, after checking (on the CPU) its shape and that ``| |x| − 1 | ≤ atol``."""
        if x.shape[-1:] != (3,):
            raise ValueError(f"points on S² have shape (..., 3); got {tuple(x.shape)}.")
        if x.device.type == "cpu" and x.numel():
            err = (x.norm(dim=-1) - 1).abs()
            if not (err <= atol).all():  # also catches NaN
                raise ValueError(
                    f"points are off the unit sphere (| |x| - 1 | up to {err.max().item():.3g} > {atol:g}); "
                    "call Sphere().project(x) to normalize them."
                )
        return x

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest point on S²: ``x / |x|``."""
        return x / x.norm(dim=-1, keepdim=True)

    def proj_tangent(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection of an ambient vector onto ``T_x S²``: ``v − (x·v) x``."""
        return v - (x * v).sum(-1, keepdim=True) * x

    def exp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Exponential map ``cos|v| x + sin|v| v/|v|`` (``v`` tangent), renormalized against roundoff."""
        n = v.norm(dim=-1, keepdim=True)
        sinc = torch.sinc(n / math.pi)  # sin|v| / |v|, 1 at v = 0
        return self.project(torch.cos(n) * x + sinc * v)

    def log(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Logarithm map ``θ (y − (x·y) x)/|y − (x·y) x|`` with ``θ = atan2(|x × y|, x·y)`` (accurate at
        small θ, unlike ``acos``); undefined at the antipode, where it returns 0."""
        z, s, theta = self._angle(x, y)
        u = y - z[..., None] * x
        return (theta / s.clamp(min=torch.finfo(x.dtype).tiny))[..., None] * u

    def dist(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Geodesic distance ``θ = atan2(|x × y|, x·y)``."""
        return self._angle(x, y)[2]

    @staticmethod
    def _angle(x, y):
        z = (x * y).sum(-1)
        s = torch.linalg.cross(x.expand_as(y) if x.ndim < y.ndim else x, y.expand_as(x)).norm(dim=-1)
        return z, s, torch.atan2(s, z)

    def uniform(self, n: int, generator=None, dtype=torch.float64, device=None) -> torch.Tensor:
        """``n`` uniform points (normalized Gaussians)."""
        return self.project(torch.randn(n, 3, generator=generator, dtype=dtype, device=device))

    def log_uniform(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full(x.shape[:-1], -math.log(4 * math.pi), dtype=x.dtype, device=x.device)

    def _kernel(self, z, s, theta, t, *, t_min=None, tol=TOL, method="auto", max_terms=MAX_TERMS):
        """``(log p_t, d log p_t/dz)`` as functions of ``z = x·y``; see :meth:`log_heat_kernel`."""
        if method not in ("auto", "series", "small_t"):
            raise ValueError(f"method must be 'auto', 'series' or 'small_t'; got {method!r}.")
        if method == "small_t":
            return _sphere_small_t(z, s, theta, t)
        lo = _lower(t, t_min)
        if method == "series":
            return _sphere_series(z, t, _sphere_terms(lo, tol, max_terms))
        ts = t.clamp(min=SPHERE_SWITCH_T)  # the series is only summed where it is used
        series = _sphere_series(z, ts, _sphere_terms(max(lo, SPHERE_SWITCH_T), tol, max_terms))
        small = _sphere_small_t(z, s, theta, t)
        # below the switch, and where roundoff swamps the series (p < FLOOR x peak), the small-t form
        use_small = (t < SPHERE_SWITCH_T) | (series[0] < math.log(FLOOR) - torch.log(2 * math.pi * ts))
        return tuple(torch.where(use_small, a, b) for a, b in zip(small, series))

    def log_heat_kernel(self, x, y, t, *, t_min=None, tol=TOL, method="auto", max_terms=MAX_TERMS):
        """``log p_t(x, y)`` of Brownian motion with generator ½Δ (module docstring): the Legendre series
        for ``t ≥ SPHERE_SWITCH_T`` (``L`` terms with ``L(L+1) ≥ 2 ln(1/tol)/t``), the small-t form below.

        ``t`` is a number or broadcasts against the batch shape; ``t_min`` (a lower bound of ``t``) sizes the
        series without reading ``t`` back. ``method`` forces ``"series"`` (raises if it needs more than
        ``max_terms`` terms) or ``"small_t"``."""
        x, y = self.check(x), self.check(y)
        z, s, theta = self._angle(x, y)
        return self._kernel(
            z, s, theta, _time(t, z), t_min=t_min, tol=tol, method=method, max_terms=max_terms
        )[0]

    def heat_kernel(self, x, y, t, **kwargs) -> torch.Tensor:
        """``p_t(x, y)`` (:meth:`log_heat_kernel`, exponentiated)."""
        return self.log_heat_kernel(x, y, t, **kwargs).exp()

    def heat_kernel_score(self, x, y, t, *, t_min=None, tol=TOL, method="auto", max_terms=MAX_TERMS):
        """``∇_x log p_t(x, y) = (d log p/dz) (y − (x·y) x)``, the Riemannian gradient (tangent at ``x``):
        ``p_t`` depends on ``x`` through ``z = x·y``, whose Euclidean gradient ``y`` projects to ``y − z x``."""
        x, y = self.check(x), self.check(y)
        z, s, theta = self._angle(x, y)
        g = self._kernel(z, s, theta, _time(t, z), t_min=t_min, tol=tol, method=method, max_terms=max_terms)[
            1
        ]
        return g[..., None] * (y - z[..., None] * x)

    def sample_heat_kernel(self, y, t, generator=None, *, t_min=None, tol=TOL, grid: int = 2048):
        """Exact draws of ``X_t`` given ``X_0 = y``: ``z = cos θ`` from its exact law by inverse CDF, then a
        uniform direction ``v`` in ``T_y S²``: ``x = z y + √(1 − z²) v``. For ``t ≥ SPHERE_SWITCH_T``,
        safeguarded Newton (12 steps, started from the small-t Rayleigh quantile) on the exact Legendre
        CDF (:meth:`legendre_cdf`); below it, the small-t density ``2π sin θ p_t(θ)`` on ``grid`` points of
        ``[0, min(π, c√t)]``, ``c = √(2 ln(1/tol)) + 1``, trapezoid rule and linear interpolation.
        ``t`` may differ per point (shape ``y.shape[:-1]``)."""
        y = self.check(y)
        t = _time(t, y[..., 0]).expand(y.shape[:-1])
        r = torch.rand(t.shape, generator=generator, dtype=y.dtype, device=y.device)
        lo = _lower(t, t_min)
        hi = float(t.max()) if t_min is None else math.inf
        z = None
        if hi >= SPHERE_SWITCH_T:
            z = self._newton_quantile(r, t.clamp(min=SPHERE_SWITCH_T), max(lo, SPHERE_SWITCH_T), tol)
        if lo < SPHERE_SWITCH_T:
            z_small = self._grid_quantile(r, t.clamp(max=SPHERE_SWITCH_T), tol, grid)
            z = z_small if z is None else torch.where(t < SPHERE_SWITCH_T, z_small, z)
        v = self.proj_tangent(y, torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device))
        v = v / v.norm(dim=-1, keepdim=True)
        return self.project(z[..., None] * y + (1 - z**2).clamp(min=0).sqrt()[..., None] * v)

    def _newton_quantile(self, r, t, t_lo, tol, steps: int = 12):
        """``z`` with ``P(Z ≤ z) = 1 − r`` (so ``θ`` has upper tail ``r``), by Newton kept inside a bracket."""
        L = _sphere_terms(t_lo, tol, MAX_TERMS)
        target = 1 - r
        th0 = torch.sqrt(-2 * t * torch.log1p(-r.clamp(max=1 - 1e-16))).clamp(max=math.pi)
        z, a, b = torch.cos(th0), -torch.ones_like(r), torch.ones_like(r)
        for _ in range(steps):
            G, g = _zonal_cdf(z, t, L)
            a, b = torch.where(G < target, z, a), torch.where(G < target, b, z)
            step = z - (G - target) / g.clamp(min=torch.finfo(z.dtype).tiny)
            z = torch.where((step > a) & (step < b), step, (a + b) / 2)
        return z

    def _grid_quantile(self, r, t, tol, grid):
        """``cos θ`` at upper-tail probability ``r`` of θ under the small-t density, on a grid."""
        c = math.sqrt(2 * math.log(1 / tol)) + 1
        th_max = (c * t.sqrt()).clamp(max=math.pi)
        theta = th_max[..., None] * torch.linspace(0, 1, grid + 1, dtype=r.dtype, device=r.device)
        z, s = torch.cos(theta), torch.sin(theta)
        dens = s * _sphere_small_t(z, s, theta, t[..., None])[0].exp()
        cdf = torch.cat(
            [torch.zeros_like(dens[..., :1]), torch.cumsum(dens[..., 1:] + dens[..., :-1], -1)], -1
        )
        cdf = cdf / cdf[..., -1:]
        u = (1 - r)[..., None]
        i = torch.searchsorted(cdf.contiguous(), u).clamp(1, grid)
        c0, c1 = cdf.gather(-1, i - 1), cdf.gather(-1, i)
        frac = ((u - c0) / (c1 - c0).clamp(min=torch.finfo(r.dtype).tiny)).clamp(0, 1)
        return torch.cos(((i - 1) + frac)[..., 0] / grid * th_max)

    def random_walk(self, y, t, n_steps: int, generator=None) -> torch.Tensor:
        """Geodesic random walk (Jørgensen 1975; De Bortoli et al. 2022, Alg. 1 without drift):
        ``n_steps`` steps ``x ← exp_x(√(t/n) P_x z)``; converges in law to ``X_t`` as the steps shrink."""
        x, dt = self.check(y), _time(t, y[..., 0])[..., None] / n_steps
        for _ in range(n_steps):
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = self.exp(x, dt.sqrt() * self.proj_tangent(x, z))
        return x

    def legendre_cdf(self, z: torch.Tensor, t: float, tol: float = TOL) -> torch.Tensor:
        """Exact ``P(X_t · y ≤ z)`` given ``X_0 = y`` (:func:`_zonal_cdf`; for goodness-of-fit tests)."""
        t = _time(t, z)
        return _zonal_cdf(z, t, _sphere_terms(_lower(t, None), tol, MAX_TERMS))[0]


class Torus:
    """The flat torus Tᵈ = [−π, π)ᵈ; points are angles, shape ``(..., d)``; every vector is tangent."""

    def __init__(self, d: int = 1):
        if int(d) != d or d < 1:
            raise ValueError(f"the torus dimension d must be a positive integer; got {d!r}.")
        self.dim = self.ambient_dim = int(d)
        self.volume = (2 * math.pi) ** self.dim

    def check(self, x: torch.Tensor, atol: float = 1e-5) -> torch.Tensor:
        """``x`` itself, after checking (on the CPU) its shape and that its angles lie in ``[−π, π]`` ± atol."""
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"points on T^{self.dim} have shape (..., {self.dim}); got {tuple(x.shape)}.")
        if x.device.type == "cpu" and x.numel() and not (x.abs() <= math.pi + atol).all():
            raise ValueError(
                "angles must be finite and lie in [-pi, pi); call Torus.project(x) to wrap them."
            )
        return x

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Wrap angles to ``[−π, π)``."""
        return _wrap(x)

    def proj_tangent(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v

    def exp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``wrap(x + v)``."""
        return _wrap(x + v)

    def log(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``wrap(y − x)``, the shortest displacement."""
        return _wrap(y - x)

    def dist(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.log(x, y).norm(dim=-1)

    def uniform(self, n: int, generator=None, dtype=torch.float64, device=None) -> torch.Tensor:
        u = torch.rand(n, self.dim, generator=generator, dtype=dtype, device=device)
        return 2 * math.pi * u - math.pi

    def log_uniform(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full(x.shape[:-1], -self.dim * math.log(2 * math.pi), dtype=x.dtype, device=x.device)

    def _kernel1(self, delta, t, *, t_min=None, tol=TOL, method="auto", max_terms=MAX_TERMS):
        """Per-coordinate ``(log p, d log p/dδ)`` of the T¹ kernel at displacement ``δ = wrap(x − y)``."""
        if method not in ("auto", "images", "fourier"):
            raise ValueError(f"method must be 'auto', 'images' or 'fourier'; got {method!r}.")
        if method == "images":
            return _images(delta, t, float(t.max()), tol, max_terms)
        if method == "fourier":
            return _fourier(delta, t, _lower(t, t_min), tol, max_terms)
        lo, hi = (t_min, None) if t_min is not None else (float(t.min()), float(t.max()))
        if hi is not None and hi <= TORUS_SWITCH_T:
            return _images(delta, t, hi, tol, max_terms)
        if lo > TORUS_SWITCH_T:
            return _fourier(delta, t, lo, tol, max_terms)
        img = _images(delta, t.clamp(max=TORUS_SWITCH_T), TORUS_SWITCH_T, tol, max_terms)
        four = _fourier(delta, t.clamp(min=TORUS_SWITCH_T), TORUS_SWITCH_T, tol, max_terms)
        return tuple(torch.where(t <= TORUS_SWITCH_T, a, b) for a, b in zip(img, four))

    def _kernel(self, x, y, t, **kwargs):
        x, y = self.check(x), self.check(y)
        delta = _wrap(x - y)
        t = _time(t, delta[..., 0])[..., None].expand_as(delta)
        return self._kernel1(delta, t, **kwargs)

    def log_heat_kernel(self, x, y, t, *, t_min=None, tol=TOL, method="auto", max_terms=MAX_TERMS):
        """``log p_t(x, y) = Σ_i log p¹_t(x_i − y_i)``: per coordinate the wrapped Gaussian
        ``Σ_k N(δ + 2πk; 0, t)`` (logsumexp over images: accurate far into the tails) for
        ``t ≤ TORUS_SWITCH_T``, the Fourier series above (module docstring)."""
        return self._kernel(x, y, t, t_min=t_min, tol=tol, method=method, max_terms=max_terms)[0].sum(-1)

    def heat_kernel(self, x, y, t, **kwargs) -> torch.Tensor:
        return self.log_heat_kernel(x, y, t, **kwargs).exp()

    def heat_kernel_score(self, x, y, t, *, t_min=None, tol=TOL, method="auto", max_terms=MAX_TERMS):
        """``∇_x log p_t(x, y)``, coordinate by coordinate (images: ``−Σ_k softmax_k (δ + 2πk)/t``)."""
        return self._kernel(x, y, t, t_min=t_min, tol=tol, method=method, max_terms=max_terms)[1]

    def sample_heat_kernel(self, y, t, generator=None, **_) -> torch.Tensor:
        """Exact draws: ``wrap(y + √t z)`` is the wrapped Gaussian."""
        y = self.check(y)
        t = _time(t, y[..., 0])[..., None]
        return _wrap(y + t.sqrt() * torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device))

    def random_walk(self, y, t, n_steps: int, generator=None) -> torch.Tensor:
        """Geodesic random walk ``x ← wrap(x + √(t/n) z)`` (exact in law for any ``n_steps`` on Tᵈ)."""
        x, dt = self.check(y), _time(t, y[..., 0])[..., None] / n_steps
        for _ in range(n_steps):
            x = self.exp(
                x, dt.sqrt() * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            )
        return x


# ------------------------------------------------------------------------------------------------
# The oracle: mixtures whose diffused densities and scores are exact
# ------------------------------------------------------------------------------------------------


def _weights(weights, K: int, dtype) -> torch.Tensor:
    w = torch.full((K,), 1 / K, dtype=dtype) if weights is None else torch.as_tensor(weights, dtype=dtype)
    if w.shape != (K,) or (w < 0).any() or abs(w.sum().item() - 1) > 1e-6:
        raise ValueError(f"weights must be {K} non-negative numbers summing to 1; got {w.tolist()}.")
    return w


def _bessel_ratios(kappa: torch.Tensor, order_shift: float, tol: float, max_terms: int, what: str):
    """``I_{n+s}(κ)/I_s(κ)`` for ``n = 0..N`` (scipy's scaled ``ive``, CPU float64, once per κ), with N the
    first order where every ratio times ``(2n+1)`` is below ``tol``; raises past ``max_terms``."""
    k = kappa.detach().cpu().double().numpy().reshape(-1, 1)
    n = torch.arange(max_terms + 1, dtype=torch.float64).numpy()
    r = special.ive(n + order_shift, k) / special.ive(order_shift, k)
    small = ((2 * n + 1) * r <= tol).all(0)
    if not small.any():
        raise ValueError(
            f"the {what} of kappa up to {k.max():g} needs more than max_terms={max_terms} terms for "
            f"tol={tol:g}; use a smaller kappa or a larger tol."
        )
    N = max(int(small.argmax()), 2)
    return torch.as_tensor(r[:, : N + 1]).reshape(*kappa.shape, N + 1)


class VMFMixture:
    """``Σ_k w_k vMF(μ_k, κ_k)`` on S², ``vMF(x) = κ e^{κ μ·x}/(4π sinh κ)`` (Fisher 1953), diffused by
    Brownian motion (generator ½Δ): exact ``log p_t``, score and samples.

    The diffused density is the zonal (Funk–Hecke) expansion about each mean,
    ``p_t(x) = Σ_k w_k Σ_l (2l+1)/(4π) a_l(κ_k) e^{−l(l+1)t/2} P_l(μ_k·x)``, with the vMF's Legendre
    coefficients ``a_l(κ) = 2π ∫ vMF P_l = I_{l+½}(κ)/I_{½}(κ)`` (ratios of modified spherical Bessel
    functions, ``i_l(κ)/i_0(κ)``; Mardia & Jupp 2000, sec. 9.3), computed once per κ by scipy and
    truncated where ``(2l+1) a_l < tol``. At ``t = 0`` the closed form is used.
    """

    def __init__(self, means, kappas, weights=None, *, tol: float = TOL, max_terms: int = MAX_TERMS):
        self.manifold = Sphere()
        self.means = self.manifold.check(torch.as_tensor(means, dtype=torch.float64))
        K = self.means.shape[0]
        self.kappas = torch.as_tensor(kappas, dtype=torch.float64).expand(K).clone()
        if self.means.ndim != 2 or not (self.kappas > 0).all():
            raise ValueError("means must have shape (K, 3) and the kappas must be positive.")
        self.weights = _weights(weights, K, torch.float64)
        self.coeffs = _bessel_ratios(self.kappas, 0.5, tol, max_terms, "Legendre series of a vMF")  # (K, L+1)

    def _stats(self, x: torch.Tensor, t):
        x = self.manifold.check(x)
        mu, kap, w, a = (
            v.to(x.device, x.dtype) for v in (self.means, self.kappas, self.weights, self.coeffs)
        )
        t = _time(t, x[..., 0], allow_zero=True)[..., None]  # (B, 1) or (1,)
        z = x @ mu.T  # (B, K)
        u = mu - z[..., None] * x[..., None, :]  # (B, K, 3): the tangent gradient of z_k
        # t = 0: the closed form
        log_c = torch.log(kap) - math.log(2 * math.pi) - torch.log1p(-torch.exp(-2 * kap)) - kap
        joint = torch.log(w) + log_c + kap * z
        log_p0 = torch.logsumexp(joint, -1)
        score0 = (torch.softmax(joint, -1)[..., None] * kap[:, None] * u).sum(-2)
        # t > 0: the zonal series
        S, dS = _legendre_sum(
            z,
            lambda l: w * (2 * l + 1) / (4 * math.pi) * a[:, l] * torch.exp(-l * (l + 1) * t / 2),
            a.shape[1] - 1,
        )
        p = S.sum(-1).clamp(min=torch.finfo(x.dtype).tiny)
        score_t = (dS[..., None] * u).sum(-2) / p[..., None]
        zero = t[..., 0] == 0
        return torch.where(zero, log_p0, torch.log(p)), torch.where(zero[..., None], score0, score_t)

    def log_prob(self, x: torch.Tensor, t=0.0) -> torch.Tensor:
        """``log p_t(x)``, exact to ``tol`` (shape ``x.shape[:-1]``); ``t`` a number or one per point."""
        return self._stats(x, t)[0]

    def score(self, x: torch.Tensor, t=0.0) -> torch.Tensor:
        """``∇_x log p_t(x)``, the Riemannian (tangent) gradient."""
        return self._stats(x, t)[1]

    def sample(self, n: int, generator=None, dtype=torch.float64, device=None) -> torch.Tensor:
        """Exact draws (Wood 1994 for S²): ``w = 1 + log(u + (1 − u) e^{−2κ})/κ`` is ``μ·x`` by inverse CDF,
        then ``x = w μ + √(1 − w²) v`` with ``v`` uniform in ``T_μ S²``."""
        mu, kap, wts = (v.to(device, dtype) for v in (self.means, self.kappas, self.weights))
        k = torch.multinomial(wts, n, replacement=True, generator=generator)
        mu, kap = mu[k], kap[k][:, None]
        u = torch.rand(n, 1, generator=generator, dtype=dtype, device=device)
        w = (1 + torch.log(u + (1 - u) * torch.exp(-2 * kap)) / kap).clamp(-1, 1)
        v = self.manifold.proj_tangent(mu, torch.randn(n, 3, generator=generator, dtype=dtype, device=device))
        v = v / v.norm(dim=-1, keepdim=True)
        return self.manifold.project(w * mu + (1 - w**2).sqrt() * v)


class VonMisesMixture:
    """``Σ_k w_k Π_i vM(x_i; μ_{ki}, κ_{ki})`` on Tᵈ, ``vM(θ) = e^{κ cos(θ−μ)}/(2π I_0(κ))``, diffused by
    Brownian motion (generator ½Δ): exact ``log p_t``, score and samples.

    Per coordinate the diffused von Mises is its Fourier series (Mardia & Jupp 2000, eq. 3.5.26, times the
    heat semigroup's multipliers): ``(2π)^{-1} (1 + 2 Σ_n [I_n(κ)/I_0(κ)] e^{−n²t/2} cos n(θ − μ))``,
    truncated where ``(2n+1) I_n/I_0 < tol``. At ``t = 0`` the closed form is used.
    """

    def __init__(self, means, kappas, weights=None, *, tol: float = TOL, max_terms: int = MAX_TERMS):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape (K, d); got {tuple(self.means.shape)}.")
        K, d = self.means.shape
        self.manifold = Torus(d)
        self.means = self.manifold.check(self.means)
        kap = torch.as_tensor(kappas, dtype=torch.float64)
        self.kappas = (kap[:, None] if kap.ndim == 1 else kap).expand(K, d).clone()
        if not (self.kappas > 0).all():
            raise ValueError("the kappas must be positive.")
        self.weights = _weights(weights, K, torch.float64)
        self.coeffs = _bessel_ratios(self.kappas, 0.0, tol, max_terms, "Fourier series of a von Mises")[
            ..., 1:
        ]

    def _stats(self, x: torch.Tensor, t):
        x = self.manifold.check(x)
        mu, kap, w, rho = (
            v.to(x.device, x.dtype) for v in (self.means, self.kappas, self.weights, self.coeffs)
        )
        t = _time(t, x[..., 0], allow_zero=True)[..., None, None, None]  # (B, 1, 1, 1) or (1, 1, 1)
        delta = x[..., None, :] - mu  # (B, K, d)
        log_i0 = torch.log(torch.special.i0e(kap)) + kap
        logf0, dlogf0 = kap * torch.cos(delta) - math.log(2 * math.pi) - log_i0, -kap * torch.sin(delta)
        n = torch.arange(1, rho.shape[-1] + 1, dtype=x.dtype, device=x.device)
        c = rho * torch.exp(-(n**2) * t / 2)  # (B, K, d, N)
        f = (1 + 2 * (c * torch.cos(n * delta[..., None])).sum(-1)) / (2 * math.pi)
        df = -2 * (n * c * torch.sin(n * delta[..., None])).sum(-1) / (2 * math.pi)
        f = f.clamp(min=torch.finfo(x.dtype).tiny)
        zero = t[..., 0] == 0
        logf, dlogf = torch.where(zero, logf0, torch.log(f)), torch.where(zero, dlogf0, df / f)
        joint = torch.log(w) + logf.sum(-1)  # (B, K)
        return torch.logsumexp(joint, -1), (torch.softmax(joint, -1)[..., None] * dlogf).sum(-2)

    def log_prob(self, x: torch.Tensor, t=0.0) -> torch.Tensor:
        """``log p_t(x)``, exact to ``tol`` (shape ``x.shape[:-1]``); ``t`` a number or one per point."""
        return self._stats(x, t)[0]

    def score(self, x: torch.Tensor, t=0.0) -> torch.Tensor:
        """``∇_x log p_t(x)``."""
        return self._stats(x, t)[1]

    def sample(self, n: int, generator=None, dtype=torch.float64, device=None) -> torch.Tensor:
        """Exact draws by the Best & Fisher (1979) rejection sampler (wrapped-Cauchy envelope), per
        coordinate; the rejection loop reads values back, so it runs on ``device`` with a few syncs."""
        mu, kap, wts = (v.to(device, dtype) for v in (self.means, self.kappas, self.weights))
        k = torch.multinomial(wts, n, replacement=True, generator=generator)
        mu, kap = mu[k], kap[k]  # (n, d)
        tau = 1 + torch.sqrt(1 + 4 * kap**2)
        rho = (tau - torch.sqrt(2 * tau)) / (2 * kap)
        r = (1 + rho**2) / (2 * rho)
        out, todo = torch.zeros_like(mu), torch.ones_like(mu, dtype=torch.bool)
        while todo.any():
            u1, u2, u3 = torch.rand((3, *mu.shape), generator=generator, dtype=dtype, device=device)
            zc = torch.cos(math.pi * u1)
            f = (1 + r * zc) / (r + zc)
            c = kap * (r - f)
            ok = todo & ((c * (2 - c) - u2 > 0) | (torch.log(c / u2) + 1 - c >= 0))
            theta = mu + torch.sign(u3 - 0.5) * torch.acos(f.clamp(-1, 1))
            out, todo = torch.where(ok, theta, out), todo & ~ok
        return _wrap(out)


# ------------------------------------------------------------------------------------------------
# Training and sampling
# ------------------------------------------------------------------------------------------------


def rdsm_loss(manifold, *, t_min: float = 1e-3, t_max: float = 1.0, tol: float = TOL) -> Callable:
    """Riemannian denoising score matching (De Bortoli et al. 2022, eq. 8, with heat-kernel targets), as
    ``loss(model, x0, generator=None)`` for :func:`dmlib.train.train`::

        E_{t ~ U(t_min, t_max], x_0, x_t ~ p_t(·|x_0)}  t |P_{x_t} model(x_t, t) − ∇ log p_t(x_t | x_0)|²

    ``x_t`` is an exact heat-kernel draw and the target the kernel's score; ``model`` returns an ambient
    vector, projected to the tangent space. The weight ``λ(t) = t`` (the analogue of ``σ_t²`` in Song et
    al. 2021) makes every time contribute O(dim): the target has ``E|∇ log p_t|² ≈ dim / t`` at small t."""
    if not 0 < t_min < t_max:
        raise ValueError(f"need 0 < t_min < t_max; got t_min={t_min:g}, t_max={t_max:g}.")

    def loss(model: Callable, x0: torch.Tensor, generator=None) -> torch.Tensor:
        u = torch.rand(x0.shape[:-1], generator=generator, dtype=x0.dtype, device=x0.device)
        t = t_min + (t_max - t_min) * (1 - u)  # in (t_min, t_max]
        x_t = manifold.sample_heat_kernel(x0, t, generator, t_min=t_min, tol=tol)
        target = manifold.heat_kernel_score(x_t, x0, t, t_min=t_min, tol=tol)
        pred = manifold.proj_tangent(x_t, model(x_t, t))
        return (t * ((pred - target) ** 2).sum(-1)).mean()

    return loss


def _loop(step, x_T, timesteps, desc, progress, callback):
    """``x ← step(x, t, s)`` over consecutive grid times; ``callback(i, t, x)`` sees every state."""
    ts = _check_times_grid(timesteps)
    x = x_T
    if callback is not None:
        callback(0, ts[0], x)
    for i in tqdm(range(len(ts) - 1), disable=not progress, desc=desc):
        x = step(x, ts[i].to(x.dtype), ts[i + 1].to(x.dtype))
        if callback is not None:
            callback(i + 1, ts[i + 1], x)
    return x


@torch.no_grad()
def sample_reverse_grw(
    score: Callable, x_T, timesteps, *, manifold, generator=None, progress: bool = False, callback=None
) -> torch.Tensor:
    """Reverse geodesic random walk (De Bortoli et al. 2022, Alg. 2): the reverse SDE
    ``dY = ∇ log p_{T−s}(Y) ds + dB_M`` (drift +score and unit noise under the ½Δ convention), stepped as
    ``x ← exp_x(score(x, t) dt + √dt P_x z)`` with ``dt = t − s``; no noise on a step to ``s = 0``, as in
    :mod:`dmlib.sde`. ``score(x, t)`` may be a model or an oracle's ``.score``; ``t`` is 0-dim."""
    x_T = manifold.check(x_T)

    def step(x, t, s):
        dt = t - s
        v = manifold.proj_tangent(x, score(x, t)) * dt
        if s > 0:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            v = v + dt.sqrt() * manifold.proj_tangent(x, z)
        return manifold.exp(x, v)

    return _loop(step, x_T, timesteps, "reverse geodesic random walk", progress, callback)


@torch.no_grad()
def sample_pf_ode(
    score: Callable,
    x_T,
    timesteps,
    *,
    manifold,
    method: str = "heun",
    progress: bool = False,
    callback=None,
    generator=None,
) -> torch.Tensor:
    """The manifold probability-flow ODE ``dx/dt = −½ ∇ log p_t(x)`` (Song et al. 2021, eq. 13 with
    ``g = 1``; the Riemannian version of De Bortoli et al. 2022, sec. 3), integrated backwards in the
    tangent space: Euler ``x ← exp_x(½ P_x score(x, t) dt)`` or Heun (the default), which averages with
    the slope at the Euler point carried back to ``T_x`` by projection (it differs from parallel
    transport by O(dt²), keeping second order); Euler on a step to ``s = 0``. Deterministic;
    ``generator`` is accepted for the common sampler signature and unused."""
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun'; got {method!r}.")
    x_T = manifold.check(x_T)

    def slope(x, t):
        return 0.5 * manifold.proj_tangent(x, score(x, t))

    def step(x, t, s):
        dt = t - s
        k1 = slope(x, t)
        if method == "euler" or s == 0:
            return manifold.exp(x, k1 * dt)
        k2 = manifold.proj_tangent(x, slope(manifold.exp(x, k1 * dt), s))
        return manifold.exp(x, 0.5 * (k1 + k2) * dt)

    return _loop(step, x_T, timesteps, f"probability-flow ODE ({method})", progress, callback)
