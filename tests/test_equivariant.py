"""Symmetry-aware diffusion (dmlib.equivariant): equivariant networks, the zero-centre-of-mass subspace
and its Gaussian, the DW-4 reference sampler, the E(n) diffusion loss, bad inputs and the meta device."""

from __future__ import annotations

import math

import pytest
import torch
from test_device import StrictDevices
from torch import nn

from dmlib import equivariant as E
from dmlib.parameterization import Denoiser
from dmlib.schedules import Cosine, Linear
from dmlib.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def clouds(b=3, n=5, d=3, seed=0, dtype=F64):
    return E.remove_com(torch.randn(b, n, d, generator=gen(seed), dtype=dtype))


def net(cls, d=3, seed=0, **kwargs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(d, **kwargs)


# ---------------------------------------------------------------------------------------------
# Equivariance of the networks, and a measure that can fail
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("det", [1, -1])
@pytest.mark.parametrize("d", [2, 3])
def test_egnn_is_e_n_equivariant(det, d):
    """f(P(x Q^T + b)) = P f(x) Q^T to 1e-5 in float64, for rotations (det 1) and reflections (det -1),
    translations and permutations together, and each alone; the output is nonzero and zero-CoM."""
    model = net(E.EGNNDenoiser, d, width=16, depth=3).double()
    x, t = clouds(3, 5, d), torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    out = model(x, t)
    assert out.abs().max() > 1e-3 and out.sum(1).abs().max() < 1e-12
    assert E.equivariance_error(model, x, t, gen(1), det=det) < 1e-5
    for action in E.ACTIONS:
        assert E.equivariance_error(model, x, t, gen(2), actions=(action,), det=det) < 1e-5
    # translation invariance also off the subspace: the CoM of x_t does not reach the output
    shifted = x + torch.randn(3, 1, d, generator=gen(3), dtype=F64)
    assert (model(shifted, t) - out).abs().max() < 1e-12


def test_set_denoiser_is_permutation_equivariant_only():
    """The transformer without positions commutes with permutations (1e-5), not with rotations."""
    model = net(E.SetDenoiser, 3, width=16, depth=2, heads=4).double()
    x, t = clouds(), torch.tensor(0.4, dtype=F64)
    assert E.equivariance_error(model, x, t, gen(1), actions=("permutation",)) < 1e-5
    assert E.equivariance_error(model, x, t, gen(1), actions=("orthogonal",)) > 1e-3


class AbsoluteFeatures(E.EGNNDenoiser):
    """A broken EGNN: its node features see the absolute coordinates."""

    def __init__(self, d, **kw):
        super().__init__(d, **kw)
        self.leak = nn.Linear(d, self.width)

    def node_features(self, x, a):
        return super().node_features(x, a) + self.leak(x)


class Positional(E.SetDenoiser):
    """A broken set denoiser: a learned position embedding per slot."""

    def __init__(self, d, n, **kw):
        super().__init__(d, **kw)
        self.pos = nn.Parameter(torch.randn(n, d))

    def forward(self, x, t, mask=None):
        return super().forward(x + self.pos.to(x.dtype), t, mask)


def test_broken_layers_are_detected():
    x, t = clouds(), torch.tensor(0.3, dtype=F64)
    broken = net(AbsoluteFeatures, 3, width=16, depth=2).double()
    assert E.equivariance_error(broken, x, t, gen(1), actions=("orthogonal",)) > 1e-3
    assert E.equivariance_error(broken, x, t, gen(1), actions=("translation",)) > 1e-3
    assert E.equivariance_error(broken, x, t, gen(1), actions=("permutation",)) < 1e-5  # still a set map
    positional = net(Positional, 3, n=5, width=16, depth=1, heads=2).double()
    assert E.equivariance_error(positional, x, t, gen(1), actions=("permutation",)) > 1e-3


def test_random_orthogonal():
    """Orthogonal to 1e-12; det as asked; rotations and reflections both drawn without det."""
    dets = []
    for seed in range(40):
        q = E.random_orthogonal(3, gen(seed))
        assert torch.allclose(q @ q.T, torch.eye(3, dtype=F64), atol=1e-12)
        dets.append(round(float(torch.linalg.det(q))))
    assert set(dets) == {1, -1}
    for det in (1, -1):
        assert round(float(torch.linalg.det(E.random_orthogonal(4, gen(7), det=det)))) == det


@pytest.mark.parametrize("cls", [E.EGNNDenoiser, E.SetDenoiser])
def test_masked_points_change_nothing(cls):
    """Padding a cloud with masked points leaves the real points' output unchanged; padded outputs are 0."""
    model = net(cls, 2, width=16, depth=2).double()
    x, t = clouds(2, 4, 2), torch.tensor([0.2, 0.7], dtype=F64)
    pad = torch.cat([x, torch.zeros(2, 3, 2, dtype=F64)], 1)
    mask = torch.cat([torch.ones(2, 4), torch.zeros(2, 3)], 1)
    out = model(pad, t, mask=mask)
    assert (out[:, 4:] == 0).all()
    assert torch.allclose(out[:, :4], model(x, t), atol=1e-10)


# ---------------------------------------------------------------------------------------------
# The zero-CoM subspace, its noise and its Gaussian
# ---------------------------------------------------------------------------------------------


def test_zero_com_noise_lives_on_the_subspace_with_identity_covariance():
    """CoM 0; covariance = the projector (I - 11^T / N) (x) I_d; E||eps||^2 = (N - 1) d, not N d."""
    n, d, m = 4, 3, 40_000
    eps = E.zero_com_noise(torch.zeros(m, n, d, dtype=F64), generator=gen())
    assert eps.sum(1).abs().max() < 1e-12
    flat = eps.reshape(m, -1)
    projector = torch.kron(torch.eye(n, dtype=F64) - 1 / n, torch.eye(d, dtype=F64))
    assert (flat.T @ flat / m - projector).abs().max() < 0.03
    sq = (flat**2).sum(1)
    assert abs(sq.mean() - (n - 1) * d) < 5 * sq.std() / math.sqrt(m)
    # masked: zeros at padding, CoM 0 over the real points, (N_i - 1) d degrees of freedom
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]).repeat(m // 2, 1)
    eps = E.zero_com_noise(torch.zeros(m, n, d, dtype=F64), mask, gen(1))
    assert (eps[mask == 0] == 0).all() and eps.sum(1).abs().max() < 1e-12
    dof = E.subspace_dim(eps, mask)
    assert dof[:2].tolist() == [3.0, 6.0]
    for k in (0, 1):
        sq = (eps[k::2] ** 2).flatten(1).sum(1)
        assert abs(sq.mean() - dof[k]) < 5 * sq.std() / math.sqrt(m // 2)


def test_log_prob_is_the_gaussian_in_orthonormal_coordinates():
    """log N_X(x; mean, sigma^2) equals the (N - 1) d-dimensional normal of the coordinates V^T x."""
    n, d = 5, 2
    v = E.zero_com_basis(n, d)
    assert torch.allclose(v.T @ v, torch.eye((n - 1) * d, dtype=F64), atol=1e-12)
    assert v.reshape(n, d, -1).sum(0).abs().max() < 1e-12  # every basis vector has zero CoM
    x, mean = clouds(4, n, d, seed=1), clouds(4, n, d, seed=2)
    sigma = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=F64)
    got = E.zero_com_log_prob(x, mean, sigma)
    for b in range(4):
        z, mu = v.T @ x[b].reshape(-1), v.T @ mean[b].reshape(-1)
        ref = torch.distributions.Normal(mu, sigma[b]).log_prob(z).sum()
        assert torch.allclose(got[b], ref, atol=1e-10)


@pytest.mark.parametrize("n", [2, 3])
def test_log_prob_integrates_to_one_on_the_subspace(n):
    """With d = 1 the subspace is (n - 1)-dimensional; the density integrates to 1 over it (a grid
    integral), which a normalising constant with N d would miss by a factor sqrt(2 pi)."""
    v = E.zero_com_basis(n, 1)
    grid = torch.linspace(-7, 7, 281, dtype=F64)
    z = torch.stack(torch.meshgrid(*[grid] * (n - 1), indexing="ij"), -1).reshape(-1, n - 1)
    x = (z @ v.T)[..., None]
    density = E.zero_com_log_prob(x, sigma=1.3).exp()
    total = density.sum() * (grid[1] - grid[0]) ** (n - 1)
    assert abs(total - 1) < 1e-6


def test_log_prob_is_invariant_under_the_group():
    """Rotations, reflections and permutations of (x, mean) together, and translations through remove_com."""
    x, mean = clouds(3, 6, 3, seed=4), clouds(3, 6, 3, seed=5)
    ref = E.zero_com_log_prob(x, mean, 0.7)
    for seed, det in [(0, 1), (1, -1), (2, None)]:
        q, p = E.random_orthogonal(3, gen(seed), det=det), torch.randperm(6, generator=gen(seed))
        b = torch.randn(3, 1, 3, generator=gen(seed), dtype=F64)
        gx, gm = E.remove_com((x @ q.T + b)[:, p]), E.remove_com((mean @ q.T - b)[:, p])
        assert torch.allclose(E.zero_com_log_prob(gx, gm, 0.7), ref, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Data and the reference sampler
# ---------------------------------------------------------------------------------------------


def pair_dw(x):
    return E.dw4_energy(x)


def _quadrature_moments(d):
    """E[r] and P(r > d0) of one DW pair in the (d-dimensional) relative coordinate: p(r) ∝ r^(d-1) e^(-u)."""
    r = torch.linspace(1e-6, 12, 200_001, dtype=F64)
    c = E.DW4
    u = c["b"] * (r - c["d0"]) ** 2 + c["c"] * (r - c["d0"]) ** 4
    w = r ** (d - 1) * torch.exp(-(u - u.min()))
    return float((r * w).sum() / w.sum()), float(w[r > c["d0"]].sum() / w.sum())


@pytest.mark.parametrize("method, d, step, burn_in", [("rwm", 2, 0.5, 400), ("rwm", 3, 0.5, 400),
                                                     ("mala", 2, 0.15, 1000)])  # fmt: skip
def test_mcmc_targets_the_double_well_pair(method, d, step, burn_in):
    """Two particles: the law of their distance is known (p(r) ∝ r^(d-1) exp(-u(r)), by quadrature); the
    sampler's mean distance and occupancy of the far well match it within ~4 standard errors."""
    chains = 4000
    init = torch.zeros(chains, 2, d, dtype=F64)
    init[:, 0, 0], init[:, 1, 0] = 2.0, -2.0  # distance d0 = 4: the barrier top, in the typical set
    res = E.mcmc_sample(pair_dw, 2 * chains, 2, d, chains=chains, step_size=step, burn_in=burn_in, thin=20,
                        method=method, init=init, generator=gen(1))  # fmt: skip
    r = E.interparticle_distances(res.samples)[:, 0]
    mean_r, p_far = _quadrature_moments(d)
    assert 0.2 < res.acceptance < 0.95
    assert abs(r.mean() - mean_r) < 0.05, (float(r.mean()), mean_r)
    assert abs((r > 4).double().mean() - p_far) < 0.02, (float((r > 4).double().mean()), p_far)
    assert res.samples.sum(1).abs().max() < 1e-10


def test_mcmc_gaussian_has_subspace_second_moment():
    """u = ||x||^2 / (2 s^2) on X: E||x||^2 = (N - 1) d s^2 (the N d of the full space would be 25% more)."""
    s, n, d = 0.8, 4, 2
    res = E.mcmc_sample(lambda x: (x**2).flatten(1).sum(1) / (2 * s**2), 3000, n, d, chains=1000,
                        step_size=0.4, burn_in=200, thin=10, generator=gen(2))  # fmt: skip
    sq = (res.samples**2).flatten(1).sum(1)
    assert abs(sq.mean() / ((n - 1) * d * s**2) - 1) < 0.04


@pytest.fixture(scope="module")
def dw4_samples():
    return E.mcmc_sample(E.dw4_energy, 4000, 4, 2, chains=1000, burn_in=500, thin=10, generator=gen(3))


def test_dw4_sample_statistics_are_invariant(dw4_samples):
    """Energies and distance histograms are unchanged by a group element; the samples' law is invariant:
    the direction of particle 0 is uniform on the circle, and every pair has the same distance law."""
    x = dw4_samples.samples
    assert torch.allclose(dw4_samples.energies, E.dw4_energy(x), atol=1e-9)
    q, p = E.random_orthogonal(2, gen(4), det=-1), torch.randperm(4, generator=gen(4))
    gx = (x @ q.T + 3.0)[:, p]
    assert torch.allclose(E.dw4_energy(gx), dw4_samples.energies, atol=1e-9)
    assert torch.allclose(E.distance_histogram(gx)[0], E.distance_histogram(x)[0])
    angle = torch.atan2(x[:, 0, 1], x[:, 0, 0])
    counts = torch.histc(angle, bins=8, min=-math.pi, max=math.pi)
    chi2 = float(((counts - len(x) / 8) ** 2 / (len(x) / 8)).sum())
    assert chi2 < 24.3, chi2  # chi^2 with 7 dof: p = 0.001
    dist = E.interparticle_distances(x)
    assert (dist.mean(0) - dist.mean()).abs().max() < 0.12
    # the pair law is bimodal: the well at d0 - sqrt(-b / 2c) = 2.51 rises far above the barrier at d0 = 4
    density, edges = E.distance_histogram(x, bins=16, range=(0.0, 8.0))
    assert density[4:6].max() > 2 * density[7:9].min()


def test_ring_clouds():
    x = E.ring_clouds(64, 6, radius=2.0, noise=0.0, generator=gen(), dtype=F64)
    assert x.shape == (64, 6, 2) and x.sum(1).abs().max() < 1e-12
    assert torch.allclose(x.norm(dim=-1), torch.full((64, 6), 2.0, dtype=F64))


# ---------------------------------------------------------------------------------------------
# Diffusion on the subspace
# ---------------------------------------------------------------------------------------------


def test_loss_at_the_exact_denoiser_of_a_gaussian_cloud():
    """Data N_X(0, s^2): the exact eps is sigma x_t / (alpha^2 s^2 + sigma^2) and its loss per subspace
    degree of freedom is E_t[alpha^2 s^2 / (alpha^2 s^2 + sigma^2)], below a denoiser for the wrong s."""
    sched, s, n, d = Cosine(), 0.5, 3, 2
    x0 = s * E.zero_com_noise(torch.zeros(50_000, n, d, dtype=F64), generator=gen())

    def exact(scale):
        def model(x_t, t):
            a, sig = sched.alpha(t)[:, None, None], sched.sigma(t)[:, None, None]
            return sig * x_t / (a**2 * scale**2 + sig**2)

        return model

    loss = E.en_diffusion_loss(sched)
    at_exact, at_wrong = loss(exact(s), x0, gen(1)), loss(exact(2 * s), x0, gen(1))
    u = (torch.arange(100_000, dtype=F64) + 0.5) / 100_000
    a2 = sched.alpha(u) ** 2
    expected = (a2 * s**2 / (a2 * s**2 + sched.sigma(u) ** 2)).mean()
    assert abs(at_exact - expected) < 0.01, (float(at_exact), float(expected))
    assert at_wrong > at_exact + 0.05


def test_training_the_egnn_reduces_the_loss():
    """A few hundred AdamW steps on ring clouds lower the held-out loss of a small EGNN."""
    data = E.ring_clouds(512, 5, generator=gen())
    model = net(E.EGNNDenoiser, 2, width=32, depth=2)
    loss, held_out = E.en_diffusion_loss(Linear()), E.ring_clouds(1024, 5, generator=gen(9))

    def evaluate(m):
        with torch.no_grad():
            return float(sum(loss(m, held_out, gen(k)) for k in range(4)) / 4)

    before = evaluate(model)
    cfg = TrainConfig(steps=300, batch_size=64, lr=3e-3, ema_decay=0.0, device="cpu", progress=False)
    after = evaluate(train(model, data, loss, cfg).model)
    assert after < 0.8 * before, (before, after)


def test_q_sample_and_zero_com_sampler_stay_on_the_subspace():
    sched = Linear()
    x0, eps = clouds(4, 5, 2, seed=1), E.zero_com_noise(torch.zeros(4, 5, 2, dtype=F64), generator=gen())
    x_t = E.q_sample(sched, x0, 0.5, eps)
    assert x_t.sum(1).abs().max() < 1e-12
    model = net(E.EGNNDenoiser, 2, width=8, depth=1).double()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).repeat(2, 1)
    x_T = E.zero_com_noise(torch.zeros(4, 5, 2, dtype=F64), mask, gen(2))
    out = E.sample_ancestral_zero_com(Denoiser(model, sched), x_T, torch.linspace(1, 0, 11), mask=mask,
                                      generator=gen(3))  # fmt: skip
    assert out.shape == (4, 5, 2) and torch.isfinite(out).all()
    assert out.sum(1).abs().max() < 1e-10 and (out[mask == 0] == 0).all()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_are_refused_clearly():
    x = clouds(2, 4, 2)
    model = net(E.EGNNDenoiser, 2, width=8, depth=1).double()
    with pytest.raises(ValueError, match=r"\(B, N, d\)"):
        E.remove_com(x[0])
    with pytest.raises(ValueError, match="d=2"):
        model(clouds(2, 4, 3), 0.5)
    with pytest.raises(ValueError, match=r"\(B, N, d\)"):
        E.SetDenoiser(2, 8, 1, 2)(torch.zeros(2, 4, 2, dtype=torch.long), 0.5)
    nan = x.clone()
    nan[0, 1, 0] = float("nan")
    for call in (lambda: E.remove_com(nan), lambda: model(nan, 0.5), lambda: E.zero_com_log_prob(nan)):
        with pytest.raises(ValueError, match="NaN"):
            call()
    with pytest.raises(ValueError, match="all-zero row has no centre of mass"):
        E.remove_com(x, torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="only 0"):
        E.remove_com(x, torch.tensor([[1, 0.5, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"shape \(B, N\)"):
        E.remove_com(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="at least 2"):  # one point: an empty subspace, a 0/0 loss
        E.en_diffusion_loss(Linear())(model, (x, torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    noise = E.zero_com_noise(x, mask, gen())
    noise[0, 3] = 0.1
    with pytest.raises(ValueError, match="padded"):
        E.q_sample(Linear(), E.remove_com(x, mask), 0.3, noise, mask)
    with pytest.raises(ValueError, match="zero-centre-of-mass"):
        E.q_sample(Linear(), x, 0.3, x + 1.0)
    with pytest.raises(ValueError, match="zero-centre-of-mass"):
        E.zero_com_log_prob(x + 1.0)
    with pytest.raises(ValueError, match="unknown actions"):
        E.equivariance_error(model, x, 0.5, actions=("scaling",))
    with pytest.raises(ValueError, match="det"):
        E.random_orthogonal(3, det=0)
    with pytest.raises(ValueError, match="method"):
        E.mcmc_sample(E.dw4_energy, 10, 4, 2, method="hmc")
    with pytest.raises(ValueError, match="heads"):
        E.SetDenoiser(2, width=10, heads=4)


# ---------------------------------------------------------------------------------------------
# The meta device
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [E.EGNNDenoiser, E.SetDenoiser])
@pytest.mark.parametrize("masked", [False, True])
def test_networks_and_loss_on_meta(cls, masked):
    """Forward, the E(n) loss and backward, and the subspace functions create nothing on the CPU."""
    with StrictDevices():
        model = net(cls, 2, width=8, depth=1).to("meta")
        x = torch.zeros(3, 5, 2, device="meta")
        mask = torch.ones(3, 5, device="meta") if masked else None
        out = model(x, torch.rand(3, device="meta"), mask=mask)
        batch = x if mask is None else (x, mask)
        loss = E.en_diffusion_loss(Cosine())(model, batch)
        loss.backward()
        noise = E.zero_com_noise(x, mask)
        extra = [E.remove_com(x, mask), noise, E.zero_com_log_prob(noise, mask=mask, sigma=0.5),
                 E.q_sample(Cosine(), noise, torch.rand(3, device="meta"), noise, mask), E.dw4_energy(x)]  # fmt: skip
    assert out.shape == x.shape and loss.shape == ()
    for tensor in [out, loss, *extra, *(p.grad for p in model.parameters())]:
        assert tensor.device.type == "meta"
