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

from typing import Optional

from torch import Tensor, nn

from imagen_lib.nn.config import EfficientUnetConfig
from imagen_lib.nn.layers import Downsample, ResBlock, Upsample
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

    ``EfficientUnet(config, **overrides)``: ``config`` is an
    :class:`~imagen_lib.nn.config.EfficientUnetConfig` (None = its defaults, NeMo's sr256-600m) and
    ``overrides`` are its fields; ``net.config`` holds the result and ``type(net)(net.config)`` or
    ``type(net)(**net.config.to_dict())`` rebuilds the same architecture.
    """

    config_class = EfficientUnetConfig
    config: EfficientUnetConfig

    def _build(self, config: EfficientUnetConfig) -> None:
        self.skip_scale = 2**-0.5 if config.skip_connection_scaling else 1.0
        chans, blocks, attn = config.level_channels, config.num_res_blocks, config.attention_levels
        res, with_conv = self._res_options(), config.resample_with_conv
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
