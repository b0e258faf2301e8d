"""The one training loop of a configured cascade: ``imagen-lib train`` and ``examples/train.py`` both call
:func:`train_stages`, so they share every rule below.

- Stages: the ones asked for (default all, lowest resolution first), each for the steps its config gives
  (``stages.K.train.steps``) less those it has taken.
- Data order: stage k's DataLoader shuffles with a generator seeded ``seed + k`` (the config's ``seed``).
- Before the first step: every stage to train has its data checked (at least one batch of its batch size).
- Resuming: from ``OUT/checkpoint``; every stage continues at its step count and its data position where it
  stopped (epoch and batch, steps skipped for a non-finite loss included; see
  :mod:`imagen_lib.training.data_order`), so a resumed run sees the batches an uninterrupted one would.
  A stage whose configured steps differ from the checkpoint's cosine horizon is an error unless the run is
  extended (``RunOptions.extend``: the horizon becomes the configured steps).
- Checkpoints: after each stage, and every ``save_every`` steps (the option, else ``trainer.save_every``),
  keeping ``keep_last`` versions (the option, else ``trainer.keep_last``).
- Training noise: the main process keeps the stream the cascade's construction left (seeded by the config);
  other processes re-seed with ``seed + process index``, so their noise differs while their weights agree.
- Output: ``OUT/config.yaml``, a checkpoint after each stage, a final grid of the sample prompts in
  ``OUT/samples.png``, grids every ``sample_every`` steps in ``OUT/samples/``.
- Trackers: the trainer's (:func:`tracker_options` makes them from the config's ``tracking`` block); losses,
  learning rates, gradient norms, images/s and every grid are logged to them
  (:mod:`imagen_lib.training.tracking`).
- ``parallel_stages`` in the config: the stages after the first train in their own processes
  (:mod:`imagen_lib.training.parallel`) through :func:`train_stage`, the same code as the first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from imagen_lib import checkpoint as ckpt
from imagen_lib import config as cfg
from imagen_lib.config.schema import parse_block
from imagen_lib.training import tracking
from imagen_lib.training.trainer import Trainer
from imagen_lib.validation import check_int, check_seed


@dataclass
class RunOptions:
    """How :func:`train_stages` runs (defaults in brackets).

    Attributes:
        stages: indices of the stages to train, in this order [None: all, lowest resolution first].
        resume: True: continue from ``OUT/checkpoint`` (an error when there is none); False: start afresh (an
            existing checkpoint is then an error unless ``overwrite``); None: continue when there is one [None].
        overwrite: replace a checkpoint another run wrote in ``OUT`` [False].
        log_every: steps between logged losses [50].
        sample_every: steps between sample grids in ``OUT/samples/`` [None: only the final grid].
        save_every: steps between checkpoints within a stage [None: the config's ``trainer.save_every``;
            0: after each stage only].
        keep_last: checkpoint versions kept [None: the config's ``trainer.keep_last``].
        extend: resume a run with other step counts than it was started with: each resumed stage's cosine
            horizon becomes its configured steps (without it, a difference is an error) [False].
        progress: show progress bars [True].
    """

    stages: Optional[Sequence[int]] = None
    resume: Optional[bool] = None
    overwrite: bool = False
    log_every: int = 50
    sample_every: Optional[int] = None
    save_every: Optional[int] = None
    keep_last: Optional[int] = None
    extend: bool = False
    progress: bool = True

    def __post_init__(self):
        self.log_every = check_int("log_every", self.log_every, low=1)
        self.sample_every = check_int("sample_every", self.sample_every, low=0, optional=True)
        self.save_every = check_int("save_every", self.save_every, low=0, optional=True)
        self.keep_last = check_int("keep_last", self.keep_last, low=1, optional=True)


@dataclass
class RunResult:
    """What :func:`train_stages` did: the checkpoint, the final sample grid (None: no prompts, or not the main
    process) and its prompts, the :meth:`Trainer.fit` summary of each stage trained in this process, the
    indices of every stage trained (``parallel_stages`` ones included), and whether it resumed."""

    checkpoint: Path
    samples: Optional[str] = None
    prompts: list[str] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)
    trained: list[int] = field(default_factory=list)
    resumed: bool = False


def train_stages(trainer: Trainer, config: dict, out: Union[str, Path], options: Optional[RunOptions] = None,
                 **option_overrides) -> RunResult:
    """Train the stages of ``config``'s cascade with ``trainer`` (made from that config) into folder ``out``.

    ``options`` (a :class:`RunOptions`; keyword arguments override its fields) say which stages, whether to
    resume, and how often to log, sample and save. Call it on every process. See the module's docstring for
    the rules on data order, resuming and noise. The main process holds ``out`` (a local folder) with a
    :class:`~imagen_lib.checkpoint.RunLock` throughout, so a second run on it refuses to start.
    """
    with ckpt.RunLock(out, trainer.run_id) if trainer.is_main_process else contextlib.nullcontext():
        return _train_stages(trainer, config, out, options, **option_overrides)


def _train_stages(trainer: Trainer, config: dict, out: Union[str, Path], options: Optional[RunOptions] = None,
                  **option_overrides) -> RunResult:
    options = dataclasses.replace(options or RunOptions(), **option_overrides)
    out = Path(out)
    checkpoint = out / "checkpoint"
    _seed_other_processes(trainer, _seed(config))
    if options.keep_last is not None:
        trainer.settings = dataclasses.replace(trainer.settings, keep_last=options.keep_last)
    resumed = _open_checkpoint(trainer, checkpoint, options)
    if trainer.is_main_process:
        import yaml

        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    trainer.start_trackers(config)
    todo = _stages_left(trainer, config, options.stages)
    check_horizons(trainer, config, [k for k, _ in todo], options.extend)
    loaders = check_stage_data(config, [k for k, _ in todo])  # built once: the check's loaders are the ones trained on
    prompts = sample_prompts(config)
    background = _start_background(trainer, config, todo, out, checkpoint if resumed else None, options)
    result = RunResult(checkpoint, prompts=prompts, trained=[k for k, _ in todo], resumed=resumed)
    try:
        for k, steps in todo[:1] if background else todo:
            on_step = background.joiner(trainer) if background else None
            result.stages.append(train_stage(trainer, config, k, steps, out, options, prompts, on_step,
                                             loader=loaders[k]))
            if background:
                background.join(trainer)
            if not trainer.is_saved(checkpoint):  # unless save_every just wrote this state
                trainer.save(checkpoint, overwrite=options.overwrite)
    finally:
        if background:
            background.stop()
    if not todo and not ckpt.is_checkpoint(checkpoint):
        trainer.save(checkpoint, overwrite=options.overwrite)
    if prompts:
        result.samples = trainer.write_samples(out / "samples.png", prompts, seed=cfg.sample_settings(config)["seed"],
                                               num_images_per_prompt=1, disable_progress=not options.progress)
        tracking.log_image(trainer.accelerator, "samples", result.samples, max(trainer.steps))
    trainer.accelerator.end_training()
    return result


def tracker_options(config: dict, out: Union[str, Path], log_with: tracking.LogWith = None,
                    default: tracking.LogWith = None) -> dict:
    """``{"log_with", "project_dir"}`` for a :class:`Trainer` (or an ``accelerate.Accelerator``, which takes the
    same two keywords) of a run of ``config`` into folder ``out``, as ``imagen-lib train`` and
    ``examples/train.py`` make them.

    The trackers: ``log_with`` (a front end's ``--log-with``), else the config's ``tracking.log_with``, else
    ``default``; checked by :func:`~imagen_lib.training.tracking.check_log_with`, so one that is not installed
    is a ValueError with its install command before anything is built. They write to the config's
    ``tracking.logging_dir``, else ``out`` (TensorBoard: ``out/imagen_lib/``).
    """
    block = parse_block(config, "tracking")
    chosen = next((value for value in (log_with, block.log_with) if value is not None), default)
    folder = block.logging_dir if block.logging_dir is not None else out
    return {"log_with": tracking.check_log_with(chosen), "project_dir": str(folder)}


def train_stage(trainer: Trainer, config: dict, stage: int, steps: int, out: Union[str, Path],
                options: RunOptions, prompts: Sequence[str] = (), on_step: Optional[Callable[[int], None]] = None,
                progress_line: Optional[int] = None, loader=None) -> dict:
    """Train ``stage`` for ``steps`` more steps on its configured data, from the stage's recorded data
    position (``trainer.stages[stage].data``); prints and returns :meth:`Trainer.fit`'s summary.

    ``progress_line``: the line of the progress bar (one per process training a stage at the same time).
    ``loader``: the stage's :func:`stage_loader` when it is already built (default: built here).
    """
    loader = stage_loader(config, stage) if loader is None else loader
    trainer.progress_line = progress_line
    result = trainer.fit(loader, stage, steps, log_every=options.log_every, sample_every=options.sample_every,
                         sample_prompts=prompts, out_dir=out, save_every=options.save_every,
                         sample_seed=cfg.sample_settings(config)["seed"], disable_progress=not options.progress,
                         on_step=on_step, start_batch=None)
    if trainer.is_main_process:
        print(f"stage {stage}: {result['steps']} steps in {result['seconds']:.0f}s, final loss {result['loss']:.4f}",
              flush=True)
    return result


def stage_loader(config: dict, stage: int):
    """Stage ``stage``'s DataLoader: the config's data at the stage's image size, its batch size, the last
    incomplete batch dropped, shuffled with a generator seeded ``seed + stage`` (an iterable data set, e.g.
    shards, shuffles itself: shard order and a buffer)."""
    from torch.utils.data import DataLoader, IterableDataset

    dataset, workers = cfg.build_dataset(config, config["stages"][stage]["image_size"])
    return DataLoader(dataset, batch_size=cfg.stage_training(config, stage)["batch_size"],
                      shuffle=not isinstance(dataset, IterableDataset), drop_last=True, num_workers=workers,
                      collate_fn=getattr(dataset, "collate_fn", None),
                      generator=torch.Generator().manual_seed(_seed(config) + stage))


def sample_prompts(config: dict) -> list[str]:
    """The config's ``sample.prompts``, else the captions of the first eight training images (a data set that
    can be indexed), else none."""
    prompts = cfg.sample_settings(config)["prompts"]
    if prompts:
        return prompts
    from torch.utils.data import IterableDataset

    dataset, _ = cfg.build_dataset(config, config["stages"][0]["image_size"])
    if isinstance(dataset, IterableDataset):
        return []
    items = (dataset[i] for i in range(min(8, len(dataset))))
    return [item["texts"] for item in items if "texts" in item]


# ---------------------------------------------------------------------------------------------------------


def _seed(config: dict) -> int:
    return check_seed("seed", config.get("seed") or 0)


def check_horizons(trainer: Trainer, config: dict, stages: Sequence[int], extend: bool) -> None:
    """Each of ``stages`` (resumed) must decay its learning rate over the steps the config gives it: a
    checkpoint's cosine horizon that differs is an error, unless ``extend``, which sets it to the config's."""
    for k in stages:
        state = trainer.stages[k]
        wanted = trainer.settings.total_steps or cfg.stage_training(config, k)["steps"]
        if state.horizon is None or state.horizon == wanted:
            continue
        if not extend:
            raise ValueError(
                f"stages.{k}.train.steps: the checkpoint's stage {k} decays its learning rate over {state.horizon} "
                f"steps, this config over {wanted}; to continue the run with {wanted} steps pass --extend "
                f"(RunOptions(extend=True)), which recomputes the schedule from step {state.step} on; or set "
                f"stages.{k}.train.steps={state.horizon} to finish it as started")
        state.horizon = wanted
        if trainer.is_main_process:
            print(f"stage {k}: extended, its learning rate now decays over {wanted} steps", flush=True)


def check_stage_data(config: dict, stages: Sequence[int]) -> dict:
    """Each of ``stages`` has data for at least one batch of its batch size (checked before anything trains,
    so a bad later stage does not cost the earlier ones); returns ``{stage: its stage_loader}``, the loaders
    checked. Leaves every random state as it found it, the loaders' own generators included."""
    from torch.utils.data import IterableDataset

    loaders = {}
    with _random_state_kept():
        for k in stages:
            batch_size = cfg.stage_training(config, k)["batch_size"]
            loader = loaders[k] = stage_loader(config, k)
            if isinstance(loader.dataset, IterableDataset):
                order = loader.generator.get_state()  # iterating draws a base seed from it
                first = next(iter(loader), None)
                loader.generator.set_state(order)
                if first is None:
                    raise ValueError(f"stages.{k}.train.batch_size: the data (the config's data block) yields no "
                                     f"full batch of {batch_size} for stage {k}; lower it or give more data")
            elif len(loader.dataset) < batch_size:
                raise ValueError(f"stages.{k}.train.batch_size: {batch_size} is more than the {len(loader.dataset)} "
                                 f"items of the data set (the config's data block); lower it or give more data")
    return loaders


@contextlib.contextmanager
def _random_state_kept():
    """torch's, numpy's and Python's global random states restored afterwards."""
    import numpy as np

    python, numpy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


def _seed_other_processes(trainer: Trainer, seed: int) -> None:
    """Processes after the first draw their own training noise (every process built the same cascade from
    the same seed; distributed data parallel keeps their weights equal)."""
    if trainer.accelerator.process_index > 0:
        torch.manual_seed(seed + trainer.accelerator.process_index)


def _open_checkpoint(trainer: Trainer, checkpoint: Path, options: RunOptions) -> bool:
    """Load ``checkpoint`` when the options say to resume; returns whether it did."""
    exists = ckpt.is_checkpoint(checkpoint)
    if options.resume and not exists:
        raise FileNotFoundError(f"resume: there is no checkpoint at {checkpoint} to continue from (start without "
                                "--resume)")
    if exists and options.resume is False:
        if options.overwrite:
            return False
        raise FileExistsError(f"out: {checkpoint} already holds a checkpoint; resume from it (--resume), replace "
                              f"it (--overwrite) or choose another output folder (--out)")
    if exists:
        trainer.load(checkpoint)  # weights, EMA, optimizer, schedule, step counts and RNG
        if trainer.is_main_process:
            print(f"resumed from {checkpoint} at steps {trainer.steps}", flush=True)
    return exists


def _stages_left(trainer: Trainer, config: dict, stages: Optional[Sequence[int]]) -> list[tuple[int, int]]:
    """(stage, steps left) of the chosen stages that have steps left."""
    n = len(config["stages"])
    chosen = list(range(n)) if stages is None else list(stages)
    if not all(isinstance(k, int) and 0 <= k < n for k in chosen):
        raise ValueError(f"stages: expected stage indices in [0, {n - 1}], got {stages!r}")
    todo = []
    for k in chosen:
        left = cfg.stage_training(config, k)["steps"] - trainer.steps[k]
        if left > 0:
            todo.append((k, left))
        elif trainer.is_main_process:
            print(f"stage {k}: already trained for {trainer.steps[k]} steps", flush=True)
    return todo


def _start_background(trainer: Trainer, config: dict, todo: list, out: Path, resume_from: Optional[Path],
                      options: RunOptions):
    """With ``parallel_stages`` (and more than one stage to train): the stages after the first started in
    their own processes; else None."""
    from imagen_lib.training import parallel

    settings = cfg.parallel_settings(config)
    if settings is None or len(todo) < 2 or not parallel.parallel_applies(trainer):
        return None
    jobs = {k: dict(config=config, steps=steps, out=str(out), options=options, trackers=_stage_trackers(trainer, k),
                    resume_from=None if resume_from is None else str(resume_from)) for k, steps in todo[1:]}
    return parallel.BackgroundStages(_train_stage_in_process, jobs, out, settings["threads_per_stage"],
                                     join_at_step=settings["join_at_step"])


def _stage_trackers(trainer: Trainer, stage: int) -> dict:
    """The main process's trackers for a background stage: the same kinds, writing to ``logging_dir/stage{k}``
    (a TensorBoard folder is one process's; the tags already name the stage)."""
    names = [getattr(kind, "value", kind) for kind in trainer.accelerator.log_with or []]
    folder = trainer.accelerator.logging_dir
    if not names or folder is None:
        return {}
    return {"log_with": names, "project_dir": str(Path(folder) / f"stage{stage}")}


def _train_stage_in_process(*, stage: int, part: str, position: int, config: dict, steps: int, out: str,
                            options: RunOptions, resume_from: Optional[str], trackers: Optional[dict] = None) -> None:
    """Body of a background stage (a fresh interpreter): build the cascade as the main process does, train
    ``stage`` with :func:`train_stage` (logging to ``trackers``, :func:`_stage_trackers`), and save to
    ``part/checkpoint`` for the main process to take over."""
    trainer = Trainer(cfg.build_cascade(config), settings=cfg.trainer_settings(config), cpu=True, **(trackers or {}))
    if trackers:
        trainer.start_trackers(config)
    if resume_from:
        trainer.load(resume_from)
        check_horizons(trainer, config, [stage], options.extend)
    torch.manual_seed(_seed(config) + 1000 * stage + trainer.steps[stage])  # its own noise, fixed by the config
    start = time.time()
    own = dataclasses.replace(options, sample_every=None, save_every=0)  # the main process writes those
    train_stage(trainer, config, stage, steps, out, own, progress_line=position)
    trainer.save(Path(part) / "checkpoint", overwrite=True)
    trainer.accelerator.end_training()  # flush and close its trackers
    print(f"stage {stage}: in its own process with {torch.get_num_threads()} thread(s), "
          f"{time.time() - start:.0f}s in all", flush=True)
