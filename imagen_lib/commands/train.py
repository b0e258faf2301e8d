"""``imagen-lib train CONFIG [--out DIR] [--set key=value ...]``: train every stage of the cascade a config
describes, then write a checkpoint and a captioned sample grid, and print where they are. The training itself
is :func:`imagen_lib.training.loop.train_stages`, the loop ``examples/train.py`` runs too."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML or JSON training configuration (see imagen_lib/config/__init__.py)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<config name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key, e.g. --set stages.0.train.steps=100 (repeatable)")
    parser.add_argument("--stages", type=int, nargs="+", default=None, metavar="K",
                        help="train only these stages (default: all, in order)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoint (an error when there is none), data order included")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/checkpoint from another run")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--log-every", type=int, default=50, help="steps between logged losses (default 50)")
    parser.add_argument("--save-every", type=int, default=None, metavar="N",
                        help="steps between checkpoints within a stage (default: the config's trainer.save_every, "
                             "else after each stage only; 0: after each stage only)")
    parser.add_argument("--keep-last", type=int, default=None, metavar="N",
                        help="checkpoint versions kept (default: the config's trainer.keep_last, 2)")
    parser.add_argument("--extend", action="store_true",
                        help="with --resume: train to the config's (new) step counts, recomputing each stage's "
                             "learning-rate schedule (without it, other steps than the checkpoint's are an error)")
    parser.add_argument("--sample-every", type=int, default=None, metavar="N",
                        help="steps between sample grids in OUT/samples/ (default: only the final OUT/samples.png)")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=None, metavar="N",
                        help="loader batches per optimizer step (default: the config's "
                             "trainer.gradient_accumulation_steps, 1); steps and schedules count optimizer steps")
    add_scale_out_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_scale_out_arguments(parser: argparse.ArgumentParser) -> None:
    """``--fsdp`` and ``--compile`` (``imagen-lib train`` and ``examples/train.py``): config values, see
    :func:`setting_overrides`."""
    parser.add_argument("--fsdp", action="store_true",
                        help="shard weights, gradients, optimizer state and EMA over the GPUs (FSDP 2 through "
                             "Accelerate; trainer.fsdp); or launch with an Accelerate FSDP config file instead")
    parser.add_argument("--compile", nargs="?", const="true", default=None, metavar="BACKEND",
                        help="torch.compile the networks for training (trainer.compile; BACKEND: inductor [default], "
                             "aot_eager, eager, cudagraphs)")


def run(args: argparse.Namespace) -> int:
    from imagen_lib.config import apply_overrides, build_cascade, load_config, trainer_settings
    from imagen_lib.training.loop import RunOptions, train_stages
    from imagen_lib.training.trainer import Trainer

    start = time.time()
    config = apply_overrides(load_config(args.config), args.overrides + setting_overrides(args))
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    log_with = "tensorboard" if _has_tensorboard() else None
    trainer = Trainer(build_cascade(config), settings=trainer_settings(config), cpu=args.cpu, log_with=log_with,
                      project_dir=out)
    options = RunOptions(stages=args.stages, resume=args.resume, overwrite=args.overwrite, log_every=args.log_every,
                         save_every=args.save_every, keep_last=args.keep_last, extend=args.extend,
                         sample_every=args.sample_every, progress=not args.no_progress)
    result = train_stages(trainer, config, out, options)  # its errors name what to pass (--resume, --overwrite)
    if trainer.is_main_process:
        prompt = result.prompts[0] if result.prompts else "a caption"
        print(f"checkpoint: {result.checkpoint}")
        if result.samples:
            print(f"samples:    {result.samples}")
        print(f"done: {len(result.trained)} stage(s) trained in {(time.time() - start) / 60:.1f} min; "
              f"try: imagen-lib sample {result.checkpoint} --prompt \"{prompt}\" --out {out / 'samples'}")
    return 0


def accumulation_override(args: argparse.Namespace) -> list[str]:
    """``--gradient-accumulation-steps N`` as the config assignment it stands for (so OUT/config.yaml, a
    resumed run and stages trained in their own processes see it), or none."""
    steps = getattr(args, "gradient_accumulation_steps", None)
    return [] if steps is None else [f"trainer.gradient_accumulation_steps={steps}"]


def setting_overrides(args: argparse.Namespace) -> list[str]:
    """The trainer flags (``--gradient-accumulation-steps``, ``--fsdp``, ``--compile``) as the config assignments
    they stand for, like :func:`accumulation_override`."""
    out = accumulation_override(args)
    if getattr(args, "fsdp", False):
        out.append("trainer.fsdp=true")
    if getattr(args, "compile", None) is not None:
        out.append(f"trainer.compile={args.compile}")
    return out


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None
