"""Train an imagen_lib cascade with Accelerate: on the CPU, one GPU, many GPUs or many machines.

    accelerate launch examples/train.py --config examples/shapes.yaml --out runs/shapes
    python examples/train.py --config examples/tiny.yaml --out runs/tiny        # one process, no launcher

How the library's parts fit together (this file only wires them; see examples/README.md for multi-GPU,
multi-machine and FSDP launches):

    config file  --imagen_lib.config-->  Cascade (text encoder + one network and diffusion process per stage)
    Accelerator  <-- mixed precision, number of processes, trackers: `accelerate launch` / `accelerate config`
    Trainer(cascade, accelerator)  --  per stage: DataLoader -> Trainer.fit (losses, sample grids, checkpoints)
    OUT/checkpoint                 <-- written after each stage; the next start of this script resumes from it

Every process runs this whole file; the Trainer keeps them in step and lets only the main process write.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset

from imagen_lib import Trainer
from imagen_lib import checkpoint as ckpt
from imagen_lib import config as cfg


def stage_choice(value: str):
    if value == "all" or value.isdigit():
        return value if value == "all" else int(value)
    raise argparse.ArgumentTypeError(f"expected 'all' or a stage index, got {value!r}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML or JSON training config (see imagen_lib/config.py)")
    parser.add_argument("--out", required=True, help="output folder: checkpoint/, samples/, tracker logs")
    parser.add_argument("--stage", type=stage_choice, default="all", help="'all' (default; in order, lowest resolution first) or one stage index")
    parser.add_argument("--data", default=None,
                        help="'shapes', or a folder of images with a same-named .txt caption beside each "
                             "(default: the config's data block)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key, e.g. --set stages.0.train.steps=100")
    parser.add_argument("--log-with", default=None, help="Accelerate tracker(s): tensorboard, wandb, all, ...")
    parser.add_argument("--log-every", type=int, default=50, help="steps between logged losses (default 50)")
    parser.add_argument("--sample-every", type=int, default=500, help="steps between sample grids (default 500; 0: never)")
    parser.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints (default 1000; 0: only after each stage)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def make_accelerator(settings, out: Path, log_with: Optional[str]):
    """The Accelerator that places everything. Under `accelerate launch` the launcher's mixed precision wins
    (it exports ACCELERATE_MIXED_PRECISION); under plain `python` the config's trainer.mixed_precision does."""
    from accelerate import Accelerator

    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", settings.mixed_precision)
    return Accelerator(mixed_precision=precision, log_with=log_with, project_dir=str(out))


def make_dataset(config: dict, data: Optional[str], image_size: int):
    """The training images at ``image_size`` (a stage's size; the cascade makes the low-resolution input
    itself) and the number of loader workers: the config's data block, or ``--data`` in its place (the
    built-in shapes, or an image folder read with the config's folder options when its block has them)."""
    if data is not None:
        block = dict(config.get("data") or {})
        block = {"type": "shapes"} if data == "shapes" else {**block, "type": "folder", "root": data}
        if block["type"] == "folder":  # keep only the options a folder block understands
            block = {k: v for k, v in block.items() if k in {"type", "num_workers", *cfg.DATA_KEYS["folder"]}}
        config = {**config, "data": block}
    return cfg.build_dataset(config, image_size)


def sample_prompts(config: dict, dataset) -> list[str]:
    """The config's sample prompts, else the captions of the first eight training images."""
    prompts = cfg.sample_settings(config)["prompts"]
    items = (dataset[i] for i in range(min(8, len(dataset))))
    return prompts or [item["texts"] for item in items if "texts" in item]


def flatten(tree: Any, prefix: str = "") -> dict:
    """Nested config -> {"stages.0.train.steps": 1000, ...}: trackers take flat scalar values only."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return {prefix: tree if isinstance(tree, (int, float, str, bool)) else str(tree)}
    out = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    config = cfg.apply_overrides(cfg.load_config(args.config), args.overrides)
    seed = int(config.get("seed") or 0)

    cascade = cfg.build_cascade(config)  # same seed on every process, so every process starts identical
    settings = cfg.trainer_settings(config)
    accelerator = make_accelerator(settings, out, args.log_with)
    trainer = Trainer(cascade, settings=settings, accelerator=accelerator)
    # different training noise on each process (the weights stay identical: DDP averages the gradients)
    torch.manual_seed(seed + accelerator.process_index)

    checkpoint = out / "checkpoint"
    if ckpt.is_checkpoint(checkpoint):
        trainer.load(checkpoint)  # weights, EMA, optimizer, schedule, step counts and RNG
        accelerator.print(f"resumed from {checkpoint} at steps {trainer.steps}")
    if args.log_with:
        accelerator.init_trackers("imagen_lib", config=flatten(config))  # tensorboard: OUT/imagen_lib/

    if cfg.parallel_settings(config) is not None:  # a CPU speed-up of `imagen-lib train`; processes here are for DDP
        accelerator.print("parallel_stages: not used by this script; the stages train in turn")
    stages = list(range(len(cascade.stages))) if args.stage == "all" else [args.stage]
    if stages[-1] >= len(cascade.stages):
        raise SystemExit(f"--stage: expected 'all' or an index in [0, {len(cascade.stages) - 1}], got {args.stage}")
    prompts = sample_prompts(config, make_dataset(config, args.data, cascade.stages[0].image_size)[0])
    for k in stages:
        plan = cfg.stage_training(config, k)
        remaining = plan["steps"] - trainer.steps[k]
        if remaining <= 0:
            accelerator.print(f"stage {k}: already trained for {trainer.steps[k]} steps")
            continue
        dataset, workers = make_dataset(config, args.data, cascade.stages[k].image_size)
        # Accelerate shards these batches over the processes, so each one sees different images; the order is
        # seeded by the step we start at, so a resumed run does not replay the order it already saw
        shuffle = not isinstance(dataset, IterableDataset)  # shards shuffle themselves (shard order, buffer)
        loader = DataLoader(dataset, batch_size=plan["batch_size"], shuffle=shuffle, drop_last=True,
                            num_workers=workers, collate_fn=dataset.collate_fn,
                            generator=torch.Generator().manual_seed(seed + 1000 * k + trainer.steps[k]))
        result = trainer.fit(
            loader, k, remaining, log_every=args.log_every, sample_every=args.sample_every or None,
            sample_prompts=prompts, out_dir=out, save_every=args.save_every or None,
            sample_seed=cfg.sample_settings(config)["seed"], disable_progress=args.no_progress,
        )
        trainer.save(checkpoint)  # every process calls it; only the main one writes
        accelerator.print(f"stage {k}: {result['steps']} steps in {result['seconds']:.0f}s, loss {result['loss']:.4f}")

    if prompts:  # the whole cascade, with the EMA weights (main process only)
        grid = trainer.write_samples(out / "samples" / "final.png", prompts, seed=cfg.sample_settings(config)["seed"])
        accelerator.print(f"samples: {grid}")
    accelerator.end_training()
    print(f"process {accelerator.process_index + 1}/{accelerator.num_processes}: done, checkpoint {checkpoint}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
