"""What ``accelerate launch`` was asked for against what it started: ``accelerate launch --cpu --num_processes 2``
starts a single process unless MPI is set up (Accelerate's CPU launcher spreads processes only through
``mpirun``, ``--mpirun_hostfile``), and nothing says so: the run trains in one process with a batch per step
of one process. :func:`single_process_launch_warning` tells it from the launcher's environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Optional

__all__ = ["single_process_launch_warning", "TWO_CPU_PROCESSES"]

TWO_CPU_PROCESSES = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2"
"""The launch that does start two processes on one CPU machine: the launcher's torchrun path, joined on the CPU
with the gloo backend (the Trainer puts several processes without a GPU on the CPU)."""


def _truthy(value: Optional[str]) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def single_process_launch_warning(num_processes: int, environ: Optional[Mapping[str, str]] = None,
                                  script: str = "examples/train.py") -> Optional[str]:
    """A warning when ``accelerate launch --cpu`` was asked for several processes but ``num_processes`` (the
    accelerator's) is 1, else None.

    Accelerate's CPU launcher (without MPI) runs the script once and exports ``ACCELERATE_USE_CPU=True`` and,
    only when more than one process or machine was asked for, ``MASTER_ADDR``; a real multi-process start also
    exports ``WORLD_SIZE`` (torchrun) or an MPI size. ``environ`` defaults to ``os.environ``; ``script`` is
    named in the suggested command.
    """
    env = os.environ if environ is None else environ
    if num_processes > 1 or not _truthy(env.get("ACCELERATE_USE_CPU")) or "MASTER_ADDR" not in env:
        return None
    sizes = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if any(int(env.get(key) or 1) > 1 for key in sizes):
        return None
    return (f"accelerate launch --cpu asked for more than one process, but this run has 1 process: Accelerate's CPU "
            f"launcher starts several only through MPI (--mpirun_hostfile), so this trains in a single process. "
            f"To run two processes on one CPU machine: {TWO_CPU_PROCESSES} {script} ...")
