"""A folder of images with a same-named ``.txt`` caption beside each: ``cat.png`` + ``cat.txt``.

Images that cannot be read or are too small are skipped and counted, never a crash mid-epoch: headers are
checked when the folder is scanned, and an image that fails to decode later is replaced by the next good
one (with a warning). Captions can be replaced by precomputed embeddings from an
:class:`~imagen_lib.data.embeddings.EmbeddingStore` (``imagen-lib precache``), so that training never loads
the text encoder.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from imagen_lib.data.collate import collate_image_text
from imagen_lib.data.embeddings import EmbeddingStore, fit_token_length
from imagen_lib.data.transforms import ImageTransform

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def _scan(root: Path, extensions: Sequence[str], min_size: int) -> tuple[list[Path], Counter]:
    """Image files with a caption beside them whose header reads and whose shorter side is >= min_size."""
    kept, skipped = [], Counter()
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file()):
        if not path.with_suffix(".txt").is_file():
            skipped["no caption"] += 1
            continue
        try:
            with Image.open(path) as image:  # reads the header only
                width, height = image.size
        except Exception:  # PIL raises many kinds for a broken file
            skipped["unreadable"] += 1
            continue
        if min(width, height) < min_size:
            skipped["too small"] += 1
            continue
        kept.append(path)
    return kept, skipped


class ImageTextFolder(Dataset):
    """Images (png, jpg, webp; in subfolders too) with a same-named ``.txt`` caption beside each.

    Args:
        root: the folder (local path).
        image_size: side of the square images (resize the shorter side, then crop; antialiased).
        crop / flip: see :class:`~imagen_lib.data.transforms.ImageTransform` (default center crop, no flip).
        min_size: images whose shorter side is below this are skipped (default ``image_size // 2``).
        embeddings: an :class:`EmbeddingStore` or its folder with every caption precomputed (keys are
            the images' paths relative to ``root``); items then carry ``text_embeds`` + ``text_mask``
            instead of ``texts``. Default None.
        token_length: trim or pad precomputed embeddings to this many tokens (default: the store's
            ``max_length``).
        seed: seed of the random crop and flip (default 0); item ``i`` of epoch ``e`` is deterministic.

    Items: ``{"images": (3, S, S) in [-1, 1], "texts": str, "keys": relative path}`` (or ``text_embeds``
    (N, D) float32 + ``text_mask`` (N,) bool instead of ``texts``). ``skipped`` counts what was left out.
    Use ``collate_fn`` with a DataLoader.
    """

    collate_fn = staticmethod(collate_image_text)

    def __init__(
        self,
        root: Union[str, Path],
        image_size: int,
        *,
        crop: Literal["center", "random"] = "center",
        flip: bool = False,
        min_size: Optional[int] = None,
        embeddings: Union[None, str, Path, EmbeddingStore] = None,
        token_length: Optional[int] = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        seed: int = 0,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"root: {self.root} is not a folder")
        self.transform = ImageTransform(image_size, crop=crop, flip=flip)
        self.min_size = image_size // 2 if min_size is None else int(min_size)
        self.paths, self.skipped = _scan(self.root, tuple(e.lower() for e in extensions), self.min_size)
        if self.skipped:
            details = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
            total = sum(self.skipped.values())
            warnings.warn(f"ImageTextFolder: skipped {total} images in {self.root} ({details})", stacklevel=2)
        if not self.paths:
            raise ValueError(f"root: no usable image with a .txt caption in {self.root}")
        self.keys = [p.relative_to(self.root).as_posix() for p in self.paths]
        self.store = EmbeddingStore(embeddings) if isinstance(embeddings, (str, Path)) else embeddings
        self.token_length = token_length
        if self.store is not None:
            missing = [k for k in self.keys if k not in self.store]
            if missing:
                raise ValueError(
                    f"embeddings: {len(missing)} captions are not precomputed (first: {missing[0]}); run precache"
                )
        self.seed, self.epoch = int(seed), 0

    def __len__(self) -> int:
        return len(self.paths)

    def captions(self) -> list[tuple[str, str]]:
        """``(key, caption)`` for every image, in order (what ``precache`` encodes)."""
        return [(key, self.caption(i)) for i, key in enumerate(self.keys)]

    def caption(self, index: int) -> str:
        return self.paths[index].with_suffix(".txt").read_text(encoding="utf-8", errors="replace").strip()

    def set_epoch(self, epoch: int) -> None:
        """Change the random crops and flips for ``epoch``."""
        self.epoch = int(epoch)

    def _load(self, index: int) -> torch.Tensor:
        entropy = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(entropy >> 2))
        with Image.open(self.paths[index]) as image:
            return self.transform(image, generator)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} images")
        index %= len(self)
        for attempt in range(len(self)):
            k = (index + attempt) % len(self)
            try:
                image = self._load(k)
                break
            except Exception as error:  # a file that passed the header check but does not decode
                self.skipped["unreadable"] += 1
                warnings.warn(f"ImageTextFolder: skipped {self.paths[k]} ({error}); using the next image", stacklevel=2)
        else:
            raise RuntimeError(f"ImageTextFolder: no image in {self.root} could be decoded")
        item: dict[str, Any] = {"images": image, "keys": self.keys[k]}
        if self.store is not None:
            embeds, mask = self.store[self.store.index(self.keys[k])]
            item["text_embeds"], item["text_mask"] = fit_token_length(
                embeds.float(), mask, self.token_length or self.store.max_length
            )
        else:
            item["texts"] = self.caption(k)
        return item

    def __repr__(self) -> str:
        return f"ImageTextFolder({str(self.root)!r}, images={len(self)}, image_size={self.transform.image_size})"
