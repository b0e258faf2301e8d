"""Precomputed text embeddings: encode every caption once, ahead of training.

A large T5 inside the training loop costs several times the training itself (NeMo measured 3-4x), so
captions are encoded once and training reads the result without loading the encoder.

Two destinations:

- :class:`EmbeddingStore`, a memory-mapped folder for image-caption folders and caption lists: the
  embeddings of all captions back to back in float16, each trimmed to its real token length, with the mask
  bits of those tokens, the per-caption lengths and a key per caption (the image's relative path). Writing
  is resumable: a batch is committed by appending its lengths last, and an interrupted run is cut back to
  the last committed batch when it restarts.
- new WebDataset shards beside the input shards, each sample carrying ``emb.npy`` (float16, trimmed) and
  ``emb_mask.npy`` (bool) next to its image and caption (see :func:`precache_shards`).

``encoder`` is anything called as ``encoder(texts) -> (embeds (B, N, D), mask (B, N) bool)``, such as
:class:`imagen_lib.text.T5TextEncoder`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

STORE_FORMAT = "imagen_lib.embeddings/1"
Encoder = Callable[[list], tuple[Tensor, Tensor]]
_FILES = {"embeds": "embeds.f16", "masks": "masks.u8", "lengths": "lengths.i32", "keys": "keys.txt"}


def fit_token_length(embeds: Tensor, mask: Tensor, token_length: int) -> tuple[Tensor, Tensor]:
    """Trim or zero-pad (..., N, D) embeddings and their (..., N) mask to ``token_length`` tokens, as
    NeMo's ``conditioning.token_length`` does; padded positions are 0 with mask False."""
    if not isinstance(token_length, int) or token_length < 1:
        raise ValueError(f"token_length: expected a positive int, got {token_length!r}")
    n = embeds.shape[-2]
    if mask.shape[-1] != n:
        raise ValueError(f"mask: expected {n} tokens like embeds, got shape {tuple(mask.shape)}")
    if n >= token_length:
        return embeds[..., :token_length, :], mask[..., :token_length]
    pad = token_length - n
    embeds = torch.nn.functional.pad(embeds, (0, 0, 0, pad))
    return embeds, torch.nn.functional.pad(mask, (0, pad), value=False)


def _trimmed_length(mask: np.ndarray) -> int:
    """Tokens up to and including the last real one (T5 masks are a prefix of True)."""
    real = np.flatnonzero(mask)
    return int(real[-1]) + 1 if len(real) else 0


class EmbeddingStore:
    """A memory-mapped folder of precomputed caption embeddings (local path), read side.

    ``store[i]`` -> ``(embeds (L_i, D) float16, mask (L_i,) bool)``, trimmed to the caption's real length;
    ``store.get(i, token_length)`` -> float32 ``(token_length, D)`` and ``(token_length,)`` padded or
    trimmed (default ``token_length``: the encoder's ``max_length``); ``store.index(key)`` finds a caption.
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"path: {self.path} is not an embedding store (no meta.json)")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("format") != STORE_FORMAT:
            raise ValueError(f"path: {self.path} holds format {self.meta.get('format')!r}, expected {STORE_FORMAT!r}")
        self.dim, self.max_length = int(self.meta["dim"]), int(self.meta["max_length"])
        lengths = np.fromfile(self.path / _FILES["lengths"], dtype=np.int32)
        self.lengths = lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        total = int(self.offsets[-1])
        self._embeds = np.memmap(self.path / _FILES["embeds"], np.float16, "r", shape=(total, self.dim)) if total else None
        self._masks = np.memmap(self.path / _FILES["masks"], np.uint8, "r", shape=(total,)) if total else None
        keys = (self.path / _FILES["keys"]).read_text(encoding="utf-8").split("\n")[: len(lengths)]
        self.keys = keys
        self._index = {key: i for i, key in enumerate(keys)}

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def complete(self) -> bool:
        """Whether the writer finished (an interrupted precache leaves this False)."""
        return bool(self.meta.get("complete", False))

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def index(self, key: str) -> int:
        if key not in self._index:
            raise KeyError(f"key {key!r} is not in the embedding store {self.path}")
        return self._index[key]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} is out of range for a store of {len(self)} captions")
        i %= len(self)
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        if stop == start:
            return torch.zeros(0, self.dim, dtype=torch.float16), torch.zeros(0, dtype=torch.bool)
        return torch.from_numpy(np.array(self._embeds[start:stop])), torch.from_numpy(self._masks[start:stop] > 0)

    def get(self, i: int, token_length: Optional[int] = None) -> tuple[Tensor, Tensor]:
        embeds, mask = self[i]
        return fit_token_length(embeds.float(), mask, token_length or self.max_length)

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.path)!r}, captions={len(self)}, dim={self.dim}, complete={self.complete})"


class _StoreWriter:
    """Appends batches to a store; reopening an interrupted store cuts it back to its last commit."""

    def __init__(self, path: Path, dim: int, max_length: int, encoder_config: Any):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": STORE_FORMAT, "dim": dim, "max_length": max_length, "encoder": encoder_config}
        meta_path = path / "meta.json"
        if meta_path.is_file():
            old = json.loads(meta_path.read_text(encoding="utf-8"))
            for field in ("format", "dim", "max_length", "encoder"):
                if old.get(field) != meta[field]:
                    raise ValueError(
                        f"output: {path} already holds embeddings with {field}={old.get(field)!r}, not "
                        f"{meta[field]!r}; choose another output or delete it"
                    )
        meta_path.write_text(json.dumps({**meta, "complete": False}, indent=1), encoding="utf-8")
        self.meta = meta
        self.count, _ = self._cut_back()
        self.files = {name: open(path / fname, "ab") for name, fname in _FILES.items()}

    def _cut_back(self) -> tuple[int, int]:
        """Truncate every file to the last committed batch; returns (captions, tokens) kept."""
        lengths_path = self.path / _FILES["lengths"]
        lengths = np.fromfile(lengths_path, dtype=np.int32) if lengths_path.exists() else np.zeros(0, np.int32)
        count, tokens = len(lengths), int(lengths.sum())
        sizes = {"lengths": count * 4, "embeds": tokens * self.meta["dim"] * 2, "masks": tokens}
        for name, size in sizes.items():
            target = self.path / _FILES[name]
            with open(target, "ab") as handle:
                handle.truncate(size)
        keys_path = self.path / _FILES["keys"]
        keys = keys_path.read_text(encoding="utf-8").split("\n")[:count] if keys_path.exists() else []
        keys_path.write_text("".join(k + "\n" for k in keys), encoding="utf-8")
        self.keys = keys
        return count, tokens

    def append(self, keys: Sequence[str], embeds: Tensor, mask: Tensor) -> None:
        embeds_np = embeds.detach().to("cpu", torch.float16).numpy()
        mask_np = mask.detach().cpu().numpy().astype(bool)
        lengths = np.array([_trimmed_length(m) for m in mask_np], dtype=np.int32)
        for row, length in enumerate(lengths):
            self.files["embeds"].write(np.ascontiguousarray(embeds_np[row, :length]).tobytes())
            self.files["masks"].write(mask_np[row, :length].astype(np.uint8).tobytes())
        self.files["keys"].write("".join(k + "\n" for k in keys).encode("utf-8"))
        for name in ("embeds", "masks", "keys"):
            self.files[name].flush()
        # the commit: a batch counts once its lengths are on disk
        self.files["lengths"].write(lengths.tobytes())
        self.files["lengths"].flush()
        os.fsync(self.files["lengths"].fileno())
        self.count += len(keys)
        self.keys.extend(keys)

    def close(self, complete: bool) -> None:
        for handle in self.files.values():
            handle.close()
        meta = {**self.meta, "complete": complete, "count": self.count}
        (self.path / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")


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
    writer = _StoreWriter(Path(output), int(probe.shape[-1]), max_length, _encoder_config(encoder))
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
        length = _trimmed_length(m)
        rows.append({"emb.npy": _npy_bytes(np.ascontiguousarray(e[:length])), "emb_mask.npy": _npy_bytes(m[:length])})
    return rows


def precache_shards(
    encoder: Encoder,
    urls: Union[str, Sequence[str]],
    output: str,
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> list[str]:
    """Copy every shard of ``urls`` into the folder ``output`` (any fsspec URL) with each sample's caption
    encoded: ``emb.npy`` (float16 (L, D), trimmed to the real length) and ``emb_mask.npy`` are added beside
    the image and ``txt``. Resumable shard by shard: a shard is written under a temporary name and renamed
    when complete, and shards already in ``output`` are skipped. Returns the output shard URLs.
    """
    from imagen_lib.data.shards import expand_urls, iter_shard_samples, write_samples

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
                    yield from _with_embeddings(encoder, batch)
                    batch = []
            if batch:
                yield from _with_embeddings(encoder, batch)

        write_samples(encoded(), target)
    return outputs


def _with_embeddings(encoder: Encoder, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    missing = [s["__key__"] for s in samples if "txt" not in s]
    if missing:
        raise ValueError(f"samples without a txt caption cannot be precached: {missing[:5]}")
    embeds, mask = _encode(encoder, [s["txt"].decode("utf-8") for s in samples])
    fields = embedding_fields(embeds, mask)
    kept = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"} for s in samples]
    return [{**s, **f} for s, f in zip(kept, fields)]


def _exists(url: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)
