"""Reproducible noise: every random draw of the library goes through :func:`randn` / :func:`rand`.

``generator`` is ``None`` (torch's global RNG), one ``torch.Generator``, or a list with one generator per batch
row: then row ``k`` comes only from generator ``k``, so an image does not depend on the batch it is drawn in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

Generator = Union[None, torch.Generator, Sequence[torch.Generator]]


def _draw(fn, shape: Sequence[int], generator: Generator, device, dtype) -> Tensor:
    """Draw with ``fn`` (torch.randn / torch.rand) following the one-generator-per-row rule."""
    shape = tuple(int(s) for s in shape)
    dtype = dtype or torch.get_default_dtype()
    if generator is None:
        return fn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        # draw on the generator's device so a CPU generator gives the same numbers on every device
        return fn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    generators = list(generator)
    if not generators or not all(isinstance(g, torch.Generator) for g in generators):
        raise TypeError("generator: expected None, a torch.Generator or a list of torch.Generator")
    if len(shape) == 0 or shape[0] != len(generators):
        raise ValueError(
            f"generator: a list of {len(generators)} generators needs a batch of {len(generators)} rows, "
            f"got shape {shape}"
        )
    rows = [fn(shape[1:], generator=g, device=g.device, dtype=dtype).to(device) for g in generators]
    return torch.stack(rows)


def randn(shape: Sequence[int], generator: Generator = None, device=None, dtype=None) -> Tensor:
    """Standard normal noise of ``shape``.

    ``generator`` is ``None`` (global RNG), one ``torch.Generator``, or a list with one generator per batch
    row: then row ``k`` comes only from generator ``k``, so an image does not depend on its batch. Noise is
    drawn on the generator's device and moved to ``device``, so a CPU generator gives the same numbers for
    CPU and GPU sampling.
    """
    return _draw(torch.randn, shape, generator, device, dtype)


def rand(shape: Sequence[int], generator: Generator = None, device=None, dtype=None) -> Tensor:
    """Uniform noise in [0, 1) of ``shape``, with the same generator rule as :func:`randn`."""
    return _draw(torch.rand, shape, generator, device, dtype)

