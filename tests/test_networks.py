"""Unet / EfficientUnet: shapes, masks, gradients, the attention maths, checkpointing, channels-last, configs."""

import dataclasses
import json
import math
import re

import pytest
import torch

from imagen_lib.nn.attention import ImageAttention, make_text_context, position_features
from imagen_lib.nn.config import EfficientUnetConfig, NetworkConfig, UnetConfig
from imagen_lib.nn.efficient_unet import EfficientUnet
from imagen_lib.nn.layers import NoiseEmbedding
from imagen_lib.nn.networks import NETWORK_OF_CONFIG, NETWORKS, network_for, network_from_config, network_kind
from imagen_lib.nn.unet import Unet

ATTENTION = ["self", "cross", "stacked", "fused"]
TEXT_DIM = 12


def small_net(cls, attention_type="fused", text=True, lowres=False, **overrides):
    """A net of a few thousand parameters: 2 levels (8 and 4 px), attention at 4 px and in the middle."""
    kwargs = dict(embed_dim=16, channel_mult=(1, 2), num_res_blocks=1, attention_type=attention_type,
                  text_embed_dim=TEXT_DIM if text else None, lowres_cond=lowres, per_head_channels=8, cond_dim=32)
    kwargs.update(image_size=8, attention_resolutions=(4,)) if cls is Unet else kwargs.update(
        attention_levels=(False, True))
    kwargs.update(overrides)
    torch.manual_seed(0)
    return randomize_zero_init(cls(**kwargs))


def randomize_zero_init(net):
    """Give zero-initialised layers small random weights, so that every path shows in outputs and gradients."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return net


def inputs(net, batch=3, size=8, tokens=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    kw = {}
    if net.text_embed_dim is not None:
        mask = torch.zeros(batch, tokens, dtype=torch.bool)
        mask[0, :3] = True  # row 0: 3 real tokens then padding
        mask[1, :] = True  # row 1: all real
        # row 2: no text at all (classifier-free guidance's unconditional pass)
        kw.update(text_embeds=torch.randn(batch, tokens, net.text_embed_dim, generator=gen), text_mask=mask)
    if net.lowres_cond:
        kw.update(lowres_img=torch.randn(x.shape, generator=gen), lowres_noise_cond=torch.randn(batch, generator=gen))
    return x, torch.randn(batch, generator=gen), kw


@pytest.mark.parametrize("cls", [Unet, EfficientUnet])
@pytest.mark.parametrize("attention_type", ATTENTION)
@pytest.mark.parametrize("text", [True, False])
@pytest.mark.parametrize("lowres", [False, True])
def test_output_shape_and_finite(cls, attention_type, text, lowres):
    net = small_net(cls, attention_type, text=text, lowres=lowres)
    x, c, kw = inputs(net)
    out = net(x, c, **kw)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert net.channels == 3 and net.lowres_cond == lowres
    assert net.text_embed_dim == (TEXT_DIM if text else None)


@pytest.mark.parametrize("cls", [Unet, EfficientUnet])
def test_text_net_without_text_embeds_is_the_unconditional_pass(cls):
    net = small_net(cls, "cross")
    x, c, kw = inputs(net)
    no_text = net(x, c)
    empty = net(x, c, text_embeds=kw["text_embeds"], text_mask=torch.zeros_like(kw["text_mask"]))
    torch.testing.assert_close(no_text, empty)
    assert not torch.allclose(no_text, net(x, c, **kw))  # text does change the output


@pytest.mark.parametrize("cls", [Unet, EfficientUnet])
@pytest.mark.parametrize("attention_type", ATTENTION)
@pytest.mark.parametrize("use_null_token", [True, False])
@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_padded_tokens_never_change_the_output(cls, attention_type, use_null_token, pooling):
    net = small_net(cls, attention_type, use_null_token=use_null_token, feature_pooling_type=pooling)
    x, c, kw = inputs(net)
    out = net(x, c, **kw)
    assert torch.isfinite(out).all()
    changed = kw["text_embeds"].clone()
    changed[~kw["text_mask"]] = 1e3 * torch.randn(int((~kw["text_mask"]).sum()), TEXT_DIM)
    torch.testing.assert_close(net(x, c, **dict(kw, text_embeds=changed)), out, rtol=0, atol=1e-5)
    changed[~kw["text_mask"]] = float("nan")  # not even NaN in a padded slot leaks through
    torch.testing.assert_close(net(x, c, **dict(kw, text_embeds=changed)), out, rtol=0, atol=1e-5)
    # ...while a real token does matter
    changed = kw["text_embeds"].clone()
    changed[1, 0] += 1.0
    assert not torch.allclose(net(x, c, **dict(kw, text_embeds=changed))[1], out[1])


@pytest.mark.parametrize("cls,options", [
    (Unet, dict(attention_type="stacked", lowres=True, learned_sinu_pos_emb_dim=16)),
    (Unet, dict(attention_type="fused", resblock_updown=True, scale_shift_norm=False, feature_pooling_type="mean")),
    (EfficientUnet, dict(attention_type="stacked", lowres=True)),
    (EfficientUnet, dict(attention_type="fused", learned_sinu_pos_emb_dim=8, resample_with_conv=False)),
    (EfficientUnet, dict(attention_type="fused", attention_pos_emb=True)),
])
def test_every_parameter_receives_a_gradient(cls, options):
    net = small_net(cls, **options)
    x, c, kw = inputs(net)
    net(x, c, **kw).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("cls", [Unet, EfficientUnet])
def test_zero_init_output_and_gradients_at_default_init(cls):
    kw = dict(embed_dim=16, channel_mult=(1, 2), num_res_blocks=1, text_embed_dim=TEXT_DIM, per_head_channels=8)
    net = cls(**kw, **(dict(image_size=8, attention_resolutions=(4,)) if cls is Unet else {}))
    x, c, kwargs = inputs(net)
    out = net(x, c, **kwargs)
    assert torch.equal(out, torch.zeros_like(out))  # the untrained net predicts 0 (zero-init output conv)
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def reference_position_features(height, width, channels):
    """Position features written out pixel by pixel in float64 (the formula of the docstring)."""
    n = channels // 4
    out = torch.zeros(height * width, channels, dtype=torch.float64)
    for i in range(height):
        for j in range(width):
            u, v = (i + 0.5) / height, (j + 0.5) / width
            for k in range(1, n + 1):
                out[i * width + j, k - 1] = math.sin(math.pi * k * u)
                out[i * width + j, n + k - 1] = math.cos(math.pi * k * u)
                out[i * width + j, 2 * n + k - 1] = math.sin(math.pi * k * v)
                out[i * width + j, 3 * n + k - 1] = math.cos(math.pi * k * v)
    return out


def test_position_features_match_the_formula_and_name_the_place():
    torch.testing.assert_close(position_features(3, 5, 10).double(), reference_position_features(3, 5, 10),
                               rtol=0, atol=1e-6)
    # fractions of the side: the top-left pixel of a 4 x 4 map and the top-left 2 x 2 block of an 8 x 8 map
    # sit at the same place, so their features agree to first order and the centre differs from both
    coarse, fine = position_features(4, 4, 16), position_features(8, 8, 16)
    top_left_fine = fine.reshape(8, 8, 16)[:2, :2].reshape(4, 16).mean(0)
    assert (coarse[0] - top_left_fine).norm() < 0.5 * (coarse[0] - coarse[5]).norm()
    with pytest.raises(ValueError, match="channels"):
        position_features(4, 4, 3)


def test_attention_pos_emb_tells_identical_tokens_apart():
    """A constant feature map: every token is the same, so plain attention answers the same everywhere."""
    torch.manual_seed(0)
    x = torch.randn(1, 16, 1, 1).expand(1, 16, 4, 4).contiguous()
    for pos_emb in (False, True):
        layer = randomize_zero_init(ImageAttention("self", 16, heads=4, pos_emb=pos_emb))
        out = layer(x).flatten(2)  # (1, C, HW)
        spread = (out - out[..., :1]).abs().max().item()
        assert (spread > 1e-3) if pos_emb else (spread < 1e-5), (pos_emb, spread)


def reference_attention(layer: ImageAttention, x, tokens=None, mask=None):
    """The same layer computed by hand in float64: explicit softmax with -inf on masked keys."""
    p = {k: v.double() for k, v in layer.state_dict().items()}
    b, ch, hh, ww = x.shape
    groups = layer.norm.num_groups
    xg = x.double().reshape(b, groups, -1)
    xn = ((xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + 1e-5))
    xn = xn.reshape(b, ch, hh, ww) * p["norm.weight"][:, None, None] + p["norm.bias"][:, None, None]
    t = xn.flatten(2).transpose(1, 2)  # (B, HW, C)
    if layer.pos_emb:
        t = t + reference_position_features(hh, ww, ch)
    q = t @ p["to_q.weight"].T + p["to_q.bias"]
    keys, values, masks = [], [], []
    if layer.kind != "cross":
        kv = t @ p["to_kv.weight"].T + p["to_kv.bias"]
        keys.append(kv[..., :ch]), values.append(kv[..., ch:]), masks.append(torch.ones(b, t.shape[1], dtype=bool))
    if layer.kind != "self":
        kv = tokens.double() @ p["to_kv_text.weight"].T + p["to_kv_text.bias"]
        keys.append(kv[..., :ch]), values.append(kv[..., ch:]), masks.append(mask)
    k, v, m = torch.cat(keys, 1), torch.cat(values, 1), torch.cat(masks, 1)
    heads, d = layer.heads, ch // layer.heads
    split = lambda z: z.reshape(b, -1, heads, d).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~m[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, -1, ch)
    out = out @ p["proj_out.weight"].T + p["proj_out.bias"]
    return x.double() + out.transpose(1, 2).reshape(x.shape)


@pytest.mark.parametrize("kind", ["self", "cross", "fused"])
@pytest.mark.parametrize("float32,pos_emb", [(False, False), (True, False), (False, True)])
def test_attention_matches_float64_reference(kind, float32, pos_emb):
    torch.manual_seed(0)
    layer = randomize_zero_init(ImageAttention(kind, 16, heads=4, context_dim=12, float32=float32, pos_emb=pos_emb))
    x, tokens = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 12)
    mask = torch.tensor([[True, True, False, True, False], [True, False, False, False, False]])
    out = layer(x, make_text_context(tokens, mask, always_nonempty=False))
    torch.testing.assert_close(out.double(), reference_attention(layer, x, tokens, mask), rtol=1e-5, atol=1e-5)
    if pos_emb:  # another map size right after: the layer's reused position features must follow it
        x = torch.randn(2, 16, 2, 6)
        out = layer(x, make_text_context(tokens, mask, always_nonempty=False))
        torch.testing.assert_close(out.double(), reference_attention(layer, x, tokens, mask), rtol=1e-5, atol=1e-5)


def test_stable_attention_in_bfloat16_is_finite_and_close():
    net = small_net(Unet, "fused", stable_attention=True)
    x, c, kw = inputs(net)
    ref = net(x, c, **kw)
    half = net.to(torch.bfloat16)
    out = half(x.bfloat16(), c, **kw)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("cls", [Unet, EfficientUnet])
def test_half_precision_weights_take_float32_inputs_without_autocast(cls):
    # e.g. a checkpoint loaded with dtype=bfloat16 and sampled by a diffusion process that works in float32
    net = small_net(cls, "stacked", lowres=True)
    x, c, kw = inputs(net)
    ref = net(x, c, **kw)
    out = net.to(torch.bfloat16)(x, c, **kw)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("cls", [Unet, EfficientUnet])
def test_gradient_checkpointing_gives_the_same_output_and_gradients(cls):
    plain = small_net(cls, "stacked", lowres=True)
    ckpt = small_net(cls, "stacked", lowres=True, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, c, kw = inputs(plain)
    outs = []
    for net in (plain, ckpt):
        out = net(x, c, **kw)
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1])
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize("cls", [Unet, EfficientUnet])
def test_channels_last_gives_the_same_output(cls):
    net = small_net(cls, "fused", lowres=True)
    x, c, kw = inputs(net)
    ref = net(x, c, **kw)
    net = net.to(memory_format=torch.channels_last)
    kw["lowres_img"] = kw["lowres_img"].contiguous(memory_format=torch.channels_last)
    out = net(x.contiguous(memory_format=torch.channels_last), c, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [Unet, EfficientUnet])
def test_config_round_trips_through_json(cls):
    net = small_net(cls, "stacked", lowres=True, dropout=0.1, learned_sinu_pos_emb_dim=8,
                    attention_pos_emb=True).eval()
    config = json.loads(json.dumps(net.config.to_dict()))
    rebuilt = network_from_config(cls.__name__, config)
    assert NETWORKS[cls.__name__] is cls and rebuilt.config == net.config
    rebuilt.load_state_dict(net.state_dict())
    x, c, kw = inputs(net)
    torch.testing.assert_close(rebuilt.eval()(x, c, **kw), net(x, c, **kw))
    with pytest.raises(ValueError, match="kind"):
        network_from_config("Transformer", config)


def test_noise_embedding_resolves_edm_and_log_snr_ranges():
    emb = NoiseEmbedding(32)
    for lo, hi, step in ((-1.6, 1.1, 0.005), (-20.0, 20.0, 0.05)):
        c = torch.arange(lo, hi, step)
        f = emb(c)
        assert f.shape == (len(c), 65) and torch.equal(f[:, 0], c)
        dist = torch.cdist(f, f) + torch.eye(len(c)) * 1e9
        # distinct values (>= one grid step apart) never collide: the embedding separates them
        assert dist.min() > 0.05, (lo, hi, dist.min())


def test_noise_level_changes_the_output_in_both_ranges():
    net = small_net(Unet, "self", text=False)
    x = torch.randn(1, 3, 8, 8)
    for a, b in ((0.10, 0.11), (15.0, 15.2)):
        assert not torch.allclose(net(x, torch.tensor([a])), net(x, torch.tensor([b])), atol=1e-6)


def test_bad_inputs_name_the_argument():
    net = small_net(EfficientUnet, "cross", lowres=True)
    x, c, kw = inputs(net)
    cases = [
        (dict(x=torch.randn(3, 4, 8, 8)), "x"),
        (dict(x=torch.randn(3, 3, 7, 7), lowres_img=torch.randn(3, 3, 7, 7)), "x"),
        (dict(noise_cond=torch.randn(2)), "noise_cond"),
        (dict(text_embeds=torch.randn(3, 5, 7)), "text_embeds"),
        (dict(text_mask=kw["text_mask"].float()), "text_mask"),
        (dict(lowres_img=None), "lowres_img"),
        (dict(lowres_img=torch.randn(3, 3, 4, 4)), "lowres_img"),
        (dict(lowres_noise_cond=None), "lowres_noise_cond"),
    ]
    for change, name in cases:
        args = {**kw, "x": x, "noise_cond": c, **change}
        with pytest.raises(ValueError, match=name):
            net(args.pop("x"), args.pop("noise_cond"), **args)
    plain = small_net(Unet, "self", text=False)
    with pytest.raises(ValueError, match="text_embeds"):
        plain(x, c, text_embeds=kw["text_embeds"])
    with pytest.raises(ValueError, match="lowres_img"):
        plain(x, c, lowres_img=x)


def test_bad_options_name_the_argument():
    with pytest.raises(ValueError, match="attention_type"):
        Unet(embed_dim=16, attention_type="linear")
    with pytest.raises(ValueError, match="attention_resolutions"):
        Unet(embed_dim=16, image_size=32, channel_mult=(1, 2), attention_resolutions=(8,))
    with pytest.raises(ValueError, match="num_res_blocks"):
        EfficientUnet(embed_dim=16, channel_mult=(1, 2), num_res_blocks=(1, 2, 3))
    with pytest.raises(ValueError, match="feature_pooling_type"):
        Unet(embed_dim=16, channel_mult=(1, 2), attention_resolutions=(), feature_pooling_type="max")
    with pytest.raises(ValueError, match="per_head_channels"):
        Unet(embed_dim=16, image_size=8, channel_mult=(1, 2), attention_resolutions=(4,), per_head_channels=12)


def test_efficient_unet_scales_skips_by_inverse_sqrt2():
    scaled = small_net(EfficientUnet, "self", text=False)
    unscaled = small_net(EfficientUnet, "self", text=False, skip_connection_scaling=False)
    unscaled.load_state_dict(scaled.state_dict())
    assert scaled.skip_scale == pytest.approx(2**-0.5) and unscaled.skip_scale == 1.0
    x = torch.randn(1, 3, 8, 8)
    assert not torch.allclose(scaled(x, torch.zeros(1)), unscaled(x, torch.zeros(1)))


def test_efficient_unet_resamples_around_the_convolutions():
    net = small_net(EfficientUnet, "self", text=False, channel_mult=(1, 2, 2), num_res_blocks=(1, 2, 1),
                    attention_levels=(False, False, True))
    seen = {}
    for name, module in net.named_modules():
        if re.fullmatch(r"[du]blocks\.\d+\.blocks\.0", name):  # the first res block of each level
            module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0].shape[-1]))
    net(torch.randn(1, 3, 16, 16), torch.zeros(1))
    # down path: a level's res blocks already run at its (halved) size; up path: before upsampling
    assert seen == {"dblocks.0.blocks.0": 16, "dblocks.1.blocks.0": 8, "dblocks.2.blocks.0": 4,
                    "ublocks.0.blocks.0": 8, "ublocks.1.blocks.0": 16}
    assert len(net.dblocks[1].blocks) == 2 and len(net.ublocks[0].blocks) == 2  # per-level counts, both paths


def test_unet_attention_placement_by_level_and_middle():
    by_res = Unet(embed_dim=16, image_size=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,),
                  attention_type="self", text_embed_dim=None, per_head_channels=8)
    by_level = Unet(embed_dim=16, image_size=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                    attention_levels=(False, True, False), middle_attention=False, attention_type="self",
                    text_embed_dim=None, per_head_channels=8)
    assert by_level.config.embed_dim == 16 and by_level.config.attention_per_level() == (False, True, False)
    with_attn = lambda net: [i for i, step in enumerate(net.down) if step.attn is not None]  # noqa: E731
    assert with_attn(by_res) == with_attn(by_level) == [2]  # the one res block at 8 px
    assert by_res.middle.attn is not None and by_level.middle.attn is None


def test_from_nemo_reads_nemo_unet_blocks():
    from imagen_lib.nn.networks import from_nemo

    sr = dict(embed_dim=8, image_size=16, channels=3, channel_mult=[1, 2], num_attn_heads=2, per_head_channels=8,
              attention_type="stacked", atnn_enabled_at=[0, 1], feature_pooling_type="attention", stride=2,
              num_resblocks=[1, 2], learned_sinu_pos_emb_dim=0, use_null_token=False, init_conv_kernel_size=3,
              gradient_checkpointing=False, scale_shift_norm=True, stable_attention=False, flash_attention=True,
              skip_connection_scaling=True)
    net = from_nemo("sr", sr, text_embed_dim=TEXT_DIM)
    assert type(net) is EfficientUnet and net.lowres_cond and net.config.num_res_blocks == (1, 2)
    assert net.config.attention_levels == (False, True) and net.text_embed_dim == TEXT_DIM
    base = dict(embed_dim=8, image_size=8, num_res_blocks=1, channel_mult=[1, 2], attention_resolutions=[4],
                attention_type="fused", cond_dim=16, dropout=False, resblock_updown=False, flash_attention=False)
    assert type(from_nemo("base", base)) is Unet and from_nemo("sr-unet", base).lowres_cond
    with pytest.raises(ValueError, match="stride"):
        from_nemo("sr", dict(sr, stride=4))
    with pytest.raises(ValueError, match="unet_type"):
        from_nemo("sr1024", sr)


# --- the config dataclasses -------------------------------------------------------------------------------

# Network configs exactly as checkpoints written before the dataclasses hold them (config.json, "network"):
# the shapes quickstart's 16 px base, and a Unet with level flags, learned noise embedding and resampling
# res blocks (its attention_resolutions do not fit image_size, which is allowed when attention_levels is set).
OLD_CHECKPOINT_CONFIGS = [
    ("EfficientUnet", 1162979, json.loads(
        '{"embed_dim": 32, "image_size": 16, "channels": 3, "out_channels": null, "channel_mult": [1, 2, 4], '
        '"num_res_blocks": [1, 1, 2], "attention_type": "fused", "attention_levels": [false, true, true], '
        '"num_attn_heads": 4, "per_head_channels": 32, "cond_dim": 128, "text_embed_dim": 64, "cond_on_text": true, '
        '"feature_pooling_type": "attention", "learned_sinu_pos_emb_dim": 0, "dropout": 0.0, "use_null_token": true, '
        '"init_conv_kernel_size": 3, "gradient_checkpointing": false, "scale_shift_norm": true, '
        '"resample_with_conv": true, "skip_connection_scaling": true, "lowres_cond": false, '
        '"stable_attention": false, "attention_pos_emb": true}')),
    ("Unet", 340855, json.loads(
        '{"embed_dim": 16, "image_size": 16, "channels": 3, "out_channels": null, "channel_mult": [1, 2, 2], '
        '"num_res_blocks": [1, 1, 1], "attention_type": "self", "attention_resolutions": [32, 16, 8], '
        '"attention_levels": [false, true, false], "middle_attention": false, "num_attn_heads": 4, '
        '"per_head_channels": 8, "cond_dim": null, "text_embed_dim": null, "cond_on_text": true, '
        '"feature_pooling_type": "attention", "learned_sinu_pos_emb_dim": 8, "dropout": 0.1, "use_null_token": true, '
        '"init_conv_kernel_size": 3, "gradient_checkpointing": false, "scale_shift_norm": true, '
        '"resblock_updown": true, "resample_with_conv": true, "lowres_cond": false, "stable_attention": false, '
        '"attention_pos_emb": false}')),
]


def shapes(net):
    return [(name, tuple(t.shape)) for name, t in net.state_dict().items()]


@pytest.mark.parametrize("kind,n_params,old", OLD_CHECKPOINT_CONFIGS)
def test_old_checkpoint_configs_rebuild_the_same_net(kind, n_params, old):
    net = network_from_config(kind, old)
    # every stored field reads back; fields added since (Stable Diffusion's options) take their defaults
    assert isinstance(net.config, net.config_class) and net.config.to_dict() == {**net.config_class().to_dict(), **old}
    assert sum(p.numel() for p in net.parameters()) == n_params  # counted by the pre-dataclass code
    with_keywords = NETWORKS[kind](**{k: tuple(v) if isinstance(v, list) else v for k, v in old.items()})
    assert with_keywords.config == net.config and shapes(with_keywords) == shapes(net)


@pytest.mark.parametrize("cls", [Unet, EfficientUnet])
def test_config_round_trips_and_rebuilds_the_same_architecture(cls):
    net = small_net(cls, "stacked", lowres=True, num_res_blocks=2, learned_sinu_pos_emb_dim=8)
    config = net.config
    plain = json.loads(json.dumps(config.to_dict()))
    # the JSON values are plain (lists, not tuples), and the asdict + JSON path gives the same
    assert plain == config.to_dict() == json.loads(json.dumps(dataclasses.asdict(config)))
    assert not any(isinstance(v, tuple) for v in config.to_dict().values())
    assert type(config).from_dict(plain) == config and hash(type(config).from_dict(plain)) == hash(config)
    for rebuilt in (cls(config), cls(**config.to_dict()), cls(type(config).from_dict(plain)), network_for(config)):
        assert type(rebuilt) is cls and rebuilt.config == config and shapes(rebuilt) == shapes(net)
    assert network_kind(config) == cls.__name__ and NETWORK_OF_CONFIG[type(config)] is cls


def test_configs_normalise_to_what_the_nets_build():
    assert UnetConfig(channel_mult=[1, 2], num_res_blocks=2, attention_resolutions=[64, 32]) == UnetConfig(
        channel_mult=(1, 2), num_res_blocks=(2, 2), attention_resolutions=(64, 32))
    assert UnetConfig().num_res_blocks == (3, 3, 3, 3) and UnetConfig().attention_per_level() == (
        False, True, True, True)
    assert UnetConfig(image_size=8, channel_mult=(1, 2), attention_levels=True).attention_per_level() == (True, True)
    # the Efficient U-Net's default attention placement is stored resolved: the two deepest levels
    assert EfficientUnetConfig().attention_levels == (False, False, False, True, True)
    assert EfficientUnetConfig(channel_mult=(1, 2, 4), num_res_blocks=1).attention_levels == (False, True, True)
    assert EfficientUnetConfig(channel_mult=(1, 2), num_res_blocks=1).level_channels == (128, 256)
    # NeMo's 0/1 flags and dropout: False read as bools and a float
    config = EfficientUnetConfig(channel_mult=(1, 2), num_res_blocks=1, attention_levels=[0, 1], dropout=False)
    assert config.attention_levels == (False, True) and config.dropout == 0.0 and type(config.dropout) is float


def test_configs_are_frozen_and_replace_checks_again():
    config = UnetConfig(embed_dim=16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.embed_dim = 32
    assert config.replace(embed_dim=32).embed_dim == 32 and config.embed_dim == 16
    assert Unet(config, image_size=32).config == config.replace(image_size=32)
    with pytest.raises(ValueError, match="embed_dim"):
        config.replace(embed_dim=0)


def test_unknown_fields_are_named_with_the_known_ones():
    with pytest.raises(TypeError, match=r"\['dim'\].*embed_dim"):
        Unet(dim=16)  # the old alias is gone: one name per option
    with pytest.raises(TypeError, match="middle_attention"):
        EfficientUnet(middle_attention=False)  # a Unet-only field
    with pytest.raises(TypeError, match="sizes"):
        UnetConfig().replace(sizes=3)
    with pytest.raises(ValueError, match=r"\['dim', 'flash'\].*skip_connection_scaling"):
        EfficientUnetConfig.from_dict({"dim": 16, "flash": True})
    with pytest.raises(ValueError, match="resblock_updown"):
        network_from_config("EfficientUnet", {"resblock_updown": True})
    with pytest.raises(TypeError, match="config"):
        Unet(EfficientUnetConfig())
    with pytest.raises(TypeError, match="config"):
        Unet({"embed_dim": 16})
    with pytest.raises(TypeError, match="config"):
        network_for(NetworkConfig())


@pytest.mark.parametrize("cls,field,value", [
    (UnetConfig, "embed_dim", 0), (UnetConfig, "channels", "3"), (UnetConfig, "channel_mult", ()),
    (UnetConfig, "channel_mult", (1, 0)), (UnetConfig, "attention_type", "linear"),
    (UnetConfig, "init_conv_kernel_size", 2), (UnetConfig, "dropout", 1.0), (UnetConfig, "num_res_blocks", (1, 2)),
    (UnetConfig, "num_res_blocks", None), (UnetConfig, "attention_levels", (True,)),
    (UnetConfig, "feature_pooling_type", "max"), (UnetConfig, "cond_on_text", "yes"),
    (UnetConfig, "cond_dim", -1), (UnetConfig, "attention_resolutions", (12,)),
    (EfficientUnetConfig, "num_res_blocks", (0, 1, 1, 1, 1)), (EfficientUnetConfig, "skip_connection_scaling", 2),
])
def test_bad_config_values_name_the_field(cls, field, value):
    with pytest.raises(ValueError, match=field):
        cls(**{field: value})
