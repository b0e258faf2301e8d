"""Argument checks at the library's boundary: every public entry point checks what it is given once, with these,
so a bad value fails with an error that names the argument and says what was expected (issue 23).

Each check returns the value in the form the caller uses (a plain ``int``/``float``, a tensor), so a call
site reads ``lr = check_number("lr", lr, low=0, low_open=True)``. Errors are ``TypeError`` for a value of the
wrong kind and ``ValueError`` for one of the right kind out of range; both name the argument first
(``"lr: expected a finite number > 0, got -1"``).

Types are checked by beartype: :func:`typechecked` decorates a public function, :func:`check_field_types` checks a
dataclass's fields after its own checks; a violation is an :class:`ArgumentTypeError`, a ``TypeError`` whose
message starts with the argument's name too.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import typing
from collections.abc import Sequence
from typing import Any, Callable, Optional, TypeVar

import torch
from beartype import BeartypeConf, beartype
from beartype.door import is_bearable
from torch import Tensor

__all__ = [
    "ArgumentTypeError", "check_bool_mask", "check_embeddings", "check_field_types", "check_finite", "check_images",
    "check_int", "check_number", "check_seed", "check_stage", "check_texts", "typechecked",
]

_SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a signed 64-bit value


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__} {text[:57]}..."


def _bound_text(low, high, low_open, high_open) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def check_int(name: str, value: Any, *, low: Optional[int] = None, high: Optional[int] = None,
              optional: bool = False) -> Optional[int]:
    """``value`` as an ``int`` (an integral float such as ``1e3`` is accepted; bools and ``2.7`` are not),
    within ``[low, high]``; None passes when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected an int, got {_describe(value)}")
    if not isinstance(value, numbers.Integral):
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"{name}: expected a whole number, got {_describe(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}: expected an int {_bound_text(low, high, False, False)}, got {value}")
    return value


def check_number(name: str, value: Any, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, optional: bool = False,
                 allow_inf: bool = False) -> Optional[float]:
    """``value`` as a finite ``float`` within the bounds (``low_open``/``high_open``: the bound itself is
    excluded); None passes when ``optional``, an infinite value when ``allow_inf`` (NaN never). A 0-d tensor
    counts as a number."""
    if value is None and optional:
        return None
    if isinstance(value, Tensor) and value.ndim == 0 and not value.dtype == torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {_describe(value)}")
    value = float(value)
    bounds = _bound_text(low, high, low_open, high_open)
    expected = f"{'a number' if allow_inf else 'a finite number'}{' ' + bounds if bounds else ''}"
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name}: expected {expected}, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ValueError(f"{name}: expected {expected}, got {value}")
    return value


def check_seed(name: str, value: Any, *, optional: bool = False) -> Optional[int]:
    """A random seed: an int in ``[0, 2**63)`` (what ``torch.Generator.manual_seed`` takes)."""
    return check_int(name, value, low=0, high=_SEED_LIMIT - 1, optional=optional)


def check_finite(name: str, tensor: Tensor) -> Tensor:
    """``tensor`` unchanged when every value is finite (integer and bool tensors always are)."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(tensor).__name__}")
    if tensor.is_floating_point() or tensor.is_complex():
        bad = ~torch.isfinite(tensor.detach())
        if bool(bad.any()):
            raise ValueError(f"{name}: expected finite values, got {int(bad.sum())} NaN or infinite value(s) "
                             f"of {tensor.numel()}")
    return tensor


def check_images(name: str, images: Any, *, channels: Optional[int] = None, value_range: tuple[float, float] = (0, 1),
                 tolerance: float = 0.01) -> Tensor:
    """A batch of images: a floating (B, C, H, W) tensor with ``channels`` channels (None: any), at least one
    image, finite values within ``value_range`` (plus ``tolerance``). The message names the range a value
    outside points to (``[0, 255]``: 8-bit pixels; ``[0, 1]`` given where ``[-1, 1]`` is expected is not
    detectable and passes)."""
    low, high = value_range
    shape = f"(B, {channels if channels is not None else 'C'}, H, W)"
    if not isinstance(images, Tensor):
        raise TypeError(f"{name}: expected a {shape} tensor in [{low:g}, {high:g}], got {type(images).__name__}")
    if images.ndim != 4 or (channels is not None and images.shape[1] != channels) or 0 in images.shape:
        raise ValueError(f"{name}: expected a non-empty {shape} tensor in [{low:g}, {high:g}], got shape "
                         f"{tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor in [{low:g}, {high:g}], got {images.dtype} "
                        f"(8-bit pixels? divide by 255{' and map to [-1, 1]' if low < 0 else ''})")
    # one pass and one read-back (a device sync on a GPU): a NaN or infinite value makes the min or max one
    lo, hi = torch.stack(torch.aminmax(images.detach())).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        check_finite(name, images)  # raises, counting the bad values
    if lo < low - tolerance or hi > high + tolerance:
        hint = " (8-bit pixels? divide by 255)" if hi > 2 else ""
        raise ValueError(f"{name}: expected values in [{low:g}, {high:g}], got values in [{lo:.3g}, {hi:.3g}]{hint}")
    return images


def check_bool_mask(name: str, mask: Any, *, ndims: tuple[int, ...], meaning: str = "") -> Tensor:
    """A bool tensor with one of ``ndims`` dimensions (``meaning`` ends the message, e.g. "True = keep")."""
    dims = " or ".join(map(str, ndims))
    text = f"{name}: expected a bool tensor with {dims} dimensions{', ' + meaning if meaning else ''}"
    if not isinstance(mask, Tensor):
        raise TypeError(f"{text}; got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{text}; got dtype {mask.dtype}")
    if mask.ndim not in ndims or 0 in mask.shape:
        raise ValueError(f"{text}; got shape {tuple(mask.shape)}")
    return mask


def check_stage(name: str, value: Any, count: int) -> int:
    """A stage index of a cascade of ``count`` stages (negative ones count from the end), as ``0..count-1``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a stage index in [0, {count - 1}], got {_describe(value)}")
    if not -count <= value < count:
        raise ValueError(f"{name}: expected a stage index in [0, {count - 1}], got {value!r}")
    return int(value) % count


def check_texts(name: str, texts: Any) -> list[str]:
    """A non-empty list (or other sequence) of strings, as a list."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"{name}: expected a non-empty list of strings, got {_describe(texts)}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}: expected a list of strings, got {_describe(text)} at index {i}")
    if len(texts) == 0:
        raise ValueError(f"{name}: expected a non-empty list of strings, got an empty one")
    return list(texts)


def check_embeddings(name: str, embeds: Any, *, width: Optional[int] = None) -> Tensor:
    """Token embeddings: a non-empty floating (B, N, ``width``) tensor with finite values."""
    shape = f"(B, N, {width if width is not None else 'D'})"
    if not isinstance(embeds, Tensor):
        raise TypeError(f"{name}: expected a float {shape} tensor, got {type(embeds).__name__}")
    if not embeds.is_floating_point():
        raise TypeError(f"{name}: expected a float {shape} tensor, got dtype {embeds.dtype}")
    if embeds.ndim != 3 or 0 in embeds.shape or (width is not None and embeds.shape[-1] != width):
        raise ValueError(f"{name}: expected a non-empty {shape} tensor, got shape {tuple(embeds.shape)}")
    return check_finite(name, embeds)


# ---------------------------------------------------------------------------------------------------------
# types, by beartype
# ---------------------------------------------------------------------------------------------------------


class ArgumentTypeError(TypeError):
    """An argument whose type does not fit the hint of a :func:`typechecked` function (or a field of
    :func:`check_field_types`); its message starts with the argument's name, as every check's here does."""

    def __init__(self, message: str = "", *args: Any, **kwargs: Any):  # beartype adds culprits=...
        found = re.search(r"parameter (\w+)=", message)
        super().__init__(f"{found.group(1)}: {message}" if found else message)


# a violation raises ArgumentTypeError; an int is accepted where a float is expected (PEP 484's numeric tower)
_TYPE_CHECKS = BeartypeConf(violation_param_type=ArgumentTypeError, is_pep484_tower=True)

F = TypeVar("F", bound=Callable)


def typechecked(func: F) -> F:
    """``func`` with its arguments checked against its type hints by beartype on every call; a violation is an
    :class:`ArgumentTypeError` (a ``TypeError``) that names the parameter."""
    return beartype(conf=_TYPE_CHECKS)(func)


def check_field_types(obj: Any) -> None:
    """Every field of the dataclass instance ``obj`` checked against its type hint (beartype), after the
    class's own checks (whose messages say more) have run."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not is_bearable(value, hints[f.name], conf=_TYPE_CHECKS):
            raise ArgumentTypeError(f"{f.name}: expected {hints[f.name]}, got {_describe(value)}")
