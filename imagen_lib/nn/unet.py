"""The regular U-Net of Imagen's 64 px base model (ADM layout, NeMo's ``unet`` options).

Down path: per level ``num_res_blocks`` residual blocks (each optionally followed by attention), then a
downsample; a middle block (res, attention, res); an up path with one more block per level than the down
path, each fed the matching skip by concatenation. See :class:`Unet` for the options.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Union

import torch
from torch import Tensor, nn

from imagen_lib.nn.attention import AttentionBlock
from imagen_lib.nn.conditioning import Conditioning, TextOptions
from imagen_lib.nn.config import NetworkConfig, UnetConfig, _reject_unknown
from imagen_lib.nn.layers import (
    Downsample,
    ResBlock,
    Step,
    Upsample,
    group_norm,
    heads_for,
    run_checkpointed,
    zero_,
)
from imagen_lib.nn.spatial_transformer import SPATIAL_TRANSFORMER, SpatialTransformer


class UnetBase(nn.Module):
    """What both U-Nets share: the conditioning stem, the input conv, the output head and the call protocol.

    ``Net(config, **overrides)``: ``config`` is a ``Net.config_class`` instance (None = its defaults) and
    ``overrides`` are its fields. Subclasses set ``config_class`` and implement ``_build(config)`` (called
    after the stem is built) and ``_body(h, cond_act, ctx)``.
    """

    config_class: ClassVar[type[NetworkConfig]] = NetworkConfig
    config: NetworkConfig

    def __init__(self, config: Optional[NetworkConfig] = None, **overrides: Any):
        super().__init__()
        config = self._make_config(config, overrides)
        self._setup(config)
        self._build(config)

    @classmethod
    def _make_config(cls, config: Optional[NetworkConfig], overrides: dict[str, Any]) -> NetworkConfig:
        """``config`` (None = the defaults) with ``overrides`` (field names) applied."""
        if config is None:
            _reject_unknown(cls.config_class, overrides, TypeError)
            return cls.config_class(**overrides)
        if type(config) is not cls.config_class:
            raise TypeError(f"config: expected a {cls.config_class.__name__} or None, got {type(config).__name__}"
                            " (a dict of fields goes in as keyword arguments)")
        return config.replace(**overrides)

    def _setup(self, config: NetworkConfig) -> None:
        self.config = config
        self.channels, self.out_channels = config.channels, config.out_channels or config.channels
        self.lowres_cond = config.lowres_cond
        self.text_embed_dim = config.text_embed_dim if (config.cond_on_text and config.text_embed_dim) else None
        self.cond_dim = config.cond_dim or 4 * config.embed_dim
        self.gradient_checkpointing = config.gradient_checkpointing
        self.attention_type = config.attention_type
        text = TextOptions(conditioning=config.text_conditioning, use_null_token=config.use_null_token,
                           pooling=config.feature_pooling_type, positions=config.text_pos_emb,
                           position_init=config.text_pos_emb_init, layers=config.text_layers,
                           pooled=config.text_pooled)
        self.cond = Conditioning(config.channels, self.cond_dim, noise_frequencies=max(config.embed_dim // 2, 16),
                                 learned_sinu_pos_emb_dim=config.learned_sinu_pos_emb_dim,
                                 text_embed_dim=self.text_embed_dim, text=text, lowres_cond=self.lowres_cond,
                                 timestep_embedding_dim=config.embed_dim if config.timestep_embedding else None)
        ch0, kernel = config.level_channels[0], config.init_conv_kernel_size
        self.init_conv = nn.Conv2d(self.cond.in_channels, ch0, kernel, padding=kernel // 2)
        # Zero-init the output conv: the untrained net predicts exactly 0 everywhere, the minimum-variance
        # guess for both an x0 (EDM, data centred) and an eps target, so the first loss is well scaled (ADM).
        self.out = nn.Sequential(group_norm(ch0), nn.SiLU(), zero_(nn.Conv2d(ch0, self.out_channels, 3, padding=1)))

    def _res_options(self) -> dict[str, Any]:
        """Keyword arguments every :class:`ResBlock` of the body takes."""
        return dict(cond_dim=self.cond_dim, dropout=self.config.dropout, scale_shift_norm=self.config.scale_shift_norm)

    def _attention(self, channels: int) -> Optional[nn.Module]:
        if self.attention_type is None:
            return None
        config = self.config
        heads = heads_for(channels, config.num_attn_heads, config.per_head_channels)
        if self.attention_type == SPATIAL_TRANSFORMER:
            return SpatialTransformer(channels, heads, self.cond.context_dim, config.transformer_depth,
                                      config.use_linear_in_transformer, config.stable_attention)
        return AttentionBlock(self.attention_type, channels, heads, self.cond.context_dim, config.stable_attention,
                              config.attention_pos_emb)

    def _run(self, step: nn.Module, h: Tensor, cond_act: Tensor, ctx) -> Tensor:
        return run_checkpointed(step, self.gradient_checkpointing and self.training, h, cond_act, ctx)

    def _build(self, config: NetworkConfig) -> None:
        raise NotImplementedError

    def _body(self, h: Tensor, cond_act: Tensor, ctx) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, noise_cond: Union[Tensor, float], *, text_embeds: Optional[Tensor] = None,
                text_mask: Optional[Tensor] = None, lowres_img: Optional[Tensor] = None,
                lowres_noise_cond: Optional[Union[Tensor, float]] = None) -> Tensor:
        """Predict from a noisy image (network protocol of docs/architecture.md).

        Args:
            x: (B, channels, H, W) float; H and W divisible by 2 ** (levels - 1).
            noise_cond: (B,) (or a scalar for all rows): the diffusion process's conditioning value.
            text_embeds: (B, N, text_embed_dim) for a text net; None = no caption for any row.
            text_mask: (B, N) bool, True = real token (default all True); an all-False row = no text.
            lowres_img: (B, channels, H, W), the low-res image resized to x's size (super-resolution nets).
            lowres_noise_cond: (B,) its augmentation level's conditioning value (super-resolution nets).
        Returns (B, out_channels, H, W).
        """
        h, cond_act, ctx = self.cond(x, noise_cond, text_embeds, text_mask, lowres_img, lowres_noise_cond)
        factor = 2 ** (len(self.config.channel_mult) - 1)
        if h.shape[-1] % factor or h.shape[-2] % factor:
            raise ValueError(f"x: height and width must be divisible by {factor}, got {tuple(x.shape)}")
        # a bf16/fp16 net without autocast takes float32 images: compute in the weights' dtype, answer in x's
        h = self.init_conv(h.to(self.init_conv.weight.dtype))  # (B, C0, H, W)
        h = self._body(h, cond_act, ctx)  # (B, C0, H, W)
        return self.out(h).to(x.dtype)  # (B, out_channels, H, W)


class Unet(UnetBase):
    """Imagen's regular U-Net (ADM layout), with NeMo's option names.

    ``Unet(config, **overrides)``: ``config`` is a :class:`~imagen_lib.nn.config.UnetConfig` (None = its
    defaults, NeMo's base64 layout at 128 channels) and ``overrides`` are its fields (e.g.
    ``Unet(embed_dim=256, cond_dim=512)``); ``net.config`` holds the result and ``type(net)(net.config)``
    or ``type(net)(**net.config.to_dict())`` rebuilds the same architecture.
    """

    config_class = UnetConfig
    config: UnetConfig

    def _build(self, config: UnetConfig) -> None:
        chans, blocks, attn = config.level_channels, config.num_res_blocks, config.attention_per_level()
        res, updown, with_conv = self._res_options(), config.resblock_updown, config.resample_with_conv
        ch = chans[0]
        skip_chs = [ch]
        self.down = nn.ModuleList()
        for level, (out_ch, n) in enumerate(zip(chans, blocks)):
            for _ in range(n):
                self.down.append(Step(ResBlock(ch, out_ch, **res), self._attention(out_ch) if attn[level] else None))
                ch = out_ch
                skip_chs.append(ch)
            if level < len(chans) - 1:
                down = ResBlock(ch, ch, resample="down", **res) if updown else Downsample(ch, ch, with_conv)
                self.down.append(Step(down))
                skip_chs.append(ch)
        self.middle = Step(ResBlock(ch, ch, **res), self._attention(ch) if config.middle_attention else None,
                           ResBlock(ch, ch, **res))
        self.up = nn.ModuleList()
        for level in reversed(range(len(chans))):
            out_ch = chans[level]
            for i in range(blocks[level] + 1):
                block = ResBlock(ch + skip_chs.pop(), out_ch, **res)
                ch = out_ch
                post = None
                if level > 0 and i == blocks[level]:
                    post = ResBlock(ch, ch, resample="up", **res) if updown else Upsample(ch, ch, with_conv)
                self.up.append(Step(block, self._attention(ch) if attn[level] else None, post))

    def _body(self, h: Tensor, cond_act: Tensor, ctx) -> Tensor:
        skips = [h]
        for step in self.down:
            h = self._run(step, h, cond_act, ctx)
            skips.append(h)
        h = self._run(self.middle, h, cond_act, ctx)
        for step in self.up:
            h = self._run(step, torch.cat([h, skips.pop()], dim=1), cond_act, ctx)
        return h
