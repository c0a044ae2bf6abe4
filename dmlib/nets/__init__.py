"""Networks: a time-conditioned MLP for 2D data (and its class-conditional twin), a small U-Net, and the
image networks of chapter 11 (the ADM U-Net and the diffusion transformer DiT) with their parameter and
FLOP counts."""

from .adm import ADMUNet
from .dit import DiT
from .flops import count_parameters, describe, forward_flops
from .mlp import MLP, ConditionalMLP, timestep_embedding
from .tokens import CausalTokenModel, TokenDenoiser, ar_log_likelihood, ar_loss, ar_sample
from .unet import UNet

__all__ = [
    "MLP",
    "ConditionalMLP",
    "UNet",
    "timestep_embedding",
    "ADMUNet",
    "DiT",
    "count_parameters",
    "forward_flops",
    "describe",
    "TokenDenoiser",
    "CausalTokenModel",
    "ar_loss",
    "ar_log_likelihood",
    "ar_sample",
]
