"""Image preprocessing for training: resize the shorter side, crop to a square, optional flip, to [-1, 1].

Resizing is antialiased (``torch.nn.functional.interpolate(..., antialias=True)``), so that downscaling a
large photo to a 64 px stage does not alias.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

ImageInput = Union[Image.Image, np.ndarray, Tensor]


def to_rgb(image: Image.Image) -> Image.Image:
    """A PIL image in mode RGB (a new image): an alpha channel is composited onto white."""
    if image.mode in ("RGBA", "LA", "P") and (image.mode != "P" or "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def to_tensor(image: ImageInput) -> Tensor:
    """A PIL image, an (H, W, C) uint8 array or a (C, H, W) tensor in [0, 1] as (3, H, W) float32 in [0, 1].

    Grey images are repeated to three channels and an alpha channel is composited onto white.
    """
    if isinstance(image, Image.Image):
        image = np.array(to_rgb(image))  # a writable copy
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image: a numpy image must be uint8 (H, W, C), got {image.dtype}")
        image = torch.from_numpy(np.ascontiguousarray(image))
        image = image[..., None] if image.ndim == 2 else image
        image = image.permute(2, 0, 1).float() / 255.0
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError("image: expected a PIL image, an (H, W, C) uint8 array or a (C, H, W) tensor, C in {1, 3}")
    return image.float().expand(3, -1, -1).contiguous()


class ImageTransform:
    """Resize the shorter side to ``image_size`` (antialiased), crop a square, maybe flip, map to [-1, 1].

    Args:
        image_size: side of the output square in pixels.
        crop: ``"center"`` (default) or ``"random"`` (a random offset along the longer side).
        flip: flip horizontally with probability 0.5 (default False: captions may say "left"/"right").
        interpolation: ``"bicubic"`` (default) or ``"bilinear"``, both antialiased when downscaling.

    ``transform(image, generator=None)`` returns (3, image_size, image_size) float32 in [-1, 1]; the random
    crop and flip draw from ``generator`` (a ``torch.Generator``) when given.
    """

    def __init__(
        self,
        image_size: int,
        crop: Literal["center", "random"] = "center",
        flip: bool = False,
        interpolation: Literal["bicubic", "bilinear"] = "bicubic",
    ):
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size: expected a positive int, got {image_size!r}")
        if crop not in ("center", "random"):
            raise ValueError(f"crop: expected 'center' or 'random', got {crop!r}")
        if interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation: expected 'bicubic' or 'bilinear', got {interpolation!r}")
        self.image_size, self.crop, self.flip, self.interpolation = image_size, crop, bool(flip), interpolation

    def resize(self, image: Tensor) -> Tensor:
        """(3, H, W) -> (3, H', W') with min(H', W') == image_size and the aspect ratio kept."""
        _, height, width = image.shape
        scale = self.image_size / min(height, width)
        size = (max(self.image_size, round(height * scale)), max(self.image_size, round(width * scale)))
        if size == (height, width):
            return image
        out = F.interpolate(image[None], size=size, mode=self.interpolation, antialias=True, align_corners=False)
        return out[0].clamp(0, 1)  # bicubic overshoots a little at sharp edges

    def __call__(self, image: ImageInput, generator: Optional[torch.Generator] = None) -> Tensor:
        image = self.resize(to_tensor(image))
        _, height, width = image.shape
        spare_y, spare_x = height - self.image_size, width - self.image_size
        if self.crop == "random":
            top = int(torch.randint(spare_y + 1, (), generator=generator))
            left = int(torch.randint(spare_x + 1, (), generator=generator))
        else:
            top, left = spare_y // 2, spare_x // 2
        image = image[:, top : top + self.image_size, left : left + self.image_size]
        if self.flip and bool(torch.rand((), generator=generator) < 0.5):
            image = image.flip(-1)
        return image * 2 - 1

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_size={self.image_size}, crop={self.crop!r}, flip={self.flip}, "
            f"interpolation={self.interpolation!r})"
        )
