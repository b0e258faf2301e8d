"""The layering of docs/architecture.md, held for every module of the package.

Each module belongs to exactly one layer (the table below, longest prefix wins; a module that matches none
fails the test, so a new module must be placed). A module imports only from its own layer or from layers
below it, counting imports inside functions too; layers of the same rank are siblings that never import
each other (networks never see diffusion maths and the reverse). Package ``__init__`` files only re-export,
so they are exempt from the direction rule but not from the cycle rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "imagen_lib"

# module prefix -> (rank, layer); lower ranks never import higher ones
LAYERS: dict[str, tuple[int, str]] = {
    "imagen_lib.images": (0, "foundation"),
    "imagen_lib.checkpoint": (0, "foundation"),
    "imagen_lib.protocols": (0, "foundation"),
    "imagen_lib.validation": (0, "foundation"),
    "imagen_lib.nn": (1, "networks"),
    "imagen_lib.diffusion": (1, "maths"),
    "imagen_lib.text": (1, "text"),
    "imagen_lib.text_clip": (1, "text"),
    "imagen_lib.text_common": (1, "text"),
    "imagen_lib.latent": (1, "autoencoders"),
    "imagen_lib.data": (2, "data"),
    "imagen_lib.cascade": (3, "cascade"),
    "imagen_lib.cascade_checkpoint": (3, "cascade"),
    "imagen_lib.cascade_latent": (3, "cascade"),
    "imagen_lib.cascade_stage": (3, "cascade"),
    "imagen_lib.sampling_options": (3, "cascade"),
    "imagen_lib.training": (4, "trainer"),
    "imagen_lib.config": (5, "configuration"),
    "imagen_lib.training.loop": (6, "training loop"),
    "imagen_lib.training.parallel": (6, "training loop"),
    "imagen_lib.cli": (7, "front ends"),
    "imagen_lib.commands": (7, "front ends"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> tuple[int, str] | None:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def _imports(path: Path, known: set[str]) -> set[str]:
    """Library modules ``path`` imports anywhere in its body (``from pkg import submodule`` included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in known}


def test_every_module_has_a_layer():
    unplaced = [name for name in _modules() if name != "imagen_lib" and _layer(name) is None]
    assert not unplaced, f"modules with no layer in tests/test_layers.py: {unplaced}"


@pytest.mark.parametrize("module", [m for m in _modules() if m != "imagen_lib"])
def test_imports_go_downwards(module):
    modules = _modules()
    path = modules[module]
    if path.name == "__init__.py":
        pytest.skip("package __init__ files only re-export")
    rank, layer = _layer(module)
    for imported in _imports(path, set(modules)) - {"imagen_lib"}:
        their_rank, their_layer = _layer(imported)
        assert their_rank < rank or their_layer == layer, (
            f"{module} ({layer}) imports {imported} ({their_layer}): imports go down the layers only")


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(p, set(modules)) - {m, "imagen_lib"} for m, p in modules.items()}
    # a package's __init__ is imported before any of its submodules: an edge from a submodule to its own
    # package is how Python resolves it, not a cycle
    for m in graph:
        graph[m] = {d for d in graph[m] if not m.startswith(d + ".")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
