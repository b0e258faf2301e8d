"""Where a training step's time goes: ``torch.profiler`` over a few optimiser steps of one stage.

Returns the top operators by self CPU time (and CUDA time on a GPU) and, with --artifacts, writes the
full table and a Chrome trace there.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import common
import torch
from torch.profiler import ProfilerActivity, profile

STAGE_SIZE = {"base": 32, "sr": 64}


def run(side: Any, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    stage, size, batch = args.stage, STAGE_SIZE[args.stage], args.batch
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    embeds, mask = (t.to(device) for t in common.random_text_batch(batch))

    def step() -> None:
        side.step(stage, images, embeds, mask)

    for _ in range(max(args.warmup, 1)):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True, with_stack=False) as prof:
        for _ in range(max(args.iters, 1)):
            step()
        common.synchronize(device)
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages) or 1.0
    top = sorted(averages, key=lambda e: getattr(e, sort_key.replace("cuda", "device"), e.self_cpu_time_total),
                 reverse=True)[:25]
    rows = [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3 / max(args.iters, 1),
             "share": e.self_cpu_time_total / total} for e in top]
    by_shape = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: e.self_cpu_time_total, reverse=True)
    rows_by_shape = [{"op": e.key, "shapes": str(e.input_shapes)[:120], "calls": e.count,
                      "self_cpu_ms": e.self_cpu_time_total / 1e3 / max(args.iters, 1),
                      "share": e.self_cpu_time_total / total} for e in by_shape[:15]]
    if args.artifacts:
        out = Path(args.artifacts)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"profile_{args.lib}_{stage}.txt").write_text(
            averages.table(sort_by=sort_key, row_limit=40) + "\n\n"
            + prof.key_averages(group_by_input_shape=True).table(sort_by=sort_key, row_limit=40))
        prof.export_chrome_trace(str(out / f"profile_{args.lib}_{stage}.trace.json"))
    return {"stage": stage, "iters": args.iters, "top_ops": rows, "top_ops_by_shape": rows_by_shape}
