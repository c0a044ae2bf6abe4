import pytest
import torch

from dmlib.schedules import SCHEDULES, DDPMTables, Linear, Schedule, ddpm_tables, get_schedule

VP = [name for name in SCHEDULES if SCHEDULES[name].variance_preserving]

T_GRID = torch.linspace(0, 1, 101, dtype=torch.float64)


@pytest.mark.parametrize("name", VP)
def test_variance_preserving_and_monotone(name):
    s = get_schedule(name)
    a, sig = s.alpha(T_GRID), s.sigma(T_GRID)
    torch.testing.assert_close(a**2 + sig**2, torch.ones_like(a))
    assert a[0] == 1 and sig[0] == 0
    lam = s.log_snr(T_GRID[1:])
    assert (lam[1:] < lam[:-1]).all(), "log-SNR must decrease strictly in t"
    torch.testing.assert_close(lam, torch.log(a[1:] ** 2 / sig[1:] ** 2))


@pytest.mark.parametrize("name", SCHEDULES)
def test_log_snr_inverse_round_trips(name):
    s = get_schedule(name)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    torch.testing.assert_close(s.t_from_log_snr(s.log_snr(t)), t, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", VP)
def test_tables_reproduce_the_continuous_schedule(name):
    s = get_schedule(name)
    tables = ddpm_tables(s, 200)
    torch.testing.assert_close(
        tables.alphas_cumprod, s.alpha_bar(torch.arange(201, dtype=torch.float64) / 200)
    )
    # betatilde_t < beta_t: the posterior is narrower than the forward step
    assert (tables.posterior_variance[2:] < tables.betas[2:]).all()


def test_linear_closed_form_inverse_equals_bisection():
    s = Linear()
    lam = torch.linspace(-25, 25, 101, dtype=torch.float64)  # beyond both ends: clamps to 0 and 1
    torch.testing.assert_close(s.t_from_log_snr(lam), Schedule.t_from_log_snr(s, lam), atol=1e-12, rtol=0)


def test_linear_matches_ho_et_al_table():
    ho = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    derived = ddpm_tables(Linear(), 1000).betas[1:]
    assert (derived - ho).abs().max() < 3e-4
    abar_ho = torch.cumprod(1 - ho, 0)
    assert abs(derived.new_tensor(abar_ho[-1].item()) - ddpm_tables(Linear(), 1000).alphas_cumprod[-1]) < 1e-5


def test_cosine_matches_nichol_dhariwal_formula():
    s = get_schedule("cosine")
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    f = lambda u: torch.cos((u + 0.008) / 1.008 * torch.pi / 2) ** 2  # noqa: E731
    torch.testing.assert_close(s.alpha_bar(t), f(t) / f(torch.zeros(1, dtype=torch.float64)))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_time_out_of_range_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        get_schedule("linear").alpha(torch.tensor([0.5, bad]))


@pytest.mark.parametrize(
    "betas,where",
    [([0.1, 1.0, 0.2], "beta_2 = 1"), ([0.0, 0.1], "beta_1 = 0"), ([0.1, -0.2], "beta_2 = -0.2")],
)
def test_betas_outside_unit_interval_rejected(betas, where):
    with pytest.raises(ValueError, match=where):
        DDPMTables.from_betas(betas)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="'cosin'.*linear, cosine, sigmoid, ve, subvp"):
        get_schedule("cosin")


def test_bad_step_count():
    with pytest.raises(ValueError, match="positive integer"):
        ddpm_tables(Linear(), 0)


def test_tables_refuse_a_schedule_that_is_not_variance_preserving():
    with pytest.raises(ValueError, match="variance-preserving"):
        ddpm_tables(get_schedule("ve"), 10)


@pytest.mark.parametrize("name", SCHEDULES)
def test_log_snr_decreases_and_matches_alpha_sigma(name):
    s = get_schedule(name)
    t = T_GRID[1:]
    lam = s.log_snr(t)
    assert (lam[1:] < lam[:-1]).all()
    torch.testing.assert_close(lam, 2 * torch.log(s.alpha(t) / s.sigma(t)))


@pytest.mark.parametrize("name", SCHEDULES)
def test_closed_form_sde_coefficients_agree_with_alpha_sigma(name):
    """f = dlog(alpha)/dt and g^2 = dsigma^2/dt - 2 f sigma^2: the printed (f, g) of Song et al. (2021)
    for VP, VE and sub-VP against the generic autograd derivation from the schedule's own curves.
    A wrong closed form (say g^2 = beta for sub-VP) fails here."""
    s = get_schedule(name)
    t = torch.linspace(0.01, 0.99, 37, dtype=torch.float64)
    f, g2 = s.drift_diffusion(t)
    f_ref, g2_ref = Schedule.drift_diffusion(s, t)
    torch.testing.assert_close(f, f_ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(g2, g2_ref, rtol=1e-7, atol=1e-9)
    assert (g2 >= 0).all()
    with torch.no_grad():  # how samplers call it: the generic derivative must survive no_grad
        torch.testing.assert_close(Schedule.drift_diffusion(s, t)[1], g2_ref)


def test_printed_coefficients():
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    f, g2 = get_schedule("linear").drift_diffusion(t)
    torch.testing.assert_close(g2, 0.1 + t * 19.9)  # beta(t) of the VP SDE, 0.1 -> 20
    torch.testing.assert_close(f, -g2 / 2)
    ve = get_schedule("ve", sigma_min=0.01, sigma_max=50.0)
    f, g2 = ve.drift_diffusion(t)
    assert (f == 0).all()
    torch.testing.assert_close(ve.sigma(t), 0.01 * 5000.0**t)
    _, g2_sub = get_schedule("subvp").drift_diffusion(t)
    B = 0.1 * t + 0.5 * 19.9 * t**2
    torch.testing.assert_close(g2_sub, (0.1 + 19.9 * t) * (1 - torch.exp(-2 * B)))


def test_subvp_variance_is_below_vp():
    t = T_GRID[1:]
    sub, vp = get_schedule("subvp"), get_schedule("linear")
    torch.testing.assert_close(sub.alpha(t), vp.alpha(t))
    assert (sub.sigma(t) < vp.sigma(t)).all()


@pytest.mark.parametrize("name", SCHEDULES)
def test_transition_composes(name):
    """q(x_t|x_0) = q(x_t|x_s) q(x_s|x_0):
    alpha_t = alpha_{t|s} alpha_s and sigma_t^2 = alpha_{t|s}^2 sigma_s^2 + sigma_{t|s}^2."""
    s = get_schedule(name)
    t, u = torch.tensor([0.4, 0.9], dtype=torch.float64), torch.tensor([0.1, 0.5], dtype=torch.float64)
    a_tu, var_tu = s.transition(t, u)
    torch.testing.assert_close(a_tu * s.alpha(u), s.alpha(t))
    torch.testing.assert_close(a_tu**2 * s.sigma(u) ** 2 + var_tu, s.sigma(t) ** 2)


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("ve", {"sigma_min": 0.0}, "sigma_min"),
        ("ve", {"sigma_min": 2.0, "sigma_max": 1.0}, "sigma_min"),
        ("subvp", {"beta_min": -1.0}, "beta_min"),
    ],
)
def test_bad_schedule_parameters(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_schedule(name, **kwargs)
