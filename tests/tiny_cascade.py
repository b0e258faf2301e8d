"""Tiny cascades for the joining-layer tests (cascade, trainer, checkpoint, CLI): a 8 px base stage and a
16 px super-resolution stage on networks with a few thousand weights, and a tiny random T5."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch

TEXT_DIM = 32
T5_KWARGS = {"d_model": TEXT_DIM, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4}
BASE_NET = {"kind": "Unet", "config": {"embed_dim": 16, "image_size": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                                       "attention_resolutions": [4], "num_attn_heads": 2, "per_head_channels": 8}}
SR_NET = {"kind": "EfficientUnet", "config": {
    "embed_dim": 16, "image_size": 16, "channel_mult": [1, 2], "num_res_blocks": [1, 1],
    "attention_levels": [False, True], "num_attn_heads": 2, "per_head_channels": 8}}


def tiny_config(text: bool = True, trainable: bool = False, steps: int = 2) -> dict:
    """A configuration dict (imagen_lib.config vocabulary) for a two-stage 8 -> 16 px cascade."""
    config = {
        "seed": 0,
        "stages": [
            {"image_size": 8, "network": copy.deepcopy(BASE_NET), "diffusion": {"kind": "ElucidatedDiffusion"},
             "sampler": {"steps": 3, "cond_scale": 2.0}, "train": {"steps": steps, "batch_size": 4}},
            {"image_size": 16, "network": copy.deepcopy(SR_NET),
             "diffusion": {"kind": "GaussianDiffusionContinuous", "config": {"noise_schedule": "linear"}},
             "sampler": {"steps": 2, "cond_scale": 2.0}, "train": {"steps": steps, "batch_size": 4}},
        ],
        "data": {"type": "shapes", "length": 64, "supersample": 1},
        "trainer": {"lr": 1e-3, "ema_update_after_step": 1, "ema_update_every": 1},
        "sample": {"prompts": ["a red circle", "a blue square"], "seed": 0},
    }
    if text:
        config["text_encoder"] = {"build_tiny": dict(T5_KWARGS), "seed": 0, "max_length": 16, "trainable": trainable}
    else:
        config["text_embed_dim"] = None
    return config


def tiny_cascade(text_encoder=None, text_embed_dim: Optional[int] = TEXT_DIM, seed: int = 0):
    """A Cascade built from :func:`tiny_config` with the given encoder (or precomputed-embedding width)."""
    from imagen_lib.config import build_cascade

    config = tiny_config(text=False)
    config["text_embed_dim"] = text_embed_dim
    config["seed"] = seed
    cascade = build_cascade(config)
    if text_encoder is not None:
        from imagen_lib.cascade import Cascade

        cascade = Cascade(cascade.stages, text_encoder=text_encoder, cond_drop_prob=cascade.cond_drop_prob)
    return cascade


def perturbed_checkpoint(folder: Path) -> str:
    """Save a tiny cascade with a tiny T5 into ``folder``, its weights perturbed (fresh nets zero their output
    layers) so that sampling settings show in the images; returns the checkpoint path."""
    from imagen_lib.text import T5TextEncoder

    cascade = tiny_cascade(text_encoder=T5TextEncoder.build_tiny(seed=0, max_length=16, **T5_KWARGS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in cascade.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return cascade.save(folder)


def tiny_encoder_folder(folder: Path) -> Path:
    """Save a tiny random T5 encoder + ByT5 tokenizer into ``folder`` (as a user's own T5 would be)."""
    from imagen_lib.text import T5TextEncoder

    T5TextEncoder.build_tiny(folder, seed=0, **T5_KWARGS)
    return folder


def images(batch: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
