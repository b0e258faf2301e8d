"""The embedding store: precomputed caption embeddings in a memory-mapped folder (local path).

The folder holds the embeddings of all captions back to back in float16, each trimmed to its real token
length (``embeds.f16``), the mask bits of those tokens (``masks.u8``), the per-caption lengths
(``lengths.i32``), a key per caption (``keys.txt``, the image's relative path) and ``meta.json`` (format,
width, the encoder's ``max_length`` and config, whether the writer finished). :class:`EmbeddingStore` reads
it; :class:`EmbeddingStoreWriter` appends to it, resumably: a batch is committed by appending its lengths
last, and an interrupted store is cut back to its last committed batch when it is reopened.
:func:`~imagen_lib.data.precache.precache_captions` fills one with an encoder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

STORE_FORMAT = "imagen_lib.embeddings/1"
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


def trimmed_length(mask: np.ndarray) -> int:
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
        self._embeds, self._masks = None, None  # np.memmap cannot map an empty file
        if total:
            self._embeds = np.memmap(self.path / _FILES["embeds"], np.float16, "r", shape=(total, self.dim))
            self._masks = np.memmap(self.path / _FILES["masks"], np.uint8, "r", shape=(total,))
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


class EmbeddingStoreWriter:
    """Appends batches of encoded captions to the store at ``path`` (created if missing).

    Reopening a store cuts it back to its last committed batch (``count`` and ``keys`` are what it kept);
    one written with another ``dim``, ``max_length`` or ``encoder_config`` (a JSON-able description of the
    encoder) is an error. :meth:`close` records whether the writing finished.
    """

    def __init__(self, path: Union[str, Path], dim: int, max_length: int, encoder_config: Any):
        self.path = path = Path(path)
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
        """Write (B, N, D) ``embeds`` and their (B, N) ``mask``, each row trimmed to its real length, and commit."""
        embeds_np = embeds.detach().to("cpu", torch.float16).numpy()
        mask_np = mask.detach().cpu().numpy().astype(bool)
        lengths = np.array([trimmed_length(m) for m in mask_np], dtype=np.int32)
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
        """Close the files and record in ``meta.json`` whether every caption was written."""
        for handle in self.files.values():
            handle.close()
        meta = {**self.meta, "complete": complete, "count": self.count}
        (self.path / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
