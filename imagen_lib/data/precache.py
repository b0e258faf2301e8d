"""Precomputed text embeddings: encode every caption once, ahead of training.

A large T5 inside the training loop costs several times the training itself (NeMo measured 3-4x), so
captions are encoded once and training reads the result without loading the encoder.

Two destinations:

- an :class:`~imagen_lib.data.embeddings.EmbeddingStore` (a memory-mapped local folder, resumable batch by
  batch) for image-caption folders and caption lists: :func:`precache_captions`;
- new WebDataset shards beside the input shards, each sample carrying ``emb.npy`` (float16, trimmed) and
  ``emb_mask.npy`` (bool) next to its image and caption: :func:`precache_shards`.

``encoder`` is anything called as ``encoder(texts) -> (embeds (B, N, D), mask (B, N) bool)``, such as
:class:`imagen_lib.text.T5TextEncoder`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from imagen_lib.data.embeddings import EmbeddingStore, EmbeddingStoreWriter, trimmed_length
from imagen_lib.data.shards import expand_urls, iter_shard_samples, write_samples

Encoder = Callable[[list], tuple[Tensor, Tensor]]


def _encoder_config(encoder: Any) -> Any:
    config = getattr(encoder, "config", None)
    return json.loads(json.dumps(config, default=str)) if isinstance(config, dict) else type(encoder).__name__


@torch.inference_mode()
def _encode(encoder: Encoder, texts: list[str]) -> tuple[Tensor, Tensor]:
    embeds, mask = encoder(texts)
    if embeds.ndim != 3 or mask.shape != embeds.shape[:2]:
        raise ValueError(f"encoder: expected (B, N, D) embeddings and a (B, N) mask, got {tuple(embeds.shape)}")
    return embeds, mask.bool()


def precache_captions(
    encoder: Encoder,
    items: Sequence[tuple[str, str]],
    output: Union[str, Path],
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> EmbeddingStore:
    """Encode ``items`` (``(key, caption)`` pairs, keys unique and without newlines) into an
    :class:`EmbeddingStore` at the local folder ``output``, ``batch_size`` captions at a time (default 64).

    Resumable: captions already committed to ``output`` by an interrupted run with the same encoder are
    kept (their keys must match the start of ``items``) and encoding continues after them.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    keys = [str(k) for k, _ in items]
    if any("\n" in k for k in keys) or len(set(keys)) != len(keys):
        raise ValueError("items: keys must be unique and contain no newline")
    if not items:
        raise ValueError("items: nothing to encode")
    # one caption tells the width; it is encoded again in its batch
    probe, _ = _encode(encoder, [items[0][1]])
    max_length = int(getattr(encoder, "max_length", probe.shape[1]))
    writer = EmbeddingStoreWriter(Path(output), int(probe.shape[-1]), max_length, _encoder_config(encoder))
    done = writer.count
    if writer.keys != keys[:done]:
        writer.close(complete=False)
        raise ValueError(f"output: {output} holds {done} captions whose keys differ from this input's first ones")
    complete = False
    try:
        with tqdm(total=len(items), initial=done, desc="precache", unit="caption", disable=not progress) as bar:
            for start in range(done, len(items), batch_size):
                chunk = items[start : start + batch_size]
                embeds, mask = _encode(encoder, [caption for _, caption in chunk])
                writer.append([k for k, _ in chunk], embeds, mask)
                bar.update(len(chunk))
        complete = True
    finally:
        writer.close(complete=complete)
    return EmbeddingStore(output)


# ----------------------------------------------------------------------------------------------------------
# shards


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def embedding_fields(embeds: Tensor, mask: Tensor) -> list[dict[str, bytes]]:
    """Per-row shard fields ``emb.npy`` (float16 (L, D), trimmed to the real length) and ``emb_mask.npy``."""
    embeds_np = embeds.detach().to("cpu", torch.float16).numpy()
    mask_np = mask.detach().cpu().numpy().astype(bool)
    rows = []
    for e, m in zip(embeds_np, mask_np):
        length = trimmed_length(m)
        rows.append({"emb.npy": _npy_bytes(np.ascontiguousarray(e[:length])), "emb_mask.npy": _npy_bytes(m[:length])})
    return rows


def precache_shards(
    encoder: Encoder,
    urls: Union[str, Sequence[str]],
    output: str,
    *,
    batch_size: int = 64,
    progress: bool = True,
    latents: Optional[tuple[Any, int]] = None,
) -> list[str]:
    """Copy every shard of ``urls`` into the folder ``output`` (any fsspec URL) with each sample's caption
    encoded: ``emb.npy`` (float16 (L, D), trimmed to the real length) and ``emb_mask.npy`` are added beside
    the image and ``txt``. Resumable shard by shard: a shard is written under a temporary name and renamed
    when complete, and shards already in ``output`` are skipped. Returns the output shard URLs.

    ``latents``: ``(autoencoder, image_size)`` to add each image's latents too (``latent.npy``, float32
    (C, h, w): the image resized and centre-cropped to ``image_size``, encoded with the posterior's mean;
    :mod:`imagen_lib.data.precache_latents`); ``encoder`` may then be None (latents only).
    """
    inputs = expand_urls(urls)
    outputs = []
    for url in tqdm(inputs, desc="precache shards", unit="shard", disable=not progress):
        target = output.rstrip("/") + "/" + url.rstrip("/").rsplit("/", 1)[-1]
        outputs.append(target)
        if _exists(target):
            continue

        def encoded(url: str = url) -> Iterable[dict[str, Any]]:
            batch: list[dict[str, Any]] = []
            for sample in iter_shard_samples(url):
                batch.append(sample)
                if len(batch) == batch_size:
                    yield from _with_embeddings(encoder, batch, latents)
                    batch = []
            if batch:
                yield from _with_embeddings(encoder, batch, latents)

        write_samples(encoded(), target)
    return outputs


def _with_embeddings(encoder: Optional[Encoder], samples: list[dict[str, Any]],
                     latents: Optional[tuple[Any, int]] = None) -> list[dict[str, Any]]:
    fields: list[dict[str, bytes]] = [{} for _ in samples]
    if encoder is not None:
        missing = [s["__key__"] for s in samples if "txt" not in s]
        if missing:
            raise ValueError(f"samples without a txt caption cannot be precached: {missing[:5]}")
        embeds, mask = _encode(encoder, [s["txt"].decode("utf-8") for s in samples])
        fields = embedding_fields(embeds, mask)
    if latents is not None:
        fields = [{**f, **g} for f, g in zip(fields, _latent_fields(latents, samples))]
    kept = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"} for s in samples]
    return [{**s, **f} for s, f in zip(kept, fields)]


def _latent_fields(latents: tuple[Any, int], samples: list[dict[str, Any]]) -> list[dict[str, bytes]]:
    from imagen_lib.data.precache_latents import latent_fields
    from imagen_lib.data.shard_samples import decode_image
    from imagen_lib.data.transforms import ImageTransform

    autoencoder, image_size = latents
    transform = ImageTransform(image_size)
    return latent_fields(autoencoder, [transform(decode_image(s)) for s in samples])


def _exists(url: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)
