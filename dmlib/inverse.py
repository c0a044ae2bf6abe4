"""Linear inverse problems with a diffusion prior (Chapter 9), scored against the exact posterior.

We observe ``y = A x + sigma_y n`` with ``n ~ N(0, I)`` and want samples of ``p(x | y)``. A pretrained
diffusion model knows ``p(x)`` only through its denoiser; each method below is a modification of a
sampler that brings ``y`` in:

* **replacement** (Song et al. 2021, "Score-based generative modeling through SDEs", App. I.2):
  after each reverse step, paste the noised observation ``alpha_s y + sigma_s z`` into the observed
  pixels (masks only);
* **RePaint** (Lugmayr et al. 2022, Algorithm 1): the same, with jump-back resampling: after some
  steps, re-noise ``j`` steps up with ``q(x_t | x_s)`` and come down again, ``r`` times in all;
* **SDEdit** (Meng et al. 2022): noise a guess (e.g. ``A^+ y``) to ``t*`` and run a stochastic sampler;
* **DDRM** (Kawar et al. 2022, eq. 7-8): DDIM in the basis of A's SVD, with ``eta`` and ``eta_b``;
* **DPS** (Chung et al. 2023, Algorithm 1): an ancestral step, then ``-zeta grad ||y - A x0_hat(x_t)||``
  through the denoiser by autograd;
* **PiGDM** (Song et al. 2023, "Pseudoinverse-guided diffusion models", eq. 7-8):
  ``p(y | x_t) ~ N(A x0_hat, r_t^2 A A^T + sigma_y^2 I)``, its score by a vector-Jacobian product;
* **SR3** (Saharia et al. 2022): the supervised baseline, a network ``f(x_t, t, y)`` trained on pairs.

The yardstick: for a Gaussian-mixture prior the posterior is again a Gaussian mixture
(:func:`exact_posterior`), so each method's error is measured exactly (:func:`compare_methods`).
Operators (:class:`LinearOperator`) act on ``x`` of shape ``(B, *x_shape)`` and return ``y`` of shape
``(B, m)``, ``m <= n``; each carries its SVD ``A = U diag(s) V^T`` as functions.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from .ddpm import check_start, check_timesteps, simple_loss
from .metrics import sliced_wasserstein
from .nets.mlp import _check_even, _stack, embed_time
from .oracle import GaussianMixture, _diffused_stats
from .parameterization import Denoiser, noise_like
from .samplers import ccdf_start, ddim_step, sample_ddim, time_grid
from .schedules import as_time

# ------------------------------------------------------------------------------------------------
# Linear operators and their SVDs
# ------------------------------------------------------------------------------------------------


class LinearOperator:
    """``y = A x`` with ``A`` of shape ``(m, n)``, ``n = prod(x_shape)``, ``m <= n``, and its SVD
    ``A = U diag(s) V^T``: :meth:`Vt` gives the spectral coordinates of x (the first m pair with
    ``singular_values``), :meth:`V` maps them back, :meth:`U` / :meth:`Ut` act on y. Tensors are kept
    in float64 on the CPU and moved to the data's device and dtype at each use, as the oracle does."""

    is_mask = False  # a mask's y is a copy of some coordinates: replacement and RePaint need one

    def __init__(self, name: str, x_shape, m: int):
        self.name, self.x_shape, self.m = name, tuple(int(d) for d in x_shape), int(m)
        self.n = math.prod(self.x_shape)
        if not 0 < self.m <= self.n:
            raise ValueError(f"{name}: need 0 < m <= n measurements; got m={m}, n={self.n}.")

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or tuple(x.shape[1:]) != self.x_shape:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(
                f"the {self.name} operator acts on data of shape (B, {', '.join(map(str, self.x_shape))}); "
                f"got {got}. Build the operator for your data's shape."
            )
        return x.reshape(x.shape[0], self.n)

    def check_y(self, y, batch: int) -> torch.Tensor:
        """``y`` of shape ``(m,)`` (one observation for every sample) or ``(B, m)``, as ``(B, m)``."""
        if not torch.is_tensor(y):
            raise TypeError(f"y must be a tensor of shape ({self.m},) or ({batch}, {self.m}); got {type(y)}.")
        if y.shape not in ((self.m,), (1, self.m), (batch, self.m)):
            raise ValueError(
                f"y must have shape ({self.m},) or ({batch}, {self.m}) for the {self.name} operator with "
                f"{self.m} measurements; got {tuple(y.shape)}."
            )
        return y.reshape(-1, self.m).expand(batch, self.m)

    def singular_values(self, like: torch.Tensor) -> torch.Tensor:
        return self._s.to(dtype=like.dtype, device=like.device)

    def pinv(self, y: torch.Tensor, rcond: float = 1e-10) -> torch.Tensor:
        """The pseudo-inverse ``A^+ y = V diag(1/s) U^T y`` (singular values below ``rcond max(s)``: 0)."""
        s = self.singular_values(y)
        inv = torch.where(s > rcond * s.max(), 1 / s, torch.zeros_like(s))
        coef = self.Ut(y) * inv
        return self.V(torch.cat([coef, coef.new_zeros(coef.shape[0], self.n - self.m)], dim=1))

    def project(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The nearest point of ``{A x = y}``: ``x + A^+ (y - A x)`` (the noiseless paste-back)."""
        return x + self.pinv(self.check_y(y, x.shape[0]) - self.A(x))

    def U(self, z):  # U = I unless a subclass says otherwise
        return z

    def Ut(self, y):
        return y

    def matrix(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """The dense ``(m, n)`` matrix, read off ``A`` applied to the identity (small n only)."""
        eye = torch.eye(self.n, dtype=torch.float64).to(like if like is not None else torch.float64)
        return self.A(eye.reshape(self.n, *self.x_shape)).T


class GroupMean(LinearOperator):
    """Each measurement is the mean of a group of ``g`` coordinates (``groups``: ``(m, g)`` flat indices,
    disjoint); coordinates in no group are unobserved. ``g = 1``: masking; ``k x k`` blocks:
    downsampling; the 3 channels of a pixel: colorization. SVD: per group ``A_row = (1/g) 1^T =
    (1/sqrt g) u^T`` with ``u = 1/sqrt g``, so ``s = 1/sqrt g``, ``U = I`` and V is block-diagonal, a
    Householder reflection ``Q`` (``Q e_1 = u``) per group, then the unobserved coordinates."""

    def __init__(self, name: str, x_shape, groups: torch.Tensor):
        super().__init__(name, x_shape, groups.shape[0])
        self.groups, self.g = groups.long(), groups.shape[1]
        self.is_mask = self.g == 1
        rest = torch.ones(self.n, dtype=torch.bool)
        rest[self.groups.flatten()] = False
        self.free = rest.nonzero().flatten()
        self.order = torch.cat([self.groups.flatten(), self.free])  # a permutation of 0..n-1
        if len(self.order) != self.n:
            raise ValueError(f"{name}: the groups must be disjoint indices into 0..{self.n - 1}.")
        v = torch.zeros(self.g, dtype=torch.float64)
        v[0] = 1.0
        v -= torch.full_like(v, self.g**-0.5)
        self.Q = torch.eye(self.g, dtype=torch.float64)
        if self.g > 1:
            self.Q -= 2 * torch.outer(v, v) / v.dot(v)
        self._s = torch.full((self.m,), self.g**-0.5, dtype=torch.float64)

    def A(self, x):
        x = self.flat(x)
        return x[:, self.groups.to(x.device)].mean(-1)

    def AT(self, y):
        vals = (y / self.g)[:, :, None].expand(-1, -1, self.g).reshape(y.shape[0], -1)
        vals = torch.cat([vals, vals.new_zeros(y.shape[0], self.n - vals.shape[1])], dim=1)
        return self._unpermute(vals).reshape(y.shape[0], *self.x_shape)

    def _unpermute(self, z):  # out[:, order] = z
        return torch.empty_like(z).index_copy(1, self.order.to(z.device), z)

    def Vt(self, x):
        x = self.flat(x)
        blocks = x[:, self.groups.to(x.device)] @ self.Q.to(x)  # (B, m, g)
        rest = x[:, self.free.to(x.device)]
        return torch.cat([blocks[..., 0], blocks[..., 1:].reshape(x.shape[0], -1), rest], dim=1)

    def V(self, z):
        B, m, g = z.shape[0], self.m, self.g
        blocks = torch.cat([z[:, :m, None], z[:, m : m * g].reshape(B, m, g - 1)], dim=2) @ self.Q.to(z).T
        flat = torch.cat([blocks.reshape(B, m * g), z[:, m * g :]], dim=1)
        return self._unpermute(flat).reshape(B, *self.x_shape)

    def project(self, x, y):
        if self.g > 1:
            return super().project(x, y)
        # a mask pastes y exactly: x + (y - x) can differ from y in the last bit
        flat = self.flat(x).index_copy(1, self.groups[:, 0].to(x.device), self.check_y(y, x.shape[0]))
        return flat.reshape(x.shape)


class Dense(LinearOperator):
    """``A`` given as a dense ``(m, n)`` matrix, its SVD computed once (``torch.linalg.svd``)."""

    def __init__(self, name: str, x_shape, matrix: torch.Tensor):
        super().__init__(name, x_shape, matrix.shape[0])
        if matrix.shape != (self.m, self.n):
            raise ValueError(f"{name}: the matrix must be (m, {self.n}); got {tuple(matrix.shape)}.")
        self.M = matrix.to(torch.float64)
        self._U, self._s, self._Vh = torch.linalg.svd(self.M, full_matrices=True)

    def A(self, x):
        return self.flat(x) @ self.M.to(x).T

    def AT(self, y):
        return (y @ self.M.to(y)).reshape(y.shape[0], *self.x_shape)

    def Vt(self, x):
        return self.flat(x) @ self._Vh.to(x).T

    def V(self, z):
        return (z @ self._Vh.to(z)).reshape(z.shape[0], *self.x_shape)

    def U(self, z):
        return z @ self._U.to(z).T

    def Ut(self, y):
        return y @ self._U.to(y)


def mask(observed) -> GroupMean:
    """Inpainting: ``observed`` is a boolean tensor of one sample's shape; ``y`` = the observed values."""
    observed = torch.as_tensor(observed)
    if observed.dtype != torch.bool or not observed.any():
        raise ValueError("mask: pass a boolean tensor of one sample's shape with at least one True entry.")
    return GroupMean("mask", observed.shape, observed.flatten().nonzero())


def downsample(x_shape, factor: int = 2) -> GroupMean:
    """Super-resolution: means over ``factor x factor`` blocks of each channel of ``(C, H, W)`` data."""
    C, H, W = _image_shape(x_shape, "downsample")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1 or H % factor or W % factor:
        raise ValueError(f"downsample: factor {factor} must divide the image size {H}x{W}.")
    k = factor
    idx = torch.arange(C * H * W).reshape(C, H // k, k, W // k, k).permute(0, 1, 3, 2, 4)
    return GroupMean("downsample", x_shape, idx.reshape(-1, k * k))


def colorize(x_shape) -> GroupMean:
    """Colorization: the gray image, the mean of the 3 channels of each pixel of ``(3, H, W)`` data."""
    C, H, W = _image_shape(x_shape, "colorize")
    if C != 3:
        raise ValueError(f"colorize needs 3-channel data (3, H, W); got {tuple(x_shape)}.")
    return GroupMean("colorize", x_shape, torch.arange(3 * H * W).reshape(3, H * W).T)


def blur(x_shape, std: float = 1.0, size: int = 5) -> Dense:
    """Deblurring: a normalized ``size x size`` Gaussian kernel per channel with zero padding, as a dense
    matrix (for 8x8 images it is 64 x 64; its small singular values are what makes deblurring hard)."""
    C, H, W = _image_shape(x_shape, "blur")
    if std <= 0 or size < 1 or size % 2 == 0:
        raise ValueError(f"blur needs std > 0 and an odd size; got std={std}, size={size}.")
    kernel, n = _gaussian_kernel(size, std, torch.zeros((), dtype=torch.float64)), C * H * W
    basis = torch.eye(n, dtype=torch.float64).reshape(n, C, H, W)
    images = F.conv2d(basis, kernel.expand(C, 1, size, size), padding=size // 2, groups=C)
    return Dense("blur", x_shape, images.reshape(n, n).T)


def random_projection(x_shape, m: int, generator: torch.Generator | None = None) -> Dense:
    """A random ``(m, n)`` Gaussian matrix with entries ``N(0, 1/n)`` (compressed sensing; the 2D toy)."""
    n = math.prod(tuple(x_shape))
    return Dense("projection", x_shape, torch.randn(m, n, generator=generator, dtype=torch.float64) / n**0.5)


def _gaussian_kernel(size: int, std: float, like: torch.Tensor) -> torch.Tensor:
    """A ``size x size`` Gaussian window of standard deviation ``std`` (in pixels) summing to 1."""
    r = torch.arange(size, dtype=like.dtype, device=like.device) - size // 2
    g = torch.exp(-(r**2) / (2 * std**2))
    return torch.outer(g, g) / g.sum() ** 2


def _image_shape(x_shape, name):
    if len(tuple(x_shape)) != 3:
        raise ValueError(f"{name} acts on images of shape (C, H, W); got {tuple(x_shape)}.")
    return tuple(int(d) for d in x_shape)


OPERATORS = {"mask": mask, "downsample": downsample, "blur": blur, "colorize": colorize}
OPERATORS["projection"] = random_projection


def make_operator(name: str, *args, **kwargs) -> LinearOperator:
    """``OPERATORS[name](*args, **kwargs)``, e.g. ``make_operator("downsample", (1, 8, 8), factor=2)``."""
    if name not in OPERATORS:
        raise ValueError(f"unknown operator {name!r}; choose one of {', '.join(OPERATORS)}.")
    return OPERATORS[name](*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# The exact posterior of a Gaussian-mixture prior
# ------------------------------------------------------------------------------------------------


def _check_sigma_y(sigma_y) -> float:
    if isinstance(sigma_y, bool) or not isinstance(sigma_y, (int, float)) or not 0 <= sigma_y < math.inf:
        raise ValueError(f"sigma_y is the noise std of y and must be a number >= 0; got {sigma_y!r}.")
    return float(sigma_y)


def _posterior_terms(prior: GaussianMixture, operator: LinearOperator, y, sigma_y):
    """Per component: log weight, mean, covariance and gain ``K = C A^T S^{-1}`` of ``p(x | y, k)``."""
    sigma_y = _check_sigma_y(sigma_y)
    if prior.dim != operator.n:
        raise ValueError(f"the prior has dimension {prior.dim} but the operator acts on n={operator.n}.")
    y = operator.check_y(y, 1)[0]
    A = operator.matrix(like=y)
    mu, C, w = (v.to(device=y.device, dtype=y.dtype) for v in (prior.means, prior.covs, prior.weights))
    AC = A @ C  # (K, m, n)
    S = AC @ A.T + sigma_y**2 * torch.eye(operator.m, dtype=y.dtype, device=y.device)
    gain = torch.linalg.solve(S, AC).transpose(1, 2)  # C A^T S^{-1}, S symmetric
    resid = y - mu @ A.T  # (K, m)
    mean = mu + torch.einsum("knm,km->kn", gain, resid)
    cov = C - gain @ AC
    quad = torch.einsum("km,km->k", resid, torch.linalg.solve(S, resid[..., None])[..., 0])
    log_norm = -0.5 * (quad + torch.linalg.slogdet(S).logabsdet + operator.m * math.log(2 * math.pi))
    return torch.log_softmax(torch.log(w) + log_norm, 0), mean, (cov + cov.transpose(1, 2)) / 2, gain


def exact_posterior(prior: GaussianMixture, operator: LinearOperator, y, sigma_y: float) -> GaussianMixture:
    """``p(x | y)`` for ``x ~ sum_k w_k N(m_k, C_k)`` and ``y = A x + N(0, sigma_y^2 I)``: the mixture with
    weights ``∝ w_k N(y; A m_k, S_k)``, ``S_k = A C_k A^T + sigma_y^2 I``, means ``m_k + K_k (y - A m_k)``
    and covariances ``C_k - K_k A C_k``, ``K_k = C_k A^T S_k^{-1}`` (Bishop 2006, eq. 2.115-2.117, the
    posterior of eq. 2.116 in its gain form). ``y``: one observation, shape ``(m,)``; computed on ``y``'s device and dtype.

    ``sigma_y = 0`` is the limit ``sigma_y -> 0``: the formulas stay finite when A has full row rank
    (``S_k = A C_k A^T`` is then invertible), the weights use the density of ``y`` in R^m, and every
    component lies on ``{A x = y}`` with a singular covariance (rank ``n - m``), so the mixture's own
    ``sample`` / ``log_prob`` (Cholesky) do not apply: draw with :func:`sample_exact_posterior`."""
    log_w, mean, cov, _ = _posterior_terms(prior, operator, y, sigma_y)
    return GaussianMixture._unchecked(mean, cov, log_w.exp())


def sample_exact_posterior(prior, operator, y, sigma_y: float, n: int, generator=None) -> torch.Tensor:
    """``n`` exact draws of ``p(x | y)`` by Matheron's rule (perturbation): draw ``k`` with the posterior
    weights, ``x' ~ N(m_k, C_k)`` and ``y' = A x' + sigma_y n``, return ``x' + K_k (y - y')`` (its
    covariance is the Joseph form of ``C_k - K_k A C_k``). Exact for ``sigma_y = 0`` too."""
    log_w, _, _, gain = _posterior_terms(prior, operator, y, sigma_y)
    y = operator.check_y(y, 1)
    k = torch.multinomial(log_w.exp(), n, replacement=True, generator=generator)
    mu, C = (v.to(device=y.device, dtype=y.dtype) for v in (prior.means, prior.covs))
    z = torch.randn(n, prior.dim, generator=generator, dtype=y.dtype, device=y.device)
    x_prior = mu[k] + torch.einsum("bij,bj->bi", torch.linalg.cholesky(C)[k], z)
    y_prior = operator.A(x_prior) + sigma_y * torch.randn(n, operator.m, generator=generator, dtype=y.dtype,
                                                          device=y.device)  # fmt: skip
    return x_prior + torch.einsum("bij,bj->bi", gain[k], y - y_prior)


# ------------------------------------------------------------------------------------------------
# Methods: each a modification of a sampler
# ------------------------------------------------------------------------------------------------


def _setup(operator: LinearOperator, y, x: torch.Tensor, sigma_y):
    operator.flat(x)
    return operator.check_y(y, x.shape[0]).to(x), _check_sigma_y(sigma_y)


def _finish(operator, x, y, sigma_y):
    """Noiseless y: paste it back (project onto ``{A x = y}``), the step reference code often forgets."""
    return operator.project(x, y) if sigma_y == 0 else x


def _with_x0(schedule, x0: torch.Tensor) -> Denoiser:
    """A denoiser that answers ``x0`` (a corrected estimate), so ``ddim_step`` can step from it."""
    return Denoiser(lambda x_t, t: x0, schedule, prediction="x0")


def _floats(schedule, t) -> tuple[float, float]:
    return float(schedule.alpha(t)), float(schedule.sigma(t))  # t: a CPU grid time, read for free


def _loop(step, x_T, ts, desc, progress, callback):
    """:func:`dmlib.ddpm.run_steps` without its last-step rule: these steps use y on the last step too."""
    x = check_start(x_T)
    if callback is not None:
        callback(0, ts[0], x)
    for i in tqdm(range(len(ts) - 1), disable=not progress, desc=desc):
        x = step(i, x)
        if callback is not None:
            callback(i + 1, ts[i + 1], x)
    return x


def repaint_path(n_steps: int, jump_length: int = 10, resamplings: int = 10) -> list[int]:
    """The grid indices RePaint visits (Lugmayr et al. 2022, sec. 4.2; their ``get_schedule_jump``): down
    one step at a time from 0 to ``n_steps``; on reaching ``p`` steps above the data with ``p - 1`` a
    multiple of ``jump_length`` and ``p <= n_steps - jump_length``, back up ``jump_length`` steps,
    ``resamplings - 1`` times. Each downward move costs one evaluation (:func:`repaint_nfe`)."""
    for name, v in (("n_steps", n_steps), ("jump_length", jump_length), ("resamplings", resamplings)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}.")
    left = {p: resamplings - 1 for p in range(1, n_steps - jump_length + 1, jump_length)}
    path, k = [0], 0
    while k < n_steps:
        k += 1
        path.append(k)
        if left.get(n_steps - k, 0) > 0:
            left[n_steps - k] -= 1
            k -= jump_length
            path.append(k)
    return path


def repaint_nfe(n_steps: int, jump_length: int = 10, resamplings: int = 10) -> int:
    """Network evaluations of RePaint: the downward moves of :func:`repaint_path`."""
    path = repaint_path(n_steps, jump_length, resamplings)
    return sum(b > a for a, b in zip(path, path[1:]))


@torch.no_grad()
def sample_repaint(denoiser, operator, y, x_T, timesteps, *, sigma_y=0.0, jump_length=10, resamplings=10,
                   generator=None, progress=False, callback=None):  # fmt: skip
    """RePaint (Lugmayr et al. 2022, Algorithm 1 with jumps): known pixels from ``q(x_s | x_0 = y)``,
    ``alpha_s y + sigma_s z``; unknown ones by an ancestral step (DDIM, eta = 1); a jump up from ``s`` to
    ``t`` draws ``q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2 I)`` (the argument order ports get
    wrong). ``callback(i, t, x)`` sees every move of :func:`repaint_path`. Masks only; with
    ``sigma_y > 0`` y is pasted as if it were clean."""
    if not operator.is_mask:
        raise ValueError(f"RePaint and replacement need a mask operator; got {operator.name!r}.")
    y, sigma_y = _setup(operator, y, x_T, sigma_y)
    ts, sched = check_timesteps(timesteps), denoiser.schedule
    times = ts[repaint_path(len(ts) - 1, jump_length, resamplings)]

    def move(i, x):
        t, s = times[i], times[i + 1]
        if s > t:  # a jump up: q(x_s | x_t) (transition(later, earlier))
            a_ts, var_ts = (float(v) for v in sched.transition(s, t))
            return a_ts * x + var_ts**0.5 * noise_like(x, generator)
        x = ddim_step(denoiser, x, t, s, eta=1.0, generator=generator)
        a, sig = _floats(sched, s)
        return operator.project(x, a * y + sig * noise_like(y, generator))

    return _finish(operator, _loop(move, x_T, times, "RePaint", progress, callback), y, sigma_y)


def sample_replacement(denoiser, operator, y, x_T, timesteps, *, sigma_y=0.0, generator=None, progress=False,
                       callback=None):  # fmt: skip
    """The replacement method (Song et al. 2021, App. I.2): ancestral steps, each followed by pasting
    ``alpha_s y + sigma_s z`` into the observed pixels; :func:`sample_repaint` without resampling."""
    return sample_repaint(denoiser, operator, y, x_T, timesteps, sigma_y=sigma_y, jump_length=1, resamplings=1,
                          generator=generator, progress=progress, callback=callback)  # fmt: skip


def sample_sdedit(denoiser, operator, y, x_guess, timesteps, *, t_star: float = 0.5, sigma_y=0.0, eta=1.0,
                  generator=None, progress=False, callback=None):  # fmt: skip
    """SDEdit (Meng et al. 2022, sec. 3): ``x_{t*} = alpha x_guess + sigma z`` (:func:`dmlib.samplers.ccdf_start`),
    then DDIM with ``eta`` (1: ancestral, which samples ``p(x_0 | x_{t*})`` as the grid refines) on ``t*``
    and the ``timesteps`` below it. Its output law is ``∫ p(x_0 | x_{t*}) q(x_{t*} | x_guess) dx_{t*}``:
    y enters only through the guess (e.g. ``operator.pinv(y)``) and the final paste-back."""
    if isinstance(t_star, bool) or not isinstance(t_star, (int, float)) or not 0 < t_star <= 1:
        raise ValueError(f"t_star must lie in (0, 1] (the time SDEdit noises the guess to); got {t_star!r}.")
    y, sigma_y = _setup(operator, y, x_guess, sigma_y)
    ts = check_timesteps(timesteps)
    ts = torch.cat([ts.new_tensor([float(t_star)]), ts[ts < t_star]])
    if len(ts) < 2:
        raise ValueError(f"SDEdit runs the timesteps below t_star={t_star}; none of {timesteps} is below it.")
    x = ccdf_start(denoiser.schedule, x_guess, t_star, generator)
    x = sample_ddim(denoiser, x, ts, eta=eta, generator=generator, progress=progress, callback=callback)
    return _finish(operator, x, y, sigma_y)


@torch.no_grad()
def sample_ddrm(denoiser, operator, y, x_T, timesteps, *, sigma_y=0.0, eta=0.85, eta_b=1.0, rcond=1e-10,
                generator=None, progress=False, callback=None):  # fmt: skip
    """DDRM (Kawar et al. 2022, eq. 7-8) in EDM's variables ``x / alpha = x_0 + nu eps`` and A's spectral
    coordinates ``xb = V^T x / alpha``, with ``yb = U^T y / s``, ``tau_i = sigma_y / s_i``: a step to the
    level ``nu`` from ``xb0 = V^T x0_hat``, ``eb = V^T eps_hat`` draws, per coordinate,

        s_i = 0:       xb0 + sqrt(1 - eta^2) nu eb + eta nu z
        nu < tau_i:    xb0 + sqrt(1 - eta^2) nu (yb - xb0) / tau_i + eta nu z
        nu >= tau_i:   (1 - eta_b) xb0 + eta_b yb + sqrt(nu^2 - eta_b^2 tau_i^2) z,

    from the start of eq. 7, ``yb + sqrt(nu_T^2 - tau^2) z`` where ``nu_T >= tau`` (z from ``x_T``). The
    paper's defaults: ``eta = 0.85``, ``eta_b = 1``. The paper claims no exactness, and DDRM is exact
    only in a special case: ``sigma_y = 0``, ``eta_b = 1``, ``eta = 0`` and a Gaussian prior whose
    covariance V diagonalizes (e.g. isotropic) sample the exact posterior as the grid refines (observed
    coordinates end at ``yb``, the others follow their own probability-flow ODE). Its denoiser never
    sees y, so correlated coordinates, noise, or ``eta > 0`` (which shrinks the variance at every
    step, however small) bias it; the tests measure both cases."""
    if not (0 <= eta <= 1 and 0 <= eta_b <= 1):
        raise ValueError(f"DDRM needs eta and eta_b in [0, 1]; got eta={eta}, eta_b={eta_b}.")
    y, sigma_y = _setup(operator, y, x_T, sigma_y)
    ts, sched, m = check_timesteps(timesteps), denoiser.schedule, operator.m
    s = operator.singular_values(y)
    seen = s > rcond * s.max()
    ones = torch.ones_like(s)
    s_safe = torch.where(seen, s, ones)
    tau = torch.where(seen, sigma_y / s_safe, ones * math.inf)
    tau_safe = torch.where(seen & (tau > 0), tau, ones)
    yb = operator.Ut(y) / s_safe
    a_T, sig_T = _floats(sched, ts[0])
    nu_T, z = sig_T / a_T, operator.Vt(check_start(x_T)) / sig_T
    top = yb + (nu_T**2 - tau**2).clamp(min=0).sqrt() * z[:, :m]
    start = torch.where(seen & (nu_T >= tau), top, nu_T * z[:, :m])
    x = a_T * operator.V(torch.cat([start, nu_T * z[:, m:]], dim=1))
    c = math.sqrt(1 - eta**2)

    def step(i, x):
        a, sig = _floats(sched, ts[i + 1])
        nu = sig / a
        x0, eps = denoiser.x0_eps(x, ts[i].to(x.dtype))
        xb0, eb = operator.Vt(x0), operator.Vt(eps)
        z = noise_like(xb0, generator)
        free = xb0 + c * nu * eb + eta * nu * z
        o, zo = xb0[:, :m], z[:, :m]
        below = o + c * nu * (yb - o) / tau_safe + eta * nu * zo
        above = (1 - eta_b) * o + eta_b * yb + (nu**2 - eta_b**2 * tau**2).clamp(min=0).sqrt() * zo
        obs = torch.where(seen, torch.where(nu < tau, below, above), free[:, :m])
        return a * operator.V(torch.cat([obs, free[:, m:]], dim=1))

    return _finish(operator, _loop(step, x, ts, "DDRM", progress, callback), y, sigma_y)


def dps_gradient(denoiser, operator, y, x_t, t) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0_hat, grad_{x_t} ||y - A x0_hat(x_t)||)``, one norm per sample, by autograd through the denoiser
    (Chung et al. 2023, Algorithm 1 line 7 with the non-squared norm of their code)."""
    y = operator.check_y(y, x_t.shape[0]).to(x_t)
    with torch.enable_grad():
        x_in = x_t.detach().requires_grad_(True)
        x0 = denoiser.x0(x_in, t)
        (grad,) = torch.autograd.grad((y - operator.A(x0)).norm(dim=1).sum(), x_in)
    return x0.detach(), grad


def sample_dps(denoiser, operator, y, x_T, timesteps, *, sigma_y=0.0, zeta=1.0, generator=None, progress=False,
               callback=None):  # fmt: skip
    """DPS (Chung et al. 2023, Algorithm 1): an ancestral step from ``x0_hat(x_t)`` (DDIM, eta = 1), then
    ``x_s -= zeta grad_{x_t} ||y - A x0_hat(x_t)||`` (:func:`dps_gradient`). The paper's step
    ``zeta_i = zeta' / ||y - A x0_hat||`` on the squared norm is this with ``zeta = 2 zeta'``; norms are
    per sample (their code takes one norm over the batch, which couples the samples). ``sigma_y`` only
    decides the final paste-back: DPS does not use the noise level."""
    y, sigma_y = _setup(operator, y, x_T, sigma_y)
    if not zeta >= 0:
        raise ValueError(f"zeta is a step size and must be >= 0; got {zeta}.")
    ts = check_timesteps(timesteps)

    def step(i, x):
        x0, grad = dps_gradient(denoiser, operator, y, x, ts[i].to(x.dtype))
        with torch.no_grad():
            x_s = ddim_step(
                _with_x0(denoiser.schedule, x0), x, ts[i], ts[i + 1], eta=1.0, generator=generator
            )
        return x_s - zeta * grad

    return _finish(operator, _loop(step, x_T, ts, "DPS", progress, callback), y, sigma_y)


def pigdm_x0(denoiser, operator, y, x_t, t, *, sigma_y: float, data_var: float = 1.0) -> torch.Tensor:
    """PiGDM's conditional estimate of ``x_0`` (Song et al. 2023, eq. 7-8): with
    ``p(y | x_t) ~ N(A x0_hat, r_t^2 A A^T + sigma_y^2 I)``, ``r_t^2 = d nu_t^2 / (d + nu_t^2)``
    (``nu = sigma / alpha``; ``d = data_var``, their choice for data of variance d), the score of the
    likelihood is the vector-Jacobian product

        g = (d x0_hat / d x_t)^T A^T (r_t^2 A A^T + sigma_y^2 I)^{-1} (y - A x0_hat)

    (the inverse through the SVD, ``U diag(1 / (r_t^2 s^2 + sigma_y^2)) U^T``), and Tweedie's formula with
    the conditional score gives ``x0_hat + sigma_t^2 / alpha_t g``. For a prior ``N(mu, d I)``,
    ``p(x_0 | x_t) = N(x0_hat, r_t^2 I)`` exactly, so this is ``E[x_0 | x_t, y]``."""
    sigma_y, t = _check_sigma_y(sigma_y), as_time(t)  # a Python number: float64
    y = operator.check_y(y, x_t.shape[0]).to(x_t)
    a, sig = _floats(denoiser.schedule, t.cpu().double())
    r2 = data_var * (sig / a) ** 2 / (data_var + (sig / a) ** 2)
    with torch.enable_grad():
        x_in = x_t.detach().requires_grad_(True)
        x0 = denoiser.x0(x_in, t.to(x_t.dtype))
        resid = operator.Ut(y - operator.A(x0.detach())) / (
            r2 * operator.singular_values(y) ** 2 + sigma_y**2
        )
        (g,) = torch.autograd.grad(x0, x_in, grad_outputs=operator.AT(operator.U(resid)))
    return x0.detach() + sig**2 / a * g


def sample_pigdm(denoiser, operator, y, x_T, timesteps, *, sigma_y=0.0, data_var=1.0, eta=1.0, generator=None,
                 progress=False, callback=None):  # fmt: skip
    """PiGDM (Song et al. 2023): DDIM (``eta``) from :func:`pigdm_x0`, the conditional estimate. Exact
    for a prior ``N(mu, data_var I)`` as the grid refines (its guidance is then the exact likelihood score)."""
    y, sigma_y = _setup(operator, y, x_T, sigma_y)
    if not data_var > 0:
        raise ValueError(f"data_var must be positive; got {data_var}.")
    ts, sched = check_timesteps(timesteps), denoiser.schedule

    def step(i, x):
        x0 = pigdm_x0(denoiser, operator, y, x, ts[i], sigma_y=sigma_y, data_var=data_var)
        with torch.no_grad():
            return ddim_step(_with_x0(sched, x0), x, ts[i], ts[i + 1], eta=eta, generator=generator)

    return _finish(operator, _loop(step, x_T, ts, "PiGDM", progress, callback), y, sigma_y)


METHODS = {"replacement": sample_replacement, "repaint": sample_repaint, "sdedit": sample_sdedit,
           "ddrm": sample_ddrm, "dps": sample_dps, "pigdm": sample_pigdm}  # fmt: skip
MASK_ONLY = ("replacement", "repaint")


# ------------------------------------------------------------------------------------------------
# The supervised baseline (SR3)
# ------------------------------------------------------------------------------------------------


class ObservationMLP(nn.Module):
    """SR3's conditional denoiser for vectors (Saharia et al. 2022 concatenate the upsampled low-resolution
    image to the input): ``f(x_t, t, y)`` on ``[x_t, emb(t), y] -> (Linear, SiLU) x depth -> Linear``."""

    def __init__(self, dim: int, obs_dim: int, hidden: int = 128, depth: int = 3, time_dim: int = 32):
        super().__init__()
        _check_even(time_dim)
        self.config = dict(dim=dim, obs_dim=obs_dim, hidden=hidden, depth=depth, time_dim=time_dim)
        self.dim, self.obs_dim, self.time_dim = dim, obs_dim, time_dim
        self.net = _stack(dim + time_dim + obs_dim, hidden, depth, dim)

    def forward(self, x, t, y):
        if x.ndim != 2 or x.shape[1] != self.dim or y.shape != (x.shape[0], self.obs_dim):
            raise ValueError(
                f"ObservationMLP expects x (B, {self.dim}) and y (B, {self.obs_dim}); got {tuple(x.shape)} "
                f"and {tuple(y.shape)}."
            )
        return self.net(torch.cat([x, embed_time(t, x, self.time_dim), y], dim=1))


def sr3_loss(schedule, operator: LinearOperator, *, sigma_y: float = 0.0, prediction: str = "eps"):
    """``loss(model, x0, generator)`` for :func:`dmlib.train.train`: L_simple (Ho et al. 2020, eq. 14) of
    ``model(x_t, t, y)`` on pairs ``(x0, y = A x0 + sigma_y n)`` drawn afresh from each batch of x0."""
    sigma_y, denoise_loss = _check_sigma_y(sigma_y), simple_loss(schedule, prediction=prediction)

    def loss(model, x0, generator=None):
        y = operator.A(x0) + sigma_y * noise_like(x0.new_empty(x0.shape[0], operator.m), generator)
        return denoise_loss(lambda x_t, t: model(x_t, t, y), x0, generator)

    return loss


def sr3_denoiser(model, schedule, operator: LinearOperator, y, *, batch: int, prediction: str = "eps"):
    """The trained SR3 model with ``y`` bound, as a :class:`Denoiser` for any sampler of the library."""
    y = operator.check_y(y, batch)
    return Denoiser(lambda x_t, t: model(x_t, t, y.to(x_t)), schedule, prediction=prediction)


# ------------------------------------------------------------------------------------------------
# Scores: the toy table against the exact posterior, PSNR and SSIM for images
# ------------------------------------------------------------------------------------------------


def posterior_errors(samples, posterior: GaussianMixture, reference, generator=None) -> dict:
    """A sample set against the exact posterior (``sigma_y > 0``): ``weights``, the total variation between
    the mean responsibilities of the samples under the posterior's components and its weights; ``mean``,
    ``||mean(samples) - E[x | y]||``; ``sliced_w``, the sliced W2 to ``reference`` (exact draws)."""
    one = samples.new_ones(1)
    resp = _diffused_stats(posterior, samples, one, 0 * one)["responsibilities"].mean(0)
    exact_mean = (posterior.weights.to(samples)[:, None] * posterior.means.to(samples)).sum(0)
    return {
        "weights": 0.5 * (resp - posterior.weights.to(samples)).abs().sum().item(),
        "mean": (samples.mean(0) - exact_mean).norm().item(),
        "sliced_w": sliced_wasserstein(samples, reference, generator=generator),
    }


def compare_methods(denoiser, prior, operator, y, *, sigma_y, nfe=100, n=4000, methods=tuple(METHODS),
                    options=None, generator=None) -> dict:  # fmt: skip
    """The chapter's toy table: each method's :func:`posterior_errors` at ``nfe`` network evaluations on
    uniform grids (RePaint: the longest grid whose path fits in ``nfe``; SDEdit: ``nfe`` steps below
    ``t_star``; mask-only methods skipped for other operators), and the ``"exact"`` row, two independent
    exact sample sets: the floor set by sampling noise. ``options``: e.g. ``{"dps": {"zeta": 0.5}}``."""
    if not sigma_y > 0:
        raise ValueError("the toy table needs sigma_y > 0: a noiseless posterior has singular covariances.")
    post = exact_posterior(prior, operator, y, sigma_y)
    ref = sample_exact_posterior(prior, operator, y, sigma_y, n, generator)
    again = sample_exact_posterior(prior, operator, y, sigma_y, n, generator)
    rows = {"exact": posterior_errors(again, post, ref, generator)}
    for name in methods:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}.")
        if name in MASK_ONLY and not operator.is_mask:
            continue
        kw, steps = dict((options or {}).get(name, {})), nfe
        x_T = torch.randn(n, prior.dim, generator=generator, dtype=torch.float64, device=y.device)
        if name == "repaint":
            kw = {"jump_length": 5, "resamplings": 3, **kw}
            while steps > 1 and repaint_nfe(steps, kw["jump_length"], kw["resamplings"]) > nfe:
                steps -= 1
        if name == "sdedit":
            x_T = operator.pinv(operator.check_y(y, n).to(x_T))
        t_max = kw.setdefault("t_star", 0.5) if name == "sdedit" else 1.0
        x = METHODS[name](denoiser, operator, y, x_T, time_grid(denoiser.schedule, steps, t_max=t_max),
                          sigma_y=sigma_y, generator=generator, **kw)  # fmt: skip
        rows[name] = posterior_errors(x, post, ref, generator)
    return rows


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, ``10 log10(L^2 / MSE)`` in dB (``L``: 2 for data in [-1, 1])."""
    if x.shape != ref.shape:
        raise ValueError(f"psnr needs images of equal shape; got {tuple(x.shape)} and {tuple(ref.shape)}.")
    return 10 * torch.log10(data_range**2 / (x - ref).flatten(1).pow(2).mean(1))


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0, window: int = 7, std: float = 1.5):
    """SSIM per image (Wang et al. 2004, eq. 13, with their Gaussian-weighted local statistics, sec. III-C,
    ``K1 = 0.01``, ``K2 = 0.03``), averaged over the windows that fit inside the image ('valid') and over
    channels; images ``(B, C, H, W)``. Their window is 11 x 11 with std 1.5; 8x8 digits need a smaller one."""
    if x.shape != ref.shape or x.ndim != 4:
        raise ValueError(
            f"ssim needs two (B, C, H, W) batches of one shape; got {tuple(x.shape)}, {tuple(ref.shape)}."
        )
    if window % 2 == 0 or window > min(x.shape[-2:]):
        raise ValueError(
            f"the SSIM window must be odd and fit in the image {tuple(x.shape[-2:])}; got {window}."
        )
    w = _gaussian_kernel(window, std, x).expand(x.shape[1], 1, window, window)

    def mean(z):
        return F.conv2d(z, w, groups=x.shape[1])

    mx, my = mean(x), mean(ref)
    vx, vy, cxy = mean(x * x) - mx**2, mean(ref * ref) - my**2, mean(x * ref) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)
