"""Limits that keep the package readable (issue 20): no module over 600 lines, no function over 60 lines,
no public callable with more than 12 parameters (a config dataclass or a settings object takes the rest)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "imagen_lib"
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_PUBLIC_PARAMETERS = 600, 60, 12


def _sources() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE.parent)): ast.parse(p.read_text(encoding="utf-8"))
            for p in sorted(PACKAGE.rglob("*.py"))}


def _functions(tree: ast.Module):
    """(qualified name, node) of every function and method, nested ones included."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{prefix}{child.name}", child
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
    yield from walk(tree, "")


def _parameters(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return [n for n in names if n not in ("self", "cls")]


def _is_public(qualname: str) -> bool:
    return not any(part.startswith("_") and part != "__init__" for part in qualname.split("."))


def _long_functions() -> dict[str, int]:
    return {f"{path}:{name}": fn.end_lineno - fn.lineno + 1
            for path, tree in _sources().items() for name, fn in _functions(tree)
            if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES}


def _wide_signatures() -> dict[str, int]:
    return {f"{path}:{name}": len(_parameters(fn))
            for path, tree in _sources().items() if "/commands/" not in path
            for name, fn in _functions(tree) if _is_public(name) and len(_parameters(fn)) > MAX_PUBLIC_PARAMETERS}


def test_no_module_is_too_long():
    long = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        lines = len(p.read_text(encoding="utf-8").splitlines())
        if lines > MAX_FILE_LINES:
            long[str(p.relative_to(PACKAGE.parent))] = lines
    assert not long, f"modules over {MAX_FILE_LINES} lines: {long}"


def test_no_function_is_too_long():
    long = _long_functions()
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_public_signature_takes_too_many_parameters():
    wide = _wide_signatures()
    assert not wide, f"public callables with more than {MAX_PUBLIC_PARAMETERS} parameters: {wide}"
