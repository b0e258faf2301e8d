"""The table of network classes that checkpoints name, rebuilding a network from its config, and NeMo configs.

Explicit tables (no ``globals()`` look-up): a checkpoint can only ever build one of these classes, and a
config's type says which (``network_for(config)``).
"""

from __future__ import annotations

from typing import Any, Literal, Union

from torch import nn

from imagen_lib.nn.config import EfficientUnetConfig, NetworkConfig, UnetConfig
from imagen_lib.nn.efficient_unet import EfficientUnet
from imagen_lib.nn.unet import Unet

NETWORKS: dict[str, type[nn.Module]] = {"Unet": Unet, "EfficientUnet": EfficientUnet}
# config class -> the network it builds (``net.config_class`` the other way)
NETWORK_OF_CONFIG: dict[type[NetworkConfig], type[nn.Module]] = {UnetConfig: Unet, EfficientUnetConfig: EfficientUnet}

# NeMo option name -> ours, where they differ
_NEMO_RENAMES = {"num_resblocks": "num_res_blocks", "atnn_enabled_at": "attention_levels",
                 "low_res_cond": "lowres_cond"}
# NeMo options with no effect here: SDPA picks flash / memory-efficient kernels itself
_NEMO_IGNORED = {"flash_attention"}


def network_from_config(kind: str, config: dict[str, Any]) -> Union[Unet, EfficientUnet]:
    """Build network ``kind`` (a :data:`NETWORKS` name) from ``config``, a plain dict of its config's fields
    (``net.config.to_dict()``, what a checkpoint stores); unknown fields raise a ValueError naming them."""
    if kind not in NETWORKS:
        raise ValueError(f"kind: expected one of {sorted(NETWORKS)}, got {kind!r}")
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a dict of config fields, got {type(config).__name__}")
    cls = NETWORKS[kind]
    return cls(cls.config_class.from_dict(config))


def network_kind(config: NetworkConfig) -> str:
    """The :data:`NETWORKS` name of the network ``config`` builds (what a checkpoint records as its kind)."""
    if type(config) not in NETWORK_OF_CONFIG:
        raise TypeError(f"config: expected one of {[c.__name__ for c in NETWORK_OF_CONFIG]}, "
                        f"got {type(config).__name__}")
    return NETWORK_OF_CONFIG[type(config)].__name__


def network_for(config: NetworkConfig) -> Union[Unet, EfficientUnet]:
    """The network ``config`` describes: a ``UnetConfig`` builds a Unet, an ``EfficientUnetConfig`` an
    EfficientUnet."""
    return NETWORKS[network_kind(config)](config)


def from_nemo(unet_type: Literal["base", "sr-unet", "sr"], unet: dict[str, Any], text_embed_dim: int = 1024,
              **overrides: Any) -> Union[Unet, EfficientUnet]:
    """Build a network from a NeMo Imagen ``model.unet`` block (e.g. a dict loaded from its yaml).

    Args:
        unet_type: NeMo's ``model.unet_type``: ``"base"`` (Unet), ``"sr-unet"`` (Unet with the low-res
            image), ``"sr"`` (EfficientUnet, always with the low-res image).
        unet: the ``model.unet`` mapping; NeMo's names are accepted (``num_resblocks``, ``atnn_enabled_at``,
            ``low_res_cond``; ``stride`` must be 2; ``flash_attention`` is ignored, SDPA chooses kernels).
        text_embed_dim: NeMo's ``model.conditioning.embed_dim`` (1024).
        overrides: config fields applied last (e.g. ``use_null_token=True``).
    """
    table = {"base": (Unet, False), "sr-unet": (Unet, True), "sr": (EfficientUnet, True)}
    if unet_type not in table:
        raise ValueError(f"unet_type: expected one of {sorted(table)}, got {unet_type!r}")
    cls, lowres = table[unet_type]
    kwargs: dict[str, Any] = {"lowres_cond": lowres, "text_embed_dim": text_embed_dim}
    for key, value in unet.items():
        if key in _NEMO_IGNORED:
            continue
        if key == "stride":
            if value != 2:
                raise ValueError(f"unet.stride: only 2 is supported, got {value}")
            continue
        kwargs[_NEMO_RENAMES.get(key, key)] = value
    if "attention_levels" in kwargs:
        kwargs["attention_levels"] = [bool(a) for a in kwargs["attention_levels"]]
    kwargs.update(overrides)
    return cls(**kwargs)
