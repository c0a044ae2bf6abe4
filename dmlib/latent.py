"""Latent diffusion: diffuse in the latent space of an autoencoder (Rombach et al. 2022), and its exact
linear oracle.

An encoder ``E`` maps data ``x`` to a latent ``z = E(x)``, a decoder ``D`` maps back (``D(E(x)) ~ x``).
The latents are rescaled by one number, ``z~ = s z`` with ``s = 1 / std(z)`` over a batch of training
latents (Rombach et al. 2022, appendix G: their KL-regularized first stage; their sec. 4.3.2 shows how
the latents' scale changes the signal-to-noise ratio a schedule sees), so that one schedule built for
unit-variance data suits them. Diffusion is then unchanged: ``z~_t = alpha(t) z~ + sigma(t) eps``, trained
with :func:`dmlib.ddpm.simple_loss` and :func:`dmlib.train.train` (an MLP for flat latents, the UNet for
spatial ones), sampled with any of :data:`dmlib.samplers.SAMPLERS`; a sample is ``x = D(z~_0 / s)``.

* :class:`AutoEncoder`: a small convolutional autoencoder (8x8 digits; 28x28 or 32x32 images), plain or
  KL-regularized (a VAE, Kingma & Welling 2014), with :func:`autoencoder_loss` for the trainer.
* :func:`latent_scale`, :func:`encode_dataset`, :func:`decode_samples` and :class:`LatentDiffusion`: the
  frozen autoencoder and its scale around dmlib's diffusion.
* :class:`PCAEncoder` and :func:`latent_mixture`: a *linear* autoencoder fit by SVD, for which the latent
  law of a Gaussian mixture is again a Gaussian mixture in closed form. With
  :class:`dmlib.oracle.MixtureOracle` on it, latent diffusion runs with the exact latent denoiser and
  every error left is the sampler's or the autoencoder's, not a network's.

LSGM vs latent diffusion
------------------------
Both run a score model on latents. LSGM (Vahdat, Kreis & Kautz 2021) trains encoder ``q(z_0|x)``,
decoder ``p(x|z_0)`` and the latent score model *jointly*, end to end, on a variational bound:
``-log p(x) <= E_q[-log p(x|z_0)] - H(q(z_0|x)) + CE(q(z_0|x) || p(z_0))``, where the cross-entropy
with the diffusion prior is itself a denoising score-matching integral over t (their Theorem 1). The
encoder is thus pushed towards latents the diffusion finds easy, at the cost of a three-way training
that needs care (a Normal-plus-residual score, variance-reduced sampling of t). Latent diffusion
(Rombach et al. 2022) splits the work: it trains the autoencoder first (reconstruction plus a small KL
or a VQ penalty; perceptual and adversarial terms in the paper), then freezes it and trains an
ordinary diffusion model on its (rescaled) latents. Simpler and modular (one autoencoder serves many
diffusion models) but with no bound on ``log p(x)``: the latent space is not shaped for the prior.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .likelihood import prior_std
from .oracle import GaussianMixture
from .parameterization import Denoiser
from .samplers import SAMPLERS, time_grid

# ---------------------------------------------------------------------------------------------
# A small convolutional autoencoder
# ---------------------------------------------------------------------------------------------


def _count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return value


def gaussian_kl_standard(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, diag exp(logvar)) || N(0, I)) = 1/2 sum (mean^2 + exp(logvar) - 1 - logvar)`` per
    example (Kingma & Welling 2014, appendix B), summed over every dimension but the first."""
    return 0.5 * (mean**2 + logvar.exp() - 1 - logvar).flatten(1).sum(1)


def _reparameterize(mean, logvar, generator):
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + (0.5 * logvar).exp() * eps


class AutoEncoder(nn.Module):
    """A convolutional autoencoder for ``(B, in_channels, H, W)`` images, latents ``(B, latent_channels,
    H / f, W / f)`` with ``f = 2 ** downsample``.

    Encoder: a 3x3 conv to ``base`` channels, then per halving a stride-2 4x4 conv (doubling the channels)
    and a 3x3 conv, SiLU between; a 1x1 conv to the latent. The decoder mirrors it with stride-2 4x4
    transposed convs. H and W must be divisible by ``f`` (8x8 digits with ``downsample=1`` give 4x4
    latents; 28x28 and 32x32 images take ``downsample=2``).

    ``kl_weight > 0`` makes it KL-regularized (the "KL-reg" first stage of Rombach et al. 2022): the
    encoder outputs a mean and a log-variance, :meth:`posterior`; :meth:`encode` returns the mean (the
    deterministic latent), :meth:`encode_sample` a reparameterized draw ``mean + exp(logvar / 2) eps``
    (Kingma & Welling 2014, sec. 2.4). ``kl_weight`` is the weight :meth:`loss_fn` puts on the KL.
    """

    def __init__(
        self,
        in_channels: int = 1,
        latent_channels: int = 2,
        base: int = 32,
        kl_weight: float = 0.0,
        *,
        downsample: int = 1,
    ):
        super().__init__()
        for name, value, low in (
            ("in_channels", in_channels, 1),
            ("latent_channels", latent_channels, 1),
            ("base", base, 1),
            ("downsample", downsample, 0),
        ):
            _count(value, name, low)
        if not (isinstance(kl_weight, (int, float)) and math.isfinite(kl_weight) and kl_weight >= 0):
            raise ValueError(
                f"kl_weight must be a finite number >= 0 (0: a plain autoencoder); got {kl_weight!r}."
            )
        self.in_channels, self.latent_channels, self.downsample = in_channels, latent_channels, downsample
        self.kl_weight, self.variational = float(kl_weight), kl_weight > 0
        self.factor = 2**downsample
        self.config = dict(
            in_channels=in_channels,
            latent_channels=latent_channels,
            base=base,
            kl_weight=float(kl_weight),
            downsample=downsample,
        )
        enc, c = [nn.Conv2d(in_channels, base, 3, padding=1)], base
        for _ in range(downsample):
            enc += [nn.SiLU(), nn.Conv2d(c, 2 * c, 4, stride=2, padding=1)]  # halves H and W
            enc += [nn.SiLU(), nn.Conv2d(2 * c, 2 * c, 3, padding=1)]
            c *= 2
        enc += [nn.SiLU(), nn.Conv2d(c, latent_channels * (2 if self.variational else 1), 1)]
        dec = [nn.Conv2d(latent_channels, c, 3, padding=1)]
        for _ in range(downsample):
            dec += [nn.SiLU(), nn.Conv2d(c, c, 3, padding=1)]
            dec += [nn.SiLU(), nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1)]  # doubles H and W
            c //= 2
        dec += [nn.SiLU(), nn.Conv2d(c, in_channels, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def latent_shape(self, image_shape) -> tuple[int, int, int]:
        """``(latent_channels, H / f, W / f)`` for images of shape ``(in_channels, H, W)``."""
        image_shape = tuple(image_shape)
        if len(image_shape) != 3 or image_shape[0] != self.in_channels:
            raise ValueError(f"images must have shape ({self.in_channels}, H, W); got {image_shape}.")
        _, h, w = image_shape
        if h % self.factor or w % self.factor:
            raise ValueError(
                f"H and W must be divisible by 2 ** downsample = {self.factor}; got {h}x{w}. Pad the images "
                f"(dmlib.data.pad_images) or lower downsample."
            )
        return (self.latent_channels, h // self.factor, w // self.factor)

    def _check_images(self, x: torch.Tensor):
        if not torch.is_tensor(x) or x.ndim != 4:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"AutoEncoder expects images of shape (B, {self.in_channels}, H, W); got {got}.")
        self.latent_shape(x.shape[1:])

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, logvar)`` of ``q(z | x)``, each ``(B, latent_channels, H / f, W / f)`` (KL variant only).
        The log-variance is clamped to [-30, 20] as in Rombach et al.'s code, so ``exp`` stays finite."""
        if not self.variational:
            raise ValueError("a plain autoencoder (kl_weight=0) has no posterior; use encode(x).")
        self._check_images(x)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic latent: ``E(x)``, or the posterior mean of the KL variant."""
        if self.variational:
            return self.posterior(x)[0]
        self._check_images(x)
        return self.encoder(x)

    def encode_sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw ``z = mean + exp(logvar / 2) eps`` from ``q(z | x)`` (reparameterization); for the plain
        autoencoder, ``encode(x)``."""
        if not self.variational:
            return self.encode(x)
        return _reparameterize(*self.posterior(x), generator)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``D(z)``: latents ``(B, latent_channels, h, w)`` to images ``(B, in_channels, f h, f w)``."""
        if not torch.is_tensor(z) or z.ndim != 4 or z.shape[1] != self.latent_channels:
            got = tuple(z.shape) if torch.is_tensor(z) else type(z).__name__
            raise ValueError(
                f"decode expects latents of shape (B, {self.latent_channels}, h, w); got {got}. (Flat latents "
                f"from an MLP need reshaping to the latent shape, AutoEncoder.latent_shape.)"
            )
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """``(reconstruction, kl)``: the decoded (sampled, for the KL variant) latent and the per-example
        ``KL(q(z | x) || N(0, I))`` (None for the plain autoencoder)."""
        if not self.variational:
            return self.decode(self.encode(x)), None
        mean, logvar = self.posterior(x)
        return self.decode(_reparameterize(mean, logvar, generator)), gaussian_kl_standard(mean, logvar)

    def loss_fn(self):
        """The training loss with this autoencoder's ``kl_weight``: :func:`autoencoder_loss`."""
        return autoencoder_loss(self.kl_weight)


def autoencoder_loss(kl_weight: float = 0.0):
    """``loss(model, x, generator=None)`` for :func:`dmlib.train.train`:
    ``mean((x - D(z))^2) + kl_weight * E_x[KL(q(z | x) || N(0, I))] / d``, ``d`` the number of values of one
    example, ``z ~ q(z | x)``. That is ``(1/d)`` times the negative beta-VAE bound (Higgins et al. 2017) with a
    Gaussian decoder of variance 1/2, up to a constant; ``kl_weight`` is beta. ``model(x, generator)`` must
    return ``(reconstruction, kl)`` as :meth:`AutoEncoder.forward` does.
    """
    if not (isinstance(kl_weight, (int, float)) and math.isfinite(kl_weight) and kl_weight >= 0):
        raise ValueError(f"kl_weight must be a finite number >= 0; got {kl_weight!r}.")

    def loss(model, x: torch.Tensor, generator=None) -> torch.Tensor:
        x_hat, kl = model(x, generator)
        rec = torch.mean((x_hat - x) ** 2)
        if kl_weight == 0:
            return rec
        if kl is None:
            raise ValueError(
                f"kl_weight={kl_weight} but the model returned no KL: a plain autoencoder. Build it with "
                f"AutoEncoder(..., kl_weight={kl_weight}) to get the KL-regularized variant."
            )
        return rec + kl_weight * kl.mean() / x[0].numel()

    return loss


# ---------------------------------------------------------------------------------------------
# Scaling, encoding a data set, decoding samples
# ---------------------------------------------------------------------------------------------


def _batch_size(batch_size) -> int:
    return _count(batch_size, "batch_size", 1)


@torch.no_grad()
def encode_dataset(encoder, data: torch.Tensor, scale: float = 1.0, batch_size: int = 512) -> torch.Tensor:
    """``scale * encoder.encode(x)`` for every row of ``data``, in batches, without gradients: the frozen
    first stage's (deterministic) latents, ready for :func:`dmlib.train.train`."""
    if not torch.is_tensor(data) or data.ndim < 2 or data.shape[0] == 0:
        got = tuple(data.shape) if torch.is_tensor(data) else type(data).__name__
        raise ValueError(f"data must be a tensor of examples, shape (N, ...) with N >= 1; got {got}.")
    bs = _batch_size(batch_size)
    return scale * torch.cat([encoder.encode(data[i : i + bs]) for i in range(0, data.shape[0], bs)])


@torch.no_grad()
def decode_samples(decoder, z: torch.Tensor, scale: float = 1.0, batch_size: int = 512) -> torch.Tensor:
    """``decoder.decode(z / scale)`` in batches, without gradients: generated (scaled) latents to data."""
    if not torch.is_tensor(z) or z.ndim < 2 or z.shape[0] == 0:
        got = tuple(z.shape) if torch.is_tensor(z) else type(z).__name__
        raise ValueError(f"z must be a tensor of latents, shape (B, ...) with B >= 1; got {got}.")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number; got {scale!r}.")
    bs = _batch_size(batch_size)
    return torch.cat([decoder.decode(z[i : i + bs] / scale) for i in range(0, z.shape[0], bs)])


def latent_scale(encoder, data: torch.Tensor, n: int | None = 1024, batch_size: int = 512) -> float:
    """Rombach et al.'s (2022, appendix G) scale factor ``1 / std(z)``, the standard deviation of every value
    of the latents ``z = encoder.encode(x)`` of the first ``n`` examples (all if ``None``): one number, so
    ``scale * z`` has unit variance and the schedule's signal-to-noise ratios mean what they say. Reads
    that number back to Python (a device sync)."""
    if n is not None:
        data = data[: _count(n, "n", 2)]
    z = encode_dataset(encoder, data, 1.0, batch_size)
    if z.numel() < 2:
        raise ValueError(
            f"need at least two latent values to estimate a standard deviation; got {z.numel()}."
        )
    std = float(z.double().std())
    if not (math.isfinite(std) and std > 0):
        raise ValueError(
            f"the latents' standard deviation is {std}: a collapsed (constant) or broken encoder."
        )
    return 1.0 / std


class LatentDiffusion:
    """A frozen autoencoder and its latent scale around dmlib's diffusion (Rombach et al. 2022).

    ``autoencoder`` has ``encode`` and ``decode`` (:class:`AutoEncoder`, :class:`PCAEncoder`); ``scale``
    multiplies the latents (:meth:`fit` computes it with :func:`latent_scale`). Train a diffusion model on
    ``encode_dataset(data)`` with the library's trainer, then ``decode_samples`` its samples, or call
    :meth:`sample` with a :class:`~dmlib.parameterization.Denoiser` on the latents.
    """

    def __init__(self, autoencoder, scale: float = 1.0):
        if not (hasattr(autoencoder, "encode") and hasattr(autoencoder, "decode")):
            raise TypeError(f"autoencoder needs encode and decode methods; got {type(autoencoder).__name__}.")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive number; got {scale!r}.")
        self.autoencoder, self.scale = autoencoder, float(scale)

    @classmethod
    def fit(cls, autoencoder, data: torch.Tensor, n: int | None = 1024) -> LatentDiffusion:
        """The wrapper with ``scale = latent_scale(autoencoder, data, n)``."""
        return cls(autoencoder, latent_scale(autoencoder, data, n))

    def encode_dataset(self, data: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Scaled latents of every example: the diffusion model's training data."""
        return encode_dataset(self.autoencoder, data, self.scale, batch_size)

    def decode_samples(self, z: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Generated scaled latents back to data: ``decode(z / scale)``."""
        return decode_samples(self.autoencoder, z, self.scale, batch_size)

    def sample(
        self,
        denoiser: Denoiser,
        n: int,
        latent_shape,
        *,
        sampler: str = "ddim",
        steps: int = 50,
        generator: torch.Generator | None = None,
        dtype=torch.float32,
        device=None,
    ) -> torch.Tensor:
        """``n`` data samples: ``x_T ~ N(0, s_T^2 I)`` of shape ``(n, *latent_shape)`` (``s_T`` from
        :func:`dmlib.likelihood.prior_std`), ``steps`` steps of ``SAMPLERS[sampler]`` on its paper's time
        grid, then :meth:`decode_samples`."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
        spec, schedule = SAMPLERS[sampler], denoiser.schedule
        shape = (_count(n, "n", 1), *tuple(latent_shape))
        x_T = prior_std(schedule) * torch.randn(shape, generator=generator, dtype=dtype, device=device)
        ts = time_grid(schedule, steps, spec.grid)
        z = spec.fn(denoiser, x_T, ts, generator=generator, **spec.options)
        return self.decode_samples(z)


# ---------------------------------------------------------------------------------------------
# The linear oracle: PCA, and the exact latent law of a Gaussian mixture
# ---------------------------------------------------------------------------------------------


class PCAEncoder:
    """A linear autoencoder fit by SVD (principal component analysis; Pearson 1901, Hotelling 1933).

    With ``m`` the mean of the rows of ``data`` (flattened to ``(N, D)``) and ``X - m = U S V^T`` the thin
    SVD, the basis ``B = V[:, :k]`` (``(D, k)``, orthonormal columns) spans the top ``k`` principal
    directions and

        encode(x) = B^T (x - m),        decode(z) = m + B z.

    ``decode(encode(x)) = x`` exactly for ``x`` on the affine subspace ``m + span(B)``, and PCA's
    reconstruction error is the least of any rank-``k`` linear map (Eckart & Young 1936). Fit in
    ``dtype`` (float64 by default); :meth:`encode` and :meth:`decode` compute in their input's dtype.
    """

    def __init__(self, data: torch.Tensor, k: int, dtype=torch.float64):
        if not torch.is_tensor(data) or data.ndim < 2:
            got = tuple(data.shape) if torch.is_tensor(data) else type(data).__name__
            raise ValueError(f"data must be a tensor of examples, shape (N, ...) ; got {got}.")
        n, d = data.shape[0], data[0].numel()
        k = _count(k, "k", 1)
        if k > d:
            raise ValueError(f"k={k} components exceed the data dimension D={d}.")
        if k >= n:
            raise ValueError(
                f"k={k} components need more than k examples to fit (N={n}): centred data has rank <= N - 1."
            )
        x = data.reshape(n, d).to(dtype)
        self.shape, self.k = tuple(data.shape[1:]), k
        self.mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - self.mean, full_matrices=False)
        self.basis = vh[:k].T.contiguous()  # (D, k)
        self.singular_values = s[:k]
        # share of the total variance the k components keep (a tensor: reading it would sync)
        self.explained_variance_ratio = (s[:k] ** 2).sum() / (s**2).sum()

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    def to(self, device=None, dtype=None) -> PCAEncoder:
        """This encoder with its tensors on ``device`` and/or in ``dtype`` (a new object)."""
        new = object.__new__(PCAEncoder)
        new.__dict__.update(self.__dict__)
        for name in ("mean", "basis", "singular_values", "explained_variance_ratio"):
            setattr(new, name, getattr(self, name).to(device=device, dtype=dtype))
        return new

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``B^T (x - m)``: ``(B, *shape)`` to ``(B, k)``."""
        if not torch.is_tensor(x) or x.ndim < 1 or tuple(x.shape[1:]) != self.shape:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"encode expects x of shape (B, {', '.join(map(str, self.shape))}); got {got}.")
        flat = x.reshape(x.shape[0], -1)
        return (flat - self.mean.to(flat)) @ self.basis.to(flat)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``m + B z``: ``(B, k)`` to ``(B, *shape)``."""
        if not torch.is_tensor(z) or z.ndim != 2 or z.shape[1] != self.k:
            got = tuple(z.shape) if torch.is_tensor(z) else type(z).__name__
            raise ValueError(f"decode expects latents of shape (B, {self.k}); got {got}.")
        return (self.mean.to(z) + z @ self.basis.to(z).T).reshape(z.shape[0], *self.shape)


def latent_mixture(mixture: GaussianMixture, encoder: PCAEncoder, scale: float = 1.0) -> GaussianMixture:
    """The exact law of ``scale * encoder.encode(x)`` for ``x ~ mixture``: a linear map of a Gaussian is
    Gaussian, so with ``z = s B^T (x - m)``

        means_k = s B^T (mu_k - m),        covs_k = s^2 B^T C_k B,        weights unchanged.

    This holds for any mixture; when the mixture lies on the subspace (every ``mu_k - m`` and every column
    of ``C_k`` in ``span(B)``), decoding loses nothing and ``decode(z / s)`` is exactly ``x ~ mixture``, so
    latent diffusion with ``MixtureOracle(latent_mixture(...), schedule)`` is exact up to the sampler.
    (Ambient covariances of a mixture on a subspace are singular: build such a mixture for this function,
    not for sampling, and draw its samples as ``decode`` of latent samples.)
    """
    if not isinstance(encoder, PCAEncoder):
        raise TypeError(
            f"latent_mixture needs a linear encoder (PCAEncoder); got {type(encoder).__name__}: the latent "
            f"law of a mixture under a nonlinear encoder has no closed form."
        )
    if mixture.dim != encoder.dim:
        raise ValueError(f"the mixture lives in D={mixture.dim} dimensions, the encoder in D={encoder.dim}.")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number; got {scale!r}.")
    b = encoder.basis.to(device=mixture.means.device, dtype=mixture.means.dtype)
    m = encoder.mean.to(b)
    means = scale * (mixture.means - m) @ b
    covs = scale**2 * (b.T @ mixture.covs @ b)
    return GaussianMixture._unchecked(means, covs, mixture.weights)
