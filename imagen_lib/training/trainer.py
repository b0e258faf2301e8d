"""Training a cascade, one stage at a time or interleaved, on one device or many through Accelerate.

Per stage: AdamW, learning-rate warm-up then cosine decay, gradient clipping, an EMA of the weights
(ema-pytorch; sampling uses it unless told otherwise), gradient accumulation over chunks of at most
``max_batch_size`` examples with correctly weighted losses, mixed precision (bf16, or fp16 with loss
scaling; applied by the Trainer, so trainers of different precisions share a process), and device placement,
data sharding and distributed data parallel through Accelerate. One :class:`StageState` per stage holds the
stage's network wrapper, optimizer, EMA, step count, schedule horizon and peak rate.

Multi-process rules (``accelerate launch``): call every method on every process. Only the main process
writes files, no collective operation is ever entered by one process alone, and all processes hold identical
weights (distributed data parallel averages the gradients; every process applies the same update).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from imagen_lib import checkpoint as ckpt
from imagen_lib.cascade import Cascade
from imagen_lib.cascade_checkpoint import write_cascade_checkpoint

Batch = Union[Tensor, Mapping[str, Any]]
_BATCH_KEYS = ("images", "texts", "text_embeds", "text_mask")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainerSettings:
    """Optimisation settings (defaults in brackets; Imagen's values where the paper gives them).

    Attributes:
        lr: peak learning rate, one value or one per stage [1e-4, Imagen's].
        betas, eps, weight_decay: AdamW's [(0.9, 0.99), 1e-8, 0.0].
        warmup_steps: linear warm-up from 0 [0; Imagen: 10,000].
        total_steps: cosine decay horizon per stage; None [default]: :meth:`Trainer.fit` uses its ``steps``,
            and a stage trained only through ``train_step`` keeps the peak rate after warm-up.
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio`` [0.1].
        max_grad_norm: gradient clipping norm, None to disable [1.0].
        ema_beta, ema_update_after_step, ema_update_every, ema_power: ema-pytorch's EMA [0.9999, 100, 10,
            2/3]; the decay warms up as ``1 - (1 + step) ** -ema_power`` capped at ``ema_beta``.
        max_batch_size: split larger batches into chunks of at most this many examples [None: no split].
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (with loss scaling) ["no"].
        text_encoder_lr: learning rate of a trainable text encoder [None: the stage's ``lr``].
        fused_optimizer: AdamW's fused implementation (the same update in one kernel over all parameters
            instead of many small ones; ~7% of a CPU step of a 1 M-parameter net) [True].
    """

    lr: Union[float, Sequence[float]] = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    total_steps: Optional[int] = None
    min_lr_ratio: float = 0.1
    max_grad_norm: Optional[float] = 1.0
    ema_beta: float = 0.9999
    ema_update_after_step: int = 100
    ema_update_every: int = 10
    ema_power: float = 2 / 3
    max_batch_size: Optional[int] = None
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    text_encoder_lr: Optional[float] = None
    fused_optimizer: bool = True

    def __post_init__(self):
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision: expected 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.max_batch_size is not None and int(self.max_batch_size) < 1:
            raise ValueError(f"max_batch_size: expected None or a positive int, got {self.max_batch_size}")
        if int(self.warmup_steps) < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"warmup_steps, min_lr_ratio: expected >= 0 and in [0, 1], got {self.warmup_steps}, "
                             f"{self.min_lr_ratio}")
        self.betas = tuple(float(b) for b in self.betas)

    @property
    def config(self) -> dict:
        out = dataclasses.asdict(self)
        out["lr"] = list(self.lr) if isinstance(self.lr, Sequence) else self.lr
        out["betas"] = list(self.betas)
        return out


def lr_factor(step: int, warmup_steps: int, total_steps: Optional[int], min_lr_ratio: float) -> float:
    """Multiplier of the peak rate at optimizer step ``step`` (0-based): linear warm-up, then cosine decay
    from 1 to ``min_lr_ratio`` at ``total_steps`` (constant 1 after warm-up when ``total_steps`` is None)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _slice_batch(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] if v is not None else None for k, v in batch.items()}


@dataclass
class StageState:
    """What the Trainer holds for one stage of the cascade.

    Attributes:
        wrapper: the stage's network as Accelerate prepared it (distributed data parallel on several processes).
        optimizer: its AdamW (with a trainable text encoder's parameters as a second group), as Accelerate
            prepared it.
        ema: the ema-pytorch EMA of the network; ``ema.ema_model`` is the copy that samples.
        lr: the peak learning rate.
        step: optimizer steps taken so far [0].
        horizon: the step at which the cosine decay ends [None: set by the first :meth:`Trainer.fit`].
    """

    wrapper: nn.Module
    optimizer: Any
    ema: Any
    lr: float
    step: int = 0
    horizon: Optional[int] = None


class Trainer:
    """Trains the stages of a :class:`~imagen_lib.cascade.Cascade`.

    Args:
        cascade: the cascade; its networks are moved to the training device.
        lr: peak learning rate (shortcut for ``TrainerSettings.lr``), default 1e-4.
        settings: a :class:`TrainerSettings`; keyword arguments override its fields.
        accelerator: an ``accelerate.Accelerator`` to use, made with ``mixed_precision="no"`` (default: one is
            made with ``cpu``, ``log_with`` and ``project_dir``). The Trainer applies
            ``TrainerSettings.mixed_precision`` itself (autocast, and loss scaling for fp16): Accelerate's
            precision is one setting for the whole process, and this way trainers of different precisions
            live side by side in one process (a notebook, the tests).
        cpu: force the CPU even when a GPU is present [False].
        log_with: Accelerate tracker(s), e.g. ``"tensorboard"`` [None]; ``project_dir`` is where they write.
            They start at the first :meth:`fit` or :meth:`start_trackers`.
        ddp_find_unused_parameters: passed to DistributedDataParallel [False].

    Each stage's network wrapper, optimizer, EMA, step count, horizon and peak rate are in :attr:`stages`
    (one :class:`StageState` per stage). :attr:`progress_line` places :meth:`fit`'s progress bar on a line of
    the terminal (one line per process training a stage at the same time) [None: tqdm's choice].
    """

    def __init__(
        self, cascade: Cascade, lr: Optional[Union[float, Sequence[float]]] = None, *,
        settings: Optional[TrainerSettings] = None, accelerator=None, cpu: bool = False,
        log_with: Union[None, str, Sequence[str]] = None, project_dir: Union[None, str, Path] = None,
        ddp_find_unused_parameters: bool = False, **setting_overrides: Any,
    ):
        if not isinstance(cascade, Cascade):
            raise TypeError(f"cascade: expected a Cascade, got {type(cascade).__name__}")
        settings = settings or TrainerSettings()
        if lr is not None:
            setting_overrides["lr"] = lr
        self.settings = dataclasses.replace(settings, **setting_overrides)
        self.cascade = cascade
        self.num_stages = len(cascade.stages)
        lrs = self.settings.lr
        lrs = [float(v) for v in lrs] if isinstance(lrs, Sequence) else [float(lrs)] * self.num_stages
        if len(lrs) != self.num_stages:
            raise ValueError(f"lr: expected one value or {self.num_stages} (one per stage), got {len(lrs)}")
        if accelerator is not None and accelerator.mixed_precision != "no":
            raise ValueError(f"accelerator: expected one made with mixed_precision='no', got "
                             f"{accelerator.mixed_precision!r}; set TrainerSettings.mixed_precision instead (the "
                             "Trainer applies it itself)")
        self.accelerator = accelerator or self._make_accelerator(cpu, log_with, project_dir, ddp_find_unused_parameters)
        self.scaler = self._make_scaler()
        self.run_id = uuid.uuid4().hex
        self.progress_line: Optional[int] = None
        self._trackers_started = False
        self._setup_modules(lrs)

    def _make_accelerator(self, cpu, log_with, project_dir, find_unused):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if distributed and not torch.cuda.is_available():
            cpu = True  # several processes and no GPU: Accelerate only joins them on the CPU when told so
        return Accelerator(
            mixed_precision="no", cpu=cpu, log_with=log_with,  # the precision is the Trainer's own (_autocast)
            project_dir=None if project_dir is None else str(project_dir),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
        )

    def _make_scaler(self):
        """fp16's loss scaler (gradients that would underflow in float16 are scaled up, then down)."""
        if self.settings.mixed_precision != "fp16":
            return None
        if self.device.type == "cpu":
            raise ValueError("mixed_precision: 'fp16' needs a GPU (its loss scaling is CUDA's); use 'bf16' on the CPU")
        return torch.amp.GradScaler(self.device.type)

    def _autocast(self):
        """The forward pass in ``TrainerSettings.mixed_precision`` (weights stay float32)."""
        dtype = _AUTOCAST_DTYPES.get(self.settings.mixed_precision)
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def _setup_modules(self, lrs: list[float]) -> None:
        """Move the cascade, wrap each trained module for distribution, make optimizers and EMAs."""
        from ema_pytorch import EMA

        acc, s = self.accelerator, self.settings
        self.cascade.to(acc.device)
        encoder = self.cascade.text_encoder
        self.train_text = encoder is not None and encoder.trainable
        ema_kwargs = dict(beta=s.ema_beta, update_after_step=s.ema_update_after_step, update_every=s.ema_update_every,
                          power=s.ema_power, include_online_model=False, use_foreach=True)
        # EMA copies are made before Accelerate wraps the nets (a wrapper's hooks stay off them)
        emas = [EMA(stage.net, **ema_kwargs) for stage in self.cascade.stages]
        self.text_ema = EMA(encoder.model, **ema_kwargs) if self.train_text else None  # shared by all stages
        self.text_wrapper = acc.prepare_model(encoder) if self.train_text else None
        self.stages: list[StageState] = []
        for k, stage in enumerate(self.cascade.stages):
            wrapper = acc.prepare_model(stage.net)
            groups = [{"params": [p for p in stage.net.parameters() if p.requires_grad], "lr": lrs[k]}]
            if self.train_text:
                groups.append({"params": list(encoder.model.parameters()), "lr": s.text_encoder_lr or lrs[k]})
            opt = torch.optim.AdamW(groups, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay,
                                    fused=s.fused_optimizer or None)
            self.stages.append(StageState(wrapper, acc.prepare_optimizer(opt), emas[k], lrs[k],
                                          horizon=s.total_steps))

    # ----------------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def steps(self) -> list[int]:
        """Optimizer steps taken by each stage (read-only; :attr:`stages` holds them)."""
        return [state.step for state in self.stages]

    @property
    def horizons(self) -> list[Optional[int]]:
        """Each stage's cosine decay horizon (read-only; :attr:`stages` holds them)."""
        return [state.horizon for state in self.stages]

    def _index(self, stage: int) -> int:
        if not isinstance(stage, int) or not 0 <= stage < self.num_stages:
            raise ValueError(f"stage: expected a stage index in [0, {self.num_stages - 1}], got {stage!r}")
        return stage

    def ema_networks(self) -> list[nn.Module]:
        """The EMA copy of each stage's network."""
        return [state.ema.ema_model for state in self.stages]

    def _ema_text_encoder(self) -> Optional[Callable]:
        """The text encoder's encode with its EMA copy of the T5 model (None when the encoder is frozen)."""
        if self.text_ema is None:
            return None
        return functools.partial(self.cascade.text_encoder.encode, model=self.text_ema.ema_model)

    def _normalise_batch(self, batch: Batch) -> tuple[dict, int]:
        if isinstance(batch, Tensor):
            batch = {"images": batch}
        if not isinstance(batch, Mapping) or "images" not in batch:
            raise TypeError("batch: expected an images tensor or a dict with 'images' (and 'texts' or 'text_embeds')")
        out = {k: batch.get(k) for k in _BATCH_KEYS}
        if out["texts"] is not None:
            out["texts"] = [out["texts"]] if isinstance(out["texts"], str) else list(out["texts"])
        return out, int(out["images"].shape[0])

    def _chunks(self, batch: dict, size: int) -> list[tuple[dict, float]]:
        """Chunks of at most ``max_batch_size`` rows, each with its share of the batch (sums to 1)."""
        step = self.settings.max_batch_size or size
        return [(_slice_batch(batch, i, min(i + step, size)), (min(i + step, size) - i) / size)
                for i in range(0, size, step)]

    def _set_lr(self, state: StageState) -> float:
        s = self.settings
        factor = lr_factor(state.step, s.warmup_steps, state.horizon, s.min_lr_ratio)
        groups = state.optimizer.param_groups
        groups[0]["lr"] = state.lr * factor
        if len(groups) > 1:
            groups[1]["lr"] = (s.text_encoder_lr or state.lr) * factor
        return groups[0]["lr"]

    # ----------------------------------------------------------------------------------------------------
    # steps
    # ----------------------------------------------------------------------------------------------------

    def train_step(self, stage: int, batch: Batch) -> float:
        """One optimizer step of ``stage`` on ``batch`` (images in [-1, 1], plus ``texts`` or ``text_embeds`` +
        ``text_mask``); returns this process's mean loss over the batch."""
        k = self._index(stage)
        acc, state = self.accelerator, self.stages[k]
        batch, size = self._normalise_batch(batch)
        if not (self.cascade.training and self.cascade.stages[k].net.training):
            self.cascade.train()  # once after sampling or validation, not every step (it walks every module)
        wrapped = [state.wrapper] + ([self.text_wrapper] if self.train_text else [])
        chunks = self._chunks(batch, size)
        total = torch.zeros((), device=self.device)
        for i, (chunk, share) in enumerate(chunks):
            with contextlib.ExitStack() as stack:
                if i < len(chunks) - 1:  # gradients are all-reduced once, on the last chunk
                    for module in wrapped:
                        stack.enter_context(acc.no_sync(module))
                with self._autocast():
                    loss = self.cascade(**chunk, stage=k, net=state.wrapper, text_encoder=self.text_wrapper)
                acc.backward(loss * share if self.scaler is None else self.scaler.scale(loss * share))
            total += loss.detach().float() * share
        self._optimizer_step(state)
        return float(total)

    def _optimizer_step(self, state: StageState) -> None:
        opt = state.optimizer
        self._set_lr(state)
        if self.settings.max_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
            params = [p for group in opt.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm)
        if self.scaler is None:
            opt.step()
        else:  # skips the step when a gradient overflowed, and adapts the scale
            self.scaler.step(opt)
            self.scaler.update()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        state.ema.update()
        if self.text_ema is not None:
            self.text_ema.update()

    @torch.no_grad()
    def valid_step(self, stage: int, batch: Batch, use_ema: bool = True) -> float:
        """Mean loss of ``stage`` on ``batch`` in eval mode (no text dropout), with the EMA weights by default."""
        k = self._index(stage)
        batch, size = self._normalise_batch(batch)
        net = self.stages[k].ema.ema_model if use_ema else self.cascade.stages[k].net
        encoder = self._ema_text_encoder() if use_ema else None
        was_training = self.cascade.training
        self.cascade.eval()
        net.eval()
        try:
            total = 0.0
            for chunk, share in self._chunks(batch, size):
                with self._autocast():
                    loss = self.cascade(**chunk, stage=k, net=net, text_encoder=encoder)
                total += float(loss) * share
        finally:
            self.cascade.train(was_training)
        return total

    def sample(self, *args: Any, use_ema: bool = True, **kwargs: Any):
        """:meth:`Cascade.sample` with the EMA networks (``use_ema``, default True) or the raw ones."""
        if not use_ema:
            return self.cascade.sample(*args, **kwargs)
        ema = self.cascade.using(networks=self.ema_networks(), text_encoder=self._ema_text_encoder())
        return ema.sample(*args, **kwargs)

    # ----------------------------------------------------------------------------------------------------
    # the loop
    # ----------------------------------------------------------------------------------------------------

    def start_trackers(self, config: Optional[Mapping] = None) -> None:
        """Start the accelerator's trackers (``log_with``) once, recording ``config`` (default: the trainer
        settings) flattened to dotted keys. :meth:`fit` calls it, so trackers start even when nobody else did."""
        if self._trackers_started:
            return
        self._trackers_started = True
        record = {"trainer": self.settings.config} if config is None else config
        self.accelerator.init_trackers("imagen_lib", config=flatten_config(record))

    def fit(
        self, dataloader: Iterable, stage: int, steps: int, *, log_every: int = 50, sample_every: Optional[int] = None,
        sample_prompts: Optional[Sequence[str]] = None, out_dir: Union[None, str, Path] = None,
        save_every: Optional[int] = None, sample_seed: int = 0, disable_progress: bool = False,
        on_step: Optional[Callable[[int], None]] = None, start_batch: int = 0,
    ) -> dict:
        """Train ``stage`` for ``steps`` optimizer steps on batches from ``dataloader`` (re-iterated as needed).

        Logs the mean loss every ``log_every`` steps through the Accelerate trackers; every ``sample_every``
        steps writes a captioned grid of ``sample_prompts`` to ``out_dir/samples/stage{k}-{step}.png`` and every
        ``save_every`` steps a checkpoint to ``out_dir/checkpoint`` (main process only). The cosine horizon of
        the stage is ``steps`` unless ``total_steps`` was set; the progress bar sits on line
        :attr:`progress_line`. ``on_step`` is called after every step with the stage's step count.
        ``start_batch``: the position in the loader's order to start from (batches an earlier run already
        took; default 0): whole epochs and batches are skipped by index, without loading data, and a
        DataLoader's generator advances as those epochs advanced it, so a resumed run sees the batches an
        uninterrupted one would. Returns ``{"stage", "steps", "loss", "seconds"}``.
        """
        k = self._index(stage)
        if int(steps) < 1:
            raise ValueError(f"steps: expected a positive number of steps, got {steps}")
        if (sample_every or save_every) and out_dir is None:
            raise ValueError("out_dir: needed to write samples or checkpoints")
        state = self.stages[k]
        if state.horizon is None:
            state.horizon = state.step + int(steps)
        self.start_trackers()
        bar = tqdm(total=int(steps), desc=f"stage {k}", disable=disable_progress or not self.is_main_process,
                   position=self.progress_line)
        start, window, mean = time.time(), [], float("nan")
        for i, batch in zip(range(int(steps)), _forever(self._prepare_loader(dataloader), int(start_batch))):
            window.append(self.train_step(k, batch))
            step = i + 1
            if step % log_every == 0 or step == int(steps):
                mean = self._reduced_mean(window)
                window = []
                self.accelerator.log({f"stage{k}/loss": mean, f"stage{k}/lr": state.optimizer.param_groups[0]["lr"]},
                                     step=state.step)
                bar.set_postfix(loss=f"{mean:.4f}")
            bar.update(1)
            if on_step is not None:
                on_step(state.step)
            if sample_every and step % sample_every == 0 and sample_prompts:
                self.write_samples(Path(out_dir) / "samples" / f"stage{k}-{state.step:06d}.png", sample_prompts,
                                   stop_at_stage=k, seed=sample_seed)
            if save_every and step % save_every == 0:
                self.save(Path(out_dir) / "checkpoint")
        bar.close()
        return {"stage": k, "steps": int(steps), "loss": mean, "seconds": time.time() - start}

    def _prepare_loader(self, dataloader: Iterable) -> Iterable:
        """Let Accelerate shard a DataLoader over the processes, unless its data set already reads a
        different part on each process (``split_by_process``, e.g. ``ShardDataset``): sharding it again
        would drop or duplicate data. The cascade moves batches to its device itself."""
        from torch.utils.data import DataLoader

        if isinstance(dataloader, DataLoader) and not getattr(dataloader.dataset, "split_by_process", False):
            return self.accelerator.prepare_data_loader(dataloader)
        return dataloader

    def _reduced_mean(self, values: list[float]) -> float:
        """Mean over the window and over processes (a collective, entered by every process at once)."""
        t = torch.tensor(sum(values) / max(1, len(values)), device=self.device)
        return float(self.accelerator.reduce(t, reduction="mean")) if self.accelerator.num_processes > 1 else float(t)

    def write_samples(self, path: Union[str, Path], prompts: Sequence[str], **sample_kwargs: Any) -> Optional[str]:
        """Sample ``prompts`` with the EMA weights and write a captioned grid PNG (main process only)."""
        if not self.is_main_process:
            return None
        from imagen_lib.images import captioned_grid, save_png

        sample_kwargs.setdefault("disable_progress", True)
        images = self.sample(list(prompts), **sample_kwargs)
        return save_png(str(path), captioned_grid(images.cpu(), list(prompts)))

    # ----------------------------------------------------------------------------------------------------
    # checkpoints
    # ----------------------------------------------------------------------------------------------------

    def save(self, path: Union[str, Path], *, overwrite: bool = False) -> str:
        """Write a resumable checkpoint (configuration, weights, EMA weights, optimizer, schedule, steps, RNG).

        Call it on every process: only the main one writes, then all wait for it. An existing folder is
        replaced only when this run wrote it (or with ``overwrite=True``).
        """
        if self.is_main_process:
            tensors, state = self._trainer_state()
            files = {f"stage{k}": st.net.state_dict() for k, st in enumerate(self.cascade.stages)}
            files.update({f"stage{k}.ema": st.ema.ema_model.state_dict() for k, st in enumerate(self.stages)})
            if self.text_ema is not None:
                files["text_encoder"] = self.cascade.text_encoder.model.state_dict()
                files["text_encoder.ema"] = self.text_ema.ema_model.state_dict()
            files["trainer"] = tensors
            write_cascade_checkpoint(self.cascade, path, tensors=files, json_files={"trainer": state},
                                     overwrite=overwrite, run_id=self.run_id)
        self.accelerator.wait_for_everyone()  # entered by every process
        return str(path)

    def _trainer_state(self) -> tuple[dict, dict]:
        tensors: dict[str, Tensor] = {}
        state = {
            "run_id": self.run_id, "steps": self.steps, "horizons": self.horizons,
            "settings": self.settings.config,
            "optimizers": [ckpt.split_state(st.optimizer.state_dict(), f"opt{k}", tensors)
                           for k, st in enumerate(self.stages)],
            "rng": ckpt.rng_state(tensors),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
        }
        for k, st in enumerate(self.stages):
            tensors[f"ema{k}.step"], tensors[f"ema{k}.initted"] = st.ema.step, st.ema.initted
        if self.text_ema is not None:
            tensors["ema_text.step"], tensors["ema_text.initted"] = self.text_ema.step, self.text_ema.initted
        return tensors, state

    def load(self, path: Union[str, Path], *, stages: Optional[Sequence[int]] = None) -> "Trainer":
        """Restore everything :meth:`save` wrote, so training resumes where it stopped (call on every process).

        With ``stages``, only those stages' weights, EMA, optimizer state, step count and schedule horizon
        (e.g. stages trained in another process); the rest of this trainer (other stages, RNG) stays as it is.
        """
        config = ckpt.read_config(path)
        mine = self.cascade.config
        if [s["network"] for s in config["stages"]] != [s["network"] for s in mine["stages"]]:
            raise ValueError(f"path: checkpoint {path!s} holds a different cascade architecture than this trainer's")
        partial = stages is not None
        chosen = sorted({self._index(k) for k in stages}) if partial else range(self.num_stages)
        tensors = ckpt.read_tensors(path, "trainer", self.device)
        state = ckpt.read_json(path, "trainer")
        for k in chosen:
            self._load_stage(path, k, state, tensors)
        if partial:
            return self
        if self.train_text:
            self.cascade.text_encoder.model.load_state_dict(ckpt.read_tensors(path, "text_encoder", self.device))
            self.text_ema.ema_model.load_state_dict(ckpt.read_tensors(path, "text_encoder.ema", self.device))
            self.text_ema.step.copy_(tensors["ema_text.step"])
            self.text_ema.initted.copy_(tensors["ema_text.initted"])
        if state.get("scaler") and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.run_id = state["run_id"]
        ckpt.set_rng_state(state["rng"], {k: v.cpu() for k, v in tensors.items()})
        if self.accelerator.process_index > 0:  # one saved stream, but each process needs its own noise
            torch.manual_seed(int(torch.randint(0, 2**62, ())) + self.accelerator.process_index)
        return self

    def _load_stage(self, path: Union[str, Path], k: int, state: dict, tensors: dict) -> None:
        """Stage ``k``'s weights, EMA, optimizer state, step count and horizon from a checkpoint."""
        st = self.stages[k]
        self.cascade.stages[k].net.load_state_dict(ckpt.read_tensors(path, f"stage{k}", self.device))
        st.ema.ema_model.load_state_dict(ckpt.read_tensors(path, f"stage{k}.ema", self.device))
        st.optimizer.load_state_dict(ckpt.join_state(state["optimizers"][k], tensors))
        st.ema.step.copy_(tensors[f"ema{k}.step"])
        st.ema.initted.copy_(tensors[f"ema{k}.initted"])
        st.step, st.horizon = state["steps"][k], state["horizons"][k]


def _forever(loader: Iterable, start_batch: int = 0):
    """Batches of ``loader``, epoch after epoch from batch ``start_batch`` of that order on, telling the loader
    and its data set (new crops, flips and shard order) each epoch's number before it starts."""
    epoch, skip = _skip_to(loader, start_batch)
    dataset = getattr(loader, "dataset", None)
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        empty = True
        for batch in (_skip_first_batches(loader, skip) if skip else loader):
            empty = False
            yield batch
        if empty:
            raise ValueError("dataloader: it yielded no batch")
        epoch, skip = epoch + 1, 0


def _skip_to(loader: Iterable, start_batch: int) -> tuple[int, int]:
    """(epoch, batch within it) of position ``start_batch``, after taking the loader through the epochs before
    it: each iterates the loader with every batch skipped (indices only, no data is loaded), so the loader's
    generator draws each epoch's permutation, as it did for the run that trained them."""
    if start_batch == 0:
        return 0, 0
    from torch.utils.data import DataLoader, IterableDataset

    if start_batch < 0 or not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        raise ValueError(f"start_batch: expected 0, or a position >= 0 in a DataLoader over a map-style data set "
                         f"(an iterable one cannot skip by index), got {start_batch} for {type(loader).__name__}")
    per_epoch = len(loader)
    epoch, skip = divmod(start_batch, per_epoch)
    for _ in range(epoch):
        for _ in _skip_first_batches(loader, per_epoch):  # yields nothing
            pass
    return epoch, skip


def _skip_first_batches(loader, num_batches: int):
    from accelerate import skip_first_batches

    return skip_first_batches(loader, num_batches)


def flatten_config(tree: Any, prefix: str = "") -> dict:
    """A nested config as ``{"stages.0.train.steps": 1000, ...}``: trackers take flat scalar values only
    (other values become strings)."""
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix: tree if isinstance(tree, (int, float, str, bool)) or tree is None else str(tree)}
    out = {}
    for key, value in items:
        out.update(flatten_config(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
