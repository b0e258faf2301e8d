"""The conditioning stem shared by both U-Nets: input checks, noise-level / text / low-res conditioning.

It turns the network protocol's inputs into what the blocks consume: the input image (with the low-res
image concatenated for super-resolution), one conditioning vector per sample (noise level + pooled text +
low-res augmentation level, as in Imagen) and the projected text tokens for attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imagen_lib.nn.attention import TextContext, make_text_context
from imagen_lib.nn.layers import NoiseEmbedding, TimestepEmbedding, mlp
from imagen_lib.nn.text_refiner import TextRefiner

PoolingType = Literal["attention", "mean"]
POOLING_TYPES = ("attention", "mean")
TextConditioningType = Literal["projected", "raw"]
TEXT_CONDITIONING_TYPES = ("projected", "raw")
PositionInit = Literal["zeros", "sinusoidal"]
POSITION_INITS = ("zeros", "sinusoidal")


def sinusoidal_positions(n: int, dim: int, scale: float = 0.5, max_period: float = 100.0) -> Tensor:
    """(n, dim) fixed features of token indices 0..n-1: ``scale * [sin(i w_k), cos(i w_k)]``,
    ``w_k = max_period ** (-k / (dim / 2))`` for k < dim / 2 (Vaswani et al. 2017, with a short period range
    for captions of tens of tokens). Each row has norm ``scale * sqrt(dim / 2)``; neighbouring indices differ
    in the fast features, far ones in the slow ones, so that a dot product can pick out one index."""
    if dim % 2:
        raise ValueError(f"cond_dim: sinusoidal token positions need an even width, got {dim}")
    half = dim // 2
    w = max_period ** (-torch.arange(half, dtype=torch.float64) / half)  # (half,)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * w  # (n, half)
    return (scale * torch.cat([angles.sin(), angles.cos()], dim=1)).float()


def _check_batch_scalar(name: str, value, batch: int, device) -> Tensor:
    """Accept a (B,) tensor, a 0-d tensor or a Python number; return a float (B,) tensor."""
    value = torch.as_tensor(value, device=device)
    if value.dim() == 0:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},) (one value per sample), got {tuple(value.shape)}")
    if not value.is_floating_point():
        value = value.float()
    return value


def _embed(embedder: nn.Sequential, c: Tensor) -> Tensor:
    """Sinusoidal features in float32, then the MLP in its own dtype (bf16/fp16 nets without autocast)."""
    features, net = embedder[0](c), embedder[1]
    return net(features.to(net[0].weight.dtype))  # (B, cond_dim)


class TextConditioner(nn.Module):
    """Projects text embeddings for attention, adds the null token and pools them for the conditioning vector.

    Args:
        text_embed_dim: width of the encoder's embeddings (1024 for T5-Large, 4096 for T5-XXL).
        cond_dim: width of projected tokens and of the conditioning vector.
        use_null_token: append a learned token that every row may attend to (so a caption-free row, the
            unconditional pass of classifier-free guidance, has a learned "no text" value).
        pooling: ``"attention"`` (learned per-token scores, masked softmax) or ``"mean"`` (masked mean).
        positions: > 0: a learned embedding of each token's index (its start: ``position_init``), added to the
            projected tokens of captions up to this many tokens, so that attention can tell "a red circle left of
            a blue square" from "a blue square left of a red circle" even when the encoder's tokens carry little
            order (docs/composition.md); 0 (default): none.
        position_init: how that embedding starts: ``"zeros"`` (default: the untrained net reads the text as
            without it) or ``"sinusoidal"`` (:func:`sinusoidal_positions`, still learned): attention's keys
            carry each token's index from the first step, which a small net needs to tie the first-named
            object to its place (docs/composition.md).
        pooled: add the pooled text to the conditioning vector (default True, as Imagen). False: the text
            reaches the image only through attention, where a place reads the token meant for it; a pooled
            vector is a set of words, and beside a convolution (which knows where it is) it lets the net place
            a pair of colours the way training showed them without reading the order (docs/composition.md).
        layers: > 0: that many learned self-attention blocks over the projected tokens (after the index
            embedding; :class:`~imagen_lib.nn.text_refiner.TextRefiner`, the identity when untrained), so the
            net can work out what each token means in its caption, e.g. where a colour word's object goes;
            0 (default): none.
    """

    def __init__(self, text_embed_dim: int, cond_dim: int, use_null_token: bool, pooling: PoolingType,
                 positions: int = 0, layers: int = 0, position_init: PositionInit = "zeros", pooled: bool = True):
        super().__init__()
        if pooling not in POOLING_TYPES:
            raise ValueError(f"feature_pooling_type: expected one of {POOLING_TYPES}, got {pooling!r}")
        if position_init not in POSITION_INITS:
            raise ValueError(f"text_pos_emb_init: expected one of {POSITION_INITS}, got {position_init!r}")
        self.text_embed_dim, self.pooling, self.pooled = text_embed_dim, pooling, pooled
        self.proj = nn.Sequential(nn.LayerNorm(text_embed_dim), nn.Linear(text_embed_dim, cond_dim))
        self.null_token = nn.Parameter(0.02 * torch.randn(1, 1, cond_dim)) if use_null_token else None
        # no bias: softmax over tokens is unchanged by a constant shift, so a bias would never learn
        self.pool_score = nn.Linear(cond_dim, 1, bias=False) if pooling == "attention" and pooled else None
        self.to_cond = nn.Sequential(nn.LayerNorm(cond_dim), nn.Linear(cond_dim, cond_dim)) if pooled else None
        # either start draws no random numbers, so every other weight is drawn as without the table; zeros: the
        # untrained net reads the text as without it
        self.position = None
        if positions > 0:
            start = sinusoidal_positions(positions, cond_dim) if position_init == "sinusoidal" else None
            self.position = nn.Parameter(torch.zeros(1, positions, cond_dim) if start is None else start[None])
        # built last: without it every other weight is drawn exactly as before
        self.refiner = TextRefiner(cond_dim, layers) if layers > 0 else None

    def _pool(self, tokens: Tensor, mask: Tensor) -> Tensor:
        weights = mask.to(tokens.dtype)[..., None]  # (B, N, 1)
        if self.pooling == "attention":
            scores = self.pool_score(tokens).float().masked_fill(~mask[..., None], float("-inf"))
            # an all-padding row gives NaN after softmax; it is zeroed just below
            weights = torch.nan_to_num(scores.softmax(dim=1), nan=0.0).to(tokens.dtype)
            return (weights * tokens).sum(dim=1)  # (B, D)
        return (weights * tokens).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (B, D); 0 tokens -> 0

    def forward(self, text_embeds: Tensor, text_mask: Tensor) -> tuple[Optional[Tensor], TextContext]:
        tokens = self.proj(text_embeds.to(self.proj[1].weight.dtype))  # (B, N, D)
        if self.position is not None:
            if tokens.shape[1] > self.position.shape[1]:
                raise ValueError(f"text_embeds: {tokens.shape[1]} tokens, but text_pos_emb embeds at most "
                                 f"{self.position.shape[1]} positions")
            tokens = tokens + self.position[:, : tokens.shape[1]].to(tokens.dtype)
        if self.refiner is not None:
            tokens = self.refiner(tokens, text_mask)
        # zero padded positions so that nothing a caller stores there (even NaN) can leak through any path
        tokens = tokens.masked_fill(~text_mask[..., None], 0.0)
        mask = text_mask
        if self.null_token is not None:
            b = tokens.shape[0]
            tokens = torch.cat([tokens, self.null_token.to(tokens.dtype).expand(b, -1, -1)], dim=1)
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)  # (B, N + 1)
        pooled = self.to_cond(self._pool(tokens, mask)) if self.pooled else None  # (B, cond_dim)
        return pooled, make_text_context(tokens, mask, always_nonempty=self.null_token is not None)


class TextTokens(nn.Module):
    """Stable Diffusion's text path: the encoder's tokens go to cross-attention as they are, nothing is pooled.

    Args:
        text_embed_dim: width of the encoder's embeddings (the attention layers' ``context_dim``).
        use_null_token: append a learned token of that width that every row may attend to.
    ``forward(text_embeds, text_mask)`` returns ``(None, context)``: no pooled vector. ``text_mask=None``
    means every token is real, and the attention layers then get no mask at all (flash kernels stay usable).
    """

    def __init__(self, text_embed_dim: int, use_null_token: bool):
        super().__init__()
        self.text_embed_dim = text_embed_dim
        self.null_token = nn.Parameter(0.02 * torch.randn(1, 1, text_embed_dim)) if use_null_token else None

    def forward(self, text_embeds: Tensor, text_mask: Optional[Tensor]) -> tuple[None, TextContext]:
        b, n = text_embeds.shape[:2]
        all_real = text_mask is None
        mask = text_embeds.new_ones(b, n, dtype=torch.bool) if all_real else text_mask
        tokens = text_embeds if all_real else text_embeds.masked_fill(~mask[..., None], 0.0)  # nothing leaks
        if self.null_token is not None:
            tokens = torch.cat([tokens, self.null_token.to(tokens.dtype).expand(b, -1, -1)], dim=1)
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)  # (B, N + 1)
        if all_real:
            return None, TextContext(tokens, mask, None, None)
        return None, make_text_context(tokens, mask, always_nonempty=self.null_token is not None)


@dataclass(frozen=True)
class TextOptions:
    """How a network reads the caption (the text fields of :class:`~imagen_lib.nn.config.NetworkConfig`).

    Fields: ``conditioning``: ``"projected"`` (default; :class:`TextConditioner`) or ``"raw"``
    (:class:`TextTokens`: the embeddings feed cross-attention unchanged, no pooled text, as in SD);
    ``use_null_token`` (True), ``pooling`` ("attention"), ``positions`` (0), ``position_init`` ("zeros"),
    ``layers`` (0) and ``pooled`` (True): :class:`TextConditioner`'s arguments of those names.
    """

    conditioning: TextConditioningType = "projected"
    use_null_token: bool = True
    pooling: PoolingType = "attention"
    positions: int = 0
    position_init: PositionInit = "zeros"
    layers: int = 0
    pooled: bool = True

    def __post_init__(self) -> None:
        if self.conditioning not in TEXT_CONDITIONING_TYPES:
            raise ValueError(f"text_conditioning: expected one of {TEXT_CONDITIONING_TYPES}, "
                             f"got {self.conditioning!r}")

    def build(self, text_embed_dim: int, cond_dim: int) -> nn.Module:
        if self.conditioning == "raw":
            return TextTokens(text_embed_dim, self.use_null_token)
        return TextConditioner(text_embed_dim, cond_dim, self.use_null_token, self.pooling, self.positions,
                               self.layers, self.position_init, self.pooled)


class Conditioning(nn.Module):
    """Input checks and the conditioning vector of both U-Nets (see the network protocol in docs/architecture.md).

    Args:
        channels: image channels of ``x`` (and of ``lowres_img``).
        cond_dim: width of the conditioning vector.
        noise_frequencies: frequencies of the fixed sinusoidal noise embedding.
        learned_sinu_pos_emb_dim: if > 0, a learned sinusoidal embedding with this many features is used
            instead (NeMo's option; 0 = fixed).
        text_embed_dim: None for a net without text.
        text: how the caption is read (:class:`TextOptions`; None: its defaults).
        lowres_cond: super-resolution mode (low-res image concatenated, its augmentation level embedded).
        timestep_embedding_dim: None (default): the noise levels' features are :class:`NoiseEmbedding`'s;
            an int: Stable Diffusion's :class:`TimestepEmbedding` with this many features.
    """

    def __init__(self, channels: int, cond_dim: int, noise_frequencies: int, learned_sinu_pos_emb_dim: int,
                 text_embed_dim: Optional[int], text: Optional[TextOptions], lowres_cond: bool,
                 timestep_embedding_dim: Optional[int] = None):
        super().__init__()
        text = TextOptions() if text is None else text
        self.channels, self.lowres_cond, self.text_embed_dim = channels, lowres_cond, text_embed_dim

        def noise_embedder() -> nn.Sequential:
            learned = learned_sinu_pos_emb_dim > 0
            if timestep_embedding_dim:
                emb = TimestepEmbedding(timestep_embedding_dim)
            else:
                emb = NoiseEmbedding(max(learned_sinu_pos_emb_dim // 2, 1) if learned else noise_frequencies, learned)
            return nn.Sequential(emb, mlp(emb.out_dim, cond_dim))

        self.noise = noise_embedder()
        self.lowres_noise = noise_embedder() if lowres_cond else None
        self.text: Optional[nn.Module] = None
        if text_embed_dim is not None:
            self.text = text.build(text_embed_dim, cond_dim)
        # the width of the tokens the attention layers read
        self.context_dim = None if self.text is None else (text_embed_dim if text.conditioning == "raw" else cond_dim)

    @property
    def in_channels(self) -> int:
        return self.channels * (2 if self.lowres_cond else 1)

    def _check_image(self, x: Tensor) -> None:
        if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"x: expected a float tensor (B, C, H, W), got {getattr(x, 'shape', type(x))}")
        if x.shape[1] != self.channels:
            raise ValueError(f"x: expected {self.channels} channels, got shape {tuple(x.shape)}")

    def _text(self, b: int, device, text_embeds, text_mask) -> tuple[Optional[Tensor], Optional[TextContext]]:
        if self.text is None:
            if text_embeds is not None or text_mask is not None:
                raise ValueError("text_embeds: this network has no text conditioning (text_embed_dim=None)")
            return None, None
        mask_given = text_mask is not None
        if text_embeds is None:  # no caption at all: the unconditional pass, a single all-padding token
            if text_mask is not None:
                raise ValueError("text_mask: given without text_embeds")
            text_embeds = torch.zeros(b, 1, self.text_embed_dim, device=device)
            text_mask = torch.zeros(b, 1, dtype=torch.bool, device=device)
            mask_given = True
        if not torch.is_tensor(text_embeds) or not text_embeds.is_floating_point():
            got = getattr(text_embeds, "dtype", type(text_embeds))
            raise ValueError(f"text_embeds: expected a float tensor, got {got}")
        if text_embeds.dim() != 3 or text_embeds.shape[0] != b or text_embeds.shape[2] != self.text_embed_dim:
            raise ValueError(f"text_embeds: expected shape ({b}, N, {self.text_embed_dim}), "
                             f"got {tuple(text_embeds.shape)}")
        if text_mask is None:
            text_mask = torch.ones(text_embeds.shape[:2], dtype=torch.bool, device=device)
        if text_mask.dtype != torch.bool or tuple(text_mask.shape) != tuple(text_embeds.shape[:2]):
            raise ValueError(f"text_mask: expected a bool tensor of shape {tuple(text_embeds.shape[:2])}, "
                             f"got {text_mask.dtype} {tuple(text_mask.shape)}")
        if isinstance(self.text, TextTokens):  # the tokens reach attention directly: in the weights' dtype
            text_embeds = text_embeds.to(self.noise[1][0].weight.dtype)
            return self.text(text_embeds, text_mask if mask_given else None)
        return self.text(text_embeds, text_mask)

    def _lowres(self, x: Tensor, lowres_img, lowres_noise_cond) -> tuple[Tensor, Optional[Tensor]]:
        if not self.lowres_cond:
            if lowres_img is not None or lowres_noise_cond is not None:
                raise ValueError("lowres_img: this network is not a super-resolution net (lowres_cond=False)")
            return x, None
        if lowres_img is None:
            raise ValueError("lowres_img: required by a super-resolution net (lowres_cond=True)")
        if tuple(lowres_img.shape) != tuple(x.shape):
            raise ValueError(f"lowres_img: expected shape {tuple(x.shape)} (already resized to x's size), "
                             f"got {tuple(lowres_img.shape)}")
        if lowres_noise_cond is None:
            raise ValueError("lowres_noise_cond: required by a super-resolution net (the augmentation level's "
                             "conditioning value, e.g. NoiseAugmentation's noise_cond)")
        c = _check_batch_scalar("lowres_noise_cond", lowres_noise_cond, x.shape[0], x.device)
        return torch.cat([x, lowres_img.to(x.dtype)], dim=1), _embed(self.lowres_noise, c)

    def forward(self, x: Tensor, noise_cond, text_embeds=None, text_mask=None, lowres_img=None,
                lowres_noise_cond=None) -> tuple[Tensor, Tensor, Optional[TextContext]]:
        """Returns ``(x_in (B, in_channels, H, W), silu(cond) (B, cond_dim), text context or None)``."""
        self._check_image(x)
        b = x.shape[0]
        cond = _embed(self.noise, _check_batch_scalar("noise_cond", noise_cond, b, x.device))  # (B, cond_dim)
        x, lowres = self._lowres(x, lowres_img, lowres_noise_cond)
        if lowres is not None:
            cond = cond + lowres
        pooled, context = self._text(b, x.device, text_embeds, text_mask)
        if pooled is not None:
            cond = cond + pooled
        return x, F.silu(cond), context
