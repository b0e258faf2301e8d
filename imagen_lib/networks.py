"""The table of network classes that checkpoints name, and rebuilding a network from its config.

An explicit table (no ``globals()`` look-up): a checkpoint can only ever build one of these classes.
"""

from __future__ import annotations

from typing import Any, Union

from torch import nn

from imagen_lib.efficient_unet import EfficientUnet
from imagen_lib.unet import Unet

NETWORKS: dict[str, type[nn.Module]] = {"Unet": Unet, "EfficientUnet": EfficientUnet}


def network_from_config(kind: str, config: dict[str, Any]) -> Union[Unet, EfficientUnet]:
    """Build ``NETWORKS[kind](**config)``; ``config`` is a network's ``.config`` (plain JSON values)."""
    if kind not in NETWORKS:
        raise ValueError(f"kind: expected one of {sorted(NETWORKS)}, got {kind!r}")
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a dict of constructor arguments, got {type(config).__name__}")
    return NETWORKS[kind](**config)
