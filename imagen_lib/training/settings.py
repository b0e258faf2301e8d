"""The Trainer's optimisation settings (:class:`TrainerSettings`, the config's ``trainer`` block) and the
learning-rate schedule (:func:`lr_factor`). Every field is checked when the settings are made, so a bad value
fails with an error that names the field before anything trains."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Optional, Union

from imagen_lib.training.compilation import check_compile
from imagen_lib.training.posthoc_ema import PostHocEMASettings, check_settings
from imagen_lib.validation import check_int, check_number

__all__ = ["TrainerSettings", "lr_factor"]


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
        gradient_accumulation_steps: loader batches per optimizer step in :meth:`Trainer.fit` [1]: their
            gradients add up (each example weighs the same, as in one batch of them all) before one step;
            steps, the learning-rate schedule, the EMA, ``save_every`` and ``sample_every`` count optimizer
            steps. Effective batch: ``batch_size * gradient_accumulation_steps * processes``.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (with loss scaling) ["no"].
        text_encoder_lr: learning rate of a trainable text encoder [None: the stage's ``lr``].
        fused_optimizer: AdamW's fused implementation (the same update in one kernel over all parameters
            instead of many small ones; ~7% of a CPU step of a 1 M-parameter net) [True].
        save_every: optimizer steps between checkpoints within a stage [None: after each stage only].
        keep_last: committed checkpoint versions kept (older ones are removed by the next save) [2].
        max_nonfinite_steps: consecutive steps with a non-finite loss or gradient (each skipped) after which
            training stops with :class:`~imagen_lib.training.nonfinite.NonFiniteLossError` [20].
        fsdp: shard each stage's weights, gradients, optimizer state and EMA over the processes (FSDP 2 through
            Accelerate; :mod:`imagen_lib.training.sharding`) when the Trainer makes its accelerator and runs on
            several GPUs [False: data parallel]. An ``accelerate launch --config_file`` with ``distributed_type:
            FSDP`` shards without it.
        compile: ``torch.compile`` each stage's network for training: True (the inductor backend), a backend
            name (``"aot_eager"``, ...; :data:`~imagen_lib.training.compilation.BACKENDS`) or False [False]. See
            :mod:`imagen_lib.training.compilation`.
        posthoc_ema: track power-function EMAs and store snapshots of them for post-hoc EMA (EDM2), a
            :class:`~imagen_lib.training.posthoc_ema.PostHocEMASettings` or a dict ``{sigma_rels: [0.05, 0.10],
            snapshot_every: 500}`` [None: off; the classic EMA above is used either way].
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
    save_every: Optional[int] = None
    keep_last: int = 2
    max_nonfinite_steps: int = 20
    gradient_accumulation_steps: int = 1
    fsdp: bool = False
    compile: Union[bool, str] = False
    posthoc_ema: Optional[PostHocEMASettings] = None

    def __post_init__(self):
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision: expected 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        self.lr = _check_lr(self.lr)
        self._check_optimizer()
        self._check_schedule()
        self._check_ema()
        self.max_batch_size = check_int("max_batch_size", self.max_batch_size, low=1, optional=True)
        self.save_every = check_int("save_every", self.save_every, low=1, optional=True)
        self.keep_last = check_int("keep_last", self.keep_last, low=1)
        self.max_nonfinite_steps = check_int("max_nonfinite_steps", self.max_nonfinite_steps, low=1)
        self.gradient_accumulation_steps = check_int("gradient_accumulation_steps", self.gradient_accumulation_steps,
                                                     low=1)
        self.compile = check_compile(self.compile)
        self.posthoc_ema = check_settings(self.posthoc_ema)
        for name in ("fused_optimizer", "fsdp"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected True or False, got {getattr(self, name)!r}")

    def _check_optimizer(self) -> None:
        if isinstance(self.betas, (str, bytes)) or not isinstance(self.betas, Sequence) or len(self.betas) != 2:
            raise TypeError(f"betas: expected two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(check_number("betas", b, low=0, high=1, high_open=True) for b in self.betas)
        self.eps = check_number("eps", self.eps, low=0, low_open=True)
        self.weight_decay = check_number("weight_decay", self.weight_decay, low=0)
        self.max_grad_norm = check_number("max_grad_norm", self.max_grad_norm, low=0, low_open=True, optional=True)
        self.text_encoder_lr = check_number("text_encoder_lr", self.text_encoder_lr, low=0, low_open=True,
                                            optional=True)

    def _check_schedule(self) -> None:
        self.warmup_steps = check_int("warmup_steps", self.warmup_steps, low=0)
        self.total_steps = check_int("total_steps", self.total_steps, low=1, optional=True)
        self.min_lr_ratio = check_number("min_lr_ratio", self.min_lr_ratio, low=0, high=1)

    def _check_ema(self) -> None:
        self.ema_beta = check_number("ema_beta", self.ema_beta, low=0, high=1)
        self.ema_update_after_step = check_int("ema_update_after_step", self.ema_update_after_step, low=0)
        self.ema_update_every = check_int("ema_update_every", self.ema_update_every, low=1)  # a modulus
        self.ema_power = check_number("ema_power", self.ema_power, low=0, low_open=True)

    @property
    def config(self) -> dict:
        out = dataclasses.asdict(self)
        out["lr"] = list(self.lr) if isinstance(self.lr, Sequence) else self.lr
        out["betas"] = list(self.betas)
        return out


def _check_lr(lr):
    """One peak rate (a float) or one per stage (a list of floats), each finite and > 0."""
    if isinstance(lr, Sequence) and not isinstance(lr, (str, bytes)):
        if not lr:
            raise ValueError("lr: expected a number > 0 or one per stage, got an empty list")
        return [check_number(f"lr[{k}]", v, low=0, low_open=True) for k, v in enumerate(lr)]
    return check_number("lr", lr, low=0, low_open=True)


def lr_factor(step: int, warmup_steps: int, total_steps: Optional[int], min_lr_ratio: float) -> float:
    """Multiplier of the peak rate at optimizer step ``step`` (0-based): linear warm-up, then cosine decay
    from 1 to ``min_lr_ratio`` at ``total_steps`` (constant 1 after warm-up when ``total_steps`` is None)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
