"""Peak GPU memory per process of a ``base64-2b`` training step under data parallel, FSDP 2 and FSDP 2 with
activation checkpointing: the measured counterpart of docs/scale-out.md's computed table (not run yet: it needs
several GPUs).

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision no benchmarks/fsdp_gpu.py --mode fsdp
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision no benchmarks/fsdp_gpu.py --mode fsdp --ckpt
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision no benchmarks/fsdp_gpu.py --mode ddp --ckpt

Each run: the Trainer as training builds it (AdamW, EMA, bf16 autocast, gradient clipping) on one ``--preset``
stage fed precomputed random text embeddings (width 1024, ``--text-len`` tokens), ``--steps`` optimizer steps of
``--batch`` examples per process in chunks of ``--chunk``, then a checkpoint gathered to ``--out`` (timed).
The main process prints one ``RESULT {json}`` line: peak allocated and reserved GB per process (the largest over
processes), seconds per step after the first, save seconds.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("ddp", "fsdp"), required=True)
    parser.add_argument("--ckpt", action="store_true", help="the network's gradient_checkpointing")
    parser.add_argument("--preset", default="base64-2b")
    parser.add_argument("--batch", type=int, default=16, help="examples per process and step [16]")
    parser.add_argument("--chunk", type=int, default=8, help="trainer.max_batch_size [8]")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--out", default="/tmp/fsdp_gpu_checkpoint")
    return parser.parse_args()


def main() -> None:
    from imagen_lib.config import build_cascade, trainer_settings
    from imagen_lib.training.trainer import Trainer

    args = parse_args()
    network = {"preset": args.preset, "config": {"gradient_checkpointing": args.ckpt}}
    config = {"seed": 0, "text_embed_dim": 1024, "stages": [
        {"image_size": 64, "network": network, "diffusion": {"kind": "ElucidatedDiffusion"}, "train": {"steps": 1}}],
        "trainer": {"mixed_precision": "bf16", "max_batch_size": args.chunk, "fsdp": args.mode == "fsdp"}}
    trainer = Trainer(build_cascade(config), settings=trainer_settings(config))
    assert trainer.sharded == (args.mode == "fsdp"), "FSDP asked for but not active (several GPUs needed)"
    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(trainer.accelerator.process_index)
    times = []
    for _ in range(args.steps):
        batch = {"images": torch.rand(args.batch, 3, 64, 64, generator=g) * 2 - 1,
                 "text_embeds": torch.randn(args.batch, args.text_len, 1024, generator=g),
                 "text_mask": torch.ones(args.batch, args.text_len, dtype=torch.bool)}
        torch.cuda.synchronize()
        start = time.time()
        trainer.train_step(0, batch)
        torch.cuda.synchronize()
        times.append(time.time() - start)
    peaks = torch.tensor([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()], device=trainer.device)
    peaks = trainer.accelerator.reduce(peaks, reduction="max") if trainer.accelerator.num_processes > 1 else peaks
    start = time.time()
    trainer.save(args.out, overwrite=True)
    saved = time.time() - start
    if trainer.is_main_process:
        result = {"mode": args.mode, "ckpt": args.ckpt, "preset": args.preset, "processes":
                  trainer.accelerator.num_processes, "batch": args.batch, "chunk": args.chunk,
                  "peak_allocated_gb": float(peaks[0]) / 1e9, "peak_reserved_gb": float(peaks[1]) / 1e9,
                  "seconds_per_step": sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0],
                  "save_seconds": saved}
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
