"""Network configs: every option of a U-Net in one frozen dataclass (in the style of nanoGPT's ``GPTConfig``).

:class:`UnetConfig` and :class:`EfficientUnetConfig` share :class:`NetworkConfig`'s fields (image,
conditioning, attention, resampling) and add their own. A config is checked and normalised when it is made:
sequences become tuples, an int ``num_res_blocks`` becomes one count per level and the Efficient U-Net's
default ``attention_levels`` is resolved. So two configs that build the same network compare equal, and
``to_dict()`` gives exactly the plain JSON values a checkpoint's config.json holds (``from_dict`` reads
them back). Option names are NeMo's Imagen ones (``imagen_lib.nn.networks.from_nemo`` maps its few others).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Optional, TypeVar, Union

from imagen_lib.nn.attention import ATTENTION_TYPES, AttentionType
from imagen_lib.nn.conditioning import (
    POOLING_TYPES,
    POSITION_INITS,
    TEXT_CONDITIONING_TYPES,
    PoolingType,
    PositionInit,
    TextConditioningType,
)
from imagen_lib.nn.layers import per_level
from imagen_lib.nn.spatial_transformer import SPATIAL_TRANSFORMER

# every attention block a config can ask for: the four of attention.py and SD's spatial transformer
NETWORK_ATTENTION_TYPES = (*ATTENTION_TYPES, SPATIAL_TRANSFORMER)

ConfigT = TypeVar("ConfigT", bound="NetworkConfig")
Check = Callable[[str, Any], Any]


# Checks: each takes a field's name and value and returns the normalised value, or raises naming the field.

def _int(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def _positive(name: str, value: Any) -> int:
    return _int(name, value, minimum=1)


def _optional_count(name: str, value: Any) -> Optional[int]:
    """None or an int >= 0 (0 and None both mean "the default" where the docs say so)."""
    return None if value is None else _int(name, value)


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"{name}: expected a bool, got {value!r}")


def _probability(name: str, value: Any) -> float:
    if not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")
    return float(value)


def _odd_positive(name: str, value: Any) -> int:
    if _positive(name, value) % 2 == 0:
        raise ValueError(f"{name}: expected an odd positive int, got {value!r}")
    return int(value)


def _attention_type(name: str, value: Any) -> Optional[str]:
    if value is not None and value not in NETWORK_ATTENTION_TYPES:
        raise ValueError(f"{name}: expected one of {NETWORK_ATTENTION_TYPES} or None, got {value!r}")
    return value


def _text_conditioning(name: str, value: Any) -> str:
    if value not in TEXT_CONDITIONING_TYPES:
        raise ValueError(f"{name}: expected one of {TEXT_CONDITIONING_TYPES}, got {value!r}")
    return value


def _position_init(name: str, value: Any) -> str:
    if value not in POSITION_INITS:
        raise ValueError(f"{name}: expected one of {POSITION_INITS}, got {value!r}")
    return value


def _pooling(name: str, value: Any) -> str:
    if value not in POOLING_TYPES:
        raise ValueError(f"{name}: expected one of {POOLING_TYPES}, got {value!r}")
    return value


def _ints(name: str, value: Any, minimum: int, non_empty: bool) -> tuple[int, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__") or (non_empty and not value):
        raise ValueError(f"{name}: expected a {'non-empty ' if non_empty else ''}list of ints >= {minimum}, "
                         f"got {value!r}")
    try:
        return tuple(_int(name, v, minimum) for v in value)
    except ValueError:
        raise ValueError(f"{name}: expected a list of ints >= {minimum}, got {value!r}") from None


def _channel_mult(name: str, value: Any) -> tuple[int, ...]:
    return _ints(name, value, minimum=1, non_empty=True)


def _resolutions(name: str, value: Any) -> tuple[int, ...]:
    return _ints(name, value, minimum=1, non_empty=False)


def _per_level(name: str, value: Any, levels: int, check: Check) -> tuple:
    """An int (or bool) for every level, or one value per level, each passed through ``check``."""
    if value is None or isinstance(value, (str, bytes, Mapping)):
        raise ValueError(f"{name}: expected one value per level ({levels} levels from channel_mult), got {value!r}")
    return tuple(check(name, v) for v in per_level(name, value, levels))


def _reject_unknown(cls: type, names, error: type[Exception]) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise error(f"unknown {cls.__name__} field(s) {unknown}; the fields are {known}")


@dataclass(frozen=True)
class NetworkConfig:
    """The options both U-Nets share; build a :class:`UnetConfig` or :class:`EfficientUnetConfig`.

    Args (defaults; the paper's / NeMo's value in brackets where it differs):
        embed_dim: base channels (128).
        image_size: training resolution (64); the Unet places attention by it.
        channels: image channels (3); out_channels: output channels (None or 0 = ``channels``).
        channel_mult: channels per level as multiples of ``embed_dim`` ((1, 2, 3, 4)); one level per entry.
        num_res_blocks: res blocks per level, an int for every level or one per level (3); stored per level.
        attention_type: ``"self"``, ``"cross"``, ``"stacked"``, ``"fused"``, ``"spatial_transformer"`` (Stable
            Diffusion's block, :mod:`~imagen_lib.nn.spatial_transformer`) or None for none ("fused").
        attention_levels: per-level bools (a bool for every level) saying where attention goes (None).
        num_attn_heads (4) / per_head_channels (64): heads are ``channels // per_head_channels`` when that
            is set (not None/0), else ``num_attn_heads``.
        cond_dim: width of the conditioning vector and of the projected text tokens (None = 4 * embed_dim)
            [512].
        text_embed_dim: text encoder width (1024, T5-Large); None/0 or ``cond_on_text=False``: no text.
        feature_pooling_type: ``"attention"`` or ``"mean"`` pooling of the text into the conditioning vector.
        learned_sinu_pos_emb_dim: 0 = fixed sinusoidal noise embedding (0); > 0: learned, this many features.
        dropout: dropout in res blocks (0.0); use_null_token: learned always-attendable text token (True)
            [NeMo False].
        init_conv_kernel_size: odd (3); gradient_checkpointing: recompute blocks in backward (False).
        scale_shift_norm: FiLM-style conditioning (True); resample_with_conv: strided/following 3x3 convs
            for resampling (True).
        lowres_cond: super-resolution mode (False); stable_attention: attention in float32 (False).
        attention_pos_emb: attention layers see where each image token sits (fixed 2-D sinusoids, in
            fractions of the image side; False, as Imagen). It lets a small net tie "top left" in a caption to
            a place: the shapes quickstart's base read positions at chance without it
            (docs/experiments/2026-11-29-s2-position-features.md).
        text_pos_emb: > 0: a learned embedding of each text token's index added to the projected tokens, for
            captions up to this many tokens (0: none, as Imagen): word order for a frozen encoder whose tokens
            carry little of it (docs/composition.md).
        text_pos_emb_init: how that embedding starts: ``"zeros"`` (the untrained net reads the text as
            without it) or ``"sinusoidal"`` (fixed-scale sinusoids of the index, still learned: attention's
            keys carry each token's index from the first step; with zeros no two-object base learned to use
            it) ("zeros").
        text_layers: learned self-attention blocks over the projected text tokens, inside the net (0: none,
            as Imagen; :mod:`imagen_lib.nn.text_refiner`): room for the net to work out, over a frozen
            encoder's tokens, where each object of a two-object caption goes (its order exclusive-or the
            relation word).
        text_pooled: add the pooled text to the conditioning vector (True, as Imagen); False: the text reaches
            the image only through attention, so a place reads the tokens meant for it; the pooled vector is
            a set of words, and beside a convolution that knows where it is it let two-object bases place a
            pair of colours the way training showed them instead of reading the order.
    Stable Diffusion's options (docs/latent.md; each default keeps the Imagen networks as they were):
        timestep_embedding: noise levels embedded as SD's sinusoidal timestep features of width ``embed_dim``
            (cosines first, max period 10000; :class:`~imagen_lib.nn.layers.TimestepEmbedding`) instead of
            the geometric ladder (False).
        text_conditioning: ``"projected"``: text tokens projected to ``cond_dim`` and pooled into the
            conditioning vector (Imagen); ``"raw"``: the encoder's tokens feed cross-attention as they are
            (``text_embed_dim`` is SD's ``context_dim``) and nothing is pooled (SD) ("projected").
        use_linear_in_transformer: linear in/out projections of a spatial transformer (SD 2) rather than
            1x1 convs (SD 1.x) (False, NeMo's default).
        transformer_depth: transformer layers in each spatial transformer (1).
    """

    embed_dim: int = 128
    image_size: int = 64
    channels: int = 3
    out_channels: Optional[int] = None
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: Union[int, tuple[int, ...]] = 3
    attention_type: Optional[Union[AttentionType, Literal["spatial_transformer"]]] = "fused"
    attention_levels: Optional[tuple[bool, ...]] = None
    num_attn_heads: int = 4
    per_head_channels: Optional[int] = 64
    cond_dim: Optional[int] = None
    text_embed_dim: Optional[int] = 1024
    cond_on_text: bool = True
    feature_pooling_type: PoolingType = "attention"
    learned_sinu_pos_emb_dim: int = 0
    dropout: float = 0.0
    use_null_token: bool = True
    init_conv_kernel_size: int = 3
    gradient_checkpointing: bool = False
    scale_shift_norm: bool = True
    resample_with_conv: bool = True
    lowres_cond: bool = False
    stable_attention: bool = False
    attention_pos_emb: bool = False
    text_pos_emb: int = 0
    text_layers: int = 0
    text_pos_emb_init: PositionInit = "zeros"
    text_pooled: bool = True
    timestep_embedding: bool = False
    text_conditioning: TextConditioningType = "projected"
    use_linear_in_transformer: bool = False
    transformer_depth: int = 1

    # field -> its check; the per-level fields are checked after the others, once channel_mult is known
    _CHECKS: ClassVar[dict[str, Check]] = {
        "embed_dim": _positive, "image_size": _positive, "channels": _positive, "out_channels": _optional_count,
        "channel_mult": _channel_mult, "attention_type": _attention_type, "num_attn_heads": _positive,
        "per_head_channels": _optional_count, "cond_dim": _optional_count, "text_embed_dim": _optional_count,
        "cond_on_text": _flag, "feature_pooling_type": _pooling, "learned_sinu_pos_emb_dim": _int,
        "dropout": _probability, "use_null_token": _flag, "init_conv_kernel_size": _odd_positive,
        "gradient_checkpointing": _flag, "scale_shift_norm": _flag, "resample_with_conv": _flag,
        "lowres_cond": _flag, "stable_attention": _flag, "attention_pos_emb": _flag, "text_pos_emb": _int,
        "text_layers": _int, "text_pos_emb_init": _position_init, "text_pooled": _flag,
        "timestep_embedding": _flag, "text_conditioning": _text_conditioning, "use_linear_in_transformer": _flag,
        "transformer_depth": _positive,
    }
    _PER_LEVEL: ClassVar[tuple[str, ...]] = ("num_res_blocks", "attention_levels")
    _MIN_BLOCKS: ClassVar[int] = 0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if field.name not in self._PER_LEVEL:
                self._set(field.name, self._CHECKS[field.name](field.name, getattr(self, field.name)))
        self._check_levels()
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Options that exclude each other."""
        if self.timestep_embedding and self.learned_sinu_pos_emb_dim:
            raise ValueError("learned_sinu_pos_emb_dim: must be 0 with timestep_embedding=True (one noise embedding)")
        if self.attention_pos_emb and self.attention_type == SPATIAL_TRANSFORMER:
            raise ValueError("attention_pos_emb: not available with attention_type 'spatial_transformer'")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # frozen: normalisation happens once, here

    def _check_levels(self) -> None:
        levels = len(self.channel_mult)
        self._set("num_res_blocks", _per_level("num_res_blocks", self.num_res_blocks, levels,
                                               lambda name, n: _int(name, n, self._MIN_BLOCKS)))
        if self.attention_levels is not None:
            self._set("attention_levels", _per_level("attention_levels", self.attention_levels, levels, _flag))

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Channels of each level, ``embed_dim * channel_mult``."""
        return tuple(self.embed_dim * m for m in self.channel_mult)

    @property
    def feature_map_sizes(self) -> tuple[int, ...]:
        """Feature-map side of each level at ``image_size``."""
        return tuple(self.image_size // 2**level for level in range(len(self.channel_mult)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (lists, not tuples) keyed by field name: what a checkpoint's config.json holds."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[ConfigT], values: Mapping[str, Any]) -> ConfigT:
        """The config of ``values`` (e.g. :meth:`to_dict`'s); a missing field takes its default."""
        if not isinstance(values, Mapping):
            raise TypeError(f"values: expected a mapping of {cls.__name__} fields, got {type(values).__name__}")
        _reject_unknown(cls, values, ValueError)
        return cls(**values)

    def replace(self: ConfigT, **changes: Any) -> ConfigT:
        """A copy with ``changes`` (field names) applied and checked again."""
        _reject_unknown(type(self), changes, TypeError)
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class UnetConfig(NetworkConfig):
    """The regular U-Net's options (:class:`~imagen_lib.nn.unet.Unet`, ADM layout; NeMo's ``unet``).

    Args (defaults; NeMo base64-500m's in brackets where it differs): :class:`NetworkConfig`'s fields with
    its defaults (embed_dim 128 [256]), and
        attention_resolutions: feature-map sizes (pixels) that get attention after every res block
            ((32, 16, 8)); ``attention_levels`` (per-level bools) overrides it when set.
        middle_attention: attention in the middle block (True).
        resblock_updown: resample inside res blocks (False).
    ``num_res_blocks`` counts the down path's blocks; the up path has one more per level (ADM).
    """

    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    middle_attention: bool = True
    resblock_updown: bool = False

    _CHECKS: ClassVar[dict[str, Check]] = {
        **NetworkConfig._CHECKS,
        "attention_resolutions": _resolutions, "middle_attention": _flag, "resblock_updown": _flag,
    }

    def _check_levels(self) -> None:
        super()._check_levels()
        sizes = self.feature_map_sizes
        unknown = [r for r in self.attention_resolutions if r not in sizes]
        if self.attention_levels is None and unknown:
            raise ValueError(f"attention_resolutions: {unknown} are not feature-map sizes of this net "
                             f"(image_size={self.image_size} gives {list(sizes)})")

    def attention_per_level(self) -> tuple[bool, ...]:
        """Whether each level's res blocks get attention: ``attention_levels``, else by resolution."""
        if self.attention_levels is not None:
            return self.attention_levels
        return tuple(size in self.attention_resolutions for size in self.feature_map_sizes)


@dataclass(frozen=True)
class EfficientUnetConfig(NetworkConfig):
    """The Efficient U-Net's options (:class:`~imagen_lib.nn.efficient_unet.EfficientUnet`; NeMo's ``sr``).

    Args (defaults = NeMo's sr256-600m where it has one): :class:`NetworkConfig`'s fields, with
        image_size 256, channel_mult (1, 2, 4, 8, 8), num_attn_heads 8, cond_dim None (paper 512);
        num_res_blocks: per-level res block counts, each >= 1, used by the DBlock and the UBlock of each level
            ((2, 4, 8, 8, 8); NeMo's ``num_resblocks``); the deepest level's blocks run once.
        attention_levels: one attention block per DBlock/UBlock where True (None = the two deepest levels,
            NeMo's [0, 0, 0, 1, 1]; NeMo's ``atnn_enabled_at``); stored resolved.
        lowres_cond: super-resolution mode (True: this is what the Efficient U-Net is for).
        skip_connection_scaling: scale skip sums by 1/sqrt(2) (True, the paper).
    """

    image_size: int = 256
    channel_mult: tuple[int, ...] = (1, 2, 4, 8, 8)
    num_res_blocks: Union[int, tuple[int, ...]] = (2, 4, 8, 8, 8)
    num_attn_heads: int = 8
    lowres_cond: bool = True
    skip_connection_scaling: bool = True

    _CHECKS: ClassVar[dict[str, Check]] = {**NetworkConfig._CHECKS, "skip_connection_scaling": _flag}
    _MIN_BLOCKS: ClassVar[int] = 1  # a level without blocks would have nothing between its resamplings

    def _check_levels(self) -> None:
        if self.attention_levels is None:  # NeMo's default placement: the two deepest levels
            levels = len(self.channel_mult)
            self._set("attention_levels", tuple(level >= levels - 2 for level in range(levels)))
        super()._check_levels()
