"""Pieces both sides of the benchmark share; torch and the standard library only, so that the module
imports in the peer's virtual environment as well as in ours.

- ``caption_embeddings``: the precomputed text embeddings both libraries are fed (no T5 weights are needed:
  each word has a fixed pseudo-random vector, so captions are told apart and the work per image matches).
- ``matmul_peak_flops`` / ``matmul_seconds``: the machine's fp32 (or bf16 on a GPU) matrix-multiply rate,
  measured in-process.
- ``count_flops``: FLOPs of one call, with ``torch.utils.flop_counter.FlopCounterMode``.
- ``time_loop``: wall-clock timing of a repeated step with warm-up, synchronising a GPU when there is one.
- ``peak_rss_mib``: the process's peak resident memory.
- ``Side``: what both libraries' sides (ours_side.py, peer_side.py) offer the measurements, with the shared
  optimiser step.
"""

from __future__ import annotations

import abc
import math
import re
import resource
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

TEXT_EMBED_DIM = 768  # T5 v1.1 base's width, what the peer defaults to
MAX_TEXT_LEN = 16  # longer than every shapes caption (at most 13 words)
BATCH_SIZE = 16


def _word_vector(word: str, dim: int) -> torch.Tensor:
    # one fixed vector per word, seeded by the word's CRC so that both processes agree without a file
    g = torch.Generator().manual_seed(zlib.crc32(word.encode()))
    return torch.randn(dim, generator=g)


def caption_embeddings(
    texts: Sequence[str], dim: int = TEXT_EMBED_DIM, max_len: int = MAX_TEXT_LEN
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings (B, max_len, dim) and mask (B, max_len) bool for ``texts``.

    Each word maps to a fixed unit-variance vector plus a small sinusoidal position code (so word order is
    visible, as in a real encoder's output); padding rows are zero and masked out.
    """
    embeds = torch.zeros(len(texts), max_len, dim)
    mask = torch.zeros(len(texts), max_len, dtype=torch.bool)
    freqs = torch.exp(-math.log(1e4) * torch.arange(0, dim, 2) / dim)
    for row, text in enumerate(texts):
        words = re.findall(r"[a-z]+", text.lower())[:max_len]
        if not words:
            raise ValueError(f"text {row} has no words: {text!r}")
        for pos, word in enumerate(words):
            position = torch.zeros(dim)
            position[0::2] = torch.sin(pos * freqs)
            position[1::2] = torch.cos(pos * freqs)
            embeds[row, pos] = _word_vector(word, dim) + 0.3 * position
            mask[row, pos] = True
    return embeds, mask


def random_text_batch(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of shapes-like captions' embeddings for throughput runs (content does not matter)."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle"]
    texts = [
        f"a large {colours[(i + seed) % 6]} {shapes[(i + seed) % 3]} in the top left corner on a white background"
        for i in range(batch)
    ]
    return caption_embeddings(texts)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_seconds(
    device: torch.device, dtype: torch.dtype, n: int, *, products: int = 1, warmup: int = 1, iters: int = 1,
    min_seconds: float = 0.0,
) -> list[float]:
    """Seconds of each timed call of ``products`` back-to-back n x n x n ``torch.mm`` products (2 n^3 FLOPs
    each), after ``warmup`` untimed calls; at least ``iters`` calls and ``min_seconds`` (see ``time_loop``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def call() -> None:
        for _ in range(products):
            torch.mm(a, b)

    return time_loop(call, device, warmup, iters, min_seconds)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 1.5) -> float:
    """The best FLOP/s of square matrix multiplies timed three at a time (n = 1024 and 2048 on CPU, 8192 on
    GPU) over ``seconds``."""
    sizes = (8192,) if device.type == "cuda" else (1024, 2048)
    times = {n: matmul_seconds(device, dtype, n, products=3, min_seconds=seconds / len(sizes)) for n in sizes}
    return max(3 * 2 * n**3 / min(t) for n, t in times.items())


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs that ``fn()`` runs (matmuls, convolutions, attention; elementwise work is not counted)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def time_loop(
    step: Callable[[], Any], device: torch.device, warmup: int, iters: int, min_seconds: float = 0.0
) -> list[float]:
    """Seconds per call of ``step`` after ``warmup`` untimed calls; at least ``iters`` calls and
    ``min_seconds``."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times: list[float] = []
    total = 0.0
    while len(times) < iters or total < min_seconds:
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
        total += times[-1]
    return times


class Side(abc.ABC):
    """One library as the benchmark drives it (worker.py, quality.py, profile_step.py): one stage's network
    (``"base"`` or ``"sr"``), its training loss and optimiser step, and sampling of its two-stage cascade.
    ``optimizers`` holds one optimiser per stage, made by that stage's first step at the rate ``lr``."""

    name = ""
    image_sizes: dict[str, int]  # stage -> side of its images

    def __init__(self, device: torch.device, lr: float):
        self.device, self.lr = device, lr
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    @abc.abstractmethod
    def network(self, stage: str) -> torch.nn.Module:
        """The network of ``stage``."""

    @abc.abstractmethod
    def loss(
        self, stage: str, images: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """The training loss of ``stage`` on ``images`` in [-1, 1] at the stage's size (each library makes the
        super-resolution stage's low-resolution input itself)."""

    def step(self, stage: str, images: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor) -> float:
        """One optimiser step as both libraries' trainers take it: Adam (betas 0.9, 0.99), gradient clipping
        at 1.0. Returns the loss."""
        net = self.network(stage)
        if stage not in self.optimizers:
            self.optimizers[stage] = torch.optim.Adam(net.parameters(), lr=self.lr, betas=(0.9, 0.99), eps=1e-8)
        optimizer = self.optimizers[stage]
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(stage, images, text_embeds, text_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def sample(
        self, text_embeds: torch.Tensor, text_mask: torch.Tensor, *, cond_scale: float = 3.0, steps: int = 32,
        sampler: str = "heun", seed: int = 0,
    ) -> torch.Tensor:
        """Images (B, 3, 64, 64) in [0, 1] from the two-stage cascade with ``sampler`` (default "heun") at
        ``steps`` steps per stage (default 32) and guidance ``cond_scale`` (default 3), seeded."""
        return self._sample(text_embeds, text_mask, cond_scale=cond_scale, steps=steps, sampler=sampler, seed=seed)

    @abc.abstractmethod
    def _sample(
        self, text_embeds: torch.Tensor, text_mask: torch.Tensor, *, cond_scale: float, steps: int, sampler: str,
        seed: int,
    ) -> torch.Tensor:
        """What :meth:`sample` runs, under ``torch.no_grad``."""


def parse_samplers(text: str) -> list[tuple[str, int]]:
    """``heun:32,dpmpp_2m:12`` -> [("heun", 32), ("dpmpp_2m", 12)]."""
    out = []
    for item in text.split(","):
        name, _, steps = item.partition(":")
        out.append((name.strip(), int(steps)))
    return out


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
