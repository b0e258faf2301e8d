"""WebDataset tar shards: images with ``txt`` captions and, when precomputed, ``emb.npy`` + ``emb_mask.npy``.

Shards may be local paths or any fsspec URL (``s3://``, ``gs://``, ``https://``, ``memory://``), given as a
list, a brace pattern (``data/shard-{0000..0099}.tar``) or a glob. Each Accelerate process and each
DataLoader worker reads its own shards (shard ``i`` of the epoch's order goes to reader
``i % (processes * workers)``), so no sample is read twice in an epoch; within a reader a shuffle buffer
mixes samples across shards. The ``webdataset`` package (the ``[webdataset]`` extra) parses and writes tars.
"""

from __future__ import annotations

import io
import os
import posixpath
import random
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from imagen_lib.data.collate import collate_image_text
from imagen_lib.data.embeddings import fit_token_length
from imagen_lib.data.transforms import ImageTransform

IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp")


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


def iter_shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard: dicts of ``__key__``, ``__url__`` and ``{extension: bytes}``."""
    import fsspec

    tariterators = _webdataset().tariterators
    with fsspec.open(url, "rb") as stream:
        files = ({**f, "__url__": url} for f in tariterators.tar_file_iterator(stream))
        yield from tariterators.group_by_keys(files)


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


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class ShardDataset(IterableDataset):
    """Image-caption samples streamed from WebDataset shards; yields the Trainer's item dicts.

    Args:
        urls: shard URLs (a list, brace pattern or glob; local or any fsspec URL).
        image_size: side of the square images (resize the shorter side, then crop).
        crop / flip: see :class:`~imagen_lib.data.transforms.ImageTransform` (default center crop, no flip).
        text: ``"auto"`` (default: precomputed embeddings when a sample has them, else its caption),
            ``"texts"`` or ``"embeddings"`` (a sample without them is an error).
        token_length: trim or pad precomputed embeddings to this many tokens (NeMo's
            ``conditioning.token_length``); default None keeps them as stored (``collate_image_text`` pads
            a batch to its longest).
        shuffle_buffer: samples mixed across shards by each reader, default 1000 (0: read in order).
        shuffle_shards: shuffle the shard order every epoch (default True), with ``seed`` + epoch.
        seed: base seed of shard order, shuffle buffer, random crop and flip (default 0).
        rank / world_size: override :func:`process_split` (default: detected).

    Items: ``{"images": (3, S, S) in [-1, 1], "texts": str}`` or ``{"images", "text_embeds" (N, D) float32,
    "text_mask" (N,) bool}``, plus ``"keys"`` (the sample's key). Call :meth:`set_epoch` before each epoch to reshuffle;
    use ``collate_fn`` with a DataLoader (and no ``shuffle``: the shard order and buffer shuffle).
    The data set splits itself by process: do not let Accelerate shard its DataLoader again.
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
        self.epoch = 0
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle shards and samples for ``epoch`` (the same order on every process)."""
        self.epoch = int(epoch)

    def reader_shards(self) -> list[str]:
        """The shards this process and DataLoader worker read this epoch."""
        rank, world = (self.rank, self.world_size) if self.rank is not None else process_split()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = list(self.urls)
        if self.shuffle_shards:
            random.Random(self.seed + self.epoch).shuffle(order)  # same on every reader
        readers = world * workers
        if len(order) < readers:
            warnings.warn(f"ShardDataset: {len(order)} shards for {readers} readers; some read nothing", stacklevel=2)
        return order[rank * workers + worker :: readers]

    def _image(self, sample: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        field = next((f for f in IMAGE_FIELDS if f in sample), None)
        if field is None:
            raise OSError(f"no image field ({', '.join(IMAGE_FIELDS)})")
        with Image.open(io.BytesIO(sample[field])) as image:
            return self.transform(image, generator)

    def _text(self, sample: dict[str, Any]) -> dict[str, Any]:
        has_embeds = "emb.npy" in sample
        if self.text == "texts" or (self.text == "auto" and not has_embeds):
            return {"texts": sample.get("txt", b"").decode("utf-8").strip()}
        if not has_embeds:
            raise ValueError(
                f"sample {sample['__key__']} in {sample['__url__']} has no emb.npy; run imagen-lib precache"
            )
        embeds = torch.from_numpy(_load_npy(sample["emb.npy"])).float()
        mask = torch.from_numpy(_load_npy(sample["emb_mask.npy"])).bool()
        if self.token_length is not None:
            embeds, mask = fit_token_length(embeds, mask, self.token_length)
        return {"text_embeds": embeds, "text_mask": mask}

    def _samples(self, generator: torch.Generator) -> Iterator[dict[str, Any]]:
        for url in self.reader_shards():
            for sample in iter_shard_samples(url):
                try:
                    image = self._image(sample, generator)
                except (OSError, SyntaxError, ValueError) as error:  # what PIL raises for a broken image
                    self.skipped += 1
                    warnings.warn(f"ShardDataset: skipped sample {sample['__key__']} in {url}: {error}", stacklevel=2)
                    continue
                yield {"images": image, **self._text(sample), "keys": sample["__key__"]}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, _ = (self.rank, self.world_size) if self.rank is not None else process_split()
        info = get_worker_info()
        entropy = [self.seed, self.epoch, rank, info.id if info is not None else 0]
        reader_seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 2)
        generator = torch.Generator().manual_seed(reader_seed)
        rng = random.Random(reader_seed)
        if self.shuffle_buffer == 0:
            yield from self._samples(generator)
            return
        buffer: list[dict[str, Any]] = []
        for item in self._samples(generator):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            k = rng.randrange(len(buffer))
            buffer[k], item = item, buffer[k]
            yield item
        rng.shuffle(buffer)
        yield from buffer

    def __repr__(self) -> str:
        return f"ShardDataset({len(self.urls)} shards, image_size={self.transform.image_size}, text={self.text!r})"
