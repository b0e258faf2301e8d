"""Presets: names, parameter counts of the reference sizes (meta device), the tiny CPU presets."""

import dataclasses
import json

import pytest
import torch

from imagen_lib.nn import presets
from imagen_lib.nn.config import EfficientUnetConfig, UnetConfig
from imagen_lib.nn.efficient_unet import EfficientUnet
from imagen_lib.nn.networks import network_from_config, network_kind
from imagen_lib.nn.unet import Unet

# NeMo's Imagen table (seed 000): preset -> (class, stated size in millions)
REFERENCE = {
    "base64-500m": (Unet, 524), "base64-2b": (Unet, 2100), "sr256-400m": (Unet, 429),
    "sr256-600m": (EfficientUnet, 646), "sr1024-400m": (EfficientUnet, 427),
}

TINY = {"tiny-32": (Unet,), "tiny-e32": (EfficientUnet,), "tiny-e16": (EfficientUnet,), "tiny-e24": (EfficientUnet,),
        "tiny-sr64": (EfficientUnet,)}

# Stable Diffusion's U-Nets (seed 003): preset -> (class, published parameter count); tests/test_sd_unet.py
# checks their weights against diffusers'.
SD = {"sd-v2": (Unet, 865_910_724), "sd-v1": (Unet, 859_520_964)}


def count(net) -> int:
    return sum(p.numel() for p in net.parameters())


def test_names_list_reference_and_tiny_presets():
    assert set(REFERENCE) | set(TINY) | set(SD) == set(presets.names())


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_preset_sizes_within_10_percent_on_meta(name):
    cls, stated_m = REFERENCE[name]
    net = presets.build(name, device="meta")
    assert type(net) is cls
    assert next(net.parameters()).device.type == "meta"
    assert abs(count(net) / 1e6 - stated_m) <= 0.10 * stated_m, count(net)
    assert net.text_embed_dim == 1024 and net.lowres_cond == name.startswith("sr")


def test_reference_configs_match_nemo_hyper_parameters():
    c = presets.config("base64-500m")
    assert (c["embed_dim"], c["cond_dim"], c["channel_mult"], c["num_res_blocks"]) == (256, 512, [1, 2, 3, 4], [3] * 4)
    assert c["attention_type"] == "fused" and sorted(c["attention_resolutions"]) == [8, 16, 32]
    assert presets.config("base64-2b")["embed_dim"] == 512 and presets.config("base64-2b")["cond_dim"] == 2048
    c = presets.config("sr256-600m")
    assert (c["channel_mult"], c["num_res_blocks"], c["attention_type"]) == ([1, 2, 4, 8, 8], [2, 4, 8, 8, 8], "fused")
    assert presets.config("sr1024-400m")["attention_type"] == "cross"


def test_build_applies_overrides_and_rejects_unknown_names():
    net = presets.build("tiny-32", text_embed_dim=32, device="meta")
    assert net.text_embed_dim == 32 and net.config.text_embed_dim == 32
    assert presets.build("tiny-32", dtype=torch.bfloat16).init_conv.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="name"):
        presets.build("base64-9b")


@pytest.mark.parametrize("name", presets.names())
def test_preset_config_round_trips(name):
    net = presets.build(name, device="meta")
    with torch.device("meta"):
        rebuilt = network_from_config(type(net).__name__, json.loads(json.dumps(net.config.to_dict())))
    assert rebuilt.config == net.config and count(rebuilt) == count(net)


@pytest.mark.parametrize("name,size,cls", [("tiny-32", 32, Unet), ("tiny-e16", 16, EfficientUnet),
                                           ("tiny-e24", 24, EfficientUnet), ("tiny-sr64", 64, EfficientUnet)])
def test_tiny_presets_train_on_cpu(name, size, cls):
    torch.manual_seed(0)
    net = presets.build(name)
    assert type(net) is cls and 1e6 <= count(net) <= 3e6, count(net)
    assert net.text_embed_dim == 64 and net.lowres_cond == (name == "tiny-sr64")
    b = 2
    x = torch.randn(b, 3, size, size)
    kw = dict(text_embeds=torch.randn(b, 7, 64), text_mask=torch.tensor([[True] * 4 + [False] * 3, [False] * 7]))
    if net.lowres_cond:
        kw.update(lowres_img=torch.randn_like(x), lowres_noise_cond=torch.randn(b))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    losses = []
    for _ in range(3):  # the zero-initialised output starts at loss = E[x^2] and moves towards the target
        loss = (net(x, torch.zeros(b), **kw) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_tiny_32_attends_only_at_16_and_8_px():
    net = presets.build("tiny-32", device="meta")
    assert net.config.attention_resolutions == (16, 8) and net.config.image_size == 32
    assert all(step.attn is None for step in net.down[:1])  # the 32 px level has no attention


@pytest.mark.parametrize("name", presets.names())
def test_presets_are_frozen_configs_of_their_network(name):
    config = presets.get(name)
    assert presets.PRESETS[name] is config and isinstance(config, (UnetConfig, EfficientUnetConfig))
    assert presets.config(name) == config.to_dict() and json.loads(json.dumps(presets.config(name))) == config.to_dict()
    assert network_kind(config) == {**REFERENCE, **TINY, **SD}[name][0].__name__
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.embed_dim = 1


def test_build_overrides_are_config_fields():
    net = presets.build("tiny-e16", device="meta", attention_pos_emb=False)
    assert net.config == presets.get("tiny-e16").replace(attention_pos_emb=False)
    assert presets.get("tiny-e16").attention_pos_emb  # the preset itself is unchanged
    with pytest.raises(TypeError, match="attention_resolutions"):
        presets.build("tiny-e16", device="meta", attention_resolutions=(8,))  # a Unet-only field
    with pytest.raises(ValueError, match="name"):
        presets.get("tiny-64")


@pytest.mark.parametrize("name", sorted(SD))
def test_sd_presets_within_2_percent_of_the_published_size_on_meta(name):
    cls, published = SD[name]
    net = presets.build(name, device="meta")
    assert type(net) is cls and next(net.parameters()).device.type == "meta"
    assert abs(count(net) - published) <= 0.02 * published, count(net)
    assert presets.PUBLISHED_SIZES[name] == published
    assert (net.channels, net.out_channels, net.config.embed_dim) == (4, 4, 320) and not net.lowres_cond
    assert net.config.text_embed_dim == {"sd-v2": 1024, "sd-v1": 768}[name]


def test_sd_preset_overrides_keep_the_design():
    net = presets.build("sd-v2", device="meta", image_size=96, gradient_checkpointing=True)  # SD 2's 768 px
    assert net.config.attention_per_level() == (True, True, True, False) and net.gradient_checkpointing
    assert count(net) == SD["sd-v2"][1]
