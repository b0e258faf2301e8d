"""The lifetime of the process group the Trainer's Accelerator joins: ended before the interpreter exits."""

from __future__ import annotations

import atexit
import functools

import torch


@functools.cache
def end_at_exit() -> None:
    """Destroy the process group when the interpreter exits, unless the script did (``accelerator.end_training()``).

    Why: a process that exits with its gloo group alive tears the group's worker threads down during interpreter
    finalization, and that can abort it (SIGABRT, "terminate called without an active exception") after the run
    has finished and saved: the launcher then reports the whole run failed. Registered once per process."""

    def end() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(end)
