"""Stable Diffusion's U-Net as presets of our Unet, and its published weights through imagen_lib.nn.convert_sd.

diffusers is a test-only dependency here: a tiny random UNet2DConditionModel of SD's architecture is the
reference our network must reproduce once its weights are converted (nothing is downloaded).
"""

import subprocess
import sys

import pytest
import torch

from imagen_lib.nn import presets
from imagen_lib.nn.config import UnetConfig
from imagen_lib.nn.convert_sd import (
    detect_sd_layout,
    load_sd_unet_weights,
    read_sd_state_dict,
    sd_unet_key_map,
    sd_unet_state_dict,
    unet_from_nemo_sd,
)
from imagen_lib.nn.layers import TimestepEmbedding
from imagen_lib.nn.spatial_transformer import SpatialTransformer
from imagen_lib.nn.unet import Unet

diffusers = pytest.importorskip("diffusers")

CONTEXT = 24  # text width of the tiny nets


def tiny_config(linear: bool, **overrides) -> UnetConfig:
    """SD's design at 32/64/64 channels: 2 res blocks a level, spatial transformers at the two finer levels."""
    heads = dict(per_head_channels=16) if linear else dict(num_attn_heads=8, per_head_channels=None)
    return presets.get("sd-v2").replace(embed_dim=32, image_size=8, channel_mult=(1, 2, 2), num_res_blocks=2,
                                        cond_dim=None, attention_levels=(True, True, False), text_embed_dim=CONTEXT,
                                        use_linear_in_transformer=linear, **heads, **overrides)


def tiny_diffusers(linear: bool, seed: int = 0):
    """The same architecture in diffusers (SD 2: per-level head counts; SD 1: its 8 'attention_head_dim'
    heads), every weight and bias moved off its initial value so that no two layers look alike."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CONTEXT,
        attention_head_dim=(2, 4, 4) if linear else 8, norm_num_groups=32, use_linear_projection=linear)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def sd_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([17.0, 873.0])
    text = torch.randn(2, 5, CONTEXT, generator=g)
    return x, t, text


def diffusers_out(model, x, t, text):
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=text).sample


def ours_out(net, x, t, text):
    with torch.no_grad():
        return net.eval()(x, t, text_embeds=text)


def to_ldm(net, diffusers_state, prefix=""):
    """diffusers' keys renamed to the original layout's through our names (one map each way)."""
    to_diffusers, to_ldm_names = sd_unet_key_map(net, "diffusers"), sd_unet_key_map(net, "ldm")
    return {prefix + to_ldm_names[ours]: diffusers_state[name] for ours, name in to_diffusers.items()}


# --- the presets ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sd-v2", "sd-v1"])
def test_sd_presets_have_the_published_parameter_count(name):
    net = presets.build(name, device="meta")
    n = sum(p.numel() for p in net.parameters())
    published = presets.PUBLISHED_SIZES[name]
    assert abs(n - published) <= 0.02 * published, n
    assert n == published  # the same architecture, tensor for tensor


def test_sd_presets_follow_seed_003():
    v2, v1 = presets.get("sd-v2"), presets.get("sd-v1")
    assert (v2.channels, v2.out_channels, v2.embed_dim, v2.channel_mult, v2.num_res_blocks) == (
        4, 4, 320, (1, 2, 4, 4), (2, 2, 2, 2))
    assert v2.attention_per_level() == (True, True, True, False) and v2.middle_attention  # factors 1, 2, 4
    assert (v2.text_embed_dim, v1.text_embed_dim) == (1024, 768)
    assert v2.use_linear_in_transformer and not v1.use_linear_in_transformer
    net = presets.build("sd-v2", device="meta")
    blocks = [m for m in net.modules() if isinstance(m, SpatialTransformer)]
    assert len(blocks) == 2 * 3 + 1 + 3 * 3  # down, middle, up
    heads = sorted({b.transformer_blocks[0].attn1.heads for b in blocks})
    assert heads == [5, 10, 20]  # 64-channel heads at 320, 640, 1280 channels
    v1_net = presets.build("sd-v1", device="meta")
    assert {m.transformer_blocks[0].attn2.heads for m in v1_net.modules() if isinstance(m, SpatialTransformer)} == {8}
    assert net.cond.text.__class__.__name__ == "TextTokens" and net.cond.noise[1][0].in_features == 320
    assert net.cond.noise[1][2].out_features == 1280


def test_new_options_default_to_the_imagen_networks():
    config = UnetConfig()
    assert (config.timestep_embedding, config.text_conditioning, config.use_linear_in_transformer,
            config.transformer_depth) == (False, "projected", False, 1)
    with pytest.raises(ValueError, match="text_conditioning"):
        UnetConfig(text_conditioning="pooled")
    with pytest.raises(ValueError, match="attention_type"):
        UnetConfig(attention_type="transformer")
    with pytest.raises(ValueError, match="transformer_depth"):
        UnetConfig(transformer_depth=0)
    with pytest.raises(ValueError, match="learned_sinu_pos_emb_dim"):
        UnetConfig(timestep_embedding=True, learned_sinu_pos_emb_dim=8)
    with pytest.raises(ValueError, match="attention_pos_emb"):
        UnetConfig(attention_type="spatial_transformer", attention_pos_emb=True)


def test_timestep_embedding_is_diffusers_flipped_sinusoid():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 17.0, 500.0, 999.0])
    ours = TimestepEmbedding(320)(t)
    theirs = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(ours, theirs)
    assert TimestepEmbedding(7)(t).shape == (5, 7)
    with pytest.raises(ValueError, match="dim"):
        TimestepEmbedding(1)


# --- weights from diffusers and the original layout ------------------------------------------------------------

@pytest.mark.parametrize("linear", [True, False], ids=["sd2-linear-proj", "sd1-conv-proj"])
def test_diffusers_weights_give_diffusers_outputs(linear):
    model, net = tiny_diffusers(linear), Unet(tiny_config(linear))
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in model.parameters())
    x, t, text = sd_inputs()
    ref = diffusers_out(model, x, t, text)
    assert (ours_out(net, x, t, text) - ref).abs().max() > 0.1  # not equal by accident
    report = load_sd_unet_weights(net, model.state_dict())
    assert (report.layout, report.prefix, report.missing, report.unexpected) == ("diffusers", "", [], [])
    torch.testing.assert_close(ours_out(net, x, t, text), ref, rtol=0, atol=1e-5)
    # a text mask of all True is the same as none, and the other path of the text tokens
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, text_embeds=text, text_mask=mask), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("linear", [True, False], ids=["sd2-linear-proj", "sd1-conv-proj"])
def test_original_layout_loads_to_the_same_outputs(linear):
    model, net = tiny_diffusers(linear), Unet(tiny_config(linear))
    state = to_ldm(net, model.state_dict(), prefix="model.diffusion_model.")
    assert "model.diffusion_model.input_blocks.0.0.weight" in state
    assert "model.diffusion_model.output_blocks.8.1.transformer_blocks.0.ff.net.0.proj.weight" in state
    assert "model.diffusion_model.middle_block.2.out_layers.3.weight" in state
    # a whole LDM checkpoint: the VAE's and text encoder's keys are not the U-Net's business
    state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(3)
    state["cond_stage_model.transformer.x"] = torch.zeros(3)
    report = load_sd_unet_weights(net, {"state_dict": state})
    assert (report.layout, report.prefix, report.missing, report.unexpected) == (
        "ldm", "model.diffusion_model.", [], [])
    x, t, text = sd_inputs()
    torch.testing.assert_close(ours_out(net, x, t, text), diffusers_out(model, x, t, text), rtol=0, atol=1e-5)


def test_export_to_diffusers_and_ldm_round_trips():
    net = Unet(tiny_config(True))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = tiny_diffusers(True, seed=5)
    model.load_state_dict(sd_unet_state_dict(net, "diffusers"), strict=True)
    x, t, text = sd_inputs()
    torch.testing.assert_close(diffusers_out(model, x, t, text), ours_out(net, x, t, text), rtol=0, atol=1e-5)
    again = Unet(tiny_config(True))
    assert load_sd_unet_weights(again, sd_unet_state_dict(net, "ldm")).layout == "ldm"
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))


def test_conv_projections_load_into_linear_ones():
    """SD 1.x keeps its in/out projections as 1x1 convs, SD 2 as linear layers: the same map either way."""
    model = tiny_diffusers(False)
    net = Unet(tiny_config(False).replace(use_linear_in_transformer=True))
    load_sd_unet_weights(net, model.state_dict())
    x, t, text = sd_inputs()
    torch.testing.assert_close(ours_out(net, x, t, text), diffusers_out(model, x, t, text), rtol=0, atol=1e-5)


def test_missing_and_unexpected_keys_are_named():
    model, net = tiny_diffusers(True), Unet(tiny_config(True))
    state = dict(model.state_dict())
    del state["up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight"]
    state["down_blocks.0.resnets.0.extra.weight"] = torch.zeros(2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"attn2\.to_k\.weight.*resnets\.0\.extra\.weight"):
        load_sd_unet_weights(net, state)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # strict: nothing loaded
    report = load_sd_unet_weights(net, state, strict=False)
    assert report.missing == ["up.5.attn.transformer_blocks.0.attn2.to_k.weight <- "
                              "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight"]
    assert report.unexpected == ["down_blocks.0.resnets.0.extra.weight"]
    assert torch.equal(net.init_conv.weight, model.conv_in.weight)


def test_bad_inputs_are_named():
    model, net = tiny_diffusers(True), Unet(tiny_config(True))
    wrong = dict(model.state_dict())
    wrong["conv_out.weight"] = torch.zeros(4, 32, 1, 1)
    with pytest.raises(ValueError, match=r"conv_out\.weight \(4, 32, 1, 1\) for out\.2\.weight"):
        load_sd_unet_weights(net, wrong)
    with pytest.raises(ValueError, match="no Stable Diffusion U-Net"):
        load_sd_unet_weights(net, {"encoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="more than one"):
        detect_sd_layout({**{"a." + k: v for k, v in model.state_dict().items()},
                          **{"b." + k: v for k, v in model.state_dict().items()}})
    assert detect_sd_layout({"unet." + k: v for k, v in model.state_dict().items()}) == ("diffusers", "unet.")
    with pytest.raises(TypeError, match="state_dict"):
        load_sd_unet_weights(net, [1, 2])
    with pytest.raises(TypeError, match="net"):
        load_sd_unet_weights(presets.build("tiny-e16", device="meta"), model.state_dict())
    with pytest.raises(ValueError, match="layout"):
        sd_unet_key_map(net, "ckpt")
    with pytest.raises(ValueError, match="null_token"):
        sd_unet_state_dict(Unet(tiny_config(True, use_null_token=True)))


def test_read_sd_state_dict_from_files(tmp_path):
    from safetensors.torch import save_file

    model = tiny_diffusers(True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "unet").mkdir()
    save_file(state, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    read = read_sd_state_dict(tmp_path)
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
    torch.save({"state_dict": {"model.diffusion_model." + k: v for k, v in state.items()}}, tmp_path / "m.ckpt")
    assert len(read_sd_state_dict(tmp_path / "m.ckpt")) == len(state)
    with pytest.raises(FileNotFoundError, match="path"):
        read_sd_state_dict(tmp_path / "nothing.safetensors")


def test_imagen_lib_never_imports_diffusers():
    code = ("import sys, imagen_lib, imagen_lib.nn.convert_sd, imagen_lib.nn.presets, imagen_lib.nn.networks; "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the network's own behaviour --------------------------------------------------------------------------

def test_text_mask_and_unconditional_rows():
    torch.manual_seed(0)
    net = Unet(tiny_config(True)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, text = sd_inputs()
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    with torch.no_grad():
        masked = net(x, t, text_embeds=text.masked_fill(~mask[..., None], float("nan")), text_mask=mask)
        cut = net(x[:1], t[:1], text_embeds=text[:1, :3])
        uncond = net(x, t)
        no_text_row = net(x, t, text_embeds=text, text_mask=torch.zeros(2, 5, dtype=torch.bool))
    torch.testing.assert_close(masked[:1], cut, rtol=0, atol=1e-5)  # padding is ignored, NaN included
    assert torch.isfinite(uncond).all()
    torch.testing.assert_close(no_text_row, uncond)
    with_null = Unet(tiny_config(True, use_null_token=True))
    assert with_null.cond.text.null_token.shape == (1, 1, CONTEXT)
    assert torch.isfinite(with_null(x, t)).all()


def test_activation_checkpointing_gives_the_same_outputs_and_grads():
    torch.manual_seed(0)
    plain = Unet(tiny_config(True)).train()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = Unet(tiny_config(True, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, text = sd_inputs()
    outs = []
    for net in (plain, ckpt):
        out = net(x, t, text_embeds=text)
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1])
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_channels_last_and_bf16():
    net = Unet(tiny_config(False)).eval()
    load_sd_unet_weights(net, tiny_diffusers(False).state_dict())
    x, t, text = sd_inputs()
    ref = ours_out(net, x, t, text)
    net = net.to(memory_format=torch.channels_last)
    out = ours_out(net, x.contiguous(memory_format=torch.channels_last), t, text)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out = ours_out(net.to(torch.bfloat16), x, t, text)  # float32 inputs into a bf16 net, answered in float32
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.1 * ref.abs().max()


# --- seed 003's unet_config ------------------------------------------------------------------------------------

SEED_003_UNET = {  # the NeMo guide's unet_config, as written there
    "_target_": "nemo.collections.multimodal.modules.stable_diffusion.diffusionmodules.openaimodel.UNetModel",
    "from_pretrained": None, "from_NeMo": True, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
    "num_head_channels": 64, "use_spatial_transformer": True, "use_linear_in_transformer": True,
    "transformer_depth": 1, "context_dim": 1024, "use_checkpoint": False, "legacy": False, "use_flash_attention": True,
}


def test_seed_003_unet_config_builds_the_sd_v2_preset():
    with torch.device("meta"):
        net = unet_from_nemo_sd(SEED_003_UNET)
        assert net.config == presets.get("sd-v2").replace(image_size=32)
        sd1 = {k: v for k, v in SEED_003_UNET.items() if k not in ("num_head_channels", "use_linear_in_transformer")}
        net = unet_from_nemo_sd({**sd1, "num_heads": 8, "context_dim": 768, "use_checkpoint": True})
        assert net.config == presets.get("sd-v1").replace(image_size=32, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="unet_config.use_fp16"):
        unet_from_nemo_sd({**SEED_003_UNET, "use_fp16": True})
    with pytest.raises(ValueError, match="use_spatial_transformer"):
        unet_from_nemo_sd({**SEED_003_UNET, "use_spatial_transformer": False})


def test_seed_003_unet_config_loads_from_pretrained(tmp_path):
    from safetensors.torch import save_file

    model = tiny_diffusers(True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "unet.safetensors"))
    tiny = {**SEED_003_UNET, "model_channels": 32, "channel_mult": [1, 2, 2], "attention_resolutions": [1, 2],
            "num_head_channels": 16, "context_dim": CONTEXT, "from_pretrained": str(tmp_path / "unet.safetensors")}
    net = unet_from_nemo_sd(tiny)
    x, t, text = sd_inputs()
    torch.testing.assert_close(ours_out(net, x, t, text), diffusers_out(model, x, t, text), rtol=0, atol=1e-5)
