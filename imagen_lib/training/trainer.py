"""Training a cascade, one stage at a time or interleaved, on one device or many through Accelerate.

Per stage: AdamW, learning-rate warm-up then cosine decay, gradient clipping, an EMA of the weights
(ema-pytorch; sampling uses it unless told otherwise), gradient accumulation over several loader batches
(``gradient_accumulation_steps``) and over chunks of at most ``max_batch_size`` examples with correctly weighted
losses (:mod:`imagen_lib.training.accumulation`), mixed precision (bf16, or fp16 with loss
scaling; applied by the Trainer, so trainers of different precisions share a process), and device placement,
data sharding and distributed data parallel through Accelerate. One :class:`StageState` per stage holds the
stage's network wrapper, optimizer, EMA, step count, schedule horizon and peak rate.

Multi-process rules (``accelerate launch``): call every method on every process. Only the main process
writes files, no collective operation is ever entered by one process alone, and all processes hold identical
weights (distributed data parallel averages the gradients; every process applies the same update). Under FSDP
(:mod:`imagen_lib.training.sharding`; :attr:`Trainer.sharded`) each process holds a shard of every network, EMA
and optimizer, saves gather them collectively, and every process samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from imagen_lib import checkpoint as ckpt
from imagen_lib.cascade import Cascade
from imagen_lib.cascade_checkpoint import write_cascade_checkpoint
from imagen_lib.training import accumulation, compilation, nonfinite, process_group, sharding, tracking, trainer_state
from imagen_lib.training.data_order import DataOrder, DataPosition, start_position
from imagen_lib.training.nonfinite import NonFiniteLossError
from imagen_lib.training.posthoc_ema import PostHocTracker
from imagen_lib.training.settings import TrainerSettings, lr_factor
from imagen_lib.validation import check_int, check_seed

__all__ = ["Trainer", "StageState", "TrainerSettings", "lr_factor", "NonFiniteLossError", "DataPosition",
           "flatten_config"]

Batch = Union[Tensor, Mapping[str, Any]]
_BATCH_KEYS = ("images", "texts", "text_embeds", "text_mask", "latents")  # latents: a latent stage's, precached
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StageState:
    """What the Trainer holds for one stage of the cascade.

    Attributes:
        wrapper: the stage's network as Accelerate prepared it (distributed data parallel on several processes,
            sharded in place under FSDP), ``torch.compile``-d with ``TrainerSettings.compile``.
        optimizer: its AdamW (with a trainable text encoder's parameters as a second group), as Accelerate
            prepared it.
        ema: the ema-pytorch EMA of the network; ``ema.ema_model`` is the copy that samples.
        lr: the peak learning rate.
        step: optimizer steps taken so far [0].
        horizon: the step at which the cosine decay ends [None: set by the first :meth:`Trainer.fit`].
        data: where :meth:`Trainer.fit` is in the stage's data order (batches of skipped steps included).
        skipped: steps skipped for a non-finite loss or gradient, in all [0] ...
        skipped_in_a_row: ... and since the last step taken [0].
    """

    wrapper: nn.Module
    optimizer: Any
    ema: Any
    lr: float
    step: int = 0
    horizon: Optional[int] = None
    data: DataPosition = field(default_factory=DataPosition)
    skipped: int = 0
    skipped_in_a_row: int = 0


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
        log_with: tracker(s), ``"tensorboard"``, ``"wandb"`` or ``"all"`` [None]; ``project_dir`` is where they
            write. They start at the first :meth:`fit` or :meth:`start_trackers`; what is logged:
            :mod:`imagen_lib.training.tracking` (one that is not installed: a ValueError with its install command).
        ddp_find_unused_parameters: passed to DistributedDataParallel [False].

    Each stage's network wrapper, optimizer, EMA, step count, horizon, peak rate, data position and count of
    skipped non-finite steps are in :attr:`stages` (one :class:`StageState` per stage). :attr:`last_checkpoint`
    is the checkpoint this trainer last wrote or loaded (None: none yet). :attr:`sharded`: whether the networks
    are sharded (FSDP 2; :mod:`imagen_lib.training.sharding`). :attr:`progress_line` places
    :meth:`fit`'s progress bar on a line of the terminal (one line per process training a stage at the same
    time) [None: tqdm's choice].
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
        log_with = tracking.check_log_with(log_with) if accelerator is None else None
        self.accelerator = accelerator or self._make_accelerator(cpu, log_with, project_dir, ddp_find_unused_parameters)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            process_group.end_at_exit()  # the Trainer's or the caller's Accelerator: either group must end cleanly
        self.scaler = self._make_scaler()
        self.run_id = uuid.uuid4().hex
        self.last_checkpoint: Optional[str] = None
        self._saved_state: Optional[tuple] = None  # (path, positions) of what last_checkpoint holds
        self.progress_line: Optional[int] = None
        self.last_grad_norm: Optional[Tensor] = None  # of the last optimizer step, before clipping (for the trackers)
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
            fsdp_plugin=sharding.fsdp_plugin() if self.settings.fsdp else None,
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
        self.sharded = sharding.is_sharded(acc, self.train_text, s.fsdp)  # FSDP 2: imagen_lib.training.sharding
        nets = [stage.net for stage in self.cascade.stages]  # post-hoc EMA (EDM2), None when off: .posthoc_ema
        self.posthoc_ema = PostHocTracker.for_trainer(s.posthoc_ema, nets, self.sharded)
        self.stages: list[StageState] = []
        for k, stage in enumerate(self.cascade.stages):
            groups = [{"params": [p for p in stage.net.parameters() if p.requires_grad], "lr": lrs[k]}]
            if self.train_text:
                groups.append({"params": list(encoder.model.parameters()), "lr": s.text_encoder_lr or lrs[k]})
            opt = torch.optim.AdamW(groups, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay,
                                    fused=s.fused_optimizer or None)
            wrapper, opt = sharding.prepare_stage(acc, stage.net, opt, self.sharded)
            if self.sharded:
                sharding.shard_ema(acc, emas[k])
            wrapper = compilation.compiled(wrapper, s.compile)
            self.stages.append(StageState(wrapper, opt, emas[k], lrs[k], horizon=s.total_steps))

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
        if not isinstance(batch, Mapping) or ("images" not in batch and "latents" not in batch):
            raise TypeError("batch: expected an images tensor or a dict with 'images' (and 'texts' or 'text_embeds'; "
                            "or 'latents' for a latent stage)")
        out = {k: batch.get(k) for k in _BATCH_KEYS}
        if out["texts"] is not None:
            out["texts"] = [out["texts"]] if isinstance(out["texts"], str) else list(out["texts"])
        if out["latents"] is None:
            del out["latents"]  # pixel batches reach Cascade.forward exactly as before
        return out, int((out["images"] if out["images"] is not None else out["latents"]).shape[0])

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

    def train_step(self, stage: int, batch: Union[Batch, Sequence[Batch]]) -> float:
        """One optimizer step of ``stage`` on ``batch`` (images in [-1, 1], plus ``texts`` or ``text_embeds`` +
        ``text_mask``), or on a list of micro-batches (gradient accumulation: their gradients add up, each
        example weighing the same, as in one batch of them all; see :mod:`imagen_lib.training.accumulation`);
        returns this process's mean loss over all the examples."""
        k = self._index(stage)
        acc, state = self.accelerator, self.stages[k]
        batches = [self._normalise_batch(b) for b in accumulation.micro_batches(batch)]
        if not self._images_finite([b["images"] for b, _ in batches]):  # Cascade.forward would refuse them
            self._skip_step(k, state, "the batch's images hold NaN or infinite values")  # the guard skips the step
            return float("nan")
        if not (self.cascade.training and self.cascade.stages[k].net.training):
            self.cascade.train()  # once after sampling or validation, not every step (it walks every module)
        wrapped = [state.wrapper] + ([self.text_wrapper] if self.train_text else [])
        chunks = accumulation.weighted_chunks(batches, self.settings.max_batch_size)
        total = torch.zeros((), device=self.device)
        for i, (chunk, share) in enumerate(chunks):
            with contextlib.ExitStack() as stack:
                if i < len(chunks) - 1 and not self.sharded:  # all-reduced once, on the last chunk; FSDP
                    # reduce-scatters every chunk (skipping it would hold whole gradients until the last one)
                    for module in wrapped:
                        stack.enter_context(acc.no_sync(module))
                with self._autocast():
                    loss = self.cascade(**chunk, stage=k, net=state.wrapper, text_encoder=self.text_wrapper)
                acc.backward(loss * share if self.scaler is None else self.scaler.scale(loss * share))
            total += loss.detach().float() * share
        self._optimizer_step(k, state, total)
        return float(total)

    def _images_finite(self, images: list) -> bool:
        """Whether the step's images (one tensor per micro-batch) are finite on every process: one reduction
        and one decision, the same everywhere. Anything that is not a non-empty tensor passes here and meets
        Cascade.forward's checks."""
        peaks = [x.detach().abs().amax().float() for x in images if isinstance(x, Tensor) and x.numel() > 0]
        if not peaks:
            return True
        return nonfinite.is_finite(self.accelerator, torch.stack(peaks).amax(), None)

    def _optimizer_step(self, k: int, state: StageState, loss: Tensor) -> None:
        """Clip, check (the non-finite guard) and step; a non-finite loss or gradient skips the step."""
        opt = state.optimizer
        self._set_lr(state)
        if self.scaler is not None and not nonfinite.is_finite(self.accelerator, loss, None):
            return self._skip_step(k, state, _not_finite(loss))  # before the scaler sees these gradients
        params = [p for group in opt.param_groups for p in group["params"]]
        norm = None
        if self.settings.max_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
            norm = torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm)
        elif self.scaler is None:
            norm = nonfinite.total_grad_norm(params)
        norm = sharding.whole(norm)  # under FSDP a norm over every shard
        self.last_grad_norm = norm
        # with fp16 the scaler skips overflowed gradients itself; without it, a non-finite norm skips here
        if self.scaler is None and not nonfinite.is_finite(self.accelerator, loss, norm):
            return self._skip_step(k, state, _not_finite(loss))
        state.skipped_in_a_row = 0
        if self.scaler is None:
            opt.step()
        else:  # skips the step when a gradient overflowed, and adapts the scale
            self.scaler.step(opt)
            self.scaler.update()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        state.ema.update()
        if self.posthoc_ema is not None:
            self.posthoc_ema.update(k)
        if self.text_ema is not None:
            self.text_ema.update()

    def _skip_step(self, k: int, state: StageState, reason: str) -> None:
        """The non-finite guard's skip: gradients dropped, nothing else touched; counted, warned and logged;
        after ``max_nonfinite_steps`` in a row, :class:`NonFiniteLossError`."""
        state.optimizer.zero_grad(set_to_none=True)
        state.skipped += 1
        state.skipped_in_a_row += 1
        warnings.warn(f"stage {k}, step {state.step}: {reason}; the step is skipped ({state.skipped_in_a_row} in a "
                      f"row, {state.skipped} in all)",
                      nonfinite.NonFiniteStepWarning, stacklevel=4)  # train_step's caller
        self.accelerator.log({f"stage{k}/nonfinite_steps": state.skipped}, step=state.step)
        if state.skipped_in_a_row >= self.settings.max_nonfinite_steps:
            raise NonFiniteLossError(nonfinite.stop_message(k, state.step, state.skipped_in_a_row,
                                                            self.last_checkpoint))

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
            for chunk, share in accumulation.weighted_chunks([(batch, size)], self.settings.max_batch_size):
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
        tracking.start_trackers(self.accelerator, flatten_config(record))

    def fit(
        self, dataloader: Iterable, stage: int, steps: int, *, log_every: int = 50, sample_every: Optional[int] = None,
        sample_prompts: Optional[Sequence[str]] = None, out_dir: Union[None, str, Path] = None,
        save_every: Optional[int] = None, sample_seed: int = 0, disable_progress: bool = False,
        on_step: Optional[Callable[[int], None]] = None, start_batch: Optional[int] = 0,
    ) -> dict:
        """Train ``stage`` for ``steps`` optimizer steps on batches from ``dataloader`` (re-iterated as needed),
        each step on ``TrainerSettings.gradient_accumulation_steps`` batches (:meth:`train_step` on their list).

        Logs loss, learning rate, gradient norm and images/s every ``log_every`` steps to the trackers
        (:mod:`imagen_lib.training.tracking`); every ``sample_every`` steps writes a captioned grid of
        ``sample_prompts`` to ``out_dir/samples/stage{k}-{step}.png`` (logged to the trackers too) and every
        ``save_every`` steps (None: ``TrainerSettings.save_every``; 0: never) a checkpoint to
        ``out_dir/checkpoint`` (main process only). The cosine horizon of the stage is ``steps`` unless
        ``total_steps`` was set; the progress bar sits on line :attr:`progress_line`. ``on_step`` is called after
        every step with the stage's step count. A step skipped for a non-finite loss or gradient (see
        :mod:`imagen_lib.training.nonfinite`) takes its batches but does not count towards ``steps``.

        ``start_batch``: where in the loader's order to start: a number of batches an earlier run already took
        (default 0; a DataLoader over a map-style data set: whole epochs and batches are skipped by index,
        without loading data, and its generator advances as those epochs advanced it), or None: the stage's
        recorded position (``stages[stage].data``, restored by :meth:`load`; see
        :mod:`imagen_lib.training.data_order` for iterable data sets), so a resumed run sees the batches an
        uninterrupted one would. Returns ``{"stage", "steps", "loss", "seconds"}``.
        """
        k = self._index(stage)
        steps = check_int("steps", steps, low=1)
        log_every = check_int("log_every", log_every, low=1)
        sample_every = check_int("sample_every", sample_every, low=0, optional=True)
        save_every = check_int("save_every", save_every, low=0, optional=True)
        save_every = self.settings.save_every if save_every is None else save_every
        sample_seed = check_seed("sample_seed", sample_seed)
        if (sample_every or save_every or self.posthoc_ema) and out_dir is None:
            raise ValueError("out_dir: needed to write samples, checkpoints or post-hoc EMA snapshots")
        state = self.stages[k]
        order = self._data_order(dataloader, state, start_batch)
        if state.horizon is None:
            state.horizon = state.step + steps
        self.start_trackers()
        bar = tqdm(total=steps, desc=f"stage {k}", disable=disable_progress or not self.is_main_process,
                   position=self.progress_line)
        start_time, meter, mean, done = time.time(), tracking.StepMeter(self.accelerator, k), float("nan"), 0
        for batches in accumulation.step_groups(order, self.settings.gradient_accumulation_steps):
            skipped = state.skipped
            meter.add(self.train_step(k, batches), batches)
            state.data = order.position
            if state.skipped != skipped:  # the non-finite guard skipped it: the batch is taken, the step is not
                continue
            done += 1
            meter.add_grad_norm(self.last_grad_norm)
            if done % log_every == 0 or done == steps:
                mean = meter.log(state.step, state.optimizer.param_groups[0]["lr"])  # loss, lr, grad norm, images/s
                bar.set_postfix(loss=f"{mean:.4f}")
            bar.update(1)
            self._after_step(k, done, on_step, sample_every, sample_prompts, save_every, out_dir, sample_seed)
            meter.resume()  # the time of grids and checkpoints is not training time
            if done == steps:
                break
        bar.close()
        return {"stage": k, "steps": steps, "loss": mean, "seconds": time.time() - start_time}

    def _data_order(self, dataloader: Iterable, state: StageState, start_batch: Optional[int]) -> DataOrder:
        """``fit``'s batches: from ``start_batch`` batches in, or (None) from the stage's recorded position."""
        if start_batch is None:
            return DataOrder(self._prepare_loader(dataloader), state.data)
        start = start_position(dataloader, check_int("start_batch", start_batch, low=0))
        return DataOrder(self._prepare_loader(dataloader), start)

    def _after_step(self, k, done, on_step, sample_every, sample_prompts, save_every, out_dir, sample_seed) -> None:
        """``fit``'s callback, sample grid and checkpoint after its ``done``-th step."""
        state = self.stages[k]
        if on_step is not None:
            on_step(state.step)
        if sample_every and done % sample_every == 0 and sample_prompts:
            grid = self.write_samples(Path(out_dir) / "samples" / f"stage{k}-{state.step:06d}.png", sample_prompts,
                                      stop_at_stage=k, seed=sample_seed)
            tracking.log_image(self.accelerator, f"stage{k}/samples", grid, state.step)
        if self.posthoc_ema is not None:
            self.posthoc_ema.after_step(k, Path(out_dir) / "checkpoint", self.run_id, self.is_main_process)
        if save_every and done % save_every == 0:
            self.save(Path(out_dir) / "checkpoint")

    def _prepare_loader(self, dataloader: Iterable) -> Iterable:
        """Let Accelerate shard a DataLoader over the processes, unless its data set already reads a
        different part on each process (``split_by_process``, e.g. ``ShardDataset``): sharding it again
        would drop or duplicate data. The cascade moves batches to its device itself."""
        from torch.utils.data import DataLoader

        if isinstance(dataloader, DataLoader) and not getattr(dataloader.dataset, "split_by_process", False):
            return self.accelerator.prepare_data_loader(dataloader)
        return dataloader

    def write_samples(self, path: Union[str, Path], prompts: Sequence[str], **sample_kwargs: Any) -> Optional[str]:
        """Sample ``prompts`` with the EMA weights and write a captioned grid PNG (main process only; under FSDP
        every process samples, as the sharded networks' forward passes are collectives)."""
        if not (self.is_main_process or self.sharded):
            return None
        from imagen_lib.images import captioned_grid, save_png

        sample_kwargs.setdefault("disable_progress", True)
        images = self.sample(list(prompts), **sample_kwargs)
        if not self.is_main_process:
            return None
        return save_png(str(path), captioned_grid(images.cpu(), list(prompts)))

    # ----------------------------------------------------------------------------------------------------
    # checkpoints
    # ----------------------------------------------------------------------------------------------------

    def save(self, path: Union[str, Path], *, overwrite: bool = False) -> str:
        """Write a resumable checkpoint (configuration, weights, EMA weights, optimizer, schedule, steps, data
        positions, non-finite counts, RNG; :mod:`imagen_lib.training.trainer_state`).

        Call it on every process: only the main one writes, then all wait for it. An existing folder is
        replaced only when this run wrote it (or with ``overwrite=True``); ``TrainerSettings.keep_last``
        versions are kept where the checkpoint writer keeps versions. Weights holding NaN or infinite values are
        never written (:class:`NonFiniteLossError`), so the last good checkpoint stays.
        """
        modules = {f"stage{k}": st.net for k, st in enumerate(self.cascade.stages)}
        modules.update({f"stage{k}.ema": st.ema.ema_model for k, st in enumerate(self.stages)})
        if self.text_ema is not None:
            modules["text_encoder"] = self.cascade.text_encoder.model
            modules["text_encoder.ema"] = self.text_ema.ema_model
        # under FSDP gathered collectively (whole tensors on the main process); else each module's state_dict()
        files = {name: sharding.full_state_dict(module, self.sharded) for name, module in modules.items()}
        posthoc = self.posthoc_ema.state(self.run_id) if self.posthoc_ema is not None else ({}, {})
        files.update(posthoc[0])
        optimizers = [sharding.optimizer_state(net.net, st.optimizer, self.sharded)
                      for net, st in zip(self.cascade.stages, self.stages)]
        # on every process, so all of them raise together
        sharding.check_finite_weights(self.accelerator, files, str(path), self.last_checkpoint, self.sharded)
        if self.is_main_process:
            tensors, state = trainer_state.trainer_state(self, optimizers)
            files["trainer"] = tensors
            write_cascade_checkpoint(self.cascade, path, tensors=files, json_files={"trainer": state, **posthoc[1]},
                                     overwrite=overwrite, run_id=self.run_id, **self._version_options())
        self.accelerator.wait_for_everyone()  # entered by every process
        self._mark_saved(path)
        return str(path)

    def _mark_saved(self, path: Union[str, Path]) -> None:
        self.last_checkpoint = str(path)
        self._saved_state = (str(path), self._positions())

    def _positions(self) -> list:
        return [(st.step, st.data.batches, st.skipped) for st in self.stages]

    def is_saved(self, path: Union[str, Path]) -> bool:
        """Whether the checkpoint at ``path`` was last written (or loaded) by this trainer and it has not
        stepped since (no step taken or skipped in any stage)."""
        return self._saved_state == (str(path), self._positions())

    def _version_options(self) -> dict:
        """``keep_last`` versions kept, and the new version labelled with each stage's step count."""
        return {"keep_last": self.settings.keep_last, "label": "step-" + "-".join(f"{s:06d}" for s in self.steps)}

    def load(self, path: Union[str, Path], *, stages: Optional[Sequence[int]] = None) -> "Trainer":
        """Restore everything :meth:`save` wrote, so training resumes where it stopped (call on every process).

        With ``stages``, only those stages' weights, EMA, optimizer state, step count, schedule horizon, data
        position and non-finite counts (e.g. stages trained in another process); the rest of this trainer
        (other stages, RNG) stays as it is. ``trainer.json``'s values are checked (an error names the key); a
        stage saved at another image size than this trainer's warns.
        """
        given, path = path, ckpt.resolve(path)  # one committed version read throughout, whatever a save does meanwhile
        trainer_state.check_stage_configs(ckpt.read_config(path), self.cascade.config, path)
        partial = stages is not None
        chosen = sorted({self._index(k) for k in stages}) if partial else range(self.num_stages)
        tensors = ckpt.read_tensors(path, "trainer", self.device)
        state = trainer_state.check_trainer_json(ckpt.read_json(path, "trainer"), self.num_stages, path)
        for k in chosen:
            trainer_state.load_stage(self, path, k, state, tensors)
        if self.posthoc_ema is not None:
            self.posthoc_ema.load(path, chosen, state["steps"], self.device)
        if partial:
            return self
        if self.train_text:
            for module, name in ((self.cascade.text_encoder.model, "text_encoder"),
                                 (self.text_ema.ema_model, "text_encoder.ema")):
                ckpt.load_weights(module, ckpt.read_tensors(path, name, self.device), f"{name}.safetensors in {path}")
            self.text_ema.step.copy_(tensors["ema_text.step"])
            self.text_ema.initted.copy_(tensors["ema_text.initted"])
        if state.get("scaler") and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.run_id = state["run_id"]
        self._mark_saved(given)
        ckpt.set_rng_state(state["rng"], {k: v.cpu() for k, v in tensors.items()})
        if self.accelerator.process_index > 0:  # one saved stream, but each process needs its own noise
            torch.manual_seed(int(torch.randint(0, 2**62, ())) + self.accelerator.process_index)
        return self


def _not_finite(loss: Tensor) -> str:
    return f"the loss ({float(loss):g}) or a gradient is not finite"


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
