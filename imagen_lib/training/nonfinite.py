"""The non-finite guard: a step whose loss or gradient is NaN or infinite is skipped (weights, optimizer
moments, EMA and step count untouched, gradients zeroed), counted and warned about; after
``TrainerSettings.max_nonfinite_steps`` such steps in a row training stops with :class:`NonFiniteLossError`.
Checkpoints never hold non-finite weights (:func:`check_finite_weights`), so the last good one survives.

With fp16 the loss scaler skips steps whose scaled gradients overflowed and lowers its scale; those are
its own business and are not counted here (only a non-finite loss is)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor

__all__ = ["NonFiniteLossError", "NonFiniteStepWarning", "check_finite_weights", "is_finite", "total_grad_norm"]


class NonFiniteLossError(ValueError):
    """Training stopped: too many steps in a row had a non-finite loss or gradient."""


class NonFiniteStepWarning(RuntimeWarning):
    """A step was skipped because its loss or gradient was not finite."""


def total_grad_norm(params: list) -> Tensor:
    """The 2-norm of every gradient together (what ``clip_grad_norm_`` returns), without changing them."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def is_finite(accelerator, loss: Tensor, grad_norm: Optional[Tensor]) -> bool:
    """Whether the step's loss (this process's) and gradient norm (the same on every process once gradients
    are averaged) are finite on every process: all processes take the same decision (one collective, entered
    by every process, when there are several)."""
    bad = ~torch.isfinite(loss.detach().float())
    if grad_norm is not None:
        bad = bad | ~torch.isfinite(grad_norm.detach().float().to(bad.device))
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad.float().to(accelerator.device), reduction="sum") > 0
    return not bool(bad)


def stop_message(stage: int, step: int, count: int, checkpoint: Optional[str]) -> str:
    then = (f"the last good checkpoint is {checkpoint}: resume from it once fixed" if checkpoint
            else "no checkpoint was written by this run yet")
    return (f"stage {stage}, step {step}: {count} steps in a row had a non-finite loss or gradient and were "
            f"skipped (trainer.max_nonfinite_steps), so training stopped; look for NaN or infinite values in "
            f"the data, or lower trainer.lr; {then}")


def check_finite_weights(files: Mapping[str, Mapping[str, Tensor]], path: str,
                         last_good: Optional[str] = None) -> None:
    """Refuse to write a checkpoint whose weights (``{"stage0": state_dict, ...}``) hold NaN or infinite
    values: it would replace the last good one."""
    for name, state in files.items():
        for key, tensor in state.items():
            if isinstance(tensor, Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                keep = f"; the last good checkpoint ({last_good}) is kept" if last_good else ""
                raise NonFiniteLossError(f"save: {name}.safetensors would hold NaN or infinite values ({key}), so "
                                         f"nothing is written to {path}{keep}")
