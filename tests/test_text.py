"""T5TextEncoder: a tiny random T5 saved with save_pretrained and loaded back through from_pretrained,
exactly the path a user's real T5 folder takes (nothing is downloaded)."""

import subprocess
import sys
import warnings

import pytest
import torch
from tiny_cascade import T5_KWARGS, tiny_encoder_folder

from imagen_lib.text import T5TextEncoder, text_encoder_from_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_encoder_folder(tmp_path_factory.mktemp("t5"))


def test_encode_pads_to_max_length_and_zeroes_padding(folder):
    enc = T5TextEncoder(folder, max_length=12)
    embeds, mask = enc.encode(["a red circle", "hi"])
    assert embeds.shape == (2, 12, enc.embed_dim) and enc.embed_dim == T5_KWARGS["d_model"]
    assert mask.dtype == torch.bool and mask.shape == (2, 12)
    assert mask.sum(1).tolist() == [12, 3]  # ByT5: one token per byte + </s>; the first is truncated
    assert torch.all(embeds[1, 3:] == 0) and embeds[1, :3].abs().sum() > 0


def test_embedding_does_not_depend_on_the_batch(folder):
    enc = T5TextEncoder(folder, max_length=16)
    alone, _ = enc.encode(["a blue square"])
    together, _ = enc.encode(["something much longer than that", "a blue square"])
    torch.testing.assert_close(alone[0], together[1], atol=1e-6, rtol=1e-5)


def test_frozen_by_default_and_stays_in_eval_mode(folder):
    enc = T5TextEncoder(folder, max_length=8)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training
    embeds, _ = enc.encode(["x"])
    assert not embeds.requires_grad


def test_trainable_encoder_passes_gradients(folder):
    enc = T5TextEncoder(folder, max_length=8, trainable=True)
    embeds, _ = enc.encode(["x"])
    embeds.sum().backward()
    assert enc.model.shared.weight.grad is not None and enc.model.shared.weight.grad.abs().sum() > 0


def test_encode_with_another_copy_of_the_model(folder):
    """``encode(texts, model=copy)``: the same tokens through another copy of the T5 (a trainer's EMA copy), in
    eval mode and without gradients, its mode put back afterwards."""
    import copy

    enc = T5TextEncoder(folder, max_length=12, trainable=True)
    twin = copy.deepcopy(enc.model).train()
    same, mask = enc.encode(["a red circle", "hi"], model=twin)
    assert twin.training and not same.requires_grad
    enc.eval()  # eval mode: no dropout, comparable to the copy's
    with torch.no_grad():
        torch.testing.assert_close(same, enc.encode(["a red circle", "hi"])[0], atol=0, rtol=0)
    assert torch.all(same[1, 3:] == 0) and mask.sum(1).tolist() == [12, 3]
    with torch.no_grad():
        twin.shared.weight.add_(1.0)
    assert not torch.equal(enc.encode(["hi"], model=twin)[0], enc.encode(["hi"])[0])


def test_build_tiny_is_deterministic_and_rebuilds_from_its_config():
    a = T5TextEncoder.build_tiny(seed=3, max_length=8, **T5_KWARGS)
    b = text_encoder_from_config(a.config)
    assert a.config == b.config and a.config["source"]["seed"] == 3
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name
    c = T5TextEncoder.build_tiny(seed=4, max_length=8, **T5_KWARGS)
    assert not torch.equal(a.model.shared.weight, c.model.shared.weight)


def test_save_pretrained_round_trip(folder, tmp_path):
    enc = T5TextEncoder(folder, max_length=8)
    enc.save_pretrained(tmp_path)
    again = T5TextEncoder(tmp_path, max_length=8)
    assert torch.equal(enc.encode(["abc"])[0], again.encode(["abc"])[0])


def test_bad_input_names_the_argument(folder):
    enc = T5TextEncoder(folder, max_length=8)
    with pytest.raises(TypeError, match="texts"):
        enc.encode("a single string")
    with pytest.raises(ValueError, match="texts"):
        enc.encode([])
    with pytest.raises(ValueError, match="max_length"):
        T5TextEncoder(folder, max_length=0)
    with pytest.raises(ValueError, match="source"):
        text_encoder_from_config({"source": {}, "max_length": 8})


def test_module_import_does_not_import_transformers():
    code = "import sys, imagen_lib.text; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------------
# word-level vocabulary (the shapes quickstart's encoder)


def test_word_vocabulary_gives_one_token_per_word_and_round_trips(tmp_path):
    words = ["a", "red", "blue", "circle", ","]
    enc = T5TextEncoder.build_tiny(tmp_path / "words", seed=1, max_length=8, vocabulary=words, **T5_KWARGS)
    with pytest.warns(UserWarning, match="zebra"):
        ids, mask = enc.tokenize(["A red circle, a zebra"])
    tokens = enc.tokenizer.convert_ids_to_tokens(ids[0][mask[0]].tolist())
    assert tokens == ["a", "red", "circle", ",", "a", "<unk>", "</s>"]  # lower-cased; unknown words are <unk>
    assert enc.model.config.vocab_size == len(words) + 3 and ids[0, ~mask[0]].eq(enc.tokenizer.pad_token_id).all()
    # the same encoder again: from its config (checkpoints), and from the folder it was saved to
    for again in (text_encoder_from_config(enc.config), T5TextEncoder(tmp_path / "words", max_length=8)):
        assert torch.equal(again.encode(["a blue circle"])[0], enc.encode(["a blue circle"])[0])
    assert enc.config["source"]["vocabulary"] == words
    # different words differ, as they must for a U-Net to read them
    e, m = enc.encode(["a red circle", "a blue circle"])
    assert not torch.allclose(e[0, 1], e[1, 1])


def test_shapes_vocabulary_covers_every_caption_word():
    from imagen_lib.data.shapes import sample_captions, vocabulary

    enc = T5TextEncoder.build_tiny(seed=0, max_length=24, vocabulary=vocabulary(), **T5_KWARGS)
    captions, _ = sample_captions(2000, seed=5)
    ids, mask = enc.tokenize(captions)
    assert not ids[mask].eq(enc.tokenizer.unk_token_id).any()
    assert mask.sum(1).max() < 24  # nothing truncated at the quickstart's max_length


def test_bad_vocabulary_names_the_argument():
    from imagen_lib.config import build_text_encoder

    with pytest.raises(ValueError, match="vocabulary"):
        T5TextEncoder.build_tiny(vocabulary="red blue", **T5_KWARGS)
    with pytest.raises(ValueError, match="text_encoder.vocabulary"):
        build_text_encoder({"build_tiny": dict(T5_KWARGS), "vocabulary": "birds"})
    enc = build_text_encoder({"build_tiny": dict(T5_KWARGS), "vocabulary": "shapes", "max_length": 24})
    assert "triangle" in enc.config["source"]["vocabulary"]


# ---------------------------------------------------------------------------------------------------------
# words outside a word-level vocabulary: warned about once, and added by extend_vocabulary


def _word_encoder(**kwargs) -> T5TextEncoder:
    return T5TextEncoder.build_tiny(seed=2, max_length=10, vocabulary=["a", "red", "blue", "circle", "square"],
                                    **T5_KWARGS, **kwargs)


def test_unknown_words_are_warned_about_once_with_the_words():
    enc = _word_encoder()
    with pytest.warns(UserWarning, match=r"does not know \['pink', 'blob'\]"):
        enc.encode(["a Pink circle", "a blue blob", "a pink square"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same words again, and known words: no second warning
        enc.encode(["a pink blob"])
        enc.tokenize(["a red square"])
    with pytest.warns(UserWarning, match=r"does not know \['zebra'\]") as record:  # a new word: a new warning
        enc.encode(["a pink zebra"])
    assert len(record) == 1
    assert enc.unknown_words(["a red circle"]) == [] and enc.unknown_words(["two Zebras", "a zebras"]) == [
        "two", "zebras"]


def test_extending_the_vocabulary_keeps_every_known_word_and_adds_rows(tmp_path):
    from tiny_cascade import tiny_cascade

    from imagen_lib import Cascade

    enc = _word_encoder()
    ids_before = dict(enc.word_vocabulary)
    table_before = enc.model.get_input_embeddings().weight.detach().clone()
    known = enc.encode(["a red circle", "a blue square"])[0]
    assert enc.extend_vocabulary(["Pink", "red", "pink", "cyan"]) == ["pink", "cyan"]
    vocab, table = enc.word_vocabulary, enc.model.get_input_embeddings().weight.detach()
    assert {w: vocab[w] for w in ids_before} == ids_before  # every existing id kept
    assert vocab["pink"] == len(ids_before) and vocab["cyan"] == len(ids_before) + 1
    assert torch.equal(table[: len(table_before)], table_before)  # bit-identical rows
    torch.testing.assert_close(table[vocab["pink"]], table_before.mean(0))  # the new rows start at the mean
    assert torch.equal(enc.encode(["a red circle", "a blue square"])[0], known)
    ids, mask = enc.tokenize(["a pink circle"])
    assert ids[0, 1].item() == vocab["pink"] and enc.unknown_words(["a pink cyan circle"]) == []
    assert enc.config["source"]["added_words"] == ["pink", "cyan"]
    with torch.no_grad():  # as if trained: the checkpoint must keep the row itself
        enc.model.get_input_embeddings().weight[vocab["pink"]] += 1.0
    cascade = tiny_cascade(text_encoder=enc)
    cascade.save(tmp_path / "ckpt")
    again = Cascade.from_checkpoint(tmp_path / "ckpt").text_encoder
    assert again.word_vocabulary == vocab
    assert torch.equal(again.encode(["a pink cyan circle"])[0], enc.encode(["a pink cyan circle"])[0])
    rebuilt = text_encoder_from_config(enc.config)  # from the source alone: the same vocabulary and table size
    assert rebuilt.word_vocabulary == vocab and rebuilt.model.config.vocab_size == table.shape[0]


def test_extending_checks_its_words():
    enc = _word_encoder()
    with pytest.raises(ValueError, match="words: 'two words' is not one word"):
        enc.extend_vocabulary(["two words"])
    with pytest.raises(ValueError, match="words: expected a list"):
        enc.extend_vocabulary("pink")
    byte_level = T5TextEncoder.build_tiny(seed=0, max_length=8, **T5_KWARGS)
    with pytest.raises(ValueError, match="words: only a word-level tokenizer"):
        byte_level.extend_vocabulary(["pink"])
    assert enc.extend_vocabulary(["red"]) == [] and "added_words" not in enc.config["source"]


def test_learning_new_words_trains_only_their_rows():
    from imagen_lib.training.vocabulary import fold_new_words, learn_new_words

    enc = _word_encoder()
    old = enc.model.get_input_embeddings().weight.detach().clone()
    rest = {k: v.clone() for k, v in enc.model.state_dict().items() if "shared" not in k and "embed_tokens" not in k}
    assert learn_new_words(enc, ["pink"]) == ["pink"] and enc.trainable
    trained = [p for p in enc.model.parameters() if p.requires_grad]
    assert len(trained) == 1 and trained[0].shape == (1, T5_KWARGS["d_model"])
    optimizer = torch.optim.AdamW(enc.model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        embeds, _ = enc.encode(["a pink circle", "a red square"])
        embeds.square().mean().backward()
        optimizer.step()
    fold_new_words(enc.model)
    table = enc.model.get_input_embeddings()
    assert type(table) is torch.nn.Embedding and table.weight.shape[0] == old.shape[0] + 1
    assert torch.equal(table.weight[: len(old)], old) and not torch.equal(table.weight[-1], old.mean(0))
    assert all(torch.equal(v, rest[k]) for k, v in enc.model.state_dict().items() if k in rest)
