"""Bad samples in a data set: skipped and counted per reason, one warning each, and a limit on their share.

A data set that reads files written by others meets broken ones: an image that does not decode, a caption
that is not UTF-8, a tar cut short, an embedding of the wrong dtype. One of them must not end a run that has
trained for days, so the data sets skip it, count it and warn; but a data set where many samples are bad
is a data set that is wrong, and training on what is left would hide that. :class:`BadSamples` keeps the
counts and stops with a ``ValueError`` once the share of bad samples exceeds ``max_bad_share``.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from typing import Optional

from imagen_lib.validation import check_number

logger = logging.getLogger("imagen_lib.data")

# Before this many samples are seen, the share is judged only at the end of a pass: a few bad samples
# early in a stream say little about the share in the whole data set.
MIN_SAMPLES_TO_JUDGE = 100

# what to do about each kind of bad sample, added to the error that stops the run
HINTS = {
    "missing emb.npy": "run imagen-lib precache on these shards, or read captions with text: texts",
}


class BadSample(Exception):
    """A sample that cannot be used: ``reason`` is its kind (a short fixed phrase), ``detail`` what was seen."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def check_max_bad_share(value: float) -> float:
    """``max_bad_share``: a number in [0, 1]."""
    return check_number("max_bad_share", value, low=0.0, high=1.0)


class BadSamples:
    """Counts of the samples one reader saw in one pass: ``counts[reason]`` bad ones, ``seen`` in all.

    ``name`` names the data set (and reader) in warnings and errors. :meth:`bad` warns once per sample
    (naming its key and file) and raises the share error once :data:`MIN_SAMPLES_TO_JUDGE` samples were
    seen; :meth:`finish` judges whatever was seen and logs the counts.
    """

    def __init__(self, name: str, max_bad_share: float, counts: Optional[Counter] = None):
        self.name, self.max_bad_share = name, max_bad_share
        self.counts = Counter() if counts is None else counts
        self.seen = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def good(self) -> None:
        self.seen += 1
        if self.seen == MIN_SAMPLES_TO_JUDGE:
            self.judge()

    def record(self, error: BadSample, key: str, where: str) -> None:
        """Count one bad sample ``key`` read from ``where`` (a file or a shard URL) and warn about it."""
        self.seen += 1
        self.counts[error.reason] += 1
        warnings.warn(f"{self.name}: skipped sample {key} in {where}: {error}", stacklevel=3)

    def bad(self, error: BadSample, key: str, where: str) -> None:
        """:meth:`record`, then judge the share once enough samples were seen."""
        self.record(error, key, where)
        if self.seen >= MIN_SAMPLES_TO_JUDGE:
            self.judge()

    def judge(self, seen: Optional[int] = None) -> None:
        """Raise the share error when more than ``max_bad_share`` of ``seen`` (default: the samples seen so
        far) were bad."""
        seen = self.seen if seen is None else seen
        if seen and self.total / seen > self.max_bad_share:
            raise ValueError(share_message(self.name, self.counts, seen, self.max_bad_share))

    def finish(self, what: str = "pass") -> None:
        """The end of a pass: judge the share, then log the counts (nothing when no sample was bad)."""
        self.judge()
        if self.total:
            logger.warning("%s: skipped %d of %d samples this %s (%s)", self.name, self.total, self.seen, what,
                           describe(self.counts))


def describe(counts: Counter) -> str:
    """``"2 undecodable image, 1 caption not UTF-8"``, most frequent first."""
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())


def share_message(name: str, counts: Counter, seen: int, limit: float) -> str:
    total = sum(counts.values())
    hints = "".join(f"; {reason}: {HINTS[reason]}" for reason in counts if reason in HINTS)
    return (
        f"{name}: {total} of {seen} samples are bad ({total / seen:.1%}: {describe(counts)}), more than "
        f"max_bad_share={limit:g} ({limit:.1%}); the warnings above name each one{hints}. Fix or remove them, "
        f"or raise max_bad_share in the data set (the config's data block)"
    )
