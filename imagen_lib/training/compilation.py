"""``TrainerSettings.compile``: ``torch.compile`` of each stage's network for training.

The compiled module wraps the network the Trainer calls for the loss (after Accelerate prepared it, so under
distributed data parallel or FSDP the compiled graph includes their hooks as ``torch.compile`` supports them).
The cascade keeps the original networks: checkpoints save their state dicts, whose names carry no ``_orig_mod.``
prefix, and sampling (the EMA copies) runs uncompiled, as it calls the networks with changing batch shapes and
guidance branches that would recompile often. On a GPU the first steps are slow while it compiles; on the CPU
inductor needs a C++ compiler (``gcc``) and gains little on small networks.
"""

from __future__ import annotations

from torch import nn

__all__ = ["compiled"]


def compiled(module: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(module)`` when ``enabled``, else ``module`` itself."""
    if not enabled:
        return module
    import torch

    return torch.compile(module)
