"""Where a latent stage's training noise should sit, measured against a pixel stage whose noise levels are known
to work.

EDM draws the training noise ``ln sigma ~ N(P_mean, P_std^2)`` in units of the data. A layout (where an object
goes) is decided at the noise levels that still hide the object: once ``sigma`` is small against the object's
deviation from its background, the noisy input shows where the object is and the net need not read the caption
for it. A small autoencoder trained to keep small objects can make them far louder, measured in ``sigma_data``,
than they are in pixels (the shapes example: 2.6 times), so with the pixel stage's ``P_mean`` the latent stage
rarely trains at the noise levels where the position words matter, and it places objects at random
(docs/experiments/2026-11-30-s10-latent-shapes.md). :func:`noise_level_shift` measures that ratio, as
``ln``, the amount to add to the pixel stage's ``P_mean``.
"""

from __future__ import annotations

import math

from torch import Tensor

from imagen_lib.validation import check_images, check_number

__all__ = ["content_scale", "noise_level_shift"]


def content_scale(x: Tensor, sigma_data: float) -> float:
    """The median over images of ``|x - background| / sigma_data`` (the L2 norm over all of an image's values),
    the background being each image's per-channel median: how far, in units of the data's spread, an image's
    content stands out from its background. ``x`` (B, C, H, W): images or latents, B >= 1."""
    check_images("x", x, value_range=(-float("inf"), float("inf")))
    sigma_data = check_number("sigma_data", sigma_data, low=0, low_open=True)
    flat = x.detach().float().flatten(2)  # (B, C, HW)
    background = flat.median(dim=-1, keepdim=True).values
    return float(((flat - background) / sigma_data).flatten(1).norm(dim=1).median())


def noise_level_shift(
    latents: Tensor, latent_sigma_data: float, images: Tensor, pixel_sigma_data: float = 0.5,
) -> float:
    """``ln(content_scale(latents) / content_scale(images))``: what to add to the ``P_mean`` of a pixel stage that
    learns its layouts (on ``images``, at that stage's size, with ``pixel_sigma_data``, default 0.5) for a latent
    stage on ``latents`` (of the same kind of images) with ``latent_sigma_data``, so that both train as often at
    the noise levels that hide their content. Positive when the latents' content is the louder.

    Raises ValueError when the images (or latents) have no content off their background."""
    scales = {}
    for name, x, sd in (("latents", latents, latent_sigma_data), ("images", images, pixel_sigma_data)):
        scales[name] = content_scale(x, sd)
        if not scales[name] > 0:
            raise ValueError(f"{name}: no content off the background (every value equals its channel's median)")
    return math.log(scales["latents"] / scales["images"])
