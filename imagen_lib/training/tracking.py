"""Experiment trackers (Accelerate's TensorBoard and Weights & Biases): which ones a run logs to, checked before
anything is built, and what :meth:`~imagen_lib.training.trainer.Trainer.fit` logs to them.

Per stage ``k``, every ``log_every`` optimizer steps (at the stage's step count): ``stage{k}/loss`` (the mean
over those steps and over the processes), ``stage{k}/lr``, ``stage{k}/grad_norm`` (the mean over those steps of
the gradients' total norm before clipping; absent under fp16 without clipping, where it is not computed) and
``stage{k}/images_per_second`` (over all processes, data loading included). Every ``sample_every`` steps the
sample grid written to ``OUT/samples/`` is logged as ``stage{k}/samples`` (TensorBoard: an image summary;
wandb: a ``wandb.Image``), and the final grid as ``samples``.

A tracker that is named but not installed is an error that gives the install command (Accelerate itself
would only warn and log nothing).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from imagen_lib.training.accumulation import micro_batches

__all__ = ["TRACKERS", "PROJECT", "tracker_names", "check_log_with", "is_installed", "start_trackers", "log_image",
           "StepMeter", "count_images", "reduced_mean"]

# tracker -> (the modules any one of which makes it work, the command that installs one)
TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), 'pip install "imagen_lib[tensorboard]"'),
    "wandb": (("wandb",), "pip install wandb"),
}
PROJECT = "imagen_lib"  # the trackers' project name: TensorBoard writes to LOGGING_DIR/imagen_lib/

LogWith = Union[None, str, Sequence[str]]


def is_installed(tracker: str) -> bool:
    """Whether the package a tracker of :data:`TRACKERS` needs can be imported."""
    return any(importlib.util.find_spec(module) is not None for module in TRACKERS[tracker][0])


def tracker_names(log_with: LogWith) -> list[str]:
    """The names in ``log_with`` (see :func:`check_log_with`), lower-cased, ``"none"`` and blanks left out,
    each checked to be one of :data:`TRACKERS` or ``"all"``; whether they are installed is not checked."""
    if log_with is None:
        return []
    names = log_with.split(",") if isinstance(log_with, str) else log_with
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"log_with: expected a tracker name or a list of them, got {log_with!r}")
    names = [n.strip().lower() for n in names if n.strip().lower() not in ("", "none")]
    unknown = [n for n in names if n != "all" and n not in TRACKERS]
    if unknown:
        raise ValueError(f"log_with: expected {', '.join(TRACKERS)}, all or none, got {unknown[0]!r}")
    return names


def check_log_with(log_with: LogWith) -> Optional[list[str]]:
    """``log_with`` as the list of tracker names an ``accelerate.Accelerator`` takes (None: no tracker).

    ``log_with``: ``"tensorboard"``, ``"wandb"``, ``"all"`` (every one of them that is installed), ``"none"``,
    a comma-separated string or a list of these, or None. A named tracker that is not installed (or ``"all"``
    when none is) is a ValueError naming ``log_with`` with the install command.
    """
    names = tracker_names(log_with)
    if "all" in names:
        chosen = [t for t in TRACKERS if is_installed(t)]
        if not chosen:
            raise ValueError("log_with: 'all' found no tracker installed; install one: "
                             + " or ".join(install for _, install in TRACKERS.values()))
        return chosen
    for name in names:
        if not is_installed(name):
            raise ValueError(f"log_with: the tracker {name!r} is not installed; install it with: {TRACKERS[name][1]}")
    return list(dict.fromkeys(names)) or None


def start_trackers(accelerator, config: dict) -> None:
    """Start ``accelerator``'s trackers under :data:`PROJECT`, recording ``config`` (flat scalar values); wandb
    writes its files in the accelerator's logging folder (``project_dir``) rather than the working one."""
    folder = accelerator.logging_dir
    init_kwargs = {}
    if folder is not None and accelerator.log_with:
        if accelerator.is_main_process:
            Path(folder).mkdir(parents=True, exist_ok=True)
        init_kwargs["wandb"] = {"dir": str(folder)}
    accelerator.init_trackers(PROJECT, config=config, init_kwargs=init_kwargs)


def log_image(accelerator, tag: str, png: Union[None, str, Path], step: int) -> None:
    """The image file ``png`` (a sample grid) logged as ``tag`` at ``step`` to each of ``accelerator``'s
    TensorBoard (an image summary) and wandb (a ``wandb.Image``) trackers; nothing without one, or without a
    file (None: another process than the main one)."""
    trackers = [t for t in accelerator.trackers if t.name in TRACKERS]
    if png is None or not trackers:
        return
    import numpy as np
    from PIL import Image

    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: pixels[None]}, step=step, dataformats="NHWC")
            tracker.writer.flush()
        else:
            tracker.log_images({tag: [pixels]}, step=step)


def count_images(batch: Any) -> int:
    """Images in one optimizer step's batch, or list of micro-batches (an images tensor or a mapping with
    ``images`` each)."""
    total = 0
    for micro in micro_batches(batch):
        images = micro.get("images") if isinstance(micro, Mapping) else micro
        total += len(images) if images is not None else 0
    return total


class StepMeter:
    """What :meth:`Trainer.fit` logs for ``stage``, gathered step by step between two logged steps: the
    losses, the gradient norms of the optimizer steps taken, the images and the seconds spent on them (data
    loading included; the time between :meth:`add` and :meth:`resume`, sample grids and checkpoints, left out)."""

    def __init__(self, accelerator, stage: int):
        self.accelerator, self.stage = accelerator, stage
        self.losses: list[float] = []
        self.norms: list[Tensor] = []
        self.images, self.seconds = 0, 0.0
        self.clock = time.perf_counter()

    def add(self, loss: float, batch: Any) -> None:
        """One optimizer step's loss (NaN for a skipped one) and its batch (or micro-batches), just taken."""
        now = time.perf_counter()
        self.seconds += now - self.clock
        self.clock = now
        self.losses.append(loss)
        self.images += count_images(batch)

    def resume(self) -> None:
        """Training goes on from now: what happened since the last :meth:`add` is not training time."""
        self.clock = time.perf_counter()

    def add_grad_norm(self, norm: Optional[Tensor]) -> None:
        """The gradients' total norm before clipping of a step taken (None: not computed)."""
        if norm is not None:
            self.norms.append(norm.detach())

    def log(self, step: int, lr: float) -> float:
        """Log the window's values at ``step`` (a collective: every process calls it at once), start a new
        window, and return the mean loss."""
        acc, k = self.accelerator, self.stage
        mean = reduced_mean(acc, self.losses)
        values = {f"stage{k}/loss": mean, f"stage{k}/lr": lr,
                  f"stage{k}/images_per_second": self.images * acc.num_processes / max(self.seconds, 1e-9)}
        if self.norms:
            values[f"stage{k}/grad_norm"] = float(torch.stack(self.norms).float().mean())
        acc.log(values, step=step)
        self.losses, self.norms, self.images, self.seconds = [], [], 0, 0.0
        return mean


def reduced_mean(accelerator, values: list[float]) -> float:
    """Mean over ``values`` and over processes (a collective, entered by every process at once)."""
    t = torch.tensor(sum(values) / max(1, len(values)), device=accelerator.device)
    return float(accelerator.reduce(t, reduction="mean")) if accelerator.num_processes > 1 else float(t)
