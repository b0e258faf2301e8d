"""``imagen-lib train CONFIG [--out DIR] [--set key=value ...]``: train every stage of the cascade a config
describes, then write a checkpoint and a captioned sample grid, and print where they are. The training itself
is :func:`imagen_lib.training.loop.train_stages`, the loop ``examples/train.py`` runs too."""

from __future__ import annotations

import argparse
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional


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
    parser.add_argument("--log-with", default=None, metavar="TRACKER",
                        help="tensorboard, wandb, all (those installed) or none: where losses, learning rates, "
                             "gradient norms, images/s and sample grids are logged (default: the config's "
                             "tracking.log_with, else tensorboard when it is installed); logs in OUT/ unless "
                             "tracking.logging_dir says otherwise")
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
    from imagen_lib.training import tracking
    from imagen_lib.training.loop import RunOptions, tracker_options, train_stages
    from imagen_lib.training.trainer import Trainer

    start = time.time()
    config = apply_overrides(load_config(args.config), args.overrides + setting_overrides(args))
    check_stage_choice(args.stages, config)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    default = "tensorboard" if tracking.is_installed("tensorboard") else None  # as before --log-with existed
    trackers = tracker_options(config, out, args.log_with, default=default)  # before the cascade is built
    trainer = Trainer(build_cascade(config), settings=trainer_settings(config), cpu=args.cpu, **trackers)
    options = RunOptions(stages=args.stages, resume=args.resume, overwrite=args.overwrite, log_every=args.log_every,
                         save_every=args.save_every, keep_last=args.keep_last, extend=args.extend,
                         sample_every=args.sample_every, progress=not args.no_progress)
    result = train_stages(trainer, config, out, options)  # its errors name what to pass (--resume, --overwrite)
    if trainer.is_main_process:
        print(f"checkpoint: {result.checkpoint}")
        if result.samples:
            print(f"samples:    {result.samples}")
        print(f"done: {len(result.trained)} stage(s) trained in {(time.time() - start) / 60:.1f} min; "
              f"try: {sample_command(trainer.cascade, config, result.checkpoint, result.prompts, out / 'samples')}")
    return 0


def check_stage_choice(stages: Optional[list], config: dict) -> None:
    """``--stages``: indices of the config's stages (checked before anything is built)."""
    count = len(config.get("stages") or [])
    bad = [k for k in stages or [] if not 0 <= k < count]
    if bad:
        raise ValueError(f"--stages: expected stage indices in [0, {count - 1}] (the config has {count} stages), "
                         f"got {bad[0]}")


def sample_command(cascade, config: dict, checkpoint: Path, prompts: Sequence[str], out: Path) -> str:
    """The ``imagen-lib sample`` command for the trained checkpoint; one trained on precomputed embeddings
    holds no text encoder, so it names the T5 they came from (``--encoder``; read from a folder's embedding
    store, else a placeholder)."""
    prompt = prompts[0] if prompts else "a caption"
    command = f"imagen-lib sample {checkpoint} --prompt \"{prompt}\" --out {out}"
    if cascade.text_encoder is not None or cascade.text_embed_dim is None:
        return command
    name, max_length = _embeddings_encoder(config)
    command += f" --encoder {shlex.quote(name) if name else 'T5_NAME_OR_FOLDER'}"
    if max_length not in (None, 128):  # imagen-lib sample's default
        command += f" --max-length {max_length}"
    return command if name else command + " (the T5 that encoded the training captions)"


def _embeddings_encoder(config: dict) -> tuple[Optional[str], Optional[int]]:
    """The T5 name or folder and token length of the encoder that made a folder's precomputed embeddings (as
    its store records them), or (None, None) when the data does not say (shards)."""
    from imagen_lib.config import data_block
    from imagen_lib.data.embeddings import EmbeddingStore

    _, options, _ = data_block(config)
    if options.get("embeddings") is None:
        return None, None
    encoder = EmbeddingStore(options["embeddings"]).meta.get("encoder")  # T5TextEncoder.config, or a class name
    if not isinstance(encoder, dict):
        return None, None
    return encoder.get("source", {}).get("name_or_path"), encoder.get("max_length")


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

