"""What the two text encoders share: :class:`~imagen_lib.text.T5TextEncoder` and
:class:`~imagen_lib.text_clip.CLIPTextEncoder` both wrap a transformers model and its tokenizer, freeze or train
it the same way, and build their tiny random versions by saving and loading them through ``from_pretrained``
(the path a pretrained encoder takes). transformers is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Optional, TypeVar, Union

import torch
from torch import nn

from imagen_lib.validation import check_int

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

Encoder = TypeVar("Encoder")


def resolve_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """``dtype`` given as None, a ``torch.dtype`` or one of the names in :data:`DTYPES`."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected None, a torch.dtype or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


@contextlib.contextmanager
def quiet_transformers():
    """No per-file progress bars while a (small) encoder is loaded or saved."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def build_random_and_reload(
    model_class: type, config, tokenizer, *, seed: int, folder: Union[None, str, Path], prefix: str,
    load: Callable[[Path], Encoder],
) -> Encoder:
    """Draw ``model_class(config)``'s weights under ``seed`` (the caller's RNG stream is left alone), save it and
    ``tokenizer`` with ``save_pretrained`` into ``folder`` (a temporary folder named ``prefix...``, removed after
    loading, when None) and return ``load(folder)``."""
    seed = check_int("seed", seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    target = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with quiet_transformers():
            model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        return load(target)
    finally:
        if folder is None:
            shutil.rmtree(target, ignore_errors=True)


class PretrainedTextEncoder(nn.Module):
    """Freezing, device and saving of an encoder held in ``self.model`` with ``self.tokenizer``."""

    model: nn.Module
    trainable: bool

    def set_trainable(self, trainable: bool) -> None:
        """Frozen (eval mode, no gradients) or trained jointly with the cascade."""
        self.trainable = bool(trainable)
        self.model.requires_grad_(self.trainable)
        self._freeze_unused()
        self.model.train(self.trainable and self.training)

    def _freeze_unused(self) -> None:
        """Turn off gradients of parameters that never reach the output (none by default)."""

    def train(self, mode: bool = True):
        # a frozen encoder stays in eval mode whatever its parent module asks (no dropout on embeddings)
        super().train(mode)
        self.model.train(mode and self.trainable)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def save_pretrained(self, folder: Union[str, Path]) -> None:
        """Write model and tokenizer files (safetensors + JSON) to a local ``folder``."""
        with quiet_transformers():
            self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
