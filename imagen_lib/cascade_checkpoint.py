"""A cascade's checkpoint folder (the layout is :mod:`imagen_lib.checkpoint`'s): its configuration, each stage's
weights (raw and EMA) and, when it is built locally or trained, the text encoder's own files.

:meth:`Cascade.save <imagen_lib.cascade.Cascade.save>` and :meth:`Cascade.from_checkpoint
<imagen_lib.cascade.Cascade.from_checkpoint>` call these; the Trainer writes its checkpoints with
:func:`write_cascade_checkpoint`. This module never imports :mod:`imagen_lib.cascade` (the cascade imports it),
so the class to rebuild is passed in.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

from imagen_lib import checkpoint as ckpt
from imagen_lib.checkpoint import PathLike


def stores_text_encoder(cascade: Any) -> bool:
    """Whether checkpoints of ``cascade`` hold its text encoder's files: yes when the encoder is trained or was
    built locally (its source is ``build_tiny``), no for a frozen pretrained T5 (reloaded by name)."""
    encoder = cascade.text_encoder
    return encoder is not None and (encoder.trainable or "build_tiny" in encoder.config.get("source", {}))


def write_cascade_checkpoint(
    cascade: Any, path: PathLike, *, tensors: dict, json_files: Optional[dict] = None, overwrite: bool = False,
    run_id: Optional[str] = None,
) -> str:
    """Write ``cascade.config`` with the given weight files (``{"stage0": state_dict, ...}``), ``json_files``
    and the text encoder's folder when it is stored; returns the checkpoint's path (see
    :func:`imagen_lib.checkpoint.write_checkpoint` for ``overwrite`` and ``run_id``)."""
    local = None
    folders = {}
    try:
        if stores_text_encoder(cascade):
            local = Path(tempfile.mkdtemp(prefix="imagen_lib_te_"))
            cascade.text_encoder.save_pretrained(local)
            folders["text_encoder"] = local
        return ckpt.write_checkpoint(
            path, config=cascade.config, tensors=tensors, json_files=json_files or {}, folders=folders,
            overwrite=overwrite, run_id=run_id,
        )
    finally:
        if local is not None:
            shutil.rmtree(local, ignore_errors=True)


def save_cascade(cascade: Any, path: PathLike, *, overwrite: bool = False) -> str:
    """Write ``cascade``'s configuration and current stage weights as a checkpoint folder."""
    tensors = {f"stage{k}": stage.net.state_dict() for k, stage in enumerate(cascade.stages)}
    return write_cascade_checkpoint(cascade, path, tensors=tensors, overwrite=overwrite)


def read_text_encoder(path: PathLike, config: dict, use_ema: bool = True):
    """The text encoder described by ``config``, with the checkpoint's own files when it holds them (and their
    EMA weights with ``use_ema``), else rebuilt from its source."""
    from imagen_lib.text import text_encoder_from_config

    if not ckpt.has_file(path, "text_encoder"):
        return text_encoder_from_config(config)
    local = Path(tempfile.mkdtemp(prefix="imagen_lib_te_"))
    try:
        encoder = text_encoder_from_config(config, folder=ckpt.download_folder(path, "text_encoder", local))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    if use_ema and ckpt.has_file(path, "text_encoder.ema.safetensors"):
        encoder.model.load_state_dict(ckpt.read_tensors(path, "text_encoder.ema"))
    return encoder


def read_cascade(
    cascade_class: Any, path: PathLike, *, use_ema: bool = True, device: Union[None, str, torch.device] = None,
    load_text_encoder: bool = True,
):
    """Rebuild a cascade of ``cascade_class`` (:class:`~imagen_lib.cascade.Cascade`) from the checkpoint at
    ``path``: EMA weights where it has them and ``use_ema`` (default True), else the raw ones; the text encoder
    unless ``load_text_encoder`` is False. Returned in eval mode on ``device`` (default CPU)."""
    config = ckpt.read_config(path)
    encoder = None
    if load_text_encoder and config.get("text_encoder") is not None:
        encoder = read_text_encoder(path, config["text_encoder"], use_ema)
    cascade = cascade_class.from_config(config, text_encoder=encoder, load_text_encoder=False)
    for k, stage in enumerate(cascade.stages):
        name = f"stage{k}.ema" if use_ema and ckpt.has_file(path, f"stage{k}.ema.safetensors") else f"stage{k}"
        stage.net.load_state_dict(ckpt.read_tensors(path, name))
    cascade.eval()
    return cascade.to(device) if device is not None else cascade
