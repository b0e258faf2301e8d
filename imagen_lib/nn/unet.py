"""The regular U-Net of Imagen's 64 px base model (ADM layout, NeMo's ``unet`` options).

Down path: per level ``num_res_blocks`` residual blocks (each optionally followed by attention), then a
downsample; a middle block (res, attention, res); an up path with one more block per level than the down
path, each fed the matching skip by concatenation. See :class:`Unet` for the options.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from imagen_lib.nn.attention import ATTENTION_TYPES, AttentionBlock, AttentionType
from imagen_lib.nn.conditioning import Conditioning, PoolingType
from imagen_lib.nn.layers import (
    Downsample,
    ResBlock,
    Step,
    Upsample,
    group_norm,
    heads_for,
    per_level,
    run_checkpointed,
    zero_,
)


class UnetBase(nn.Module):
    """What both U-Nets share: the conditioning stem, the input conv, the output head and the call protocol.

    Subclasses build their body in ``__init__`` after :meth:`_setup` and implement ``_body(h, cond_act, ctx)``.
    """

    config: dict[str, Any]

    def _setup(self, config: dict[str, Any], *, embed_dim: int, channel_mult: Sequence[int], channels: int,
               out_channels: Optional[int], cond_dim: Optional[int], text_embed_dim: Optional[int],
               cond_on_text: bool, use_null_token: bool, feature_pooling_type: PoolingType,
               learned_sinu_pos_emb_dim: int, lowres_cond: bool, init_conv_kernel_size: int,
               attention_type: Optional[AttentionType], num_attn_heads: int, per_head_channels: Optional[int],
               stable_attention: bool, gradient_checkpointing: bool, attention_pos_emb: bool = False) -> None:
        for name, value in (("embed_dim", embed_dim), ("channels", channels)):
            if int(value) < 1:
                raise ValueError(f"{name}: expected a positive int, got {value}")
        if not channel_mult or any(int(m) < 1 for m in channel_mult):
            raise ValueError(f"channel_mult: expected a non-empty list of positive ints, got {channel_mult}")
        if attention_type is not None and attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type: expected one of {ATTENTION_TYPES} or None, got {attention_type!r}")
        if init_conv_kernel_size < 1 or init_conv_kernel_size % 2 == 0:
            raise ValueError(f"init_conv_kernel_size: expected an odd positive int, got {init_conv_kernel_size}")
        self.config = config
        self.channels, self.out_channels = channels, out_channels or channels
        self.lowres_cond = bool(lowres_cond)
        self.text_embed_dim = text_embed_dim if (cond_on_text and text_embed_dim) else None
        self.cond_dim = cond_dim or 4 * embed_dim
        self.gradient_checkpointing = gradient_checkpointing
        self.attention_type = attention_type
        self._heads = (num_attn_heads, per_head_channels)
        self._stable_attention = stable_attention
        self._attention_pos_emb = attention_pos_emb
        self.cond = Conditioning(channels, self.cond_dim, noise_frequencies=max(embed_dim // 2, 16),
                                 learned_sinu_pos_emb_dim=learned_sinu_pos_emb_dim,
                                 text_embed_dim=self.text_embed_dim, use_null_token=use_null_token,
                                 feature_pooling_type=feature_pooling_type, lowres_cond=self.lowres_cond)
        ch0 = embed_dim * channel_mult[0]
        self.init_conv = nn.Conv2d(self.cond.in_channels, ch0, init_conv_kernel_size,
                                   padding=init_conv_kernel_size // 2)
        # Zero-init the output conv: the untrained net predicts exactly 0 everywhere, the minimum-variance
        # guess for both an x0 (EDM, data centred) and an eps target, so the first loss is well scaled (ADM).
        self.out = nn.Sequential(group_norm(ch0), nn.SiLU(), zero_(nn.Conv2d(ch0, self.out_channels, 3, padding=1)))

    def _attention(self, channels: int) -> Optional[AttentionBlock]:
        if self.attention_type is None:
            return None
        heads = heads_for(channels, *self._heads)
        return AttentionBlock(self.attention_type, channels, heads, self.text_embed_dim and self.cond_dim,
                              self._stable_attention, self._attention_pos_emb)

    def _run(self, step: nn.Module, h: Tensor, cond_act: Tensor, ctx) -> Tensor:
        return run_checkpointed(step, self.gradient_checkpointing and self.training, h, cond_act, ctx)

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
        factor = 2 ** (len(self.config["channel_mult"]) - 1)
        if h.shape[-1] % factor or h.shape[-2] % factor:
            raise ValueError(f"x: height and width must be divisible by {factor}, got {tuple(x.shape)}")
        # a bf16/fp16 net without autocast takes float32 images: compute in the weights' dtype, answer in x's
        h = self.init_conv(h.to(self.init_conv.weight.dtype))  # (B, C0, H, W)
        h = self._body(h, cond_act, ctx)  # (B, C0, H, W)
        return self.out(h).to(x.dtype)  # (B, out_channels, H, W)


class Unet(UnetBase):
    """Imagen's regular U-Net (ADM layout), with NeMo's option names.

    Args (defaults; the paper's / NeMo base64-500m value in brackets where it differs):
        embed_dim: base channels (128) [256]; ``dim`` is accepted as an alias.
        image_size: training resolution, used to place attention by ``attention_resolutions`` (64).
        channels: image channels (3); out_channels: output channels (None = ``channels``).
        channel_mult: channels per level as multiples of ``embed_dim`` ((1, 2, 3, 4)).
        num_res_blocks: res blocks per level in the down path, an int or one per level (3); the up path has
            one more per level (ADM).
        attention_type: ``"self"``, ``"cross"``, ``"stacked"``, ``"fused"`` or None for none ("fused").
        attention_resolutions: feature-map resolutions (pixels) that get attention after every res block
            ((32, 16, 8)); attention_levels: per-level bools instead (overrides; None).
        middle_attention: attention in the middle block (True).
        num_attn_heads (4) / per_head_channels (64): heads are ``channels // per_head_channels`` when that
            is set (not None/0), else ``num_attn_heads``.
        cond_dim: width of the conditioning vector and of the projected text tokens (None = 4 * embed_dim)
            [512].
        text_embed_dim: text encoder width (1024, T5-Large); None or ``cond_on_text=False``: no text.
        feature_pooling_type: ``"attention"`` or ``"mean"`` pooling of the text into the conditioning vector.
        learned_sinu_pos_emb_dim: 0 = fixed sinusoidal noise embedding (0); > 0: learned, this many features.
        dropout: dropout in res blocks (0.0); use_null_token: learned always-attendable text token (True)
            [NeMo False].
        init_conv_kernel_size: 3; gradient_checkpointing: recompute blocks in backward (False).
        scale_shift_norm: FiLM-style conditioning (True); resblock_updown: resample inside res blocks (False);
        resample_with_conv: strided/following 3x3 convs for resampling (True).
        lowres_cond: super-resolution mode (False); stable_attention: attention in float32 (False).
        attention_pos_emb: attention layers see where each image token sits (fixed 2-D sinusoids, in
            fractions of the image side; False, as Imagen). It lets a small net tie "top left" in a caption to
            a place: the shapes quickstart's base read positions at chance without it (README).
    """

    def __init__(
        self, embed_dim: int = 128, *, image_size: int = 64, channels: int = 3, out_channels: Optional[int] = None,
        channel_mult: Sequence[int] = (1, 2, 3, 4), num_res_blocks: Union[int, Sequence[int]] = 3,
        attention_type: Optional[AttentionType] = "fused", attention_resolutions: Sequence[int] = (32, 16, 8),
        attention_levels: Optional[Sequence[bool]] = None, middle_attention: bool = True,
        num_attn_heads: int = 4, per_head_channels: Optional[int] = 64, cond_dim: Optional[int] = None,
        text_embed_dim: Optional[int] = 1024, cond_on_text: bool = True,
        feature_pooling_type: PoolingType = "attention", learned_sinu_pos_emb_dim: int = 0,
        dropout: float = 0.0, use_null_token: bool = True, init_conv_kernel_size: int = 3,
        gradient_checkpointing: bool = False, scale_shift_norm: bool = True, resblock_updown: bool = False,
        resample_with_conv: bool = True, lowres_cond: bool = False, stable_attention: bool = False,
        attention_pos_emb: bool = False, dim: Optional[int] = None,
    ):
        super().__init__()
        embed_dim = int(dim if dim is not None else embed_dim)
        levels = len(channel_mult)
        blocks = [int(n) for n in per_level("num_res_blocks", num_res_blocks, levels)]
        attn = self._attention_levels(image_size, levels, attention_resolutions, attention_levels)
        config = dict(
            embed_dim=embed_dim, image_size=int(image_size), channels=int(channels), out_channels=out_channels,
            channel_mult=[int(m) for m in channel_mult], num_res_blocks=blocks, attention_type=attention_type,
            attention_resolutions=[int(r) for r in attention_resolutions],
            attention_levels=None if attention_levels is None else [bool(a) for a in attention_levels],
            middle_attention=bool(middle_attention), num_attn_heads=int(num_attn_heads),
            per_head_channels=per_head_channels, cond_dim=cond_dim, text_embed_dim=text_embed_dim,
            cond_on_text=bool(cond_on_text), feature_pooling_type=feature_pooling_type,
            learned_sinu_pos_emb_dim=int(learned_sinu_pos_emb_dim), dropout=float(dropout),
            use_null_token=bool(use_null_token), init_conv_kernel_size=int(init_conv_kernel_size),
            gradient_checkpointing=bool(gradient_checkpointing), scale_shift_norm=bool(scale_shift_norm),
            resblock_updown=bool(resblock_updown), resample_with_conv=bool(resample_with_conv),
            lowres_cond=bool(lowres_cond), stable_attention=bool(stable_attention),
            attention_pos_emb=bool(attention_pos_emb),
        )
        self._setup(config, embed_dim=embed_dim, channel_mult=channel_mult, channels=channels,
                    out_channels=out_channels, cond_dim=cond_dim, text_embed_dim=text_embed_dim,
                    cond_on_text=cond_on_text, use_null_token=use_null_token,
                    feature_pooling_type=feature_pooling_type, learned_sinu_pos_emb_dim=learned_sinu_pos_emb_dim,
                    lowres_cond=lowres_cond, init_conv_kernel_size=init_conv_kernel_size,
                    attention_type=attention_type, num_attn_heads=num_attn_heads,
                    per_head_channels=per_head_channels, stable_attention=stable_attention,
                    gradient_checkpointing=gradient_checkpointing, attention_pos_emb=bool(attention_pos_emb))
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        chans = [embed_dim * int(m) for m in channel_mult]
        res = dict(cond_dim=self.cond_dim, dropout=dropout, scale_shift_norm=scale_shift_norm)
        self._build(chans, blocks, attn, res, middle_attention, resblock_updown, resample_with_conv)

    @staticmethod
    def _attention_levels(image_size: int, levels: int, resolutions: Sequence[int],
                          flags: Optional[Sequence[bool]]) -> list[bool]:
        if flags is not None:
            return [bool(f) for f in per_level("attention_levels", list(flags), levels)]
        sizes = [image_size // 2**i for i in range(levels)]
        unknown = [r for r in resolutions if r not in sizes]
        if unknown:
            raise ValueError(f"attention_resolutions: {unknown} are not feature-map sizes of this net "
                             f"(image_size={image_size} gives {sizes})")
        return [s in resolutions for s in sizes]

    def _build(self, chans, blocks, attn, res, middle_attention, updown, with_conv) -> None:
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
        self.middle = Step(ResBlock(ch, ch, **res), self._attention(ch) if middle_attention else None,
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
