"""Statistical assertions shared by test modules (import as ``from moments import assert_moments``)."""

from __future__ import annotations

import torch


def assert_moments(x, mean, cov, z=4.5):
    """Sample mean and covariance within ``z`` standard errors: ``sqrt(C_ii / n)`` for the mean and
    ``sqrt((C_ii C_jj + C_ij^2) / n)`` for a covariance entry (Gaussian fourth moments)."""
    n, var = x.shape[0], cov.diagonal()
    se_mean = (var / n).sqrt()
    se_cov = ((var[:, None] * var[None] + cov**2) / n).sqrt()
    assert ((x.mean(0) - mean).abs() <= z * se_mean + 1e-12).all(), (x.mean(0), mean, se_mean)
    assert ((torch.cov(x.T) - cov).abs() <= z * se_cov + 1e-12).all(), (torch.cov(x.T), cov, se_cov)
