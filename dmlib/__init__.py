"""dmlib: the library behind the executable textbook on diffusion models.

Each chapter pairs with a module: Chapter 1 with :mod:`dmlib.ddpm` and :mod:`dmlib.schedules`;
Chapter 2 with :mod:`dmlib.score`, :mod:`dmlib.sde` and :mod:`dmlib.cld`; Chapter 3 with
:mod:`dmlib.samplers` and :mod:`dmlib.acceleration`; Chapter 4 with :mod:`dmlib.likelihood`;
Chapter 5 with :mod:`dmlib.discrete` and :mod:`dmlib.token_data`; Chapter 6 with
:mod:`dmlib.equivariant`, :mod:`dmlib.manifolds` and :mod:`dmlib.latent`; Chapter 7 with
:mod:`dmlib.parameterization` and :mod:`dmlib.guidance`; Chapter 8 with :mod:`dmlib.flows`,
:mod:`dmlib.connections` and :mod:`dmlib.energy`; Chapter 9 with :mod:`dmlib.inverse` and
:mod:`dmlib.robust`; Chapter 10 with :mod:`dmlib.timeseries`.
"""

from . import (
    acceleration,
    cld,
    connections,
    data,
    ddpm,
    discrete,
    energy,
    equivariant,
    exercises,
    flows,
    guidance,
    inverse,
    latent,
    likelihood,
    manifolds,
    metrics,
    nets,
    oracle,
    parameterization,
    plot,
    profiles,
    robust,
    samplers,
    schedules,
    score,
    sde,
    timeseries,
    token_data,
    train,
)
from .oracle import GaussianMixture, MixtureOracle
from .parameterization import Denoiser
from .profiles import budget, profile
from .schedules import ddpm_tables, get_schedule
from .train import TrainConfig

__all__ = [
    "acceleration",
    "Denoiser",
    "GaussianMixture",
    "MixtureOracle",
    "TrainConfig",
    "budget",
    "cld",
    "connections",
    "data",
    "ddpm",
    "ddpm_tables",
    "discrete",
    "energy",
    "equivariant",
    "exercises",
    "flows",
    "guidance",
    "inverse",
    "latent",
    "likelihood",
    "manifolds",
    "get_schedule",
    "metrics",
    "nets",
    "oracle",
    "parameterization",
    "plot",
    "profile",
    "profiles",
    "robust",
    "samplers",
    "schedules",
    "score",
    "sde",
    "timeseries",
    "token_data",
    "train",
]
