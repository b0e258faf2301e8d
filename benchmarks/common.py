"""Pieces both sides of the benchmark share; torch and the standard library only, so that the module
imports in the peer's virtual environment as well as in ours.

- ``caption_embeddings``: the precomputed text embeddings both libraries are fed (no T5 weights are needed:
  each word has a fixed pseudo-random vector, so captions are told apart and the work per image matches).
- ``matmul_peak_flops``: the machine's fp32 (or bf16 on a GPU) matrix-multiply rate, measured in-process.
- ``count_flops``: FLOPs of one call, with ``torch.utils.flop_counter.FlopCounterMode``.
- ``time_loop``: wall-clock timing of a repeated step with warm-up, synchronising a GPU when there is one.
- ``peak_rss_mib``: the process's peak resident memory.
"""

from __future__ import annotations

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


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 1.5) -> float:
    """The best FLOP/s of square matrix multiplies (n = 1024 and 2048 on CPU, 8192 on GPU) over ``seconds``."""
    sizes = (8192,) if device.type == "cuda" else (1024, 2048)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)  # warm-up: thread pool, kernel choice
        synchronize(device)
        deadline = time.perf_counter() + seconds / len(sizes)
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            for _ in range(3):
                torch.mm(a, b)
            synchronize(device)
            best = max(best, 3 * 2 * n**3 / (time.perf_counter() - start))
    return best


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs that ``fn()`` runs (matmuls, convolutions, attention; elementwise work is not counted)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def time_loop(step: Callable[[], Any], device: torch.device, warmup: int, iters: int, min_seconds: float = 0.0) -> list[float]:
    """Seconds per call of ``step`` after ``warmup`` untimed calls; at least ``iters`` calls and ``min_seconds``."""
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


def adam_step(net: torch.nn.Module, optimizers: dict, key: str, lr: float, loss_fn: Callable[[], torch.Tensor]) -> float:
    """One optimiser step as both libraries' trainers take it: Adam (betas 0.9, 0.99; created on first use
    under ``optimizers[key]``), gradient clipping at 1.0. Returns the loss."""
    if key not in optimizers:
        optimizers[key] = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-8)
    optimizer = optimizers[key]
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())


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
