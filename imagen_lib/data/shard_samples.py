"""The parts of one raw WebDataset sample (``{"__key__", "__url__", extension: bytes}``), decoded and checked.

Each function raises :class:`~imagen_lib.data.bad_samples.BadSample` (a fixed reason and what was seen) for
a part that cannot be used, so that :class:`~imagen_lib.data.shards.ShardDataset` skips and counts the
sample instead of crashing mid-epoch. Embeddings are read with ``allow_pickle=False``: an object-dtype
``.npy`` is refused before anything in it is unpickled.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from imagen_lib.data.bad_samples import BadSample
from imagen_lib.data.transforms import to_rgb

IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp")


def sample_error(sample: dict[str, Any]) -> None:
    """Raise the error the tar reader attached to a sample it could not read whole (a truncated tar)."""
    if "__error__" in sample:
        raise BadSample(*sample["__error__"])


def decode_image(sample: dict[str, Any]) -> Image.Image:
    """The sample's image, decoded in full (a truncated file fails here, not later) and in mode RGB."""
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is None:
        raise BadSample("no image", f"none of the fields {', '.join(IMAGE_FIELDS)}")
    try:
        image = Image.open(io.BytesIO(sample[field]))
        image.load()
        return to_rgb(image)
    except Exception as error:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...) for broken data
        raise BadSample("undecodable image", f"{field}: {type(error).__name__}: {error}") from None


def decode_caption(sample: dict[str, Any]) -> str:
    """The ``txt`` caption, UTF-8, stripped."""
    if "txt" not in sample:
        raise BadSample("no caption", "the sample has no txt field")
    try:
        return sample["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise BadSample("caption not UTF-8", str(error)) from None


def _load_npy(sample: dict[str, Any], field: str) -> np.ndarray:
    if field not in sample:
        raise BadSample(f"missing {field}", "the sample has no such field")
    try:
        return np.load(io.BytesIO(sample[field]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:  # object dtype, a pickle, a truncated or foreign file
        raise BadSample(f"bad {field}", str(error)) from None


def decode_embeddings(sample: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """``emb.npy`` as (N, D) float32 and ``emb_mask.npy`` as (N,) bool, checked: a floating 2-D array of
    finite values, and a bool (or 0/1 integer) mask with one entry per token."""
    embeds = _load_npy(sample, "emb.npy")
    mask = _load_npy(sample, "emb_mask.npy")
    if embeds.ndim != 2 or embeds.dtype.kind != "f":
        raise BadSample("bad emb.npy", f"expected a float (tokens, width) array, got {embeds.dtype} {embeds.shape}")
    if not np.isfinite(embeds).all():
        raise BadSample("bad emb.npy", "it holds NaN or infinite values")
    if mask.shape != embeds.shape[:1] or mask.dtype.kind not in "bui" or ((mask != 0) & (mask != 1)).any():
        raise BadSample(
            "bad emb_mask.npy", f"expected a bool ({embeds.shape[0]},) array, got {mask.dtype} {mask.shape}"
        )
    return torch.from_numpy(embeds).float(), torch.from_numpy(mask != 0)
