"""Time series (dmlib.timeseries): the VAR(1) references against each other and closed forms, the exact
conditional denoiser against the oracle, CSDI imputation and TimeGrad forecasting against the Kalman
answers, CRPS against its closed form, the statsmodels data and baseline, bad input, devices."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
from moments import assert_moments
from test_device import StrictDevices

from dmlib import timeseries as TS
from dmlib.oracle import GaussianMixture, MixtureOracle
from dmlib.schedules import Linear
from dmlib.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py
D = torch.float64
SCHED = Linear()
N = 4000  # samples in the statistical tests: the standard errors below are for this many
AR = TS.VAR1.ar1(0.8, 0.6)
VAR = TS.VAR1([[0.6, 0.3], [-0.2, 0.5]], [[1.0, 0.3], [0.3, 0.5]])  # A not symmetric: catches a transpose


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def gappy(process, length, seed=0, share=0.5):
    """A simulated window with a random half missing (NaN), the first value observed, and its mask."""
    g = gen(seed)
    x = process.simulate(1, length, g)[0]
    mask = torch.rand(x.shape, generator=g) > share
    mask[0, 0] = True
    x[~mask] = math.nan
    return (x[:, 0], mask[:, 0]) if process.dim == 1 else (x, mask)


# ------------------------------------------------------------------------------------------------
# Exact references
# ------------------------------------------------------------------------------------------------


def test_stationary_and_window_covariance():
    """P solves P = A P A^T + Q (AR(1): 0.36 / (1 - 0.64)); simulated windows have the window covariance
    (lag blocks A^k P, not P A^k). Catches a transposed lag block or a simulator not started stationary."""
    assert abs(AR.stationary_cov().item() - 0.36 / 0.36) < 1e-14
    P = VAR.stationary_cov()
    assert torch.allclose(VAR.A @ P @ VAR.A.T + VAR.Q, P, atol=1e-14, rtol=0)
    C = VAR.window_cov(3)
    assert torch.allclose(C[2:4, 0:2], VAR.A @ P, atol=1e-14, rtol=0)
    assert torch.allclose(C[4:6, 0:2], VAR.A @ VAR.A @ P, atol=1e-14, rtol=0)
    x = VAR.simulate(20_000, 3, gen()).reshape(20_000, 6)
    assert_moments(x, torch.zeros(6, dtype=D), C)


@pytest.mark.parametrize("process", [AR, VAR], ids=["ar1", "var1"])
def test_kalman_smoother_equals_gaussian_conditional(process):
    """The RTS smoother's means and marginal covariances equal the Gaussian conditional of the window's
    joint law (to 1e-12), with times where nothing is observed. Catches a wrong gain or smoother step."""
    x, mask = gappy(process, 9, seed=1)
    mask[4] = False  # nothing observed at t = 4
    mean, cov = TS.gaussian_conditional(process, x, mask)
    means, covs = TS.kalman_smoother(process, x, mask)
    K = process.dim
    blocks = torch.stack([cov.reshape(9, K, 9, K)[i, :, i] for i in range(9)])
    assert torch.allclose(mean, means, atol=1e-12, rtol=0)
    assert torch.allclose(blocks, covs, atol=1e-12, rtol=0)
    assert torch.equal(mean[mask], x[mask])  # observed values in place
    assert cov.reshape(9 * K, 9 * K)[mask.reshape(-1)].abs().max() == 0


def test_exact_forecast_is_imputation_of_the_future():
    """The Kalman predictor equals the Gaussian conditional of a window whose last h values are missing
    (to 1e-12), and for AR(1) the closed form phi^h x_T, 0.36 (1 - phi^2h) / (1 - phi^2). Catches a
    forecast started one step late or a wrong covariance recursion."""
    x, mask = gappy(VAR, 7, seed=2)
    h = 4
    future = torch.cat([x, torch.full((h, 2), math.nan, dtype=D)])
    fmask = torch.cat([mask, torch.zeros(h, 2, dtype=torch.bool)])
    mean, cov = TS.gaussian_conditional(VAR, future, fmask)
    f_mean, f_cov = TS.exact_forecast(VAR, x, h, mask)
    assert torch.allclose(f_mean, mean[-h:], atol=1e-12, rtol=0)
    assert torch.allclose(f_cov, cov[-2 * h :, -2 * h :], atol=1e-12, rtol=0)
    series = AR.simulate(1, 5, gen(3))[0, :, 0]
    m, c = TS.exact_forecast(AR, series, 3)
    j = torch.arange(1, 4, dtype=D)
    assert torch.allclose(m, 0.8**j * series[-1], atol=1e-14, rtol=0)
    assert torch.allclose(c.diagonal(), 0.36 * (1 - 0.64**j) / 0.36, atol=1e-14, rtol=0)


def test_exact_conditional_denoiser():
    """With nothing observed it is the oracle's E[x_0 | x_t]; with a mask, on the missing entries it is the
    oracle of the conditional Gaussian; per-sample masks give each sample's answer (all to 1e-12).
    Catches alpha applied to observed entries or a mask mix-up in a batch."""
    x, mask = gappy(VAR, 6, seed=4)
    prior, den = VAR.window_prior(6), TS.ExactConditionalDenoiser(VAR.window_prior(6), SCHED)
    cond = torch.where(mask, x, 0.0)
    mean, cov = TS.gaussian_conditional(VAR, x, mask)
    u = ~mask.reshape(-1)
    conditional = MixtureOracle(GaussianMixture(mean.reshape(-1)[u][None], cov[u][:, u][None]), SCHED)
    x_t = torch.randn(5, 6, 2, generator=gen(5), dtype=D)
    none = torch.zeros(6, 2, dtype=torch.bool)
    for t in (0.02, 0.4, 0.97):
        t = torch.tensor(t, dtype=D)
        ref = MixtureOracle(prior, SCHED).x0(x_t.reshape(5, -1), t).reshape(5, 6, 2)
        assert torch.allclose(den(x_t, t, cond, none), ref, atol=1e-12, rtol=0)
        got = den(x_t, t, cond, mask).reshape(5, -1)
        assert torch.allclose(got[:, u], conditional.x0(x_t.reshape(5, -1)[:, u], t), atol=1e-12, rtol=0)
    masks = torch.stack([mask, none, ~mask, mask, none])
    ts = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=D)
    batch = den(x_t, ts, cond.expand(5, 6, 2), masks)
    for b in range(5):
        assert torch.allclose(batch[b], den(x_t[b : b + 1], ts[b], cond, masks[b])[0], atol=1e-12, rtol=0)


def test_impute_with_exact_denoiser_matches_kalman():
    """CSDI sampling with the exact conditional denoiser (DPM-Solver-3, 20 steps) draws the Kalman
    conditional: mean and covariance of the missing entries within 4.5 SE (n = 4000); the observed
    values come back bit for bit. Catches a sampler that lets observed values drift or a wrong grid."""
    x, mask = gappy(VAR, 8, seed=6)
    den = TS.ExactConditionalDenoiser(VAR.window_prior(8), SCHED)
    samples = TS.impute(den, SCHED, x, mask, N, sampler="dpm_solver_3", n_steps=20, generator=gen(7))
    assert samples.shape == (N, 8, 2) and samples.dtype == D
    assert torch.equal(samples[:, mask], x[mask].expand(N, -1))
    mean, cov = TS.gaussian_conditional(VAR, x, mask)
    u = ~mask.reshape(-1)
    assert_moments(samples.reshape(N, -1)[:, u], mean.reshape(-1)[u], cov[u][:, u])


# ------------------------------------------------------------------------------------------------
# CSDI training
# ------------------------------------------------------------------------------------------------


def test_csdi_loss_scores_only_hidden_observed_values():
    """A model that knows the noise on the hidden observed values and answers garbage elsewhere (the
    condition, never-observed NaN entries) has loss 0; the condition never contains a hidden or missing
    value; about half the observed values are hidden (share ~ U(0, 1): mean 1/2, within 4.5 SE).
    Catches a loss over the condition or over missing values, or NaN leaking into the condition."""
    batch = AR.simulate(512, 10, gen(8))[..., 0]
    batch[torch.rand(batch.shape, generator=gen(9)) < 0.2] = math.nan
    seen = {}

    def cheat(x_t, t, cond, mask):
        observed = torch.isfinite(batch)
        assert not (mask & ~observed).any() and torch.isfinite(cond).all()
        assert torch.equal(torch.where(mask, cond, 0.0), torch.where(mask, batch, 0.0))
        a, s = SCHED.alpha(t)[:, None], SCHED.sigma(t)[:, None]
        eps = (x_t - a * torch.nan_to_num(batch)) / s
        seen["hidden"] = (observed & ~mask).sum(1) / observed.sum(1)
        return torch.where(observed & ~mask, eps, 1e3)

    assert TS.csdi_loss(SCHED)(cheat, batch, gen(10)).item() < 1e-20
    share = seen["hidden"]
    assert abs(share.mean().item() - 0.5) < 4.5 * (1 / 12 / 512) ** 0.5 + 0.02  # + 0.02: binomial thinning


def test_csdi_training_approaches_the_exact_loss():
    """On AR(1) windows with 20% missing, 400 training steps bring the CSDI loss from an untrained MLP's
    toward the exact denoiser's (the Bayes-optimal loss), never below it (common random numbers, 8 fixed
    batches). Catches a loss and denoiser that disagree on the mask convention."""
    L = 8
    data = AR.simulate(4096, L, gen(11), dtype=torch.float32)[..., 0]
    data[torch.rand(data.shape, generator=gen(12)) < 0.2] = math.nan
    loss = TS.csdi_loss(SCHED)

    def score(model, dtype=torch.float32):
        with torch.no_grad():
            return (
                sum(
                    loss(model, data[i * 512 : (i + 1) * 512].to(dtype), gen(100 + i)).item()
                    for i in range(8)
                )
                / 8
            )

    exact = TS.ExactConditionalDenoiser(AR.window_prior(L), SCHED, prediction="eps")
    model = TS.CSDIDenoiser((L,), hidden=64, depth=2)
    before, best = score(model), score(exact, D)
    cfg = TrainConfig(steps=400, batch_size=256, lr=3e-3, progress=False, ema_decay=0.99, device="cpu")
    after = score(train(model, data, loss, cfg).ema)
    assert best < after < before
    assert after - best < 0.5 * (before - best), (before, after, best)


# ------------------------------------------------------------------------------------------------
# TimeGrad
# ------------------------------------------------------------------------------------------------


def test_timegrad_training_path_equals_sampling_path():
    """The teacher-forced forward at position j equals the sampling path's denoise with the state after
    x_1 .. x_j (encode, then advance), to 1e-12. Catches an off-by-one between training and sampling."""
    model = TS.TimeGrad(channels=2, hidden=16).double()
    history = torch.randn(3, 6, 2, generator=gen(13), dtype=D)
    x_t = torch.randn(3, 6, 2, generator=gen(14), dtype=D)
    t = torch.rand(3, 6, generator=gen(15), dtype=D)
    out = model(x_t, t, history)
    state = model.encode(history[:, :1])
    for j in range(6):
        if j > 0:
            assert torch.allclose(state, model.encode(history[:, : j + 1]), atol=1e-12, rtol=0)
        assert torch.allclose(out[:, j], model.denoise(x_t[:, j], t[:, j], state), atol=1e-12, rtol=0)
        if j < 5:
            state = model.advance(state, history[:, j + 1])


def test_forecast_with_exact_forecaster_matches_kalman_predictor():
    """TimeGrad's autoregressive sampler with the exact VAR(1) step law draws the Kalman predictor's joint
    law of the next 3 values (mean A^j x_T: the forecast starts from the last observation), within 4.5 SE;
    with increments, paths are the last value plus the cumulated draws (exactly). Catches a state not
    advanced with the drawn value, or a path started anywhere but at the last observation."""
    history = VAR.simulate(1, 6, gen(16))[0]
    model = TS.ExactVARForecaster(VAR, SCHED)
    paths = TS.forecast(model, SCHED, history, 3, N, sampler="dpm_solver_3", n_steps=20, generator=gen(17))
    assert paths.shape == (N, 3, 2)
    mean, cov = TS.exact_forecast(VAR, history, 3)
    assert_moments(paths.reshape(N, -1), mean.reshape(-1), cov)
    series = AR.simulate(1, 6, gen(18))[0, :, 0]
    ar = TS.ExactVARForecaster(AR, SCHED)
    steps = TS.forecast(ar, SCHED, series.diff(), 4, 7, n_steps=5, generator=gen(19))
    levels = TS.forecast(ar, SCHED, series, 4, 7, n_steps=5, increments=True, generator=gen(19))
    assert torch.equal(levels, series[-1] + steps.cumsum(1))


def test_timegrad_training_lowers_the_loss():
    """300 steps on AR(1) windows (a few seconds) lower TimeGrad's loss on fixed batches by a third
    (untrained: ~1.3). Catches a loss that does not train, e.g. targets not aligned with the states."""
    data = AR.simulate(2048, 16, gen(20), dtype=torch.float32)[..., 0]
    loss, model = TS.timegrad_loss(SCHED), TS.TimeGrad(hidden=32)

    def score(m):
        with torch.no_grad():
            return sum(loss(m, data[i * 256 : (i + 1) * 256], gen(200 + i)).item() for i in range(4)) / 4

    before = score(model)
    cfg = TrainConfig(steps=300, batch_size=128, lr=3e-3, progress=False, ema_decay=0.99, device="cpu")
    after = score(train(model, data, loss, cfg).ema)
    assert after < 2 / 3 * before, (before, after)
    paths = TS.forecast(model, SCHED, data[0], 5, 16, n_steps=10, generator=gen(21))
    assert paths.shape == (16, 5) and torch.isfinite(paths).all()


# ------------------------------------------------------------------------------------------------
# CRPS and coverage
# ------------------------------------------------------------------------------------------------


def test_crps_gaussian_against_its_integral():
    """The closed form equals int (Phi((x - m)/s) - 1{x >= y})^2 dx (scipy quad, 1e-9) at several points.
    Catches a wrong constant (1/sqrt(pi)) or a sign."""
    from scipy.integrate import quad
    from scipy.stats import norm

    for m, s, y in ((0.0, 1.0, 0.3), (1.5, 0.4, -0.2), (-2.0, 3.0, 4.0)):
        below = quad(lambda x, m=m, s=s: norm.cdf(x, m, s) ** 2, -np.inf, y)[0]
        above = quad(lambda x, m=m, s=s: (1 - norm.cdf(x, m, s)) ** 2, y, np.inf)[0]
        got = TS.crps_gaussian(torch.tensor(m, dtype=D), torch.tensor(s, dtype=D), torch.tensor(y, dtype=D))
        assert abs(got.item() - (below + above)) < 1e-9


def test_crps_samples_sorted_form_and_bias():
    """The sorted O(n log n) form equals the double sum (1e-12); one sample gives |x - y|; over 2000 sets
    of 10 Gaussian draws the fair CRPS averages to the closed form and the plain one exceeds it by
    E|X - X'| / 2n = std / (n sqrt(pi)), both within 4.5 SE. Catches the wrong normalization."""
    x, y = torch.randn(7, 3, generator=gen(22), dtype=D), torch.randn(3, generator=gen(23), dtype=D)
    pair = (x[:, None] - x[None]).abs().sum((0, 1))
    spread = (x - y).abs().mean(0)
    assert torch.allclose(TS.crps_samples(x, y), spread - pair / (2 * 49), atol=1e-12, rtol=0)
    assert torch.allclose(TS.crps_samples(x, y, fair=True), spread - pair / (2 * 42), atol=1e-12, rtol=0)
    assert torch.allclose(TS.crps_samples(x[:1], y), (x[0] - y).abs(), atol=0, rtol=0)
    n, m, s, y = 10, 0.5, 2.0, torch.tensor(1.3, dtype=D)
    draws = m + s * torch.randn(n, 2000, generator=gen(24), dtype=D)
    exact = TS.crps_gaussian(torch.tensor(m, dtype=D), torch.tensor(s, dtype=D), y).item()
    for fair, bias in ((True, 0.0), (False, s / (n * math.sqrt(math.pi)))):
        est = TS.crps_samples(draws, y, fair=fair)
        se = est.std().item() / 2000**0.5
        assert abs(est.mean().item() - exact - bias) < 4.5 * se, (fair, est.mean(), exact, bias, se)


def test_interval_coverage():
    """Central Gaussian intervals cover draws of their own Gaussian at their level (binomial SE, 4.5 SE);
    the 90% z is 1.6448536...; sample intervals of 20000 draws match the Gaussian ones (quantile SE).
    Catches a one-sided interval or quantiles swapped."""
    y = 1.0 + 2.0 * torch.randn(20_000, generator=gen(25), dtype=D)
    lo, hi = TS.gaussian_interval(torch.tensor(1.0, dtype=D), torch.tensor(2.0, dtype=D), 0.9)
    assert abs(hi.item() - 1.0 - 2.0 * 1.6448536269514722) < 1e-12
    for level in (0.5, 0.9):
        lo, hi = TS.gaussian_interval(torch.tensor(1.0, dtype=D), torch.tensor(2.0, dtype=D), level)
        share = TS.coverage(lo, hi, y).item()
        assert abs(share - level) < 4.5 * (level * (1 - level) / 20_000) ** 0.5
        s_lo, s_hi = TS.sample_interval(y, level)
        z = float(torch.special.ndtri(torch.tensor((1 + level) / 2, dtype=D)))
        q_se = (
            2.0
            * math.sqrt((1 - level) / 2 * (1 + level) / 2 / 20_000)
            / math.exp(-(z**2) / 2)
            * math.sqrt(2 * math.pi)
        )
        assert abs(s_lo - lo) < 4.5 * q_se and abs(s_hi - hi) < 4.5 * q_se
    assert TS.coverage(torch.tensor(0.0), torch.tensor(1.0), torch.tensor([0.5, math.nan, 2.0])).item() == 0.5


# ------------------------------------------------------------------------------------------------
# Real data and the classical baseline
# ------------------------------------------------------------------------------------------------


def test_datasets_load_offline(monkeypatch):
    """Every data set loads with the network cut (the CSVs ship in statsmodels); co2 keeps its 59 missing
    weeks as NaN; the training part is standardized (mean 0, std 1 to 1e-12) and precedes the test part
    in time. Catches a download, scaling that peeks at the test part, or NaN silently dropped."""

    def no_network(*args, **kwargs):
        raise AssertionError("a data loader tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    sizes = {"co2": 2284, "sunspots": 309, "elnino": 732}
    for name, size in sizes.items():
        s = TS.load_series(name)
        train = s.values[: s.split].numpy()
        assert len(s.values) == size and s.split == round(0.8 * size)
        assert abs(np.nanmean(train)) < 1e-12 and abs(np.nanstd(train) - 1) < 1e-12
        assert (np.diff(s.times) > 0).all()
        assert int((~s.observed).sum()) == (59 if name == "co2" else 0)
    s = TS.load_series("elnino")
    assert abs(s.unscale(s.values[0]).item() - 23.11) < 1e-12  # January 1950, as in the CSV


def test_fill_missing_and_windows():
    """Linear interpolation is exact on a line and holds the ends; windows keep NaN for CSDI's mask.
    Catches interpolation on the wrong axis or windows that drop the last one."""
    line = torch.arange(8, dtype=D)
    gaps = line.clone()
    gaps[[0, 3, 4, 7]] = math.nan
    assert torch.equal(TS.fill_missing(gaps), torch.tensor([1, 1, 2, 3, 4, 5, 6, 6], dtype=D))
    w = TS.windows(gaps, 4, stride=2)
    assert w.shape == (3, 4) and torch.equal(torch.isnan(w), torch.isnan(gaps.unfold(0, 4, 2)))
    assert TS.windows(torch.zeros(10, 3), 5).shape == (6, 5, 3)


@pytest.fixture(scope="module")
def elnino():
    series = TS.load_series("elnino")
    return series, TS.fit_baseline(series)


def test_evaluate_forecasts_alignment_and_calibration(elnino):
    """A forecaster handed the true future scores CRPS 0 and coverage 1 (the history and the truth are
    aligned); one that samples the baseline's own Gaussian scores the baseline's CRPS on average over 8
    seeds (fair CRPS: within 4.5 SE). The baseline tolerates NaN in its history and its std grows with the
    horizon. Catches misaligned origins or a biased sample CRPS."""
    series, fitted = elnino

    def oracle(history, h, n, g):
        return series.values[len(history) : len(history) + h].expand(n, h)

    perfect = TS.evaluate_forecasts(series, oracle, horizon=6, n_origins=5, n_samples=4, fitted=fitted)
    with pytest.raises(ValueError, match=r"must return \(4, 6\) samples"):
        TS.evaluate_forecasts(series, lambda *a: oracle(*a)[..., None], horizon=6, n_samples=4, fitted=fitted)
    assert perfect["model"]["crps"] == 0 and perfect["model"]["coverage_90"] == 1 and perfect["scored"] == 30

    def sampled(history, h, n, g):
        mean, std = TS.baseline_forecast(fitted, history, h)
        return mean + std * torch.randn(n, h, generator=g, dtype=D)

    runs = [TS.evaluate_forecasts(series, sampled, horizon=6, n_origins=5, n_samples=50, seed=k, fitted=fitted)
            for k in range(8)]  # fmt: skip
    model = torch.tensor([r["model"]["crps"] for r in runs], dtype=D)
    assert abs(model.mean().item() - runs[0]["baseline"]["crps"]) < 4.5 * model.std().item() / 8**0.5
    history = series.values[:600].clone()
    history[[100, 599]] = math.nan
    mean, std = TS.baseline_forecast(fitted, history, 5)
    assert torch.isfinite(mean).all() and (std.diff() > 0).all()


# ------------------------------------------------------------------------------------------------
# Bad input and devices
# ------------------------------------------------------------------------------------------------


def test_bad_input():
    """Wrong mask shapes or dtypes, NaN outside the mask, horizons <= 0, unknown data sets and samplers,
    a non-stationary process: clear errors."""
    x, mask = gappy(AR, 6)
    den = TS.ExactConditionalDenoiser(AR.window_prior(6), SCHED)
    bad = x.clone()
    bad[0] = math.nan  # observed per the mask
    cases = [
        (lambda: TS.impute(den, SCHED, x, mask[:5], 4), ValueError, "mask must have the shape"),
        (lambda: TS.impute(den, SCHED, x, mask.float(), 4), TypeError, "boolean"),
        (lambda: TS.impute(den, SCHED, bad, mask, 4), ValueError, "NaN .* where mask says observed"),
        (lambda: TS.impute(den, SCHED, x, mask, 4, sampler="nope"), ValueError, "unknown sampler"),
        (lambda: TS.kalman_smoother(AR, bad, mask), ValueError, "where mask says observed"),
        (lambda: TS.gaussian_conditional(AR, x, mask[None]), ValueError, "mask must have the shape"),
        (lambda: TS.gaussian_conditional(VAR, x, mask), ValueError, r"\(L, 2\)"),
        (lambda: TS.exact_forecast(AR, torch.zeros(5, dtype=D), 0), ValueError, "horizon"),
        (
            lambda: TS.forecast(TS.ExactVARForecaster(AR, SCHED), SCHED, torch.zeros(5, dtype=D), -1, 4),
            ValueError,
            "horizon",
        ),  # fmt: skip
        (lambda: TS.forecast(TS.ExactVARForecaster(AR, SCHED), SCHED, x, 2, 4), ValueError, "fill_missing"),
        (lambda: TS.load_series("airline"), ValueError, "unknown data set 'airline'; choose one of co2"),
        (lambda: TS.VAR1([[1.0]], [[1.0]]), ValueError, "not stationary"),
        (lambda: TS.VAR1([[0.5]], [[-1.0]]), ValueError, "positive definite"),
        (
            lambda: TS.ExactConditionalDenoiser(GaussianMixture([[0.0], [1.0]], stds=1.0), SCHED),
            ValueError,
            "one-component",
        ),  # fmt: skip
        (
            lambda: TS.CSDIDenoiser((6,))(
                torch.zeros(2, 5), 0.5, torch.zeros(5), torch.ones(5, dtype=torch.bool)
            ),
            ValueError,
            r"shape \(B, 6\)",
        ),  # fmt: skip
        (lambda: TS.crps_samples(torch.zeros(1, 3), torch.zeros(3), fair=True), ValueError, "at least 2"),
        (lambda: TS.gaussian_interval(0.0, 1.0, 1.5), ValueError, "level"),
    ]
    for fn, err, match in cases:
        with pytest.raises(err, match=match):
            fn()
    assert TS.gaussian_conditional(AR, torch.zeros(6, dtype=D))[1].abs().max() == 0  # all observed: exact


def test_meta_device():
    """The denoisers, both training losses, imputation and forecasting (two sampler steps each) and the
    scores create every tensor on their inputs' device (the statsmodels parts are CPU by design)."""
    x = torch.zeros(6, 2, dtype=D, device="meta")
    mask = torch.zeros(6, 2, dtype=torch.bool, device="meta")
    exact = TS.ExactConditionalDenoiser(VAR.window_prior(6), SCHED)
    net, tg = TS.CSDIDenoiser((6, 2), hidden=16).to("meta", D), TS.TimeGrad(2, hidden=8).to("meta", D)
    batch, t = torch.zeros(4, 6, 2, dtype=D, device="meta"), torch.full((4,), 0.5, dtype=D, device="meta")
    with StrictDevices():
        outs = [
            exact(batch, t, x, mask),
            net(batch, t, x, mask),
            TS.csdi_loss(SCHED)(net, batch),
            TS.csdi_loss(SCHED)(TS.ExactConditionalDenoiser(VAR.window_prior(6), SCHED, "eps"), batch),
            TS.timegrad_loss(SCHED)(tg, batch),
            TS.impute(net, SCHED, x, mask, 3, n_steps=2),
            TS.impute(exact, SCHED, x, mask, 3, n_steps=2),
            TS.forecast(tg, SCHED, x, 2, 3, n_steps=2),
            TS.forecast(TS.ExactVARForecaster(VAR, SCHED), SCHED, x, 2, 3, n_steps=2, increments=True),
            TS.crps_samples(batch, x),
            TS.crps_gaussian(x, x + 1, x),
            *TS.sample_interval(batch, 0.9),
        ]
    assert all(o.device.type == "meta" for o in outs)
