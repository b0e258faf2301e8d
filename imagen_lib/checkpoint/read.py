"""Reading a checkpoint's files: each function follows the pointer (:func:`~imagen_lib.checkpoint.resolve`) and
checks a file before decoding it, so a damaged or planted file is an error that names it (never a pickle
loaded, never a Rust error without a file name)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from imagen_lib.checkpoint.commit import CONFIG_FILE, resolve
from imagen_lib.checkpoint.files import (
    PathLike,
    check_stored_file,
    decode_json_object,
    decode_safetensors,
    file_system,
    is_local,
    staging_folder,
    sweep_staging_folders,
)


def _read_file(folder: str, name: str, path: PathLike) -> bytes:
    fs, root = file_system(folder)
    try:
        return fs.cat_file(f"{root}/{name}")
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"path: checkpoint {path!s} has no {name}") from None


def read_config(path: PathLike) -> dict:
    """The ``config.json`` of the checkpoint at ``path``."""
    folder = resolve(path)
    return decode_json_object(_read_file(folder, CONFIG_FILE, path), f"{CONFIG_FILE} in {folder}")


def read_json(path: PathLike, name: str) -> dict:
    """``name.json`` of the checkpoint at ``path``."""
    folder = resolve(path)
    return decode_json_object(_read_file(folder, f"{name}.json", path), f"{name}.json in {folder}")


def read_tensors(path: PathLike, name: str, device: Union[str, torch.device] = "cpu") -> dict[str, Tensor]:
    """``name.safetensors`` of the checkpoint at ``path`` as a dict of tensors on ``device``. Load them into a
    network with :func:`~imagen_lib.checkpoint.load_weights`, which checks their dtypes and values."""
    folder = resolve(path)
    data = _read_file(folder, f"{name}.safetensors", path)
    return {k: v.to(device) for k, v in decode_safetensors(data, f"{name}.safetensors in {folder}").items()}


def has_file(path: PathLike, name: str) -> bool:
    """Whether the checkpoint at ``path`` holds the file or folder ``name``."""
    fs, root = file_system(resolve(path))
    return fs.exists(f"{root}/{name}")


def _checked_files(folder: str, name: str, path: PathLike) -> tuple[object, str, list[str]]:
    """(fs, prefix, files) of sub-folder ``name``, every file checked (no pickles, no damaged files)."""
    fs, root = file_system(folder)
    prefix = f"{root}/{name}"
    if not fs.isdir(prefix):
        raise FileNotFoundError(f"path: checkpoint {path!s} has no {name}/ folder")
    files = sorted(fs.find(prefix))
    for file in files:
        check_stored_file(fs, file, f"{file[len(root):].lstrip('/')} in {folder}")
    return fs, prefix, files


def download_folder(path: PathLike, name: str, local: PathLike) -> Path:
    """Copy the sub-folder ``name`` of the checkpoint at ``path`` into the local folder ``local`` (every file
    checked first); returns ``local``."""
    fs, prefix, files = _checked_files(resolve(path), name, path)
    local = Path(local)
    for file in files:
        target = local / file[len(prefix) :].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(fs.cat_file(file))
    return local


@contextmanager
def local_folder(path: PathLike, name: str) -> Iterator[Path]:
    """The sub-folder ``name`` of the checkpoint at ``path`` as a local folder, every file checked: the
    folder itself for a local checkpoint, else a staging copy removed on exit."""
    folder = resolve(path)
    fs, prefix, _ = _checked_files(folder, name, path)
    sweep_staging_folders()
    if is_local(fs):
        yield Path(prefix)
        return
    with staging_folder() as local:
        yield download_folder(folder, name, local)
