"""Riemannian diffusion on S² and Tᵈ (dmlib.manifolds): kernels, samplers, oracle, loss, devices."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from test_device import StrictDevices

from dmlib import manifolds as M

pytestmark = pytest.mark.usefixtures("one_thread")
D = torch.float64
S2, T1, T2 = M.Sphere(), M.Torus(1), M.Torus(2)
NORTH = torch.tensor([0.0, 0.0, 1.0], dtype=D)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def sphere_at(theta):
    """Points at geodesic angle ``theta`` from NORTH."""
    theta = torch.as_tensor(theta, dtype=D)
    return torch.stack([torch.sin(theta), torch.zeros_like(theta), torch.cos(theta)], -1)


def tangent_frame(x):
    """Two orthonormal tangent vectors at each point of S²."""
    a = torch.where(
        (x[..., :1].abs() < 0.9), torch.tensor([1.0, 0, 0], dtype=D), torch.tensor([0, 1.0, 0], dtype=D)
    )
    e1 = S2.proj_tangent(x, a)
    e1 = e1 / e1.norm(dim=-1, keepdim=True)
    return e1, torch.linalg.cross(x, e1)


def vmf():
    return M.VMFMixture(
        [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -0.6, -0.8]], [12.0, 6.0, 20.0], [0.5, 0.3, 0.2]
    )


def vm():
    return M.VonMisesMixture([[0.5, -2.0], [-2.5, 1.0]], [[4.0, 8.0], [10.0, 3.0]], [0.6, 0.4])


# ---------------------------------------------------------------------------------------------
# Heat kernels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [5e-4, 0.01, 0.5, 3.0])
def test_sphere_kernel_integrates_to_one(t):
    """∫ p_t(x, y) dx = 2π ∫ sin θ p_t(θ) dθ = 1, on both sides of the switch (Simpson, fine grid)."""
    th = torch.linspace(0, math.pi, 20001, dtype=D)
    f = 2 * math.pi * torch.sin(th) * S2.heat_kernel(sphere_at(th), NORTH, t)
    h = th[1] - th[0]
    integral = (h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())).item()
    assert abs(integral - 1) < 1e-7


@pytest.mark.parametrize("t", [1e-3, 0.3, 1.0, 2.0, 10.0])
def test_torus_kernel_integrates_to_one(t):
    """Rectangle rule on a periodic grid (spectrally exact) on T², images below and Fourier above t = 1."""
    g = torch.linspace(-math.pi, math.pi, 513, dtype=D)[:-1]
    xy = torch.cartesian_prod(g, g)
    integral = (
        T2.heat_kernel(xy, torch.tensor([0.3, -3.0], dtype=D), t).sum().item() * (2 * math.pi / 512) ** 2
    )
    assert abs(integral - 1) < 1e-9


def laplacian_sphere(f, x, h=1e-3):
    """Laplace–Beltrami by second differences along the geodesics of an orthonormal tangent frame."""
    out = -4 * f(x)
    for e in tangent_frame(x):
        out = out + f(S2.exp(x, h * e)) + f(S2.exp(x, -h * e))
    return out / h**2


@pytest.mark.parametrize("t,rtol", [(1e-3, 1e-3), (0.05, 1e-5), (0.5, 1e-5), (2.0, 1e-5)])
def test_sphere_kernel_solves_heat_equation(t, rtol):
    """∂_t p = ½ Δ p (finite differences in t, geodesic second differences in x); the small-t form at
    t = 1e-3 only up to its O(t) error in the equation."""
    x = S2.exp(
        NORTH.expand(64, 3),
        S2.proj_tangent(NORTH, 2 * math.sqrt(t) * torch.randn(64, 3, generator=gen(), dtype=D)),
    )
    p = S2.heat_kernel(x, NORTH, t)
    dt = 1e-4 * t
    dp_dt = (S2.heat_kernel(x, NORTH, t + dt) - S2.heat_kernel(x, NORTH, t - dt)) / (2 * dt)
    h = 2e-3 * math.sqrt(t)
    lap = laplacian_sphere(lambda z: S2.heat_kernel(z, NORTH, t), x, h)
    err = ((dp_dt - 0.5 * lap).abs().max() / (p.max() / t)).item()  # relative to the scale of dp/dt
    assert err < rtol


@pytest.mark.parametrize("t", [0.2, 3.0])
def test_torus_kernel_solves_heat_equation(t):
    x = T2.uniform(64, gen())
    y = torch.tensor([1.0, -2.0], dtype=D)
    dt, h = 1e-4 * t, 1e-3

    def p(z, s=t):
        return T2.heat_kernel(T2.project(z), y, s)

    lap = sum(p(x + h * e) + p(x - h * e) - 2 * p(x) for e in torch.eye(2, dtype=D)) / h**2
    dp_dt = (p(x, t + dt) - p(x, t - dt)) / (2 * dt)
    assert ((dp_dt - 0.5 * lap).abs().max() / (p(x).max() / t)).item() < 1e-6


def test_sphere_series_and_small_t_agree_at_the_switch():
    """At the switch both forms agree to 1e-7 (relative, where p ≥ 1e-6 × peak); at t = 0.1 they do not."""
    t = M.SPHERE_SWITCH_T
    th = torch.linspace(0, math.sqrt(2 * t * math.log(1e6)), 300, dtype=D)
    x = sphere_at(th)
    series = S2.log_heat_kernel(x, NORTH, t, method="series")
    small = S2.log_heat_kernel(x, NORTH, t, method="small_t")
    assert (series - small).abs().max() < 1e-7
    s_series = S2.heat_kernel_score(x, NORTH, t, method="series")
    s_small = S2.heat_kernel_score(x, NORTH, t, method="small_t")
    assert ((s_series - s_small).norm(dim=-1) / (1 + s_series.norm(dim=-1))).max() < 1e-6
    x = sphere_at(torch.linspace(0, 1.0, 100, dtype=D))
    assert (
        S2.log_heat_kernel(x, NORTH, 0.1, method="series")
        - S2.log_heat_kernel(x, NORTH, 0.1, method="small_t")
    ).abs().max() > 1e-5


def test_torus_images_and_fourier_agree():
    x, y = T2.uniform(200, gen()), T2.uniform(200, gen(1))
    for t in [0.5, 1.0, 2.0]:
        a = T2.log_heat_kernel(x, y, t, method="images")
        b = T2.log_heat_kernel(x, y, t, method="fourier")
        assert (a - b).abs().max() < 1e-9
        torch.testing.assert_close(
            T2.heat_kernel_score(x, y, t, method="images"), T2.heat_kernel_score(x, y, t, method="fourier")
        )


def test_kernel_scores_are_gradients():
    """The kernels' scores equal finite-difference gradients of their log (sphere: along a tangent frame)."""
    x = S2.uniform(32, gen())
    for t in [1e-3, 0.05, 1.0]:
        x = S2.exp(
            NORTH.expand(32, 3),
            S2.proj_tangent(NORTH, math.sqrt(t) * torch.randn(32, 3, generator=gen(), dtype=D)),
        )
        s = S2.heat_kernel_score(x, NORTH, t)
        assert (s * x).sum(-1).abs().max() < 1e-10  # tangent
        h = 1e-5 * math.sqrt(t)
        for e in tangent_frame(x):
            fd = (
                S2.log_heat_kernel(S2.exp(x, h * e), NORTH, t)
                - S2.log_heat_kernel(S2.exp(x, -h * e), NORTH, t)
            ) / (2 * h)
            assert ((s * e).sum(-1) - fd).abs().max() < 1e-5 / math.sqrt(t)
    y = torch.tensor([1.0, -2.0], dtype=D)
    x = T2.uniform(32, gen(3))
    for t in [0.1, 3.0]:
        s, h = T2.heat_kernel_score(x, y, t), 1e-6
        for i, e in enumerate(torch.eye(2, dtype=D)):
            fd = (
                T2.log_heat_kernel(T2.project(x + h * e), y, t)
                - T2.log_heat_kernel(T2.project(x - h * e), y, t)
            ) / (2 * h)
            assert (s[:, i] - fd).abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------
# Brownian motion: exact samples and the geodesic random walk
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1e-3, 0.3, 2.0])
def test_sphere_exact_samples_match_kernel(t):
    """KS test of x·y against the exact Legendre CDF (for t = 1e-3, against the small-t density's CDF by
    quadrature); the same draws tested at 1.2 t fail."""
    x = S2.sample_heat_kernel(NORTH.expand(4000, 3), t, gen())
    assert (x.norm(dim=-1) - 1).abs().max() < 1e-12
    if t < M.SPHERE_SWITCH_T:  # compare the angle with the quadrature CDF of the small-t form
        th = torch.linspace(0, 12 * math.sqrt(t), 20001, dtype=D)
        f = torch.sin(th) * S2.heat_kernel(sphere_at(th), NORTH, t)
        F = torch.cat([torch.zeros(1, dtype=D), torch.cumsum((f[1:] + f[:-1]) / 2, 0)])
        F = F / F[-1]

        def cdf(v):
            return np.interp(v, th.numpy(), F.numpy())

        theta = S2.dist(x, NORTH).numpy()
        assert stats.kstest(theta, cdf).pvalue > 1e-3
        return
    z = (x @ NORTH).numpy()
    assert stats.kstest(z, lambda v: S2.legendre_cdf(torch.from_numpy(v), t).numpy()).pvalue > 1e-3
    assert stats.kstest(z, lambda v: S2.legendre_cdf(torch.from_numpy(v), 1.2 * t).numpy()).pvalue < 1e-3


def test_sphere_random_walk_matches_kernel():
    """200 geodesic random-walk steps to t = 0.3: KS against the exact CDF."""
    t = 0.3
    z = (S2.random_walk(NORTH.expand(4000, 3), t, 200, gen()) @ NORTH).numpy()
    assert stats.kstest(z, lambda v: S2.legendre_cdf(torch.from_numpy(v), t).numpy()).pvalue > 1e-3


def torus_bins(t, y, edges):
    """Exact bin probabilities of the T¹ kernel (fine quadrature in each bin)."""
    g = torch.linspace(-math.pi, math.pi, 200 * (len(edges) - 1) + 1, dtype=D)
    p = T1.heat_kernel(g[:, None], y, t)
    cdf = torch.cat([torch.zeros(1, dtype=D), torch.cumsum((p[1:] + p[:-1]) / 2 * (g[1] - g[0]), 0)])
    return cdf[::200].diff()


@pytest.mark.parametrize("t", [0.5, 4.0])
def test_torus_samples_match_kernel(t):
    """Chi-square of exact and random-walk draws on T¹ against the kernel's bin probabilities."""
    y, edges = torch.tensor([2.5], dtype=D), torch.linspace(-math.pi, math.pi, 31, dtype=D)
    probs = torus_bins(t, y, edges).numpy()
    for x in [
        T1.sample_heat_kernel(y.expand(5000, 1), t, gen()),
        T1.random_walk(y.expand(5000, 1), t, 20, gen(1)),
    ]:
        counts = torch.histc(x[:, 0], 30, -math.pi, math.pi).numpy()
        assert stats.chisquare(counts, probs * counts.sum()).pvalue > 1e-3
    wrong = torus_bins(1.5 * t, y, edges).numpy()
    counts = torch.histc(
        T1.sample_heat_kernel(y.expand(5000, 1), t, gen())[:, 0], 30, -math.pi, math.pi
    ).numpy()
    assert stats.chisquare(counts, wrong * counts.sum()).pvalue < 1e-3


# ---------------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------------


def sphere_quadrature(n=160):
    """Gauss–Legendre in cos θ times the trapezoid rule in φ: nodes (n·2n, 3) and weights."""
    zq, wq = np.polynomial.legendre.leggauss(n)
    phi = torch.arange(2 * n, dtype=D) * math.pi / n
    z, w = torch.as_tensor(zq), torch.as_tensor(wq)
    Z, P = torch.meshgrid(z, phi, indexing="ij")
    r = (1 - Z**2).sqrt()
    pts = torch.stack([r * P.cos(), r * P.sin(), Z], -1).reshape(-1, 3)
    return pts, (w[:, None] * torch.full((2 * n,), math.pi / n, dtype=D)).reshape(-1)


@pytest.mark.parametrize("t", [0.02, 0.3])
def test_vmf_diffused_density_is_the_convolution(t):
    """p_t(x) = ∫ p_0(y) p_t(x, y) dy by quadrature on S²; and the density integrates to one."""
    mix, (y, w) = vmf(), sphere_quadrature()
    x = mix.sample(6, gen())
    conv = torch.stack(
        [(w * mix.log_prob(y, 0.0).exp() * S2.heat_kernel(xi.expand_as(y), y, t)).sum() for xi in x]
    )
    torch.testing.assert_close(mix.log_prob(x, t), conv.log(), rtol=0, atol=1e-6)
    assert abs((w * mix.log_prob(y, t).exp()).sum().item() - 1) < 1e-10


@pytest.mark.parametrize("t", [0.05, 1.5])
def test_von_mises_diffused_density_is_the_convolution(t):
    mix = vm()
    g = torch.linspace(-math.pi, math.pi, 257, dtype=D)[:-1]
    y, dA = torch.cartesian_prod(g, g), (2 * math.pi / 256) ** 2
    x = mix.sample(6, gen())
    conv = torch.stack(
        [(mix.log_prob(y, 0.0).exp() * T2.heat_kernel(xi.expand_as(y), y, t)).sum() * dA for xi in x]
    )
    torch.testing.assert_close(mix.log_prob(x, t), conv.log(), rtol=0, atol=1e-8)


def test_oracle_scores_are_tangent_gradients_and_t0_is_the_mixture():
    mix, x = vmf(), vmf().sample(64, gen(1))
    for t in [0.0, 0.01, 0.5]:
        s, h = mix.score(x, t), 1e-6
        assert (s * x).sum(-1).abs().max() < 1e-10
        for e in tangent_frame(x):
            fd = (mix.log_prob(S2.exp(x, h * e), t) - mix.log_prob(S2.exp(x, -h * e), t)) / (2 * h)
            assert ((s * e).sum(-1) - fd).abs().max() < 1e-5
    torch.testing.assert_close(mix.log_prob(x, 1e-9), mix.log_prob(x, 0.0), rtol=0, atol=1e-7)
    torch.testing.assert_close(mix.score(x, 1e-9), mix.score(x, 0.0), rtol=0, atol=1e-5)
    mix, x = vm(), vm().sample(64, gen(2))
    for t in [0.0, 0.01, 0.5]:
        s, h = mix.score(x, t), 1e-6
        for i, e in enumerate(torch.eye(2, dtype=D)):
            fd = (mix.log_prob(x + h * e, t) - mix.log_prob(x - h * e, t)) / (2 * h)
            assert (s[:, i] - fd).abs().max() < 1e-5
    torch.testing.assert_close(mix.log_prob(x, 1e-9), mix.log_prob(x, 0.0), rtol=0, atol=1e-7)


def test_oracle_samples_follow_the_density():
    """vMF: μ·x of one component is KS-tested against its exact CDF; von Mises: chi-square on T¹."""
    one = M.VMFMixture([[0.0, 0.0, 1.0]], [5.0])
    z = (one.sample(4000, gen()) @ NORTH).numpy()
    assert stats.kstest(z, lambda v: (np.exp(5 * (v - 1)) - np.exp(-10)) / (1 - np.exp(-10))).pvalue > 1e-3
    mix = M.VonMisesMixture([[1.0]], [3.0])
    x = mix.sample(5000, gen())
    g = torch.linspace(-math.pi, math.pi, 6001, dtype=D)
    p = mix.log_prob(g[:, None], 0.0).exp()
    probs = torch.cat([torch.zeros(1, dtype=D), torch.cumsum((p[1:] + p[:-1]) / 2 * (g[1] - g[0]), 0)])[
        ::200
    ].diff()
    counts = torch.histc(x[:, 0], 30, -math.pi, math.pi).numpy()
    assert stats.chisquare(counts, probs.numpy() / probs.sum().item() * counts.sum()).pvalue > 1e-3


# ---------------------------------------------------------------------------------------------
# Samplers with the exact score
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sphere", "torus"])
def test_samplers_with_exact_score_reach_the_data_nll(kind):
    """From the uniform law at T = 6 (p_T is uniform to < 1e-2 on S², < 1e-6 on T²), the reverse GRW and
    the PF-ODE with the oracle's score give samples whose NLL under p_0 is the data's own (±0.06 nats)."""
    mix = vmf() if kind == "sphere" else vm()
    man, n = mix.manifold, 4000
    x_T = man.uniform(n, gen(5))
    data_nll = -mix.log_prob(mix.sample(n, gen(6)), 0.0).mean().item()
    ts = torch.cat([torch.linspace(6, 0.5, 41, dtype=D)[:-1], torch.linspace(0.5, 0, 121, dtype=D)])
    sde = M.sample_reverse_grw(mix.score, x_T, ts, manifold=man, generator=gen(7))
    ode = M.sample_pf_ode(mix.score, x_T, ts, manifold=man)
    nll = {k: -mix.log_prob(man.project(v), 0.0).mean().item() for k, v in [("sde", sde), ("ode", ode)]}
    print(f"{kind}: data NLL {data_nll:.4f}, reverse GRW {nll['sde']:.4f}, PF-ODE {nll['ode']:.4f}")
    assert abs(nll["sde"] - data_nll) < 0.08 and abs(nll["ode"] - data_nll) < 0.08
    assert -man.log_uniform(x_T).mean().item() - data_nll > 1  # the start is far from the data
    torch.testing.assert_close(
        M.sample_pf_ode(mix.score, x_T, ts[-60:], manifold=man),
        M.sample_pf_ode(mix.score, x_T, ts[-60:], manifold=man),
        rtol=0,
        atol=0,
    )


# ---------------------------------------------------------------------------------------------
# Maps, loss, bad input, devices
# ---------------------------------------------------------------------------------------------


def test_exp_log_and_projection():
    x = S2.uniform(100, gen())
    v = S2.proj_tangent(x, torch.randn(100, 3, generator=gen(1), dtype=D))
    v = v * (2.5 * torch.rand(100, 1, generator=gen(2), dtype=D) / v.norm(dim=-1, keepdim=True))  # |v| < 2.5
    y = S2.exp(x, v)
    assert (y.norm(dim=-1) - 1).abs().max() < 1e-14
    torch.testing.assert_close(S2.log(x, y), v, rtol=0, atol=1e-10)
    torch.testing.assert_close(S2.dist(x, y), v.norm(dim=-1), rtol=0, atol=1e-10)
    torch.testing.assert_close(S2.project(3 * x), x)
    x, v = T2.uniform(100, gen()), 3 * torch.rand(100, 2, generator=gen(1), dtype=D) - 1.5
    y = T2.exp(x, v)
    assert (y >= -math.pi).all() and (y < math.pi).all()
    torch.testing.assert_close(T2.log(x, y), v, rtol=0, atol=1e-12)


def test_rdsm_loss_is_zero_at_the_kernel_score():
    """With every datum at one point y, the kernel's score (the minimizer) has loss 0, and a wrong model not."""
    y = NORTH.expand(256, 3)
    loss = M.rdsm_loss(S2, t_min=1e-3, t_max=1.0)

    def exact(x, t):
        return S2.heat_kernel_score(x, y, t) + 5 * x  # a normal component, removed by the projection

    assert loss(exact, y, gen()).item() < 1e-12
    assert loss(lambda x, t: torch.zeros_like(x), y, gen()).item() > 1
    loss_t = M.rdsm_loss(T2, t_min=1e-2, t_max=3.0)
    y2 = torch.zeros(256, 2, dtype=D)
    assert loss_t(lambda x, t: T2.heat_kernel_score(x, y2, t), y2, gen()).item() < 1e-12


def test_bad_input_raises():
    with pytest.raises(ValueError, match="project"):
        S2.log_heat_kernel(torch.tensor([[1.0, 1.0, 0.0]], dtype=D), NORTH, 0.1)
    with pytest.raises(ValueError, match="project"):
        T2.heat_kernel_score(torch.tensor([[4.0, 0.0]], dtype=D), torch.zeros(2, dtype=D), 0.1)
    with pytest.raises(ValueError, match="max_terms"):
        S2.log_heat_kernel(NORTH, NORTH, 1e-9, method="series")
    with pytest.raises(ValueError, match="max_terms"):
        T1.log_heat_kernel(torch.zeros(1, dtype=D), torch.zeros(1, dtype=D), 1e-9, method="fourier")
    with pytest.raises(ValueError, match="max_terms"):
        M.VMFMixture([[0.0, 0.0, 1.0]], [1e6], max_terms=500)
    for t in [0.0, -1.0, float("nan")]:
        with pytest.raises(ValueError, match="time t"):
            S2.heat_kernel(NORTH, NORTH, t)
    with pytest.raises(ValueError, match="time t"):
        vmf().log_prob(NORTH[None], -0.1)
    with pytest.raises(ValueError, match="decrease"):
        M.sample_pf_ode(vmf().score, NORTH[None], [0.0, 1.0], manifold=S2)
    assert torch.isfinite(S2.log_heat_kernel(NORTH, NORTH, 1e-9)).all()  # 'auto' never needs the long series


def test_meta_device():
    """Kernels, scores, maps and the loss create every tensor on their inputs' device (t_min sizes the
    series without reading t back)."""
    x, y = S2.uniform(8, gen()).to("meta"), NORTH.to("meta").expand(8, 3)
    a, b = T2.uniform(8, gen()).to("meta"), torch.zeros(8, 2, dtype=D, device="meta")
    t = torch.full((8,), 0.1, dtype=D, device="meta")
    with StrictDevices():
        outs = [
            S2.log_heat_kernel(x, y, t, t_min=1e-3),
            S2.heat_kernel_score(x, y, t, t_min=1e-3),
            S2.exp(x, S2.proj_tangent(x, y)),
            S2.log(x, y),
            T2.log_heat_kernel(a, b, t, t_min=1e-3),
            T2.heat_kernel_score(a, b, t, t_min=1e-3),
            T2.log(a, b),
            M.rdsm_loss(S2)(lambda z, s: z, x),
            M.rdsm_loss(T2)(lambda z, s: z, a),
        ]
    assert all(o.device.type == "meta" for o in outs)
