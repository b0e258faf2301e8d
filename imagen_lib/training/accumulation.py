"""Gradient accumulation: one optimizer step over several micro-batches (``TrainerSettings.gradient_accumulation_steps``
loader batches in :meth:`~imagen_lib.training.trainer.Trainer.fit`, each split further into chunks of at most
``max_batch_size`` rows).

Every chunk's mean loss is weighted by its share of all the step's examples (the shares sum to 1), so the summed
gradient is the gradient of the mean loss over every example, as if they were one batch, whatever the micro-batch
sizes. The Trainer all-reduces gradients once, on the last chunk (``accelerator.no_sync`` on the others):
distributed data parallel then skips the inner all-reduces, as ``accelerator.accumulate`` would. The Trainer does not
use ``accelerator.accumulate`` itself: that counts micro-steps on the accelerator (one count shared by every stage
and trainer in the process) and lets Accelerate's optimizer wrapper skip steps, where here one :meth:`train_step`
call is one optimizer step, with the non-finite guard deciding on the whole step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional

__all__ = ["micro_batches", "step_groups", "weighted_chunks"]


def micro_batches(batch: Any) -> list:
    """The micro-batches of one optimizer step: ``batch`` itself when it is one batch (a tensor or a mapping), or
    the batches of a list or tuple of them."""
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError("batch: expected a batch or a non-empty list of micro-batches, got an empty list")
        return list(batch)
    return [batch]


def step_groups(batches: Iterable, size: int) -> Iterator[list]:
    """Consecutive groups of ``size`` batches (one optimizer step's micro-batches each); an incomplete last group
    (a finite iterable) is not yielded."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def _slice_batch(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] if v is not None else None for k, v in batch.items()}


def weighted_chunks(batches: Sequence[tuple[dict, int]], max_batch_size: Optional[int]) -> list[tuple[dict, float]]:
    """The chunks of the micro-batches ``(batch, rows)`` (at most ``max_batch_size`` rows each; None: a
    micro-batch is one chunk), each with its share of all the rows (the shares sum to 1)."""
    total = sum(size for _, size in batches)
    chunks = []
    for batch, size in batches:
        step = max_batch_size or size
        chunks += [(_slice_batch(batch, i, min(i + step, size)), (min(i + step, size) - i) / total)
                   for i in range(0, size, step)]
    return chunks
