"""Image helpers at the public boundary: tensors to PIL, grids, captioned grids, PNG files on any fsspec URL.

Tensors given to these functions are in [0, 1] unless ``value_range`` says otherwise (the data sets' images
are in [-1, 1]: pass ``value_range=(-1, 1)``).
"""

from __future__ import annotations

import io
import math
import posixpath
import textwrap
from collections.abc import Sequence
from typing import Union

import fsspec
import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont

ImageLike = Union[torch.Tensor, np.ndarray, Image.Image]


def _check_range(value_range: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(v) for v in value_range)
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range!r}")
    return low, high


def to_unit(images: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Map ``images`` from ``value_range`` (default (0, 1)) to [0, 1], clamped, as float32 on the CPU."""
    low, high = _check_range(value_range)
    return ((images.detach().float().cpu() - low) / (high - low)).clamp(0, 1)


def to_pil(image: ImageLike, value_range: tuple[float, float] = (0.0, 1.0)) -> Image.Image:
    """One image to an RGB PIL image: a (3, H, W) or (1, H, W) tensor in ``value_range`` (default (0, 1)),
    a (H, W, 3) uint8 array, or a PIL image (returned converted to RGB)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"a numpy image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        return Image.fromarray(image, "RGB")
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
        shape = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
        raise ValueError(f"image must be a (3, H, W) or (1, H, W) tensor, got {shape}")
    unit = to_unit(image, value_range).expand(3, -1, -1)
    array = (rearrange(unit, "c h w -> h w c") * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array, "RGB")


def make_grid(
    images: torch.Tensor | Sequence[torch.Tensor],
    nrow: int = 8,
    *,
    padding: int = 2,
    pad_value: float = 1.0,
) -> torch.Tensor:
    """Tile (B, C, H, W) images into one (C, H', W') image, ``nrow`` images per row (default 8).

    ``padding`` pixels (default 2) of ``pad_value`` (default 1.0) separate the cells; the last row is
    filled with padding when B is not a multiple of ``nrow``. Values are left as they are.
    """
    if not isinstance(images, torch.Tensor):
        images = torch.stack(list(images))
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive int, got {nrow!r}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    count = images.shape[0]
    cols = min(nrow, max(count, 1))
    rows = math.ceil(count / cols)
    blank = images.new_full((rows * cols - count, *images.shape[1:]), pad_value)
    cells = torch.cat([images, blank])
    cells = torch.nn.functional.pad(cells, (padding, 0, padding, 0), value=pad_value)
    grid = rearrange(cells, "(r c) ch h w -> ch (r h) (c w)", r=rows, c=cols)
    return torch.nn.functional.pad(grid, (0, padding, 0, padding), value=pad_value)


def captioned_grid(
    images: torch.Tensor | Sequence[ImageLike],
    captions: Sequence[str],
    nrow: int = 8,
    *,
    value_range: tuple[float, float] = (0.0, 1.0),
    cell_size: int | None = None,
    font_size: int = 11,
    max_lines: int = 4,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """A grid of images, each with its caption written (wrapped) beneath it, as a PIL image.

    Args:
        images: (B, 3, H, W) tensor in ``value_range`` (default (0, 1)), or a list of images ``to_pil`` takes.
        captions: one caption per image.
        nrow: images per row (default 8).
        cell_size: width of each cell in pixels; small images are enlarged (nearest neighbour, integer
            factor) to about this size. Default: the image size, but at least 128 so captions fit.
        font_size: size of PIL's default font (default 11).
        max_lines: caption lines kept per image (default 4); longer captions end with "...".
    """
    pils = [to_pil(img, value_range) for img in images]
    if len(pils) != len(captions):
        raise ValueError(f"got {len(pils)} images but {len(captions)} captions")
    if not pils:
        raise ValueError("captioned_grid needs at least one image")
    width = max(p.width for p in pils)
    target = cell_size if cell_size is not None else max(width, 128)
    scale = max(1, round(target / width))
    cell_w = width * scale
    cell_h = max(p.height for p in pils) * scale
    font = ImageFont.load_default(size=font_size)
    line_h = font_size + 3
    chars = max(8, int(cell_w / (0.55 * font_size)))  # the default font is about 0.55 em wide per char
    text_h = line_h * max_lines + 4
    cols = min(nrow, len(pils))
    rows = math.ceil(len(pils) / cols)
    pad = 4
    sheet = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (cell_h + text_h + pad) + pad), background)
    draw = ImageDraw.Draw(sheet)
    for k, (pil, caption) in enumerate(zip(pils, captions)):
        x = pad + (k % cols) * (cell_w + pad)
        y = pad + (k // cols) * (cell_h + text_h + pad)
        sheet.paste(pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST), (x, y))
        lines = textwrap.wrap(caption, width=chars) or [""]
        if len(lines) > max_lines:
            lines = lines[:max_lines]
            lines[-1] = lines[-1][: max(0, chars - 3)] + "..."
        for j, line in enumerate(lines):
            draw.text((x, y + cell_h + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    return sheet


def save_png(path: str, image: Image.Image | torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> str:
    """Write ``image`` (PIL, or a (3, H, W) / (B, 3, H, W) tensor in ``value_range``, a batch as a grid) as
    a PNG to a local path or any fsspec URL; parent folders are created. Returns ``path``."""
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        image = make_grid(to_unit(image, value_range), nrow=8)
        value_range = (0.0, 1.0)
    pil = image if isinstance(image, Image.Image) else to_pil(image, value_range)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    fs, fs_path = fsspec.core.url_to_fs(str(path))
    parent = posixpath.dirname(fs_path)  # fsspec paths are '/'-separated on every file system
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(fs_path, "wb") as handle:
        handle.write(buffer.getvalue())
    return str(path)
