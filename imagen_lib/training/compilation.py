"""``TrainerSettings.compile``: ``torch.compile`` of each stage's network for training.

The compiled module wraps the network the Trainer calls for the loss (after Accelerate prepared it, so under
distributed data parallel or FSDP the compiled graph includes their hooks as ``torch.compile`` supports them).
The cascade keeps the original networks: checkpoints save their state dicts, whose names carry no ``_orig_mod.``
prefix, and sampling (the EMA copies) runs uncompiled, as it calls the networks with changing batch shapes and
guidance branches that would recompile often. On a GPU the first steps are slow while it compiles; on the CPU
inductor needs a C++ compiler (``gcc``) and gains little on small networks (see :data:`BACKENDS`).
"""

from __future__ import annotations

from typing import Union

from torch import nn

__all__ = ["BACKENDS", "check_compile", "compiled"]

BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")
"""``torch.compile`` backends ``TrainerSettings.compile`` may name: ``True`` is ``"inductor"`` (generated kernels;
on the CPU it builds C++ with ``gcc``: minutes for even a tiny network on two busy cores, measured 424 s here);
``"aot_eager"`` traces forward and backward without generating code (fast to compile; for checking that a network
compiles); ``"cudagraphs"`` needs a GPU."""


def check_compile(value: Union[bool, str]) -> Union[bool, str]:
    """``TrainerSettings.compile`` checked: False, True or a :data:`BACKENDS` name."""
    if isinstance(value, bool) or value in BACKENDS:
        return value
    raise ValueError(f"compile: expected True, False or one of {', '.join(BACKENDS)}, got {value!r}")


def compiled(module: nn.Module, compile: Union[bool, str]) -> nn.Module:
    """``torch.compile(module)`` with backend ``compile`` (True: inductor), or ``module`` itself when False."""
    if compile is False:
        return module
    import torch

    return torch.compile(module, backend="inductor" if compile is True else compile)
