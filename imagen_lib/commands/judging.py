"""What the two shapes judges of ``imagen-lib eval-shapes`` share (one object: :mod:`.eval_shapes`, two:
:mod:`.eval_pairs`): sampling a caption list in batches, and writing a JSON report to any fsspec URL."""

from __future__ import annotations

import json
import posixpath
from typing import Any


def sample_in_batches(cascade: Any, texts: list[str], seed: int, *, batch_size: int = 32, progress: bool = True,
                      desc: str = "eval-shapes", **sample_kwargs: Any):
    """``cascade.sample`` over ``texts`` in batches of ``batch_size``; image ``i`` draws from ``seed + i``, so the
    images do not depend on the batch size. Returns (len(texts), 3, H, W) float images on the CPU in [0, 1]."""
    import torch
    from tqdm.auto import tqdm

    images = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=not progress):
        out = cascade.sample(texts=texts[start : start + batch_size], seed=seed + start, disable_progress=True,
                             **sample_kwargs)
        images.append(out.float().cpu())
    return torch.cat(images)


def write_json(url: str, data: Any) -> str:
    """Write ``data`` as indented JSON to ``url`` (a local path or any fsspec URL, folders made); returns ``url``."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)  # fsspec paths are '/'-separated everywhere
    with fs.open(path, "w") as handle:
        json.dump(data, handle, indent=1)
    return url
