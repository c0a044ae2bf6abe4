import pytest
import torch

from dmlib.schedules import SCHEDULES, DDPMTables, Linear, ddpm_tables, get_schedule

T_GRID = torch.linspace(0, 1, 101, dtype=torch.float64)


@pytest.mark.parametrize("name", SCHEDULES)
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


@pytest.mark.parametrize("name", SCHEDULES)
def test_tables_reproduce_the_continuous_schedule(name):
    s = get_schedule(name)
    tables = ddpm_tables(s, 200)
    torch.testing.assert_close(
        tables.alphas_cumprod, s.alpha_bar(torch.arange(201, dtype=torch.float64) / 200)
    )
    # betatilde_t < beta_t: the posterior is narrower than the forward step
    assert (tables.posterior_variance[2:] < tables.betas[2:]).all()


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
    with pytest.raises(ValueError, match="'cosin'.*linear, cosine, sigmoid"):
        get_schedule("cosin")


def test_bad_step_count():
    with pytest.raises(ValueError, match="positive integer"):
        ddpm_tables(Linear(), 0)
