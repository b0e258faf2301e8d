"""Teaching a word-level text encoder new words while everything it already reads stays bit-identical.

:func:`learn_new_words` extends the tokenizer (:meth:`~imagen_lib.text.T5TextEncoder.extend_vocabulary`: one new
embedding row per word, the mean of the existing rows) and makes those rows, and nothing else of the T5, trainable:
the table is split into a frozen block (the old rows, never given a gradient, so no optimizer step or weight decay
touches them) and a trained block (the new rows). The Trainer then optimizes them with the stage (the encoder is
marked trainable, so it also keeps their EMA). :func:`fold_new_words` joins the blocks into an ordinary embedding
table again before the encoder is saved. Other stages sharing the encoder read every old caption exactly as
before: a caption's embedding changes only where it holds a new word.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NewRowsEmbedding(nn.Module):
    """An embedding table whose first ``first_new`` rows are frozen and whose remaining rows are trained."""

    def __init__(self, table: nn.Embedding, first_new: int):
        super().__init__()
        weight = table.weight.detach()
        self.frozen = nn.Parameter(weight[:first_new].clone(), requires_grad=False)
        self.new = nn.Parameter(weight[first_new:].clone())

    @property
    def weight(self) -> Tensor:
        return torch.cat([self.frozen, self.new])

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)


def learn_new_words(encoder, words: Sequence[str]) -> list[str]:
    """Add ``words`` to ``encoder``'s word-level vocabulary and make their embedding rows the only trainable
    part of it (call before building the Trainer); returns the words that were new (none: nothing changes)."""
    new = encoder.extend_vocabulary(words)
    if not new:
        return new
    model = encoder.model
    table = model.get_input_embeddings()
    encoder.set_trainable(True)  # so the Trainer optimizes the encoder and keeps its EMA
    model.requires_grad_(False)
    model.set_input_embeddings(NewRowsEmbedding(table, table.weight.shape[0] - len(new)))
    return new


def fold_new_words(model: nn.Module) -> nn.Module:
    """Replace a :class:`NewRowsEmbedding` of a T5 ``model`` (the encoder's, or the Trainer's EMA copy of it) by
    an ordinary ``nn.Embedding`` with the same rows, so it saves and loads as any T5 does. Returns ``model``."""
    table = model.get_input_embeddings()
    if isinstance(table, NewRowsEmbedding):
        weight = table.weight.detach()
        plain = nn.Embedding(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(weight)
        model.set_input_embeddings(plain.requires_grad_(False))
    return model
