"""The ``imagen-lib`` command: a dispatcher over the subcommands in :data:`COMMANDS`.

Each subcommand lives in ``imagen_lib/commands/<name>.py`` and exposes ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their command runs (or its ``--help`` is asked for),
so ``imagen-lib --help`` is instant and offline, and a missing optional command does not break the others.

The console script is :func:`entry_point`: an error the user can act on (a bad value, a missing or existing
file; the library's messages name the argument, key or file) is printed as one line with exit status 2.
``--debug`` anywhere on the command line, or ``IMAGEN_LIB_DEBUG=1``, shows the traceback instead.
:func:`main` raises them, for callers in Python.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Optional

import imagen_lib

# name -> (module, one-line help); an explicit table, no discovery by name
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("imagen_lib.commands.train",
              "train a cascade from a YAML/JSON config, write a checkpoint and a sample grid"),
    "sample": ("imagen_lib.commands.sample", "generate images for prompts from a checkpoint"),
    "eval-shapes": ("imagen_lib.commands.eval_shapes", "score a checkpoint on captions of the shapes data set"),
    "precache": ("imagen_lib.commands.precache", "encode captions once with a T5 and store the embeddings"),
    "ema": ("imagen_lib.commands.ema", "post-hoc EMA: reconstruct an EMA length from a run's snapshots, or sweep them"),
}


def _overview() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return (
        "usage: imagen-lib [-h] [--version] COMMAND [ARGS ...]\n\n"
        "Cascaded text-to-image diffusion (Imagen) for research.\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\nRun 'imagen-lib COMMAND --help' for a command's options.\n"
    )


def build_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    """The argument parser of one command and its module (imported now)."""
    module_name, help_ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise SystemExit(f"imagen-lib: the command {name!r} is not available in this installation") from None
    parser = argparse.ArgumentParser(prog=f"imagen-lib {name}", description=help_)
    module.add_arguments(parser)
    return parser, module


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``imagen-lib``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview(), end="")
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"imagen-lib {imagen_lib.__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"imagen-lib: unknown command {name!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    parser, module = build_parser(name)
    args = parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


# what a user can fix from the message alone; anything else keeps its traceback
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def entry_point(argv: Optional[Sequence[str]] = None) -> int:
    """The ``imagen-lib`` console script: :func:`main`, with user errors as one line and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("IMAGEN_LIB_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv)
    except USER_ERRORS as err:
        if debug:
            raise
        command = f" {argv[0]}" if argv and argv[0] in COMMANDS else ""
        print(f"imagen-lib{command}: error: {_one_line(err)}\n(--debug or IMAGEN_LIB_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    """The error's message; one raised in a DataLoader worker arrives wrapped with the worker's traceback
    ("Caught ValueError in DataLoader worker process 0. Original Traceback ..."): its last line is the message."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


if __name__ == "__main__":
    sys.exit(entry_point())
