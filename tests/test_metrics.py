import math

import pytest
import torch

from dmlib import metrics


def test_sliced_wasserstein_of_a_shift_is_its_length_over_sqrt_dim(gen):
    """For y = x + c, every projection shifts by u.c, so SW_2^2 = E (u.c)^2 = |c|^2 / D exactly."""
    x = torch.randn(500, 2, generator=gen, dtype=torch.float64)
    c = torch.tensor([0.6, -0.8], dtype=torch.float64)
    sw = metrics.sliced_wasserstein(x, x + c, n_projections=8000, generator=gen)
    assert abs(sw - 1 / math.sqrt(2)) < 0.01  # Monte Carlo error over directions: about 0.003
    assert metrics.sliced_wasserstein(x, x.flip(0), generator=gen) < 1e-12


def test_energy_distance_separates(gen):
    x, y = torch.randn(1500, 2, generator=gen), torch.randn(1500, 2, generator=gen)
    same = metrics.energy_distance(x, y)
    shifted = metrics.energy_distance(x, y + 0.5)
    assert abs(same) < 0.01 and shifted > 10 * abs(same)


def test_mode_coverage_counts_modes(eight, gen):
    x = eight.sample(4000, gen)
    full = metrics.mode_coverage(x, eight)
    assert full["modes"] == 8 and full["near"] > 0.98  # P(|z| < 3) in 2D is 1 - exp(-4.5) = 0.989
    keep = torch.cdist(x, eight.means.float()).argmin(1) != 3  # drop one mode entirely
    assert metrics.mode_coverage(x[keep], eight)["modes"] == 7
    assert metrics.mode_coverage(x + 1.0, eight)["near"] < 0.1


def test_cross_entropy_of_data_is_its_entropy(eight, gen):
    """An isotropic mixture with well-separated modes has entropy log K + log(2 pi e sigma^2)."""
    x = eight.sample(50_000, gen)
    want = math.log(8) + math.log(2 * math.pi * math.e * 0.1**2)
    assert abs(metrics.cross_entropy(x, eight.log_prob) - want) < 0.02


def test_mismatched_sets_rejected():
    with pytest.raises(ValueError, match="equal D"):
        metrics.energy_distance(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="equal sample counts"):
        metrics.sliced_wasserstein(torch.zeros(3, 2), torch.zeros(4, 2))
