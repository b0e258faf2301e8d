"""LoRA fine-tuning through peft (imagen_lib.training.lora): zero-initialised adapters reproduce the base samples,
a LoRA fine-tune leaves every base weight bit-identical and changes the samples, adapters saved as safetensors +
JSON load onto a fresh base and reproduce the fine-tuned samples, and bad arguments name themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_cascade import T5_KWARGS, TEXT_DIM, images, tiny_cascade, tiny_config

from imagen_lib import Cascade, Trainer
from imagen_lib.checkpoint import resolve
from imagen_lib.checkpoint.files import looks_pickled
from imagen_lib.text import T5TextEncoder
from imagen_lib.training.lora import (
    add_lora,
    has_lora,
    load_lora,
    lora_targets,
    lora_weights,
    merge_lora,
    save_lora,
)

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def encoder():
    return T5TextEncoder.build_tiny(seed=0, max_length=16, **T5_KWARGS)


def _base(encoder) -> Cascade:
    """A tiny cascade whose weights are all non-zero (the nets zero-initialise their output projections)."""
    cascade = tiny_cascade(text_encoder=encoder)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for stage in cascade.stages:
            for p in stage.net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return cascade.eval()


def _sample(cascade: Cascade) -> torch.Tensor:
    return cascade.sample(PROMPTS, seed=0, disable_progress=True)


def _base_weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base network's weights under their plain names (an adapted layer keeps its own in ``base_layer``)."""
    return {k.replace(".base_layer.", "."): v for k, v in net.state_dict().items() if ".lora_" not in k}


def _fine_tune(cascade: Cascade, steps: int = 3) -> Trainer:
    trainer = Trainer(cascade, lr=3e-2, cpu=True, ema_update_after_step=0, ema_update_every=1, warmup_steps=0)
    for step in range(steps):
        trainer.train_step(0, {"images": images(4, 8, seed=step), "texts": ["a pink circle"] * 4})
    cascade.eval()
    return trainer


def test_zero_initialised_adapters_reproduce_the_base_samples(encoder):
    cascade = _base(encoder)
    reference = _sample(cascade)
    trained = add_lora(cascade, 0, rank=4)
    add_lora(cascade, 1, rank=2, alpha=4.0, target_modules=["to_q", "to_kv", "cond_proj"])
    assert trained > 0 and has_lora(cascade.stages[0].net) and has_lora(cascade.stages[1].net)
    assert torch.equal(_sample(cascade), reference)  # peft's B = 0: exactly the base computation
    # ... and the comparison can fail: a non-zero B changes the samples
    with torch.no_grad():
        for name, p in cascade.stages[0].net.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
    assert not torch.equal(_sample(cascade), reference)


def test_default_targets_are_the_attention_and_feed_forward_projections(encoder):
    from imagen_lib.nn.attention import AttentionBlock

    net = _base(encoder).stages[0].net
    names = lora_targets(net)
    assert names and all(n.rsplit(".", 1)[-1] in {"to_q", "to_kv", "to_kv_text", "proj_out"} for n in names)
    block = AttentionBlock("stacked", 16, 2, context_dim=8)  # self + cross attention + feed-forward
    stacked = lora_targets(block)
    assert {"layers.2.net.0", "layers.2.net.2", "layers.1.to_kv_text", "layers.0.to_kv"} <= set(stacked)
    assert lora_targets(block, ["feed_forward"]) == ["layers.2.net.0", "layers.2.net.2"]


def test_lora_fine_tune_keeps_every_base_weight_and_changes_the_samples(encoder):
    cascade = _base(encoder)
    reference = _sample(cascade)
    before = {k: v.clone() for k, v in cascade.stages[0].net.state_dict().items()}
    add_lora(cascade, 0, rank=4)
    trainer = _fine_tune(cascade)
    for net in (cascade.stages[0].net, trainer.stages[0].ema.ema_model):
        after = _base_weights(net)
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before)  # bit-identical
        assert any(v.abs().sum() > 0 for k, v in lora_weights(net).items() if "lora_B" in k)  # adapters trained
    assert not torch.allclose(_sample(cascade), reference, atol=1e-3)


def test_saved_adapters_load_onto_a_fresh_base_and_reproduce_the_samples(encoder, tmp_path):
    cascade = _base(encoder)
    cascade.save(tmp_path / "base")
    add_lora(cascade, 0, rank=4, dropout=0.1)
    trainer = _fine_tune(cascade)
    tuned = _sample(cascade)
    tuned_ema = trainer.sample(PROMPTS, seed=0, disable_progress=True)
    save_lora(trainer, tmp_path / "lora", base=tmp_path / "base")

    fresh = load_lora(Cascade.from_checkpoint(tmp_path / "base"), tmp_path / "lora", use_ema=False)
    assert torch.equal(_sample(fresh), tuned)
    fresh_ema = load_lora(Cascade.from_checkpoint(tmp_path / "base"), tmp_path / "lora")  # EMA by default
    fresh_ema.requires_grad_(False)  # as the Trainer's EMA copies are (a weight that needs grad may round otherwise)
    assert torch.equal(_sample(fresh_ema), tuned_ema)

    merge_lora(fresh)  # folded into the weights: a plain network again, same samples to float rounding
    assert not has_lora(fresh.stages[0].net)
    assert fresh.stages[0].net.state_dict().keys() == Cascade.from_checkpoint(tmp_path / "base").stages[0].net \
        .state_dict().keys()
    torch.testing.assert_close(_sample(fresh), tuned, atol=1e-4, rtol=1e-4)
    fresh.save(tmp_path / "merged")
    torch.testing.assert_close(_sample(Cascade.from_checkpoint(tmp_path / "merged")), tuned, atol=1e-4, rtol=1e-4)


def test_saved_adapter_files_hold_no_pickle(encoder, tmp_path):
    from safetensors import safe_open

    cascade = _base(encoder)
    add_lora(cascade, 0)
    save_lora(cascade, tmp_path / "lora", base="somewhere")
    folder = Path(resolve(tmp_path / "lora"))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert {p.name for p in files} == {"config.json", "stage0.safetensors"}
    for path in files:
        head = path.read_bytes()[:64]
        assert not looks_pickled(head) and not head.startswith(b"PK")  # neither pickle nor torch's zip format
    config = json.loads((folder / "config.json").read_text())
    assert config["stages"]["0"]["rank"] == 4 and config["base"] == "somewhere"
    with safe_open(folder / "stage0.safetensors", "pt") as f:
        assert set(f.keys()) == set(lora_weights(cascade.stages[0].net))


def test_a_cascade_checkpoint_never_takes_adapter_weights(encoder, tmp_path):
    cascade = _base(encoder)
    add_lora(cascade, 0)
    with pytest.raises(ValueError, match="LoRA adapters.*save_lora.*merge_lora"):
        cascade.save(tmp_path / "ckpt")
    trainer = Trainer(cascade, lr=1e-3, cpu=True)
    with pytest.raises(ValueError, match="LoRA adapters"):
        trainer.save(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"target_modules": ["to_nothing"]}, "target_modules: 'to_nothing'"),
    ({"target_modules": "to_q"}, "target_modules"),
    ({"target_modules": []}, "target_modules"), ({"stage": 2}, "stage"),
])
def test_bad_arguments_name_themselves(encoder, kwargs, match):
    cascade = _base(encoder)
    with pytest.raises((TypeError, ValueError), match=match):
        add_lora(cascade, **kwargs)
    assert not has_lora(cascade.stages[0].net)


def test_loading_checks_what_it_loads(encoder, tmp_path):
    cascade = _base(encoder)
    cascade.save(tmp_path / "base")
    with pytest.raises(ValueError, match="not a LoRA adapter checkpoint"):
        load_lora(cascade, tmp_path / "base")
    with pytest.raises(ValueError, match="no stage carries LoRA adapters"):
        save_lora(cascade, tmp_path / "lora")
    add_lora(cascade, 1)
    save_lora(cascade, tmp_path / "lora")
    with pytest.raises(ValueError, match="already carries LoRA"):
        load_lora(cascade, tmp_path / "lora")
    from imagen_lib.config import build_cascade

    config = tiny_config(text=False)
    config["text_embed_dim"], config["stages"][1]["network"]["config"]["embed_dim"] = TEXT_DIM, 32
    other = build_cascade(config)  # stage 1 is wider than the base the adapters were trained on
    with pytest.raises(ValueError, match="network differs"):
        load_lora(other, tmp_path / "lora")
