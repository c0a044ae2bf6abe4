"""Inverse problems (dmlib.inverse): operators, the exact posterior, each method against it, scores, devices."""

import math

import pytest
import torch
from moments import assert_moments
from test_device import StrictDevices

from dmlib import inverse as I
from dmlib.oracle import GaussianMixture, MixtureOracle
from dmlib.parameterization import Denoiser
from dmlib.samplers import time_grid
from dmlib.schedules import Linear
from dmlib.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
D = torch.float64
SCHED = Linear()
N = 4000  # samples in the statistical tests: the standard errors below are for this many


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def operators():
    return [
        I.mask(torch.tensor([[True, False, True], [False, False, True]])),
        I.downsample((2, 4, 4), 2),
        I.colorize((3, 2, 2)),
        I.blur((1, 8, 8), std=1.0, size=5),
        I.random_projection((3,), 2, gen(1)),
    ]


def gaussian(mean, cov):
    return GaussianMixture(torch.tensor([mean], dtype=D), torch.tensor([cov], dtype=D))


def moments(post: GaussianMixture):
    """Mean and covariance of a mixture (the law of total covariance)."""
    w, mu = post.weights, post.means
    m = (w[:, None] * mu).sum(0)
    d = mu - m
    return m, (w[:, None, None] * (post.covs + d[:, :, None] * d[:, None, :])).sum(0)


# ------------------------------------------------------------------------------------------------
# Operators
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", operators(), ids=lambda op: op.name)
def test_adjoint_svd_and_pinv(op):
    """<Ax, y> = <x, A^T y>; U diag(s) V^T rebuilds A with V orthogonal; Vt inverts V; A^+ is numpy's
    pseudo-inverse. Catches a wrong adjoint, a scrambled permutation or a wrong singular value."""
    x = torch.randn(5, *op.x_shape, generator=gen(), dtype=D)
    y = torch.randn(5, op.m, generator=gen(1), dtype=D)
    assert abs((op.A(x) * y).sum() - (x * op.AT(y)).sum()) < 1e-12
    M, n = op.matrix(), op.n
    V = op.V(torch.eye(n, dtype=D)).reshape(n, n).T  # columns: V e_j
    U = op.U(torch.eye(op.m, dtype=D)).T
    S = torch.cat([torch.diag(op.singular_values(M)), torch.zeros(op.m, n - op.m, dtype=D)], dim=1)
    assert torch.allclose(U @ S @ V.T, M, atol=1e-12, rtol=0)
    assert torch.allclose(V.T @ V, torch.eye(n, dtype=D), atol=1e-12, rtol=0)
    assert torch.allclose(U.T @ U, torch.eye(op.m, dtype=D), atol=1e-12, rtol=0)
    assert torch.allclose(op.Vt(op.V(x.reshape(5, -1))), x.reshape(5, -1), atol=1e-12, rtol=0)
    pinv = torch.linalg.pinv(M)
    assert torch.allclose(op.pinv(y).reshape(5, -1), y @ pinv.T, atol=1e-9 * pinv.abs().max(), rtol=0)
    assert torch.allclose(op.A(op.project(x, y)), y, atol=1e-9, rtol=0)  # the projection lands on Ax = y


def test_operators_by_hand():
    """Hand values: a mask copies, 2x2 block means, the mean of 3 channels; the blur kernel sums to 1 inside
    the image. Catches a wrong block layout or channel order."""
    x = torch.arange(16, dtype=D).reshape(1, 1, 4, 4)
    assert I.downsample((1, 4, 4), 2).A(x).tolist() == [[2.5, 4.5, 10.5, 12.5]]
    rgb = torch.stack([torch.full((2, 2), c, dtype=D) for c in (0.0, 3.0, 6.0)])[None]
    assert I.colorize((3, 2, 2)).A(rgb).tolist() == [[3.0, 3.0, 3.0, 3.0]]
    m = I.mask(torch.tensor([False, True, True]))
    assert m.A(torch.tensor([[1.0, 2.0, 3.0]], dtype=D)).tolist() == [[2.0, 3.0]]
    centre = I.blur((1, 8, 8), std=1.0, size=5).matrix()[3 * 8 + 3]  # row of an interior pixel
    assert abs(centre.sum() - 1) < 1e-12 and abs(centre[3 * 8 + 3] - centre.max()) == 0


# ------------------------------------------------------------------------------------------------
# The exact posterior
# ------------------------------------------------------------------------------------------------


def test_exact_posterior_is_bayes_on_a_grid(mixture):
    """p(x|y) ∝ p(x) N(y; Ax, sigma^2) on a 2D grid (h = 0.02) and in 1D matches the closed-form mixture
    to 1e-9 of the peak. Catches wrong weights (e.g. N(y; A m, sigma^2) without A C A^T) or gains."""
    prior = mixture.to(dtype=D)
    op, y, sigma_y = I.random_projection((2,), 1, gen(3)), torch.tensor([0.3], dtype=D), 0.3
    h = 0.02
    u = torch.arange(-6, 6, h, dtype=D)
    pts = torch.cartesian_prod(u, u)
    log_joint = prior.log_prob(pts) - 0.5 * ((y - op.A(pts))[:, 0] / sigma_y) ** 2
    grid = torch.softmax(log_joint, 0) / h**2
    exact = I.exact_posterior(prior, op, y, sigma_y).log_prob(pts).exp()
    assert (grid - exact).abs().max() < 1e-9 * exact.max()
    # 1D: y = 2 x + noise, a two-component prior
    prior1 = GaussianMixture([[-1.0], [1.5]], stds=[0.5, 0.8], weights=[0.3, 0.7], dtype=D)
    op1 = I.Dense("scale", (1,), torch.tensor([[2.0]], dtype=D))
    u1 = torch.arange(-8, 8, 1e-3, dtype=D)[:, None]
    log_joint = prior1.log_prob(u1) - 0.5 * ((0.7 - 2 * u1[:, 0]) / 0.4) ** 2
    exact = I.exact_posterior(prior1, op1, torch.tensor([0.7], dtype=D), 0.4).log_prob(u1).exp()
    assert (torch.softmax(log_joint, 0) / 1e-3 - exact).abs().max() < 1e-9 * exact.max()


def test_exact_posterior_samples_noisy_and_noiseless(mixture):
    """Matheron's-rule samples have the exact mixture's moments (within SE); with sigma_y = 0 they satisfy
    A x = y to 1e-12 and the posterior is the limit sigma_y -> 0. Catches a wrong gain in the sampler."""
    prior, op, y = mixture.to(dtype=D), I.random_projection((2,), 1, gen(3)), torch.tensor([0.3], dtype=D)
    for sigma_y in (0.3, 0.0):
        x = I.sample_exact_posterior(prior, op, y, sigma_y, 20_000, gen(4))
        mean, cov = moments(I.exact_posterior(prior, op, y, sigma_y))
        if sigma_y == 0:  # the covariance is singular: compare along the free direction only
            assert (op.A(x) - y).abs().max() < 1e-12
            free = op.V(torch.tensor([[0.0, 1.0]], dtype=D))[0]
            x, mean, cov = x @ free[:, None], mean @ free[None].T, (free @ cov @ free).reshape(1, 1)
        assert_moments(x, mean, cov)
    limit, zero = I.exact_posterior(prior, op, y, 1e-7), I.exact_posterior(prior, op, y, 0.0)
    assert torch.allclose(limit.weights, zero.weights, atol=1e-10) and torch.allclose(limit.means, zero.means)


# ------------------------------------------------------------------------------------------------
# Methods against the exact posterior
# ------------------------------------------------------------------------------------------------


def test_pigdm_x0_is_the_exact_conditional_mean():
    """For a prior N(mu, d I) PiGDM's guided estimate is E[x_0 | x_t, y] (Gaussian conditional with
    precision S^-1 + alpha^2 / sigma^2 I + A^T A / sigma_y^2) to 1e-12 at every t; for an anisotropic
    prior it is not (error > 1e-3). Catches a wrong r_t, a missing sigma^2 / alpha or a sign."""
    op, y, sigma_y = I.random_projection((2,), 1, gen(3)), torch.tensor([0.4], dtype=D), 0.3
    A = op.matrix()
    x_t = torch.randn(6, 2, generator=gen(), dtype=D)
    for cov, err in (([[0.49, 0.0], [0.0, 0.49]], "exact"), ([[0.5, 0.35], [0.35, 0.5]], "biased")):
        prior = gaussian([1.0, -0.5], cov)
        S, mu = prior.covs[0], prior.means[0]
        for t in (0.9, 0.5, 0.1):
            a, s = (float(f(torch.tensor(t, dtype=D))) for f in (SCHED.alpha, SCHED.sigma))
            prec = torch.linalg.inv(S) + a**2 / s**2 * torch.eye(2, dtype=D) + A.T @ A / sigma_y**2
            rhs = torch.linalg.solve(S, mu) + a / s**2 * x_t + (A.T @ y) / sigma_y**2
            exact = torch.linalg.solve(prec, rhs.T).T
            den = MixtureOracle(prior, SCHED).denoiser()
            guided = I.pigdm_x0(den, op, y, x_t, t, sigma_y=sigma_y, data_var=0.49)
            gap = (guided - exact).abs().max()
            assert gap < 1e-12 if err == "exact" else gap > 1e-3


def test_pigdm_samples_exact_gaussian_posterior():
    """PiGDM's samples (DDIM eta = 0, 800 log-SNR steps) for N(mu, 0.49 I) match the exact posterior's
    mean and covariance within 4.5 SE (n = 4000; the grid's own bias is ~0.5% of the variance, 0.2 SE)."""
    prior, op, y = (
        gaussian([1.0, -0.5], [[0.49, 0.0], [0.0, 0.49]]),
        I.random_projection((2,), 1, gen(3)),
        0.4,
    )
    y = torch.tensor([y], dtype=D)
    den = MixtureOracle(prior, SCHED).denoiser()
    x_T = torch.randn(N, 2, generator=gen(5), dtype=D)
    ts = time_grid(SCHED, 800, "logsnr")
    x = I.sample_pigdm(den, op, y, x_T, ts, sigma_y=0.3, data_var=0.49, eta=0.0, generator=gen(6))
    assert_moments(x, *moments(I.exact_posterior(prior, op, y, 0.3)))


def test_ddrm_exact_in_its_special_case_and_biased_outside():
    """DDRM with sigma_y = 0, eta = 0, eta_b = 1 on a prior that V diagonalizes (a mask with an axis-aligned
    Gaussian; a projection with an isotropic one) gives the exact posterior: observed coordinates
    exactly, the rest within 4.5 SE (800 steps). With a correlated prior the unobserved mean is off by
    > 10 SE, and with eta = 0.85 the free variance shrinks by > 10 SE: the exactness test can fail."""
    y = torch.tensor([0.4], dtype=D)
    cases = [
        (I.mask(torch.tensor([True, False])), gaussian([1.0, -0.5], [[0.3, 0.0], [0.0, 0.8]])),
        (I.random_projection((2,), 1, gen(3)), gaussian([1.0, -0.5], [[0.49, 0.0], [0.0, 0.49]])),
    ]
    for op, prior in cases:
        den = MixtureOracle(prior, SCHED).denoiser()
        x_T = torch.randn(N, 2, generator=gen(7), dtype=D)
        x = I.sample_ddrm(den, op, y, x_T, time_grid(SCHED, 800), eta=0.0, eta_b=1.0, generator=gen(8))
        assert (op.A(x) - y).abs().max() < 1e-12
        mean, cov = moments(I.exact_posterior(prior, op, y, 0.0))
        free = op.V(torch.tensor([[0.0, 1.0]], dtype=D))[0]
        assert_moments(x @ free[:, None], (mean @ free)[None], (free @ cov @ free).reshape(1, 1))
        if op.is_mask:  # the same DDRM on a correlated prior
            corr = gaussian([1.0, -0.5], [[0.5, 0.35], [0.35, 0.5]])
            den = MixtureOracle(corr, SCHED).denoiser()
            x = I.sample_ddrm(den, op, y, x_T, time_grid(SCHED, 200), eta=0.0, eta_b=1.0, generator=gen(8))
            mean, cov = moments(I.exact_posterior(corr, op, y, 0.0))
            assert (x[:, 1].mean() - mean[1]).abs() > 10 * (cov[1, 1] / N).sqrt()
        else:  # eta = 0.85 (the paper's default) on the isotropic prior
            x = I.sample_ddrm(den, op, y, x_T, time_grid(SCHED, 200), eta=0.85, eta_b=1.0, generator=gen(8))
            var = (x @ free).var()
            assert (free @ cov @ free) - var > 10 * (free @ cov @ free) * math.sqrt(2 / N)


def test_sdedit_output_law():
    """SDEdit from a point guess on N(mu, S) has the law of ∫ p(x0|x_t*) q(x_t*|guess): mean
    mu + a^2 S C^-1 (g - mu), covariance S - a^2 S C^-1 S + a^2 s^2 S C^-2 S with C = a^2 S + s^2 I
    (within 4.5 SE; 800 ancestral steps below t* = 0.5). Catches noising to the wrong level."""
    prior = gaussian([1.0, -0.5], [[0.5, 0.35], [0.35, 0.5]])
    S, mu, g = prior.covs[0], prior.means[0], torch.tensor([0.2, 0.9], dtype=D)
    a, s = (f(torch.tensor(0.5, dtype=D)) for f in (SCHED.alpha, SCHED.sigma))
    Ci = torch.linalg.inv(a**2 * S + s**2 * torch.eye(2, dtype=D))
    mean, cov = mu + a**2 * S @ Ci @ (g - mu), S - a**2 * S @ Ci @ S + a**2 * s**2 * S @ Ci @ Ci @ S
    den = MixtureOracle(prior, SCHED).denoiser()
    op = I.mask(torch.tensor([True, False]))
    ts = time_grid(SCHED, 800, t_max=0.5)
    x = I.sample_sdedit(den, op, torch.zeros(1, dtype=D), g.expand(N, 2), ts, t_star=0.5, sigma_y=0.1,
                        generator=gen(9))  # fmt: skip
    assert_moments(x, mean, cov)


def test_dps_gradient_matches_finite_differences(mixture):
    """DPS's autograd gradient of sum_b ||y - A x0_hat(x_t)_b|| equals central differences (1e-7)."""
    den, op = MixtureOracle(mixture.to(dtype=D), SCHED).denoiser(), I.random_projection((2,), 1, gen(3))
    x_t, y = torch.randn(3, 2, generator=gen(), dtype=D), torch.tensor([0.3], dtype=D)
    _, grad = I.dps_gradient(den, op, y, x_t, torch.tensor(0.4, dtype=D))

    def f(x):
        return (y - op.A(den.x0(x, torch.tensor(0.4, dtype=D)))).norm(dim=1).sum()

    h, fd = 1e-6, torch.zeros_like(x_t)
    for b in range(3):
        for i in range(2):
            e = torch.zeros_like(x_t)
            e[b, i] = h
            fd[b, i] = (f(x_t + e) - f(x_t - e)) / (2 * h)
    assert torch.allclose(grad, fd, atol=1e-7, rtol=0)


@pytest.mark.parametrize("name", list(I.METHODS))
def test_every_method_respects_noiseless_y(name, mixture):
    """With a noiseless mask every method's samples equal y on the observed coordinate bit for bit, and
    with a noiseless projection they satisfy A x = y to 1e-10 (the paste-back at the end)."""
    den = MixtureOracle(mixture.to(dtype=D), SCHED).denoiser()
    kw = {"sdedit": {"t_star": 0.5}, "repaint": {"jump_length": 2, "resamplings": 2}}.get(name, {})
    for op in (I.mask(torch.tensor([False, True])), I.random_projection((2,), 1, gen(3))):
        if name in I.MASK_ONLY and not op.is_mask:
            continue
        y = torch.tensor([0.7], dtype=D)
        x_T = torch.randn(64, 2, generator=gen(), dtype=D)
        x = I.METHODS[name](den, op, y, x_T, time_grid(SCHED, 10), generator=gen(1), **kw)
        if op.is_mask:
            assert (x[:, 1] == 0.7).all()
        else:
            assert (op.A(x) - y).abs().max() < 1e-10


def test_methods_on_images():
    """On (B, 1, 4, 4) images (an oracle on the flattened pixels) every method keeps the image shape and,
    for noiseless y, ends on {A x = y} for a mask, 2x downsampling and a blur (to 1e-8)."""
    prior = GaussianMixture(torch.randn(2, 16, generator=gen(), dtype=D), stds=0.5, dtype=D)
    oracle = MixtureOracle(prior, SCHED)
    den = Denoiser(lambda x, t: oracle.x0(x.flatten(1), t).reshape(x.shape), SCHED, prediction="x0")
    truth = prior.sample(8, gen(1), dtype=D).reshape(8, 1, 4, 4)
    ops = (
        I.mask(torch.rand(1, 4, 4, generator=gen(2)) < 0.5),
        I.downsample((1, 4, 4)),
        I.blur((1, 4, 4), 0.8, 3),
    )
    for op in ops:
        y = op.A(truth)
        for name, fn in I.METHODS.items():
            if name in I.MASK_ONLY and not op.is_mask:
                continue
            x = fn(
                den,
                op,
                y,
                torch.randn(8, 1, 4, 4, generator=gen(3), dtype=D),
                time_grid(SCHED, 8),
                generator=gen(4),
            )
            assert x.shape == (8, 1, 4, 4) and (op.A(x) - y).abs().max() < 1e-8, (op.name, name)


def test_repaint_path_and_resampling():
    """The path moves down by 1 or up by j and costs N + (r - 1) j (jump points) evaluations; RePaint with
    r = 1 is replacement draw for draw; resampling cuts replacement's bias on a correlated prior (unobserved
    mean off by > 10 SE without, < 6 SE with 10 resamplings)."""
    path = I.repaint_path(12, 3, 3)
    assert path[0] == 0 and path[-1] == 12
    assert all(b - a in (1, -3) for a, b in zip(path, path[1:]))
    assert I.repaint_nfe(12, 3, 3) == 12 + 2 * 3 * 3 and I.repaint_path(5, 2, 1) == list(range(6))
    prior = gaussian([1.0, -0.5], [[0.5, 0.35], [0.35, 0.5]])
    den, op, y = (
        MixtureOracle(prior, SCHED).denoiser(),
        I.mask(torch.tensor([True, False])),
        torch.tensor([0.4]),
    )
    y, x_T = y.to(D), torch.randn(N, 2, generator=gen(), dtype=D)
    ts = time_grid(SCHED, 100)
    plain = I.sample_replacement(den, op, y, x_T, ts, generator=gen(1))
    same = I.sample_repaint(den, op, y, x_T, ts, jump_length=4, resamplings=1, generator=gen(1))
    assert torch.equal(plain, same)
    resampled = I.sample_repaint(den, op, y, x_T, ts, jump_length=5, resamplings=10, generator=gen(1))
    mean, cov = moments(I.exact_posterior(prior, op, y, 0.0))
    se = (cov[1, 1] / N).sqrt()
    assert (plain[:, 1].mean() - mean[1]).abs() > 10 * se
    assert (resampled[:, 1].mean() - mean[1]).abs() < 6 * se


def test_compare_methods_table(mixture):
    """The toy table has a row per method that applies plus the exact floor; the floor's errors are
    small (weights < 0.03, mean < 0.05 at n = 2000) and PiGDM beats the prior's own mean error."""
    prior, op, y = mixture.to(dtype=D), I.mask(torch.tensor([True, False])), torch.tensor([0.5], dtype=D)
    den = MixtureOracle(prior, SCHED).denoiser()
    rows = I.compare_methods(den, prior, op, y, sigma_y=0.2, nfe=20, n=2000, generator=gen())
    assert set(rows) == {"exact", *I.METHODS}
    assert rows["exact"]["weights"] < 0.03 and rows["exact"]["mean"] < 0.05
    prior_mean = (prior.weights[:, None] * prior.means).sum(0)
    post_mean, _ = moments(I.exact_posterior(prior, op, y, 0.2))
    assert rows["pigdm"]["mean"] < (prior_mean - post_mean).norm()
    rows = I.compare_methods(den, prior, I.random_projection((2,), 1, gen(3)), y, sigma_y=0.2, nfe=5, n=200,
                             methods=("ddrm", "replacement"), generator=gen())  # fmt: skip
    assert set(rows) == {"exact", "ddrm"}  # mask-only methods are skipped


def test_sr3_loss_decreases():
    """The SR3 baseline f(x_t, t, y) trains with dmlib.train: the mean loss of the last 100 of 400 steps is
    below 0.8 x that of the first 100 (an untrained model predicts noise no better than 0)."""
    torch.manual_seed(0)
    data = GaussianMixture([[-1.0, 0.0], [1.0, 0.5]], stds=0.3).sample(2048, gen(), dtype=torch.float32)
    op = I.mask(torch.tensor([True, False]))
    model = I.ObservationMLP(dim=2, obs_dim=1, hidden=64, depth=2)
    cfg = TrainConfig(steps=400, batch_size=256, lr=3e-3, device="cpu", progress=False, check_every=400)
    result = train(model, data, I.sr3_loss(SCHED, op, sigma_y=0.05), cfg)
    assert result.losses[-100:].mean() < 0.8 * result.losses[:100].mean()
    den = I.sr3_denoiser(result.ema, SCHED, op, torch.tensor([1.0]), batch=8)
    assert den.x0(torch.randn(8, 2), torch.tensor(0.5)).shape == (8, 2)


# ------------------------------------------------------------------------------------------------
# PSNR and SSIM
# ------------------------------------------------------------------------------------------------


def _ssim_by_windows(x, r, L, k, std):
    """Wang et al. (2004) eq. 13 window by window with explicit weighted sums: the reference."""
    c = torch.arange(k, dtype=D) - k // 2
    g = torch.exp(-(c**2) / (2 * std**2))
    w = torch.outer(g, g) / g.sum() ** 2
    vals = []
    for i in range(x.shape[0] - k + 1):
        for j in range(x.shape[1] - k + 1):
            a, b = x[i : i + k, j : j + k], r[i : i + k, j : j + k]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb, cab = (
                (w * (a - ma) ** 2).sum(),
                (w * (b - mb) ** 2).sum(),
                (w * (a - ma) * (b - mb)).sum(),
            )
            c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
            vals.append((2 * ma * mb + c1) * (2 * cab + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return torch.stack(vals).mean()


def test_psnr_and_ssim():
    """SSIM(x, x) = 1; two constant images a, b give (2ab + C1) / (a^2 + b^2 + C1); the convolution agrees with
    a window-by-window sum (1e-12); PSNR of an error of 0.1 everywhere on [-1, 1] data is 20 log10(20)."""
    x, r = (
        torch.rand(2, 1, 8, 8, generator=gen(), dtype=D) * 2 - 1,
        torch.rand(2, 1, 8, 8, generator=gen(1), dtype=D),
    )
    assert torch.allclose(I.ssim(x, x), torch.ones(2, dtype=D), atol=1e-12)
    a, b, c1 = 0.3, -0.2, (0.01 * 2) ** 2
    got = I.ssim(torch.full((1, 1, 8, 8), a, dtype=D), torch.full((1, 1, 8, 8), b, dtype=D))
    assert abs(got.item() - (2 * a * b + c1) / (a**2 + b**2 + c1)) < 1e-12
    for k, std in ((7, 1.5), (5, 1.0)):
        ref = torch.stack([_ssim_by_windows(x[i, 0], r[i, 0], 2.0, k, std) for i in range(2)])
        assert torch.allclose(I.ssim(x, r, window=k, std=std), ref, atol=1e-12)
    assert abs(I.psnr(x + 0.1, x)[0].item() - 20 * math.log10(20)) < 1e-9


# ------------------------------------------------------------------------------------------------
# Bad input and devices
# ------------------------------------------------------------------------------------------------


def test_bad_input(mixture):
    """Each mistake gets a ValueError (or TypeError) that names it."""
    den, op = MixtureOracle(mixture.to(dtype=D), SCHED).denoiser(), I.mask(torch.tensor([True, False]))
    x, y, ts = torch.randn(4, 2, dtype=D), torch.ones(1, dtype=D), time_grid(SCHED, 3)
    with pytest.raises(ValueError, match="y must have shape"):
        I.sample_dps(den, op, torch.ones(3, dtype=D), x, ts)
    with pytest.raises(TypeError, match="y must be a tensor"):
        I.sample_pigdm(den, op, [1.0], x, ts)
    with pytest.raises(ValueError, match="acts on data of shape"):
        I.sample_ddrm(den, op, y, torch.randn(4, 3, dtype=D), ts)
    with pytest.raises(ValueError, match="dimension 2 but the operator acts on n=3"):
        I.exact_posterior(mixture, I.random_projection((3,), 1), y, 0.1)
    with pytest.raises(ValueError, match="sigma_y"):
        I.sample_ddrm(den, op, y, x, ts, sigma_y=-0.1)
    with pytest.raises(ValueError, match="sigma_y"):
        I.exact_posterior(mixture, op, y, -1.0)
    for t_star in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="t_star must lie in"):
            I.sample_sdedit(den, op, y, x, ts, t_star=t_star)
    with pytest.raises(ValueError, match="unknown operator 'inpaint'"):
        I.make_operator("inpaint", (2,))
    with pytest.raises(ValueError, match="need a mask"):
        I.sample_repaint(den, I.random_projection((2,), 1), y, x, ts)
    with pytest.raises(ValueError, match="unknown method"):
        I.compare_methods(den, mixture, op, y, sigma_y=0.1, methods=("ddpm",))
    with pytest.raises(ValueError, match="3-channel"):
        I.colorize((1, 4, 4))
    with pytest.raises(ValueError, match="must divide"):
        I.make_operator("downsample", (1, 6, 6), factor=4)
    with pytest.raises(ValueError, match="eta and eta_b"):
        I.sample_ddrm(den, op, y, x, ts, eta_b=1.5)
    with pytest.raises(ValueError, match="window"):
        I.ssim(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), window=7)
    with pytest.raises(ValueError, match="positive integer"):
        I.repaint_path(10, 0, 2)


def test_meta_device(mixture):
    """Operators, the exact posterior and one step of every method create their tensors on the data's
    device (DPS and PiGDM with autograd through the oracle)."""
    den, ts = MixtureOracle(mixture.to(dtype=D), SCHED).denoiser(), torch.tensor([1.0, 0.3], dtype=D)
    outs = []
    with StrictDevices():
        for op in operators():
            x = torch.zeros(4, *op.x_shape, dtype=D, device="meta")
            y = torch.zeros(4, op.m, dtype=D, device="meta")
            outs += [
                op.A(x),
                op.AT(y),
                op.Vt(x),
                op.V(op.Vt(x)),
                op.U(y),
                op.Ut(y),
                op.pinv(y),
                op.project(x, y),
            ]
        x, y = torch.zeros(8, 2, dtype=D, device="meta"), torch.zeros(1, dtype=D, device="meta")
        for op in (I.mask(torch.tensor([True, False])), I.random_projection((2,), 1, gen(3))):
            post = I.exact_posterior(mixture, op, y, 0.1)
            outs += [post.means, post.covs, post.weights, I.sample_exact_posterior(mixture, op, y, 0.0, 8)]
            for name, fn in I.METHODS.items():
                if name not in I.MASK_ONLY or op.is_mask:
                    states = []
                    outs.append(fn(den, op, y, x, ts, callback=lambda i, t, z, seen=states: seen.append(z)))
                    outs += states
    assert all(o.device.type == "meta" for o in outs)
