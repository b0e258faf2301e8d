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
    from imagen_lib.config import (
        apply_overrides,
        build_cascade,
        load_config,
        parallel_settings,
        sample_settings,
        stage_training,
        trainer_settings,
    )
    from imagen_lib.training.trainer import Trainer

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
    todo = []  # (stage, plan, steps left)
    for k in stages:
        plan = stage_training(config, k)
        if plan["steps"] > trainer.steps[k]:
            todo.append((k, plan, plan["steps"] - trainer.steps[k]))
    parallel = parallel_settings(config)
    background = None
    if parallel is not None and len(todo) > 1 and _parallel_applies(trainer):
        resumed = str(checkpoint) if args.resume and ckpt.is_checkpoint(checkpoint) else None
        background = _BackgroundStages(config, todo[1:], out, resumed, args, parallel["threads_per_stage"])
        todo = todo[:1]
    try:
        for k, plan, remaining in todo:
            on_step = None
            if background is not None and parallel["join_at_step"] is not None:
                on_step = background.joiner(trainer, parallel["join_at_step"])
            result = trainer.fit(_loader(config, k, plan["batch_size"], seed), k, remaining, log_every=args.log_every,
                                 disable_progress=args.no_progress, on_step=on_step)
            if main:
                print(f"stage {k}: {result['steps']} steps in {result['seconds']:.0f}s, "
                      f"final loss {result['loss']:.4f}")
        if background is not None:
            background.join(trainer)
    finally:
        if background is not None:
            background.stop()
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


def _parallel_applies(trainer) -> bool:
    """Whether ``parallel_stages`` can be used here: a single-process CPU run with a frozen text encoder."""
    if trainer.accelerator.num_processes > 1 or trainer.device.type != "cpu":
        if trainer.is_main_process:
            print("parallel_stages: ignored (it shares CPU cores between stages; this run has "
                  f"{trainer.accelerator.num_processes} process(es) on {trainer.device.type}): stages train in turn")
        return False
    if trainer.train_text:
        raise SystemExit("imagen-lib train: parallel_stages needs a frozen text encoder (a trainable one is shared by "
                         "every stage, so they cannot train apart); set text_encoder.trainable: false or remove it")
    return True


class _BackgroundStages:
    """The stages after the first, each trained in its own process (``parallel_stages``) with
    ``threads_per_stage`` torch threads, while this process trains the first on the remaining threads.

    Stages of a cascade train independently (a super-resolution stage learns from real low-res images), and
    on a few CPU cores two one-thread processes do more work than one two-thread process. :meth:`join` waits
    for them, gives this process every thread again and takes over their stages' state; it is called at a
    fixed step of the first stage, so a run's arithmetic (which depends on the thread count) never depends on
    timing.
    """

    def __init__(self, config: dict, todo: list, out: Path, resume_from, args: argparse.Namespace, threads: int):
        import multiprocessing

        import torch

        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked thread pools
        self.total_threads = torch.get_num_threads()
        self.parts, self.processes, self.joined = {}, {}, False
        for position, (k, plan, remaining) in enumerate(todo, start=1):
            part = out / f".stage{k}-parallel"
            self.parts[k] = part
            job = dict(config=config, stage=k, batch_size=plan["batch_size"], steps=remaining, part=str(part),
                       resume_from=resume_from, cpu=args.cpu, threads=threads, log_every=args.log_every,
                       no_progress=args.no_progress, position=position)
            self.processes[k] = context.Process(target=_train_stage_in_process, kwargs=job, name=f"stage {k}")
            self.processes[k].start()
        torch.set_num_threads(max(1, self.total_threads - threads * len(todo)))

    def join(self, trainer, at: str = "the end of the first stage") -> None:
        """Wait for every background stage, then load its state into ``trainer`` (once)."""
        import shutil

        import torch

        if self.joined:
            return
        self.joined, start = True, time.time()
        try:
            for k, process in self.processes.items():
                process.join()
                if process.exitcode != 0:
                    raise SystemExit(f"imagen-lib train: stage {k}, trained in its own process, failed (exit code "
                                     f"{process.exitcode}); its error is printed above")
        finally:
            torch.set_num_threads(self.total_threads)
        for k, part in self.parts.items():
            trainer.load(part / "checkpoint", stages=[k])
            shutil.rmtree(part)
        # the wait says how to tune join_at_step: long waits mean a later step, none may mean an earlier one
        print(f"parallel_stages: stage(s) {', '.join(map(str, self.parts))} joined at {at} after waiting "
              f"{time.time() - start:.0f}s; training goes on with {self.total_threads} thread(s)", flush=True)

    def joiner(self, trainer, step: int):
        """An ``on_step`` callback for the first stage's fit that joins at its step ``step``."""
        def on_step(current: int) -> None:
            if current >= step:
                self.join(trainer, at=f"step {current}")
        return on_step

    def stop(self) -> None:
        """End background stages still running (this process failed or was interrupted); every thread back."""
        import torch

        for process in self.processes.values():
            if process.is_alive():
                process.terminate()
                process.join()
        torch.set_num_threads(self.total_threads)


def _train_stage_in_process(*, config: dict, stage: int, batch_size: int, steps: int, part: str, resume_from,
                            cpu: bool, threads: int, log_every: int, no_progress: bool, position: int) -> None:
    """Body of one background stage: build the cascade as the main process does, train ``stage``, save."""
    import torch

    torch.set_num_threads(threads)
    from imagen_lib.config import build_cascade, trainer_settings
    from imagen_lib.training.trainer import Trainer

    trainer = Trainer(build_cascade(config), settings=trainer_settings(config), cpu=cpu)
    if resume_from:
        trainer.load(resume_from)
    seed = int(config.get("seed") or 0)
    torch.manual_seed(seed + 1000 * stage + trainer.steps[stage])  # its own noise, fixed by the config
    result = trainer.fit(_loader(config, stage, batch_size, seed), stage, steps, log_every=log_every,
                         disable_progress=no_progress, progress_position=position)
    trainer.save(Path(part) / "checkpoint", overwrite=True)
    print(f"stage {stage}: {result['steps']} steps in {result['seconds']:.0f}s, final loss {result['loss']:.4f} "
          f"(own process, {threads} thread(s))", flush=True)


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None
