"""Building blocks shared by :class:`~imagen_lib.nn.unet.Unet` and :class:`~imagen_lib.nn.efficient_unet.EfficientUnet`.

Smallest pieces first: normalisation, the noise-level embedding, resampling, the residual block.
Only torch is used here; nothing knows about diffusion.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn


def group_norm(channels: int, max_groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``max_groups`` that divides ``channels`` (ADM uses 32)."""
    groups = max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=eps)


def zero_(module: nn.Module) -> nn.Module:
    """Zero a layer's weight and bias in place and return it (see the networks' init notes for why)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class NoiseEmbedding(nn.Module):
    """Features of a per-sample scalar noise level: ``[c, sin(2 pi f_k c), cos(2 pi f_k c)]``.

    The diffusion processes hand us very different ranges: EDM's ``ln(sigma)/4`` lives in about
    [-1.6, 1.1] while a VP log-SNR spans about [-20, 20]. A single ADM-style ladder tuned for one of them
    either aliases the wide range or cannot separate nearby values of the narrow one, so the frequencies
    ``f_k`` are spaced geometrically from 1/64 cycles per unit (under one period over [-20, 20]) to 8
    cycles per unit (about 20 periods over EDM's whole range), and the raw value ``c`` is kept as a
    monotone feature that is never ambiguous.

    Args:
        num_frequencies: number of frequencies ``f_k``; the output has ``1 + 2 * num_frequencies`` features.
        learned: if True the frequencies are trainable parameters (the "learned sinusoidal" embedding of
            v-diffusion / NeMo's ``learned_sinu_pos_emb_dim``), initialised on the same ladder so that
            training starts from the fixed embedding's resolution.
    """

    def __init__(self, num_frequencies: int, learned: bool = False, min_freq: float = 1 / 64, max_freq: float = 8.0):
        super().__init__()
        if num_frequencies < 1:
            raise ValueError(f"num_frequencies: expected a positive int, got {num_frequencies}")
        freqs = 2 * math.pi * torch.logspace(math.log10(min_freq), math.log10(max_freq), num_frequencies)
        if learned:
            self.freqs = nn.Parameter(freqs)
        else:
            self.register_buffer("freqs", freqs, persistent=False)
        self.out_dim = 1 + 2 * num_frequencies

    def forward(self, c: Tensor) -> Tensor:
        c = c.float()[:, None]  # (B, 1); float32 even under autocast: sin of large arguments needs it
        angles = c * self.freqs.float()[None]  # (B, F)
        return torch.cat([c, angles.sin(), angles.cos()], dim=1)  # (B, 1 + 2F)


class TimestepEmbedding(nn.Module):
    """Stable Diffusion's features of a timestep ``t``: ``[cos(t w_k), sin(t w_k)]`` with ``w_k = 10000 ** (-k / h)``,
    ``k = 0 .. h - 1``, ``h = dim // 2`` (cosines first, diffusers' ``flip_sin_to_cos=True``, no frequency shift;
    a zero feature pads an odd ``dim``).

    The ladder is tuned to integer timesteps in [0, 1000): the slowest frequency turns by about 0.1 rad
    over that range and the fastest by 1 rad per step. Use it for SD's discrete schedule (and to load SD weights);
    :class:`NoiseEmbedding` suits the continuous processes' values.

    Args:
        dim: number of features (SD: 320, the base channel count).
        max_period: the slowest period (10000).
    """

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        if dim < 2:
            raise ValueError(f"dim: expected an int >= 2, got {dim}")
        self.out_dim, self.max_period = dim, max_period

    def forward(self, t: Tensor) -> Tensor:
        half = self.out_dim // 2
        # the same float32 operations, in the same order, as diffusers and the original LDM code
        exponent = -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
        angles = t.float()[:, None] * torch.exp(exponent / half)[None]  # (B, half)
        features = torch.cat([angles.cos(), angles.sin()], dim=1)  # (B, 2 half)
        return F.pad(features, (0, self.out_dim - 2 * half))  # (B, dim)


def mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> SiLU -> Linear, the ADM embedding MLP."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


class Downsample(nn.Module):
    """Halve the resolution: a stride-2 3x3 conv (``with_conv``) or 2x2 average pooling (+1x1 conv if the
    channel count changes)."""

    def __init__(self, in_ch: int, out_ch: Optional[int] = None, with_conv: bool = True):
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv:
            self.op = nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1)
        else:
            pool = nn.AvgPool2d(2)
            self.op = pool if out_ch == in_ch else nn.Sequential(pool, nn.Conv2d(in_ch, out_ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)  # (B, C', H/2, W/2)


class Upsample(nn.Module):
    """Double the resolution: nearest neighbour, then a 3x3 conv (``with_conv``; 1x1 if only the channel
    count must change)."""

    def __init__(self, in_ch: int, out_ch: Optional[int] = None, with_conv: bool = True):
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv:
            self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        else:
            self.conv = nn.Conv2d(in_ch, out_ch, 1) if out_ch != in_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C', 2H, 2W)


class ResBlock(nn.Module):
    """ADM residual block: GN-SiLU-conv, conditioning, GN-SiLU-dropout-conv, plus a skip.

    Args:
        in_ch, out_ch: channels in and out (a 1x1 conv matches the skip when they differ).
        cond_dim: width of the conditioning vector (noise level + pooled text + low-res level).
        dropout: dropout probability before the second conv (default 0; NeMo's ``dropout``).
        scale_shift_norm: True (default, ADM/NeMo): the conditioning gives a per-channel scale and shift
            applied after the second GroupNorm; False: it is added to the features before it.
        resample: ``"down"``/``"up"`` resamples inside the block (ADM's ``resblock_updown``), else None.

    ``forward(x, cond_act)`` takes ``cond_act = silu(cond)`` computed once per network call.
    """

    def __init__(
        self, in_ch: int, out_ch: int, cond_dim: int, dropout: float = 0.0, scale_shift_norm: bool = True,
        resample: Optional[Literal["down", "up"]] = None,
    ):
        super().__init__()
        self.scale_shift_norm, self.resample = scale_shift_norm, resample
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.cond_proj = nn.Linear(cond_dim, out_ch * (2 if scale_shift_norm else 1))
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Zero-init the last conv: each block starts as the identity (plus skip projection), so the deep net
        # begins as a shallow one and early gradients are well scaled (ADM, DiT's adaLN-zero).
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: Tensor, cond_act: Tensor) -> Tensor:
        h = F.silu(self.norm1(x))  # (B, Cin, H, W)
        if self.resample is not None:
            h, x = self._resample(h), self._resample(x)
        h = self.conv1(h)  # (B, Cout, H', W')
        c = self.cond_proj(cond_act)[:, :, None, None]  # (B, Cout or 2 Cout, 1, 1)
        if self.scale_shift_norm:
            scale, shift = c.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)  # norm(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + c)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h  # (B, Cout, H', W')


def run_checkpointed(module: nn.Module, enabled: bool, *args):
    """Call ``module(*args)``, recomputing its activations in backward when ``enabled`` and grads are on."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class Step(nn.Module):
    """One step of a U-Net path: ``main`` (a :class:`ResBlock` or a resampler), an optional attention block,
    then an optional ``post`` resampler (a resampler or an up/down :class:`ResBlock`)."""

    def __init__(self, main: nn.Module, attn: Optional[nn.Module] = None, post: Optional[nn.Module] = None):
        super().__init__()
        self.main, self.attn, self.post = main, attn, post

    @staticmethod
    def _call(module: nn.Module, h: Tensor, cond_act: Tensor) -> Tensor:
        return module(h, cond_act) if isinstance(module, ResBlock) else module(h)

    def forward(self, h: Tensor, cond_act: Tensor, context=None) -> Tensor:
        h = self._call(self.main, h, cond_act)
        if self.attn is not None:
            h = self.attn(h, context)
        if self.post is not None:
            h = self._call(self.post, h, cond_act)
        return h


def heads_for(channels: int, num_attn_heads: int, per_head_channels: Optional[int]) -> int:
    """Heads of an attention block: ``channels // per_head_channels`` when that is set (one head for a block
    no wider than one head), else ``num_attn_heads``."""
    if per_head_channels:
        if channels <= per_head_channels:
            return 1
        if channels % per_head_channels:
            raise ValueError(f"per_head_channels: {per_head_channels} must divide every attention width, "
                             f"got a block with {channels} channels")
        return channels // per_head_channels
    return num_attn_heads


def per_level(name: str, value, levels: int) -> list:
    """Expand an int (or bool) to one value per level, or check a list has one per level."""
    if isinstance(value, (int, bool)):
        return [value] * levels
    value = list(value)
    if len(value) != levels:
        raise ValueError(f"{name}: expected one value per level ({levels} levels from channel_mult), got {value}")
    return value
