"""VAEs, GANs and flows beside diffusion (dmlib.connections): closed forms, quadrature, finite differences."""

import math

import pytest
import torch
from test_device import StrictDevices

from dmlib import connections as C
from dmlib import data, metrics
from dmlib.ddpm import posterior
from dmlib.oracle import MixtureOracle
from dmlib.schedules import Cosine, Linear
from dmlib.sde import pf_ode_drift
from dmlib.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
D = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# VAE: a linear-Gaussian VAE, where log p(x), the posterior and the ELBO gap are closed forms
# ---------------------------------------------------------------------------------------------

S2 = 0.25  # decoder variance


def linear_vae(exact_posterior=True):
    """dim 3, latent 2, decoder x = W z + b + N(0, S2 I) with orthogonal columns of W, so that the
    exact posterior N(M^{-1} W^T (x - b) / S2, M^{-1}), M = I + W^T W / S2, is diagonal: the encoder can
    represent it. Returns the model and (W, b)."""
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen(1), dtype=D))
    W, b = q[:, :2] * torch.tensor([1.5, 0.7], dtype=D), torch.tensor([0.3, -0.2, 0.5], dtype=D)
    post_var = 1 / (1 + (W**2).sum(0) / S2)  # diag M^{-1}
    vae = C.GaussianVAE(dim=3, latent_dim=2, depth=0, decoder_var=S2).double()
    with torch.no_grad():
        enc, dec = vae.encoder[0], vae.decoder[0]
        dec.weight.copy_(W), dec.bias.copy_(b)
        enc.weight.zero_(), enc.bias.zero_()
        enc.weight[:2] = post_var[:, None] * W.T / S2
        enc.bias[:2] = -(post_var[:, None] * W.T / S2) @ b
        enc.bias[2:] = post_var.log()
        if not exact_posterior:
            enc.bias[:2] += torch.tensor([0.4, -0.3], dtype=D)
            enc.bias[2:] += torch.tensor([0.6, -0.5], dtype=D)
    return vae, W, b


def exact_log_p(x, W, b):
    cov = W @ W.T + S2 * torch.eye(3, dtype=D)
    return torch.distributions.MultivariateNormal(b, cov).log_prob(x)


def posterior_kl(vae, x, W, b):
    """KL(q(z|x) || p(z|x)) between diagonal Gaussians, in closed form."""
    mq, lvq = vae.encode(x)
    vp = 1 / (1 + (W**2).sum(0) / S2)
    mp = (x - b) @ W / S2 * vp
    return 0.5 * (torch.log(vp) - lvq + (lvq.exp() + (mq - mp) ** 2) / vp - 1).sum(1)


X3 = torch.tensor([[0.5, -1.0, 2.0], [-1.5, 0.2, 0.1]], dtype=D)


def test_iwae_is_exact_with_the_exact_posterior():
    """With q(z|x) = p(z|x) every importance weight is p(x): the estimate equals the closed form log p(x)
    for any K (catches a wrong prior, decoder or encoder density term in the weight)."""
    vae, W, b = linear_vae()
    for k in (1, 7):
        assert torch.allclose(C.vae_iwae(vae, X3, k, gen(2)), exact_log_p(X3, W, b), atol=1e-10, rtol=0)


@pytest.mark.parametrize("exact", [True, False])
def test_elbo_equals_log_p_minus_posterior_kl(exact):
    """Eq. 10's Monte Carlo ELBO averages to log p(x) - KL(q || p(z|x)) (closed forms), within 4.5 standard
    errors over 20000 draws: equal to log p(x) at the optimum, strictly below it (by > 10 SE) otherwise
    (catches a wrong analytic KL, a missing log-variance term, a reparameterization with the variance)."""
    vae, W, b = linear_vae(exact)
    n = 20000
    for x in X3:
        draws = C.vae_elbo(vae, x.expand(n, 3), 1, gen(3))
        mean, se = draws.mean(), draws.std() / math.sqrt(n)
        gap = posterior_kl(vae, x[None], W, b)[0]
        assert abs(mean - (exact_log_p(x, W, b) - gap)) < 4.5 * se
        if exact:
            assert gap.abs() < 1e-12
        else:
            assert gap > 0.3 and exact_log_p(x, W, b) - mean > 10 * se


def test_iwae_tightens_the_bound():
    """For a wrong encoder, E[IWAE_K] rises from the ELBO (K = 1) towards log p(x) (Burda et al.,
    Theorem 1): IWAE_64 lies between them, each gap beyond 4 SE (catches averaging weights in log space)."""
    vae, W, b = linear_vae(exact_posterior=False)
    x = X3[:1].expand(2000, 3)
    elbo, iwae = C.vae_elbo(vae, x, 1, gen(4)), C.vae_iwae(vae, x, 64, gen(5))
    se = (elbo.var() / 2000 + iwae.var() / 2000).sqrt()
    assert iwae.mean() - elbo.mean() > 4 * se
    assert exact_log_p(X3[0], W, b) - iwae.mean() > 4 * iwae.std() / math.sqrt(2000)


def test_vae_trains_with_train_towards_the_exact_posterior():
    """A linear VAE trained by dmlib.train on Gaussian data: its bound's gap to its own exact log p(x),
    the mean KL(q || p(z|x)) in closed form, falls below 0.02 nats, and its log-likelihood comes within
    0.05 nats of the data's entropy (catches a loss with the wrong sign or not usable with train)."""
    L = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.5, 0.0], [-0.3, 0.2, 0.4]], dtype=D)
    x = torch.randn(4096, 3, generator=gen(6), dtype=D) @ L.T
    vae = C.GaussianVAE(dim=3, latent_dim=3, depth=0).double()
    cfg = TrainConfig(steps=1500, batch_size=256, lr=1e-2, ema_decay=0.0, progress=False, device="cpu")
    model = train(vae, x, C.vae_loss, cfg).model
    W, b, var = model.decoder[0].weight, model.decoder[0].bias, model.decoder_logvar.exp()
    with torch.no_grad():
        p = torch.distributions.MultivariateNormal(b, W @ W.T + torch.diag(var))
        mq, lvq = model.encode(x)
        M = torch.eye(3, dtype=D) + W.T @ (W / var[:, None])
        cov_post, mean_post = torch.linalg.inv(M), (x - b) @ (W / var[:, None]) @ torch.linalg.inv(M)
        q = torch.distributions.MultivariateNormal(mq, torch.diag_embed(lvq.exp()))
        gap = torch.distributions.kl_divergence(
            q, torch.distributions.MultivariateNormal(mean_post, cov_post)
        )
        entropy = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=D), L @ L.T).entropy()
        assert gap.mean() < 0.02
        assert abs(-p.log_prob(x).mean() - entropy) < 0.05


# ---------------------------------------------------------------------------------------------
# The true reverse kernel
# ---------------------------------------------------------------------------------------------


def test_kernel_matches_two_stage_sampling(mixture):
    """q(x_s | x_t) in closed form against importance sampling of the two stages, x0 ~ p(x0) weighted by
    q(x_t | x0), then x_s ~ q(x_s | x_t, x0) (dmlib.ddpm.posterior): means, second moments and P(x_1 > 0)
    within 4.5 SE (catches wrong responsibilities, component posteriors or posterior coefficients)."""
    sched, t, s = Cosine(), 0.6, 0.25
    x_t = torch.tensor([[0.3, -0.2]], dtype=D)
    n, g = 200_000, gen(7)
    x0 = mixture.sample(n, g, dtype=D)
    a, sig = sched.alpha(torch.tensor(t, dtype=D)), sched.sigma(torch.tensor(t, dtype=D))
    w = torch.softmax(-((x_t - a * x0) ** 2).sum(1) / (2 * sig**2), 0)
    mean, var = posterior(sched, x_t.expand(n, 2), x0, t, s)
    x_s = mean + var.sqrt() * torch.randn(n, 2, generator=g, dtype=D)
    kernel = C.reverse_kernel(mixture, sched, x_t, t, s)
    m, cov = kernel.moments()
    sd = kernel.covs[:, 0, 0].sqrt()
    p_pos = (kernel.weights[0] * torch.special.ndtr(kernel.means[0, :, 0] / sd)).sum()
    stats = [
        (x_s[:, 0], m[0, 0]),
        (x_s[:, 1], m[0, 1]),
        (x_s[:, 0] ** 2, cov[0, 0, 0] + m[0, 0] ** 2),
        (x_s[:, 1] ** 2, cov[0, 1, 1] + m[0, 1] ** 2),
        (x_s[:, 0] * x_s[:, 1], cov[0, 0, 1] + m[0, 0] * m[0, 1]),
        ((x_s[:, 0] > 0).to(D), p_pos),
    ]
    for f, exact in stats:
        est = (w * f).sum()
        se = ((w**2) * (f - est) ** 2).sum().sqrt()
        assert abs(est - exact) < 4.5 * se, (est, exact, se)


def test_kernel_density_and_sampler(mixture):
    """The kernel's density integrates to 1 on a grid (1e-6) and its sampler's moments match the closed
    form within 4.5 SE (catches a wrong normalization or Cholesky factor)."""
    kernel = C.reverse_kernel(mixture, Linear(), torch.tensor([[0.5, 0.5]], dtype=D), 0.4, 0.1)
    g = torch.linspace(-6, 6, 601, dtype=D)
    grid = torch.cartesian_prod(g, g)
    mass = C.reverse_kernel(
        mixture, Linear(), torch.tensor([[0.5, 0.5]], dtype=D).expand(len(grid), 2), 0.4, 0.1
    )
    assert abs(mass.log_prob(grid).exp().sum() * (g[1] - g[0]) ** 2 - 1) < 1e-6
    n = 20000
    many = C.reverse_kernel(mixture, Linear(), torch.tensor([[0.5, 0.5]], dtype=D).expand(n, 2), 0.4, 0.1)
    x = many.sample(gen(8))
    m, cov = kernel.moments()
    assert ((x.mean(0) - m[0]).abs() < 4.5 * cov[0].diagonal().sqrt() / math.sqrt(n)).all()
    assert (kernel[0].weights == kernel.weights[0]).all() and kernel[0].means.shape == (3, 2)


def test_kernel_is_gaussian_for_small_steps_and_multimodal_for_large():
    """KL to the best (moment-matched) Gaussian: below 1e-3 nats for a step of 1e-3, above 1.5 nats (and
    20 SE) for the last step of a 2-step linear-schedule sampler on eight_gaussians, the reason a
    Gaussian reverse step fails at 2-4 steps (catches a kernel that is always one Gaussian or never one)."""
    mix, sched, g = data.eight_gaussians(), Linear(), gen(9)
    t = torch.tensor(0.5, dtype=D)
    x_t = sched.alpha(t) * mix.sample(4, g, dtype=D) + sched.sigma(t) * torch.randn(
        4, 2, generator=g, dtype=D
    )
    small, small_se = C.kernel_gaussian_kl(C.reverse_kernel(mix, sched, x_t, 0.5, 0.499), 200, g)
    large, large_se = C.kernel_gaussian_kl(C.reverse_kernel(mix, sched, x_t, 0.5, 0.0), 200, g)
    assert (small.abs() < 1e-3).all()
    assert (large > 1.5).all() and (large > 20 * large_se).all()


# ---------------------------------------------------------------------------------------------
# DDGAN
# ---------------------------------------------------------------------------------------------


def test_ddgan_losses_and_r1_by_finite_differences():
    """The losses are finite, and R1 is ||grad_{x_s} D||^2 (central differences, 1e-7 relative; catches
    a gradient taken with respect to x_t or a missing square)."""
    torch.manual_seed(0)
    model = C.DDGAN(Cosine(), T=3, hidden=32, depth=2).double()
    x0 = data.eight_gaussians().sample(64, gen(10), dtype=D)
    assert torch.isfinite(C.discriminator_loss(model, x0, gen(11), r1_gamma=1.0))
    assert torch.isfinite(C.generator_loss(model, x0, gen(12)))
    x_s, x_t = torch.randn(5, 2, generator=gen(13), dtype=D), torch.randn(5, 2, generator=gen(14), dtype=D)
    t, h = torch.full((5,), 2 / 3, dtype=D), 1e-6
    fd = torch.stack(
        [
            (model.logit(x_s + h * e, x_t, t) - model.logit(x_s - h * e, x_t, t)) / (2 * h)
            for e in torch.eye(2, dtype=D)
        ],
        1,
    )
    r1 = C.r1_penalty(model, x_s, x_t, t)
    assert torch.allclose(r1, (fd**2).sum(1), rtol=1e-7, atol=0)
    assert r1.requires_grad  # it must train the discriminator


def test_ddgan_sampler_costs_T_evaluations():
    """sample_ddgan calls the generator once per step (NFE = T) and sees T + 1 states (catches a sampler
    that evaluates twice per step, or skips the last step)."""
    model = C.DDGAN(Linear(), T=3, hidden=16, depth=1).double()
    calls, states = [], []
    model.generator_net.register_forward_hook(lambda *_: calls.append(1))
    x = C.sample_ddgan(
        model, torch.randn(10, 2, dtype=D), generator=gen(), callback=lambda i, t, x: states.append(i)
    )
    assert len(calls) == 3 and states == [0, 1, 2, 3] and x.shape == (10, 2)


def test_ddgan_short_training_improves_sliced_w():
    """300 alternating steps on eight_gaussians (T = 2, R1 weight 30) lower the sliced W of the samples to
    the data by at least 40%: 1.40 -> 0.45-0.50 for the EMA generator, 0.50-0.58 for the last iterate
    over five seeds (catches a generator that gets no gradient, or the wrong sign)."""
    torch.manual_seed(0)
    mix, g = data.eight_gaussians(), gen(15)
    model = C.DDGAN(Cosine(), T=2, hidden=64, depth=2)
    x = mix.sample(4096, g)

    def sw(m):
        gg = gen(16)
        samples = C.sample_ddgan(m, torch.randn(2000, 2, generator=gg), generator=gg)
        return metrics.sliced_wasserstein(samples.double(), mix.sample(2000, gg, dtype=D), generator=gg)

    before = sw(model)
    losses, ema = C.train_ddgan(model, x, 300, batch_size=256, lr=(1e-3, 1e-3), r1_gamma=30.0, generator=g)
    assert torch.isfinite(losses).all() and losses.shape == (300, 2)
    assert sw(ema) < 0.6 * before and sw(model) < 0.6 * before


# ---------------------------------------------------------------------------------------------
# Normalizing flows
# ---------------------------------------------------------------------------------------------


def random_flow(seed=0, n_layers=4):
    """A flow with random (not identity) couplings."""
    torch.manual_seed(seed)
    flow = C.RealNVP(dim=2, n_layers=n_layers, hidden=16, depth=2).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0, 0.4)
    return flow


def test_flow_density_integrates_to_one():
    """Trapezoid quadrature of exp(log p) on [-12, 12]^2 is 1 within 1e-3 (with every one of 20000 samples
    inside the box; catches a missing or wrongly signed log-determinant)."""
    flow = random_flow()
    with torch.no_grad():
        assert flow.sample(20000, gen(17)).abs().max() < 11
        g = torch.linspace(-12, 12, 801, dtype=D)
        p = flow.log_prob(torch.cartesian_prod(g, g)).exp()
    assert abs(p.sum() * (g[1] - g[0]) ** 2 - 1) < 1e-3


def test_flow_inverse_and_log_det():
    """inverse(forward(x)) = x to 1e-10, and the log-determinant equals log|det| of the autograd Jacobian
    to 1e-8 (catches an inverse that misses the permutation, a log-det of the wrong layer)."""
    flow = random_flow(1, n_layers=5)
    x = torch.randn(6, 2, generator=gen(18), dtype=D) * 2
    z, log_det = flow(x)
    assert (flow.inverse(z) - x).abs().max() < 1e-10
    for i in range(len(x)):
        J = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[i])
        assert abs(torch.linalg.slogdet(J).logabsdet - log_det[i]) < 1e-8


def test_flow_trains_by_maximum_likelihood():
    """flow_nll_loss with dmlib.train: the exact held-out NLL falls below the best Gaussian's (closed
    form, 0.5 log det(2 pi e S)) by 0.5 nats, and stays above the data's entropy (Gibbs), within 4 SE."""
    mix = data.eight_gaussians(std=0.3)
    x = mix.sample(4096, gen(19), dtype=D)
    flow = C.RealNVP(dim=2, n_layers=6, hidden=32, depth=2).double()
    cfg = TrainConfig(steps=400, batch_size=256, lr=3e-3, ema_decay=0.0, progress=False, device="cpu")
    flow = train(flow, x, C.flow_nll_loss, cfg).model
    test = mix.sample(4000, gen(20), dtype=D)
    with torch.no_grad():
        excess = mix.log_prob(test) - flow.log_prob(test)  # NLL - entropy, paired
    gauss = 0.5 * torch.logdet(2 * math.pi * math.e * torch.cov(x.T))
    assert -flow.log_prob(test).mean() < gauss - 0.5
    assert excess.mean() > -4 * excess.std() / math.sqrt(len(test))


def test_pf_ode_is_a_cnf(mixture):
    """The PF-ODE's log-likelihood increment (cnf_log_prob's delta) equals log|det| of the flow map's
    Jacobian, computed by autograd through an RK4 solve (1e-4): Liouville's formula, the CNF change of
    variables (catches a divergence with the wrong sign or a missing factor)."""
    sched, t_eps = Linear(), 1e-3
    den = MixtureOracle(mixture, sched).denoiser()
    x = torch.tensor([[0.2, -0.4], [-1.0, 0.3]], dtype=D)
    delta = C.cnf_log_prob(den, x, t_eps=t_eps, rtol=1e-9, atol=1e-9).delta

    def flow_map(v, n=150):  # the batch's points move independently: J is block-diagonal
        ts = torch.linspace(t_eps, 1, n + 1, dtype=D)
        f = lambda y, s: pf_ode_drift(den, y, s)  # noqa: E731
        for a, b in zip(ts[:-1], ts[1:]):
            h = b - a
            k1 = f(v, a)
            k2 = f(v + h / 2 * k1, a + h / 2)
            k3 = f(v + h / 2 * k2, a + h / 2)
            v = v + h / 6 * (k1 + 2 * k2 + 2 * k3 + f(v + h * k3, b))
        return v

    J = torch.autograd.functional.jacobian(flow_map, x)  # (B, 2, B, 2)
    log_det = torch.stack([torch.linalg.slogdet(J[i, :, i, :]).logabsdet for i in range(len(x))])
    assert (log_det - delta).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------
# The table row
# ---------------------------------------------------------------------------------------------


def test_table_row():
    """A perfect model: NLL equal to the data's on the same points, 8/8 modes, sliced W at the two-sample
    noise floor (about 0.18 for 2000 points: the modes' counts fluctuate); the moment-matched Gaussian:
    NLL = D/2 + log det(2 pi S)/2 within 4 SE (closed form); a collapsed model: 1 mode (catches the NLL
    on the wrong points, swapped labels, coverage measured on the data instead)."""
    mix = data.eight_gaussians()
    row = C.table_row(
        "oracle",
        lambda n, g: mix.sample(n, g, dtype=D),
        mix,
        nfe=0,
        log_prob_fn=mix.log_prob,
        nll_kind="exact",
        generator=gen(21),
    )
    assert row["NLL"] == row["data NLL"] and row["modes"] == row["n_modes"] == 8 and row["sliced W"] < 0.3
    cov = (mix.weights[:, None, None] * (mix.covs + mix.means[:, :, None] * mix.means[:, None, :])).sum(0)
    gauss = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=D), cov)  # moment-matched: mean 0
    n, chol = 8000, torch.linalg.cholesky(cov)
    row = C.table_row(
        "gaussian",
        lambda n, g: torch.randn(n, 2, generator=g, dtype=D) @ chol.T,
        mix,
        nfe=1,
        log_prob_fn=gauss.log_prob,
        nll_kind="exact",
        n=n,
        generator=gen(23),
    )
    se = gauss.log_prob(mix.sample(n, gen(22), dtype=D)).std() / math.sqrt(n)
    assert (
        abs(row["NLL"] - (1 + 0.5 * torch.logdet(2 * math.pi * cov))) < 4 * se and row["NLL kind"] == "exact"
    )
    one = C.table_row(
        "collapsed",
        lambda n, g: mix.means[:1].expand(n, 2) + 0.05 * torch.randn(n, 2, generator=g, dtype=D),
        mix,
        nfe=1,
        generator=gen(24),
    )
    assert one["modes"] == 1 and one["sliced W"] > 1.5 and one["NLL"] is None and one["NLL kind"] == "none"


# ---------------------------------------------------------------------------------------------
# Bad input and devices
# ---------------------------------------------------------------------------------------------


def test_bad_input():
    mix, x = data.eight_gaussians(), torch.zeros(4, 2, dtype=D)
    with pytest.raises(ValueError, match="s < t"):
        C.reverse_kernel(mix, Linear(), x, 0.3, 0.3)
    with pytest.raises(ValueError, match="s < t"):
        C.reverse_kernel(mix, Linear(), x, 0.3, 0.5)
    with pytest.raises(ValueError, match="scalars"):
        C.reverse_kernel(mix, Linear(), x, torch.full((4,), 0.5), 0.1)
    with pytest.raises(ValueError, match=r"x_t must be a tensor of shape \(B, 2\)"):
        C.reverse_kernel(mix, Linear(), torch.zeros(4, 3), 0.5, 0.1)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        C.reverse_kernel(mix, Linear(), x, 1.5, 0.1)
    for T in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="T must be a whole number"):
            C.DDGAN(Linear(), T=T)
    model = C.DDGAN(Linear(), T=2, hidden=8, depth=1).double()
    with pytest.raises(ValueError, match=r"x0 must be a tensor of shape \(B, 2\)"):
        C.discriminator_loss(model, torch.zeros(4, 3, dtype=D))
    with pytest.raises(ValueError, match="the grid it was trained on"):
        C.sample_ddgan(model, x, torch.linspace(1, 0, 5))
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(B, 2\)"):
        C.vae_loss(C.GaussianVAE(), torch.zeros(4))
    with pytest.raises(ValueError, match="decoder_var must be a positive"):
        C.GaussianVAE(decoder_var=-1.0)
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(B, 2\)"):
        C.flow_nll_loss(C.RealNVP(), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="nll_kind must be one of"):
        C.table_row("m", lambda n, g: x, mix, nfe=1, nll_kind="approx")
    with pytest.raises(ValueError, match="give log_prob_fn"):
        C.table_row("m", lambda n, g: x, mix, nfe=1, nll_kind="exact")


def test_meta_device():
    """reverse_kernel (and its sampler, density, moments), the VAE loss, the flow's log-density and both
    DDGAN losses, forward and backward, create every tensor on their inputs' device."""
    x = torch.zeros(8, 2, dtype=D, device="meta")
    mix = data.eight_gaussians()
    with StrictDevices():
        kernel = C.reverse_kernel(mix, Cosine(), x, 0.5, 0.2)
        outs = [
            kernel.weights,
            kernel.means,
            kernel.covs,
            kernel.log_prob(kernel.sample()),
            *kernel.moments(),
        ]
        for make, loss in [
            (lambda: C.GaussianVAE(), C.vae_loss),
            (lambda: C.RealNVP(), C.flow_nll_loss),
            (lambda: C.DDGAN(Linear(), T=2, hidden=8), C.discriminator_loss),
            (lambda: C.DDGAN(Linear(), T=2, hidden=8), C.generator_loss),
        ]:
            model = make().double().to("meta")
            value = loss(model, x)
            value.backward()
            outs += [value, *(p.grad for p in model.parameters() if p.grad is not None)]
    assert all(o.device.type == "meta" for o in outs)
