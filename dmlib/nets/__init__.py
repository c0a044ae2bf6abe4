"""Networks: a time-conditioned MLP for 2D data and a small U-Net for images."""

from .mlp import MLP, timestep_embedding
from .unet import UNet

__all__ = ["MLP", "UNet", "timestep_embedding"]
