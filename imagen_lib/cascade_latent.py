"""Latent stages of a cascade (latent diffusion, seed 003): what :class:`~imagen_lib.cascade.Cascade` does
differently for a :class:`~imagen_lib.cascade_stage.Stage` with an autoencoder, kept here so the cascade only
calls in at four points.

- Training: the stage's images (resized to its ``image_size``) and a super-resolution stage's low-resolution
  input are encoded by the frozen autoencoder, or precomputed latents are taken instead of the images
  (:func:`training_inputs`); the diffusion loss then sees latents only.
- Sampling: the sampler starts from latent noise of shape (B, latent_channels, image_size / f, image_size / f)
  and the result is decoded (:func:`decode_output`), so the next stage (a pixel super-resolution stage) or the
  output gets images. A latent stage after a pixel stage (a latent upscaler) gets the previous images encoded
  as its low-resolution input; SDEdit's init images and inpainting's known images are encoded, and the masks
  resized to the latent grid (:func:`inpaint_inputs`).

Encodings done while sampling use the posterior mean when the autoencoder offers ``encode_mean`` (as
:class:`~imagen_lib.latent.AutoencoderKL` does), so a seed gives the same images every time.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from imagen_lib.cascade_stage import Stage
from imagen_lib.sampling_options import resize
from imagen_lib.validation import check_images

__all__ = ["check_latents", "decode_output", "encode_for_sampling", "inpaint_inputs", "net_crop_size",
           "training_inputs"]


def encode_for_sampling(stage: Stage, images: Tensor) -> Tensor:
    """Images (B, C, image_size, image_size) in [-1, 1] as the stage's latents, deterministically when the
    autoencoder can (``encode_mean``); a pixel stage returns them unchanged."""
    if not stage.latent:
        return images
    encode = getattr(stage.autoencoder, "encode_mean", None) or stage.autoencoder.encode
    return encode(images)


def decode_output(stage: Stage, x: Tensor) -> Tensor:
    """A stage's sampler output as images in about [-1, 1]: latents decoded, pixels unchanged."""
    return stage.autoencoder.decode(x) if stage.latent else x


def check_latents(name: str, stage: Stage, latents: Tensor, batch: Optional[int]) -> Tensor:
    """Precomputed latents of a latent stage: finite float (B, latent_channels, net_size, net_size)."""
    if not stage.latent:
        raise ValueError(f"{name}: given for a pixel stage (only a stage with an autoencoder takes latents)")
    c, s = stage.net.channels, stage.net_size
    check_images(name, latents, channels=c, value_range=(-float("inf"), float("inf")))
    if tuple(latents.shape[2:]) != (s, s):
        raise ValueError(f"{name}: expected (B, {c}, {s}, {s}) latents (the stage's image_size / "
                         f"downsampling_factor), got shape {tuple(latents.shape)}")
    if batch is not None and latents.shape[0] != batch:
        raise ValueError(f"{name}: expected {batch} rows (one per image), got {latents.shape[0]}")
    return latents


def training_inputs(
    stage: Stage, x0: Optional[Tensor], low: Optional[Tensor], latents: Optional[Tensor],
) -> tuple[Tensor, Optional[Tensor]]:
    """The diffusion target and low-resolution input of a latent stage: ``latents`` when given (precached),
    else ``x0`` encoded (the autoencoder's posterior mean or a draw, as it is set); ``low`` encoded too."""
    auto = stage.autoencoder
    target = latents.float() if latents is not None else auto.encode(x0)
    return target, (auto.encode(low) if low is not None else None)


def net_crop_size(stage: Stage) -> Optional[int]:
    """``random_crop_size`` in the units the net sees (latent cells for a latent stage); None when the stage
    trains on whole images."""
    crop = stage.random_crop_size
    if crop is None or crop >= stage.image_size:
        return None
    return crop // stage.autoencoder.downsampling_factor if stage.latent else crop


def inpaint_inputs(stage: Stage, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Inpainting's known images and bool masks on the stage's grid: for a latent stage the images resized to
    ``image_size`` and encoded, the masks (True = keep) resized to the latent grid (a latent cell is kept when
    more than half of its pixels are)."""
    known = encode_for_sampling(stage, resize(images, stage.image_size))
    return known, resize(masks, stage.net_size) > 0.5
