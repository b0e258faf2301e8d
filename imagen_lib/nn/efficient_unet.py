"""Imagen's Efficient U-Net for the super-resolution stages (Saharia et al. 2022, appendix B.1).

The paper's three changes to the regular U-Net, all here:

1. Parameters move to the low resolutions: ``num_res_blocks`` is a per-level list (e.g. [2, 4, 8, 8, 8]).
2. Skip connections are scaled by 1/sqrt(2): the up path adds the down path's level output and rescales,
   ``h = (h + skip) / sqrt(2)``, which keeps the sum at unit variance (``skip_connection_scaling``).
3. Downsampling comes *before* the convolutions of a down block and upsampling *after* those of an up
   block, so the expensive convolutions run at the lower resolution.

Layout: an input conv at full resolution; per level a DBlock (downsample for levels > 0, then res blocks,
then one attention block where enabled) whose output is kept as the skip; the deepest level's DBlock is the
bottleneck (its blocks run once); then per level, deepest first, an UBlock (skip add, res blocks, attention,
then upsample to the next level's width and size); a GroupNorm-SiLU-conv head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

from torch import Tensor, nn

from imagen_lib.nn.attention import AttentionType
from imagen_lib.nn.conditioning import PoolingType
from imagen_lib.nn.layers import Downsample, ResBlock, Upsample, per_level
from imagen_lib.nn.unet import UnetBase


class _Level(nn.Module):
    """A DBlock or an UBlock: optional ``pre`` resample, res blocks, optional attention, optional ``post``."""

    def __init__(self, pre: Optional[nn.Module], blocks: list[ResBlock], attn: Optional[nn.Module],
                 post: Optional[nn.Module]):
        super().__init__()
        self.pre, self.blocks, self.attn, self.post = pre, nn.ModuleList(blocks), attn, post

    def forward(self, h: Tensor, cond_act: Tensor, context=None) -> Tensor:
        if self.pre is not None:
            h = self.pre(h)  # (B, C_prev, H/2, W/2): downsample first (Imagen's change 3)
        for block in self.blocks:
            h = block(h, cond_act)  # (B, C, H', W')
        if self.attn is not None:
            h = self.attn(h, context)
        if self.post is not None:
            h = self.post(h)  # (B, C_next, 2H', 2W'): upsample after the convolutions
        return h


class EfficientUnet(UnetBase):
    """Imagen's Efficient U-Net (super-resolution stages), with NeMo's option names.

    Args (defaults = NeMo's sr256-600m where it has one):
        embed_dim: base channels (128); ``dim`` is accepted as an alias.
        image_size: training resolution (256), recorded in the config.
        channels (3), out_channels (None = channels).
        channel_mult: per-level channel multiples ((1, 2, 4, 8, 8)).
        num_res_blocks: per-level res block counts, used by the DBlock and the UBlock of each level
            ((2, 4, 8, 8, 8); NeMo's ``num_resblocks``); the deepest level's blocks run once.
        attention_type: ``"self"``, ``"cross"``, ``"stacked"``, ``"fused"`` or None ("fused").
        attention_levels: per-level bools, one attention block per DBlock/UBlock where True
            (None = the two deepest levels, NeMo's [0, 0, 0, 1, 1]; NeMo's ``atnn_enabled_at``).
        num_attn_heads (8) / per_head_channels (64), cond_dim (None = 4 * embed_dim; paper 512),
        text_embed_dim (1024), cond_on_text (True), feature_pooling_type ("attention"),
        learned_sinu_pos_emb_dim (0), dropout (0.0), use_null_token (True), init_conv_kernel_size (3),
        gradient_checkpointing (False), scale_shift_norm (True), resample_with_conv (True),
        stable_attention (False), attention_pos_emb (False): as for :class:`~imagen_lib.nn.unet.Unet`.
        skip_connection_scaling: scale skip sums by 1/sqrt(2) (True, the paper).
        lowres_cond: super-resolution mode (True: this is what the Efficient U-Net is for).
    """

    def __init__(
        self, embed_dim: int = 128, *, image_size: int = 256, channels: int = 3, out_channels: Optional[int] = None,
        channel_mult: Sequence[int] = (1, 2, 4, 8, 8), num_res_blocks: Union[int, Sequence[int]] = (2, 4, 8, 8, 8),
        attention_type: Optional[AttentionType] = "fused",
        attention_levels: Union[None, bool, Sequence[bool]] = None,
        num_attn_heads: int = 8, per_head_channels: Optional[int] = 64, cond_dim: Optional[int] = None,
        text_embed_dim: Optional[int] = 1024, cond_on_text: bool = True,
        feature_pooling_type: PoolingType = "attention", learned_sinu_pos_emb_dim: int = 0,
        dropout: float = 0.0, use_null_token: bool = True, init_conv_kernel_size: int = 3,
        gradient_checkpointing: bool = False, scale_shift_norm: bool = True, resample_with_conv: bool = True,
        skip_connection_scaling: bool = True, lowres_cond: bool = True, stable_attention: bool = False,
        attention_pos_emb: bool = False, dim: Optional[int] = None,
    ):
        super().__init__()
        embed_dim = int(dim if dim is not None else embed_dim)
        levels = len(channel_mult)
        blocks = [int(n) for n in per_level("num_res_blocks", num_res_blocks, levels)]
        if any(n < 1 for n in blocks):
            raise ValueError(f"num_res_blocks: expected at least one block per level, got {blocks}")
        if attention_levels is None:  # NeMo's default placement: the two deepest levels
            attention_levels = [level >= levels - 2 for level in range(levels)]
        attn = [bool(a) for a in per_level("attention_levels", attention_levels, levels)]
        config = dict(
            embed_dim=embed_dim, image_size=int(image_size), channels=int(channels), out_channels=out_channels,
            channel_mult=[int(m) for m in channel_mult], num_res_blocks=blocks, attention_type=attention_type,
            attention_levels=attn, num_attn_heads=int(num_attn_heads), per_head_channels=per_head_channels,
            cond_dim=cond_dim, text_embed_dim=text_embed_dim, cond_on_text=bool(cond_on_text),
            feature_pooling_type=feature_pooling_type, learned_sinu_pos_emb_dim=int(learned_sinu_pos_emb_dim),
            dropout=float(dropout), use_null_token=bool(use_null_token),
            init_conv_kernel_size=int(init_conv_kernel_size), gradient_checkpointing=bool(gradient_checkpointing),
            scale_shift_norm=bool(scale_shift_norm), resample_with_conv=bool(resample_with_conv),
            skip_connection_scaling=bool(skip_connection_scaling), lowres_cond=bool(lowres_cond),
            stable_attention=bool(stable_attention), attention_pos_emb=bool(attention_pos_emb),
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
        self.skip_scale = 2**-0.5 if skip_connection_scaling else 1.0
        chans = [embed_dim * int(m) for m in channel_mult]
        res = dict(cond_dim=self.cond_dim, dropout=dropout, scale_shift_norm=scale_shift_norm)
        self._build(chans, blocks, attn, res, resample_with_conv)

    def _build(self, chans: list[int], blocks: list[int], attn: list[bool], res: dict, with_conv: bool) -> None:
        last = len(chans) - 1
        self.dblocks = nn.ModuleList()
        ch = chans[0]
        for level, (out_ch, n) in enumerate(zip(chans, blocks)):
            pre = Downsample(ch, ch, with_conv) if level > 0 else None
            res_blocks = [ResBlock(ch if i == 0 else out_ch, out_ch, **res) for i in range(n)]
            # the bottleneck (deepest) DBlock upsamples at its end: there is no UBlock at its level
            post = Upsample(out_ch, chans[level - 1], with_conv) if level == last and level > 0 else None
            self.dblocks.append(_Level(pre, res_blocks, self._attention(out_ch) if attn[level] else None, post))
            ch = out_ch
        self.ublocks = nn.ModuleList()
        for level in reversed(range(last)):
            c = chans[level]
            post = Upsample(c, chans[level - 1], with_conv) if level > 0 else None
            res_blocks = [ResBlock(c, c, **res) for _ in range(blocks[level])]
            self.ublocks.append(_Level(None, res_blocks, self._attention(c) if attn[level] else None, post))

    def _body(self, h: Tensor, cond_act: Tensor, ctx) -> Tensor:
        skips = []
        for dblock in self.dblocks:
            h = self._run(dblock, h, cond_act, ctx)
            skips.append(h)
        skips.pop()  # the bottleneck's output continues directly
        for ublock in self.ublocks:
            h = (h + skips.pop()) * self.skip_scale  # Imagen: skip connections scaled by 1/sqrt(2)
            h = self._run(ublock, h, cond_act, ctx)
        return h
