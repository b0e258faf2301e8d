"""imagen_lib.validation: each check accepts what it should, in the caller's form, and names the argument."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from imagen_lib.validation import (
    ArgumentTypeError,
    check_bool_mask,
    check_embeddings,
    check_field_types,
    check_finite,
    check_images,
    check_int,
    check_number,
    check_seed,
    check_stage,
    check_texts,
    typechecked,
)


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


def test_check_number_allow_inf_still_refuses_nan():
    assert check_number("S_tmax", math.inf, low=0, allow_inf=True) == math.inf
    with pytest.raises(ValueError, match=r"^S_tmax: expected a number >= 0, got nan"):
        check_number("S_tmax", math.nan, low=0, allow_inf=True)
    with pytest.raises(ValueError, match=r"^S_tmax: expected a number >= 0, got -inf"):
        check_number("S_tmax", -math.inf, low=0, allow_inf=True)


def test_check_stage_counts_from_the_end():
    assert check_stage("stage", -1, 3) == 2 and check_stage("stage", 1, 3) == 1
    with pytest.raises(ValueError, match=r"^stop_at_stage: expected a stage index in \[0, 2\], got 3"):
        check_stage("stop_at_stage", 3, 3)
    for bad in (True, 1.0, "1", None):
        with pytest.raises(TypeError, match=r"^stage: expected a stage index"):
            check_stage("stage", bad, 3)


def test_check_texts():
    assert check_texts("texts", ("a", "b")) == ["a", "b"]
    with pytest.raises(TypeError, match=r"^texts: expected a non-empty list of strings, got 'a'"):
        check_texts("texts", "a")
    with pytest.raises(TypeError, match=r"^texts: expected a list of strings, got 3 at index 1"):
        check_texts("texts", ["a", 3])
    with pytest.raises(ValueError, match=r"^texts: .*got an empty one"):
        check_texts("texts", [])


def test_check_embeddings():
    e = torch.zeros(2, 4, 8)
    assert check_embeddings("text_embeds", e, width=8) is e
    with pytest.raises(ValueError, match=r"^text_embeds: expected a non-empty \(B, N, 8\) tensor, got shape \(2, 4, "):
        check_embeddings("text_embeds", torch.zeros(2, 4, 7), width=8)
    with pytest.raises(TypeError, match=r"^text_embeds: expected a float \(B, N, D\) tensor, got dtype torch.int64"):
        check_embeddings("text_embeds", torch.zeros(2, 4, 8, dtype=torch.long))
    e[0, 0, 0] = math.inf
    with pytest.raises(ValueError, match=r"^text_embeds: expected finite values"):
        check_embeddings("text_embeds", e)


def test_typechecked_raises_a_type_error_that_names_the_parameter():
    @typechecked
    def scale(x: torch.Tensor, factor: float = 1.0, seed: Optional[int] = None) -> torch.Tensor:
        return x * factor

    assert scale(torch.ones(1), 2).item() == 2.0  # an int where a float is expected: PEP 484's numeric tower
    with pytest.raises(TypeError, match=r"^seed: .*parameter seed='1' violates type hint") as raised:
        scale(torch.ones(1), seed="1")
    assert isinstance(raised.value, ArgumentTypeError)
    with pytest.raises(ArgumentTypeError, match=r"^x: "):
        scale([1.0])


def test_check_field_types_after_the_classes_own_checks():
    @dataclass
    class Options:
        steps: Optional[int] = None
        names: list = None

    check_field_types(Options(steps=3, names=[]))
    with pytest.raises(ArgumentTypeError, match=r"^steps: expected .*int.*, got '3'"):
        check_field_types(Options(steps="3", names=[]))
