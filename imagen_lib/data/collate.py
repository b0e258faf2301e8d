"""Batching the items of the image-caption data sets (``ImageTextFolder``, ``ShardDataset``) into the
Trainer's batch dict."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from imagen_lib.data.embeddings import fit_token_length


def collate_image_text(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The Trainer's batch dict from items of :class:`~imagen_lib.data.folder.ImageTextFolder` or
    :class:`~imagen_lib.data.shards.ShardDataset`.

    ``images`` (and precached ``latents``) are stacked; ``texts`` and ``keys`` become lists; ``text_embeds`` /
    ``text_mask`` of different lengths are zero-padded to the longest before stacking.
    """
    if not samples:
        raise ValueError("collate_image_text needs at least one sample")
    batch: dict[str, Any] = {"images": torch.stack([s["images"] for s in samples])}
    if "latents" in samples[0]:  # precached by imagen-lib precache --autoencoder
        batch["latents"] = torch.stack([s["latents"] for s in samples])
    if "text_embeds" in samples[0]:
        longest = max(s["text_embeds"].shape[0] for s in samples)
        fitted = [fit_token_length(s["text_embeds"], s["text_mask"], max(longest, 1)) for s in samples]
        batch["text_embeds"] = torch.stack([e for e, _ in fitted])
        batch["text_mask"] = torch.stack([m for _, m in fitted])
    for key in ("texts", "keys"):
        if key in samples[0]:
            batch[key] = [s[key] for s in samples]
    return batch
