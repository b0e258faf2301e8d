"""The four attention types of NeMo's Imagen U-Nets, all through ``F.scaled_dot_product_attention``.

- ``self``: multi-head self-attention over the image tokens.
- ``cross``: image tokens attend to the text tokens only.
- ``stacked``: ``self``, then ``cross``, then a feed-forward layer (a transformer block).
- ``fused``: one attention whose keys/values are the image tokens and the text tokens concatenated
  (Imagen's base and 256 px models).

Every block works on ``(B, C, H, W)`` feature maps, is pre-normalised and residual, and has a zero-initialised
output projection so that it starts as the identity. Optionally (``pos_emb``) the image tokens carry fixed
2-D sinusoidal features of where they sit in the image (:func:`position_features`): convolutions and
attention are both blind to absolute position (a U-Net learns it only from zero padding), and without them
a small text-to-image net learns "in the top left corner" far later than "red" or "large". Boolean masks
(True = attend) are handed to SDPA, so padded text tokens get exactly zero weight; SDPA picks flash /
memory-efficient kernels where available.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imagen_lib.nn.layers import group_norm, zero_

AttentionType = Literal["self", "cross", "stacked", "fused"]
ATTENTION_TYPES = ("self", "cross", "stacked", "fused")


@dataclass
class TextContext:
    """Text tokens prepared once per network call and shared by every attention block.

    Attributes:
        tokens: (B, N, D) projected text tokens (the null token included when the net has one).
        mask: (B, N) bool, True = real token (the null token is always True).
        safe_mask: (B, 1, 1, N) bool for SDPA; rows with no True entry are made all-True so that softmax
            stays finite (their result is then discarded through ``keep``).
        keep: (B, 1, 1) float, 0 for rows that had no token at all; None when every row is known to have one
            (a null token is present), which skips the extra multiply.
    """

    tokens: Tensor
    mask: Tensor
    safe_mask: Tensor
    keep: Optional[Tensor]


def make_text_context(tokens: Tensor, mask: Tensor, always_nonempty: bool) -> TextContext:
    """Build a :class:`TextContext` from tokens (B, N, D) and a bool mask (B, N)."""
    if always_nonempty:
        return TextContext(tokens, mask, mask[:, None, None, :], None)
    has_any = mask.any(dim=1)  # (B,)
    safe = mask | ~has_any[:, None]  # (B, N)
    keep = has_any.to(tokens.dtype)[:, None, None]  # (B, 1, 1)
    return TextContext(tokens, mask, safe[:, None, None, :], keep)


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Optional[Tensor] = None,
              float32: bool = False) -> Tensor:
    """Multi-head scaled dot-product attention on token tensors.

    Args:
        q: (B, Lq, C); k, v: (B, Lk, C); heads divides C.
        mask: None or bool broadcastable to (B, heads, Lq, Lk), True = attend.
        float32: compute in float32 (softmax stability for fp16/bf16 weights), cast back after.
    Returns (B, Lq, C) in q's dtype.
    """
    b, lq, c = q.shape
    dtype = q.dtype
    q, k, v = (t.unflatten(-1, (heads, c // heads)).transpose(1, 2) for t in (q, k, v))  # (B, h, L, d)
    if float32:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, Lq, d)
    return out.transpose(1, 2).reshape(b, lq, c).to(dtype)  # (B, Lq, C)


def position_features(height: int, width: int, channels: int, device=None, dtype=None) -> Tensor:
    """Fixed 2-D sinusoidal features of each pixel's centre, in fractions of the image side.

    With ``u = (i + 1/2) / height`` (rows) and ``v = (j + 1/2) / width`` (columns) and ``n = channels // 4``
    frequencies ``pi * k`` for ``k = 1 .. n``, the features of pixel ``(i, j)`` are
    ``[sin(pi k u), cos(pi k u)]_k`` then ``[sin(pi k v), cos(pi k v)]_k``, zero-padded to ``channels``.
    Positions are fractions of the side, so a feature means the same place ("top left") at every feature-map
    resolution. Returns (height * width, channels), rows in raster order (as :func:`_tokens`).
    """
    if channels < 4:
        raise ValueError(f"channels: position features need at least 4 channels, got {channels}")
    n = channels // 4
    freqs = math.pi * torch.arange(1, n + 1, device=device, dtype=torch.float32)  # (n,)
    u = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height  # (H,)
    v = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width  # (W,)
    fu, fv = u[:, None] * freqs, v[:, None] * freqs  # (H, n), (W, n)
    rows = torch.cat([fu.sin(), fu.cos()], dim=-1)[:, None, :].expand(height, width, 2 * n)
    cols = torch.cat([fv.sin(), fv.cos()], dim=-1)[None, :, :].expand(height, width, 2 * n)
    features = torch.cat([rows, cols], dim=-1).reshape(height * width, 4 * n)
    return F.pad(features, (0, channels - 4 * n)).to(dtype or torch.float32)  # (HW, C)


def _tokens(x: Tensor) -> Tensor:
    return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)


def _image(t: Tensor, like: Tensor) -> Tensor:
    return t.transpose(1, 2).reshape(like.shape)  # (B, HW, C) -> (B, C, H, W)


class ImageAttention(nn.Module):
    """One pre-norm residual attention layer of kind ``self``, ``cross`` or ``fused``.

    Args:
        kind: ``"self"``, ``"cross"`` or ``"fused"``.
        channels: image feature channels C (also the attention width).
        heads: number of heads (divides C).
        context_dim: width of the text tokens (required for ``cross``/``fused``).
        float32: compute attention in float32 (NeMo's ``stable_attention``).
        pos_emb: add :func:`position_features` to the normalised image tokens (queries and image keys/values).
    """

    def __init__(self, kind: Literal["self", "cross", "fused"], channels: int, heads: int,
                 context_dim: Optional[int] = None, float32: bool = False, pos_emb: bool = False):
        super().__init__()
        if kind not in ("self", "cross", "fused"):
            raise ValueError(f"kind: expected 'self', 'cross' or 'fused', got {kind!r}")
        if kind != "self" and context_dim is None:
            raise ValueError(f"context_dim: required for {kind!r} attention")
        self.kind, self.heads, self.float32, self.pos_emb = kind, heads, float32, pos_emb
        self.norm = group_norm(channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(channels, 2 * channels) if kind != "cross" else None
        self.to_kv_text = nn.Linear(context_dim, 2 * channels) if kind != "self" else None
        # Zero-init the output projection: the block starts as the identity (DiT, ADM).
        self.proj_out = zero_(nn.Linear(channels, channels))
        self._position_key, self._position = None, None  # position features of the last map size seen

    def _position_features(self, height: int, width: int, like: Tensor) -> Tensor:
        """:func:`position_features` for this map size, made once and reused while size, device and dtype hold."""
        key = (height, width, like.device, like.dtype)
        if self._position_key != key:
            self._position_key = key
            self._position = position_features(height, width, like.shape[-1], like.device, like.dtype)
        return self._position

    def forward(self, x: Tensor, context: Optional[TextContext] = None) -> Tensor:
        t = _tokens(self.norm(x))  # (B, HW, C)
        if self.pos_emb:
            t = t + self._position_features(x.shape[-2], x.shape[-1], t)
        q = self.to_q(t)  # (B, HW, C)
        mask, keep = None, None
        if self.kind == "self":
            k, v = self.to_kv(t).chunk(2, dim=-1)  # (B, HW, C) each
        elif self.kind == "cross":
            k, v = self.to_kv_text(context.tokens).chunk(2, dim=-1)  # (B, N, C) each
            mask, keep = context.safe_mask, context.keep
        else:  # fused: image tokens are always attendable, so the raw text mask is safe
            kv = torch.cat([self.to_kv(t), self.to_kv_text(context.tokens)], dim=1)  # (B, HW + N, 2C)
            k, v = kv.chunk(2, dim=-1)
            img = context.mask.new_ones(context.mask.shape[0], t.shape[1])  # (B, HW)
            mask = torch.cat([img, context.mask], dim=1)[:, None, None, :]  # (B, 1, 1, HW + N)
        out = self.proj_out(attention(q, k, v, self.heads, mask, self.float32))  # (B, HW, C)
        if keep is not None:
            out = out * keep  # a row with no text token at all receives nothing from cross-attention
        return x + _image(out, x)


class FeedForward(nn.Module):
    """Pre-norm residual MLP on image tokens (the third part of a ``stacked`` block)."""

    def __init__(self, channels: int, mult: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.net = nn.Sequential(nn.Linear(channels, mult * channels), nn.GELU(),
                                 zero_(nn.Linear(mult * channels, channels)))

    def forward(self, x: Tensor, context: Optional[TextContext] = None) -> Tensor:
        t = _tokens(x)  # (B, HW, C)
        return x + _image(self.net(self.norm(t)), x)


class AttentionBlock(nn.Module):
    """An attention block of any of the four types, or its text-free form.

    Without text (``context_dim=None``), ``fused`` and ``cross`` become ``self`` attention and ``stacked``
    becomes self-attention plus feed-forward, so one config describes conditional and unconditional nets.
    At call time a text-conditioned block needs a :class:`TextContext` (an all-False mask row = no text).
    """

    def __init__(self, kind: AttentionType, channels: int, heads: int, context_dim: Optional[int] = None,
                 float32: bool = False, pos_emb: bool = False):
        super().__init__()
        if kind not in ATTENTION_TYPES:
            raise ValueError(f"attention_type: expected one of {ATTENTION_TYPES}, got {kind!r}")
        if channels % heads:
            raise ValueError(f"heads: {heads} must divide the {channels} channels of an attention block")
        text = context_dim is not None
        if kind == "stacked":
            layers = [ImageAttention("self", channels, heads, float32=float32, pos_emb=pos_emb)]
            if text:
                layers.append(ImageAttention("cross", channels, heads, context_dim, float32, pos_emb))
            layers.append(FeedForward(channels))
        else:
            layers = [ImageAttention(kind if text else "self", channels, heads, context_dim, float32, pos_emb)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, context: Optional[TextContext] = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, context)
        return x
