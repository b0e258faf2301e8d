"""First-stage autoencoders of latent stages (latent diffusion, seed 003): :class:`AutoencoderKL` (diffusers'
class behind :class:`imagen_lib.protocols.Autoencoder`) and :func:`train_autoencoder`, a small one trained from
images when no pretrained VAE is given, and :func:`noise_level_shift`, the shift of EDM's ``P_mean`` its latents
ask for against a pixel stage. diffusers is the ``[latent]`` extra, imported when one is built."""

from imagen_lib.latent.autoencoder import (
    SD_SCALING_FACTOR,
    AutoencoderKL,
    autoencoder_from_config,
    diffusers_config,
)
from imagen_lib.latent.noise_level import content_scale, noise_level_shift
from imagen_lib.latent.train import train_autoencoder

__all__ = ["SD_SCALING_FACTOR", "AutoencoderKL", "autoencoder_from_config", "content_scale", "diffusers_config",
           "noise_level_shift", "train_autoencoder"]
