"""Precached latents (seed 003, "Training with precached latents"): a latent stage's images encoded once by its
frozen autoencoder, so training reads them and never runs (or loads) the VAE.

- An image-caption folder gives a :class:`LatentStore`: a local folder with ``latents.npy`` (float32 (N, C, h,
  w), memory-mapped when read), ``keys.json`` (the folder's relative image paths, in order) and ``meta.json``
  (the autoencoder's configuration and the image size), read by
  ``ImageTextFolder(root, size, latents=FOLDER)`` (config: ``data.latents``), whose items then carry ``latents``.
- Shards get a ``latent.npy`` field per sample (:func:`latent_fields`, written by
  :func:`~imagen_lib.data.precache.precache_shards`), which :class:`~imagen_lib.data.shards.ShardDataset` reads
  as ``latents``.

Images are encoded as the data sets load them (resized, centre-cropped, no flip: a flipped image's latent
is not the flipped latent), with the posterior's mean (``encode_mean`` when the autoencoder has one), so the
latents are deterministic; training on them gives the same loss as encoding the same images online with
``posterior: mean``. ``autoencoder`` is anything following :class:`imagen_lib.protocols.Autoencoder`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

LATENTS_FILE, KEYS_FILE, META_FILE = "latents.npy", "keys.json", "meta.json"


@torch.inference_mode()
def encode_latents(autoencoder: Any, images: Tensor) -> Tensor:
    """Deterministic latents of images (B, C, H, W) in [-1, 1], computed on the autoencoder's ``device`` when it
    has one: the posterior mean when the autoencoder offers ``encode_mean``, else its ``encode``."""
    encode = getattr(autoencoder, "encode_mean", None) or autoencoder.encode
    return encode(images.to(getattr(autoencoder, "device", images.device))).float()


def precache_folder_latents(
    autoencoder: Any, dataset: Any, output: Union[str, Path], *, batch_size: int = 32, progress: bool = True,
) -> "LatentStore":
    """Encode every item of ``dataset`` (an :class:`~imagen_lib.data.folder.ImageTextFolder` built with the
    latent stage's ``image_size``, ``crop="center"``, no flip) into a :class:`LatentStore` at the local folder
    ``output``, ``batch_size`` images at a time (default 32). The store is written under a temporary name and
    renamed when complete, so an interrupted run leaves none (run it again)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if getattr(getattr(dataset, "transform", None), "flip", False):
        raise ValueError("dataset: built with flip=True; precached latents need the images as they are")
    keys, rows = list(dataset.keys), []
    if not keys:
        raise ValueError("dataset: no images to encode")
    for start in tqdm(range(0, len(keys), batch_size), desc="precache latents", unit="batch", disable=not progress):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(keys)))]
        if [item["keys"] for item in items] != keys[start : start + len(items)]:
            raise ValueError("dataset: an image failed to load and was replaced; fix or remove it, then rerun")
        rows.append(encode_latents(autoencoder, torch.stack([item["images"] for item in items])).cpu().numpy())
    output = Path(output)
    staging = output.with_name(output.name + ".tmp")
    staging.mkdir(parents=True, exist_ok=True)
    np.save(staging / LATENTS_FILE, np.concatenate(rows).astype(np.float32), allow_pickle=False)
    (staging / KEYS_FILE).write_text(json.dumps(keys), encoding="utf-8")
    meta = {"autoencoder": json.loads(json.dumps(getattr(autoencoder, "config", {}), default=str)),
            "image_size": int(items[0]["images"].shape[-1])}
    (staging / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(staging, output)
    return LatentStore(output)


class LatentStore:
    """Precached latents of an image folder (written by :func:`precache_folder_latents`): ``store[key]`` is a
    float32 (C, h, w) tensor; ``store.meta`` says which autoencoder and image size made them."""

    def __init__(self, folder: Union[str, Path]):
        folder = Path(folder)
        missing = [n for n in (LATENTS_FILE, KEYS_FILE, META_FILE) if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"folder: {folder} is no latent store (missing {missing}); write one with "
                                    "imagen-lib precache --autoencoder")
        self.folder = folder
        self.latents = np.load(folder / LATENTS_FILE, mmap_mode="r")
        self.keys = json.loads((folder / KEYS_FILE).read_text(encoding="utf-8"))
        self.meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        if len(self.keys) != len(self.latents):
            raise ValueError(f"folder: {folder} holds {len(self.latents)} latents for {len(self.keys)} keys")
        self._rows = {key: i for i, key in enumerate(self.keys)}

    @classmethod
    def for_dataset(cls, store: Union["LatentStore", str, Path], keys: Sequence[str],
                    image_size: int) -> "LatentStore":
        """``store`` (or the store at that folder) checked to hold every key, made from ``image_size`` images."""
        store = store if isinstance(store, LatentStore) else cls(store)
        missing = [k for k in keys if k not in store]
        if missing:
            raise ValueError(f"latents: the store has no latents for {len(missing)} images (first: {missing[0]!r}); "
                             "precache them again")
        size = store.meta.get("image_size")
        if size is not None and size != image_size:
            raise ValueError(f"latents: they were made from {size} px images; the data set makes {image_size} px")
        return store

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __getitem__(self, key: str) -> Tensor:
        return torch.from_numpy(np.array(self.latents[self._rows[key]]))


def latent_fields(autoencoder: Any, images: Sequence[Tensor]) -> list[dict[str, bytes]]:
    """Per-sample shard fields ``latent.npy`` (float32 (C, h, w)) of images (3, S, S) in [-1, 1]."""
    latents = encode_latents(autoencoder, torch.stack(list(images))).cpu().numpy().astype(np.float32)
    fields = []
    for row in latents:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(row), allow_pickle=False)
        fields.append({"latent.npy": buffer.getvalue()})
    return fields


def decode_latents(sample: dict[str, Any]) -> Tensor:
    """A shard sample's ``latent.npy`` as a float32 (C, h, w) tensor (:class:`BadSample` when it is not one)."""
    from imagen_lib.data.bad_samples import BadSample
    from imagen_lib.data.shard_samples import _load_npy

    array = _load_npy(sample, "latent.npy")
    if array.ndim != 3 or array.dtype.kind != "f" or not np.isfinite(array).all():
        raise BadSample("bad latent.npy", f"expected a finite float (C, h, w) array, got {array.dtype} {array.shape}")
    return torch.from_numpy(array.astype(np.float32))
