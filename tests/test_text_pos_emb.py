"""text_pos_emb: a learned embedding of each text token's index in the networks' text conditioning. Without it
the fused attention reads the projected tokens as a set (any order of the same tokens gives the same image),
which is why a frozen encoder whose tokens carry little order cannot bind two objects to their places."""

import pytest
import torch

from imagen_lib.nn import presets


def _net(**overrides):
    torch.manual_seed(0)
    return presets.build("tiny-e16", embed_dim=8, cond_dim=32, text_embed_dim=16, **overrides).eval()


def _outputs(net, tokens):
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, tokens.shape[1], dtype=torch.bool)
    with torch.no_grad():
        forward = net(x, torch.tensor([0.5]), text_embeds=tokens, text_mask=mask)
        backward = net(x, torch.tensor([0.5]), text_embeds=tokens.flip(1), text_mask=mask)
    return forward, backward


def _trained_like(net):
    for module in net.modules():  # the zero-initialised output conv would hide every difference
        if isinstance(module, torch.nn.Conv2d) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=0.1)
    return net


def test_without_it_the_token_order_is_invisible_and_with_it_it_is_seen():
    tokens = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(2))
    forward, backward = _outputs(_trained_like(_net()), tokens)
    assert torch.allclose(forward, backward, atol=1e-5)
    net = _trained_like(_net(text_pos_emb=8))
    assert torch.allclose(*_outputs(net, tokens), atol=1e-5)  # zero at first: the same net as without it
    with torch.no_grad():
        net.cond.text.position.normal_()
    forward, backward = _outputs(net, tokens)
    assert not torch.allclose(forward, backward, atol=1e-3)


def test_the_default_adds_no_parameter_and_draws_no_random_numbers():
    plain, with_positions = _net(), _net(text_pos_emb=8)
    extra = set(with_positions.state_dict()) - set(plain.state_dict())
    assert extra == {"cond.text.position"}
    assert all(torch.equal(v, with_positions.state_dict()[k]) for k, v in plain.state_dict().items())


def test_longer_captions_than_it_embeds_are_an_error_naming_it():
    net = _net(text_pos_emb=4)
    with pytest.raises(ValueError, match="text_pos_emb"):
        net(torch.zeros(1, 3, 16, 16), torch.tensor([0.5]), text_embeds=torch.zeros(1, 5, 16),
            text_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="text_pos_emb"):
        presets.build("tiny-e16", text_pos_emb=-1)


def test_a_sinusoidal_start_matches_the_formula_in_float64_and_sees_the_order_untrained():
    from imagen_lib.nn.conditioning import sinusoidal_positions
    table = sinusoidal_positions(5, 8, scale=0.5, max_period=100.0)
    for i in range(5):
        for k in range(4):
            w = 100.0 ** (-k / 4)
            assert table[i, k].item() == pytest.approx(0.5 * torch.tensor(i * w, dtype=torch.float64).sin().item())
            assert table[i, 4 + k].item() == pytest.approx(0.5 * torch.tensor(i * w, dtype=torch.float64).cos().item())
    net = _trained_like(_net(text_pos_emb=8, text_pos_emb_init="sinusoidal"))
    assert torch.equal(net.cond.text.position[0], sinusoidal_positions(8, 32))
    assert net.cond.text.position.requires_grad  # a start, still learned
    forward, backward = _outputs(net, torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(2)))
    assert not torch.allclose(forward, backward, atol=1e-3)
    # the other weights are drawn as with the zero start: only the table's values differ
    zeros = _net(text_pos_emb=8).state_dict()
    sinus = _net(text_pos_emb=8, text_pos_emb_init="sinusoidal").state_dict()
    assert all(torch.equal(v, sinus[k]) for k, v in zeros.items() if k != "cond.text.position")


def test_unknown_starts_and_odd_widths_are_errors_naming_the_argument():
    with pytest.raises(ValueError, match="text_pos_emb_init"):
        presets.build("tiny-e16", text_pos_emb=8, text_pos_emb_init="random")
    from imagen_lib.nn.conditioning import sinusoidal_positions
    with pytest.raises(ValueError, match="even width"):
        sinusoidal_positions(4, 7)


def test_without_the_pooled_text_the_caption_reaches_the_image_only_through_attention():
    net = _trained_like(_net(text_pooled=False))
    for module in net.modules():  # attention's zero-initialised output projections too
        if isinstance(module, torch.nn.Linear) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=0.1)
    assert net.cond.text.to_cond is None and net.cond.text.pool_score is None  # no unused weights (DDP)
    x, mask = torch.randn(2, 3, 16, 16), torch.ones(2, 3, dtype=torch.bool)
    tokens = torch.randn(2, 3, 16)
    _, cond, context = net.cond(x, torch.tensor([0.5, 0.5]), text_embeds=tokens, text_mask=mask)
    _, cond_no_text, _ = net.cond(x, torch.tensor([0.5, 0.5]))
    assert torch.equal(cond, cond_no_text)  # the conditioning vector is the noise level's alone
    assert context is not None
    with torch.no_grad():  # and the caption still changes the output, through attention
        a = net(x, torch.tensor([0.5, 0.5]), text_embeds=tokens, text_mask=mask)
        b = net(x, torch.tensor([0.5, 0.5]), text_embeds=-tokens, text_mask=mask)
    assert not torch.allclose(a, b, atol=1e-4)
    pooled = _net().cond
    assert not torch.equal(pooled(x, torch.tensor([0.5, 0.5]), text_embeds=tokens, text_mask=mask)[1],
                           pooled(x, torch.tensor([0.5, 0.5]))[1])
