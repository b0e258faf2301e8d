"""Captioned shape pairs: the two-object mode of the built-in shapes data, for compositional text control.

Two flat-coloured shapes on one flat background, side by side (left / right) or one above the other, with a
caption that names both, in either order, joined by a relation word: ``a red circle to the left of a blue
square``, ``a blue square right of a red circle``, ``a small green triangle above a yellow circle on a black
background``. Colours, shapes, backgrounds and the renderer are those of :mod:`imagen_lib.data.shapes`
(``docs/composition.md`` fixes what an image and its caption mean); the two shapes always differ in colour,
so that the caption says unambiguously which is which.

**The held-out split.** The two slots of an image are ordered: the left one before the right one, the upper one
before the lower one. The ordered colour pairs of :data:`HELDOUT_COLOR_PAIRS` (the first colour in the first
slot) never occur in ``split="train"``; ``split="heldout"`` draws only them. Their reverses are in training, so
a held-out caption asks for a pair the model has seen, in an arrangement it has never seen: the failure to
bind order to place shows there. Everything else (shapes, sizes, backgrounds, caption order, relation) is drawn
as in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from imagen_lib.data.shapes import (
    BACKGROUND_SENTENCE,
    BACKGROUNDS,
    COLORS,
    SHAPES,
    SIZE_JITTER,
    SIZE_WORDS,
    ShapesDataset,
    _coverage,
    check_render_arguments,
    draw_captions,
)
from imagen_lib.data.shapes import vocabulary as single_vocabulary
from imagen_lib.validation import check_int, check_number

# ----------------------------------------------------------------------------------------------
# The data set's definition (a reader depends on these values)

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
# bounding-box side as a fraction of the image side, before the jitter: smaller than the one-object set's
# (0.22 / 0.40) so that two large shapes side by side never touch
PAIR_SIZES: dict[str, float] = {"small": 0.22, "large": 0.36}
# the two slots' centres along the relation's axis, and the jitter of every centre coordinate
SLOT_CENTERS: tuple[float, float] = (0.26, 0.74)
PAIR_POSITION_JITTER = 0.02
# relation -> (axis: 0 horizontal, 1 vertical; slot of the first-named object)
RELATIONS: dict[str, tuple[int, int]] = {"left of": (0, 0), "right of": (0, 1), "above": (1, 0), "below": (1, 1)}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below",),
}
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# (colour in the first slot, colour in the second slot) never drawn for training: each colour once first and
# once second; 6 of the 30 ordered pairs; every reverse is in training
HELDOUT_COLOR_PAIRS: frozenset[tuple[str, str]] = frozenset(
    (COLOR_NAMES[i], COLOR_NAMES[(i + 1) % len(COLOR_NAMES)]) for i in range(len(COLOR_NAMES))
)
SPLITS: tuple[str, ...] = ("train", "heldout")
PAIR_MENTION_PROB = 0.5  # each object's size and the background are named with this probability
OBJECT_KEYS: tuple[str, ...] = ("color", "shape", "size")


def _ordered_pairs(split: str) -> list[tuple[str, str]]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    pairs = [(a, b) for a in COLOR_NAMES for b in COLOR_NAMES if a != b]
    return [p for p in pairs if (p in HELDOUT_COLOR_PAIRS) == (split == "heldout")]


def slot_colors(attributes: dict[str, Any]) -> tuple[str, str]:
    """(colour in the first slot, colour in the second) of a pair's attributes: the combination that decides
    its split (left before right, top before bottom)."""
    first, second = (o["color"] for o in attributes["objects"])
    return (first, second) if RELATIONS[attributes["relation"]][1] == 0 else (second, first)


def is_heldout(attributes: dict[str, Any]) -> bool:
    """Whether a pair's slot colours are a held-out combination (:data:`HELDOUT_COLOR_PAIRS`)."""
    return slot_colors(attributes) in HELDOUT_COLOR_PAIRS


def pair_vocabulary() -> list[str]:
    """Every word of the one-object captions and of the pair captions, sorted: the vocabulary of a word-level
    tokenizer that reads both (``text_encoder: {vocabulary: shape_pairs}``)."""
    phrases = [*single_vocabulary(), *(p for options in RELATION_PHRASES.values() for p in options)]
    return sorted({word for phrase in phrases for word in phrase.split()})


# ----------------------------------------------------------------------------------------------
# Attributes and captions


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def random_pair_attributes(rng: np.random.Generator, split: str = "train") -> dict[str, Any]:
    """Draw one pair: ``{"objects": [first named, second named] (each ``{color, shape, size}``), "relation",
    "background", "mentioned"}``; ``mentioned`` lists ``"size0"``, ``"size1"`` and ``"background"`` when the
    caption states them (colours, shapes and the relation are always stated)."""
    slot_pair = _pick(rng, _ordered_pairs(split))
    relation = _pick(rng, tuple(RELATIONS))
    first_slot = RELATIONS[relation][1]
    colors = slot_pair if first_slot == 0 else slot_pair[::-1]
    objects = [{"color": c, "shape": _pick(rng, SHAPES), "size": _pick(rng, tuple(PAIR_SIZES))} for c in colors]
    stated = rng.random(3) < PAIR_MENTION_PROB
    mentioned = [k for k, s in zip(("size0", "size1", "background"), stated) if s]
    return {"objects": objects, "relation": relation, "background": _pick(rng, tuple(BACKGROUNDS)),
            "mentioned": mentioned}


def turned_around(attributes: dict[str, Any]) -> dict[str, Any]:
    """The same pair described from the other object: "a red circle left of a blue square" becomes "a blue
    square right of a red circle" (objects swapped, the inverse relation, sizes stated as before). The image,
    and so the split, is unchanged."""
    swap = {"size0": "size1", "size1": "size0"}
    return {**attributes, "relation": INVERSE_RELATION[attributes["relation"]],
            "objects": attributes["objects"][::-1], "mentioned": [swap.get(m, m) for m in attributes["mentioned"]]}


def prefer_first_slot_first(attributes: dict[str, Any], share: float, rng: np.random.Generator) -> dict[str, Any]:
    """Turn captions around so that a share ``share`` of them names the left / top object first (0.5, as
    drawn: unchanged, no random number drawn). Above 0.5 a caption that names the right / bottom object first
    is turned around with probability ``2 share - 1``; below, one that names the left / top object first,
    with probability ``1 - 2 share``."""
    if share == 0.5:
        return attributes
    first_slot_first = RELATIONS[attributes["relation"]][1] == 0
    if first_slot_first == (share > 0.5):
        return attributes
    return turned_around(attributes) if rng.random() < abs(2 * share - 1) else attributes


def _noun(obj: dict[str, Any], with_size: bool, rng: np.random.Generator) -> str:
    noun = f"{obj['color']} {obj['shape']}"
    if with_size:
        noun = f"{_pick(rng, SIZE_WORDS[obj['size']])} {noun}"
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def make_pair_caption(attributes: dict[str, Any], rng: np.random.Generator) -> str:
    """``a [size] COLOUR SHAPE RELATION a [size] COLOUR SHAPE [on a BACKGROUND background]``, stating exactly
    what ``attributes["mentioned"]`` lists."""
    _check_pair(attributes)
    mentioned = set(attributes["mentioned"])
    first, second = attributes["objects"]
    words = [_noun(first, "size0" in mentioned, rng), _pick(rng, RELATION_PHRASES[attributes["relation"]]),
             _noun(second, "size1" in mentioned, rng)]
    if "background" in mentioned:
        words.append(_pick(rng, BACKGROUND_SENTENCE).format(attributes["background"]))
    return " ".join(words)


def sample_pair_captions(n: int, seed: int = 0, split: str = "heldout") -> tuple[list[str], list[dict[str, Any]]]:
    """Draw ``n`` pair captions and their attributes from ``split`` (``"train"``: seen combinations,
    ``"heldout"``, the default) for evaluation; no rendering. Deterministic for ``(seed, split)``.

    Returns ``(texts, attributes)``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([int(seed), 0x9A125, SPLITS.index(split)])
    return draw_captions(n, rng, lambda r: random_pair_attributes(r, split), make_pair_caption)


def _check_pair(attributes: dict[str, Any]) -> None:
    if not isinstance(attributes, dict):
        raise TypeError(f"attributes must be a dict, got {type(attributes).__name__}")
    objects = attributes.get("objects")
    if not isinstance(objects, (list, tuple)) or len(objects) != 2:
        raise ValueError(f"attributes['objects'] must be a list of two object dicts, got {objects!r}")
    choices = {"color": COLOR_NAMES, "shape": SHAPES, "size": tuple(PAIR_SIZES)}
    for i, obj in enumerate(objects):
        for key, options in choices.items():
            if not isinstance(obj, dict) or obj.get(key) not in options:
                raise ValueError(f"attributes['objects'][{i}][{key!r}] must be one of {list(options)}, got {obj!r}")
    if objects[0]["color"] == objects[1]["color"]:
        raise ValueError(f"attributes['objects']: the two colours must differ, got {objects[0]['color']!r} twice")
    if attributes.get("relation") not in RELATIONS:
        raise ValueError(f"attributes['relation'] must be one of {list(RELATIONS)}, got {attributes.get('relation')!r}")
    if attributes.get("background") not in BACKGROUNDS:
        raise ValueError(f"attributes['background'] must be one of {list(BACKGROUNDS)}, "
                         f"got {attributes.get('background')!r}")


# ----------------------------------------------------------------------------------------------
# Rendering


def _object_geometry(attributes: Sequence[dict[str, Any]], index: int, jitter: np.ndarray | None) -> dict:
    """Centres, sides, shape ids and colours of object ``index`` (0: first named) of each pair: the geometry
    dict of :func:`imagen_lib.data.shapes._coverage`. ``jitter`` (B, 6) in [0, 1): x, y, size of each slot."""
    centers, sides = [], []
    for row, a in enumerate(attributes):
        axis, first_slot = RELATIONS[a["relation"]]
        slot = first_slot if index == 0 else 1 - first_slot
        center = [0.5, 0.5]
        center[axis] = SLOT_CENTERS[slot]
        side = PAIR_SIZES[a["objects"][index]["size"]]
        if jitter is not None:
            x, y, s = jitter[row, 3 * slot : 3 * slot + 3]
            center = [center[0] + (2 * x - 1) * PAIR_POSITION_JITTER, center[1] + (2 * y - 1) * PAIR_POSITION_JITTER]
            side *= SIZE_JITTER[0] + (SIZE_JITTER[1] - SIZE_JITTER[0]) * s
        centers.append(center)
        sides.append(side)
    objects = [a["objects"][index] for a in attributes]
    return {
        "center": np.array(centers, dtype=np.float32).reshape(-1, 2),
        "side": np.array(sides, dtype=np.float32),
        "shape": np.array([SHAPES.index(o["shape"]) for o in objects], dtype=np.int64),
        "color": np.array([COLORS[o["color"]] for o in objects], dtype=np.float32).reshape(-1, 3),
    }


def render_pairs(
    attributes: Sequence[dict[str, Any]],
    image_size: int = 64,
    *,
    jitter: np.ndarray | None = None,
    supersample: int = 4,
) -> torch.Tensor:
    """Render one image per pair: (B, 3, image_size, image_size) float32 in [-1, 1].

    ``jitter`` is None (nominal slot centres and sizes) or (B, 6) uniforms in [0, 1): x, y and size jitter of
    the first slot, then of the second. ``supersample`` (default 4) is the antialiasing factor.
    """
    check_render_arguments(len(attributes), image_size, supersample, jitter, jitter_columns=6)
    for a in attributes:
        _check_pair(a)
    background = np.array([BACKGROUNDS[a["background"]] for a in attributes], dtype=np.float32).reshape(-1, 3)
    image = np.broadcast_to(background[:, :, None, None] / 127.5 - 1, (len(attributes), 3, image_size, image_size))
    for index in (0, 1):  # the shapes never overlap, so the order of compositing does not matter
        geometry = _object_geometry(attributes, index, jitter)
        coverage = _coverage(geometry, image_size, supersample)[:, None]
        image = image + coverage * (geometry["color"][:, :, None, None] / 127.5 - 1 - image)
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))


# ----------------------------------------------------------------------------------------------
# The data set


def first_slot_first_schedule(value: Any) -> float | list[float]:
    """``first_slot_first`` checked: one share in [0, 1], or a non-empty list of them (one per epoch)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("first_slot_first: expected a share in [0, 1] or a non-empty list of them (one per "
                             "epoch), got an empty list")
        return [check_number(f"first_slot_first[{i}]", v, low=0.0, high=1.0) for i, v in enumerate(value)]
    return check_number("first_slot_first", value, low=0.0, high=1.0)


class ShapePairsDataset(ShapesDataset):
    """Captioned shape pairs; items are ``{"images": (3, H, W) in [-1, 1], "texts": str, "attributes": dict}``
    (the attributes of :func:`random_pair_attributes`). Loading, collating and batching are the one-object data
    set's; the drawing and the scenes are its own.

    Args:
        image_size: side of the square images in pixels (default 64).
        length: number of items (default 100_000); item ``i`` depends only on ``(seed, split, i)``.
        seed: the data set's seed (default 0).
        supersample: antialiasing factor of the renderer (default 4).
        split: ``"train"`` (default: never a held-out colour combination) or ``"heldout"`` (only those).
        first_slot_first: share of the captions that name the left / top object first (default 0.5: either
            order alike), or one share per epoch (a list; the last holds for every later epoch, so
            ``[1.0, 0.75]`` with ``length`` = 1,500 batches names the left / top object first for the first
            1,500 steps, then three times in four). The images, and so the held-out split, do not change,
            only which object a caption names first. Above 0.5 the order of the words and the place agree more
            often than not, which is what lets a small base learn to bind them (at 0.5 no base bound order to
            place within 8,000 steps; docs/composition.md).

    The epoch comes from :meth:`set_epoch`, which the Trainer's data order calls as each epoch starts (and,
    on resuming, for the epochs before), so a resumed run draws the captions an uninterrupted one would.
    """

    def __init__(self, image_size: int = 64, length: int = 100_000, seed: int = 0, supersample: int = 4,
                 split: Literal["train", "heldout"] = "train", first_slot_first: float | Sequence[float] = 0.5):
        for name, value, low in (("image_size", image_size, 4), ("length", length, 1), ("supersample", supersample, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.image_size, self.length, self.seed = image_size, length, int(seed)
        self.supersample, self.split = supersample, split
        self.first_slot_first = first_slot_first_schedule(first_slot_first)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next items belong to (it picks the share of ``first_slot_first``)."""
        self.epoch = check_int("epoch", epoch, low=0)

    @property
    def share(self) -> float:
        """This epoch's share of captions naming the left / top object first."""
        schedule = self.first_slot_first
        return schedule if isinstance(schedule, float) else schedule[min(self.epoch, len(schedule) - 1)]

    def _draw(self, index: int) -> tuple[str, dict[str, Any], np.ndarray]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} is out of range for a data set of length {self.length}")
        key = [self.seed, SPLITS.index(self.split), int(index) % self.length]
        rng = np.random.default_rng(key)
        # the order's coin from a generator of its own: the scene (jitter, wording) is the same at any share
        coin = np.random.default_rng([*key, 1])
        attributes = prefer_first_slot_first(random_pair_attributes(rng, self.split), self.share, coin)
        jitter = rng.random(6)
        return make_pair_caption(attributes, rng), attributes, jitter

    def _render(self, attributes: list[dict[str, Any]], jitter: np.ndarray) -> torch.Tensor:
        return render_pairs(attributes, self.image_size, jitter=jitter.reshape(-1, 6), supersample=self.supersample)

    def __repr__(self) -> str:
        return (f"ShapePairsDataset(image_size={self.image_size}, length={self.length}, seed={self.seed}, "
                f"split={self.split!r}, first_slot_first={self.first_slot_first})")
