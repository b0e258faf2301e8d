"""Captioned shapes: the built-in text-to-image data set, as the captioned-shapes specification fixes it.

One flat-coloured shape (circle, square or equilateral triangle, apex up) on a flat background, with a
caption that always names the colour and the shape and names each of size, position and background with
probability 0.7. Everything is procedural, so the data set needs no download and is deterministic for a
seed: item ``i`` of ``ShapesDataset(seed=s)`` is the same on every machine.

Rendering is vectorised: a whole batch is rendered at ``supersample`` (4) times the target resolution and
box-filtered down (antialiasing by area coverage), so edges are smooth at every image size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

# ----------------------------------------------------------------------------------------------
# The data set's definition (values fixed by the shapes specification; a reader depends on them)

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 190),
    "orange": (240, 130, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# bounding-box side as a fraction of the image side, before the jitter
SIZES: dict[str, float] = {"small": 0.22, "large": 0.40}
SIZE_JITTER = (0.9, 1.1)
# centre (x, y) as fractions of the width and height, before the jitter
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top": (0.50, 0.25),
    "top right": (0.75, 0.25),
    "left": (0.25, 0.50),
    "center": (0.50, 0.50),
    "right": (0.75, 0.50),
    "bottom left": (0.25, 0.75),
    "bottom": (0.50, 0.75),
    "bottom right": (0.75, 0.75),
}
POSITION_JITTER = 0.03
MENTION_PROB = 0.7
ATTRIBUTE_KEYS: tuple[str, ...] = ("color", "shape", "size", "position", "background")
OPTIONAL_KEYS: tuple[str, ...] = ("size", "position", "background")
_CHOICES: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}

# ----------------------------------------------------------------------------------------------
# Caption grammar: several phrasings per attribute, none of them ambiguous between two values

POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the top left"),
    "top": ("at the top",),
    "top right": ("in the top right corner", "at the top right"),
    "left": ("on the left",),
    "center": ("in the center", "in the middle"),
    "right": ("on the right",),
    "bottom left": ("in the bottom left corner", "at the bottom left"),
    "bottom": ("at the bottom",),
    "bottom right": ("in the bottom right corner", "at the bottom right"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
# "{}" is the background's name; sentence captions use the first group, list captions the second
BACKGROUND_SENTENCE = ("on a {} background", "against a {} background")
BACKGROUND_LIST = ("{} background", "on a {} background")


def vocabulary() -> list[str]:
    """Every word (and the comma) that :func:`make_caption` can write, sorted: the vocabulary of a word-level
    tokenizer for the shapes data (``T5TextEncoder.build_tiny(vocabulary=...)``)."""
    phrases = [*COLORS, *SHAPES, *BACKGROUNDS, *(w for words in SIZE_WORDS.values() for w in words),
               *(p for options in POSITION_PHRASES.values() for p in options),
               *(t.format("") for t in BACKGROUND_SENTENCE + BACKGROUND_LIST), "a an ,"]
    return sorted({word for phrase in phrases for word in phrase.split()})


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def make_caption(attributes: dict[str, Any], rng: np.random.Generator) -> str:
    """Write one caption for ``attributes``, stating exactly the keys in ``attributes["mentioned"]``.

    Two styles, chosen at random: a sentence (``a large red circle in the top left corner on a white
    background``) or a comma list (``green square, on the right, gray background``); the position and
    background phrases come in either order.
    """
    _check_attributes(attributes)
    mentioned = set(attributes["mentioned"])
    noun = f"{attributes['color']} {attributes['shape']}"
    if "size" in mentioned:
        noun = f"{_pick(rng, SIZE_WORDS[attributes['size']])} {noun}"
    sentence = rng.random() < 0.7
    phrases = []
    if "position" in mentioned:
        phrases.append(_pick(rng, POSITION_PHRASES[attributes["position"]]))
    if "background" in mentioned:
        template = _pick(rng, BACKGROUND_SENTENCE if sentence else BACKGROUND_LIST)
        phrases.append(template.format(attributes["background"]))
    if len(phrases) == 2 and rng.random() < 0.3:
        phrases.reverse()
    if sentence:
        return " ".join([f"{_article(noun)} {noun}", *phrases])
    return ", ".join([noun, *phrases])


def random_attributes(rng: np.random.Generator) -> dict[str, Any]:
    """Draw every attribute uniformly and independently, and which optional ones the caption states."""
    attributes: dict[str, Any] = {key: _pick(rng, _CHOICES[key]) for key in ATTRIBUTE_KEYS}
    stated = rng.random(len(OPTIONAL_KEYS)) < MENTION_PROB
    attributes["mentioned"] = ["color", "shape"] + [k for k, s in zip(OPTIONAL_KEYS, stated) if s]
    return attributes


def sample_captions(n: int, seed: int = 0) -> tuple[list[str], list[dict[str, Any]]]:
    """Draw ``n`` captions and their attributes from the grammar (evaluation prompts); no rendering.

    Deterministic for ``seed`` (default 0). Returns ``(texts, attributes)``.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = np.random.default_rng([int(seed), 0x5CA9])  # a stream apart from the data set's items
    return draw_captions(n, rng, random_attributes, make_caption)


def draw_captions(
    n: int, rng: np.random.Generator, draw_attributes: Callable[[np.random.Generator], dict[str, Any]],
    caption: Callable[[dict[str, Any], np.random.Generator], str],
) -> tuple[list[str], list[dict[str, Any]]]:
    """``n`` (caption, attributes) pairs from ``rng``: ``draw_attributes(rng)``, then ``caption(attributes, rng)``,
    in that order for each item (the order fixes every seeded caption set). Returns ``(texts, attributes)``."""
    texts, records = [], []
    for _ in range(n):
        attributes = draw_attributes(rng)
        records.append(attributes)
        texts.append(caption(attributes, rng))
    return texts, records


def _check_attributes(attributes: dict[str, Any]) -> None:
    if not isinstance(attributes, dict):
        raise TypeError(f"attributes must be a dict, got {type(attributes).__name__}")
    for key in ATTRIBUTE_KEYS:
        if attributes.get(key) not in _CHOICES[key]:
            raise ValueError(f"attributes[{key!r}] must be one of {list(_CHOICES[key])}, got {attributes.get(key)!r}")
    for key in attributes.get("mentioned", ()):
        if key not in ATTRIBUTE_KEYS:
            raise ValueError(f"attributes['mentioned'] may only hold {list(ATTRIBUTE_KEYS)}, got {key!r}")


# ----------------------------------------------------------------------------------------------
# Rendering


def _geometry(attributes: Sequence[dict[str, Any]], jitter: np.ndarray | None) -> dict[str, np.ndarray]:
    """Centres, sides, shape ids and colours (float32 arrays) for a batch; ``jitter`` (B, 3) in [0, 1)."""
    for a in attributes:
        _check_attributes(a)
    base = np.array([[*POSITIONS[a["position"]], SIZES[a["size"]]] for a in attributes], dtype=np.float64)
    base = base.reshape(-1, 3)
    if jitter is not None:
        # position +-0.03 on each axis, size times U[0.9, 1.1]
        base[:, :2] += (2.0 * jitter[:, :2] - 1.0) * POSITION_JITTER
        base[:, 2] *= SIZE_JITTER[0] + (SIZE_JITTER[1] - SIZE_JITTER[0]) * jitter[:, 2]
    return {
        "center": base[:, :2].astype(np.float32),
        "side": base[:, 2].astype(np.float32),
        "shape": np.array([SHAPES.index(a["shape"]) for a in attributes], dtype=np.int64),
        "color": np.array([COLORS[a["color"]] for a in attributes], dtype=np.float32).reshape(-1, 3),
        "background": np.array([BACKGROUNDS[a["background"]] for a in attributes], dtype=np.float32).reshape(-1, 3),
    }


def _half_widths(geometry: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Half-width of each shape along horizontal lines at heights ``rows`` (fractions): (B, R).

    All three shapes are convex, so each line crosses a shape in one interval ``cx +- half_width``;
    a negative value means the line misses the shape.
    """
    dy = rows[None, :] - geometry["center"][:, 1, None]  # (B, R)
    half = geometry["side"][:, None] / 2  # (B, 1)
    inside = np.abs(dy) <= half
    circle = np.where(inside, np.sqrt(np.clip(half**2 - dy**2, 0, None)), -1.0)
    square = np.where(inside, half, -1.0)
    # equilateral triangle, apex up: base = side, height = side * sqrt(3)/2, centred in its bounding box;
    # t runs from 0 at the apex to 1 at the base and the half-width grows as t * half
    height = 2 * half * (math.sqrt(3) / 2)
    t = dy / height + 0.5
    triangle = np.where((t >= 0) & (t <= 1), t * half, -1.0)
    kind = geometry["shape"][:, None]
    return np.where(kind == 0, circle, np.where(kind == 1, square, triangle)).astype(np.float32)


def _coverage(geometry: dict[str, np.ndarray], size: int, supersample: int) -> np.ndarray:
    """Fraction of each pixel that the shape covers: (B, size, size) float32 in [0, 1].

    The image is sampled on ``size * supersample`` sub-rows; along each sub-row the shape's interval is
    intersected exactly with every pixel (the limit of infinite horizontal supersampling), then the
    sub-rows are box-filtered down. Exact area coverage up to the vertical sampling, and linear work in
    the number of pixels. numpy rather than torch: single-threaded, so a batch renders in milliseconds
    even when every core is busy training (torch's thread pool stalls badly under contention).
    """
    fine = size * supersample
    rows = (np.arange(fine, dtype=np.float32) + 0.5) / fine
    half_width = _half_widths(geometry, rows)[:, :, None]  # (B, R, 1)
    cx = geometry["center"][:, 0, None, None]
    left = np.arange(size, dtype=np.float32) / size  # (W,) pixel left edges
    overlap = np.minimum(cx + half_width, left + 1 / size) - np.maximum(cx - half_width, left)
    covered = np.clip(overlap * size, 0, 1)  # (B, R, W)
    return covered.reshape(-1, size, supersample, size).mean(2, dtype=np.float32)


def check_render_arguments(
    count: int, image_size: int, supersample: int, jitter: np.ndarray | None, jitter_columns: int,
) -> None:
    """The checks a renderer of ``count`` images makes of its arguments (the pair renderer's too): ``image_size``
    an int >= 4, ``supersample`` a positive int, ``jitter`` None or of shape (count, jitter_columns)."""
    if not isinstance(image_size, int) or image_size < 4:
        raise ValueError(f"image_size must be an int >= 4, got {image_size!r}")
    if not isinstance(supersample, int) or supersample < 1:
        raise ValueError(f"supersample must be a positive int, got {supersample!r}")
    if jitter is not None and np.shape(jitter) != (count, jitter_columns):
        raise ValueError(f"jitter must have shape ({count}, {jitter_columns}), got {np.shape(jitter)}")


def render_batch(
    attributes: Sequence[dict[str, Any]],
    image_size: int = 64,
    *,
    jitter: np.ndarray | None = None,
    supersample: int = 4,
) -> torch.Tensor:
    """Render one image per attribute dict: (B, 3, image_size, image_size) float32 in [-1, 1].

    ``jitter`` is None (the nominal size and cell centre) or an array (B, 3) of uniforms in [0, 1) that
    set the x, y and size jitter. ``supersample`` (default 4) is the antialiasing factor.
    """
    check_render_arguments(len(attributes), image_size, supersample, jitter, jitter_columns=3)
    geometry = _geometry(attributes, jitter)
    coverage = _coverage(geometry, image_size, supersample)[:, None]  # (B, 1, H, W)
    bg = geometry["background"][:, :, None, None] / 127.5 - 1
    fg = geometry["color"][:, :, None, None] / 127.5 - 1
    return torch.from_numpy(bg + coverage * (fg - bg))  # (B, 3, H, W) in [-1, 1]


def render(attributes: dict[str, Any], image_size: int = 64, *, supersample: int = 4) -> torch.Tensor:
    """Render one attribute set at its nominal size and cell centre: (3, H, W) float32 in [-1, 1]."""
    return render_batch([attributes], image_size, supersample=supersample)[0]


# ----------------------------------------------------------------------------------------------
# The data set


def collate_shapes(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Build the Trainer's batch dict: ``images`` (B, 3, H, W) stacked, ``texts`` and ``attributes`` lists."""
    if len(samples) == 0:
        raise ValueError("collate_shapes needs at least one sample")
    return {
        "images": torch.stack([s["images"] for s in samples]),
        "texts": [s["texts"] for s in samples],
        "attributes": [s["attributes"] for s in samples],
    }


class ShapesDataset(Dataset):
    """The captioned shapes data set; items are ``{"images": (3, H, W) in [-1, 1], "texts": str,
    "attributes": dict}``.

    Args:
        image_size: side of the square images in pixels (default 64).
        length: number of items (default 100_000); item ``i`` depends only on ``(seed, i)``.
        seed: the data set's seed (default 0).
        supersample: antialiasing factor of the renderer (default 4).

    Use ``collate_fn`` (``collate_shapes``) with a DataLoader: the data set defines ``__getitems__``, so
    a DataLoader renders each batch in one vectorised call.
    """

    collate_fn = staticmethod(collate_shapes)

    def __init__(self, image_size: int = 64, length: int = 100_000, seed: int = 0, supersample: int = 4):
        if not isinstance(image_size, int) or image_size < 4:
            raise ValueError(f"image_size must be an int >= 4, got {image_size!r}")
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if not isinstance(supersample, int) or supersample < 1:
            raise ValueError(f"supersample must be a positive int, got {supersample!r}")
        self.image_size = image_size
        self.length = length
        self.seed = int(seed)
        self.supersample = supersample

    def __len__(self) -> int:
        return self.length

    def _draw(self, index: int) -> tuple[str, dict[str, Any], np.ndarray]:
        """Caption, attributes and geometry jitter of item ``index``, from its own random stream."""
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} is out of range for a data set of length {self.length}")
        rng = np.random.default_rng([self.seed, int(index) % self.length])
        attributes = random_attributes(rng)
        jitter = rng.random(3)
        return make_caption(attributes, rng), attributes, jitter

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        drawn = [self._draw(int(i)) for i in indices]
        images = self._render([d[1] for d in drawn], np.stack([d[2] for d in drawn]))
        return [{"images": img, "texts": text, "attributes": attrs} for img, (text, attrs, _) in zip(images, drawn)]

    def _render(self, attributes: list[dict[str, Any]], jitter: np.ndarray) -> torch.Tensor:
        """Images of the drawn items in one vectorised call (a subclass draws other scenes)."""
        return render_batch(attributes, self.image_size, jitter=jitter.reshape(-1, 3), supersample=self.supersample)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """The collated batch dict of the given items (what a DataLoader with ``collate_fn`` yields)."""
        return collate_shapes(self.__getitems__(indices))

    def __repr__(self) -> str:
        return f"ShapesDataset(image_size={self.image_size}, length={self.length}, seed={self.seed})"
