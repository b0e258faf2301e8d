"""T5TextEncoder: a tiny random T5 saved with save_pretrained and loaded back through from_pretrained,
exactly the path a user's real T5 folder takes (nothing is downloaded)."""

import subprocess
import sys

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
