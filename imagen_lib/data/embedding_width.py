"""The width of the precomputed caption embeddings a data source holds, read without loading a text encoder
(a configuration sizes the networks' text input by it)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

from imagen_lib.data.bad_samples import BadSample
from imagen_lib.data.precache import EmbeddingStore
from imagen_lib.data.shard_samples import decode_embeddings
from imagen_lib.data.shards import expand_urls, read_shard

SAMPLES_TO_TRY = 100


def store_embedding_width(path: Union[str, Path]) -> int:
    """The embedding width of an :class:`~imagen_lib.data.precache.EmbeddingStore` folder."""
    return EmbeddingStore(path).dim


def shard_embedding_width(urls: Union[str, Sequence[str]]) -> Optional[int]:
    """The width of the precomputed embeddings (``emb.npy``) in the first of the shards ``urls`` (as
    :func:`~imagen_lib.data.shards.expand_urls` reads them): read off the first sample whose embeddings are
    usable, among its first :data:`SAMPLES_TO_TRY` (bad ones are skipped, as the data set skips them);
    None when the first readable sample has none (captions only)."""
    with contextlib.closing(read_shard(expand_urls(urls)[0])) as samples:  # closing it closes the shard
        for sample in itertools.islice(samples, SAMPLES_TO_TRY):
            if "__error__" in sample:
                continue
            if "emb.npy" not in sample:
                return None
            with contextlib.suppress(BadSample):
                return int(decode_embeddings(sample)[0].shape[-1])
    return None
