"""Checkpoints on any fsspec file system (a local path, ``memory://``, ``s3://``, ...), never pickled.

One version of a checkpoint is a folder of plain files (docs/architecture.md)::

    config.json                  the cascade's configuration (rebuilds the architecture)
    stage{k}.safetensors         stage k's network weights
    stage{k}.ema.safetensors     the EMA copy of them (written by the Trainer)
    text_encoder/                the text encoder's own files, when it was built locally or trained
    trainer.safetensors          optimizer moments, EMA counters, RNG state (tensors)
    trainer.json                 optimizer hyper-parameters, schedules, step counters, RNG state (plain values)

A checkpoint path holds such versions and a ``latest`` pointer that names the committed one; a save commits a
new version by replacing the pointer last, so a kill at any instant leaves the previous or the new version
(:mod:`imagen_lib.checkpoint.commit`). Every reader follows the pointer and checks each file before decoding
it (:mod:`imagen_lib.checkpoint.read`, :mod:`imagen_lib.checkpoint.files`). A run holds its output folder
with :class:`RunLock` (:mod:`imagen_lib.checkpoint.lock`); trainer state is split into tensors and JSON by
:mod:`imagen_lib.checkpoint.state`.
"""

from imagen_lib.checkpoint.commit import (
    CONFIG_FILE,
    POINTER,
    checkpoint_run_id,
    is_checkpoint,
    resolve,
    version_seq,
    write_checkpoint,
)
from imagen_lib.checkpoint.files import PathLike, load_weights, sweep_staging_folders
from imagen_lib.checkpoint.lock import LOCK_FILE, FolderInUseError, RunLock
from imagen_lib.checkpoint.read import download_folder, has_file, local_folder, read_config, read_json, read_tensors
from imagen_lib.checkpoint.state import join_state, rng_state, set_rng_state, split_state

__all__ = [
    "CONFIG_FILE", "POINTER", "LOCK_FILE", "PathLike", "FolderInUseError", "RunLock", "checkpoint_run_id",
    "download_folder", "has_file", "is_checkpoint", "join_state", "load_weights", "local_folder", "read_config",
    "read_json", "read_tensors", "resolve", "rng_state", "set_rng_state", "split_state", "sweep_staging_folders",
    "version_seq", "write_checkpoint",
]
