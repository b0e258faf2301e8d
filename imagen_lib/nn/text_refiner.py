"""A few learned self-attention layers over the projected text tokens, inside the network.

Why: a frozen encoder's tokens may not say what the image needs. In a two-object caption ("a red circle to the
right of a blue square") each colour word must carry which place its object goes to, and that depends on the
word's order *and* on the relation word: the exclusive-or of two facts, which no linear read-out of the token
and its index gives, and which the frozen random word-level T5 of the shapes configs does not compute (a
linear probe reads it 57-60% of the time, chance 50%; docs/composition.md). These layers let the network
compute it from the tokens and their learned index embeddings (``text_pos_emb``), with the frozen encoder
left as it is (so stages still train apart, e.g. under ``parallel_stages``).

Pre-norm transformer blocks (self-attention over the real tokens, then a feed-forward), whose residual
branches end in zero-initialised projections: an untrained refiner is exactly the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from imagen_lib.nn.attention import attention


class TextRefinerBlock(nn.Module):
    """One pre-norm self-attention + feed-forward block over text tokens (B, N, D) with a bool mask (B, N)."""

    def __init__(self, dim: int, heads: int, mult: int = 2):
        super().__init__()
        if dim % heads:
            raise ValueError(f"text_layers: the token width {dim} must be a multiple of the {heads} heads")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, dim))
        for layer in (self.to_out, self.ff[-1]):  # zero: the block starts as the identity
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        # a row without any real token (a dropped caption) attends to all of its (zero) tokens instead of none,
        # so that softmax stays finite; its tokens are zeroed by the caller afterwards
        keys = (mask | ~mask.any(dim=1, keepdim=True))[:, None, None, :]  # (B, 1, 1, N)
        q, k, v = self.to_qkv(self.norm1(tokens)).chunk(3, dim=-1)
        tokens = tokens + self.to_out(attention(q, k, v, self.heads, keys))
        return tokens + self.ff(self.norm2(tokens))


class TextRefiner(nn.Module):
    """``layers`` :class:`TextRefinerBlock` s of width ``dim`` with ``heads`` heads; ``forward(tokens, mask)``
    returns refined tokens of the same shape."""

    def __init__(self, dim: int, layers: int, heads: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(TextRefinerBlock(dim, heads) for _ in range(layers))

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        if mask.dtype != torch.bool or mask.shape != tokens.shape[:2]:
            raise ValueError(f"text_mask: expected a bool mask of shape {tuple(tokens.shape[:2])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        for block in self.blocks:
            tokens = block(tokens, mask)
        return tokens
