"""The text refiner (imagen_lib/nn/text_refiner.py, network option ``text_layers``): learned self-attention
over the projected text tokens inside the net. Untrained it changes nothing; trained, a word's token sees the
other words (what a frozen encoder's colour word lacks to know where its object goes); the default builds
nothing."""

from __future__ import annotations

import pytest
import torch

from imagen_lib.nn.conditioning import TextConditioner
from imagen_lib.nn.config import EfficientUnetConfig
from imagen_lib.nn.networks import network_for
from imagen_lib.nn.text_refiner import TextRefiner


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Draw every weight of ``module`` at random (as after training), the zero-initialised ones included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def test_an_untrained_refiner_is_the_identity():
    tokens, mask = torch.randn(3, 7, 32), torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    assert torch.equal(TextRefiner(32, layers=2)(tokens, mask), tokens)


def test_with_it_a_words_token_depends_on_the_other_words_and_without_it_not():
    # token 1 stands for "red"; tokens 2.. for the rest of the caption, here its relation word changes
    a, b = torch.randn(1, 6, 64), torch.randn(1, 6, 64)
    b[:, :2] = a[:, :2]
    mask = torch.ones(1, 6, dtype=torch.bool)
    for layers, changes in ((0, False), (1, True)):
        torch.manual_seed(0)
        text = TextConditioner(64, 32, use_null_token=True, pooling="attention", positions=8, layers=layers)
        _randomise(text)
        ta, tb = text(a, mask)[1].tokens, text(b, mask)[1].tokens
        assert (not torch.allclose(ta[:, 1], tb[:, 1], atol=1e-5)) is changes


def test_padding_and_dropped_captions_stay_finite_and_do_not_leak():
    text = TextConditioner(16, 32, use_null_token=False, pooling="mean", positions=4, layers=1)
    _randomise(text)
    embeds, mask = torch.randn(2, 4, 16), torch.tensor([[True, True, False, False], [False] * 4])
    embeds2 = embeds.clone()
    embeds2[0, 2:] = 100.0  # what sits at padded positions never matters
    (pooled, ctx), (pooled2, ctx2) = text(embeds, mask), text(embeds2, mask)
    assert torch.isfinite(pooled).all() and torch.isfinite(ctx.tokens).all()
    assert torch.equal(ctx.tokens[1], torch.zeros_like(ctx.tokens[1]))  # a dropped caption: no tokens
    assert torch.allclose(ctx.tokens, ctx2.tokens) and torch.allclose(pooled, pooled2)


def test_the_network_option_builds_it_only_when_asked_and_checks_it():
    base = dict(embed_dim=16, image_size=16, channel_mult=(1, 2), num_res_blocks=1, attention_type="fused",
                attention_levels=(False, True), num_attn_heads=2, cond_dim=32, text_embed_dim=8, lowres_cond=False)
    plain, refined = network_for(EfficientUnetConfig(**base)), network_for(
        EfficientUnetConfig(**base, text_layers=2))
    assert plain.cond.text.refiner is None and not any("refiner" in k for k in plain.state_dict())
    assert len(refined.cond.text.refiner.blocks) == 2
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    out = refined(x, t, text_embeds=torch.randn(2, 5, 8), text_mask=torch.ones(2, 5, dtype=torch.bool))
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="text_layers"):
        EfficientUnetConfig(**base, text_layers=-1)
    with pytest.raises(ValueError, match="text_layers"):
        TextRefiner(30, layers=1, heads=4)
