"""Subcommands of ``imagen-lib`` (see :mod:`imagen_lib.cli`): each module exposes ``add_arguments(parser)``
and ``run(args) -> int`` and imports heavy libraries only inside ``run``."""
