"""A folder of images with a same-named ``.txt`` caption beside each: ``cat.png`` + ``cat.txt``.

Files that cannot be read or are too small are skipped and counted, never a crash mid-epoch: image headers
and captions are checked when the folder is scanned, and an image that fails to decode later is replaced
by the next good one (with a warning); too many bad files stop with a clear error (``max_bad_share``).
Captions can be replaced by precomputed embeddings from an
:class:`~imagen_lib.data.embeddings.EmbeddingStore` (``imagen-lib precache``), so that training never
loads the text encoder.
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

from imagen_lib.data.bad_samples import BadSample, BadSamples, check_max_bad_share
from imagen_lib.data.collate import collate_image_text
from imagen_lib.data.embeddings import EmbeddingStore, fit_token_length
from imagen_lib.data.transforms import ImageTransform

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def _read_caption(path: Path) -> str:
    """The caption file of an image, UTF-8, stripped; :class:`BadSample` when it cannot be read."""
    try:
        return path.with_suffix(".txt").read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise BadSample("caption not UTF-8", str(error)) from None
    except OSError as error:
        raise BadSample("caption unreadable", f"{type(error).__name__}: {error}") from None


def _check_file(path: Path, min_size: int) -> Optional[str]:
    """Why an image file is left out, or None to keep it. "no caption" and "too small" are the folder's
    rules; a :class:`BadSample` (a header that does not read, a caption that cannot be read) is a bad file."""
    if not path.with_suffix(".txt").is_file():
        return "no caption"
    try:
        with Image.open(path) as image:  # reads the header only
            width, height = image.size
    except Exception as error:  # PIL raises many kinds for a broken file
        raise BadSample("unreadable", f"{type(error).__name__}: {error}") from None
    if min(width, height) < min_size:
        return "too small"
    _read_caption(path)
    return None


def _scan(root: Path, extensions: Sequence[str], min_size: int, bad: BadSamples) -> tuple[list[Path], Counter]:
    """Image files with a readable caption beside them whose header reads and whose shorter side is
    >= min_size; bad files are counted in ``bad`` (with a warning each), the others left out by rule in the
    second value."""
    kept, left_out = [], Counter()
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file()):
        try:
            why = _check_file(path, min_size)
        except BadSample as error:
            bad.record(error, path.relative_to(root).as_posix(), str(path))
            continue
        if why is not None:
            left_out[why] += 1
            continue
        bad.seen += 1
        kept.append(path)
    return kept, left_out


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
        max_bad_share: the share of bad files tolerated (default 0.01); more is a ``ValueError``.
        latents: a :class:`~imagen_lib.data.precache_latents.LatentStore` (or its folder) of every image,
            precached for a latent stage at this ``image_size``; items then carry ``latents`` too. Default None.

    Items: ``{"images": (3, S, S) in [-1, 1], "texts": str, "keys": relative path}`` (or ``text_embeds``
    (N, D) float32 + ``text_mask`` (N,) bool instead of ``texts``). Use ``collate_fn`` with a DataLoader.

    Files left out, counted per reason in ``skipped``: by rule, images without a ``.txt`` beside them ("no
    caption") and smaller than ``min_size`` ("too small"); bad files, with one warning each, images whose
    header does not read ("unreadable") and captions that cannot be read or are not UTF-8. All are found
    when the folder is scanned, so they never take an index and the order of the good files is fixed. An
    image whose header reads but whose pixels do not ("undecodable image", found when it is loaded) is
    replaced by the next good file in index order, deterministically, and never tried again. Bad files
    (found at the scan or later) beyond ``max_bad_share`` of the files stop with a ``ValueError``.
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
        max_bad_share: float = 0.01,
        latents: Union[None, str, Path, Any] = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"root: {self.root} is not a folder")
        self.transform = ImageTransform(image_size, crop=crop, flip=flip)
        self.min_size = image_size // 2 if min_size is None else int(min_size)
        self._bad = BadSamples(f"ImageTextFolder({str(self.root)!r})", check_max_bad_share(max_bad_share))
        self.paths, left_out = _scan(self.root, tuple(e.lower() for e in extensions), self.min_size, self._bad)
        self.skipped = left_out + self._bad.counts
        if self.skipped:
            details = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
            total = sum(self.skipped.values())
            warnings.warn(f"ImageTextFolder: skipped {total} images in {self.root} ({details})", stacklevel=2)
        self._bad.judge()
        if not self.paths:
            raise ValueError(f"root: no usable image with a .txt caption in {self.root}")
        self._failed: set[int] = set()  # indices whose image did not decode
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
        self.latents = None
        if latents is not None:  # a latent stage's precached latents (imagen_lib.data.precache_latents)
            from imagen_lib.data.precache_latents import LatentStore

            self.latents = LatentStore.for_dataset(latents, self.keys, image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def captions(self) -> list[tuple[str, str]]:
        """``(key, caption)`` for every image, in order (what ``precache`` encodes)."""
        return [(key, self.caption(i)) for i, key in enumerate(self.keys)]

    def caption(self, index: int) -> str:
        """The caption of image ``index`` (UTF-8; checked when the folder was scanned)."""
        try:
            return _read_caption(self.paths[index])
        except BadSample as error:
            raise ValueError(f"{self.paths[index].with_suffix('.txt')}: {error}") from None

    def set_epoch(self, epoch: int) -> None:
        """Change the random crops and flips for ``epoch``."""
        self.epoch = int(epoch)

    def _load(self, index: int) -> dict[str, Any]:
        entropy = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(entropy >> 2))
        try:
            with Image.open(self.paths[index]) as image:
                item: dict[str, Any] = {"images": self.transform(image, generator), "keys": self.keys[index]}
        except Exception as error:  # a file that passed the header check but does not decode
            raise BadSample("undecodable image", f"{type(error).__name__}: {error}") from None
        if self.store is None:
            item["texts"] = _read_caption(self.paths[index])
        else:
            embeds, mask = self.store[self.store.index(self.keys[index])]
            item["text_embeds"], item["text_mask"] = fit_token_length(
                embeds.float(), mask, self.token_length or self.store.max_length
            )
        if self.latents is not None:
            item["latents"] = self.latents[self.keys[index]]
        return item

    def _fail(self, index: int, error: BadSample) -> None:
        """Count a file found bad when loaded (once), warn, and judge the share of bad files."""
        self._failed.add(index)
        self.skipped[error.reason] += 1
        self._bad.counts[error.reason] += 1
        warnings.warn(f"ImageTextFolder: skipped {self.paths[index]} ({error}); using the next image", stacklevel=3)
        self._bad.judge()

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} images")
        index %= len(self)
        for attempt in range(len(self)):
            k = (index + attempt) % len(self)
            if k in self._failed:
                continue
            try:
                return self._load(k)
            except BadSample as error:
                self._fail(k, error)
        raise RuntimeError(f"ImageTextFolder: no image in {self.root} could be decoded")

    def __repr__(self) -> str:
        return f"ImageTextFolder({str(self.root)!r}, images={len(self)}, image_size={self.transform.image_size})"
