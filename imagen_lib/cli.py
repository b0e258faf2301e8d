"""The ``imagen-lib`` command: a dispatcher over the subcommands in :data:`COMMANDS`.

Each subcommand lives in ``imagen_lib/commands/<name>.py`` and exposes ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their command runs (or its ``--help`` is asked for),
so ``imagen-lib --help`` is instant and offline, and a missing optional command does not break the others.
"""

from __future__ import annotations

import argparse
import importlib
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


if __name__ == "__main__":
    sys.exit(main())
