"""A stage's data order: batches of a loader epoch after epoch, from a recorded position on, with that position
kept up to date, so a resumed run takes the batches an uninterrupted one would.

A :class:`DataPosition` is (epoch, batch within it, batches taken in all). Resuming from one:

- a DataLoader over a map-style data set: the epochs before are run through with every batch skipped by
  index (no data is loaded), so the loader's generator draws each epoch's permutation as it did, then the
  batches already taken of the current epoch are skipped by index;
- a DataLoader over an iterable data set (e.g. shards): after ``set_epoch(epoch)``, the data set's
  ``skip_batches(batches, batch_size)`` is called when it has one (a one-shot request that applies to its next
  iteration); otherwise the epoch's order restarts, with a warning;
- any other iterable: the batches already taken of the epoch are drawn and dropped.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["DataPosition", "DataOrder"]


@dataclass
class DataPosition:
    """Where a stage is in its data order.

    Attributes:
        epoch: the epoch the last batch came from [0].
        batch: batches taken of that epoch [0].
        batches: batches taken in all, over every epoch and every run (steps skipped for a non-finite loss
            included) [0].
    """

    epoch: int = 0
    batch: int = 0
    batches: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class DataOrder:
    """Batches of ``loader``, epoch after epoch, from ``start`` on; :attr:`position` says where the last
    batch handed out came from (it is updated as each batch is handed out).

    Each epoch starts by telling the loader and its data set the epoch's number (``set_epoch``: new crops,
    flips and shard order). An epoch that yields no batch is an error, unless it was resumed at its end.
    """

    def __init__(self, loader: Iterable, start: DataPosition):
        self.loader = loader
        self.position = dataclasses.replace(start)

    def __iter__(self) -> Iterator[Any]:
        loader, dataset = self.loader, getattr(self.loader, "dataset", None)
        epoch, skip = self._resume_point()
        while True:
            _set_epoch(loader, dataset, epoch)
            empty = True
            batches, first = self._epoch_batches(epoch, skip)
            for index, batch in enumerate(batches, start=first):
                empty = False
                self.position = DataPosition(epoch, index + 1, self.position.batches + 1)
                yield batch
            if empty and not skip:
                raise ValueError(f"dataloader: it yielded no batch in epoch {epoch} (is its batch size larger than "
                                 "the data set? a loader with drop_last=True drops an incomplete last batch)")
            epoch, skip = epoch + 1, 0

    def _resume_point(self) -> tuple[int, int]:
        """(epoch, batches to skip in it) of the start, after taking a map-style loader through the epochs
        before it."""
        from torch.utils.data import DataLoader, IterableDataset

        start = self.position
        if isinstance(self.loader, DataLoader) and not isinstance(self.loader.dataset, IterableDataset):
            return _skip_to(self.loader, start.epoch * len(self.loader) + start.batch)
        return start.epoch, start.batch

    def _epoch_batches(self, epoch: int, skip: int) -> tuple[Iterable, int]:
        """The batches of epoch ``epoch`` (its ``set_epoch`` already called) from batch ``skip`` on, and the
        index of the first (0 when the epoch's order restarts)."""
        from torch.utils.data import DataLoader, IterableDataset

        loader = self.loader
        if not skip:
            return loader, 0
        if isinstance(loader, DataLoader) and isinstance(loader.dataset, IterableDataset):
            if hasattr(loader.dataset, "skip_batches"):
                loader.dataset.skip_batches(skip, loader.batch_size)
                return loader, skip
            warnings.warn(f"dataloader: its data set ({type(loader.dataset).__name__}) cannot skip the {skip} "
                          f"batch(es) of epoch {epoch} an earlier run took (it has no skip_batches); this epoch's "
                          "order restarts", stacklevel=3)
            return loader, 0
        if isinstance(loader, DataLoader):
            return _skip_first_batches(loader, skip), skip
        return itertools.islice(loader, skip, None), skip


def start_position(loader: Iterable, start_batch: int) -> DataPosition:
    """The position ``start_batch`` batches into ``loader``'s order (0, or a DataLoader over a map-style data
    set, which can skip by index)."""
    from torch.utils.data import DataLoader, IterableDataset

    if start_batch == 0:
        return DataPosition()
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        raise ValueError(f"start_batch: expected 0, or a position >= 0 in a DataLoader over a map-style data set "
                         f"(an iterable one cannot skip by index), got {start_batch} for {type(loader).__name__}")
    epoch, batch = divmod(start_batch, len(loader))
    return DataPosition(epoch, batch, start_batch)


def _set_epoch(loader: Any, dataset: Any, epoch: int) -> None:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def _skip_to(loader: Any, start_batch: int) -> tuple[int, int]:
    """(epoch, batch within it) of position ``start_batch`` of a DataLoader over a map-style data set, after
    taking the loader through the epochs before it: each iterates the loader with every batch skipped (indices
    only, no data is loaded), so the loader's generator draws each epoch's permutation, as it did for the run
    that trained them."""
    if start_batch == 0:
        return 0, 0
    per_epoch = len(loader)
    if per_epoch == 0:
        raise ValueError("dataloader: it yields no batch (fewer items than one batch)")
    epoch, skip = divmod(start_batch, per_epoch)
    for _ in range(epoch):
        for _ in _skip_first_batches(loader, per_epoch):  # yields nothing
            pass
    return epoch, skip


def _skip_first_batches(loader, num_batches: int):
    from accelerate import skip_first_batches

    return skip_first_batches(loader, num_batches)

