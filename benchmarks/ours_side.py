"""Our side of the benchmark: imagen_lib's ``Cascade`` of two stages with ``ElucidatedDiffusion`` (the same
process as the peer's ``ElucidatedImagen``), fed the same precomputed text embeddings.

The optimiser step is the one both sides share (``common.Side.step``: Adam, lr given, betas (0.9, 0.99),
gradient clipping 1.0); the loss is ``Cascade.forward`` (text dropout 0.1, noise-augmented low-resolution
input for the SR stage, EDM loss), i.e. the work our Trainer does per step minus its EMA and accelerate
bookkeeping, which the peer's side leaves out as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import common
import torch

# Networks sized to the peer's parameter counts (within 10%; run.py prints both). They use what our
# architecture is built for: the EfficientUnet layout (more blocks and channels at low resolution, few at
# full resolution, attention only at the lowest resolutions) where it is available.
CONFIGS: dict[str, dict[str, Any]] = {
    # 32 px base: levels at 32, 16, 8, 4 px with 32, 64, 128, 256 channels; most parameters at 8 and 4 px
    "base": dict(
        kind="EfficientUnet",
        embed_dim=32,
        image_size=32,
        channel_mult=(1, 2, 4, 8),
        num_res_blocks=(1, 1, 1, 2),
        attention_type="fused",
        attention_levels=(False, False, True, True),
        num_attn_heads=4,
        per_head_channels=32,
        lowres_cond=False,
    ),
    # 32 -> 64 px SR: levels at 64, 32, 16, 8, 4 px with 16 .. 256 channels, attention at 8 and 4 px
    "sr": dict(
        kind="EfficientUnet",
        embed_dim=16,
        image_size=64,
        channel_mult=(1, 2, 4, 8, 16),
        num_res_blocks=(1, 1, 1, 2, 3),
        attention_type="fused",
        attention_levels=(False, False, False, True, True),
        num_attn_heads=4,
        per_head_channels=32,
        lowres_cond=True,
    ),
}
STAGES = ("base", "sr")
IMAGE_SIZES = {"base": 32, "sr": 64}
RECIPES = ("matched", "quickstart")
QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "shapes.yaml"


def build_network(stage: str, text_embed_dim: int = common.TEXT_EMBED_DIM) -> torch.nn.Module:
    from imagen_lib.nn.networks import NETWORKS

    config = dict(CONFIGS[stage])
    kind = config.pop("kind")
    return NETWORKS[kind](text_embed_dim=text_embed_dim, **config)


def build_cascade(cond_drop_prob: float = 0.1):
    from imagen_lib.cascade import Cascade, SamplerSettings, Stage
    from imagen_lib.diffusion import ElucidatedDiffusion

    stages = [
        Stage(build_network(s), ElucidatedDiffusion(), IMAGE_SIZES[s], sampler=SamplerSettings(cond_scale=3.0))
        for s in STAGES
    ]
    return Cascade(stages, cond_drop_prob=cond_drop_prob)


def build_quickstart_cascade():
    """The main job's cascade (examples/shapes.yaml: 16 px position-aware base, 16 -> 64 px SR trained on
    32 px crops, its EDM training settings and its own samplers) on the harness's text embeddings instead of
    its text encoder. For the quality section: what our library recommends for this data, not a matched net."""
    from imagen_lib.config import build_cascade as from_config
    from imagen_lib.config import load_config

    config = load_config(QUICKSTART)
    config.pop("text_encoder", None)
    config["text_embed_dim"] = common.TEXT_EMBED_DIM
    return from_config(config)


class OursSide(common.Side):
    """Our cascade on the benchmark's protocol: one stage's loss through ``Cascade.forward``, and sampling."""

    name = "imagen_lib"

    def __init__(self, device: torch.device, lr: float = 1e-4, recipe: str = "matched"):
        if recipe not in RECIPES:
            raise ValueError(f"recipe: expected one of {RECIPES}, got {recipe!r}")
        super().__init__(device, lr)
        self.recipe = recipe
        self.cascade = (build_cascade() if recipe == "matched" else build_quickstart_cascade()).to(device)
        self.image_sizes = {s: st.image_size for s, st in zip(STAGES, self.cascade.stages)}

    def network(self, stage: str) -> torch.nn.Module:
        return self.cascade.stages[STAGES.index(stage)].net

    def loss(
        self, stage: str, images: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """``images`` in [-1, 1] at the stage's size (the cascade makes the SR stage's low-resolution input)."""
        self.cascade.train()
        return self.cascade(images, text_embeds=text_embeds, text_mask=text_mask, stage=STAGES.index(stage))

    def _sample(
        self, text_embeds: torch.Tensor, text_mask: torch.Tensor, *, cond_scale: float, steps: int, sampler: str,
        seed: int,
    ) -> torch.Tensor:
        """``sampler="own"``: each stage's own sampler settings (sampler, steps and cond_scale of its config)."""
        if sampler == "own":
            return self.cascade.sample(text_embeds=text_embeds, text_mask=text_mask, seed=seed, disable_progress=True)
        return self.cascade.sample(
            text_embeds=text_embeds, text_mask=text_mask, cond_scale=cond_scale, steps=steps, sampler=sampler,
            seed=seed, disable_progress=True,
        )
