"""The shape-pairs judge: find the shapes in an image, read each one, and read the relation between two of them.

Classical image analysis on top of the one-object judge (:mod:`imagen_lib.data.shapes_reader`), so that it
can judge any generator:

1. background: the median of the one-pixel border, named by the nearest background colour;
2. shapes: 8-connected groups of pixels (3 x 3 mean-filtered) that stand out from the background by more than
   half the smallest shape-background colour distance, each at least :data:`MIN_SHAPE_AREA` of the image (a
   small triangle covers 1.7%; specks of noise far less); their number is ``count``;
3. each of the two largest groups is read alone with :func:`~imagen_lib.data.shapes_reader.read_shape`, on a
   copy of the image where everything but the group's 2-pixel neighbourhood is background: colour, shape, the
   bounding-box side (named small or large by the pair sizes) and the centre;
4. the relation of the first object to the second follows from their centres: along the axis where they lie
   farther apart, left of / right of or above / below.

:func:`score_pairs` matches the two readings to the caption's two objects (the assignment that agrees on
more colours, then shapes) and reports per-object, relation and "everything right" accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from imagen_lib.data.shapes import BACKGROUNDS, COLORS
from imagen_lib.data.shapes_pairs import PAIR_SIZES, _check_pair
from imagen_lib.data.shapes_reader import _as_array_batch, _box3, _nearest, read_shape

_BG_NAMES = list(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[n] for n in _BG_NAMES], dtype=np.float64)
# half the smallest distance between a shape colour and a background colour: a pixel at least half covered
_SHAPE_DISTANCE = 0.5 * min(float(np.linalg.norm(np.subtract(c, b))) for c in COLORS.values()
                            for b in BACKGROUNDS.values())
MIN_SHAPE_AREA = 0.006  # share of the image; the smallest shape (a small triangle, side 0.198) covers 0.017
_SIZE_THRESHOLD = math.sqrt(PAIR_SIZES["small"] * PAIR_SIZES["large"])
_NEIGHBOURHOOD = 2  # pixels around a group that belong to its antialiased edge


def _components(mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Labels of the 8-connected groups of ``mask`` and the labels sorted by area, largest first."""
    from kornia.contrib import connected_components

    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int64), []
    height, width = mask.shape
    labels = connected_components(torch.from_numpy(mask).float()[None, None], num_iterations=height + width)
    labels = labels[0, 0].round().long().numpy()
    names, areas = np.unique(labels[labels > 0], return_counts=True)
    order = np.argsort(-areas, kind="stable")
    return labels, [int(names[i]) for i in order if areas[i] >= MIN_SHAPE_AREA * height * width]


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    padded = np.pad(mask, radius)
    height, width = mask.shape
    out = np.zeros_like(mask)
    for i in range(2 * radius + 1):
        for j in range(2 * radius + 1):
            out |= padded[i : i + height, j : j + width]
    return out


def _read_object(pixels: np.ndarray, region: np.ndarray, bg: np.ndarray) -> dict[str, Any]:
    """One group read alone: colour, shape, size (pair sizes) and centre (fractions), None where unreadable."""
    alone = np.where(region[:, :, None], pixels, bg)
    reading = read_shape(alone)
    if reading["measured"] is None:
        return {"color": None, "shape": None, "size": None, "center": None}
    side = reading["measured"]["side"]
    return {"color": reading["color"], "shape": reading["shape"],
            "size": "large" if side > _SIZE_THRESHOLD else "small", "center": reading["measured"]["center"],
            "side": side}


def relation_between(first: Sequence[float], second: Sequence[float]) -> str:
    """Where centre ``first`` lies from centre ``second`` (image fractions, y down): along the axis where they
    lie farther apart, ``left of``/``right of`` or ``above``/``below``."""
    dx, dy = first[0] - second[0], first[1] - second[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def read_pair(pixels: np.ndarray) -> dict[str, Any]:
    """Read one (H, W, 3) image in 0..255: ``{"background", "count", "objects"}``, the objects (at most two,
    the largest groups) in reading order (left to right, or top to bottom when they lie farther apart
    vertically), each ``{color, shape, size, center, side}``."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    bg = np.median(border, axis=0)
    smooth = _box3(pixels)
    labels, groups = _components(np.linalg.norm(smooth - bg, axis=-1) > _SHAPE_DISTANCE)
    objects = [_read_object(pixels, _dilate(labels == g, _NEIGHBOURHOOD), bg) for g in groups[:2]]
    objects = [o for o in objects if o["center"] is not None]
    if len(objects) == 2 and relation_between(objects[0]["center"], objects[1]["center"]) in ("right of", "below"):
        objects.reverse()
    return {"background": _BG_NAMES[_nearest(bg, _BG_RGB)], "count": len(groups), "objects": objects}


def read_pairs(images: Any, value_range: tuple[float, float] = (0.0, 1.0)) -> list[dict[str, Any]]:
    """Read every image (a (B, 3, H, W) or (3, H, W) tensor in ``value_range``, default (0, 1), a PIL image or
    a list of them; the data set's images need ``(-1, 1)``) with :func:`read_pair`."""
    return [read_pair(pixels) for pixels in _as_array_batch(images, value_range)]


def _match(objects: list[dict[str, Any]], wanted: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """The readings assigned to the caption's two objects: the order that agrees on more colours (then
    shapes); a missing reading is None."""
    found = [*objects, None, None][:2]

    def agreement(order: list) -> tuple[int, int]:
        pairs = [(r, w) for r, w in zip(order, wanted) if r is not None]
        return sum(r["color"] == w["color"] for r, w in pairs), sum(r["shape"] == w["shape"] for r, w in pairs)

    swapped = found[::-1]
    return swapped if agreement(swapped) > agreement(found) else found


def judge_pair(reading: dict[str, Any], wanted: dict[str, Any]) -> dict[str, bool]:
    """Per-key verdicts of one reading against the pair attributes its caption asked for: ``color0``,
    ``shape0``, ``color1``, ``shape1``, ``relation``, ``size0``/``size1``/``background`` when mentioned,
    ``everything`` (both colours and shapes and the relation) and ``two_shapes``."""
    _check_pair(wanted)
    matched = _match(reading["objects"], wanted["objects"])
    row: dict[str, bool] = {}
    for i, (got, want) in enumerate(zip(matched, wanted["objects"])):
        row[f"color{i}"] = got is not None and got["color"] == want["color"]
        row[f"shape{i}"] = got is not None and got["shape"] == want["shape"]
        if f"size{i}" in wanted["mentioned"]:
            row[f"size{i}"] = got is not None and got["size"] == want["size"]
    row["relation"] = (None not in matched
                       and relation_between(matched[0]["center"], matched[1]["center"]) == wanted["relation"])
    if "background" in wanted["mentioned"]:
        row["background"] = reading["background"] == wanted["background"]
    row["everything"] = all(row[k] for k in ("color0", "shape0", "color1", "shape1", "relation"))
    row["two_shapes"] = reading["count"] == 2
    return row


SCORE_KEYS: tuple[str, ...] = ("color", "shape", "size", "relation", "background", "everything", "two_shapes",
                               "everything_two_shapes", "relation_given_colors")


def score_pairs(images: Any, attributes: Sequence[dict[str, Any]],
                value_range: tuple[float, float] = (0.0, 1.0)) -> dict[str, Any]:
    """Judge images against the pair attributes their captions asked for.

    ``accuracy``: ``color``, ``shape`` (over the 2n objects), ``size`` (over the objects whose size the caption
    names), ``relation``, ``background`` (where named), ``everything`` (both objects' colour and shape and the
    relation right), ``two_shapes`` (exactly two shapes drawn), ``everything_two_shapes`` (both) and
    ``relation_given_colors`` (the relation among the images with both colours right: whether order binds to
    place, apart from drawing the colours), each a share or None where nothing was asked.
    Returns ``{"n", "accuracy", "readings", "correct"}``.
    """
    readings = read_pairs(images, value_range)
    if len(readings) != len(attributes):
        raise ValueError(f"got {len(readings)} images but {len(attributes)} attribute dicts")
    correct = [judge_pair(r, w) for r, w in zip(readings, attributes)]
    hits = {key: [] for key in SCORE_KEYS}
    for row in correct:
        for key, ok in row.items():
            hits[key.rstrip("01")].append(ok)
        hits["everything_two_shapes"].append(row["everything"] and row["two_shapes"])
        if row["color0"] and row["color1"]:  # binding: where each colour went, once both colours are drawn
            hits["relation_given_colors"].append(row["relation"])
    accuracy = {key: (sum(v) / len(v) if v else None) for key, v in hits.items()}
    return {"n": len(readings), "accuracy": accuracy, "readings": readings, "correct": correct}


def format_pair_report(reports: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of ``score_pairs`` reports, one column per split (``{"seen": report, ...}``)."""
    names = list(reports)
    lines = [f"{'':<22}" + "".join(f"{name:>10}" for name in names)]
    for key in SCORE_KEYS:
        cells = [reports[name]["accuracy"][key] for name in names]
        lines.append(f"{key:<22}" + "".join(f"{'-' if c is None else f'{100 * c:.1f}%':>10}" for c in cells))
    lines.append(f"{'n':<22}" + "".join(f"{reports[name]['n']:>10}" for name in names))
    return "\n".join(lines)
