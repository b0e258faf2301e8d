"""A cascade's checkpoint (the layout and the commit protocol are :mod:`imagen_lib.checkpoint`'s): its
configuration, each stage's weights (raw and EMA), each latent stage's autoencoder (``autoencoder{k}/``, its
config.json + safetensors) and, when it is built locally or trained, the text encoder's own files; loads
check every file and every weight (:func:`imagen_lib.checkpoint.load_weights`).

:meth:`Cascade.save <imagen_lib.cascade.Cascade.save>` and :meth:`Cascade.from_checkpoint
<imagen_lib.cascade.Cascade.from_checkpoint>` call these; the Trainer writes its checkpoints with
:func:`write_cascade_checkpoint`. This module never imports :mod:`imagen_lib.cascade` (the cascade imports it),
so the class to rebuild is passed in.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from imagen_lib import checkpoint as ckpt
from imagen_lib.checkpoint import PathLike


def stores_text_encoder(cascade: Any) -> bool:
    """Whether checkpoints of ``cascade`` hold its text encoder's files: yes when the encoder is trained or was
    built locally (its source is ``build_tiny``), no for a frozen pretrained one (reloaded by name). Any kind of
    encoder (T5, CLIP: :data:`imagen_lib.text.TEXT_ENCODERS`) is stored alike; its config records the kind."""
    encoder = cascade.text_encoder
    return encoder is not None and (encoder.trainable or "build_tiny" in encoder.config.get("source", {}))


def check_no_adapters(tensors: dict) -> None:
    """A weights file holds a network's own weights only: a LoRA-adapted one (``...lora_A...``, ``base_layer``)
    would no longer load into the plain network, so it is an error, never silently written."""
    adapted = [name for name, state in tensors.items()
               if any(".lora_" in key or ".base_layer." in key for key in state)]
    if adapted:
        raise ValueError(f"tensors: {adapted} hold LoRA adapters; save them with imagen_lib.training.lora.save_lora "
                         "(beside the base checkpoint), or fold them into the weights with merge_lora first")


def write_cascade_checkpoint(
    cascade: Any, path: PathLike, *, tensors: dict, json_files: Optional[dict] = None, overwrite: bool = False,
    run_id: Optional[str] = None, keep_last: int = 1, label: Optional[str] = None,
) -> str:
    """Commit ``cascade.config`` with the given weight files (``{"stage0": state_dict, ...}``), ``json_files``
    and the text encoder's folder when it is stored (written straight into the new version when ``path`` is
    local) as a new version of the checkpoint at ``path``; returns ``path`` (see
    :func:`imagen_lib.checkpoint.write_checkpoint` for ``overwrite``, ``run_id``, ``keep_last`` [1] and
    ``label``)."""
    check_no_adapters(tensors)
    folders = {"text_encoder": cascade.text_encoder.save_pretrained} if stores_text_encoder(cascade) else {}
    folders.update(autoencoder_folders(cascade))
    return ckpt.write_checkpoint(
        path, config=cascade.config, tensors=tensors, json_files=json_files or {}, folders=folders,
        overwrite=overwrite, run_id=run_id, keep_last=keep_last, label=label,
    )


def autoencoder_folders(cascade: Any) -> dict:
    """``{"autoencoder{k}": save_pretrained}`` for every latent stage ``k``: checkpoints always hold the
    autoencoder's weights (config.json + safetensors), so a checkpoint samples as it was trained even when a
    published VAE it came from changes or is out of reach."""
    return {f"autoencoder{k}": stage.autoencoder.save_pretrained for k, stage in enumerate(cascade.stages)
            if getattr(stage, "autoencoder", None) is not None}


def read_autoencoders(path: PathLike, config: dict) -> dict:
    """``{k: autoencoder}`` of every latent stage of ``config``, from the checkpoint's ``autoencoder{k}/``
    folder (from its source, read lazily, when the folder is missing and the source is a pretrained VAE)."""
    from imagen_lib.latent import autoencoder_from_config

    found = {}
    for k, stage in enumerate(config.get("stages", [])):
        if stage.get("autoencoder") is None:
            continue
        name = f"autoencoder{k}"
        if ckpt.has_file(path, name):
            with ckpt.local_folder(path, name) as folder:
                found[k] = autoencoder_from_config(stage["autoencoder"], folder=folder)
        else:
            found[k] = autoencoder_from_config(stage["autoencoder"])
    return found


def save_cascade(cascade: Any, path: PathLike, *, overwrite: bool = False, keep_last: int = 1) -> str:
    """Write ``cascade``'s configuration and current stage weights as a new version of the checkpoint at
    ``path``, keeping ``keep_last`` versions [1]."""
    tensors = {f"stage{k}": stage.net.state_dict() for k, stage in enumerate(cascade.stages)}
    return write_cascade_checkpoint(cascade, path, tensors=tensors, overwrite=overwrite, keep_last=keep_last)


def read_text_encoder(path: PathLike, config: dict, use_ema: bool = True):
    """The text encoder described by ``config`` (of its ``kind``, default T5), with the checkpoint's own files
    when it holds them (and their EMA weights with ``use_ema``), else rebuilt from its source. A trained or
    locally built encoder whose files are missing is an error, never a fresh random one."""
    from imagen_lib.text import text_encoder_from_config

    if not ckpt.has_file(path, "text_encoder"):
        source = config.get("source", {}) if isinstance(config, dict) else {}
        if isinstance(config, dict) and (config.get("trainable") or "build_tiny" in source):
            how = "trained" if config.get("trainable") else "built locally (build_tiny)"
            raise FileNotFoundError(
                f"path: checkpoint {path!s} has no text_encoder/ folder, but its config.json says the text encoder "
                f"was {how}, so its weights live only there; restore the folder, or pass load_text_encoder=False "
                "and sample with precomputed embeddings")
        return text_encoder_from_config(config)
    with ckpt.local_folder(path, "text_encoder") as folder:
        encoder = text_encoder_from_config(config, folder=folder)
    if use_ema and ckpt.has_file(path, "text_encoder.ema.safetensors"):
        ckpt.load_weights(encoder.model, ckpt.read_tensors(path, "text_encoder.ema"),
                          f"text_encoder.ema.safetensors in {path}")
    return encoder


def read_cascade(
    cascade_class: Any, path: PathLike, *, use_ema: bool = True, device: Union[None, str, torch.device] = None,
    load_text_encoder: bool = True,
):
    """Rebuild a cascade of ``cascade_class`` (:class:`~imagen_lib.cascade.Cascade`) from the checkpoint at
    ``path`` (its committed version, read once): EMA weights where it has them and ``use_ema`` (default True),
    else the raw ones; the text encoder unless ``load_text_encoder`` is False. Returned in eval mode on
    ``device`` (default CPU)."""
    path = ckpt.resolve(path)  # one version throughout, even if a save commits another meanwhile
    config = ckpt.read_config(path)
    encoder = None
    if load_text_encoder and config.get("text_encoder") is not None:
        encoder = read_text_encoder(path, config["text_encoder"], use_ema)
    cascade = cascade_class.from_config(config, text_encoder=encoder, load_text_encoder=False,
                                        autoencoders=read_autoencoders(path, config))
    for k, stage in enumerate(cascade.stages):
        name = f"stage{k}.ema" if use_ema and ckpt.has_file(path, f"stage{k}.ema.safetensors") else f"stage{k}"
        ckpt.load_weights(stage.net, ckpt.read_tensors(path, name), f"{name}.safetensors in {path}")
    cascade.eval()
    return cascade.to(device) if device is not None else cascade
