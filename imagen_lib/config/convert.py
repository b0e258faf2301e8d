"""Checked conversion between plain values (YAML, JSON) and the configuration dataclasses.

:func:`from_dict` builds a dataclass from a mapping: the allowed keys are the dataclass's fields, each value
is checked against the field's type hint (leaf values by beartype), and nested dataclasses, lists and unions
convert recursively.
:func:`check_arguments` does the same for the keyword arguments of a class that is configured by its
constructor (a diffusion process, :class:`~imagen_lib.diffusion.noise_augment.NoiseAugmentation`).
:func:`to_dict` is the inverse: plain JSON values, so ``from_dict(cls, to_dict(x)) == x``.

Every error is a :class:`ConfigError` that starts with the dotted key (``stages.1.diffusion.config.P_mean``),
then says what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

from beartype import BeartypeConf
from beartype.door import is_bearable

from imagen_lib.config import nemo


class ConfigError(ValueError):
    """A configuration value that does not fit its schema; the message starts with its dotted key."""


def dotted(where: str, key: Any) -> str:
    """``where.key`` (just ``key`` at the top level)."""
    return f"{where}.{key}" if where else str(key)


# ---------------------------------------------------------------------------------------------------------
# values against type hints
# ---------------------------------------------------------------------------------------------------------


def describe(hint: Any) -> str:
    """A type hint in words, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        plural = {bool: "true/false values", int: "ints", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0], describe(args[0]))}" if args else "a list"
    if origin in (dict, Mapping) or hint is dict:
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return f"a mapping with some of the keys {field_names(hint)}"
    names = {bool: "true or false", int: "an int", float: "a number", str: "a string", Path: "a path"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


# beartype checks leaf values against their hints; the numeric tower lets a YAML ``1`` stand for a float
_LEAF_CHECK = BeartypeConf(is_pep484_tower=True)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a leaf value (not a container or block) fits ``hint``. YAML's true/false are Python ints, but
    a config never means a number by them; a path is written as a string."""
    if isinstance(value, bool) and hint in (int, float):
        return False
    if hint is Path:
        return isinstance(value, str)
    return is_bearable(value, hint, conf=_LEAF_CHECK)


def check_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the type hint ``hint`` (mappings of dataclass fields become dataclasses)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        return _check_union(value, args, where)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        return _check_items(value, hint, where)
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if not _fits(value, hint):
        raise ConfigError(f"{where}: expected {describe(hint)}, got {value!r}")
    return value


def _check_union(value: Any, args: tuple, where: str) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where}: expected {describe(Union[args])}, got null")
    tagged = [a for a in args if dataclasses.is_dataclass(a) and "type" in field_names(a)]
    if len(tagged) > 1 and isinstance(value, dict):
        return _check_tagged(value, tagged, where)
    for arg in args:
        if arg is type(None):
            continue
        try:
            return check_value(value, arg, where)
        except ConfigError as error:
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                raise error  # a mapping meant for this block: its own error says more than "expected ..."
    raise ConfigError(f"{where}: expected {describe(Union[args])}, got {value!r}")


def _check_tagged(value: dict, classes: list, where: str) -> Any:
    """A union of blocks told apart by their ``type`` field (``data: {type: folder, ...}``)."""
    kinds = {cls.__dataclass_fields__["type"].default: cls for cls in classes}
    kind = value.get("type", next(iter(kinds)))
    if kind not in kinds:
        raise ConfigError(f"{dotted(where, 'type')}: expected one of {list(kinds)}, got {kind!r}")
    return from_dict(kinds[kind], value, where)


def _check_items(value: Any, hint: Any, where: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected {describe(hint)}, got {value!r}")
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis or len(args) == 1:
        items = [check_value(v, args[0], dotted(where, i)) for i, v in enumerate(value)]
    elif args:  # tuple[X, Y]
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} items, got {value!r}")
        items = [check_value(v, a, dotted(where, i)) for i, (v, a) in enumerate(zip(value, args))]
    else:
        items = list(value)
    return tuple(items) if typing.get_origin(hint) is tuple or hint is tuple else items


# ---------------------------------------------------------------------------------------------------------
# mappings against dataclasses and constructors
# ---------------------------------------------------------------------------------------------------------


def field_names(cls: type) -> list[str]:
    """The keys a block of dataclass ``cls`` may hold."""
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _check_keys(data: Any, allowed: list[str], required: list[str], block: str, where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping with some of the keys {allowed}, got {data!r}")
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{dotted(where, key)}: unknown key{nemo.hint(block, key)}; expected one of {allowed}")
    for key in required:
        if key not in data:
            raise ConfigError(f"{dotted(where, key)}: missing")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """``cls(**data)`` for a dataclass ``cls``, every key and value checked first; errors raised by ``cls``
    itself (its ``__post_init__``) are prefixed with ``where``."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    _check_keys(data, list(fields), required, cls.__name__, where)
    hints = typing.get_type_hints(cls)
    kwargs = {key: check_value(value, hints[key], dotted(where, key)) for key, value in data.items()}
    return _construct(cls, kwargs, list(fields), where)


def check_arguments(target: Callable, data: Any, where: str, skip: Sequence[str] = ()) -> dict:
    """``data`` checked as keyword arguments of ``target`` (a class: its constructor): the keys are its
    parameters (less ``skip``), the values are checked against their type hints. Returns the checked dict."""
    init = target.__init__ if isinstance(target, type) else target
    params = {name: p for name, p in inspect.signature(init).parameters.items()
              if name not in skip and name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty]
    _check_keys(data, list(params), required, getattr(target, "__name__", ""), where)
    hints = typing.get_type_hints(init)
    return {key: check_value(value, hints.get(key, Any), dotted(where, key)) for key, value in data.items()}


def _construct(cls: type, kwargs: dict, names: list[str], where: str) -> Any:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        message = str(error)
        if re.split(r"[.:]", message, maxsplit=1)[0] in names:  # "steps: ..." names one of the block's keys
            raise ConfigError(dotted(where, message)) from error
        raise ConfigError(f"{where or 'config'}: {message}") from error


def to_dict(value: Any) -> Any:
    """Plain JSON values of a configuration (dataclasses become mappings, tuples lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_dict(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [to_dict(v) for v in value]
    if isinstance(value, dict):
        return {k: to_dict(v) for k, v in value.items()}
    return value
