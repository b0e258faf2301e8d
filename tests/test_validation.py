"""imagen_lib.validation: each check accepts what it should, in the caller's form, and names the argument."""

from __future__ import annotations

import math

import pytest
import torch

from imagen_lib.validation import check_bool_mask, check_finite, check_images, check_int, check_number, check_seed


@pytest.mark.parametrize("value, expected", [(3, 3), (3.0, 3), (1e3, 1000), (torch.tensor(5).item(), 5)])
def test_check_int_accepts_whole_numbers(value, expected):
    out = check_int("steps", value, low=0)
    assert out == expected and type(out) is int


@pytest.mark.parametrize("value, error, words", [
    (2.7, ValueError, "whole number"), (True, TypeError, "an int"), ("3", TypeError, "an int"),
    (-1, ValueError, ">= 0"), (math.nan, ValueError, "whole number"), (None, TypeError, "an int"),
])
def test_check_int_refuses(value, error, words):
    with pytest.raises(error, match=f"^steps: .*{words}"):
        check_int("steps", value, low=0)


def test_check_number_bounds_and_finiteness():
    assert check_number("lr", 1e-4, low=0, low_open=True) == 1e-4
    assert check_number("lr", torch.tensor(0.5), low=0) == 0.5
    assert check_number("x", None, optional=True) is None
    for bad in (0, -1, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"^lr: expected a finite number > 0"):
            check_number("lr", bad, low=0, low_open=True)
    with pytest.raises(ValueError, match=r"^beta: expected a finite number >= 0 and < 1, got 2.0"):
        check_number("beta", 2, low=0, high=1, high_open=True)
    with pytest.raises(TypeError, match="^lr: expected a number"):
        check_number("lr", "0.1")


def test_check_seed_range():
    assert check_seed("seed", 2**63 - 1) == 2**63 - 1
    with pytest.raises(ValueError, match="^seed: expected an int >= 0 and <= "):
        check_seed("seed", 2**70)


def test_check_finite_counts_bad_values():
    t = torch.zeros(4)
    assert check_finite("x", t) is t
    t[1], t[3] = math.nan, math.inf
    with pytest.raises(ValueError, match=r"^x: expected finite values, got 2 NaN or infinite value\(s\) of 4"):
        check_finite("x", t)
    check_finite("ints", torch.arange(3))


def test_check_images_shape_range_and_hints():
    good = torch.rand(2, 3, 8, 8)
    assert check_images("images", good, channels=3) is good
    with pytest.raises(ValueError, match=r"^images: expected a non-empty \(B, 3, H, W\) tensor"):
        check_images("images", torch.rand(3, 8, 8), channels=3)
    with pytest.raises(ValueError, match=r"8-bit pixels\? divide by 255"):
        check_images("images", good * 255)
    with pytest.raises(TypeError, match=r"got torch.uint8"):
        check_images("images", (good * 255).to(torch.uint8))
    nan = good.clone()
    nan[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"^images: expected finite values, got 1 NaN"):
        check_images("images", nan)
    with pytest.raises(ValueError, match=r"in \[-1, 1\], got values in"):
        check_images("images", good * 3 - 1, value_range=(-1, 1))
    with pytest.raises(ValueError, match=r"non-empty"):
        check_images("images", torch.rand(0, 3, 8, 8))


def test_check_bool_mask():
    m = torch.ones(8, 8, dtype=torch.bool)
    assert check_bool_mask("masks", m, ndims=(2, 3, 4)) is m
    with pytest.raises(TypeError, match=r"^masks: expected a bool tensor .*True = keep; got dtype torch.float32"):
        check_bool_mask("masks", m.float(), ndims=(2, 3, 4), meaning="True = keep")
    with pytest.raises(ValueError, match=r"got shape \(1, 1, 1, 8, 8\)"):
        check_bool_mask("masks", m[None, None, None], ndims=(2, 3, 4))
