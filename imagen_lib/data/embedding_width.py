"""The width of the precomputed caption embeddings a data source holds, read without loading a text encoder
(a configuration sizes the networks' text input by it)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np

from imagen_lib.data.precache import EmbeddingStore
from imagen_lib.data.shards import expand_urls, iter_shard_samples


def store_embedding_width(path: Union[str, Path]) -> int:
    """The embedding width of an :class:`~imagen_lib.data.precache.EmbeddingStore` folder."""
    return EmbeddingStore(path).dim


def shard_embedding_width(urls: Union[str, Sequence[str]]) -> Optional[int]:
    """The width of the first sample's ``emb.npy`` in the first of the shards ``urls`` (as
    :func:`~imagen_lib.data.shards.expand_urls` reads them); None when it has none (captions only)."""
    with contextlib.closing(iter_shard_samples(expand_urls(urls)[0])) as samples:
        first = next(samples, None)  # closing the generator closes the shard's stream
    if first is None or "emb.npy" not in first:
        return None
    return int(np.load(io.BytesIO(first["emb.npy"]), allow_pickle=False).shape[-1])
