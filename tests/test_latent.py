"""Latent diffusion (dmlib.latent): the exact linear oracle, latent scaling, the autoencoder, errors, devices."""

import math
import time

import pytest
import torch
from test_device import StrictDevices

from dmlib import ddpm
from dmlib.data import load_digits
from dmlib.latent import (
    AutoEncoder,
    LatentDiffusion,
    PCAEncoder,
    autoencoder_loss,
    decode_samples,
    encode_dataset,
    latent_mixture,
    latent_scale,
)
from dmlib.oracle import GaussianMixture, MixtureOracle
from dmlib.schedules import Cosine
from dmlib.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

D, K = 10, 3  # ambient dimension, subspace dimension
F64 = torch.float64


def sample_labelled(mix: GaussianMixture, n: int, g: torch.Generator):
    """Samples of a (full-rank) mixture and the component each came from."""
    k = torch.multinomial(mix.weights, n, replacement=True, generator=g)
    eps = torch.randn(n, mix.dim, generator=g, dtype=F64)
    return mix.means[k] + (torch.linalg.cholesky(mix.covs)[k] @ eps[:, :, None])[..., 0], k


@pytest.fixture(scope="module")
def subspace():
    """A 3-component anisotropic mixture on a 3-dimensional affine subspace ``c + span(Q)`` of R^10.

    ``truth`` is the mixture in the coordinates ``r`` of ``x = c + Q r``; ``ambient`` the same mixture in
    R^10 (singular covariances ``Q S Q^T``); ``x`` 4000 samples with their ``labels``.
    """
    g = torch.Generator().manual_seed(0)
    means = 3.0 * torch.tensor([[1.0, 0.0, 0.0], [-0.5, 0.8, 0.3], [0.0, -0.7, -0.6]], dtype=F64)
    a = torch.randn(K, K, K, generator=g, dtype=F64) * 0.3
    covs = a @ a.transpose(1, 2) + 0.05 * torch.eye(K, dtype=F64)
    truth = GaussianMixture(means, covs, weights=[0.5, 0.3, 0.2])
    q, _ = torch.linalg.qr(torch.randn(D, K, generator=g, dtype=F64))
    c = torch.randn(D, generator=g, dtype=F64)
    ambient = GaussianMixture(c + means @ q.T, q @ covs @ q.T, weights=[0.5, 0.3, 0.2])
    r, labels = sample_labelled(truth, 4000, g)
    return {"truth": truth, "ambient": ambient, "q": q, "c": c, "x": c + r @ q.T, "labels": labels}


# ---------------------------------------------------------------------------------------------
# The linear oracle
# ---------------------------------------------------------------------------------------------


def test_pca_recovers_the_subspace(subspace):
    """PCA spans exactly the subspace: every point on it (fitted or fresh) round-trips to 1e-10, the
    projector equals Q Q^T, and a point off the subspace loses exactly its orthogonal part."""
    x, q, c = subspace["x"], subspace["q"], subspace["c"]
    pca = PCAEncoder(x, K)
    assert pca.encode(x).shape == (len(x), K)
    assert (pca.decode(pca.encode(x)) - x).abs().max() < 1e-10
    fresh = c + 5 * torch.randn(100, K, generator=torch.Generator().manual_seed(1), dtype=F64) @ q.T
    assert (pca.decode(pca.encode(fresh)) - fresh).abs().max() < 1e-10
    assert torch.allclose(pca.basis @ pca.basis.T, q @ q.T, atol=1e-10)
    assert torch.allclose(pca.basis.T @ pca.basis, torch.eye(K, dtype=F64), atol=1e-12)
    assert float(pca.explained_variance_ratio) == pytest.approx(1.0, abs=1e-12)
    off = torch.randn(D, generator=torch.Generator().manual_seed(2), dtype=F64)
    off = off - q @ (q.T @ off)  # orthogonal to the subspace
    err = pca.decode(pca.encode(fresh[:1] + off)) - fresh[:1]
    assert torch.allclose(err[0], torch.zeros(D, dtype=F64), atol=1e-10)  # projected back onto it
    assert float((pca.decode(pca.encode(fresh[:1] + off)) - (fresh[:1] + off)).norm()) > 0.1
    # images: the per-example shape is kept
    digits = load_digits()[:200]
    pca8 = PCAEncoder(digits, 8)
    assert pca8.encode(digits).shape == (200, 8) and pca8.decode(pca8.encode(digits)).shape == digits.shape


def test_latent_mixture_is_the_law_of_the_latents(subspace):
    """latent_mixture maps back onto the ambient mixture exactly (means decoded, B C B^T) and matches the
    per-component empirical mean and covariance of the encoded samples (within 5 standard errors)."""
    x, labels, ambient = subspace["x"], subspace["labels"], subspace["ambient"]
    pca, s = PCAEncoder(x, K), 0.37
    lat = latent_mixture(ambient, pca, scale=s)
    assert lat.means.shape == (3, K) and lat.covs.shape == (3, K, K)
    assert torch.equal(lat.weights, ambient.weights)
    assert (pca.decode(lat.means / s) - ambient.means).abs().max() < 1e-10
    assert (pca.basis @ (lat.covs / s**2) @ pca.basis.T - ambient.covs).abs().max() < 1e-10
    z = s * pca.encode(x)
    for j in range(3):
        zj = z[labels == j]
        n, mu, cov = len(zj), lat.means[j], lat.covs[j]
        se_mean = (torch.diagonal(cov) / n).sqrt()
        assert ((zj.mean(0) - mu).abs() / se_mean).max() < 5, j
        var = torch.diagonal(cov)
        se_cov = ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
        assert ((torch.cov(zj.T) - cov).abs() / se_cov).max() < 5, j


def _mixture_moments(mix: GaussianMixture):
    w = mix.weights
    mean = w @ mix.means
    second = (w[:, None, None] * (mix.covs + mix.means[:, :, None] * mix.means[:, None, :])).sum(0)
    return mean, second - mean[:, None] * mean[None, :]


def test_latent_diffusion_with_the_exact_latent_denoiser(subspace):
    """Encode, scale, diffuse with the exact latent denoiser (MixtureOracle on latent_mixture) and DDIM,
    decode: the samples lie on the subspace, cover every mode with the right weights, and match each
    component's and the whole mixture's mean and covariance."""
    x, truth, ambient, q, c = (subspace[k] for k in ("x", "truth", "ambient", "q", "c"))
    pca = PCAEncoder(x, K)
    ld = LatentDiffusion.fit(pca, x)
    assert ld.scale < 0.7  # far from 1: a scale applied wrongly (or not at all) shows below
    oracle = MixtureOracle(latent_mixture(ambient, pca, ld.scale), Cosine())
    n = 3000
    out = ld.sample(
        oracle.denoiser(),
        n,
        (K,),
        sampler="ddim",
        steps=100,
        generator=torch.Generator().manual_seed(3),
        dtype=F64,
    )
    assert out.shape == (n, D) and out.dtype == F64
    r = (out - c) @ q  # coordinates on the subspace
    assert (c + r @ q.T - out).abs().max() < 1e-8  # on the subspace
    # component of each sample by its largest log-density under the true components
    logp = torch.stack(
        [torch.distributions.MultivariateNormal(truth.means[j], truth.covs[j]).log_prob(r) for j in range(3)],
        1,
    )
    k = logp.argmax(1)
    share = torch.bincount(k, minlength=3).double() / n
    assert torch.allclose(share, truth.weights, atol=0.03), share
    for j in range(3):
        rj = r[k == j]
        assert (rj.mean(0) - truth.means[j]).norm() < 0.1, j
        assert (torch.cov(rj.T) - truth.covs[j]).abs().max() < 0.06, j
    mean, cov = _mixture_moments(ambient)
    assert (out.mean(0) - mean).norm() < 0.15
    assert (torch.cov(out.T) - cov).abs().max() < 0.2


# ---------------------------------------------------------------------------------------------
# Latent scaling
# ---------------------------------------------------------------------------------------------


def test_latent_scale_gives_unit_std(subspace):
    """1 / std of the fitting batch's latents: exactly unit std there, about 1 on held-out data, for the
    PCA and a (random) convolutional autoencoder; a collapsed encoder is refused."""
    x = subspace["x"]
    pca = PCAEncoder(x, K)
    s = latent_scale(pca, x, n=1024)
    assert float((s * pca.encode(x[:1024])).std()) == pytest.approx(1.0, abs=1e-10)
    assert float(encode_dataset(pca, x[1024:], s, batch_size=300).std()) == pytest.approx(1.0, abs=0.05)
    assert float(pca.encode(x).std()) > 1.5  # the raw latents are far from unit std
    digits = load_digits()
    torch.manual_seed(0)
    ae = AutoEncoder(1, 2, 8)
    ld = LatentDiffusion.fit(ae, digits[:1000], n=None)
    z = ld.encode_dataset(digits[1000:], batch_size=128)
    assert z.shape == (797, 2, 4, 4) and float(z.std()) == pytest.approx(1.0, abs=0.05)
    assert abs(math.log(ld.scale)) > 1  # an untrained encoder's latents are far from unit std

    class Constant:
        def encode(self, x):
            return torch.zeros(x.shape[0], 3)

    with pytest.raises(ValueError, match="collapsed"):
        latent_scale(Constant(), x)


# ---------------------------------------------------------------------------------------------
# The autoencoder
# ---------------------------------------------------------------------------------------------


def test_autoencoder_trains_on_digits():
    """200 steps with the library's trainer bring held-out reconstruction MSE from about the data variance
    to under a fifth of it (4x compression: 64 values to a 1x4x4 latent), below PCA with as many components."""
    digits = load_digits()
    train_x, test_x = digits[:1500], digits[1500:]
    variance = float(((test_x - train_x.mean(0)) ** 2).mean())
    torch.manual_seed(0)
    ae = AutoEncoder(1, 1, 16)
    assert ae.latent_shape((1, 8, 8)) == (1, 4, 4)
    with torch.no_grad():
        before = float(((ae.decode(ae.encode(test_x)) - test_x) ** 2).mean())
    tic = time.perf_counter()
    config = TrainConfig(steps=200, batch_size=64, lr=3e-3, ema_decay=0.0, device="cpu", progress=False)
    model = train(ae, train_x, ae.loss_fn(), config).model
    seconds = time.perf_counter() - tic
    with torch.no_grad():
        after = float(((model.decode(model.encode(test_x)) - test_x) ** 2).mean())
    pca = PCAEncoder(train_x, 16)
    pca_mse = float(((pca.decode(pca.encode(test_x.double())) - test_x) ** 2).mean())
    print(
        f"variance {variance:.4f}  before {before:.4f}  after {after:.4f}  pca16 {pca_mse:.4f}  {seconds:.1f}s"
    )
    assert before > 0.8 * variance
    assert after < 0.2 * variance
    assert after < 1.1 * pca_mse


def test_kl_variant_loss_includes_the_kl():
    """loss(kl_weight=w) - loss(0) = w * mean KL(q(z|x) || N(0, I)) / 64 on the same noise draw, with the
    KL computed independently (dmlib.ddpm.gaussian_kl); encode is the posterior mean, encode_sample draws."""
    torch.manual_seed(0)
    ae = AutoEncoder(1, 2, 8, kl_weight=50.0)
    x = load_digits()[:32]
    mean, logvar = ae.posterior(x)
    kl = ddpm.gaussian_kl(mean, logvar.exp(), torch.zeros_like(mean), 1.0).mean().detach()
    assert float(kl) > 0.1
    with torch.no_grad():
        with_kl = ae.loss_fn()(ae, x, torch.Generator().manual_seed(5))
        without = autoencoder_loss(0.0)(ae, x, torch.Generator().manual_seed(5))
    assert float(with_kl - without) == pytest.approx(50.0 * float(kl) / 64, rel=1e-4)
    assert torch.equal(ae.encode(x), mean)
    g = torch.Generator().manual_seed(6)
    a, b = ae.encode_sample(x, g), ae.encode_sample(x, g)
    assert not torch.equal(a, b) and a.shape == mean.shape
    # the KL's gradient reaches the log-variance head: its loss falls when trained on the KL alone
    opt = torch.optim.Adam(ae.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        ae(x, torch.Generator().manual_seed(7))[1].mean().backward()
        opt.step()
    with torch.no_grad():
        assert float(ae(x)[1].mean()) < 0.5 * float(kl)
    plain = AutoEncoder(1, 2, 8)
    assert plain(x)[1] is None and torch.equal(plain.encode_sample(x), plain.encode(x))
    with pytest.raises(ValueError, match="returned no KL"):
        autoencoder_loss(0.1)(plain, x)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input_is_refused(subspace):
    x = subspace["x"]
    ae = AutoEncoder(1, 2, 8)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        ae.encode(torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match=r"\(1, H, W\)"):
        ae.encode(torch.zeros(4, 3, 8, 8))
    with pytest.raises(ValueError, match="divisible by 2 \\*\\* downsample = 4"):
        AutoEncoder(1, 2, 8, downsample=2).encode(torch.zeros(4, 1, 6, 6))
    with pytest.raises(ValueError, match=r"latents of shape \(B, 2, h, w\)"):
        ae.decode(torch.zeros(4, 3, 4, 4))
    with pytest.raises(ValueError, match=r"latents of shape \(B, 2, h, w\)"):
        ae.decode(torch.zeros(4, 32))
    with pytest.raises(ValueError, match="no posterior"):
        ae.posterior(torch.zeros(4, 1, 8, 8))
    with pytest.raises(ValueError, match="kl_weight"):
        AutoEncoder(1, 2, 8, kl_weight=-1.0)
    with pytest.raises(ValueError, match="latent_channels"):
        AutoEncoder(1, 0, 8)
    with pytest.raises(ValueError, match="exceed the data dimension D=10"):
        PCAEncoder(x, 11)
    with pytest.raises(ValueError, match="more than k examples"):
        PCAEncoder(x[:3], 3)
    with pytest.raises(ValueError, match="k must be"):
        PCAEncoder(x, 0)
    pca = PCAEncoder(x, K)
    with pytest.raises(ValueError, match=r"encode expects x of shape \(B, 10\)"):
        pca.encode(x[:, :9])
    with pytest.raises(ValueError, match=r"decode expects latents of shape \(B, 3\)"):
        pca.decode(torch.zeros(5, 4, dtype=F64))
    with pytest.raises(ValueError, match="D=2 dimensions, the encoder in D=10"):
        latent_mixture(GaussianMixture([[0.0, 0.0]], stds=1.0), pca)
    with pytest.raises(TypeError, match="linear encoder"):
        latent_mixture(subspace["ambient"], ae)
    with pytest.raises(ValueError, match="scale must be a positive"):
        LatentDiffusion(pca, scale=0.0)
    with pytest.raises(ValueError, match="scale must be a positive"):
        decode_samples(pca, torch.zeros(2, K), scale=-1.0)
    with pytest.raises(TypeError, match="encode and decode"):
        LatentDiffusion(object())
    den = MixtureOracle(latent_mixture(subspace["ambient"], pca), Cosine()).denoiser()
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        LatentDiffusion(pca).sample(den, 4, (K,), sampler="nope")


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kl_weight", [0.0, 0.1])
def test_autoencoder_on_meta(kl_weight):
    """The autoencoder, its loss (and backward), and the encode / decode path create nothing on the CPU."""
    ae = AutoEncoder(1, 2, 8, kl_weight=kl_weight).to("meta")
    x = torch.zeros(4, 1, 8, 8, device="meta")
    with StrictDevices():
        z = ae.encode(x)
        zs = ae.encode_sample(x, torch.Generator().manual_seed(0))
        rec, kl = ae(x, torch.Generator().manual_seed(0))
        loss = ae.loss_fn()(ae, x, torch.Generator().manual_seed(0))
        ld = LatentDiffusion(ae, scale=0.5)
        lat = ld.encode_dataset(x, batch_size=3)
        back = ld.decode_samples(lat, batch_size=3)
    loss.backward()
    for t, shape in (
        (z, (4, 2, 4, 4)),
        (zs, (4, 2, 4, 4)),
        (rec, (4, 1, 8, 8)),
        (lat, (4, 2, 4, 4)),
        (back, (4, 1, 8, 8)),
    ):
        assert t.device.type == "meta" and t.shape == shape
    assert loss.device.type == "meta" and (kl is None) == (kl_weight == 0)
    for size, latent in ((28, 7), (32, 8)):  # Fashion-MNIST and CIFAR-10 sizes, two halvings
        big = AutoEncoder(3, 4, 8, kl_weight=kl_weight, downsample=2).to("meta")
        with StrictDevices():
            z = big.encode(torch.zeros(2, 3, size, size, device="meta"))
            assert z.shape == (2, 4, latent, latent) and big.decode(z).shape == (2, 3, size, size)


def test_pca_and_latent_sampling_on_meta(subspace):
    """PCA fit, encode / decode, the latent mixture and sampling through the oracle stay on the device."""
    ambient = subspace["ambient"].to("meta")
    x = torch.zeros(50, D, dtype=F64, device="meta")
    with StrictDevices():
        pca = PCAEncoder(x, K)
        z = pca.encode(x)
        back = pca.decode(z)
        lat = latent_mixture(ambient, pca, scale=2.0)
        den = MixtureOracle(lat, Cosine()).denoiser()
        out = LatentDiffusion(pca, 2.0).sample(den, 8, (K,), steps=4, dtype=F64, device="meta")
    for t, shape in (
        (z, (50, K)),
        (back, (50, D)),
        (lat.means, (3, K)),
        (lat.covs, (3, K, K)),
        (out, (8, D)),
    ):
        assert t.device.type == "meta" and t.shape == shape
    cpu = PCAEncoder(subspace["x"], K).to("meta")  # fitted on the CPU, moved
    with StrictDevices():
        assert cpu.decode(cpu.encode(x)).device.type == "meta"
