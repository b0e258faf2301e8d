"""The slot probe (imagen_lib/data/shapes_pairs_probe.py): reads where each colour word's object goes from an
encoding that says it, and not from one that does not."""

from __future__ import annotations

import pytest
import torch

from imagen_lib.data.shapes import COLORS
from imagen_lib.data.shapes_pairs import pair_vocabulary
from imagen_lib.data.shapes_pairs_probe import linear_probe_accuracy, slot_probe
from imagen_lib.text import T5TextEncoder


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return T5TextEncoder.build_tiny(seed=0, max_length=24, vocabulary=pair_vocabulary(), d_model=16, d_kv=8,
                                    d_ff=32, num_layers=1, num_heads=2)


def _slot_encoding(texts):
    """What a perfect encoder would say: at each colour word, +1 for the first slot (left / top), -1 for the
    second, worked out from the caption's words; noise everywhere (4 features)."""
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(len(texts), 24, 4, generator=g)
    for i, text in enumerate(texts):
        words = text.split()
        first_is_first_slot = any(w in words for w in ("left", "above"))
        colours = [j for j, w in enumerate(words) if w in COLORS]
        for k, j in enumerate(colours):
            embeds[i, j, 0] = 1.0 if (k == 0) == first_is_first_slot else -1.0
    return embeds, torch.ones(len(texts), 24, dtype=torch.bool)


def test_it_reads_the_slot_from_an_encoding_that_holds_it(encoder):
    assert slot_probe(encoder, n=200, encode=_slot_encoding) == 1.0


def test_word_order_alone_does_not_give_the_slot(encoder):
    # the raw word embeddings (no context): the same vector for a colour word wherever it stands: chance
    def words_only(texts):
        ids, mask = encoder.tokenize(texts)
        return encoder.model.get_input_embeddings()(ids), mask

    assert 0.35 <= slot_probe(encoder, n=400, encode=words_only) <= 0.65


def test_the_linear_probe_scores_on_the_rows_it_did_not_train_on():
    x = torch.randn(200, 3)
    labels = (x[:, 0] > 0).long()
    train = torch.arange(200) < 150
    assert linear_probe_accuracy(x, labels, train) >= 0.95
    assert linear_probe_accuracy(x, torch.randint(0, 2, (200,), generator=torch.Generator().manual_seed(1)),
                                 train) <= 0.75


def test_bad_arguments_name_themselves(encoder):
    with pytest.raises(ValueError, match="train_fraction"):
        slot_probe(encoder, n=20, train_fraction=1.0)
    with pytest.raises(ValueError, match="n"):
        slot_probe(encoder, n=2)
