"""dmlib: the library behind the executable textbook on diffusion models.

Each chapter pairs with a module: Chapter 1 with :mod:`dmlib.ddpm` and :mod:`dmlib.schedules`.
"""

from . import data, ddpm, exercises, metrics, nets, oracle, parameterization, plot, profiles, schedules, train
from .oracle import GaussianMixture, MixtureOracle
from .parameterization import Denoiser
from .profiles import budget, profile
from .schedules import ddpm_tables, get_schedule
from .train import TrainConfig

__all__ = [
    "Denoiser",
    "GaussianMixture",
    "MixtureOracle",
    "TrainConfig",
    "budget",
    "data",
    "ddpm",
    "ddpm_tables",
    "exercises",
    "get_schedule",
    "metrics",
    "nets",
    "oracle",
    "parameterization",
    "plot",
    "profile",
    "profiles",
    "schedules",
    "train",
]
