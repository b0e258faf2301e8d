"""WebDataset tar shards: images with ``txt`` captions and, when precomputed, ``emb.npy`` + ``emb_mask.npy``.

Shards may be local paths or any fsspec URL (``s3://``, ``gs://``, ``https://``, ``memory://``), given as a
list, a brace pattern (``data/shard-{0000..0099}.tar``) or a glob. Each Accelerate process and each
DataLoader worker reads its own shards (shard ``i`` of the epoch's order goes to reader
``i % (processes * workers)``), so no sample is read twice in an epoch; within a reader a shuffle buffer
mixes samples across shards. The ``webdataset`` package (the ``[webdataset]`` extra) parses and writes tars.
"""

from __future__ import annotations

import os
import posixpath
import random
import sys
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from imagen_lib.data.bad_samples import BadSample, BadSamples, check_max_bad_share
from imagen_lib.data.collate import collate_image_text
from imagen_lib.data.embeddings import fit_token_length
from imagen_lib.data.shard_samples import IMAGE_FIELDS, decode_caption, decode_embeddings, decode_image, sample_error
from imagen_lib.data.transforms import ImageTransform
from imagen_lib.validation import check_int

__all__ = ["IMAGE_FIELDS", "ShardDataset", "expand_urls", "iter_shard_samples", "process_split", "read_shard",
           "write_samples", "write_shards"]


def _webdataset():
    try:
        import webdataset
    except ImportError as error:  # an optional extra
        raise ImportError(
            "WebDataset shards need the webdataset package: pip install 'imagen_lib[webdataset]'"
        ) from error
    return webdataset


def expand_urls(urls: Union[str, Sequence[str]]) -> list[str]:
    """A list of shard URLs from a URL, a brace pattern, a glob (``*``, ``?``) or a list of any of those."""
    import fsspec

    _webdataset()  # a clear message when the extra is missing; braceexpand comes with it
    from braceexpand import braceexpand

    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        for url in braceexpand(str(item)):
            if any(c in url for c in "*?["):
                fs, path = fsspec.core.url_to_fs(url)
                protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
                matches = sorted(fs.glob(path))
                out.extend(m if protocol == "file" else f"{protocol}://{m.lstrip('/')}" for m in matches)
            else:
                out.append(url)
    if not out:
        raise ValueError(f"urls: no shard matches {urls!r}")
    return out


def process_split() -> tuple[int, int]:
    """(rank, world size) of this process: the Accelerator's when one exists, else torch.distributed's, else
    the ``RANK`` / ``WORLD_SIZE`` environment variables (what launchers set), else (0, 1). Only reads: it
    never creates Accelerate's state or a process group."""
    if "accelerate" in sys.modules:  # only consult Accelerate when the program uses it
        from accelerate.state import PartialState, is_initialized

        if is_initialized():  # an Accelerator exists, so PartialState() hands back its state, creating nothing
            state = PartialState()
            return state.process_index, state.num_processes
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def _split_name(name: str) -> tuple[Optional[str], Optional[str]]:
    """``("dir/s01", "emb.npy")`` from ``"dir/s01.emb.npy"``: the key ends at the first dot of the base name
    (WebDataset's convention); ``(None, None)`` for a name with no extension."""
    folder, slash, base = name.rpartition("/")
    stem, dot, field = base.partition(".")
    if not dot or not stem:
        return None, None
    return folder + slash + stem, field.lower()


def _ended_early(tar: tarfile.TarFile) -> bool:
    """Whether a streamed tar stopped without reading its end-of-archive block (a file cut at or inside a
    header, which ``tarfile`` takes for the end)."""
    read = getattr(tar.fileobj, "pos", None)  # bytes of the (uncompressed) tar read so far
    return read is not None and read < tar.offset + tarfile.BLOCKSIZE


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard, never raising for a broken tar: dicts of ``__key__``, ``__url__`` and
    ``{extension: bytes}``. A tar that ends early (inside a member or a header, or without its end-of-archive
    marker) or holds a corrupt header ends the shard with one sample carrying ``__error__`` (reason, detail)
    under the key being read (that sample is lost); a file name seen twice in a sample marks it the same way."""
    import fsspec

    with fsspec.open(url, "rb") as stream:
        current: Optional[dict[str, Any]] = None
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
            for member in tar:
                key, field = _split_name(member.name) if member.isreg() else (None, None)
                if key is None:
                    continue
                if current is not None and key != current["__key__"]:
                    yield current
                    current = None
                current = current or {"__key__": key, "__url__": url}
                if field in current:
                    current["__error__"] = ("duplicate file", f"{member.name} appears twice in the sample")
                current[field] = tar.extractfile(member).read()
                tar.members = []  # a streamed tar need not remember its members
            if _ended_early(tar):
                raise tarfile.ReadError("the tar ends before its end-of-archive marker")
        except _TAR_ERRORS as error:
            key = current["__key__"] if current is not None else "(the first member)"
            yield {"__key__": key, "__url__": url, "__error__": ("truncated tar", f"{type(error).__name__}: {error}")}
            return
        if current is not None:
            yield current


def iter_shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard: dicts of ``__key__``, ``__url__`` and ``{extension: bytes}``; a broken tar
    raises ``OSError`` naming the shard and the sample (:func:`read_shard` marks it instead)."""
    for sample in read_shard(url):
        if "__error__" in sample:
            reason, detail = sample["__error__"]
            raise OSError(f"{url}: sample {sample['__key__']}: {reason} ({detail})")
        yield sample


def write_samples(samples: Iterable[dict[str, Any]], url: str) -> int:
    """Write samples (``__key__`` plus ``{extension: bytes or str}``) as one tar at ``url`` (any fsspec URL),
    under a temporary name renamed when complete. Returns the number written."""
    import fsspec

    wds = _webdataset()
    fs, path = fsspec.core.url_to_fs(url)
    parent = posixpath.dirname(path)  # fsspec paths use "/" on every platform
    if parent:
        fs.makedirs(parent, exist_ok=True)
    partial = path + ".partial"
    count = 0
    with fs.open(partial, "wb") as handle:
        writer = wds.TarWriter(handle, encoder=False, mtime=0.0)
        for sample in samples:
            fields = {k: (v.encode("utf-8") if isinstance(v, str) and not k.startswith("__") else v)
                      for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
            writer.write(fields)
            count += 1
        writer.close()
    fs.mv(partial, path)
    return count


def write_shards(
    samples: Iterable[dict[str, Any]], output: str, *, samples_per_shard: int = 1000, prefix: str = "shard"
) -> list[str]:
    """Write samples into ``output/{prefix}-000000.tar``, ... (any fsspec URL), ``samples_per_shard`` each
    (default 1000). A sample is ``{"__key__": str, "png" | "jpg" | "webp": bytes, "txt": str, ...}``."""
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard: expected a positive int, got {samples_per_shard!r}")
    urls: list[str] = []
    batch: list[dict[str, Any]] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == samples_per_shard:
            urls.append(f"{output.rstrip('/')}/{prefix}-{len(urls):06d}.tar")
            write_samples(batch, urls[-1])
            batch = []
    if batch:
        urls.append(f"{output.rstrip('/')}/{prefix}-{len(urls):06d}.tar")
        write_samples(batch, urls[-1])
    return urls


class ShardDataset(IterableDataset):
    """Image-caption samples streamed from WebDataset shards; yields the Trainer's item dicts.

    Args:
        urls: shard URLs (a list, brace pattern or glob; local or any fsspec URL).
        image_size: side of the square images (resize the shorter side, then crop).
        crop / flip: see :class:`~imagen_lib.data.transforms.ImageTransform` (default center crop, no flip).
        text: ``"auto"`` (default: precomputed embeddings when a sample has them, else its caption),
            ``"texts"`` or ``"embeddings"`` (a sample without them is a bad sample).
        token_length: trim or pad precomputed embeddings to this many tokens (NeMo's
            ``conditioning.token_length``); default None keeps them as stored (``collate_image_text`` pads
            a batch to its longest).
        shuffle_buffer: samples mixed across shards by each reader, default 1000 (0: read in order).
        shuffle_shards: shuffle the shard order every epoch (default True), with ``seed`` + epoch.
        seed: base seed of shard order, shuffle buffer, random crop and flip (default 0).
        rank / world_size: override :func:`process_split` (default: detected).
        max_bad_share: the share of bad samples a reader tolerates (default 0.01); more stops the run with
            a ``ValueError`` (judged once 100 samples were seen, and at the end of each pass).

    Items: ``{"images": (3, S, S) in [-1, 1], "texts": str}`` or ``{"images", "text_embeds" (N, D) float32,
    "text_mask" (N,) bool}``, plus ``"keys"`` (the sample's key). Call :meth:`set_epoch` before each epoch to
    reshuffle, and :meth:`skip_batches` after it to resume mid-epoch; use ``collate_fn`` with a DataLoader
    (and no ``shuffle``: the shard order and buffer shuffle). The data set splits itself by process: do not
    let Accelerate shard its DataLoader again.

    Bad samples (an image that does not decode, a caption that is not UTF-8 or missing, a truncated tar, an
    ``emb.npy`` that is not a finite float (N, D) array, a missing or mismatched ``emb_mask.npy``) are
    skipped with one warning each, naming the sample and the shard; ``skipped`` counts them per reason for
    the last pass in this process (each DataLoader worker counts its own and logs them at the end of its
    pass).

    Reproducibility: the shuffle buffer mixes raw (undecoded) samples with a generator seeded by ``seed``,
    the epoch, the process and the reader, and each sample's random crop and flip draw from a generator
    seeded by the same and the sample's position in the reader's stream, so no sample's pixels depend on
    what was decoded before it.
    """

    split_by_process = True
    collate_fn = staticmethod(collate_image_text)  # pads embeddings of different lengths within a batch

    def __init__(
        self,
        urls: Union[str, Sequence[str]],
        image_size: int,
        *,
        crop: Literal["center", "random"] = "center",
        flip: bool = False,
        text: Literal["auto", "texts", "embeddings"] = "auto",
        token_length: Optional[int] = None,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        seed: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        max_bad_share: float = 0.01,
    ):
        _webdataset()
        if text not in ("auto", "texts", "embeddings"):
            raise ValueError(f"text: expected 'auto', 'texts' or 'embeddings', got {text!r}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer: expected >= 0, got {shuffle_buffer}")
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise ValueError(
                f"rank, world_size: expected both or neither, with 0 <= rank < world_size; got {rank}, {world_size}"
            )
        self.urls = expand_urls(urls)
        self.transform = ImageTransform(image_size, crop=crop, flip=flip)
        self.text, self.token_length = text, token_length
        self.shuffle_buffer, self.shuffle_shards, self.seed = shuffle_buffer, shuffle_shards, int(seed)
        self.rank, self.world_size = rank, world_size
        self.max_bad_share = check_max_bad_share(max_bad_share)
        self.epoch = 0
        self.skipped: Counter = Counter()
        self._skip: Optional[tuple[int, int]] = None

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle shards and samples for ``epoch`` (the same order on every process); drops a pending
        :meth:`skip_batches`."""
        self.epoch = int(epoch)
        self._skip = None

    def skip_batches(self, batches: int, batch_size: int) -> None:
        """Resume mid-epoch: the next iteration (of the epoch set by :meth:`set_epoch`, called first) leaves
        out the ``batches`` batches of ``batch_size`` samples that a DataLoader over this data set took
        first, so that the batches it yields are bit for bit those an uninterrupted iteration yields after
        them. One-shot: used by the next iteration in this process (a DataLoader's workers get it when the
        loader is iterated), cleared by :meth:`set_epoch`.

        A DataLoader with W workers takes batch i from worker i % W, so each worker leaves out its share
        and the workers trade reader roles (shards and seeds) to line up with the uninterrupted order. The
        skipped samples are read and their images decoded (a bad sample is no position in the stream, so
        each must be checked as before) but not transformed. Exact as long as no reader ran out of samples
        within the first ``batches`` batches (readers holding fewer shards than others finish first, in an
        epoch's last batches); a resume there may repeat a few of the epoch's last batches.
        """
        batches = check_int("batches", batches, low=0)
        batch_size = check_int("batch_size", batch_size, low=1)
        self._skip = (batches, batch_size)

    def _reader(self) -> tuple[int, int, int, int]:
        """(rank, world size, reader, readers in this process); a pending skip of b batches makes DataLoader
        worker w read as reader (w + b) % W, the worker an uninterrupted loader would take the next batch
        from."""
        rank, world = (self.rank, self.world_size) if self.rank is not None else process_split()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = self._skip[0] if self._skip is not None else 0
        return rank, world, (worker + batches) % workers, workers

    def reader_shards(self, reader: Optional[tuple[int, int, int, int]] = None) -> list[str]:
        """The shards this process and DataLoader worker (or ``reader``, from ``_reader()``) read this epoch."""
        rank, world, reader_id, readers = reader if reader is not None else self._reader()
        order = list(self.urls)
        if self.shuffle_shards:
            random.Random(self.seed + self.epoch).shuffle(order)  # same on every reader
        total = world * readers
        if len(order) < total:
            warnings.warn(f"ShardDataset: {len(order)} shards for {total} readers; some read nothing", stacklevel=2)
        return order[rank * readers + reader_id :: total]

    def _skip_samples(self, reader_id: int, readers: int) -> int:
        """Samples this reader leaves out: its share (batches i % readers == reader_id) of the skipped batches."""
        if self._skip is None:
            return 0
        batches, batch_size = self._skip
        return (batches - reader_id + readers - 1) // readers * batch_size

    def _text(self, sample: dict[str, Any]) -> dict[str, Any]:
        if self.text == "texts" or (self.text == "auto" and "emb.npy" not in sample):
            return {"texts": decode_caption(sample)}
        embeds, mask = decode_embeddings(sample)
        if self.token_length is not None:
            embeds, mask = fit_token_length(embeds, mask, self.token_length)
        return {"text_embeds": embeds, "text_mask": mask}

    def _parse(self, sample: dict[str, Any]) -> tuple[Image.Image, dict[str, Any]]:
        """The decoded RGB image and text fields; :class:`BadSample` for a sample that cannot be used."""
        sample_error(sample)
        image = decode_image(sample)
        fields = self._text(sample)
        if "latent.npy" in sample:  # precached by imagen-lib precache --autoencoder (a latent stage's)
            from imagen_lib.data.precache_latents import decode_latents

            fields["latents"] = decode_latents(sample)
        return image, fields

    def _item(self, sample: dict[str, Any], image: Image.Image, text: dict[str, Any], seed: list[int]) -> dict:
        generator = None
        if self.transform.crop == "random" or self.transform.flip:
            state = np.random.SeedSequence(seed + [sample["__index__"]]).generate_state(1, np.uint64)[0]
            generator = torch.Generator().manual_seed(int(state >> 2))
        return {"images": self.transform(image, generator), **text, "keys": sample["__key__"]}

    def _raw_samples(self, reader: tuple[int, int, int, int]) -> Iterator[dict[str, Any]]:
        """The reader's raw samples in shard order, each with its position ``__index__`` in that stream."""
        index = 0
        for url in self.reader_shards(reader):
            for sample in read_shard(url):
                sample["__index__"] = index
                index += 1
                yield sample

    def _shuffled(self, samples: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        if self.shuffle_buffer == 0:
            yield from samples
            return
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            k = rng.randrange(len(buffer))
            buffer[k], sample = sample, buffer[k]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader = self._reader()
        rank, _, reader_id, readers = reader
        skip, self._skip = self._skip_samples(reader_id, readers), None
        seed = [self.seed, self.epoch, rank, reader_id]
        rng = random.Random(int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0] >> 2))
        self.skipped = Counter()
        bad = BadSamples(f"{self!r} (process {rank}, reader {reader_id}, epoch {self.epoch})", self.max_bad_share,
                         self.skipped)
        for sample in self._shuffled(self._raw_samples(reader), rng):
            try:
                image, text = self._parse(sample)
            except BadSample as error:
                bad.bad(error, sample["__key__"], sample["__url__"])
                continue
            bad.good()
            if skip:  # a position before the resume point: checked, never transformed
                skip -= 1
                continue
            yield self._item(sample, image, text, seed)
        bad.finish("epoch")

    def __repr__(self) -> str:
        return f"ShardDataset({len(self.urls)} shards, image_size={self.transform.image_size}, text={self.text!r})"
