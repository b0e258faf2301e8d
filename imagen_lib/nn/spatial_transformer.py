"""Stable Diffusion's attention block, the spatial transformer (attention type ``"spatial_transformer"``).

Rombach et al.'s latent-diffusion U-Net (and NeMo's ``use_spatial_transformer``) puts one of these after the
res blocks of its attention levels: GroupNorm, an input projection (a 1x1 conv in SD 1.x, a linear layer in
SD 2, ``use_linear_in_transformer``), ``transformer_depth`` transformer layers on the image tokens, an output
projection and a residual. Each transformer layer is pre-LayerNorm and residual three times over:
self-attention, cross-attention to the text tokens, and a GEGLU feed-forward (Shazeer 2020) four times as
wide as the tokens. Query/key/value projections have no bias, as in SD, so published weights load
one-to-one (:mod:`imagen_lib.nn.convert_sd`).

Unlike ``stacked`` (:mod:`imagen_lib.nn.attention`), the text tokens are read at the text encoder's own width
(``context_dim``) and the layer norms and projections follow SD's layout. Without text (``context_dim=None``)
the cross-attention is left out. Attention runs through ``F.scaled_dot_product_attention`` (flash /
memory-efficient kernels where the device has them; the text mask is passed only when a caller gave one).
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from imagen_lib.nn.attention import TextContext, _image, _tokens, attention
from imagen_lib.nn.layers import group_norm, zero_

SPATIAL_TRANSFORMER = "spatial_transformer"


class TokenAttention(nn.Module):
    """Multi-head attention of tokens to themselves (``context_dim=None``) or to context tokens.

    Args:
        channels: token width (also the attention width; ``heads`` divides it).
        heads: number of heads.
        context_dim: width of the context tokens for cross-attention (None: self-attention).
        float32: compute the attention in float32 (SD's ``upcast_attention``; NeMo's ``stable_attention``).
    """

    def __init__(self, channels: int, heads: int, context_dim: Optional[int] = None, float32: bool = False):
        super().__init__()
        self.heads, self.float32 = heads, float32
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(context_dim or channels, channels, bias=False)
        self.to_v = nn.Linear(context_dim or channels, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, t: Tensor, context: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        source = t if context is None else context  # (B, L, C) or (B, N, context_dim)
        out = attention(self.to_q(t), self.to_k(source), self.to_v(source), self.heads, mask, self.float32)
        return self.to_out(out)  # (B, L, C)


class GEGLUFeedForward(nn.Module):
    """``out(a * gelu(g))`` with ``[a, g] = proj(t)``: a gated MLP ``mult`` times as wide as the tokens."""

    def __init__(self, channels: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(channels, 2 * mult * channels)
        self.out = nn.Linear(mult * channels, channels)

    def forward(self, t: Tensor) -> Tensor:
        a, gate = self.proj(t).chunk(2, dim=-1)  # (B, L, mult C) each
        return self.out(a * F.gelu(gate))  # (B, L, C)


class TransformerLayer(nn.Module):
    """Self-attention, cross-attention to the text (when ``context_dim`` is set), GEGLU feed-forward; each
    pre-LayerNorm and residual (SD's ``BasicTransformerBlock``)."""

    def __init__(self, channels: int, heads: int, context_dim: Optional[int] = None, float32: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attn1 = TokenAttention(channels, heads, float32=float32)
        text = context_dim is not None
        self.norm2 = nn.LayerNorm(channels) if text else None
        self.attn2 = TokenAttention(channels, heads, context_dim, float32) if text else None
        self.norm3 = nn.LayerNorm(channels)
        self.ff = GEGLUFeedForward(channels)

    def forward(self, t: Tensor, context: Optional[TextContext] = None) -> Tensor:
        t = t + self.attn1(self.norm1(t))  # (B, L, C)
        if self.attn2 is not None:
            out = self.attn2(self.norm2(t), context.tokens, context.safe_mask)
            if context.keep is not None:
                out = out * context.keep  # a row with no text token at all receives nothing from the text
            t = t + out
        return t + self.ff(self.norm3(t))


class SpatialTransformer(nn.Module):
    """GroupNorm, ``proj_in``, ``depth`` :class:`TransformerLayer` s on the image tokens, ``proj_out``, plus
    the input: ``(B, C, H, W) -> (B, C, H, W)``.

    Args:
        channels: feature channels C (the transformer width; ``heads`` divides it).
        heads: attention heads.
        context_dim: width of the text tokens (None: no cross-attention).
        depth: transformer layers (1; NeMo's ``transformer_depth``).
        linear_proj: linear in/out projections on the tokens (SD 2) rather than 1x1 convs (SD 1.x) (True).
        float32: attention in float32 (False).
    The output projection starts at zero, so the block starts as the identity (as in SD and :mod:`attention`).
    """

    def __init__(self, channels: int, heads: int, context_dim: Optional[int] = None, depth: int = 1,
                 linear_proj: bool = True, float32: bool = False):
        super().__init__()
        if channels % heads:
            raise ValueError(f"heads: {heads} must divide the {channels} channels of a spatial transformer")
        self.linear_proj = linear_proj
        self.norm = group_norm(channels, eps=1e-6)
        make = (lambda: nn.Linear(channels, channels)) if linear_proj else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = make()
        self.transformer_blocks = nn.ModuleList(
            TransformerLayer(channels, heads, context_dim, float32) for _ in range(depth))
        self.proj_out = zero_(make())

    def forward(self, x: Tensor, context: Optional[TextContext] = None) -> Tensor:
        h = self.norm(x)  # (B, C, H, W)
        t = self.proj_in(_tokens(h)) if self.linear_proj else _tokens(self.proj_in(h))  # (B, HW, C)
        for layer in self.transformer_blocks:
            t = layer(t, context)
        h = _image(self.proj_out(t), x) if self.linear_proj else self.proj_out(_image(t, x))  # (B, C, H, W)
        return x + h
