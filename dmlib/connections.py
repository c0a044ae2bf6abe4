"""Where VAEs, GANs and normalizing flows meet diffusion (Chapter 8), each measured on the same 2D toy.

* **VAE.** A Gaussian diffusion is a hierarchical VAE whose encoder ``q(x_{1:T} | x_0)`` is fixed and whose
  decoder is the reverse chain; its bound (Ho et al. 2020, eq. 3 and 5; :func:`dmlib.ddpm.vlb_terms`) is
  an ELBO, and with ``T -> inf`` it becomes VDM's continuous bound (Kingma et al. 2021, sec. 3-4;
  :func:`dmlib.likelihood.continuous_vlb`). Beside it, a one-latent VAE with a *learned* encoder
  (Kingma & Welling 2014): :class:`GaussianVAE`, its ELBO (their eq. 10) and the importance-weighted
  bound (Burda et al. 2016).
* **GAN.** A Gaussian reverse step is right only for small steps. The true kernel ``q(x_s | x_t)`` of a
  Gaussian mixture is itself a Gaussian mixture in closed form (:func:`reverse_kernel`), multimodal for
  a large step. The denoising diffusion GAN (Xiao et al. 2022) learns it with a conditional generator and
  a time-conditioned discriminator, regularized by R1 (Mescheder et al. 2018): :class:`DDGAN`.
* **Normalizing flows.** A RealNVP flow of affine couplings (Dinh et al. 2017) has an exact log-density by
  the change of variables: :class:`RealNVP`. The probability-flow ODE is a continuous normalizing flow
  (Chen et al. 2018): :func:`cnf_log_prob`, a link to :func:`dmlib.likelihood.ode_log_likelihood`.
* :func:`table_row`: NFE, NLL (exact or bound, labelled), sliced W and mode coverage of any sampler.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .ddpm import _posterior_coefficients, check_timesteps, posterior, q_sample, run_steps
from .latent import _count, _reparameterize, gaussian_kl_standard
from .likelihood import ODELikelihood, ode_log_likelihood
from .metrics import mode_coverage, sliced_wasserstein
from .nets.mlp import embed_time
from .oracle import GaussianMixture, _diffused_stats
from .parameterization import Denoiser, _col, noise_like
from .schedules import Schedule, as_time

LOG_2PI = math.log(2 * math.pi)


def _check_batch(x, dim: int, name: str = "x") -> torch.Tensor:
    if not torch.is_tensor(x) or x.ndim != 2 or x.shape[1] != dim:
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape (B, {dim}); got {got}.")
    return x


def _mlp(n_in: int, n_out: int, hidden: int, depth: int) -> nn.Module:
    """``(Linear, SiLU) x depth -> Linear``; ``depth = 0`` is one linear map."""
    layers, width = [], n_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, n_out))


def _log_normal_diag(x, mean, logvar) -> torch.Tensor:
    """``log N(x; mean, diag exp(logvar))`` per row."""
    return -0.5 * ((x - mean) ** 2 / logvar.exp() + logvar + LOG_2PI).sum(-1)


def _log_normal_full(x, mean, cov) -> torch.Tensor:
    """``log N(x; mean, cov)`` over the last dim, broadcasting batch dims."""
    diff = x - mean
    sol = torch.linalg.solve(cov, diff.unsqueeze(-1)).squeeze(-1)
    return -0.5 * ((diff * sol).sum(-1) + torch.linalg.slogdet(cov).logabsdet + x.shape[-1] * LOG_2PI)


# ---------------------------------------------------------------------------------------------
# VAE (Kingma & Welling 2014)
# ---------------------------------------------------------------------------------------------


class GaussianVAE(nn.Module):
    """``p(z) = N(0, I)``, decoder ``p(x | z) = N(m(z), diag v)``, encoder ``q(z | x) = N(mu(x), diag s^2(x))``.

    MLP encoder and decoder (``depth = 0``: linear maps, the linear-Gaussian VAE whose optimum is
    probabilistic PCA). The decoder variance ``v`` is one learned number per coordinate, or fixed to
    ``decoder_var``. ``model(x, generator, n_samples)`` is the per-sample ELBO (:func:`vae_elbo`), so
    the trainer's wrappers (DDP, compile) see one forward.
    """

    def __init__(self, dim=2, latent_dim=2, hidden=64, depth=2, decoder_var: float | None = None):
        super().__init__()
        self.dim, self.latent_dim = _count(dim, "dim", 1), _count(latent_dim, "latent_dim", 1)
        hidden, depth = _count(hidden, "hidden", 1), _count(depth, "depth", 0)
        self.encoder = _mlp(dim, 2 * latent_dim, hidden, depth)
        self.decoder = _mlp(latent_dim, dim, hidden, depth)
        # a fixed variance stays a Python number: a float32 buffer would round it before .double()
        self.decoder_logvar = nn.Parameter(torch.zeros(dim)) if decoder_var is None else None
        ok = isinstance(decoder_var, (int, float)) and math.isfinite(decoder_var) and decoder_var > 0
        if decoder_var is not None and not ok:
            raise ValueError(
                f"decoder_var must be a positive number, or None to learn it; got {decoder_var!r}."
            )
        self.fixed_logvar = None if decoder_var is None else math.log(decoder_var)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, log-variance)`` of ``q(z | x)``."""
        return tuple(self.encoder(_check_batch(x, self.dim)).chunk(2, dim=1))

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, log-variance)`` of ``p(x | z)``."""
        mean = self.decoder(_check_batch(z, self.latent_dim, "z"))
        if self.fixed_logvar is not None:
            return mean, torch.full_like(mean, self.fixed_logvar)
        return mean, self.decoder_logvar.expand_as(mean)

    def forward(self, x: torch.Tensor, generator=None, n_samples: int = 1) -> torch.Tensor:
        """The ELBO per sample, Kingma & Welling eq. 10: ``-KL(q(z|x) || N(0, I)) + 1/L sum_l log p(x | z_l)``,
        ``z_l = mu + s * eps_l`` (the reparameterization trick), the KL in closed form (their appendix B)."""
        mean, logvar = self.encode(x)
        rec = 0.0
        for _ in range(_count(n_samples, "n_samples", 1)):
            rec = rec + _log_normal_diag(x, *self.decode(_reparameterize(mean, logvar, generator)))
        return rec / n_samples - gaussian_kl_standard(mean, logvar)

    def sample(self, n: int, generator=None) -> torch.Tensor:
        """``x ~ p(x | z)``, ``z ~ N(0, I)`` (with the decoder noise: the density the NLL is of)."""
        p = next(self.parameters())
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=p.dtype, device=p.device)
        mean, logvar = self.decode(z)
        return mean + (0.5 * logvar).exp() * noise_like(mean, generator)


def vae_elbo(model: GaussianVAE, x: torch.Tensor, n_samples: int = 1, generator=None) -> torch.Tensor:
    """Kingma & Welling eq. 10 per sample, ``<= log p(x)``; equal iff ``q(z | x) = p(z | x)`` (the gap is
    ``KL(q(z | x) || p(z | x))``)."""
    return model(x, generator, n_samples)


def vae_loss(model: GaussianVAE, x: torch.Tensor, generator=None) -> torch.Tensor:
    """The negative ELBO (eq. 10, one sample), averaged over the batch: a loss for :func:`dmlib.train.train`."""
    return -model(x, generator).mean()


def vae_iwae(model: GaussianVAE, x: torch.Tensor, n_samples: int = 64, generator=None) -> torch.Tensor:
    """The importance-weighted bound (Burda et al. 2016, sec. 3), per sample:
    ``log 1/K sum_k p(x | z_k) p(z_k) / q(z_k | x)``, ``z_k ~ q(z | x)``. Its mean rises with K from the
    ELBO (K = 1) to ``log p(x)``; with the exact posterior every weight is ``p(x)``, so it is exact for any K."""
    mean, logvar = model.encode(x)
    log_w = []
    for _ in range(_count(n_samples, "n_samples", 1)):
        z = _reparameterize(mean, logvar, generator)
        log_prior = _log_normal_diag(z, torch.zeros_like(z), torch.zeros_like(z))
        log_w.append(_log_normal_diag(x, *model.decode(z)) + log_prior - _log_normal_diag(z, mean, logvar))
    return torch.logsumexp(torch.stack(log_w), 0) - math.log(n_samples)


# ---------------------------------------------------------------------------------------------
# The true large-step reverse kernel of a Gaussian mixture
# ---------------------------------------------------------------------------------------------


@dataclass
class KernelMixtures:
    """One Gaussian mixture per row ``b`` of ``x_t``: ``sum_k weights[b, k] N(means[b, k], covs[k])``
    (the covariances do not depend on ``x_t``). ``kernel[b]`` is row b as a :class:`GaussianMixture`."""

    weights: torch.Tensor  # (B, K)
    means: torch.Tensor  # (B, K, D)
    covs: torch.Tensor  # (K, D, D)

    def __getitem__(self, b: int) -> GaussianMixture:
        return GaussianMixture._unchecked(self.means[b], self.covs, self.weights[b])

    def sample(self, generator=None) -> torch.Tensor:
        """One draw per row, shape (B, D)."""
        B, _, D = self.means.shape
        k = torch.multinomial(self.weights, 1, generator=generator)  # (B, 1)
        mean = self.means.gather(1, k[:, :, None].expand(B, 1, D))[:, 0]
        L = torch.linalg.cholesky(self.covs)[k[:, 0]]  # (B, D, D)
        return mean + (L @ noise_like(mean, generator)[:, :, None])[:, :, 0]

    def log_prob(self, x_s: torch.Tensor) -> torch.Tensor:
        """``log q(x_s | x_t)`` of each row's point, shape (B,)."""
        log_comp = _log_normal_full(x_s[:, None, :], self.means, self.covs)
        return torch.logsumexp(torch.log(self.weights) + log_comp, dim=1)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (B, D) and covariance (B, D, D): ``sum_k w_k (C_k + m_k m_k^T) - m m^T``."""
        mean = torch.einsum("bk,bki->bi", self.weights, self.means)
        second = torch.einsum(
            "bk,bkij->bij", self.weights, self.covs + self.means[..., :, None] * self.means[..., None, :]
        )
        return mean, second - mean[:, :, None] * mean[:, None, :]


def _step_times(t, s) -> tuple[torch.Tensor, torch.Tensor]:
    """Two scalar times (one for the batch), checked on the CPU to satisfy ``0 <= s < t <= 1``."""
    t, s = as_time(t), as_time(s)
    if t.ndim or s.ndim:
        raise ValueError(
            f"t and s must be scalars (one step for the batch); got shapes {tuple(t.shape)}, {tuple(s.shape)}."
        )
    if t.device.type == "cpu" and s.device.type == "cpu" and not s < t:
        raise ValueError(f"a reverse step goes from t down to s < t; got t={float(t):g}, s={float(s):g}.")
    return t.to(torch.float64), s.to(torch.float64)


def reverse_kernel(mixture: GaussianMixture, schedule: Schedule, x_t: torch.Tensor, t, s) -> KernelMixtures:
    """The true reverse kernel ``q(x_s | x_t) = int q(x_s | x_t, x_0) q(x_0 | x_t) dx_0`` of a mixture.

    ``q(x_0 | x_t) = sum_k r_k N(m_k, P_k)`` with the oracle's responsibilities ``r_k(x_t)``,
    ``m_k = mu_k + alpha S_k C_k^{-1} (x_t - alpha mu_k)`` and ``P_k = S_k - alpha^2 S_k C_k^{-1} S_k``
    (Bishop 2006, eq. 2.116-2.117), ``C_k = alpha^2 S_k + sigma^2 I``. The posterior is linear-Gaussian in
    ``x_0``, ``q(x_s | x_t, x_0) = N(c_0 x_0 + c_t x_t, v I)`` (Ho et al. 2020, eq. 7, for any pair of
    times; :func:`dmlib.ddpm.posterior`), so

        q(x_s | x_t) = sum_k r_k(x_t) N(c_0 m_k + c_t x_t, c_0^2 P_k + v I).

    As ``s -> t``, ``v`` dominates and the mixture collapses to one Gaussian (the DDPM step); for a large
    step it keeps the data's modes (Xiao et al. 2022, sec. 3.1). ``t``, ``s``: scalars, ``s < t``.
    """
    _check_batch(x_t, mixture.dim, "x_t")
    t, s = _step_times(t, s)
    dt, dev, D = x_t.dtype, x_t.device, mixture.dim
    alpha, sigma = (v.to(dtype=dt, device=dev).reshape(1) for v in (schedule.alpha(t), schedule.sigma(t)))
    resp = _diffused_stats(mixture, x_t, alpha, sigma)["responsibilities"]  # (B, K)
    mu, S = mixture.means.to(dev, dt), mixture.covs.to(dev, dt)
    eye = torch.eye(D, dtype=dt, device=dev)
    gain = alpha * S @ torch.linalg.inv(alpha**2 * S + sigma**2 * eye)  # alpha S_k C_k^{-1}, (K, D, D)
    m = mu + torch.einsum("kij,bkj->bki", gain, x_t[:, None, :] - alpha * mu)  # (B, K, D)
    P = S - alpha * gain @ S
    P = (P + P.transpose(-1, -2)) / 2  # symmetric up to rounding; Cholesky wants it exactly
    c0, ct, v = (c.to(dtype=dt, device=dev) for c in _posterior_coefficients(schedule, t, s))
    return KernelMixtures(resp, c0 * m + ct * x_t[:, None, :], c0**2 * P + v * eye)


def kernel_gaussian_kl(kernel: KernelMixtures, n_samples: int = 256, generator=None):
    """``KL(q(x_s | x_t) || N(m, C))`` to the moment-matched Gaussian (the best Gaussian in this KL, hence
    the best a DDPM step can be) per row, by Monte Carlo: returns ``(kl, standard error)``, each (B,).
    0 for a Gaussian kernel; for a multimodal one it is the price of a Gaussian reverse step."""
    mean, cov = kernel.moments()
    vals = []
    for _ in range(_count(n_samples, "n_samples", 2)):
        x = kernel.sample(generator)
        vals.append(kernel.log_prob(x) - _log_normal_full(x, mean, cov))
    vals = torch.stack(vals)
    return vals.mean(0), vals.std(0) / math.sqrt(n_samples)


# ---------------------------------------------------------------------------------------------
# Denoising diffusion GAN (Xiao et al. 2022)
# ---------------------------------------------------------------------------------------------


class _TimeMLP(nn.Module):
    """``f(inputs, t)``: ``[inputs, emb(t)] -> MLP``."""

    def __init__(self, n_in, n_out, hidden, depth, time_dim):
        super().__init__()
        self.time_dim, self.net = time_dim, _mlp(n_in + time_dim, n_out, hidden, depth)

    def forward(self, h, t):
        return self.net(torch.cat([h, embed_time(t, h, self.time_dim)], dim=1))


class DDGAN(nn.Module):
    """A denoising diffusion GAN with ``T`` steps on the grid ``t_i = i / T`` of ``schedule``.

    Generator ``G(x_t, z, t) -> x0_hat`` (``z ~ N(0, I)``, ``latent_dim`` numbers); the reverse step is
    ``p(x_s | x_t) = int p(z) q(x_s | x_t, x_0 = G(x_t, z, t)) dz`` (Xiao et al. 2022, eq. 7): a
    posterior step from a *sampled* ``x0``, so it can be multimodal. Discriminator ``D(x_s, x_t, t)`` -> a
    logit. Train with :func:`train_ddgan` (or :func:`discriminator_loss` / :func:`generator_loss`), sample
    with :func:`sample_ddgan`.
    """

    def __init__(self, schedule: Schedule, T: int = 4, dim=2, latent_dim=2, hidden=128, depth=3, time_dim=32):
        super().__init__()
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(
                f"T must be a whole number of denoising steps >= 1 (Xiao et al. use 2-4); got {T!r}."
            )
        self.schedule, self.T = schedule, T
        self.dim, self.latent_dim = _count(dim, "dim", 1), _count(latent_dim, "latent_dim", 1)
        self.generator_net = _TimeMLP(dim + latent_dim, dim, hidden, depth, time_dim)
        self.discriminator_net = _TimeMLP(2 * dim, 1, hidden, depth, time_dim)

    @property
    def timesteps(self) -> torch.Tensor:
        """The grid it is trained and sampled on, ``1, (T-1)/T, ..., 0`` (float64)."""
        return torch.linspace(1, 0, self.T + 1, dtype=torch.float64)

    def x0(self, x_t: torch.Tensor, t, generator=None) -> torch.Tensor:
        """``G(x_t, z, t)`` with a fresh ``z ~ N(0, I)`` per sample."""
        _check_batch(x_t, self.dim, "x_t")
        z = torch.randn(len(x_t), self.latent_dim, generator=generator, dtype=x_t.dtype, device=x_t.device)
        return self.generator_net(torch.cat([x_t, z], dim=1), t)

    def logit(self, x_s: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """``D(x_s, x_t, t)``, shape (B,): large for real pairs ``(x_s, x_t) ~ q``."""
        _check_batch(x_s, self.dim, "x_s"), _check_batch(x_t, self.dim, "x_t")
        return self.discriminator_net(torch.cat([x_s, x_t], dim=1), t)[:, 0]

    def step(self, x_t: torch.Tensor, t, s, generator=None) -> torch.Tensor:
        """``x_s ~ q(x_s | x_t, x_0 = G(x_t, z, t))`` (eq. 7); ``t``, ``s`` scalars or shape (B,)."""
        mean, var = posterior(self.schedule, x_t, self.x0(x_t, t, generator), t, s)
        return mean + _col(var, x_t).sqrt() * noise_like(x_t, generator)


def _real_pairs(model: DDGAN, x0: torch.Tensor, generator=None):
    """``(x_s, x_t, t, s)`` with ``x_s ~ q(x_s | x_0)``, ``x_t ~ q(x_t | x_s)`` and a step ``i`` uniform in 1..T."""
    _check_batch(x0, model.dim, "x0")
    i = torch.randint(1, model.T + 1, (len(x0),), generator=generator, device=x0.device).to(x0.dtype)
    t, s = i / model.T, (i - 1) / model.T
    x_s = q_sample(model.schedule, x0, s, noise_like(x0, generator))
    a_ts, var_ts = model.schedule.transition(t, s)
    x_t = _col(a_ts, x0) * x_s + _col(var_ts.sqrt(), x0) * noise_like(x0, generator)
    return x_s, x_t, t, s


def r1_penalty(model: DDGAN, x_s: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
    """``||grad_{x_s} D(x_s, x_t, t)||^2`` per sample (R1, Mescheder et al. 2018, sec. 4.1, on real data),
    with the graph kept so that it trains ``D``."""
    with torch.enable_grad():
        x_s = x_s.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(model.logit(x_s, x_t, t).sum(), x_s, create_graph=True)
    return (grad**2).sum(1)


def discriminator_loss(model: DDGAN, x0: torch.Tensor, generator=None, *, r1_gamma: float = 0.05):
    """Eq. 5 in its softplus form, plus R1 on real pairs:
    ``E[softplus(-D(x_s, x_t, t))] + E[softplus(D(x_s', x_t, t))] + gamma/2 E||grad_{x_s} D||^2``, with
    ``(x_s, x_t) ~ q`` and ``x_s' ~ p(x_s | x_t)`` (eq. 7, detached: this loss trains ``D`` only)."""
    x_s, x_t, t, s = _real_pairs(model, x0, generator)
    with torch.no_grad():
        fake = model.step(x_t, t, s, generator)
    real_loss = F.softplus(-model.logit(x_s, x_t, t)).mean()
    fake_loss = F.softplus(model.logit(fake, x_t, t)).mean()
    return real_loss + fake_loss + r1_gamma / 2 * r1_penalty(model, x_s, x_t, t).mean()


def generator_loss(model: DDGAN, x0: torch.Tensor, generator=None) -> torch.Tensor:
    """The non-saturating generator loss (eq. 6 with ``-log D``): ``E[softplus(-D(x_s', x_t, t))]``,
    ``x_s' ~ p(x_s | x_t)`` differentiated through ``G`` and the posterior step (reparameterized)."""
    _, x_t, t, s = _real_pairs(model, x0, generator)
    return F.softplus(-model.logit(model.step(x_t, t, s, generator), x_t, t)).mean()


def train_ddgan(
    model: DDGAN,
    data: torch.Tensor,
    steps: int,
    *,
    batch_size=256,
    lr=(1e-3, 1e-3),
    r1_gamma=0.05,
    ema_decay=0.999,
    generator=None,
) -> tuple[torch.Tensor, DDGAN]:
    """Alternate one discriminator and one generator Adam step (betas 0.5, 0.9, as Xiao et al.) on
    minibatches of ``data``; ``lr = (generator lr, discriminator lr)``. ``r1_gamma``: 0.05 is Xiao et al.'s
    CIFAR-10 value; the 2D toy needs 10-30 for short runs to be stable. Returns the losses, (steps, 2)
    (generator, discriminator), and a copy of the model whose generator is the exponential moving average
    of the trained one (decay ``min(ema_decay, (1 + k) / (10 + k))`` at step k): GAN iterates oscillate
    about the equilibrium, their average less so; sample with it."""
    _check_batch(data, model.dim, "data")
    ema = copy.deepcopy(model).requires_grad_(False)
    opt_g = torch.optim.Adam(model.generator_net.parameters(), lr=lr[0], betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(model.discriminator_net.parameters(), lr=lr[1], betas=(0.5, 0.9))
    losses = torch.zeros(_count(steps, "steps", 0), 2)
    for k in range(steps):
        batch = data[torch.randint(0, len(data), (batch_size,), generator=generator).to(data.device)]
        d_loss = discriminator_loss(model, batch, generator, r1_gamma=r1_gamma)
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        g_loss = generator_loss(model, batch, generator)
        opt_g.zero_grad()
        g_loss.backward()  # also fills D's gradients, which the next zero_grad clears
        opt_g.step()
        with torch.no_grad():
            for avg, p in zip(ema.parameters(), model.parameters()):
                avg.lerp_(p, 1 - min(ema_decay, (1 + k) / (10 + k)))
        losses[k] = torch.stack([g_loss.detach(), d_loss.detach()]).cpu()
    return losses, ema


@torch.no_grad()
def sample_ddgan(model: DDGAN, x_T, timesteps=None, *, generator=None, progress=False, callback=None):
    """``T`` generator steps down the model's grid (``timesteps``, if given, must be that grid), with the
    library's loop and last-step rule (:func:`dmlib.ddpm.run_steps`): the last step to ``t = 0``
    returns ``alpha(0) G(x_t, z, t)``, which is the posterior step there. NFE = T."""
    grid = model.timesteps if timesteps is None else check_timesteps(timesteps).to(torch.float64)
    if grid.shape != model.timesteps.shape or not torch.allclose(grid, model.timesteps):
        raise ValueError(
            f"a DDGAN samples on the grid it was trained on, {model.timesteps.tolist()}; got {grid.tolist()}."
        )
    denoiser = Denoiser(lambda x, t: model.x0(x, t, generator), model.schedule, prediction="x0")

    def step(i, x):
        return model.step(x, grid[i].to(x.dtype), grid[i + 1].to(x.dtype), generator)

    return run_steps(step, denoiser, x_T, grid, "DDGAN sampling", progress, callback)


# ---------------------------------------------------------------------------------------------
# Normalizing flows: affine couplings (Dinh et al. 2017) and the PF-ODE as a CNF (Chen et al. 2018)
# ---------------------------------------------------------------------------------------------


class AffineCoupling(nn.Module):
    """RealNVP's affine coupling (Dinh et al. 2017, sec. 3.2-3.3): with ``x = (x_a, x_b)``,
    ``y_a = x_a``, ``y_b = x_b * exp(s(x_a)) + t(x_a)``; the Jacobian is triangular, ``log|det| = sum s``,
    and the inverse is ``x_b = (y_b - t(y_a)) * exp(-s(y_a))``. ``s = tanh(.)`` bounds each layer's scale."""

    def __init__(self, dim: int, hidden: int, depth: int):
        super().__init__()
        self.split = dim // 2
        self.net = _mlp(self.split, 2 * (dim - self.split), hidden, depth)
        nn.init.zeros_(self.net[-1].weight), nn.init.zeros_(self.net[-1].bias)  # starts as the identity

    def _scale_shift(self, x_a):
        log_scale, shift = self.net(x_a).chunk(2, dim=1)
        return torch.tanh(log_scale), shift

    def forward(self, x):
        x_a, x_b = x[:, : self.split], x[:, self.split :]
        log_scale, shift = self._scale_shift(x_a)
        return torch.cat([x_a, x_b * log_scale.exp() + shift], dim=1), log_scale.sum(1)

    def inverse(self, y):
        y_a, y_b = y[:, : self.split], y[:, self.split :]
        log_scale, shift = self._scale_shift(y_a)
        return torch.cat([y_a, (y_b - shift) * (-log_scale).exp()], dim=1)


class RealNVP(nn.Module):
    """``n_layers`` affine couplings, the coordinates reversed between them (a permutation: ``|det| = 1``),
    mapping data ``x`` to ``z ~ N(0, I)``. Exact density by the change of variables (Dinh et al., eq. 3
    of sec. 3.1): ``log p(x) = log N(f(x); 0, I) + log|det df/dx|``."""

    def __init__(self, dim=2, n_layers=8, hidden=64, depth=2):
        super().__init__()
        self.dim = _count(dim, "dim", 2)
        n_layers = _count(n_layers, "n_layers", 1)
        self.layers = nn.ModuleList(AffineCoupling(dim, hidden, depth) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, log|det dz/dx|)``."""
        z, log_det = _check_batch(x, self.dim), 0.0
        for layer in self.layers:
            z, ld = layer(z)
            z, log_det = z.flip(1), log_det + ld
        return z, log_det

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        x = _check_batch(z, self.dim, "z")
        for layer in reversed(self.layers):
            x = layer.inverse(x.flip(1))
        return x

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z, log_det = self(x)
        return -0.5 * (z**2).sum(1) - 0.5 * self.dim * LOG_2PI + log_det

    def sample(self, n: int, generator=None) -> torch.Tensor:
        p = next(self.parameters())
        return self.inverse(torch.randn(n, self.dim, generator=generator, dtype=p.dtype, device=p.device))


def flow_nll_loss(model: RealNVP, x: torch.Tensor, generator=None) -> torch.Tensor:
    """Maximum likelihood, ``-mean log p(x)`` (exact), as a loss for :func:`dmlib.train.train`."""
    return -model.log_prob(x).mean()


def cnf_log_prob(denoiser: Denoiser, x: torch.Tensor, **kwargs) -> ODELikelihood:
    """The probability-flow ODE read as a continuous normalizing flow (Chen et al. 2018, Theorem 1; Song
    et al. 2021, appendix D.2): its flow map ``Phi: x_{t_eps} -> x_1`` along ``dx/dt = f x - g^2 score / 2``
    has ``log|det dPhi/dx| = int div(drift) dt`` (Liouville), so ``log p(x) = log N(Phi(x)) + log|det dPhi/dx|``,
    the change of variables of :class:`RealNVP` with the layers' ``sum s`` replaced by an integral of the
    divergence. This *is* :func:`dmlib.likelihood.ode_log_likelihood` (``delta`` is the log-determinant);
    ``kwargs`` go to it."""
    return ode_log_likelihood(denoiser, x, **kwargs)


# ---------------------------------------------------------------------------------------------
# One table row per family
# ---------------------------------------------------------------------------------------------

NLL_KINDS = ("exact", "bound", "none")


def table_row(
    name: str,
    sample_fn: Callable,
    mixture: GaussianMixture,
    *,
    nfe: int,
    log_prob_fn: Callable | None = None,
    nll_kind: str = "none",
    n: int = 2000,
    generator=None,
) -> dict:
    """A row of Chapter 8's table for a model of the 2D toy ``mixture``: ``NFE`` to draw one sample, the
    ``NLL`` in nats on ``n`` held-out data points (``-mean log_prob_fn(x)``, labelled ``"exact"`` or
    ``"bound"`` (an upper bound on the NLL: an ELBO, IWAE or diffusion bound)), beside the data's own
    ``data NLL`` on the same points (the entropy, the floor); the ``sliced W`` of ``n`` samples
    ``sample_fn(n, generator)`` to ``n`` data points, and the ``modes`` covered of ``n_modes``
    (:func:`dmlib.metrics.mode_coverage`)."""
    if nll_kind not in NLL_KINDS:
        raise ValueError(f"nll_kind must be one of {', '.join(NLL_KINDS)}; got {nll_kind!r}.")
    if (log_prob_fn is None) != (nll_kind == "none"):
        raise ValueError("give log_prob_fn with nll_kind 'exact' or 'bound', or neither (nll_kind 'none').")
    samples = _check_batch(sample_fn(n, generator), mixture.dim, "sample_fn's output").detach().double().cpu()
    data = mixture.sample(n, generator, dtype=torch.float64)
    coverage = mode_coverage(samples, mixture)
    row = {"model": name, "NFE": nfe, "NLL": None, "NLL kind": nll_kind, "data NLL": None}
    if log_prob_fn is not None:
        test = mixture.sample(n, generator, dtype=torch.float64)
        row["NLL"] = -log_prob_fn(test).double().mean().item()
        row["data NLL"] = -mixture.log_prob(test).mean().item()
    sw = sliced_wasserstein(samples, data, generator=generator)
    return row | {"sliced W": sw, "modes": coverage["modes"], "n_modes": coverage["n_modes"]}
