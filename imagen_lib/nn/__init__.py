"""Networks: the layers, both U-Nets and their configs, presets and the table that rebuilds one from a checkpoint.

Nothing here knows about noise, samplers or training: a network maps (noisy image, noise level, text) to an
image-shaped prediction (docs/architecture.md, network protocol).
"""

from imagen_lib.nn.config import EfficientUnetConfig, NetworkConfig, UnetConfig
from imagen_lib.nn.efficient_unet import EfficientUnet
from imagen_lib.nn.unet import Unet

__all__ = ["EfficientUnet", "EfficientUnetConfig", "NetworkConfig", "Unet", "UnetConfig"]
