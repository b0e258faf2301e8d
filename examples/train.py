"""Train an imagen_lib cascade with Accelerate: on the CPU, one GPU, many GPUs or many machines.

    accelerate launch examples/train.py --config examples/shapes.yaml --out runs/shapes
    python examples/train.py --config examples/tiny.yaml --out runs/tiny        # one process, no launcher
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/train.py ...  # 2 CPU processes

How the library's parts fit together (this file only wires them; see examples/README.md for multi-GPU,
multi-machine and FSDP launches):

    config file  --imagen_lib.config-->  Cascade (text encoder + one network and diffusion process per stage)
    Accelerator  <-- number of processes: `accelerate launch` / `accelerate config`; trackers: --log-with
    Trainer(cascade, accelerator)   <-- mixed precision: the launcher's, else the config's trainer block
    train_stages(trainer, config)   --  per stage: DataLoader -> Trainer.fit (losses, sample grids, checkpoints)
    OUT/checkpoint                  <-- written after each stage; the next start of this script resumes from it

The loop (imagen_lib.training.loop.train_stages) is the one `imagen-lib train` runs: same data order, same
resuming. Every process runs this whole file; the Trainer keeps them in step and lets only the main process write.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from imagen_lib import Trainer
from imagen_lib import config as cfg
from imagen_lib.commands.train import add_scale_out_arguments, setting_overrides
from imagen_lib.training.launcher import single_process_launch_warning
from imagen_lib.training.loop import RunOptions, tracker_options, train_stages
from imagen_lib.training.sharding import fsdp_plugin


def stage_choice(value: str):
    if value == "all" or value.isdigit():
        return value if value == "all" else int(value)
    raise argparse.ArgumentTypeError(f"expected 'all' or a stage index, got {value!r}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True,
                        help="YAML or JSON training config (see imagen_lib/config/__init__.py)")
    parser.add_argument("--out", required=True, help="output folder: checkpoint/, samples/, tracker logs")
    parser.add_argument("--stage", type=stage_choice, default="all",
                        help="'all' (default; in order, lowest resolution first) or one stage index")
    parser.add_argument("--data", default=None,
                        help="'shapes', or a folder of images with a same-named .txt caption beside each "
                             "(default: the config's data block)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key, e.g. --set stages.0.train.steps=100")
    parser.add_argument("--log-with", default=None,
                        help="tracker(s): tensorboard, wandb, all (those installed) or none (default: the config's "
                             "tracking.log_with, else none); logs in OUT/ unless tracking.logging_dir says otherwise")
    parser.add_argument("--log-every", type=int, default=50, help="steps between logged losses (default 50)")
    parser.add_argument("--sample-every", type=int, default=500,
                        help="steps between sample grids (default 500; 0: never)")
    parser.add_argument("--save-every", type=int, default=None,
                        help="steps between checkpoints (default: the config's trainer.save_every, else 1000; "
                             "0: only after each stage)")
    parser.add_argument("--keep-last", type=int, default=None,
                        help="checkpoint versions kept (default: the config's trainer.keep_last, 2)")
    parser.add_argument("--extend", action="store_true",
                        help="continue a run with the config's (new) step counts, recomputing each stage's "
                             "learning-rate schedule (without it, other steps than the checkpoint's are an error)")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=None, metavar="N",
                        help="loader batches per optimizer step (default: the config's "
                             "trainer.gradient_accumulation_steps, 1); effective batch: batch_size * N * processes")
    add_scale_out_arguments(parser)  # --fsdp, --compile [BACKEND]
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def with_data(config: dict, data: Optional[str]) -> dict:
    """The config with ``--data`` in place of its data block: the built-in shapes, or an image folder read
    with the config's folder options when its block has them (None: the config as it is)."""
    if data is None:
        return config
    block = dict(config.get("data") or {})
    block = {"type": "shapes"} if data == "shapes" else {**block, "type": "folder", "root": data}
    if block["type"] == "folder":  # keep only the options a folder block understands
        block = {k: v for k, v in block.items() if k in {"type", "num_workers", *cfg.DATA_KEYS["folder"]}}
    return {**config, "data": block}


def make_trainer(config: dict, out: Path, log_with: Optional[str]) -> Trainer:
    """The Accelerator places everything and joins the processes; its own mixed precision stays "no" because
    the Trainer applies the precision itself: under `accelerate launch` the launcher's (it exports
    ACCELERATE_MIXED_PRECISION), under plain `python` the config's trainer.mixed_precision."""
    from accelerate import Accelerator

    trackers = tracker_options(config, out, log_with)  # {log_with, project_dir}; a missing tracker fails here
    # first the cascade (same seed on every process, so every process starts identical): a tiny T5 built from
    # its seed is saved and read back, and transformers saves on the first process only once they are joined
    cascade = cfg.build_cascade(config)
    settings = cfg.trainer_settings(config)
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", settings.mixed_precision)
    # --fsdp / trainer.fsdp: the library's FSDP 2 plan (an Accelerate FSDP config file brings its own plugin)
    plugin = fsdp_plugin() if settings.fsdp else None
    accelerator = Accelerator(mixed_precision="no", fsdp_plugin=plugin, **trackers)
    return Trainer(cascade, settings=dataclasses.replace(settings, mixed_precision=precision), accelerator=accelerator)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    overrides = args.overrides + setting_overrides(args)  # as config values, so OUT/config.yaml records them
    config = with_data(cfg.apply_overrides(cfg.load_config(args.config), overrides), args.data)
    trainer = make_trainer(config, out, args.log_with)
    warning = single_process_launch_warning(trainer.accelerator.num_processes)
    if warning:  # `accelerate launch --cpu --num_processes 2` without MPI: one process, and nothing else says so
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    save_every = args.save_every
    if save_every is None:  # the config's trainer.save_every, else every 1000 steps
        save_every = trainer.settings.save_every or 1000
    options = RunOptions(stages=None if args.stage == "all" else [args.stage], resume=None,  # resume when OUT has one
                         log_every=args.log_every, sample_every=args.sample_every or None, save_every=save_every,
                         keep_last=args.keep_last, extend=args.extend, progress=not args.no_progress)
    result = train_stages(trainer, config, out, options)  # tensorboard logs: OUT/imagen_lib/ (by default)
    if result.samples:
        print(f"samples: {result.samples}")
    acc = trainer.accelerator
    print(f"process {acc.process_index + 1}/{acc.num_processes}: done, checkpoint {result.checkpoint}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
