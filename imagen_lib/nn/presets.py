"""Named network presets (as DiT names ``DiT-XL/2``): Imagen's reference sizes and small CPU nets.

``PRESETS`` maps each name to its config (a :class:`~imagen_lib.nn.config.UnetConfig` or
:class:`~imagen_lib.nn.config.EfficientUnetConfig`; the type says which network). ``names()`` lists them,
``get(name)`` returns the config, ``config(name)`` its plain dict, and ``build(name, **overrides)`` the network
(``device="meta"`` builds it without allocating memory, e.g. to count parameters of the 2B model).

Reference presets follow NeMo's Imagen configs (seed 000 and NeMo's example yaml files); the stated sizes
are NeMo's table. ``text_embed_dim`` is 1024 (T5-Large) throughout.

| preset | net | stated size |
|---|---|---|
| base64-500m | Unet, embed 256, mult 1-2-3-4, 3 blocks, fused attention at 32/16/8 px | 524M |
| base64-2b | Unet, embed 512, cond_dim 2048, otherwise as base64-500m | 2100M |
| sr256-400m | Unet, embed 128, mult 1-2-4-6-6, blocks 2-2-3-4-3, fused at 32/16 px | 429M |
| sr256-600m | EfficientUnet, mult 1-2-4-8-8, blocks 2-4-8-8-8, fused at the two deepest levels | 646M |
| sr1024-400m | EfficientUnet, mult 1-2-4-8, blocks 2-4-8-16, cross attention at the deepest level | 427M |

sr1024-400m: the paper's 256->1024 Efficient U-Net has 2/4/8/8 blocks in each of its D- and U-blocks at
128/256/512/1024 channels with text cross-attention only at the lowest resolution; here the deepest level is
the bottleneck whose blocks run once, so its 8 + 8 blocks are written as 16.

Stable Diffusion's U-Nets (seed 003's ``unet_config``; docs/latent.md) are presets of the same ``Unet``:

| preset | net | published size |
|---|---|---|
| sd-v2 | Unet, 4 latent channels, 320 ch, mult 1-2-4-4, 2 blocks, spatial transformers | 865,910,724 |
| sd-v1 | as sd-v2 with 1x1-conv projections, 8 heads, text width 768 (SD 1.x) | 859,520,964 |

sd-v2's spatial transformers (linear projections, 64-channel heads, text width 1024) sit at the three finest
levels and in the middle block.

Both take SD's timestep (0 .. 999) as ``noise_cond`` and the CLIP tokens as ``text_embeds`` unprojected
(``text_conditioning="raw"``); their parameter names convert one-to-one from the published checkpoints
(:func:`imagen_lib.nn.convert_sd.load_sd_unet_weights`). ``image_size`` 64 is SD's 512 px / 8 latent (set 96
for SD 2's 768 px model); attention is placed by level, so any latent size divisible by 8 works.

The tiny presets are sized for CPU training of the built-in shapes data set: ``text_embed_dim=64`` matches
``T5TextEncoder.build_tiny``; attention only at 16 and 8 px (never at 32 or 64 px, where it costs the most
and a shapes image needs it least).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from imagen_lib.nn.config import EfficientUnetConfig, UnetConfig
from imagen_lib.nn.efficient_unet import EfficientUnet
from imagen_lib.nn.networks import network_for
from imagen_lib.nn.unet import Unet

_BASE64 = UnetConfig(image_size=64, channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_type="fused",
                     attention_resolutions=(32, 16, 8), num_attn_heads=4, per_head_channels=64,
                     text_embed_dim=1024, feature_pooling_type="attention")

# Stable Diffusion's U-Net (seed 003's unet_config: model_channels 320, attention_resolutions 4, 2, 1,
# num_head_channels 64, use_linear_in_transformer, context_dim 1024). The middle block has attention too.
_SD_V2 = UnetConfig(
    embed_dim=320, image_size=64, channels=4, out_channels=4, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
    attention_type="spatial_transformer", attention_levels=(True, True, True, False), middle_attention=True,
    per_head_channels=64, cond_dim=1280, text_embed_dim=1024, text_conditioning="raw", use_null_token=False,
    timestep_embedding=True, scale_shift_norm=False, use_linear_in_transformer=True, transformer_depth=1)
PRESETS: dict[str, Union[UnetConfig, EfficientUnetConfig]] = {
    "base64-500m": _BASE64.replace(embed_dim=256, cond_dim=512),
    "base64-2b": _BASE64.replace(embed_dim=512, cond_dim=2048),
    "sr256-400m": UnetConfig(
        embed_dim=128, image_size=256, channel_mult=(1, 2, 4, 6, 6), num_res_blocks=(2, 2, 3, 4, 3),
        attention_type="fused", attention_resolutions=(32, 16), num_attn_heads=4, per_head_channels=64,
        cond_dim=512, text_embed_dim=1024, lowres_cond=True),
    "sr256-600m": EfficientUnetConfig(
        embed_dim=128, image_size=256, channel_mult=(1, 2, 4, 8, 8), num_res_blocks=(2, 4, 8, 8, 8),
        attention_type="fused", attention_levels=(False, False, False, True, True), num_attn_heads=8,
        per_head_channels=64, cond_dim=512, text_embed_dim=1024, lowres_cond=True),
    "sr1024-400m": EfficientUnetConfig(
        embed_dim=128, image_size=1024, channel_mult=(1, 2, 4, 8), num_res_blocks=(2, 4, 8, 16),
        attention_type="cross", attention_levels=(False, False, False, True), num_attn_heads=8,
        per_head_channels=64, cond_dim=512, text_embed_dim=1024, lowres_cond=True),
    # 32 px text-to-image base for CPU work: levels at 32, 16, 8 px, cross-attention at 16 and 8 px + middle.
    "tiny-32": UnetConfig(
        embed_dim=32, image_size=32, channel_mult=(1, 2, 3), num_res_blocks=(1, 2, 2), attention_type="cross",
        attention_resolutions=(16, 8), num_attn_heads=4, per_head_channels=32, cond_dim=128, text_embed_dim=64),
    # 32 px text-to-image base in the Efficient U-Net layout: levels at 32, 16, 8, 4 px with 32 .. 256 channels,
    # most parameters at 8 and 4 px where fused attention reads the text; about twice the training images/s of
    # tiny-32 on a CPU.
    "tiny-e32": EfficientUnetConfig(
        embed_dim=32, image_size=32, channel_mult=(1, 2, 4, 8), num_res_blocks=(1, 1, 1, 2), attention_type="fused",
        attention_levels=(False, False, True, True), num_attn_heads=4, per_head_channels=32, cond_dim=128,
        text_embed_dim=64, lowres_cond=False),
    # 16 px text-to-image base for CPU work, the shapes quickstart's: levels at 16, 8, 4 px with 32 .. 128
    # channels, fused attention at 8 and 4 px that sees where each token sits (attention_pos_emb: without it
    # the base drew shapes at random places whatever the caption said). A step costs a quarter of tiny-e32's.
    "tiny-e16": EfficientUnetConfig(
        embed_dim=32, image_size=16, channel_mult=(1, 2, 4), num_res_blocks=(1, 1, 2), attention_type="fused",
        attention_levels=(False, True, True), num_attn_heads=4, per_head_channels=32, cond_dim=128,
        text_embed_dim=64, attention_pos_emb=True, lowres_cond=False),
    # 24 px base for two-object captions (examples/shapes2.yaml): tiny-e16's layout at 24, 12, 6 px (a small
    # shape of a pair is 5 px there, 3.5 at 16 px, where the judge reads only 72% of real pairs fully right),
    # with what binding each object of "a red circle left of a blue square" to its place took
    # (docs/composition.md): each text token's index, as sinusoids from the first step (text_pos_emb,
    # text_pos_emb_init), two learned self-attention blocks over the tokens (text_layers: the place of a
    # colour word is its order exclusive-or the relation word) and no pooled text in the conditioning vector
    # (text_pooled: False; with it the nets place a pair of colours as training showed it, not as asked).
    "tiny-e24": EfficientUnetConfig(
        embed_dim=32, image_size=24, channel_mult=(1, 2, 4), num_res_blocks=(1, 1, 2), attention_type="fused",
        attention_levels=(False, True, True), num_attn_heads=4, per_head_channels=32, cond_dim=128,
        text_embed_dim=64, attention_pos_emb=True, text_pos_emb=24, text_pos_emb_init="sinusoidal",
        text_layers=2, text_pooled=False, lowres_cond=False),
    # 32 -> 64 px super-resolution for CPU work: levels at 64, 32, 16, 8 px with 16 .. 128 channels (few
    # channels where pixels are many: ~40% faster per step than 32 .. 128 at similar size), cross-attention
    # at 16 and 8 px.
    "tiny-sr64": EfficientUnetConfig(
        embed_dim=16, image_size=64, channel_mult=(1, 2, 4, 8), num_res_blocks=(1, 2, 2, 3), attention_type="cross",
        attention_levels=(False, False, True, True), num_attn_heads=4, per_head_channels=32, cond_dim=128,
        text_embed_dim=64, lowres_cond=True),
    "sd-v2": _SD_V2,
    # SD 1.x: 8 heads at every level (legacy num_heads), CLIP ViT-L/14's 768-wide tokens, 1x1-conv projections.
    "sd-v1": _SD_V2.replace(num_attn_heads=8, per_head_channels=None, text_embed_dim=768,
                            use_linear_in_transformer=False),
}

# NeMo's stated parameter counts (millions) of the reference presets.
STATED_SIZES_M: dict[str, float] = {
    "base64-500m": 524, "base64-2b": 2100, "sr256-400m": 429, "sr256-600m": 646, "sr1024-400m": 427,
}
# The published parameter counts of Stable Diffusion's U-Nets (diffusers' UNet2DConditionModel).
PUBLISHED_SIZES: dict[str, int] = {"sd-v2": 865_910_724, "sd-v1": 859_520_964}


def names() -> list[str]:
    """The preset names, reference sizes first."""
    return list(PRESETS)


def get(name: str) -> Union[UnetConfig, EfficientUnetConfig]:
    """Preset ``name``'s config (frozen: ``get(name).replace(...)`` for a variant)."""
    if name not in PRESETS:
        raise ValueError(f"name: unknown preset {name!r}; expected one of {names()}")
    return PRESETS[name]


def config(name: str) -> dict[str, Any]:
    """Preset ``name``'s config as a plain dict (``get(name).to_dict()``, what a checkpoint stores)."""
    return get(name).to_dict()


def build(name: str, *, device: Union[None, str, torch.device] = None, dtype: Optional[torch.dtype] = None,
          **overrides: Any) -> Union[Unet, EfficientUnet]:
    """Build preset ``name`` with config fields ``overrides`` replacing the preset's.

    Args:
        name: one of :func:`names`.
        device: where parameters are created (default CPU); ``"meta"`` allocates nothing.
        dtype: parameter dtype (default float32).
        overrides: any field of the preset's config (e.g. ``text_embed_dim=512``); an unknown one raises a
            TypeError naming it.
    """
    net_config = get(name).replace(**overrides)
    with torch.device(device if device is not None else "cpu"):
        net = network_for(net_config)
    return net if dtype is None else net.to(dtype)
