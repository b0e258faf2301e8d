"""CLIPTextEncoder: a tiny random CLIP text model with a written CLIP tokenizer, saved with save_pretrained and
loaded back through from_pretrained (nothing is downloaded); its layers against transformers' own outputs, and
the one text-encoder table that configs, checkpoints, the trainer, ``imagen-lib sample`` and ``precache`` use."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_cascade import T5_KWARGS, images, tiny_cascade, tiny_config

from imagen_lib.cli import main
from imagen_lib.text import (
    TEXT_ENCODERS,
    T5TextEncoder,
    infer_text_encoder_kind,
    load_text_encoder,
    register_text_encoder,
    text_encoder_class,
    text_encoder_from_config,
)
from imagen_lib.text_clip import CLIPTextEncoder, clip_tokenizer

CLIP_KWARGS = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
               "projection_dim": 32}
WORDS = ["a", "red", "blue", "circle", "square", "triangle", "big", "small", ","]
TEXTS = ["a red circle", "a big blue square, a small triangle and some words it never saw: 3 dogs!"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    CLIPTextEncoder.build_tiny(folder, seed=0, vocabulary=WORDS, **CLIP_KWARGS)
    return folder


def _transformers_outputs(folder, texts):
    """transformers' own CLIPTextModel and tokenizer from the folder: (last_hidden_state, final_layer_norm of
    hidden_states[-2]), called as Stable Diffusion calls it (77 tokens, no attention mask)."""
    from transformers import AutoTokenizer, CLIPTextModel

    tokenizer, model = AutoTokenizer.from_pretrained(folder), CLIPTextModel.from_pretrained(folder).eval()
    ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        norm = getattr(model, "text_model", model).final_layer_norm
        return out.last_hidden_state, norm(out.hidden_states[-2])


def test_layers_equal_transformers_outputs(clip_dir):
    last, penultimate = _transformers_outputs(clip_dir, TEXTS)
    for layer, want in (("penultimate", penultimate), ("last", last)):
        embeds, mask = CLIPTextEncoder(clip_dir, layer=layer).encode(TEXTS)
        assert embeds.shape == (2, 77, 32) and mask.shape == (2, 77) and mask.all()  # SD: every position counts
        torch.testing.assert_close(embeds, want, rtol=0, atol=1e-6)
    assert not torch.allclose(last, penultimate, atol=1e-3)


def test_tokenizer_is_clip_s_with_one_token_per_vocabulary_word(clip_dir):
    enc = CLIPTextEncoder(clip_dir)
    ids, real = enc.tokenize(TEXTS)
    tokens = enc.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    assert type(enc.tokenizer).__name__ == "CLIPTokenizer" and enc.max_length == 77
    assert tokens[:5] == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    assert tokens[5:] == ["<|endoftext|>"] * 72 and real[0].sum() == 5  # padded with the end token
    assert real[1].sum() > 20  # unknown words still tokenize, character by character
    for word in WORDS:
        assert len(enc.tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    from imagen_lib.data.shapes import vocabulary

    shapes = clip_tokenizer(vocabulary())
    assert all(len(shapes(w, add_special_tokens=False).input_ids) == 1 for w in vocabulary())
    with pytest.raises(ValueError, match="^vocabulary"):
        clip_tokenizer("red circle")


def test_mask_padding_masks_and_zeroes_padded_tokens(clip_dir):
    enc, masked = CLIPTextEncoder(clip_dir, max_length=16), CLIPTextEncoder(clip_dir, max_length=16,
                                                                            mask_padding=True)
    full, all_true = enc.encode(TEXTS)
    embeds, mask = masked.encode(TEXTS)
    assert all_true.all() and mask.sum(1).tolist() == [5, 16]
    assert torch.equal(embeds[0, :5], full[0, :5]) and torch.all(embeds[0, 5:] == 0)
    alone, _ = masked.encode(["a red circle"])
    torch.testing.assert_close(alone[0], embeds[0], atol=1e-6, rtol=1e-5)  # independent of its batch


def test_frozen_by_default_trainable_passes_gradients(clip_dir):
    enc = CLIPTextEncoder(clip_dir)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training and not enc.encode(["x"])[0].requires_grad
    enc = CLIPTextEncoder(clip_dir, trainable=True)
    enc.encode(["a red circle"])[0].sum().backward()
    grads = {name: p.grad for name, p in enc.model.named_parameters()}
    assert grads["embeddings.token_embedding.weight"].abs().sum() > 0
    # the penultimate layer's output never passes the last layer: that layer stays frozen
    last = f"encoder.layers.{CLIP_KWARGS['num_hidden_layers'] - 1}."
    assert all(not p.requires_grad for n, p in enc.model.named_parameters() if n.startswith(last))
    assert all(p.requires_grad for n, p in enc.model.named_parameters() if not n.startswith(last))


def test_encode_with_another_copy_of_the_model(clip_dir):
    enc = CLIPTextEncoder(clip_dir, trainable=True)
    twin = copy.deepcopy(enc.model).train()
    same, _ = enc.encode(TEXTS, model=twin)
    assert twin.training and not same.requires_grad
    enc.eval()
    with torch.no_grad():
        assert torch.equal(same, enc.encode(TEXTS)[0])
        twin.embeddings.token_embedding.weight.add_(1.0)
    assert not torch.equal(enc.encode(TEXTS, model=twin)[0], same)


def test_build_tiny_rebuilds_from_its_config_and_save_pretrained_round_trips(tmp_path):
    a = CLIPTextEncoder.build_tiny(seed=3, max_length=20, layer="last", vocabulary=WORDS, **CLIP_KWARGS)
    assert a.config == {"kind": "clip", "source": {"build_tiny": CLIP_KWARGS, "seed": 3, "vocabulary": WORDS},
                        "max_length": 20, "layer": "last", "mask_padding": False, "trainable": False}
    b = text_encoder_from_config(json.loads(json.dumps(a.config)))
    assert isinstance(b, CLIPTextEncoder) and b.config == a.config
    assert torch.equal(a.encode(TEXTS)[0], b.encode(TEXTS)[0])
    c = CLIPTextEncoder.build_tiny(seed=4, **CLIP_KWARGS)
    assert not torch.equal(a.model.embeddings.token_embedding.weight, c.model.embeddings.token_embedding.weight)
    a.save_pretrained(tmp_path / "saved")
    d = text_encoder_from_config(a.config, folder=tmp_path / "saved")
    assert d.config == a.config and torch.equal(d.encode(TEXTS)[0], a.encode(TEXTS)[0])


def test_one_table_of_kinds_infers_and_names_its_errors(clip_dir, tmp_path):
    t5_dir = tmp_path / "t5"
    T5TextEncoder.build_tiny(t5_dir, **T5_KWARGS)
    assert sorted(TEXT_ENCODERS) == ["clip", "t5"] and text_encoder_class("clip") is CLIPTextEncoder
    assert infer_text_encoder_kind(clip_dir) == "clip" and infer_text_encoder_kind(t5_dir) == "t5"
    assert isinstance(load_text_encoder(clip_dir, max_length=None), CLIPTextEncoder)
    assert isinstance(load_text_encoder(t5_dir), T5TextEncoder)
    assert T5TextEncoder(t5_dir).config["kind"] == "t5"
    # a T5 config written before kinds existed is still a T5
    old = {k: v for k, v in T5TextEncoder.build_tiny(seed=1, **T5_KWARGS).config.items() if k != "kind"}
    assert isinstance(text_encoder_from_config(old), T5TextEncoder)
    # a Stable Diffusion pipeline folder: text_encoder/ + tokenizer/
    pipeline = tmp_path / "sd"
    enc = CLIPTextEncoder(clip_dir)
    enc.model.save_pretrained(pipeline / "text_encoder")
    enc.tokenizer.save_pretrained(pipeline / "tokenizer")
    assert infer_text_encoder_kind(pipeline) == "clip"
    assert torch.equal(load_text_encoder(pipeline).encode(TEXTS)[0], enc.encode(TEXTS)[0])
    for call, pattern in [
        (lambda: load_text_encoder(t5_dir, layer="last"), "^layer: not an option of a 't5' text encoder"),
        (lambda: load_text_encoder(clip_dir, "bert"), "^kind: expected a text encoder kind"),
        (lambda: infer_text_encoder_kind(tmp_path), "^name_or_path: .* holds no config.json"),
        (lambda: CLIPTextEncoder(clip_dir, max_length=78), "^max_length: this CLIP has 77 positions"),
        (lambda: CLIPTextEncoder(clip_dir, layer="middle"), "^layer: expected one of"),
        (lambda: CLIPTextEncoder.build_tiny(num_hidden_layers=1), "^layer: 'penultimate' needs a CLIP of at least 2"),
        (lambda: CLIPTextEncoder.build_tiny(d_model=8), r"^clip_config\.d_model: not a CLIPTextConfig"),
        (lambda: CLIPTextEncoder.build_tiny(hidden_size=0), r"^clip_config\.hidden_size"),
        (lambda: register_text_encoder(CLIPTextEncoder, "t5"), "^kind: 't5' already names"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            call()
    assert register_text_encoder(CLIPTextEncoder) is CLIPTextEncoder  # the same class again: nothing changes


def test_a_config_block_builds_a_clip_encoder_and_checks_its_options():
    from imagen_lib.config import build_cascade
    from imagen_lib.config.convert import ConfigError

    config = tiny_config(text=True)
    config["text_encoder"] = {"kind": "clip", "build_tiny": dict(CLIP_KWARGS), "vocabulary": "shapes", "layer": "last"}
    cascade = build_cascade(config)
    enc = cascade.text_encoder
    assert isinstance(enc, CLIPTextEncoder) and enc.layer == "last" and enc.max_length == 77
    assert cascade.stages[0].net.text_embed_dim == 32 and cascade.config["text_encoder"]["kind"] == "clip"
    for block, pattern in [({"kind": "t5", "build_tiny": {}, "layer": "last"}, r"^text_encoder\.layer: a CLIP option"),
                           ({"kind": "gpt", "build_tiny": {}}, r"^text_encoder\.kind: expected a text encoder kind"),
                           ({"kind": "clip", "build_tiny": {"d_model": 8}}, r"^text_encoder\.build_tiny\.d_model")]:
        config["text_encoder"] = block
        with pytest.raises(ConfigError, match=pattern):
            build_cascade(config)


def test_a_cascade_with_a_trained_clip_encoder_trains_saves_loads_and_samples_bit_identically(tmp_path):
    from imagen_lib.cascade import Cascade
    from imagen_lib.training.trainer import Trainer

    enc = CLIPTextEncoder.build_tiny(seed=0, max_length=16, trainable=True, vocabulary=WORDS, **CLIP_KWARGS)
    trainer = Trainer(tiny_cascade(text_encoder=enc), lr=1e-2, ema_update_after_step=0, ema_update_every=1)
    before = enc.model.embeddings.token_embedding.weight.detach().clone()
    for i in range(4):  # the nets' zero-initialised output layers pass no gradient to the text for 2 steps
        trainer.train_step(0, {"images": images(4, 16, seed=i), "texts": ["a red circle", "a blue square"] * 2})
    assert not torch.equal(before, enc.model.embeddings.token_embedding.weight)
    trainer.save(tmp_path / "ck")
    raw = Cascade.from_checkpoint(tmp_path / "ck", use_ema=False)
    assert isinstance(raw.text_encoder, CLIPTextEncoder) and raw.text_encoder.config == enc.config
    assert torch.equal(raw.text_encoder.model.embeddings.token_embedding.weight,
                       enc.model.embeddings.token_embedding.weight)
    ema = Cascade.from_checkpoint(tmp_path / "ck")
    a = trainer.sample(["a red circle"], seed=2, disable_progress=True)
    assert torch.equal(a, ema.sample(["a red circle"], seed=2, disable_progress=True))


@pytest.mark.parametrize("source", ["build_tiny", "folder"])
def test_a_frozen_clip_cascade_saves_loads_and_samples_bit_identically(clip_dir, tmp_path, source):
    from imagen_lib import checkpoint as ckpt
    from imagen_lib.cascade import Cascade

    enc = (CLIPTextEncoder.build_tiny(vocabulary=WORDS, **CLIP_KWARGS) if source == "build_tiny"
           else CLIPTextEncoder(clip_dir, layer="last"))
    cascade = tiny_cascade(text_encoder=enc)
    cascade(images(4, 16), texts=TEXTS * 2, generator=torch.Generator().manual_seed(0)).backward()
    cascade.save(tmp_path / "ck")
    # a locally built encoder is stored with the checkpoint, a pretrained frozen one is reloaded from its folder
    assert ckpt.has_file(ckpt.resolve(tmp_path / "ck"), "text_encoder") == (source == "build_tiny")
    loaded = Cascade.from_checkpoint(tmp_path / "ck")
    assert isinstance(loaded.text_encoder, CLIPTextEncoder) and loaded.text_encoder.config == enc.config
    a = cascade.eval().sample(TEXTS, seed=1, disable_progress=True)
    assert torch.equal(a, loaded.sample(TEXTS, seed=1, disable_progress=True))


def test_precache_and_sample_commands_with_a_clip_folder(clip_dir, tmp_path):
    from imagen_lib.cascade import Cascade
    from imagen_lib.data.embeddings import EmbeddingStore
    from imagen_lib.images import to_pil

    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(TEXTS) + "\n")
    assert main(["precache", "--encoder", str(clip_dir), "--layer", "last", "--no-progress", "--device", "cpu",
                 str(captions), str(tmp_path / "store")]) == 0
    store = EmbeddingStore(tmp_path / "store")
    assert len(store) == 2 and store.dim == 32 and store.max_length == 77
    online, _ = CLIPTextEncoder(clip_dir, layer="last").encode(TEXTS)
    torch.testing.assert_close(store.get(1)[0], online[1], atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="^--layer: layer: not an option of a 't5'"):
        main(["precache", "--encoder", str(clip_dir), "--encoder-kind", "t5", "--layer", "last", "--no-progress",
              str(captions), str(tmp_path / "other")])
    # a checkpoint trained on precomputed CLIP embeddings samples with --encoder (its kind read from the folder)
    tiny_cascade(text_embed_dim=32).save(tmp_path / "ck")
    want = Cascade.from_checkpoint(tmp_path / "ck").using(text_encoder=CLIPTextEncoder(clip_dir, layer="last"))
    want = want.sample(["a red circle"], seed=0, disable_progress=True)
    out = tmp_path / "out"
    assert main(["sample", str(tmp_path / "ck"), "--prompt", "a red circle", "--out", str(out), "--encoder",
                 str(clip_dir), "--layer", "last", "--device", "cpu"]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "0000.png")), np.asarray(to_pil(want[0])))
    with pytest.raises(ValueError, match="^--layer: given without --encoder"):
        main(["sample", str(tmp_path / "ck"), "--prompt", "a", "--out", str(out), "--layer", "last"])
