"""``imagen-lib train CONFIG [--out DIR] [--set key=value ...]``: train every stage of the cascade a config
describes, then write a checkpoint and a captioned sample grid, and print where they are."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML or JSON training configuration (see imagen_lib/config.py)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<config name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key, e.g. --set stages.0.train.steps=100 (repeatable)")
    parser.add_argument("--stages", type=int, nargs="+", default=None, metavar="K",
                        help="train only these stages (default: all, in order)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint when it exists")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/checkpoint from another run")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--log-every", type=int, default=50, help="steps between logged losses (default 50)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _loader(config: dict, k: int, batch_size: int, seed: int):
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from imagen_lib.config import build_dataset

    dataset, workers = build_dataset(config, config["stages"][k]["image_size"])
    collate = getattr(dataset, "collate_fn", None)
    shuffle = not isinstance(dataset, IterableDataset)  # shards shuffle themselves (shard order, buffer)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=True, num_workers=workers,
                      collate_fn=collate, generator=torch.Generator().manual_seed(seed + k))


def _prompts(config: dict) -> list[str]:
    from imagen_lib.config import sample_settings

    prompts = sample_settings(config)["prompts"]
    if prompts or (config.get("data") or {}).get("type", "shapes") != "shapes":
        return prompts
    from imagen_lib.data.shapes import sample_captions

    return sample_captions(8, seed=1234)[0]


def run(args: argparse.Namespace) -> int:
    import yaml

    from imagen_lib import checkpoint as ckpt
    from imagen_lib.config import apply_overrides, build_cascade, load_config, sample_settings, stage_training, trainer_settings
    from imagen_lib.trainer import Trainer

    start = time.time()
    config = apply_overrides(load_config(args.config), args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    checkpoint = out / "checkpoint"
    cascade = build_cascade(config)
    log_with = "tensorboard" if _has_tensorboard() else None
    trainer = Trainer(cascade, settings=trainer_settings(config), cpu=args.cpu, log_with=log_with, project_dir=out)
    main = trainer.is_main_process
    if ckpt.is_checkpoint(checkpoint):
        if args.resume:
            trainer.load(checkpoint)
        elif not args.overwrite:
            raise SystemExit(f"imagen-lib train: {checkpoint} already exists; pass --resume, --overwrite or another --out")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    seed = int(config.get("seed") or 0)
    stages = args.stages if args.stages is not None else list(range(len(cascade.stages)))
    for k in stages:
        plan = stage_training(config, k)
        remaining = plan["steps"] - trainer.steps[k]
        if remaining <= 0:
            continue
        result = trainer.fit(_loader(config, k, plan["batch_size"], seed), k, remaining, log_every=args.log_every,
                             disable_progress=args.no_progress)
        if main:
            print(f"stage {k}: {result['steps']} steps in {result['seconds']:.0f}s, final loss {result['loss']:.4f}")
    trainer.save(checkpoint, overwrite=args.overwrite)
    sample = sample_settings(config)
    prompts = _prompts(config)
    grid = None
    if prompts:
        grid = trainer.write_samples(out / "samples.png", prompts, seed=sample["seed"],
                                     num_images_per_prompt=1, disable_progress=args.no_progress)
    trainer.accelerator.end_training()
    if main:
        print(f"checkpoint: {checkpoint}")
        if grid:
            print(f"samples:    {grid}")
        print(f"done: {len(stages)} stage(s) trained in {(time.time() - start) / 60:.1f} min; "
              f"try: imagen-lib sample {checkpoint} --prompt \"{prompts[0] if prompts else 'a caption'}\" --out {out / 'samples'}")
    return 0


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None
