"""Reading configuration files and applying ``--set key=value`` overrides; both work on plain dicts, which
:func:`imagen_lib.config.schema.parse_config` then checks."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import yaml


class _Loader(yaml.SafeLoader):
    """YAML with ``1e-4`` read as a number (YAML 1.1 wants ``1.0e-4``, a common surprise in configs)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML (or JSON) text, with ``1e-4`` read as a float."""
    return yaml.load(text, Loader=_Loader)


def load_config(path: Union[str, Path]) -> dict:
    """Read a YAML or JSON configuration file (YAML is a superset of JSON) as a dict."""
    text = Path(path).read_text(encoding="utf-8")
    config = json.loads(text) if str(path).endswith(".json") else parse_yaml(text)
    if not isinstance(config, dict):
        raise ValueError(f"config: {path!s} does not hold a mapping")
    return config


def apply_overrides(config: dict, assignments: Sequence[str]) -> dict:
    """A copy of ``config`` with ``key.sub.0.name=value`` assignments applied (values parsed as YAML)."""
    config = copy.deepcopy(config)
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"--set: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ValueError(f"--set: empty key in {item!r}")
        node = config
        for i, part in enumerate(parts[:-1]):
            node = _child(node, part, parts[i + 1], item)
        _assign(node, parts[-1], parse_yaml(raw), item)
    return config


def _child(node: Any, part: str, next_part: str, item: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, item)]
    if not isinstance(node, dict):
        raise ValueError(f"--set {item!r}: {part!r} is inside a value that is not a mapping or list")
    if node.get(part) is None:
        node[part] = [] if next_part.isdigit() else {}
    return node[part]


def _index(node: list, part: str, item: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ValueError(f"--set {item!r}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)


def _assign(node: Any, part: str, value: Any, item: str) -> None:
    if isinstance(node, list):
        node[_index(node, part, item)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise ValueError(f"--set {item!r}: cannot set {part!r} inside a {type(node).__name__}")
