"""Training a cascade, one stage at a time or interleaved, on one device or many through Accelerate.

Per stage: AdamW, learning-rate warm-up then cosine decay, gradient clipping, an EMA of the weights
(ema-pytorch; sampling uses it unless told otherwise), gradient accumulation over chunks of at most
``max_batch_size`` examples with correctly weighted losses, mixed precision (bf16, or fp16 with loss
scaling) and device placement through Accelerate.

Multi-process rules (``accelerate launch``): call every method on every process. Only the main process
writes files, no collective operation is ever entered by one process alone, and all processes hold identical
weights (distributed data parallel averages the gradients; every process applies the same update).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
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
from imagen_lib.cascade import Cascade, write_cascade_checkpoint

Batch = Union[Tensor, Mapping[str, Any]]
_BATCH_KEYS = ("images", "texts", "text_embeds", "text_mask")


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
            raise ValueError(f"warmup_steps, min_lr_ratio: expected >= 0 and in [0, 1], got {self.warmup_steps}, {self.min_lr_ratio}")
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


class Trainer:
    """Trains the stages of a :class:`~imagen_lib.cascade.Cascade`.

    Args:
        cascade: the cascade; its networks are moved to the training device.
        lr: peak learning rate (shortcut for ``TrainerSettings.lr``), default 1e-4.
        settings: a :class:`TrainerSettings`; keyword arguments override its fields.
        accelerator: an ``accelerate.Accelerator`` to use (default: one is made with ``mixed_precision``,
            ``cpu``, ``log_with`` and ``project_dir``).
        cpu: force the CPU even when a GPU is present [False].
        log_with: Accelerate tracker(s), e.g. ``"tensorboard"`` [None]; ``project_dir`` is where they write.
        ddp_find_unused_parameters: passed to DistributedDataParallel [False].
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
        self.lrs = [float(v) for v in lrs] if isinstance(lrs, Sequence) else [float(lrs)] * self.num_stages
        if len(self.lrs) != self.num_stages:
            raise ValueError(f"lr: expected one value or {self.num_stages} (one per stage), got {len(self.lrs)}")
        self.accelerator = accelerator or self._make_accelerator(cpu, log_with, project_dir, ddp_find_unused_parameters)
        self.run_id = uuid.uuid4().hex
        self.steps = [0] * self.num_stages
        self.horizons: list[Optional[int]] = [self.settings.total_steps] * self.num_stages
        self._setup_modules()
        if log_with is not None:
            self.accelerator.init_trackers("imagen_lib", config=_flat(self.settings.config))

    def _make_accelerator(self, cpu, log_with, project_dir, find_unused):
        import os

        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs

        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if distributed and not torch.cuda.is_available():
            cpu = True  # several processes and no GPU: Accelerate only joins them on the CPU when told so
        state = AcceleratorState._shared_state
        if not distributed and state and state.get("_mixed_precision") not in (None, self.settings.mixed_precision):
            # one process (a notebook, tests): let a new Trainer choose another precision than the last one
            AcceleratorState._reset_state()
        return Accelerator(
            mixed_precision=self.settings.mixed_precision, cpu=cpu, log_with=log_with,
            project_dir=None if project_dir is None else str(project_dir),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
        )

    def _setup_modules(self) -> None:
        """Move the cascade, wrap each trained module for distribution, make optimizers and EMAs."""
        from ema_pytorch import EMA

        acc, s = self.accelerator, self.settings
        self.cascade.to(acc.device)
        encoder = self.cascade.text_encoder
        self.train_text = encoder is not None and encoder.trainable
        ema_kwargs = dict(beta=s.ema_beta, update_after_step=s.ema_update_after_step, update_every=s.ema_update_every,
                          power=s.ema_power, include_online_model=False, use_foreach=True)
        # EMA copies are made before Accelerate wraps the nets (its mixed-precision forward patch stays off them)
        self.emas = [EMA(stage.net, **ema_kwargs) for stage in self.cascade.stages]
        self.text_ema = EMA(encoder.model, **ema_kwargs) if self.train_text else None  # shared by all stages
        self.text_wrapper = acc.prepare_model(encoder) if self.train_text else None
        self.wrappers, self.optimizers = [], []
        for k, stage in enumerate(self.cascade.stages):
            wrapper = acc.prepare_model(stage.net)
            groups = [{"params": [p for p in stage.net.parameters() if p.requires_grad], "lr": self.lrs[k]}]
            if self.train_text:
                groups.append({"params": list(encoder.model.parameters()), "lr": s.text_encoder_lr or self.lrs[k]})
            opt = torch.optim.AdamW(groups, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay,
                                    fused=s.fused_optimizer or None)
            self.wrappers.append(wrapper)
            self.optimizers.append(acc.prepare_optimizer(opt))

    # ----------------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def _stage(self, stage: int) -> int:
        if not isinstance(stage, int) or not 0 <= stage < self.num_stages:
            raise ValueError(f"stage: expected a stage index in [0, {self.num_stages - 1}], got {stage!r}")
        return stage

    def ema_networks(self) -> list[nn.Module]:
        """The EMA copy of each stage's network."""
        return [e.ema_model for e in self.emas]

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

    def _set_lr(self, k: int) -> float:
        s = self.settings
        factor = lr_factor(self.steps[k], s.warmup_steps, self.horizons[k], s.min_lr_ratio)
        groups = self.optimizers[k].param_groups
        groups[0]["lr"] = self.lrs[k] * factor
        if len(groups) > 1:
            groups[1]["lr"] = (s.text_encoder_lr or self.lrs[k]) * factor
        return groups[0]["lr"]

    # ----------------------------------------------------------------------------------------------------
    # steps
    # ----------------------------------------------------------------------------------------------------

    def train_step(self, stage: int, batch: Batch) -> float:
        """One optimizer step of ``stage`` on ``batch`` (images in [-1, 1], plus ``texts`` or ``text_embeds`` +
        ``text_mask``); returns this process's mean loss over the batch."""
        k = self._stage(stage)
        acc, opt = self.accelerator, self.optimizers[k]
        batch, size = self._normalise_batch(batch)
        if not (self.cascade.training and self.cascade.stages[k].net.training):
            self.cascade.train()  # once after sampling or validation, not every step (it walks every module)
        wrapped = [self.wrappers[k]] + ([self.text_wrapper] if self.train_text else [])
        chunks = self._chunks(batch, size)
        total = torch.zeros((), device=self.device)
        for i, (chunk, share) in enumerate(chunks):
            with contextlib.ExitStack() as stack:
                if i < len(chunks) - 1:  # gradients are all-reduced once, on the last chunk
                    for module in wrapped:
                        stack.enter_context(acc.no_sync(module))
                with acc.autocast():
                    loss = self.cascade(**chunk, stage=k, net=self.wrappers[k], text_encoder=self.text_wrapper)
                acc.backward(loss * share)
            total += loss.detach().float() * share
        self._optimizer_step(k, opt)
        return float(total)

    def _optimizer_step(self, k: int, opt) -> None:
        self._set_lr(k)
        if self.settings.max_grad_norm is not None:
            self.accelerator.unscale_gradients(optimizer=opt)
            params = [p for group in opt.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.steps[k] += 1
        self.emas[k].update()
        if self.text_ema is not None:
            self.text_ema.update()

    @torch.no_grad()
    def valid_step(self, stage: int, batch: Batch, use_ema: bool = True) -> float:
        """Mean loss of ``stage`` on ``batch`` in eval mode (no text dropout), with the EMA weights by default."""
        k = self._stage(stage)
        batch, size = self._normalise_batch(batch)
        net = self.emas[k].ema_model if use_ema else self.cascade.stages[k].net
        encoder = self.text_ema.ema_model if (use_ema and self.text_ema is not None) else None
        was_training = self.cascade.training
        self.cascade.eval()
        net.eval()
        try:
            total = 0.0
            for chunk, share in self._chunks(batch, size):
                with self.accelerator.autocast():
                    loss = self.cascade(**chunk, stage=k, net=net, text_encoder=_encoder_call(encoder, self.cascade))
                total += float(loss) * share
        finally:
            self.cascade.train(was_training)
        return total

    def sample(self, *args: Any, use_ema: bool = True, **kwargs: Any):
        """:meth:`Cascade.sample` with the EMA networks (``use_ema``, default True) or the raw ones."""
        if use_ema:
            kwargs.setdefault("networks", self.ema_networks())
            if self.text_ema is not None:
                kwargs.setdefault("text_encoder", _encoder_call(self.text_ema.ema_model, self.cascade))
        return self.cascade.sample(*args, **kwargs)

    # ----------------------------------------------------------------------------------------------------
    # the loop
    # ----------------------------------------------------------------------------------------------------

    def fit(
        self, dataloader: Iterable, stage: int, steps: int, *, log_every: int = 50, sample_every: Optional[int] = None,
        sample_prompts: Optional[Sequence[str]] = None, out_dir: Union[None, str, Path] = None,
        save_every: Optional[int] = None, sample_seed: int = 0, disable_progress: bool = False,
        on_step: Optional[Callable[[int], None]] = None, progress_position: Optional[int] = None,
    ) -> dict:
        """Train ``stage`` for ``steps`` optimizer steps on batches from ``dataloader`` (re-iterated as needed).

        Logs the mean loss every ``log_every`` steps through the Accelerate trackers; every ``sample_every``
        steps writes a captioned grid of ``sample_prompts`` to ``out_dir/samples/stage{k}-{step}.png`` and every
        ``save_every`` steps a checkpoint to ``out_dir/checkpoint`` (main process only). The cosine horizon of
        the stage is ``steps`` unless ``total_steps`` was set. ``on_step`` is called after every step with the
        stage's step count; ``progress_position`` places the progress bar (one line per process that trains a
        stage at the same time). Returns ``{"stage", "steps", "loss", "seconds"}``.
        """
        k = self._stage(stage)
        if int(steps) < 1:
            raise ValueError(f"steps: expected a positive number of steps, got {steps}")
        if (sample_every or save_every) and out_dir is None:
            raise ValueError("out_dir: needed to write samples or checkpoints")
        if self.horizons[k] is None:
            self.horizons[k] = self.steps[k] + int(steps)
        loader = self._prepare_loader(dataloader)
        bar = tqdm(total=int(steps), desc=f"stage {k}", disable=disable_progress or not self.is_main_process,
                   position=progress_position)
        start, window, mean = time.time(), [], float("nan")
        for i, batch in zip(range(int(steps)), _forever(loader)):
            window.append(self.train_step(k, batch))
            step = i + 1
            if step % log_every == 0 or step == int(steps):
                mean = self._reduced_mean(window)
                window = []
                self.accelerator.log({f"stage{k}/loss": mean, f"stage{k}/lr": self.optimizers[k].param_groups[0]["lr"]},
                                     step=self.steps[k])
                bar.set_postfix(loss=f"{mean:.4f}")
            bar.update(1)
            if on_step is not None:
                on_step(self.steps[k])
            if sample_every and step % sample_every == 0 and sample_prompts:
                self.write_samples(Path(out_dir) / "samples" / f"stage{k}-{self.steps[k]:06d}.png", sample_prompts,
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
            files.update({f"stage{k}.ema": e.ema_model.state_dict() for k, e in enumerate(self.emas)})
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
            "run_id": self.run_id, "steps": list(self.steps), "horizons": list(self.horizons),
            "settings": self.settings.config,
            "optimizers": [ckpt.split_state(o.state_dict(), f"opt{k}", tensors) for k, o in enumerate(self.optimizers)],
            "rng": ckpt.rng_state(tensors),
            "scaler": None if self.accelerator.scaler is None else self.accelerator.scaler.state_dict(),
        }
        for k, e in enumerate(self.emas):
            tensors[f"ema{k}.step"], tensors[f"ema{k}.initted"] = e.step, e.initted
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
        chosen = sorted({self._stage(k) for k in stages}) if partial else range(len(self.cascade.stages))
        device = self.device
        for k in chosen:
            self.cascade.stages[k].net.load_state_dict(ckpt.read_tensors(path, f"stage{k}", device))
            self.emas[k].ema_model.load_state_dict(ckpt.read_tensors(path, f"stage{k}.ema", device))
        if self.train_text and not partial:
            self.cascade.text_encoder.model.load_state_dict(ckpt.read_tensors(path, "text_encoder", device))
            self.text_ema.ema_model.load_state_dict(ckpt.read_tensors(path, "text_encoder.ema", device))
        tensors = ckpt.read_tensors(path, "trainer", device)
        state = ckpt.read_json(path, "trainer")
        for k in chosen:
            self.optimizers[k].load_state_dict(ckpt.join_state(state["optimizers"][k], tensors))
            self.emas[k].step.copy_(tensors[f"ema{k}.step"])
            self.emas[k].initted.copy_(tensors[f"ema{k}.initted"])
        if partial:
            for k in chosen:
                self.steps[k], self.horizons[k] = state["steps"][k], state["horizons"][k]
            return self
        if self.text_ema is not None:
            self.text_ema.step.copy_(tensors["ema_text.step"])
            self.text_ema.initted.copy_(tensors["ema_text.initted"])
        if state.get("scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.steps, self.horizons, self.run_id = list(state["steps"]), list(state["horizons"]), state["run_id"]
        ckpt.set_rng_state(state["rng"], {k: v.cpu() for k, v in tensors.items()})
        if self.accelerator.process_index > 0:  # one saved stream, but each process needs its own noise
            torch.manual_seed(int(torch.randint(0, 2**62, ())) + self.accelerator.process_index)
        return self


def _encoder_call(module: Optional[nn.Module], cascade: Cascade):
    """A text-encoder callable built on another copy of the encoder's T5 model (the EMA one)."""
    if module is None:
        return None
    encoder = cascade.text_encoder

    def encode(texts):
        ids, mask = encoder.tokenize(texts)
        was_training = module.training
        module.eval()  # no dropout: sampling and validation are deterministic
        try:
            hidden = module(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        finally:
            module.train(was_training)
        return hidden * mask.unsqueeze(-1).to(hidden.dtype), mask

    return encode


def _forever(loader: Iterable):
    """Batches of ``loader``, epoch after epoch, telling the loader and its data set (new crops, flips and
    shard order) each epoch's number before it starts."""
    epoch = 0
    dataset = getattr(loader, "dataset", None)
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("dataloader: it yielded no batch")
        epoch += 1


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out
