"""Trainer state as safetensors + plain JSON: optimizer and scaler states split into tensors and JSON values
(:func:`split_state` / :func:`join_state`), and the RNG streams (:func:`rng_state` / :func:`set_rng_state`);
nothing is pickled."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------


def split_state(state: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """Replace every tensor inside a nested dict/list by ``{"__tensor__": key}``, storing it in ``tensors``.

    Used for ``optimizer.state_dict()`` and scaler states: the tensors go to safetensors, the rest to JSON.
    Integer dict keys (optimizer parameter ids) are kept through ``{"__int_keys__": ...}``.
    """
    if isinstance(state, Tensor):
        tensors[prefix] = state
        return {"__tensor__": prefix}
    if isinstance(state, Mapping):
        out = {str(k): split_state(v, f"{prefix}.{k}", tensors) for k, v in state.items()}
        if state and all(isinstance(k, int) for k in state):
            return {"__int_keys__": out}
        return out
    if isinstance(state, (list, tuple)):
        return [split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(state)]
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(f"state: cannot store a value of type {type(state).__name__} at {prefix!r} without pickle")


def join_state(state: Any, tensors: Mapping[str, Tensor]) -> Any:
    """Inverse of :func:`split_state`."""
    if isinstance(state, dict):
        if set(state) == {"__tensor__"}:
            return tensors[state["__tensor__"]]
        if set(state) == {"__int_keys__"}:
            return {int(k): join_state(v, tensors) for k, v in state["__int_keys__"].items()}
        return {k: join_state(v, tensors) for k, v in state.items()}
    if isinstance(state, list):
        return [join_state(v, tensors) for v in state]
    return state


def rng_state(tensors: dict[str, Tensor], prefix: str = "rng") -> dict:
    """Capture torch (CPU and CUDA), Python and NumPy RNG states; tensors into ``tensors``."""
    tensors[f"{prefix}.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{prefix}.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors[f"{prefix}.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }


def set_rng_state(state: dict, tensors: Mapping[str, Tensor], prefix: str = "rng") -> None:
    """Restore what :func:`rng_state` captured (CUDA states only for devices present on both sides)."""
    torch.set_rng_state(tensors[f"{prefix}.torch"].cpu())
    if torch.cuda.is_available():
        for i in range(min(int(state.get("cuda_devices", 0)), torch.cuda.device_count())):
            torch.cuda.set_rng_state(tensors[f"{prefix}.cuda.{i}"].cpu(), i)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = state["numpy"]
    keys = tensors[f"{prefix}.numpy"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, cached))
