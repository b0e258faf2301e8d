"""Latent stages (latent diffusion, issue 24): the KL autoencoder (a tiny random diffusers AutoencoderKL built
from a config, saved and loaded locally), latent stages in the cascade (training, precomputed latents,
sampling, checkpoints, a latent base before a pixel SR stage and the reverse, inpainting), the config block
and precached latents (folder and shards)."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from tiny_cascade import BASE_NET, SR_NET, TEXT_DIM  # noqa: E402

from imagen_lib.cascade import Cascade, Inpainting, Stage  # noqa: E402
from imagen_lib.diffusion import ElucidatedDiffusion  # noqa: E402
from imagen_lib.latent import AutoencoderKL, diffusers_config, train_autoencoder  # noqa: E402
from imagen_lib.latent.train import foreground_weights  # noqa: E402
from imagen_lib.nn.networks import network_from_config  # noqa: E402

TINY_VAE = {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "norm_num_groups": 4}  # f = 2


@pytest.fixture(scope="module")
def vae():
    return AutoencoderKL.from_config(seed=0, posterior="mean", **TINY_VAE)


def images(n=2, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def embeds(n=2, seed=1):
    return torch.randn(n, 5, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def net(channels=4, lowres_cond=False, kind="base"):
    spec = copy.deepcopy(BASE_NET if kind == "base" else SR_NET)
    spec["config"].update(channels=channels, text_embed_dim=TEXT_DIM, lowres_cond=lowres_cond)
    torch.manual_seed(0)
    return network_from_config(spec["kind"], spec["config"])


def latent_stage(vae, image_size=16, lowres_cond=False, **kw):
    return Stage(net(vae.latent_channels, lowres_cond), ElucidatedDiffusion(), image_size=image_size,
                 autoencoder=vae, **kw)


class PixelUnshuffle:
    """An exact, local autoencoder of one's own (the protocol only): 2 x 2 pixel blocks as 12 channels."""

    latent_channels, downsampling_factor, scaling_factor, image_channels = 12, 2, 2.0, 3
    config = {"kind": "PixelUnshuffle"}

    def encode(self, x):
        return F.pixel_unshuffle(x, 2) * self.scaling_factor

    def decode(self, z):
        return F.pixel_shuffle(z / self.scaling_factor, 2)

    def save_pretrained(self, folder):
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------
# the autoencoder


def test_seed_003_vocabulary_maps_onto_diffusers_config():
    config = diffusers_config()  # SD's VAE: embed_dim 4, z 4, ch 128, ch_mult [1, 2, 4, 4], 2 res blocks
    assert config["block_out_channels"] == [128, 256, 512, 512] and config["layers_per_block"] == 2
    assert config["latent_channels"] == 4 and config["scaling_factor"] == 0.18215
    for bad in ({"attn_resolutions": [16]}, {"embed_dim": 3}, {"double_z": False}, {"ch": 12}):
        with pytest.raises(ValueError, match=next(iter(bad)) if "ch" not in bad else "norm_num_groups"):
            diffusers_config(**bad)


@pytest.mark.parametrize("ch_mult, f", [([1, 2], 2), ([1, 2, 2], 4)])
def test_encode_decode_shapes_follow_the_downsampling_factor(ch_mult, f):
    auto = AutoencoderKL.from_config(seed=0, **{**TINY_VAE, "ch_mult": ch_mult})
    assert auto.downsampling_factor == f and auto.latent_channels == 4
    z = auto.encode(images(2, 16))
    assert z.shape == (2, 4, 16 // f, 16 // f)
    assert auto.decode(z).shape == (2, 3, 16, 16)


def test_scaling_factor_is_applied_once_on_each_side(vae):
    x = images()
    raw = vae.model.encode(x).latent_dist.mean
    z = vae.encode(x)
    torch.testing.assert_close(z, raw * vae.scaling_factor)
    torch.testing.assert_close(vae.decode(z), vae.model.decode(raw).sample, rtol=1e-4, atol=1e-5)


def test_frozen_and_sample_posterior_draws(vae):
    assert not vae.model.training and not any(p.requires_grad for p in vae.model.parameters())
    assert list(vae.parameters()) == []  # no submodule: cascades and optimizers never see the VAE's weights
    sampling = AutoencoderKL(vae.model, posterior="sample")
    x = images()
    assert not torch.equal(sampling.encode(x), sampling.encode(x))
    assert torch.equal(sampling.encode_mean(x), vae.encode(x))


def test_save_and_load_pretrained_lazily(vae, tmp_path):
    vae.save_pretrained(tmp_path / "vae")
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    lazy = AutoencoderKL.from_pretrained(tmp_path / "vae", posterior="mean", lazy=True)
    assert not lazy.loaded and lazy.scaling_factor == vae.scaling_factor and lazy.downsampling_factor == 2
    x = images()
    assert torch.equal(lazy.encode(x), vae.encode(x)) and lazy.loaded


def test_train_autoencoder_learns_and_measures_its_scale():
    x = images(16, 8, seed=3)
    auto = train_autoencoder(x, ddconfig=TINY_VAE, steps=30, batch_size=8, lr=3e-3, progress=False)
    untrained = AutoencoderKL.from_config(seed=0, posterior="mean", **TINY_VAE)

    def error(a):
        return (a.decode(a.encode_mean(x)) - x).abs().mean()

    assert error(auto) < error(untrained)
    assert auto.encode_mean(x).std().item() == pytest.approx(1.0, rel=1e-3)  # 1 / std of the latents


def test_foreground_weights_mark_the_pixels_off_the_background():
    x = torch.full((2, 3, 6, 6), -0.8)
    x[0, :, 1:3, 1:3] = torch.tensor([0.7, -0.7, -0.7])[:, None, None]  # a red 2 x 2 square
    x[1, 2, 4, 4] = -0.75                                              # a tiny change: below the threshold
    w = foreground_weights(x, 9.0)
    assert w.shape == (2, 1, 6, 6)
    assert torch.equal(w[0, 0, 1:3, 1:3], torch.full((2, 2), 10.0)) and w[0].sum() == 36 + 4 * 9
    assert torch.equal(w[1], torch.ones(1, 6, 6))


def test_foreground_weight_changes_training_and_is_checked():
    x = images(16, 8, seed=3)
    plain = train_autoencoder(x, ddconfig=TINY_VAE, steps=3, batch_size=4, progress=False)
    weighted = train_autoencoder(x, ddconfig=TINY_VAE, steps=3, batch_size=4, foreground_weight=10.0, progress=False)
    again = train_autoencoder(x, ddconfig=TINY_VAE, steps=3, batch_size=4, foreground_weight=10.0, progress=False)
    assert not torch.equal(plain.encode_mean(x), weighted.encode_mean(x))
    assert torch.equal(weighted.encode_mean(x), again.encode_mean(x))  # seeded: the same weights again
    with pytest.raises(ValueError, match="foreground_weight"):
        train_autoencoder(x, ddconfig=TINY_VAE, steps=1, foreground_weight=-1.0, progress=False)


# ---------------------------------------------------------------------------------------------------------
# latent stages in the cascade


def test_latent_stage_defaults_and_checks(vae):
    st = latent_stage(vae)
    assert st.net_size == 8 and st.image_channels == 3 and st.sampler.threshold == "none"
    assert st.config["autoencoder"]["kind"] == "AutoencoderKL"
    with pytest.raises(ValueError, match="image_size"):
        latent_stage(vae, image_size=15)
    with pytest.raises(ValueError, match="latent_channels"):
        Stage(net(3), ElucidatedDiffusion(), image_size=16, autoencoder=vae)
    with pytest.raises(TypeError, match="autoencoder"):
        Stage(net(4), ElucidatedDiffusion(), image_size=16, autoencoder=object())


def test_latent_stage_trains_a_few_steps_and_samples(vae):
    cascade = Cascade([latent_stage(vae)])
    opt = torch.optim.Adam(cascade.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in cascade.parameters()]
    for step in range(3):
        loss = cascade(images(4, seed=step), text_embeds=embeds(4), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, cascade.parameters()))
    out = cascade.sample(text_embeds=embeds(2), steps=3, seed=0, disable_progress=True)
    assert out.shape == (2, 3, 16, 16) and 0 <= out.min() and out.max() <= 1


def test_precomputed_latents_give_the_same_loss_as_online_encoding(vae):
    cascade = Cascade([latent_stage(vae)])
    x, e = images(4), embeds(4)
    online = cascade(x, text_embeds=e, generator=torch.Generator().manual_seed(7))
    cached = cascade(latents=vae.encode(x), text_embeds=e, generator=torch.Generator().manual_seed(7))
    assert torch.equal(online, cached)
    with pytest.raises(ValueError, match="latents"):
        cascade(latents=vae.encode(images(4, 8)), text_embeds=e)


def test_save_then_load_gives_bit_identical_samples(vae, tmp_path):
    cascade = Cascade([latent_stage(vae), Stage(net(3, True, "sr"), ElucidatedDiffusion(), image_size=32)])
    path = cascade.save(tmp_path / "ckpt")
    loaded = Cascade.from_checkpoint(path)
    assert (tmp_path / "ckpt").exists() and loaded.stages[0].latent and not loaded.stages[1].latent
    kw = {"text_embeds": embeds(2), "steps": 2, "seed": 3, "disable_progress": True}
    assert torch.equal(cascade.sample(**kw), loaded.sample(**kw))


def test_latent_base_then_pixel_sr_samples_end_to_end(vae):
    sr = Stage(net(3, True, "sr"), ElucidatedDiffusion(), image_size=32)
    cascade = Cascade([latent_stage(vae), sr])
    loss = cascade(images(2, 32), text_embeds=embeds(), stage=1)
    assert torch.isfinite(loss)
    base = cascade.sample(text_embeds=embeds(), steps=2, seed=0, stop_at_stage=0, disable_progress=True)
    out = cascade.sample(text_embeds=embeds(), steps=2, seed=0, disable_progress=True)
    assert base.shape == (2, 3, 16, 16) and out.shape == (2, 3, 32, 32)


def test_pixel_base_then_latent_upscaler(vae):
    base = Stage(net(3), ElucidatedDiffusion(), image_size=8)
    cascade = Cascade([base, latent_stage(vae, image_size=16, lowres_cond=True)])
    assert torch.isfinite(cascade(images(2), text_embeds=embeds(), stage=1))
    assert cascade.sample(text_embeds=embeds(), steps=2, seed=0, disable_progress=True).shape == (2, 3, 16, 16)


def test_inpainting_on_a_latent_stage_keeps_the_known_region():
    # The check: with an exact, local autoencoder (2 x 2 pixel blocks as channels) the known latents that
    # RePaint keeps decode to exactly the known pixels; a mask on the 2 px grid maps onto whole latent cells.
    auto = PixelUnshuffle()
    cascade = Cascade([Stage(net(12), ElucidatedDiffusion(), image_size=16, autoencoder=auto)])
    known = (images(1) + 1) / 2
    mask = torch.ones(16, 16, dtype=torch.bool)
    mask[4:12, 2:10] = False  # True = keep; a hole on the 2 px grid
    out = cascade.sample(text_embeds=embeds(1), steps=3, seed=0, disable_progress=True,
                         inpaint=Inpainting(known, mask))
    keep = mask.expand(1, 3, 16, 16)
    torch.testing.assert_close(out[keep], known[keep], atol=1e-5, rtol=0)
    assert (out[~keep] - known[~keep]).abs().mean() > 0.05


def test_inpainting_with_the_diffusers_vae_runs_and_returns_images(vae):
    cascade = Cascade([latent_stage(vae)])
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:, :8] = True
    out = cascade.sample(text_embeds=embeds(1), steps=2, seed=0, disable_progress=True,
                         inpaint=Inpainting((images(1) + 1) / 2, mask))
    assert out.shape == (1, 3, 16, 16)


# ---------------------------------------------------------------------------------------------------------
# configuration, trainer and precached latents


def latent_config(vae_folder) -> dict:
    from tiny_cascade import tiny_config

    config = tiny_config(text=False)
    config["text_embed_dim"] = TEXT_DIM
    stage = config["stages"][0]
    stage.update(image_size=16, autoencoder={"pretrained": str(vae_folder), "posterior": "mean", "lazy": True})
    config["stages"] = [stage]
    return config


def test_config_autoencoder_block_builds_a_latent_stage(vae, tmp_path):
    from imagen_lib.config import ConfigError, build_cascade

    vae.save_pretrained(tmp_path / "vae")
    cascade = build_cascade(latent_config(tmp_path / "vae"))
    st = cascade.stages[0]
    assert st.latent and st.net.channels == 4 and st.sampler.threshold == "none" and not st.autoencoder.loaded
    bad = latent_config(tmp_path / "vae")
    bad["stages"][0]["autoencoder"] = {"posterior": "mean"}
    with pytest.raises((ConfigError, ValueError), match="pretrained"):
        build_cascade(bad)


def test_trainer_steps_on_precached_latents_without_loading_the_vae(vae, tmp_path):
    from imagen_lib.config import build_cascade
    from imagen_lib.training.trainer import Trainer, TrainerSettings

    vae.save_pretrained(tmp_path / "vae")
    cascade = build_cascade(latent_config(tmp_path / "vae"))
    trainer = Trainer(cascade, settings=TrainerSettings(lr=1e-3), cpu=True)
    loss = trainer.train_step(0, {"latents": vae.encode(images(4)), "text_embeds": embeds(4)})
    assert loss == loss and not cascade.stages[0].autoencoder.loaded


def test_precached_folder_latents_match_online_encoding(vae, tmp_path):
    from PIL import Image

    from imagen_lib.data.collate import collate_image_text
    from imagen_lib.data.folder import ImageTextFolder
    from imagen_lib.data.precache_latents import precache_folder_latents

    root = tmp_path / "data"
    root.mkdir()
    for i in range(3):
        array = ((images(1, 20, seed=i)[0].permute(1, 2, 0) + 1) * 127.5).byte().numpy()
        Image.fromarray(array).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text("a red circle")
    folder = ImageTextFolder(root, image_size=16, min_size=1)
    store = precache_folder_latents(vae, folder, tmp_path / "latents", batch_size=2, progress=False)
    data = ImageTextFolder(root, image_size=16, min_size=1, latents=store.folder)
    batch = collate_image_text([data[i] for i in range(3)])
    torch.testing.assert_close(batch["latents"], vae.encode(batch["images"]), rtol=1e-5, atol=1e-6)
    cascade = Cascade([latent_stage(vae)])
    e = embeds(3)
    online = cascade(batch["images"], text_embeds=e, generator=torch.Generator().manual_seed(0))
    cached = cascade(latents=batch["latents"], text_embeds=e, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(online, cached, rtol=1e-5, atol=1e-6)


def test_precached_shards_carry_latents(vae, tmp_path):
    from PIL import Image

    from imagen_lib.data.precache import precache_shards
    from imagen_lib.data.shards import ShardDataset, write_shards

    samples = []
    for i in range(3):
        buffer = io.BytesIO()
        Image.fromarray(((images(1, 16, seed=i)[0].permute(1, 2, 0) + 1) * 127.5).byte().numpy()).save(buffer, "png")
        samples.append({"__key__": f"s{i}", "png": buffer.getvalue(), "txt": "a red circle"})
    inputs = write_shards(samples, str(tmp_path / "in"), samples_per_shard=8)
    urls = precache_shards(None, inputs, str(tmp_path / "out"), progress=False, latents=(vae, 16))
    items = list(ShardDataset(urls, 16, text="texts", shuffle_shards=False, shuffle_buffer=1))
    assert len(items) == 3
    for item in items:
        torch.testing.assert_close(item["latents"], vae.encode(item["images"][None])[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# examples/sd.yaml: seed 003's configuration in the library's names


SD_YAML = Path(__file__).resolve().parents[1] / "examples" / "sd.yaml"
# --set overrides that shrink examples/sd.yaml to a tiny random CLIP, VAE (f = 2) and SD-design U-Net; the
# blocks' other fields (kinds, layer, schedule, text conditioning) stay the file's
TINY_SD = [
    "text_encoder.name_or_path=null",
    "text_encoder.build_tiny={hidden_size: 32, intermediate_size: 64, num_attention_heads: 4, projection_dim: 32}",
    "stages.0.image_size=16",
    "stages.0.autoencoder.pretrained=null", "stages.0.autoencoder.subfolder=null",
    f"stages.0.autoencoder.config={TINY_VAE}",
    "stages.0.network.config.embed_dim=32", "stages.0.network.config.image_size=8",
    "stages.0.network.config.channel_mult=[1, 2, 2]", "stages.0.network.config.num_res_blocks=1",
    "stages.0.network.config.cond_dim=null",
    "stages.0.network.config.attention_levels=[true, true, false]", "stages.0.network.config.per_head_channels=16",
]


def test_sd_yaml_network_block_is_the_published_sd_v2_unet():
    from imagen_lib.config import build_network, load_config, parse_config
    from imagen_lib.nn import presets

    stage = parse_config(load_config(SD_YAML)).stages[0]
    net = build_network(stage.network, text_embed_dim=1024, lowres_cond=False, channels=4, device="meta")
    assert sum(p.numel() for p in net.parameters()) == presets.PUBLISHED_SIZES["sd-v2"]
    assert stage.image_size // 8 == net.config.image_size


def test_sd_yaml_builds_a_clip_latent_stage_on_the_discrete_schedule():
    from imagen_lib.config import apply_overrides, build_cascade, load_config
    from imagen_lib.diffusion import DiscreteDiffusion
    from imagen_lib.text_clip import CLIPTextEncoder

    cascade = build_cascade(apply_overrides(load_config(SD_YAML), TINY_SD))
    encoder, stage = cascade.text_encoder, cascade.stages[0]
    assert isinstance(encoder, CLIPTextEncoder) and (encoder.layer, encoder.max_length) == ("penultimate", 77)
    embeds, mask = encoder.encode(["a red circle", "a photograph of an astronaut riding a horse"])
    assert embeds.shape == (2, 77, encoder.embed_dim) and mask.all()  # SD attends all 77 tokens
    assert stage.latent and stage.net_size == 8 and stage.net.channels == stage.autoencoder.latent_channels == 4
    config = stage.net.config
    assert (config.attention_type, config.text_conditioning, config.timestep_embedding) == (
        "spatial_transformer", "raw", True)
    assert config.text_embed_dim == encoder.embed_dim and not config.gradient_checkpointing
    assert isinstance(stage.diffusion, DiscreteDiffusion)
    assert (stage.diffusion.parameterization, stage.diffusion.timestep_cond) == ("eps", "raw")
    assert (stage.sampler.sampler, stage.sampler.steps, stage.sampler.threshold) == ("ddim", 50, "none")

    seen = []  # the U-Net gets SD's raw timesteps (0 .. 999), not t / 1000
    stage.net.register_forward_pre_hook(lambda module, args: seen.append(args[1].detach().clone()))
    t = torch.tensor([999, 500])
    loss = stage.diffusion.loss(stage.net, stage.autoencoder.encode(images(2)), t=t, text_embeds=embeds,
                                generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and torch.equal(seen[0], t.float())
    out = cascade.sample(["a red circle"], steps=2, seed=0, disable_progress=True)
    assert out.shape == (1, 3, 16, 16)
