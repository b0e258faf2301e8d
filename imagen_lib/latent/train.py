"""A small KL autoencoder trained from images, for latent stages when no pretrained VAE is given (the shapes
example trains one on a CPU in a few minutes).

The loss is the pixel reconstruction error (L1, SD's choice, or L2) plus ``kl_weight`` times the posterior's
KL divergence to N(0, I) (SD's VAE: 1e-6; it only keeps the latents from drifting in scale). With
``foreground_weight`` the pixels off each image's median colour weigh more: on images of small objects on a flat
background a plain mean is decided by the background, and the objects' colours and outlines get lost. SD also trains
its VAE with a perceptual (LPIPS) and an adversarial loss for sharp detail; flat-coloured shapes do not need
them. The scaling factor is then measured as SD measured its 0.18215: 1 / the standard deviation of the
latents of the training images, so the diffusion process sees latents of about unit variance.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from imagen_lib.latent.autoencoder import AutoencoderKL, _diffusers_vae, diffusers_config
from imagen_lib.validation import check_images, check_int, check_number, check_seed

TINY_VAE = {"ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 4, "embed_dim": 4,
            "norm_num_groups": 8}
"""The default: 3 levels (images shrink by 4), widths 16-32-32, one ResNet block per level (~0.24 M weights)."""


def _batch(images: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
    rows = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
    return images[rows]


def foreground_weights(images: Tensor, weight: float, threshold: float = 0.1) -> Tensor:
    """Per-pixel loss weights (B, 1, H, W): 1 + ``weight`` where a pixel differs from its image's median colour
    by more than ``threshold`` in some channel, else 1. The median colour is the background of an image whose
    objects cover less than half of it (the shapes: at most a sixth), so small objects are not drowned by the
    background in the mean error."""
    median = images.flatten(2).median(dim=-1).values[..., None, None]
    foreground = (images - median).abs().amax(dim=1, keepdim=True) > threshold
    return 1.0 + weight * foreground.to(images.dtype)


def _reconstruction_error(reconstruction: Tensor, images: Tensor, loss: str, foreground_weight: float) -> Tensor:
    error = (reconstruction - images).abs() if loss == "l1" else (reconstruction - images).square()
    if not foreground_weight:
        return error.mean()
    weights = foreground_weights(images, foreground_weight)
    return (error * weights).mean() / weights.mean()


def train_autoencoder(
    images: Tensor, *, ddconfig: Optional[dict] = None, steps: int = 2000, batch_size: int = 32, lr: float = 1e-3,
    loss: Literal["l1", "l2"] = "l1", kl_weight: float = 1e-6, foreground_weight: float = 0.0, seed: int = 0,
    progress: bool = True,
) -> AutoencoderKL:
    """Train a KL autoencoder on ``images`` (N, C, H, W) in [-1, 1] and return it frozen, with its measured
    scaling factor.

    Args:
        ddconfig: seed 003's ``ddconfig`` keys (:func:`~imagen_lib.latent.autoencoder.diffusers_config`),
            default :data:`TINY_VAE`.
        steps: optimizer steps (AdamW, cosine decay to a tenth), default 2000.
        batch_size: images per step, drawn with replacement, default 32.
        lr: peak learning rate, default 1e-3.
        loss: reconstruction loss, ``"l1"`` (default) or ``"l2"``.
        kl_weight: weight of the KL term, default 1e-6 (0 turns it off).
        foreground_weight: extra weight of the pixels that differ from their image's median colour
            (:func:`foreground_weights`), default 0 (a plain mean); the shapes example uses it so that the
            small objects, not the background, decide the error.
        seed: weights and batches, default 0.
        progress: show a tqdm bar with the loss, default True.
    """
    check_images("images", images, value_range=(-1, 1))
    steps, batch_size = check_int("steps", steps, low=1), check_int("batch_size", batch_size, low=1)
    check_number("lr", lr, low=0, low_open=True)
    check_number("kl_weight", kl_weight, low=0)
    check_number("foreground_weight", foreground_weight, low=0)
    if loss not in ("l1", "l2"):
        raise ValueError(f"loss: expected 'l1' or 'l2', got {loss!r}")
    config = diffusers_config(**{**TINY_VAE, "in_channels": images.shape[1], "out_ch": images.shape[1],
                                 "resolution": images.shape[-1], **(ddconfig or {})})
    generator = torch.Generator().manual_seed(check_seed("seed", seed))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _diffusers_vae()(**config)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr / 10)
        with tqdm(range(steps), desc="autoencoder", disable=not progress) as bar:
            for _ in bar:
                x = _batch(images, batch_size, generator)
                posterior = model.encode(x).latent_dist
                rec = _reconstruction_error(model.decode(posterior.sample()).sample, x, loss, foreground_weight)
                total = rec + kl_weight * posterior.kl().mean() if kl_weight else rec
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                schedule.step()
                bar.set_postfix(rec=f"{rec.item():.4f}", refresh=False)
    model.register_to_config(scaling_factor=_measured_scale(model, images))
    return AutoencoderKL(model, posterior="sample")


@torch.no_grad()
def _measured_scale(model, images: Tensor, rows: int = 512) -> float:
    """1 / the standard deviation of the posterior means of (up to ``rows``) training images."""
    model.eval()
    means = torch.cat([model.encode(chunk).latent_dist.mean for chunk in images[:rows].split(64)])
    return float(1.0 / means.std().clamp_min(1e-6))
