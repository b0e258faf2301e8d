"""imagen_lib: cascaded text-to-image diffusion (Imagen) for research.

Public names are imported lazily, so that ``import imagen_lib`` stays fast and never touches
transformers, diffusers (or the network) until a text encoder or an autoencoder is actually asked for.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Unet": "imagen_lib.nn.unet",
    "EfficientUnet": "imagen_lib.nn.efficient_unet",
    "GaussianDiffusionContinuous": "imagen_lib.diffusion",
    "ElucidatedDiffusion": "imagen_lib.diffusion",
    "DiscreteDiffusion": "imagen_lib.diffusion",
    "NoiseAugmentation": "imagen_lib.diffusion.noise_augment",
    "T5TextEncoder": "imagen_lib.text",
    "CLIPTextEncoder": "imagen_lib.text_clip",
    "AutoencoderKL": "imagen_lib.latent",
    "Stage": "imagen_lib.cascade",
    "SamplerSettings": "imagen_lib.sampling_options",
    "Cascade": "imagen_lib.cascade",
    "StartImages": "imagen_lib.sampling_options",
    "Inpainting": "imagen_lib.sampling_options",
    "InitImages": "imagen_lib.sampling_options",
    "NegativePrompt": "imagen_lib.sampling_options",
    "UnetConfig": "imagen_lib.nn.config",
    "EfficientUnetConfig": "imagen_lib.nn.config",
    "Trainer": "imagen_lib.training.trainer",
    "TrainerSettings": "imagen_lib.training.trainer",
    "train_stages": "imagen_lib.training.loop",
    "RunOptions": "imagen_lib.training.loop",
    "ShapesDataset": "imagen_lib.data.shapes",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'imagen_lib' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # cache: the next access skips __getattr__
    return value


def __dir__():
    return __all__


if TYPE_CHECKING:  # static tools see the real names
    from imagen_lib.cascade import Cascade, Stage
    from imagen_lib.data.shapes import ShapesDataset
    from imagen_lib.diffusion import DiscreteDiffusion, ElucidatedDiffusion, GaussianDiffusionContinuous
    from imagen_lib.diffusion.noise_augment import NoiseAugmentation
    from imagen_lib.latent import AutoencoderKL
    from imagen_lib.nn.config import EfficientUnetConfig, UnetConfig
    from imagen_lib.nn.efficient_unet import EfficientUnet
    from imagen_lib.nn.unet import Unet
    from imagen_lib.sampling_options import InitImages, Inpainting, NegativePrompt, SamplerSettings, StartImages
    from imagen_lib.text import T5TextEncoder
    from imagen_lib.text_clip import CLIPTextEncoder
    from imagen_lib.training.loop import RunOptions, train_stages
    from imagen_lib.training.trainer import Trainer, TrainerSettings
