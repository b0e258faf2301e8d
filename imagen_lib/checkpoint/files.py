"""The files of a checkpoint, read safely: every file is checked for what it claims to be before it is decoded,
and a damaged one gives an error that names it and says what is wrong (issue 23).

Nothing here ever unpickles: safetensors and JSON are the only formats decoded, and a Python pickle or a
``torch.save`` archive planted under a checkpoint's file name is refused by its first bytes. Weights meet a
network through :func:`load_weights`, which refuses integer or non-finite values where the network holds
floats. Temporary local folders (a text encoder staged for an object store) carry the process id in their
name, so the next save or load removes those a killed process left (:func:`staging_folder`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor

from imagen_lib.validation import check_finite

PathLike = Union[str, Path]

PICKLE_HINT = ("is a Python pickle (or a torch.save archive), which imagen_lib never loads: convert it with "
               "safetensors.torch.save_file (weights) or json.dump (settings) in a session you trust")
# file names a pickle usually has; refused in a checkpoint's folders whatever their content
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")
_MAX_HEADER = 100_000_000  # the safetensors format's own limit on its JSON header
STAGING_PREFIX = "imagen_lib_te_"
_STAGING_NAME = re.compile(rf"^{STAGING_PREFIX}pid(\d+)_[0-9a-f]{{8}}$")


def file_system(path: PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec file system, path inside it without a trailing slash) of a local path or URL."""
    fs, root = fsspec.core.url_to_fs(str(path))
    return fs, root.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(path: PathLike, name: str) -> str:
    """``path/name`` keeping a URL's protocol (``memory://a`` + ``b`` -> ``memory://a/b``)."""
    return f"{str(path).rstrip('/')}/{name}"


# ---------------------------------------------------------------------------------------------------------
# recognising what a file is
# ---------------------------------------------------------------------------------------------------------


def looks_pickled(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes) starts a pickle of protocol 2 or later or a zip archive (what
    ``torch.save`` writes)."""
    return (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5) or head[:4] == b"PK\x03\x04"


def safetensors_problem(head: bytes, size: int) -> Optional[str]:
    """What is wrong with a safetensors file of ``size`` bytes whose first bytes are ``head`` (at least its
    8-byte length and JSON header when the file has them), or None when its header agrees with its size."""
    if size == 0:
        return "is empty (0 bytes)"
    if looks_pickled(head):
        return PICKLE_HINT
    if size < 8:
        return f"is truncated ({size:,} bytes, fewer than the 8 a safetensors header starts with)"
    length = int.from_bytes(head[:8], "little")
    if length > _MAX_HEADER or (size > 8 and head[8:9] != b"{"):
        return f"is not a safetensors file (it starts with {head[:8]!r})"
    if 8 + length > size:
        return f"is truncated ({size:,} of at least {8 + length:,} bytes its header announces)"
    try:
        header = json.loads(head[8 : 8 + length])
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "has a damaged header (not the JSON a safetensors file starts with)"
    expected = 8 + length + end
    if size < expected:
        return f"is truncated ({size:,} of {expected:,} bytes its header announces)"
    if size > expected:
        return f"is damaged ({size:,} bytes where its header announces {expected:,})"
    return None


def decode_safetensors(data: bytes, where: str) -> dict[str, Tensor]:
    """The tensors of a safetensors file's bytes; ``where`` ("stage0.safetensors in CKPT") names it in errors."""
    from safetensors.torch import load as load_safetensors

    length = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    problem = safetensors_problem(data[: 8 + min(length, _MAX_HEADER)], len(data))
    if problem is not None:
        raise ValueError(f"{where} {problem}")
    try:
        return load_safetensors(data)
    except Exception as error:  # the Rust error never names the file
        raise ValueError(f"{where} is not a valid safetensors file: {error}") from None


def decode_json(data: bytes, where: str) -> Any:
    """A JSON file's value; ``where`` ("config.json in CKPT") names it in errors."""
    if not data.strip():
        raise ValueError(f"{where} is empty")
    if looks_pickled(data[:4]):
        raise ValueError(f"{where} {PICKLE_HINT}")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not valid JSON: it is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON: line {error.lineno} column {error.colno}: {error.msg}") from None


def decode_json_object(data: bytes, where: str) -> dict:
    value = decode_json(data, where)
    if not isinstance(value, dict):
        raise ValueError(f"{where} is not valid: expected a JSON object, got {type(value).__name__}")
    return value


def check_stored_file(fs: fsspec.AbstractFileSystem, file: str, where: str) -> None:
    """Refuse a file of a stored folder (e.g. ``text_encoder/``) that is, or is named like, a pickle, a damaged
    safetensors file or invalid JSON, reading only its first bytes for a safetensors file."""
    name = file.rsplit("/", 1)[-1]
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(f"{where}: {name} is a kind of file (pickle) that imagen_lib never loads; remove it "
                         "and keep the weights as .safetensors")
    if name.endswith(".json"):
        decode_json(fs.cat_file(file), where)
        return
    size = fs.size(file)
    with fs.open(file, "rb") as f:
        head = f.read(8)
        if name.endswith(".safetensors") and len(head) == 8 and not looks_pickled(head):
            head += f.read(min(int.from_bytes(head, "little"), _MAX_HEADER))
    if name.endswith(".safetensors"):
        problem = safetensors_problem(head, size)
        if problem is not None:
            raise ValueError(f"{where} {problem}")
    elif looks_pickled(head):
        raise ValueError(f"{where} {PICKLE_HINT}")


# ---------------------------------------------------------------------------------------------------------
# weights meet a network
# ---------------------------------------------------------------------------------------------------------


def load_weights(module: torch.nn.Module, tensors: Mapping[str, Tensor], where: str) -> torch.nn.Module:
    """``module.load_state_dict(tensors)`` after checking that every tensor the module holds as floats is a
    finite floating-point tensor; errors (dtype, NaN/Inf, missing or unexpected keys, shapes) name ``where``
    (e.g. "stage0.safetensors in CKPT") and the tensor. Returns ``module``."""
    expected = module.state_dict()
    for key, value in tensors.items():
        want = expected.get(key)
        if want is None or not want.is_floating_point():
            continue
        if not value.is_floating_point():
            raise ValueError(f"{where}: tensor {key!r} is {value.dtype} where the network holds floating-point "
                             f"weights ({want.dtype}); the file is damaged or not this network's")
        check_finite(f"{where}: tensor {key!r}", value)
    try:
        module.load_state_dict(tensors)
    except RuntimeError as error:  # missing or unexpected keys, shapes
        raise ValueError(f"{where} does not fit the network: {' '.join(str(error).split())}") from None
    return module


# ---------------------------------------------------------------------------------------------------------
# local staging folders that a killed process cannot leak for long
# ---------------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_staging_folders(temp_dir: Optional[PathLike] = None) -> list[str]:
    """Remove the staging folders (``imagen_lib_te_pid<PID>_*`` in the system temporary folder) of processes
    that are no longer running; returns their names."""
    base = Path(temp_dir or tempfile.gettempdir())
    removed = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        match = _STAGING_NAME.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
    return removed


@contextmanager
def staging_folder() -> Iterator[Path]:
    """A fresh local temporary folder named after this process (removed on exit; one a kill leaves is removed
    by the next :func:`sweep_staging_folders`, which every save and load of a checkpoint runs)."""
    sweep_staging_folders()
    folder = Path(tempfile.gettempdir()) / f"{STAGING_PREFIX}pid{os.getpid()}_{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
