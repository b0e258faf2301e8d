"""Checkpoint folders on any fsspec file system (a local path, ``memory://``, ``s3://``, ...).

A checkpoint is a folder of plain files, never pickles (docs/architecture.md)::

    config.json                  the cascade's configuration (rebuilds the architecture)
    stage{k}.safetensors         stage k's network weights
    stage{k}.ema.safetensors     the EMA copy of them (written by the Trainer)
    text_encoder/                the text encoder's own files, when it was built locally or trained
    trainer.safetensors          optimizer moments, EMA counters, RNG state (tensors)
    trainer.json                 optimizer hyper-parameters, schedules, step counters, RNG state (plain values)

Writes go to a temporary sibling folder that is renamed into place once complete, so a crash never leaves a
half-written checkpoint at ``path`` (on object stores the rename is a copy; ``config.json`` is then written
last, and a folder without it is not a checkpoint). An existing checkpoint is only replaced by the run that
wrote it (same ``run_id`` in its ``trainer.json``) or with ``overwrite=True``.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import fsspec
import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

PathLike = Union[str, Path]
CONFIG_FILE = "config.json"


def _fs(path: PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(str(path))
    return fs, root.rstrip("/")


def is_checkpoint(path: PathLike) -> bool:
    """True when ``path`` is a complete checkpoint folder (it holds ``config.json``)."""
    fs, root = _fs(path)
    return fs.exists(f"{root}/{CONFIG_FILE}")


def checkpoint_run_id(path: PathLike) -> Optional[str]:
    """The ``run_id`` of the trainer that wrote ``path``, or None (no trainer state, or no checkpoint)."""
    fs, root = _fs(path)
    name = f"{root}/trainer.json"
    if not fs.exists(name):
        return None
    with fs.open(name, "r") as f:
        return json.load(f).get("run_id")


# ---------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------


def _tensor_bytes(tensors: Mapping[str, Tensor]) -> bytes:
    # clone: safetensors refuses tensors that share storage (tied weights), and views must be contiguous
    return save_safetensors({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})


def write_checkpoint(
    path: PathLike, *, config: dict, tensors: Mapping[str, Mapping[str, Tensor]] = (),
    json_files: Mapping[str, dict] = (), folders: Mapping[str, PathLike] = (), overwrite: bool = False,
    run_id: Optional[str] = None,
) -> str:
    """Write a checkpoint folder atomically and return its path.

    Args:
        path: folder path or fsspec URL.
        config: written to ``config.json`` (plain JSON values).
        tensors: ``{"stage0": state_dict, ...}`` -> ``stage0.safetensors``, ...
        json_files: ``{"trainer": {...}}`` -> ``trainer.json``.
        folders: ``{"text_encoder": local_folder}``: every file of a local folder copied under that name.
        overwrite: replace an existing checkpoint at ``path`` (default False: raise ``FileExistsError``,
            unless the existing one was written by the same run, ``run_id``).
        run_id: the writer's run id; an existing checkpoint with the same one is replaced (resumable runs).
    """
    fs, root = _fs(path)
    if fs.exists(root):
        if not fs.isdir(root):
            raise FileExistsError(f"path: {path!s} exists and is not a checkpoint folder")
        own = run_id is not None and checkpoint_run_id(path) == run_id
        if fs.ls(root) and not (overwrite or own):
            raise FileExistsError(
                f"path: {path!s} already holds files that this run did not write; pass overwrite=True to replace it"
            )
    tmp = f"{root}.tmp-{uuid.uuid4().hex[:8]}"
    fs.makedirs(tmp, exist_ok=True)
    try:
        for name, state in dict(tensors).items():
            fs.pipe_file(f"{tmp}/{name}.safetensors", _tensor_bytes(state))
        for name, payload in dict(json_files).items():
            fs.pipe_file(f"{tmp}/{name}.json", json.dumps(payload, indent=1).encode())
        for name, local in dict(folders).items():
            for file in sorted(Path(local).rglob("*")):
                if file.is_file():
                    target = f"{tmp}/{name}/{file.relative_to(local).as_posix()}"
                    fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                    fs.pipe_file(target, file.read_bytes())
        fs.pipe_file(f"{tmp}/{CONFIG_FILE}", json.dumps(config, indent=1).encode())  # last: completeness marker
        _swap_into_place(fs, tmp, root)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
        raise
    return str(path)


def _swap_into_place(fs: fsspec.AbstractFileSystem, tmp: str, root: str) -> None:
    """Rename the finished temporary folder to ``root``, replacing an old checkpoint there."""
    old = None
    if fs.exists(root):
        old = f"{root}.old-{uuid.uuid4().hex[:8]}"
        fs.mv(root, old, recursive=True)
    fs.mv(tmp, root, recursive=True)
    if old is not None:
        fs.rm(old, recursive=True)


# ---------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------


def _require(path: PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = _fs(path)
    if not fs.exists(f"{root}/{CONFIG_FILE}"):
        raise FileNotFoundError(f"path: {path!s} is not a checkpoint folder (no {CONFIG_FILE})")
    return fs, root


def read_config(path: PathLike) -> dict:
    """The ``config.json`` of a checkpoint."""
    fs, root = _require(path)
    with fs.open(f"{root}/{CONFIG_FILE}", "r") as f:
        return json.load(f)


def has_file(path: PathLike, name: str) -> bool:
    fs, root = _fs(path)
    return fs.exists(f"{root}/{name}")


def read_tensors(path: PathLike, name: str, device: Union[str, torch.device] = "cpu") -> dict[str, Tensor]:
    """``name.safetensors`` of a checkpoint as a dict of tensors on ``device``."""
    fs, root = _require(path)
    file = f"{root}/{name}.safetensors"
    if not fs.exists(file):
        raise FileNotFoundError(f"path: checkpoint {path!s} has no {name}.safetensors")
    return {k: v.to(device) for k, v in load_safetensors(fs.cat_file(file)).items()}


def read_json(path: PathLike, name: str) -> dict:
    """``name.json`` of a checkpoint."""
    fs, root = _require(path)
    file = f"{root}/{name}.json"
    if not fs.exists(file):
        raise FileNotFoundError(f"path: checkpoint {path!s} has no {name}.json")
    with fs.open(file, "r") as f:
        return json.load(f)


def download_folder(path: PathLike, name: str, local: PathLike) -> Path:
    """Copy the sub-folder ``name`` of a checkpoint into the local folder ``local``; returns ``local``."""
    fs, root = _require(path)
    prefix = f"{root}/{name}"
    if not fs.isdir(prefix):
        raise FileNotFoundError(f"path: checkpoint {path!s} has no {name}/ folder")
    local = Path(local)
    for file in fs.find(prefix):
        rel = file[len(prefix) :].lstrip("/")
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(fs.cat_file(file))
    return local


# ---------------------------------------------------------------------------------------------------------
# optimizer and RNG state as tensors + plain values
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
