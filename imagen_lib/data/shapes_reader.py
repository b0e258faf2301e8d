"""The captioned-shapes judge: read colour, shape, size, position and background back from pixels.

Classical image analysis, no learning, so that it can judge any generator:

1. background: the median of the one-pixel border, named by the nearest background colour;
2. shape colour: the pixels farthest from the background (the shape's interior), their median named by
   the nearest shape colour;
3. coverage: each pixel's fraction of shape, ``alpha``, from its projection on the line background ->
   shape colour (antialiased edges count in proportion), restricted to the main blob so that specks of
   noise elsewhere do not move the measurements;
4. the number of shapes drawn: separate groups of mostly-covered pixels at least a fifth the size of the
   largest (the data set draws exactly one; a generator may draw two);
5. geometry from the moments of ``alpha``, which blurring and antialiasing leave almost unchanged:
   a triangle (apex up) is the only shape whose vertical profile is skewed (skewness -0.57 against 0);
   a square is told from a circle by its kurtosis along the diagonal against along the axes (2.4
   against 1.8 for a square, 2.0 both ways for a disc); the bounding-box side follows from the area and
   the shape, and the bounding-box centre from the centroid (a triangle's centroid sits a sixth of its
   height below the box centre).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from imagen_lib.data.shapes import ATTRIBUTE_KEYS, BACKGROUNDS, COLORS, POSITIONS, SIZES

_BG_NAMES = list(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[n] for n in _BG_NAMES], dtype=np.float64)
_FG_NAMES = list(COLORS)
_FG_RGB = np.array([COLORS[n] for n in _FG_NAMES], dtype=np.float64)
# a pixel this far (RGB, 0..255) from the background may be shape; every shape colour is > 80 from every
# background colour
_CANDIDATE_DISTANCE = 40.0
_ALPHA_FLOOR = 0.05  # coverage below this is treated as noise
_SIZE_THRESHOLD = math.sqrt(SIZES["small"] * SIZES["large"])  # 0.297: geometric midpoint of the classes
_TRIANGLE_SKEW = -0.3  # triangles read about -0.57, circles and squares 0
_MIN_BLOB_SHARE = 0.2  # a small shape has a fifth of a large one's area; specks of noise far less
_SQUARE_KURTOSIS_GAP = 0.3  # squares read about +0.6, circles 0


def _as_array_batch(images: Any, value_range: tuple[float, float]) -> list[np.ndarray]:
    """Images as a list of (H, W, 3) float64 arrays in 0..255."""
    low, high = (float(v) for v in value_range)
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range!r}")
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) or (3, H, W), got shape {tuple(images.shape)}")
        unit = ((images.detach().double().cpu() - low) / (high - low)).clamp(0, 1)
        return list(unit.permute(0, 2, 3, 1).numpy() * 255.0)
    if isinstance(images, Image.Image):
        images = [images]
    out = []
    for image in images:
        if isinstance(image, Image.Image):
            out.append(np.asarray(image.convert("RGB"), dtype=np.float64))
        elif isinstance(image, torch.Tensor):
            out.extend(_as_array_batch(image, value_range))
        else:
            raise TypeError(f"images must be a tensor, a PIL image or a list of them, got {type(image).__name__}")
    return out


def _nearest(rgb: np.ndarray, palette: np.ndarray) -> int:
    return int(np.argmin(((palette - rgb) ** 2).sum(-1)))


def _main_run(profile: np.ndarray) -> slice:
    """The contiguous run of non-zero entries carrying the most mass, widened by one entry each side."""
    on = profile > 0
    best, best_mass, start = slice(0, 0), 0.0, None
    for i, flag in enumerate(np.append(on, False)):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            mass = float(profile[start:i].sum())
            if mass > best_mass:
                best, best_mass = slice(start, i), mass
            start = None
    return slice(max(best.start - 1, 0), min(best.stop + 1, len(profile)))


def _box3(pixels: np.ndarray) -> np.ndarray:
    """3 x 3 mean filter with replicated edges: (H, W, C) -> (H, W, C)."""
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    height, width = pixels.shape[:2]
    return sum(padded[i : i + height, j : j + width] for i in range(3) for j in range(3)) / 9.0


def _coverage(
    pixels: np.ndarray, smooth: np.ndarray, bg: np.ndarray
) -> tuple[np.ndarray, tuple[int, int], np.ndarray] | None:
    """(alpha cropped to the main blob, the crop's (top, left) corner, shape colour), or None when
    nothing stands out from the background.

    The blob and its colour are found on ``smooth``, the 3 x 3 mean-filtered copy, where pixel noise is a
    third as strong and the shape's interior is unchanged; coverage is then measured on the original pixels.
    """
    distance = np.linalg.norm(smooth - bg, axis=-1)
    candidates = distance > _CANDIDATE_DISTANCE
    if not candidates.any():
        return None
    # the interior: candidates at least 60% as far from the background as the far end of the blob
    far = np.quantile(distance[candidates], 0.9)
    fg = np.median(smooth[candidates & (distance >= 0.6 * far)], axis=0)
    direction = fg - bg
    scale = direction @ direction  # > 0: every candidate is more than 40 from the background
    # the blob: pixels mostly covered in the filtered copy, in the main run of rows and of columns
    core = ((smooth - bg) @ direction) / scale > 0.5
    rows, cols = _main_run(core.sum(1).astype(float)), _main_run(core.sum(0).astype(float))
    core, pixels = core[rows, cols], pixels[rows, cols]
    if not core.any():
        return None
    # the colour again, from the original pixels: filtering mixes a small shape's interior with its edge
    inside = pixels[core]
    depth = (inside - bg) @ direction
    fg = np.median(inside[depth >= np.median(depth)], axis=0)
    direction = fg - bg
    alpha = np.clip(((pixels - bg) @ direction) / (direction @ direction), 0.0, 1.0)
    # keep the blob's 3 x 3 neighbourhood, where the antialiased edge lives; the rest is background
    padded = np.pad(core, 1)
    near = np.zeros_like(core)
    for i in range(3):
        for j in range(3):
            near |= padded[i : i + core.shape[0], j : j + core.shape[1]]
    alpha = np.where(near & (alpha >= _ALPHA_FLOOR), alpha, 0.0)
    return alpha, (rows.start, cols.start), fg


def _count_shapes(smooth: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> int:
    """Number of 8-connected groups of mostly-covered pixels (3 x 3 filtered, as for the blob) with at least
    ``_MIN_BLOB_SHARE`` of the largest group's area; smaller groups are specks, not shapes."""
    from kornia.contrib import connected_components

    direction = fg - bg
    core = ((smooth - bg) @ direction) / (direction @ direction) > 0.5
    if not core.any():
        return 0
    height, width = core.shape
    mask = torch.from_numpy(core).float()[None, None]
    labels = connected_components(mask, num_iterations=height + width)  # enough to cross any group
    _, areas = torch.unique(labels[labels > 0], return_counts=True)
    return int((areas >= _MIN_BLOB_SHARE * areas.max()).sum())


def _moments(alpha: np.ndarray, corner: tuple[int, int]) -> dict[str, float]:
    """Area, centroid, skewness of the vertical profile and the kurtosis gap diagonal - axis, in pixels.

    The pixel grid box-blurs the shape; its own cumulants (variance 1/12 along an axis and along a
    diagonal; fourth cumulant -1/120 and -1/240) are removed, since cumulants of a blur add.
    """
    height, width = alpha.shape
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    ys, xs = ys + corner[0], xs + corner[1]
    area = alpha.sum()
    cx, cy = (alpha * xs).sum() / area, (alpha * ys).sum() / area
    dx, dy = xs - cx, ys - cy

    def cumulants(u: np.ndarray) -> tuple[float, float, float]:
        k2 = (alpha * u**2).sum() / area
        k3 = (alpha * u**3).sum() / area
        k4 = (alpha * u**4).sum() / area - 3 * k2**2
        return k2, k3, k4

    ax2, _, ax4 = cumulants(dx)
    ay2, ay3, ay4 = cumulants(dy)
    d1 = cumulants((dx + dy) / math.sqrt(2))
    d2 = cumulants((dx - dy) / math.sqrt(2))
    axis2, axis4 = (ax2 + ay2) / 2 - 1 / 12, (ax4 + ay4) / 2 + 1 / 120
    diag2, diag4 = (d1[0] + d2[0]) / 2 - 1 / 12, (d1[2] + d2[2]) / 2 + 1 / 240
    y2 = max(ay2 - 1 / 12, 1e-6)
    return {
        "area": float(area),
        "cx": float(cx),
        "cy": float(cy),
        "skew_y": float(ay3 / y2**1.5),
        "kurtosis_gap": float(diag4 / max(diag2, 1e-6) ** 2 - axis4 / max(axis2, 1e-6) ** 2),
    }


def _cell(x: float, y: float) -> str:
    """Name of the 3 x 3 cell whose nominal centre is nearest (x, y), fractions of the image side."""
    return min(POSITIONS, key=lambda n: (POSITIONS[n][0] - x) ** 2 + (POSITIONS[n][1] - y) ** 2)


def read_shape(pixels: np.ndarray) -> dict[str, Any]:
    """Read one (H, W, 3) image in 0..255; the values are names, or None where no shape was found, plus
    the measurements (``side``, ``center``, ``skew_y``, ``kurtosis_gap``) under ``"measured"``."""
    height, width, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    bg = np.median(border, axis=0)
    reading: dict[str, Any] = dict.fromkeys(ATTRIBUTE_KEYS)
    reading["background"] = _BG_NAMES[_nearest(bg, _BG_RGB)]
    reading["count"] = 0
    smooth = _box3(pixels)
    found = _coverage(pixels, smooth, bg)
    if found is None or found[0].sum() < 1.0:
        reading["measured"] = None
        return reading
    alpha, corner, fg = found
    reading["count"] = _count_shapes(smooth, bg, fg)
    m = _moments(alpha, corner)
    if m["skew_y"] < _TRIANGLE_SKEW:
        shape, box_per_sqrt_area = "triangle", math.sqrt(4 / math.sqrt(3))  # area = sqrt(3)/4 side^2
    elif m["kurtosis_gap"] > _SQUARE_KURTOSIS_GAP:
        shape, box_per_sqrt_area = "square", 1.0
    else:
        shape, box_per_sqrt_area = "circle", math.sqrt(4 / math.pi)
    side = box_per_sqrt_area * math.sqrt(m["area"]) / width
    cx, cy = m["cx"] / width, m["cy"] / height
    if shape == "triangle":
        cy -= side * (math.sqrt(3) / 2) / 6  # centroid is a sixth of the height below the box centre
    reading.update(
        color=_FG_NAMES[_nearest(fg, _FG_RGB)],
        shape=shape,
        size="large" if side > _SIZE_THRESHOLD else "small",
        position=_cell(cx, cy),
    )
    reading["measured"] = {"side": side, "center": (cx, cy), "skew_y": m["skew_y"], "kurtosis_gap": m["kurtosis_gap"]}
    return reading


def read_shapes(images: Any, value_range: tuple[float, float] = (0.0, 1.0)) -> list[dict[str, Any]]:
    """Read every image: a (B, 3, H, W) or (3, H, W) tensor in ``value_range`` (default (0, 1), what
    ``Cascade.sample`` returns; the data set's images need ``(-1, 1)``), a PIL image or a list of them.

    Returns one dict per image with the keys color, shape, size, position, background (names, None
    where no shape stands out from the background; the attributes are those of the largest shape),
    "count" (shapes drawn) and "measured".
    """
    return [read_shape(pixels) for pixels in _as_array_batch(images, value_range)]


def score_shapes(
    images: Any,
    attributes: Sequence[dict[str, Any]],
    value_range: tuple[float, float] = (0.0, 1.0),
) -> dict[str, Any]:
    """Judge images against the attributes their captions asked for.

    For each attribute, the accuracy is taken over the images whose caption mentions it (``"mentioned"``;
    an attribute dict without that key counts every attribute as mentioned); ``all_correct`` is the share
    of images with every mentioned attribute right, as the data set's task asks; ``one_shape`` the share
    with exactly one shape drawn (every caption asks for one), and ``all_correct_one_shape`` the share with
    both. Returns ``{"n", "accuracy": {key: float or None}, "mentioned": {key: count}, "all_correct",
    "one_shape", "all_correct_one_shape", "readings", "correct"}`` (``correct`` per image, per key).
    """
    readings = read_shapes(images, value_range)
    if len(readings) != len(attributes):
        raise ValueError(f"got {len(readings)} images but {len(attributes)} attribute dicts")
    hits = {key: 0 for key in ATTRIBUTE_KEYS}
    counts = {key: 0 for key in ATTRIBUTE_KEYS}
    all_right, single, both, correct = 0, 0, 0, []
    for reading, wanted in zip(readings, attributes):
        mentioned = wanted.get("mentioned", ATTRIBUTE_KEYS)
        row = {key: reading[key] == wanted[key] for key in mentioned}
        for key, ok in row.items():
            counts[key] += 1
            hits[key] += int(ok)
        right, one = all(row.values()), reading["count"] == 1
        all_right, single, both = all_right + right, single + one, both + (right and one)
        correct.append(row)
    n = len(readings)
    return {
        "n": n,
        "accuracy": {k: (hits[k] / counts[k] if counts[k] else None) for k in ATTRIBUTE_KEYS},
        "mentioned": counts,
        "all_correct": all_right / n if n else None,
        "one_shape": single / n if n else None,
        "all_correct_one_shape": both / n if n else None,
        "readings": readings,
        "correct": correct,
    }


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of a ``score_shapes`` report."""
    lines = [f"{'attribute':<12}{'accuracy':>10}{'mentioned':>11}"]
    for key in ATTRIBUTE_KEYS:
        acc = report["accuracy"][key]
        lines.append(f"{key:<12}{'-' if acc is None else f'{100 * acc:.1f}%':>10}{report['mentioned'][key]:>11}")
    for name, key in (("all", "all_correct"), ("one shape", "one_shape"), ("all + one", "all_correct_one_shape")):
        value = report.get(key)
        lines.append(f"{name:<12}{'-' if value is None else f'{100 * value:.1f}%':>10}{report['n']:>11}")
    return "\n".join(lines)
