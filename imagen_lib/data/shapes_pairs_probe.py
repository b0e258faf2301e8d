"""Linear probes: does a text encoder's output say where each object of a pair caption goes?

For a caption of :mod:`imagen_lib.data.shapes_pairs` to be drawn right, the network must know, for each colour
word, whether its object goes to the first slot (left / top) or to the second (right / bottom). That depends on
the word's order *and* on the relation ("a red circle left of a blue square" vs "... right of ..."), so a bag of
words cannot say it. :func:`slot_probe` measures how linearly readable it is from the encoder's output: a
logistic regression on the output at each colour word, trained on 80% of the captions and scored on the other
20% (chance 50%). The frozen random word-level T5 of ``examples/shapes2.yaml`` reads 60.5% (session 9), a
jointly trained one far more (docs/experiments/2026-11-30-s10-composition.md).

On a checkpoint's text encoder (its EMA weights when it was trained)::

    from imagen_lib.cascade_checkpoint import read_text_encoder
    from imagen_lib.checkpoint import read_config
    encoder = read_text_encoder("runs/shapes2/checkpoint", read_config("runs/shapes2/checkpoint")["text_encoder"])
    print(slot_probe(encoder))
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from imagen_lib.data.shapes_pairs import RELATIONS, sample_pair_captions
from imagen_lib.validation import check_int, check_number, check_seed

Encode = Callable[[list[str]], tuple[Tensor, Tensor]]


def colour_slot_examples(encoder: Any, texts: list[str], attributes: list[dict], encode: Optional[Encode] = None
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """``(features (2N, D), slot labels (2N,), caption index (2N,))``: the encoder's output at each object's colour
    word and the slot (0: left / top, 1: right / bottom) that object goes to. ``encode``: the encoding to probe
    (default ``encoder.encode``; e.g. ``functools.partial(encoder.encode, model=ema_model)``)."""
    vocabulary = encoder.word_vocabulary
    if vocabulary is None:
        raise ValueError("encoder: the slot probe needs a word-level tokenizer (build_tiny(vocabulary=...))")
    ids, _ = encoder.tokenize(texts)
    with torch.no_grad():
        embeds, _ = (encode or encoder.encode)(texts)
    features, labels, owners = [], [], []
    for i, attrs in enumerate(attributes):
        first_slot = RELATIONS[attrs["relation"]][1]
        for k, obj in enumerate(attrs["objects"]):
            where = (ids[i] == vocabulary[obj["color"]]).nonzero().flatten()
            if len(where) != 1:
                raise ValueError(f"texts[{i}]: expected the colour {obj['color']!r} once in {texts[i]!r}")
            features.append(embeds[i, int(where[0])].float().cpu())
            labels.append(first_slot if k == 0 else 1 - first_slot)
            owners.append(i)
    return torch.stack(features), torch.tensor(labels), torch.tensor(owners)


def linear_probe_accuracy(features: Tensor, labels: Tensor, train: Tensor, *, weight_decay: float = 1e-3,
                          iterations: int = 200) -> float:
    """Accuracy on ``~train`` of a logistic regression fitted (L-BFGS, L2 ``weight_decay`` [1e-3], features
    standardised by the training rows' statistics) on the rows where ``train`` is True; binary labels 0 / 1."""
    mean, std = features[train].mean(0), features[train].std(0).clamp_min(1e-6)
    x = (features - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")
    y = labels.float()

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = x[train] @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[train]) + weight_decay * w.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = (x[~train] @ w + b) > 0
    return float((predicted == labels[~train].bool()).float().mean())


def slot_probe(encoder: Any, *, n: int = 3000, seed: int = 0, train_fraction: float = 0.8,
               encode: Optional[Encode] = None) -> float:
    """Held-out accuracy of a linear probe that reads, from ``encoder``'s output at an object's colour word,
    which slot that object goes to (chance 0.5), over ``n`` [3000] seen-split pair captions drawn with ``seed``
    [0]; the first ``train_fraction`` [0.8] of the captions train the probe, the rest score it (both colour
    words of a caption fall on the same side)."""
    n, seed = check_int("n", n, low=10), check_seed("seed", seed)
    train_fraction = check_number("train_fraction", train_fraction, low=0, high=1, low_open=True, high_open=True)
    texts, attributes = sample_pair_captions(n, seed, split="train")
    features, labels, owners = colour_slot_examples(encoder, texts, attributes, encode)
    return linear_probe_accuracy(features, labels, owners < int(n * train_fraction))

