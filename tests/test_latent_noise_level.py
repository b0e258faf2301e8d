"""imagen_lib.latent.noise_level: how much louder a latent's content is than the pixels', in units of each
stage's sigma_data, as the ln shift of EDM's P_mean (docs/latent.md)."""

from __future__ import annotations

import math

import pytest
import torch

from imagen_lib.data.shapes import ShapesDataset
from imagen_lib.latent.noise_level import content_scale, noise_level_shift


def shapes(n=8, size=16):
    data = ShapesDataset(image_size=size, length=n, seed=3)
    return torch.stack([item["images"] for item in data.__getitems__(list(range(n)))])


def test_content_scale_is_the_distance_from_the_background_in_units_of_sigma_data():
    x = torch.zeros(3, 2, 4, 4)
    x[:, 0, 1, 1] = torch.tensor([3.0, 4.0, 5.0])  # one off-background value per image; the median is 0
    assert content_scale(x, 0.5) == pytest.approx(8.0)  # median of 6, 8, 10
    assert content_scale(x + 7.0, 0.5) == pytest.approx(8.0)  # a background's level is not content


def test_shift_is_the_log_ratio_of_content_scales_and_cancels_the_units():
    x = shapes()
    assert noise_level_shift(3 * x, 0.5, x, 0.5) == pytest.approx(math.log(3), abs=1e-6)
    assert noise_level_shift(3 * x, 1.5, x, 0.5) == pytest.approx(0.0, abs=1e-6)  # data 3x as spread: same levels
    assert noise_level_shift(0.5 * x - 2.0, 0.5, x) == pytest.approx(math.log(0.5), abs=1e-6)


def test_latents_whose_backgrounds_are_alike_get_a_positive_shift():
    # an autoencoder that keeps the objects but encodes the three backgrounds alike: with sigma_data measured as
    # the latents' spread (as train_autoencoder's scaling factor does), the objects stand out more in units of
    # sigma_data than in the pixels, so the latent stage must train at higher noise than the pixel base
    x = shapes(n=32)
    background = x.flatten(2).median(dim=-1).values[..., None, None]
    latents = x - 0.9 * background
    assert latents.std() < x.std()
    assert noise_level_shift(latents, latents.std().item(), x, x.std().item()) > 0.2
    assert noise_level_shift(x, x.std().item(), x, x.std().item()) == pytest.approx(0.0, abs=1e-6)


def test_bad_inputs_name_the_argument():
    x = shapes()
    with pytest.raises(ValueError, match="sigma_data"):
        content_scale(x, 0.0)
    with pytest.raises(ValueError, match="images: no content"):
        noise_level_shift(x, 1.0, torch.full_like(x, 0.3))
    with pytest.raises(ValueError, match="latents: no content"):
        noise_level_shift(torch.zeros_like(x), 1.0, x)
    with pytest.raises((TypeError, ValueError), match="x"):
        content_scale([[1.0]], 1.0)
    with pytest.raises(ValueError, match="x"):
        content_scale(torch.full((1, 3, 4, 4), float("nan")), 1.0)
