"""Quality per compute: train both stages for the same wall-clock minutes on captioned shapes, then judge
the cascade's images of fixed prompts with the shapes reader.

Both libraries see the same batches (items ``16 k .. 16 k + 15`` of ``ShapesDataset(seed=0)`` at step k, at
the base stage's size (32 px; 16 px for our ``quickstart`` recipe) and 64 px for the super-resolution stage),
the same text embeddings (``common.caption_embeddings``), the same optimiser (Adam, the same learning rate,
gradient clipping 1.0), the same learning-rate warm-up and the same EMA of the weights (beta 0.995 by
default: in minutes of training the peer's default 0.9999 would still be the initial weights). Only the time
spent in training steps counts against the budget; rendering the batches is done before the clock runs.
On a CPU the clock is the process's CPU time divided by its threads: wall time on an idle machine, and a
fair budget on a machine shared with other work (see ``train_stage``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import common
import torch


def _shapes():
    # imagen_lib comes from the checkout (child.py puts it on PYTHONPATH): the peer's venv borrows the data
    # set and the judge from it
    from imagen_lib.data.shapes import ShapesDataset, sample_captions
    from imagen_lib.data.shapes_reader import score_shapes

    return ShapesDataset, sample_captions, score_shapes


class Batches:
    """Batch k of the shapes data set at one size, with its text embeddings, rendered once and cached."""

    def __init__(self, image_size: int, batch: int, device: torch.device, prefetch: int = 64):
        shapes_dataset, _, _ = _shapes()
        self.data = shapes_dataset(image_size=image_size, length=10_000_000, seed=0)
        self.batch, self.device, self.prefetch = batch, device, prefetch
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def fill(self, start: int) -> None:
        """Render batches ``start .. start + prefetch - 1`` (outside the timed region)."""
        self.cache.clear()
        for k in range(start, start + self.prefetch):
            items = self.data.batch(range(k * self.batch, (k + 1) * self.batch))
            embeds, mask = common.caption_embeddings(items["texts"])
            self.cache[k] = (items["images"].to(self.device), embeds.to(self.device), mask.to(self.device))

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if k not in self.cache:
            self.fill(k)
        return self.cache[k]


def warmup_lr(args: argparse.Namespace, step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based): linear warm-up over --lr-warmup steps, then --lr."""
    return args.lr * min(1.0, (step + 1) / max(args.lr_warmup, 1))


def train_stage(side: Any, stage: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Optimiser steps on ``stage`` until its minutes (--minutes base, --sr-minutes SR) of step time have passed.

    Both libraries get the same schedule: linear warm-up to --lr, and an EMA of the weights (ema-pytorch,
    --ema-beta, updated every step after the warm-up; both libraries' own trainers use ema-pytorch) that
    replaces the trained weights before judging. The EMA update is inside the timed step."""
    from ema_pytorch import EMA

    batches = Batches(side.image_sizes[stage], args.batch, device)
    minutes = args.minutes if stage == "base" else args.sr_minutes
    budget, spent, wall, step, losses = minutes * 60.0, 0.0, 0.0, 0, []
    threads = torch.get_num_threads()
    torch.manual_seed(1)
    net = side.network(stage)
    ema = EMA(net, beta=args.ema_beta, update_after_step=args.lr_warmup, update_every=1) if args.ema_beta > 0 else None
    side.lr = warmup_lr(args, 0)  # the optimiser is created by the first step with this rate
    while spent < budget:
        images, embeds, mask = batches[step]
        start, start_cpu = time.perf_counter(), time.process_time()
        for group in side.optimizers[stage].param_groups if stage in side.optimizers else ():
            group["lr"] = warmup_lr(args, step)
        losses.append(side.step(stage, images, embeds, mask))
        if ema is not None:
            ema.update()
        common.synchronize(device)
        wall += time.perf_counter() - start
        # On a GPU the clock is wall time. On a CPU shared with other work it is this process's CPU time
        # per thread: the same as wall time on an idle machine, but not lengthened when others take the cores.
        spent = wall if device.type == "cuda" else spent + (time.process_time() - start_cpu) / threads
        step += 1
    if ema is not None:
        net.load_state_dict(ema.ema_model.state_dict())
    tail = losses[-20:]
    return {"steps": step, "seconds": spent, "wall_seconds": wall, "images_seen": step * args.batch,
            "final_loss": sum(tail) / len(tail)}


def judge(side: Any, device: torch.device, args: argparse.Namespace, sampler: str, steps: int,
          save_to: Path | None = None) -> dict[str, Any]:
    """Sample the eval prompts in batches of 16 with one sampler setting and score them."""
    _, sample_captions, score_shapes = _shapes()
    texts, attributes = sample_captions(args.eval_n, seed=1234)
    embeds, mask = common.caption_embeddings(texts)
    start, outs = time.perf_counter(), []
    for i in range(0, len(texts), 16):
        outs.append(side.sample(embeds[i:i + 16].to(device), mask[i:i + 16].to(device),
                                cond_scale=args.cond_scale, steps=steps, sampler=sampler, seed=10_000 + i).cpu())
    elapsed = time.perf_counter() - start
    images = torch.cat(outs)
    report = score_shapes(images, attributes, value_range=(0.0, 1.0))
    if save_to is not None:
        save_grid(images[:32], save_to)
    return {"sampler": sampler, "steps": steps, "all_correct": report["all_correct"],
            "accuracy": report["accuracy"], "seconds_per_image": elapsed / len(texts)}


def save_grid(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    from PIL import Image

    n = images.shape[0]
    rows = (n + columns - 1) // columns
    size = images.shape[-1]
    grid = torch.ones(3, rows * size, columns * size)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[:, r * size:(r + 1) * size, c * size:(c + 1) * size] = img
    array = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def run(side: Any, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    training = {stage: train_stage(side, stage, device, args) for stage in ("base", "sr")}
    artifacts = Path(args.artifacts) if args.artifacts else None
    judged = []
    for i, (sampler, steps) in enumerate(common.parse_samplers(args.samplers)):
        grid = artifacts / f"quality_{args.lib}_{sampler}{steps}.png" if artifacts and i == 0 else None
        judged.append(judge(side, device, args, sampler, steps, grid))
    return {"recipe": getattr(side, "recipe", "-"), "sizes": side.image_sizes,
            "minutes": {"base": args.minutes, "sr": args.sr_minutes}, "batch": args.batch, "lr": args.lr,
            "lr_warmup": args.lr_warmup, "ema_beta": args.ema_beta, "eval_n": args.eval_n,
            "cond_scale": args.cond_scale, "training": training, "judged": judged,
            "params": {s: common.param_count(side.network(s)) for s in ("base", "sr")},
            "peak_rss_mib": common.peak_rss_mib()}

