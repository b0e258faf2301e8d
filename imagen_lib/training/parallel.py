"""``parallel_stages``: the stages after the first train in their own processes while the first trains here.

Stages of a cascade train independently (a super-resolution stage learns from real low-res images), and on a
few CPU cores two one-thread processes do more work than one two-thread process. Each background stage runs
in a fresh interpreter with ``threads_per_stage`` torch threads while this process trains the first stage on
the threads left; :meth:`BackgroundStages.join` waits for them, gives this process every thread again and
takes over their stages' state. It is called at a fixed step of the first stage (``join_at_step``) or at
its end, so a run's arithmetic (which depends on the thread count) never depends on timing.

:func:`imagen_lib.training.loop.train_stages` uses it when the config has a ``parallel_stages`` block.
"""

from __future__ import annotations

import multiprocessing
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Optional

import torch

from imagen_lib.training.trainer import Trainer


def parallel_applies(trainer: Trainer) -> bool:
    """Whether stages can train in processes of their own beside ``trainer``: a single-process CPU run with a
    frozen text encoder (a trainable one is shared by every stage). Says so when it does not apply."""
    if trainer.accelerator.num_processes > 1 or trainer.device.type != "cpu":
        if trainer.is_main_process:
            print("parallel_stages: ignored (it shares CPU cores between stages; this run has "
                  f"{trainer.accelerator.num_processes} process(es) on {trainer.device.type}): stages train in turn")
        return False
    if trainer.train_text:
        raise ValueError("parallel_stages: needs a frozen text encoder (a trainable one is shared by every stage, "
                         "so they cannot train apart); set text_encoder.trainable: false or remove the block")
    return True


class BackgroundStages:
    """Stages trained in processes of their own, started at once.

    Args:
        body: a module-level function (it is started by name in a fresh interpreter) called as
            ``body(stage=k, part=folder, position=line, **jobs[k])``; it trains stage k and saves a checkpoint
            to ``part/checkpoint``. ``position`` is its progress bar's line (1, 2, ...).
        jobs: stage index -> the other keyword arguments of ``body`` for that stage.
        out: the run's folder; stage k works in ``out/.stage{k}-parallel``, removed once joined.
        threads: torch threads of each background process; this process keeps the rest.
        join_at_step: the step of the first stage at which :meth:`joiner` joins [None: when it is called
            after the first stage].
    """

    def __init__(self, body: Callable[..., None], jobs: Mapping[int, dict], out: Path, threads: int,
                 join_at_step: Optional[int] = None):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked thread pools
        self.total_threads, self.join_at_step = torch.get_num_threads(), join_at_step
        self.parts, self.processes, self.joined = {}, {}, False
        for position, (k, job) in enumerate(jobs.items(), start=1):
            self.parts[k] = Path(out) / f".stage{k}-parallel"
            kwargs = dict(job, stage=k, part=str(self.parts[k]), position=position)
            self.processes[k] = context.Process(target=_with_threads, args=(body, threads, kwargs), name=f"stage {k}")
            self.processes[k].start()
        torch.set_num_threads(max(1, self.total_threads - threads * len(jobs)))

    def join(self, trainer: Trainer, at: str = "the end of the first stage") -> None:
        """Wait for every background stage, then load its state into ``trainer`` (once)."""
        if self.joined:
            return
        self.joined, start = True, time.time()
        try:
            for k, process in self.processes.items():
                process.join()
                if process.exitcode != 0:
                    raise RuntimeError(f"parallel_stages: stage {k}, trained in its own process, failed (exit code "
                                       f"{process.exitcode}); its error is printed above")
        finally:
            torch.set_num_threads(self.total_threads)
        for k, part in self.parts.items():
            trainer.load(part / "checkpoint", stages=[k])
            shutil.rmtree(part)
        # the wait says how to tune join_at_step: long waits mean a later step, none may mean an earlier one
        print(f"parallel_stages: stage(s) {', '.join(map(str, self.parts))} joined at {at} after waiting "
              f"{time.time() - start:.0f}s; training goes on with {self.total_threads} thread(s)", flush=True)

    def joiner(self, trainer: Trainer) -> Optional[Callable[[int], None]]:
        """An ``on_step`` callback for the first stage's :meth:`Trainer.fit` that joins at ``join_at_step``
        (None without one)."""
        if self.join_at_step is None:
            return None

        def on_step(current: int) -> None:
            if current >= self.join_at_step:
                self.join(trainer, at=f"step {current}")
        return on_step

    def stop(self) -> None:
        """End background stages still running (this process failed or was interrupted); every thread back."""
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()
                process.join()
        torch.set_num_threads(self.total_threads)


def _with_threads(body: Callable[..., None], threads: int, kwargs: dict) -> None:
    torch.set_num_threads(threads)
    body(**kwargs)
