"""Grids, PIL conversion and PNG files."""

import numpy as np
import pytest
import torch
from PIL import Image

from imagen_lib.images import captioned_grid, make_grid, save_png, to_pil


def test_make_grid_places_every_image_and_pads_the_last_row():
    images = torch.rand(10, 3, 8, 8)
    grid = make_grid(images, nrow=4, padding=2, pad_value=-5.0)
    assert grid.shape == (3, 3 * 10 + 2, 4 * 10 + 2)
    for k in range(10):
        row, col = divmod(k, 4)
        top, left = 2 + row * 10, 2 + col * 10
        assert torch.equal(grid[:, top : top + 8, left : left + 8], images[k])
    assert (grid[:, 22:30, 22:] == -5.0).all()  # the two empty cells of the last row
    assert (grid[:, :2] == -5.0).all() and (grid[:, :, -2:] == -5.0).all()


def test_make_grid_rejects_bad_shapes():
    with pytest.raises(ValueError, match="images must be"):
        make_grid(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="nrow"):
        make_grid(torch.rand(2, 3, 8, 8), nrow=0)


def test_to_pil_maps_the_value_range():
    image = torch.rand(3, 5, 7)
    expected = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(np.asarray(to_pil(image)), expected)
    assert np.array_equal(np.asarray(to_pil(image * 2 - 1, value_range=(-1, 1))), expected)
    assert to_pil(torch.full((3, 2, 2), 7.0)).getpixel((0, 0)) == (255, 255, 255)  # clamped
    with pytest.raises(ValueError, match="image must be"):
        to_pil(torch.rand(4, 5, 5))


def test_captioned_grid_keeps_pixels_and_writes_wrapped_captions():
    images = torch.zeros(3, 3, 32, 32)
    images[:, 0] = 1.0  # red squares
    captions = ["short", "a much longer caption that has to be wrapped over several lines of text", "x"]
    sheet = captioned_grid(images, captions, nrow=3, cell_size=128)
    array = np.asarray(sheet)
    # images are enlarged 4x (nearest) and pasted unchanged
    assert (array[4 : 4 + 128, 4 : 4 + 128] == [255, 0, 0]).all()
    below = array[4 + 128 :, :]

    def text_rows(column: int) -> int:
        left = 4 + column * (128 + 4)
        dark = (below[:, left : left + 128] < 128).all(-1).any(1)
        return int(np.flatnonzero(dark).max()) if dark.any() else -1

    assert text_rows(0) > 0, "the caption is drawn under its image"
    assert text_rows(1) > text_rows(0) + 10, "a long caption wraps onto more lines"
    with pytest.raises(ValueError, match="captions"):
        captioned_grid(images, captions[:2])


def test_save_png_round_trips_locally_and_on_fsspec(tmp_path):
    image = torch.rand(3, 6, 9)
    path = save_png(tmp_path / "deep" / "a.png", image)
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(to_pil(image)))
    import fsspec

    save_png("memory://imgs/b.png", to_pil(image))
    with fsspec.open("memory://imgs/b.png", "rb") as handle:
        assert np.array_equal(np.asarray(Image.open(handle)), np.asarray(to_pil(image)))
    batch = save_png(tmp_path / "grid.png", torch.rand(4, 3, 8, 8))
    assert Image.open(batch).size == (4 * 10 + 2, 10 + 2)
