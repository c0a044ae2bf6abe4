"""dmlib.robust: PGD against closed forms, EOT against numerical integration, DiffPure's output law against
the exact Gaussian-mixture posterior, AnoDDPM's reconstruction error against its Gaussian closed form, and
the AUROC against the Mann-Whitney statistic and scikit-learn."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_device import StrictDevices
from torch import nn

from dmlib import data
from dmlib import robust as R
from dmlib.nets import MLP, UNet
from dmlib.oracle import GaussianMixture, MixtureOracle
from dmlib.parameterization import Denoiser
from dmlib.schedules import get_schedule
from dmlib.train import load_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster on 2 shared cores
D = torch.float64
COSINE = get_schedule("cosine")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def digits():
    """The split and a classifier trained on it (about a second)."""
    x_train, y_train, x_test, y_test = R.digits_split()
    return R.train_classifier(x_train, y_train), x_test, y_test


@pytest.fixture(scope="module")
def shipped():
    """The digits DDPM that the book ships (Chapters 3 and 4 load it the same way)."""
    spec = json.loads((data.DATA_DIR / "registry.json").read_text())["ddpm_digits_unet16"]
    net = load_weights(UNet(**spec["unet"]), data.DATA_DIR / spec["file"]).eval().requires_grad_(False)
    return Denoiser(net, get_schedule(spec["schedule"]), "eps", clip_x0=(-1, 1))


class Linear2(nn.Module):
    """Two-class logits ``[0, w.x + b]``: the cross-entropy of class 0 rises along +w, of class 1 along -w."""

    def __init__(self, w, b=0.3):
        super().__init__()
        self.w, self.b = torch.as_tensor(w, dtype=D), b

    def forward(self, x):
        z = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(z), z], 1)


# ------------------------------------------------------------------------------------------------
# Classifier
# ------------------------------------------------------------------------------------------------


def test_digits_split_is_a_partition():
    """Train and test together are the dataset, each image and label once (catches an overlapping split)."""
    x_train, y_train, x_test, y_test = R.digits_split(0.25, seed=3)
    assert len(x_test) == round(0.25 * 1797)
    x, y = data.load_digits(with_labels=True)
    rows = lambda images, labels: torch.cat([images.flatten(1), labels[:, None].float()], 1)  # noqa: E731
    split = torch.unique(
        rows(torch.cat([x_train, x_test]), torch.cat([y_train, y_test])), dim=0, return_counts=True
    )
    whole = torch.unique(rows(x, y), dim=0, return_counts=True)
    assert all(torch.equal(a, b) for a, b in zip(split, whole))


def test_classifier_accuracy(digits):
    """A held-out accuracy above 95% (measured 97.6%): catches labels shuffled against images, or no training."""
    classifier, x_test, y_test = digits
    assert R.accuracy(classifier, x_test, y_test) > 0.95


# ------------------------------------------------------------------------------------------------
# PGD and EOT
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_linf_on_linear_model_reaches_the_corner(random_start):
    """For a linear model the L_inf maximizer is the corner ``x + eps sgn(+-w)``, which PGD reaches exactly
    (catches descent instead of ascent, a wrong label's sign, or a missing projection)."""
    w = torch.tensor([0.5, -2.0, 1.0], dtype=D)
    x = torch.randn(6, 3, generator=gen(), dtype=D)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    eps = 0.3
    x_adv = R.pgd(Linear2(w), x, y, eps=eps, steps=3, step_size=eps, random_start=random_start, clip=None,
                  generator=gen(1))  # fmt: skip
    direction = torch.where(y[:, None] == 0, 1.0, -1.0).to(D) * w.sign()
    torch.testing.assert_close(x_adv, x + eps * direction, rtol=0, atol=1e-12)


def test_pgd_l2_on_linear_model_moves_along_w():
    """The L_2 maximizer for a linear model is ``x + eps (+-w) / ||w||`` (catches an unnormalized step or
    a projection that does not rescale)."""
    w = torch.tensor([0.5, -2.0, 1.0], dtype=D)
    x = torch.randn(6, 3, generator=gen(), dtype=D)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    eps = 0.7
    x_adv = R.pgd(Linear2(w), x, y, eps=eps, steps=1, norm="l2", step_size=1e9, clip=None, generator=gen(1))
    direction = torch.where(y[:, None] == 0, 1.0, -1.0).to(D) * w / w.norm()
    torch.testing.assert_close(x_adv, x + eps * direction, rtol=0, atol=1e-8)
    x_adv = R.pgd(Linear2(w), x, y, eps=eps, steps=20, norm="l2", random_start=False, clip=None)
    torch.testing.assert_close(x_adv, x + eps * direction, rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm, eps", [("linf", 0.3), ("l2", 2.0)])
def test_pgd_attacks_digits_inside_the_ball(digits, norm, eps):
    """On the digits classifier PGD stays in the ball and in [-1, 1] and drops the accuracy from ~98% to
    below 30% (catches an attack that clips away its own steps or ascends the wrong way)."""
    classifier, x, y = digits
    x, y = x[:128], y[:128]
    x_adv = R.pgd(classifier, x, y, eps=eps, steps=10, norm=norm, generator=gen())
    size = (x_adv - x).flatten(1).abs().amax(1) if norm == "linf" else (x_adv - x).flatten(1).norm(dim=1)
    assert size.max() <= eps * (1 + 1e-6) and x_adv.min() >= -1 and x_adv.max() <= 1
    assert R.accuracy(classifier, x, y) > 0.95 and R.accuracy(classifier, x_adv, y) < 0.3


def test_eot_gradient_matches_gauss_hermite():
    """A defence that adds noise, logits ``[0, w.x + s z]``, z ~ N(0, 1): the EOT gradient of the loss of
    class 0 is ``w E[sigmoid(w.x + s z)]`` (Gauss-Hermite, 60 nodes), matched within 4 standard errors of
    the 4000-draw mean. The logits-averaging mistake (``w sigmoid(w.x)`` here) is 15 standard errors away."""
    w, s = torch.tensor([1.0, -0.5], dtype=D), 2.0
    x = torch.tensor([[0.6, -0.8], [-0.4, 0.4], [0.0, 0.0]], dtype=D)
    generator = gen()

    def noisy(x):
        z = torch.randn(x.shape[0], generator=generator, dtype=D)
        return torch.stack([torch.zeros_like(z), x @ w + s * z], 1)

    draws = 4000
    grad = R.eot_gradient(noisy, x, torch.zeros(3, dtype=torch.long), draws)
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    u = (x @ w).numpy()[:, None] + s * nodes[None]
    mean_sigmoid = (weights / math.sqrt(2 * math.pi) * (1 / (1 + np.exp(-u)))).sum(1)
    second = (weights / math.sqrt(2 * math.pi) * (1 / (1 + np.exp(-u))) ** 2).sum(1)
    se = np.sqrt((second - mean_sigmoid**2) / draws)
    coef = (grad / w).numpy()  # each row is w times the mean sigmoid
    assert np.allclose(coef[:, 0], coef[:, 1])
    assert np.all(np.abs(coef[:, 0] - mean_sigmoid) < 4 * se)
    naive = 1 / (1 + np.exp(-(x @ w).numpy()))
    assert np.abs(coef[0, 0] - naive[0]) > 10 * se[0]


# ------------------------------------------------------------------------------------------------
# Purification
# ------------------------------------------------------------------------------------------------


def _law_differences(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two sample sets' differences in mean, variance per coordinate and P(x_1 > 0), in standard errors."""
    n = a.shape[0]
    d_mean = (a.mean(0) - b.mean(0)) / ((a.var(0) + b.var(0)) / n).sqrt()
    fourth = lambda s: ((s - s.mean(0)) ** 4).mean(0) - s.var(0) ** 2  # noqa: E731  Var of (s - mean)^2
    d_var = (a.var(0) - b.var(0)) / ((fourth(a) + fourth(b)) / n).sqrt()
    pa, pb = (a[:, 0] > 0).double().mean(), (b[:, 0] > 0).double().mean()
    d_mode = (pa - pb) / ((pa * (1 - pa) + pb * (1 - pb)) / n).sqrt()
    return torch.cat([d_mean, d_var, d_mode[None]]).abs()


def test_purify_matches_exact_law_on_oracle():
    """DiffPure's output law with the exact denoiser and 200 ancestral steps equals the exact
    ``int p(x0 | x_t*) q(x_t* | x) dx_t*`` (:func:`purify_exact`): means, variances and the mode share agree
    within 4 standard errors at two inputs (4000 draws each). Deterministic DDIM from ``x_t*`` is another
    law (the ODE flow of q(x_t* | x), not the posterior), and fails the same check: the test has power
    against a reverse process that is not the posterior, a wrong t* or a wrong forward marginal."""
    mix = GaussianMixture([[-1.5, 0.0], [1.5, 0.0]], stds=0.4)
    denoiser = MixtureOracle(mix, COSINE).denoiser()
    n, t_star = 4000, 0.5
    for point in ([0.4, 0.3], [1.2, -0.5]):
        x = torch.tensor(point, dtype=D).expand(n, 2)
        exact = R.purify_exact(mix, COSINE, x, t_star, generator=gen(1))
        ancestral = R.purify(denoiser, x, t_star, steps=200, generator=gen(2))
        assert _law_differences(ancestral, exact).max() < 4
        ddim = R.purify(denoiser, x, t_star, steps=200, sampler="ddim", generator=gen(2))
        assert _law_differences(ddim, exact).max() > 8


def test_purify_is_differentiable():
    """The gradient through diffusion and three ancestral steps matches finite differences (float64, noise
    fixed by the generator): catches a no_grad or a detach on the path an adaptive attack needs."""
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=16, depth=2).double()
    denoiser = Denoiser(net, COSINE, "eps")
    x = torch.randn(3, 2, generator=gen(), dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: R.purify(denoiser, z, 0.4, steps=3, generator=gen(5)), (x,))


def test_robustness_report_on_shipped_digits_model(digits, shipped):
    """On 64 test digits (eps = 0.3 in L_inf on [-1, 1], t* = 0.3, 10 PGD steps): the attack breaks the
    undefended classifier, purification keeps most clean digits and restores much of the accuracy against
    the non-adaptive attack, and the adaptive attack (EOT through the purifier) does no worse for the
    attacker (measured: clean 1.0, purified 0.98, undefended 0.13, non-adaptive 0.73, adaptive 0.72).
    Catches a purifier that is skipped or an adaptive attack that never reaches the purifier's input."""
    classifier, x, y = digits
    report = R.robustness_report(classifier, shipped, x[:64], y[:64], t_star=0.3, eps=0.3, attack_steps=10,
                                 purify_steps=5, draws=2, generator=gen())  # fmt: skip
    assert report["clean"] > 0.95 and report["clean_purified"] > 0.9
    assert report["undefended"] < 0.3 and report["non_adaptive"] > report["undefended"] + 0.3
    assert report["adaptive"] <= report["non_adaptive"] + 0.05


# ------------------------------------------------------------------------------------------------
# Anomaly detection
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 200])
def test_anomaly_score_gaussian_closed_form(steps):
    """For data N(m, s^2 I) the reconstruction from t is linear-Gaussian: with ``g = a s^2 / (a^2 s^2 +
    sigma^2)`` and ``P = s^2 sigma^2 / (a^2 s^2 + sigma^2)``, ``E||x - x_hat||^2 = (1 - g a)^2 ||x - m||^2
    + D (g^2 sigma^2 + P)`` with the exact posterior, and without ``P`` for one step (the denoising step
    ``E[x0 | x_t]``). Checked within 4 standard errors of 4000 draws (catches a wrong noise scale, a
    missing reverse noise or a score that is not the squared error)."""
    m, s, t, n = torch.tensor([0.5, -1.0], dtype=D), 0.6, 0.4, 4000
    denoiser = MixtureOracle(GaussianMixture(m[None], stds=s), COSINE).denoiser()
    a, sigma = (float(f(torch.tensor(t, dtype=D))) for f in (COSINE.alpha, COSINE.sigma))
    g, P = a * s**2 / (a**2 * s**2 + sigma**2), s**2 * sigma**2 / (a**2 * s**2 + sigma**2)
    for point in ([2.0, 1.0], [0.5, -1.0]):
        x = torch.tensor(point, dtype=D).expand(n, 2)
        score = R.anomaly_score(denoiser, x, t, steps=steps, generator=gen(steps))
        exact = (1 - g * a) ** 2 * ((x[0] - m) ** 2).sum() + 2 * (g**2 * sigma**2 + (P if steps > 1 else 0))
        assert abs(score.mean() - exact) < 4 * score.std() / math.sqrt(n)


def test_auroc_hand_case_and_sklearn():
    """The AUROC is P(S_a > S_n) + P(tie) / 2: a hand-counted case with ties (3.5 of 6 pairs), and equality
    with scikit-learn's roc_auc_score on data with many ties (catches ties counted as 0 or 1)."""
    assert R.auroc(torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.5, 0.7])) == pytest.approx(
        3.5 / 6, abs=1e-15
    )
    assert R.auroc(torch.tensor([1.0]), torch.tensor([2.0])) == 1.0
    assert R.auroc(torch.tensor([2.0]), torch.tensor([1.0])) == 0.0
    from sklearn.metrics import roc_auc_score

    normal = torch.randint(0, 20, (300,), generator=gen()).double()
    anomalous = torch.randint(5, 25, (200,), generator=gen(1)).double()
    labels = np.r_[np.zeros(300), np.ones(200)]
    expected = roc_auc_score(labels, torch.cat([normal, anomalous]).numpy())
    assert R.auroc(normal, anomalous) == pytest.approx(expected, abs=1e-12)


def test_toy_reconstruction_below_exact_likelihood_ceiling():
    """Eight Gaussians against uniform box anomalies: -log p is the Neyman-Pearson ceiling (measured AUROC
    0.981); the reconstruction score with the exact denoiser detects anomalies at t = 0.1 (0.954) but stays
    below the ceiling, and loses them at t = 0.7 (0.51), where the input is forgotten. Catches a score of
    the wrong sign, or one that does not depend on how far the input is from the data."""
    mix = data.eight_gaussians()
    denoiser = MixtureOracle(mix, COSINE).denoiser()
    generator = gen()
    normal, anomalous = mix.sample(2000, generator, dtype=D), R.box_anomalies(mix, 2000, generator=generator)
    ceiling = R.auroc(-mix.log_prob(normal), -mix.log_prob(anomalous))

    def reconstruction_auroc(t):
        score = lambda z: R.anomaly_score(denoiser, z, t, steps=20, generator=generator)  # noqa: E731
        return R.auroc(score(normal), score(anomalous))

    assert ceiling > 0.97
    assert 0.9 < reconstruction_auroc(0.1) < ceiling
    assert reconstruction_auroc(0.7) < 0.6


def test_box_anomalies_cover_the_box():
    """Uniform on [mean - 4 std, mean + 4 std] over the components: the extremes and the mean of the draws."""
    mix = GaussianMixture([[0.0, 0.0], [2.0, 1.0]], stds=[0.5, 0.25])
    x = R.box_anomalies(mix, 20_000, generator=gen())
    lo, hi = torch.tensor([-2.0, -2.0], dtype=D), torch.tensor([3.0, 2.0], dtype=D)
    assert (x >= lo).all() and (x <= hi).all()
    torch.testing.assert_close(x.mean(0), (lo + hi) / 2, rtol=0, atol=4 * 5 / math.sqrt(12 * 20_000))


def test_one_class_split():
    """No held-out digit in the training or normal test set; every held-out digit among the anomalies."""
    train, normal, anomalous = R.one_class_split(3)
    x, y = data.load_digits(with_labels=True)
    threes = x[y == 3].flatten(1)
    assert len(train) + len(normal) + len(anomalous) == 1797 and len(anomalous) == len(threes)
    for part in (train, normal):
        assert torch.cdist(part.flatten(1), threes).min() > 0
    assert torch.cdist(anomalous.flatten(1), threes).min(1).values.max() == 0


def test_one_class_digits_runs_with_a_tiny_budget():
    """The chapter's helper end to end with 20 training steps: its AUROC is the AUROC of the scores it
    returns, one score per normal test digit and per held-out digit."""
    out = R.one_class_digits(7, train_steps=20, t=0.3, steps=3, base=8)
    _, normal, anomalous = R.one_class_split(7)
    assert out["scores_normal"].shape == (len(normal),) and out["scores_anomalous"].shape == (len(anomalous),)
    assert out["auroc"] == R.auroc(out["scores_normal"], out["scores_anomalous"])


# ------------------------------------------------------------------------------------------------
# Bad input and devices
# ------------------------------------------------------------------------------------------------


def test_bad_input(digits):
    """Each bad argument is refused with a message naming it."""
    classifier, x, y = digits
    x, y = x[:4], y[:4]
    denoiser = MixtureOracle(data.eight_gaussians(), COSINE).denoiser()
    z = torch.zeros(4, 2, dtype=D)
    for t_star in (0, -0.1, 1.5, float("nan"), "0.3"):
        with pytest.raises(ValueError, match="t\\* must be a number in \\(0, 1\\]"):
            R.purify(denoiser, z, t_star)
    with pytest.raises(ValueError, match="t\\*"):
        R.anomaly_score(denoiser, z, 0.0)
    with pytest.raises(ValueError, match="t\\*"):
        R.purify_exact(data.eight_gaussians(), COSINE, z, 2.0)
    for eps in (0, -0.1, float("inf")):
        with pytest.raises(ValueError, match="eps must be a positive"):
            R.pgd(classifier, x, y, eps=eps)
    for bad in (dict(steps=0), dict(steps=1.5), dict(draws=0)):
        with pytest.raises(ValueError, match="must be a positive integer"):
            R.pgd(classifier, x, y, eps=0.1, **bad)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        R.purify(denoiser, z, 0.3, steps=0)
    with pytest.raises(ValueError, match="unknown norm"):
        R.pgd(classifier, x, y, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="unknown reverse process"):
        R.purify(denoiser, z, 0.3, sampler="heun")
    with pytest.raises(ValueError, match="clip must be a range"):
        R.pgd(classifier, x, y, eps=0.1, clip=(1, -1))
    with pytest.raises(ValueError, match="step_size must be a positive"):
        R.pgd(classifier, x, y, eps=0.1, step_size=0.0)
    with pytest.raises(ValueError, match="y must be integer labels of shape \\(4,\\)"):
        R.pgd(classifier, x, y[:3], eps=0.1)
    with pytest.raises(ValueError, match="y must be integer labels"):
        R.pgd(classifier, x, y.double(), eps=0.1)
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        R.pgd(classifier, x, torch.tensor([0, 1, 2, 10]), eps=0.1)
    with pytest.raises(ValueError, match="DigitClassifier expects digits of shape"):
        classifier(x.flatten(1))
    with pytest.raises(ValueError, match="\\(B, C\\) logits"):
        R.eot_gradient(lambda v: v.sum(1), z, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        R.auroc(torch.tensor([]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        R.auroc(torch.ones(2, 2), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        R.auroc(torch.tensor([0.0, float("nan")]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="held_out must be a digit"):
        R.one_class_split(10)
    with pytest.raises(ValueError, match="test_fraction"):
        R.digits_split(1.0)


def test_meta_device():
    """PGD (one step, and one step through a two-step purifier), purification and the anomaly score create
    every tensor on their inputs' device and read no value back (meta, under StrictDevices)."""
    classifier = R.DigitClassifier().to("meta")
    images, labels = torch.zeros(4, 1, 8, 8, device="meta"), torch.zeros(4, dtype=torch.long, device="meta")
    denoiser = Denoiser(MLP(dim=2, hidden=16, depth=1).to("meta"), COSINE, "eps")
    head = nn.Linear(2, 3).to("meta")
    x, y = torch.zeros(4, 2, device="meta"), torch.zeros(4, dtype=torch.long, device="meta")
    with StrictDevices():
        outs = [
            R.pgd(classifier, images, labels, eps=0.1, steps=1),
            R.pgd(classifier, images, labels, eps=0.5, steps=1, norm="l2"),
            R.purify(denoiser, x, 0.3, steps=3),
            R.purify(denoiser, x, 0.3, steps=3, sampler="ddim"),
            R.anomaly_score(denoiser, x, 0.3, steps=2, draws=2),
            R.pgd(R.purified(head, denoiser, 0.3, steps=2), x, y, eps=0.1, steps=1, draws=2, clip=None),
        ]
    assert all(o.device.type == "meta" for o in outs)
