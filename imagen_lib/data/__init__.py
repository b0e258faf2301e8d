"""Data sets that yield the Trainer's batch dicts: captioned shapes, image-caption folders, WebDataset shards.

Names are imported lazily, so that ``import imagen_lib.data`` does not load kornia or webdataset until a
data set that needs them is asked for.
"""

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "ShapesDataset": "imagen_lib.data.shapes",
    "collate_shapes": "imagen_lib.data.shapes",
    "sample_captions": "imagen_lib.data.shapes",
    "render": "imagen_lib.data.shapes",
    "render_batch": "imagen_lib.data.shapes",
    "ShapePairsDataset": "imagen_lib.data.shapes_pairs",
    "sample_pair_captions": "imagen_lib.data.shapes_pairs",
    "render_pairs": "imagen_lib.data.shapes_pairs",
    "read_pairs": "imagen_lib.data.shapes_pairs_reader",
    "score_pairs": "imagen_lib.data.shapes_pairs_reader",
    "read_shapes": "imagen_lib.data.shapes_reader",
    "score_shapes": "imagen_lib.data.shapes_reader",
    "ImageTextFolder": "imagen_lib.data.folder",
    "collate_image_text": "imagen_lib.data.collate",
    "ShardDataset": "imagen_lib.data.shards",
    "write_shards": "imagen_lib.data.shards",
    "read_shard": "imagen_lib.data.shards",
    "expand_urls": "imagen_lib.data.shards",
    "ImageTransform": "imagen_lib.data.transforms",
    "EmbeddingStore": "imagen_lib.data.embeddings",
    "fit_token_length": "imagen_lib.data.embeddings",
    "precache_captions": "imagen_lib.data.precache",
    "precache_shards": "imagen_lib.data.precache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'imagen_lib.data' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


if TYPE_CHECKING:
    from imagen_lib.data.collate import collate_image_text
    from imagen_lib.data.embeddings import EmbeddingStore, fit_token_length
    from imagen_lib.data.folder import ImageTextFolder
    from imagen_lib.data.precache import precache_captions, precache_shards
    from imagen_lib.data.shapes import ShapesDataset, collate_shapes, render, render_batch, sample_captions
    from imagen_lib.data.shapes_pairs import ShapePairsDataset, render_pairs, sample_pair_captions
    from imagen_lib.data.shapes_pairs_reader import read_pairs, score_pairs
    from imagen_lib.data.shapes_reader import read_shapes, score_shapes
    from imagen_lib.data.shards import ShardDataset, expand_urls, read_shard, write_shards
    from imagen_lib.data.transforms import ImageTransform
