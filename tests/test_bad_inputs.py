"""Every bad input of issue 23 (items 7 and 8) that reaches the cascade, its sampling options, the samplers,
guidance, the text encoder, the configuration and ``imagen-lib sample``: each row is a call, the exception it
must raise (a ValueError for a value out of range, a TypeError for one of the wrong kind) and a regex that the
message must match, which starts with the argument's (or config key's) name."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tiny_cascade import T5_KWARGS, TEXT_DIM, images, tiny_cascade, tiny_config

from imagen_lib.cascade import Inpainting, SamplerSettings, StartImages
from imagen_lib.config import (
    ConfigError,
    apply_overrides,
    build_cascade,
    build_text_encoder,
    parse_config,
    sample_settings,
)
from imagen_lib.diffusion import guidance, samplers
from imagen_lib.diffusion.schedules import karras_sigmas
from imagen_lib.text import T5TextEncoder
from imagen_lib.validation import ArgumentTypeError

NAN, INF = math.nan, math.inf


def _encoder(texts):
    """A stand-in text encoder: one non-zero token per caption."""
    embeds = torch.zeros(len(texts), 4, TEXT_DIM)
    embeds[:, 0] = 1.0
    return embeds, embeds.abs().amax(-1) > 0


@pytest.fixture(scope="module")
def ctx():
    cascade = tiny_cascade().using(text_encoder=_encoder)
    x = torch.randn(2, 3, 4, 4)
    return SimpleNamespace(cascade=cascade, x=x, grid=karras_sigmas(3), den=lambda x, sigma: x * 0)


def _with(**changes):
    """A 16 px image batch in [-1, 1] with some pixels changed."""
    batch = images(2, 16)
    for index, value in changes.items():
        batch.view(-1)[int(index[1:])] = value
    return batch


def _embeds(value=0.5, dtype=torch.float32, width=TEXT_DIM):
    return torch.full((2, 4, width), value, dtype=dtype)


def _sample(c, **kwargs):
    return c.cascade.sample(kwargs.pop("texts", ["a", "b"]), disable_progress=True, steps=1, **kwargs)


def _train(c, batch=None, **kwargs):
    return c.cascade(images(2, 16) if batch is None else batch, **{"texts": ["a", "b"], **kwargs})


def _config(*sets):
    return apply_overrides(tiny_config(text=False), list(sets))


ROWS = [
    # Cascade.forward: training images
    ("forward empty batch", lambda c: _train(c, torch.zeros(0, 3, 16, 16), texts=[]), ValueError,
     r"^images: expected a non-empty \(B, 3, H, W\)"),
    ("forward NaN pixel", lambda c: _train(c, _with(i5=NAN)), ValueError,
     r"^images: expected finite values, got 1 NaN"),
    ("forward Inf pixel", lambda c: _train(c, _with(i7=INF)), ValueError, r"^images: expected finite values"),
    ("forward [0, 255] images", lambda c: _train(c, images(2, 16) * 127 + 128), ValueError,
     r"^images: expected values in \[-1, 1\].*divide by 255"),
    ("forward uint8 images", lambda c: _train(c, torch.zeros(2, 3, 16, 16, dtype=torch.uint8)), TypeError,
     r"^images: expected a floating-point tensor.*divide by 255"),
    ("forward 3-D images", lambda c: _train(c, torch.zeros(3, 16, 16)), ValueError, r"^images: .*\(B, 3, H, W\)"),
    ("forward wrong channels", lambda c: _train(c, torch.zeros(2, 1, 16, 16)), ValueError,
     r"^images: .*\(B, 3, H, W\)"),
    ("forward images a list", lambda c: _train(c, [[0.0]]), TypeError, r"^images: "),
    ("forward stage out of range", lambda c: _train(c, stage=5), ValueError,
     r"^stage: expected a stage index in \[0, 1\], got 5"),
    ("forward stage a string", lambda c: _train(c, stage="0"), TypeError, r"^stage: "),
    ("forward text_embeds NaN", lambda c: _train(c, texts=None, text_embeds=_embeds(NAN)), ValueError,
     r"^text_embeds: expected finite values"),
    ("forward text_embeds ints", lambda c: _train(c, texts=None, text_embeds=_embeds(1, torch.long)), TypeError,
     r"^text_embeds: expected a float \(B, N, 32\) tensor"),
    ("forward text_embeds width", lambda c: _train(c, texts=None, text_embeds=_embeds(width=5)), ValueError,
     r"^text_embeds: expected a non-empty \(B, N, 32\) tensor, got shape \(2, 4, 5\)"),
    ("forward text_mask float", lambda c: _train(c, texts=None, text_embeds=_embeds(), text_mask=torch.ones(2, 4)),
     TypeError, r"^text_mask: expected a bool tensor"),
    ("forward text_mask shape", lambda c: _train(c, texts=None, text_embeds=_embeds(),
                                                 text_mask=torch.ones(2, 3, dtype=torch.bool)),
     ValueError, r"^text_mask: expected shape \(2, 4\)"),
    ("forward text_mask alone", lambda c: _train(c, text_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError,
     r"^text_mask: given without text_embeds"),
    ("forward texts and embeds", lambda c: _train(c, text_embeds=_embeds()), ValueError, r"^texts, text_embeds: "),
    ("forward texts not strings", lambda c: _train(c, texts=[1, 2]), TypeError, r"^texts: "),
    ("forward texts too few", lambda c: _train(c, texts=["a"]), ValueError, r"^text_embeds: expected 2 rows"),
    # Cascade.sample and condition
    ("sample texts empty", lambda c: _sample(c, texts=[]), ValueError, r"^texts: expected a non-empty list"),
    ("sample texts not strings", lambda c: _sample(c, texts=[b"a"]), TypeError, r"^texts: "),
    ("sample text_embeds NaN", lambda c: _sample(c, texts=None, text_embeds=_embeds(NAN)), ValueError,
     r"^text_embeds: expected finite values"),
    ("sample text_embeds Inf", lambda c: _sample(c, texts=None, text_embeds=_embeds(INF)), ValueError,
     r"^text_embeds: expected finite values"),
    ("sample text_embeds empty", lambda c: _sample(c, texts=None, text_embeds=torch.zeros(0, 4, TEXT_DIM)),
     ValueError, r"^text_embeds: expected a non-empty"),
    ("sample text_mask ints", lambda c: _sample(c, texts=None, text_embeds=_embeds(),
                                                text_mask=torch.ones(2, 4, dtype=torch.long)),
     TypeError, r"^text_mask: expected a bool tensor"),
    ("condition batch 0", lambda c: c.cascade.condition(0, ["a"]), ValueError, r"^batch: expected an int >= 1"),
    ("sample cond_scale NaN", lambda c: _sample(c, cond_scale=NAN), ValueError,
     r"^cond_scale: expected a finite number, got nan"),
    ("sample cond_scale Inf", lambda c: _sample(c, cond_scale=INF), ValueError, r"^cond_scale: expected a finite"),
    ("sample cond_scale string", lambda c: _sample(c, cond_scale="3"), TypeError, r"^cond_scale: "),
    ("sample seed 2**70", lambda c: _sample(c, seed=2**70), ValueError, r"^seed: expected an int >= 0 and <= "),
    ("sample seed negative", lambda c: _sample(c, seed=-1), ValueError, r"^seed: expected an int >= 0"),
    ("sample seed + image past 2**63", lambda c: _sample(c, seed=2**63 - 1), ValueError,
     r"^seed: expected an int <= 2\*\*63 - 2"),
    ("sample seed a string", lambda c: _sample(c, seed="0"), TypeError, r"^seed: "),
    ("sample zero images per prompt", lambda c: _sample(c, num_images_per_prompt=0), ValueError,
     r"^num_images_per_prompt: expected an int >= 1"),
    ("sample fractional images per prompt", lambda c: _sample(c, num_images_per_prompt=1.5), TypeError,
     r"^num_images_per_prompt: "),
    ("sample stop_at_stage out of range", lambda c: _sample(c, stop_at_stage=2), ValueError,
     r"^stop_at_stage: expected a stage index in \[0, 1\], got 2"),
    ("sample stage_overrides missing stage", lambda c: _sample(c, stage_overrides={5: {"steps": 2}}), ValueError,
     r"^stage_overrides: stage 5 does not exist; expected stage indices in \[0, 1\]"),
    ("sample stage_overrides negative stage", lambda c: _sample(c, stage_overrides={-1: {}}), ValueError,
     r"^stage_overrides: stage -1 does not exist"),
    ("sample stage_overrides bad value", lambda c: _sample(c, stage_overrides={1: {"steps": 0}}), ValueError,
     r"^stage_overrides\[1\]: steps: expected an int >= 1"),
    ("sample stage_overrides not settings", lambda c: _sample(c, stage_overrides={0: 3}), TypeError,
     r"(?s)^stage_overrides: .*value int 3 not"),
    ("sample DDIM eta=-1", lambda c: _sample(c, sampler="ddim", options={"eta": -1}), ValueError,
     r"^options\.eta: expected a finite number >= 0, got -1"),
    ("sample unknown sampler", lambda c: _sample(c, sampler="plms"), ValueError, r"^sampler: expected one of"),
    ("sample guidance_rescale 2", lambda c: _sample(c, guidance_rescale=2), ValueError, r"^guidance_rescale: "),
    ("sample threshold name", lambda c: _sample(c, threshold="soft"), ValueError,
     r"^threshold: expected 'dynamic', 'static' or 'none'"),
    ("sample lowres_aug_level 2", lambda c: _sample(c, lowres_aug_level=2.0), ValueError, r"^lowres_aug_level: "),
    ("sample return_pil a string", lambda c: _sample(c, return_pil="yes"), TypeError, r"^return_pil: "),
    ("sample start stage past the end", lambda c: _sample(c, start=StartImages(torch.rand(2, 3, 8, 8), stage=4)),
     ValueError, r"^start\.stage: expected a stage index in \[0, 1\]"),
    ("sample start channels", lambda c: _sample(c, start=StartImages(torch.rand(2, 1, 8, 8))), ValueError,
     r"^start\.images: expected \(B, 3, H, W\)"),
    ("sample start rows", lambda c: _sample(c, start=StartImages(torch.rand(3, 3, 8, 8))), ValueError,
     r"^start\.images: expected 2 \(one per prompt\) or 2 rows"),
    ("sample inpaint channels", lambda c: _sample(c, inpaint=Inpainting(torch.rand(2, 4, 16, 16),
                                                                         torch.ones(16, 16, dtype=torch.bool))),
     ValueError, r"^inpaint\.images: expected \(B, 3, H, W\)"),
    # StartImages and Inpainting
    ("start images NaN", lambda c: StartImages(torch.full((1, 3, 4, 4), NAN)), ValueError,
     r"^images: expected finite values"),
    ("start images [0, 255]", lambda c: StartImages(torch.full((1, 3, 4, 4), 200.0)), ValueError,
     r"^images: expected values in \[0, 1\], got values in \[200, 200\] \(8-bit pixels\? divide by 255\)"),
    ("start images [-1, 1]", lambda c: StartImages(torch.full((1, 3, 4, 4), -1.0)), ValueError,
     r"^images: expected values in \[0, 1\]"),
    ("start images uint8", lambda c: StartImages(torch.zeros(1, 3, 4, 4, dtype=torch.uint8)), TypeError,
     r"^images: expected a floating-point tensor in \[0, 1\].*divide by 255"),
    ("start images 3-D", lambda c: StartImages(torch.zeros(3, 4, 4)), ValueError, r"^images: expected a non-empty"),
    ("start images missing", lambda c: StartImages(None), ValueError, r"^images: missing"),
    ("start stage 0", lambda c: StartImages(torch.zeros(1, 3, 4, 4), stage=0), ValueError, r"^stage: "),
    ("inpaint 5-D mask", lambda c: Inpainting(torch.rand(1, 3, 4, 4), torch.ones(1, 1, 1, 4, 4, dtype=torch.bool)),
     ValueError, r"^masks: expected a bool tensor with 2 or 3 or 4 dimensions"),
    ("inpaint float mask", lambda c: Inpainting(torch.rand(1, 3, 4, 4), torch.ones(4, 4)), TypeError,
     r"^masks: expected a bool tensor"),
    ("inpaint two-channel mask", lambda c: Inpainting(torch.rand(1, 3, 4, 4), torch.ones(1, 2, 4, 4).bool()),
     ValueError, r"^masks: expected \(B, 1, H, W\)"),
    ("inpaint images Inf", lambda c: Inpainting(torch.full((1, 3, 4, 4), INF), torch.ones(4, 4).bool()), ValueError,
     r"^images: expected finite values"),
    ("inpaint images [0, 255]", lambda c: Inpainting(torch.full((1, 3, 4, 4), 255.0), torch.ones(4, 4).bool()),
     ValueError, r"^images: expected values in \[0, 1\].*divide by 255"),
    # SamplerSettings
    ("settings steps 0", lambda c: SamplerSettings(steps=0), ValueError, r"^steps: expected an int >= 1"),
    ("settings steps 2.5", lambda c: SamplerSettings(steps=2.5), ValueError, r"^steps: expected a whole number"),
    ("settings steps string", lambda c: SamplerSettings(steps="3"), TypeError, r"^steps: expected an int"),
    ("settings cond_scale NaN", lambda c: SamplerSettings(cond_scale=NAN), ValueError, r"^cond_scale: "),
    ("settings eta=-1", lambda c: SamplerSettings(sampler="ddim", options={"eta": -1}), ValueError,
     r"^options\.eta: expected a finite number >= 0"),
    ("settings euler_ancestral s_noise NaN", lambda c: SamplerSettings(options={"s_noise": NAN}), ValueError,
     r"^options\.s_noise: "),
    ("settings option of another sampler", lambda c: SamplerSettings(sampler="heun", options={"eta": 0.5}),
     ValueError, r"^options\.eta: not one of the 'heun' sampler's options"),
    ("settings unknown option", lambda c: SamplerSettings(options={"foo": 1}), ValueError, r"^options\.foo: "),
    ("settings reserved option", lambda c: SamplerSettings(options={"generator": None}), ValueError,
     r"^options\.generator: "),
    ("settings options not a mapping", lambda c: SamplerSettings(options=3), TypeError, r"^options: "),
    ("settings guidance_rescale NaN", lambda c: SamplerSettings(guidance_rescale=NAN), ValueError,
     r"^guidance_rescale: "),
    ("settings threshold_percentile 0", lambda c: SamplerSettings(threshold_percentile=0), ValueError,
     r"^threshold_percentile: expected a finite number > 0 and <= 1"),
    ("settings threshold_max 0.5", lambda c: SamplerSettings(threshold_max=0.5), ValueError, r"^threshold_max: "),
    ("settings lowres_aug_level -1", lambda c: SamplerSettings(lowres_aug_level=-1), ValueError,
     r"^lowres_aug_level: "),
    ("settings sampler not a name", lambda c: SamplerSettings(sampler=3), TypeError, r"^sampler: "),
    ("settings replace unknown field", lambda c: SamplerSettings().replace(stepz=3), ValueError,
     r"^sampler settings: unknown field\(s\) \['stepz'\]"),
    # the samplers called directly
    ("ddim eta=-1", lambda c: samplers.sample_ddim(c.den, c.x, c.grid, eta=-1), ValueError,
     r"^eta: expected a finite number >= 0, got -1"),
    ("euler_ancestral s_noise -1", lambda c: samplers.sample_euler_ancestral(c.den, c.x, c.grid, s_noise=-1),
     ValueError, r"^s_noise: "),
    ("heun S_churn NaN", lambda c: samplers.sample_heun(c.den, c.x, c.grid, S_churn=NAN), ValueError, r"^S_churn: "),
    ("euler S_tmax negative", lambda c: samplers.sample_euler(c.den, c.x, c.grid, S_tmax=-1), ValueError,
     r"^S_tmax: expected a number >= 0"),
    ("dpmpp_2m x NaN", lambda c: samplers.sample_dpmpp_2m(c.den, c.x * NAN, c.grid), ValueError,
     r"^x: expected finite values"),
    ("euler denoiser not callable", lambda c: samplers.sample_euler(3, c.x, c.grid), TypeError, r"^denoiser: "),
    ("heun generator a string", lambda c: samplers.sample_heun(c.den, c.x, c.grid, generator="seed"), TypeError,
     r"^generator: "),
    ("ddim sigmas strings", lambda c: samplers.sample_ddim(c.den, c.x, "abc"), TypeError, r"^sigmas: "),
    ("heun second_order a string", lambda c: samplers.sample_heun(c.den, c.x, c.grid, second_order="no"),
     TypeError, r"^second_order: "),
    # guidance
    ("guidance cond_scale NaN", lambda c: guidance.classifier_free_guidance(c.den, NAN), ValueError,
     r"^cond_scale: expected a finite number"),
    ("guidance rescale NaN", lambda c: guidance.classifier_free_guidance(c.den, 3.0, NAN), ValueError,
     r"^rescale: "),
    ("threshold percentile 2", lambda c: guidance.thresholded(c.den, "dynamic", percentile=2), ValueError,
     r"^percentile: expected a value in \(0, 1\]"),
    ("threshold max NaN", lambda c: guidance.dynamic_threshold(c.x, max_value=NAN), ValueError, r"^max_value: "),
    ("inpaint resample_times 0", lambda c: guidance.inpaint(samplers.sample_euler, c.den, c.x, c.grid, images=c.x,
                                                            masks=torch.ones(4, 4).bool(), resample_times=0),
     ValueError, r"^resample_times: expected an int >= 1"),
    ("inpaint jump_length 1.5", lambda c: guidance.inpaint(samplers.sample_euler, c.den, c.x, c.grid, images=c.x,
                                                           masks=torch.ones(4, 4).bool(), jump_length=1.5),
     ValueError, r"^jump_length: expected a whole number"),
    ("inpaint images NaN", lambda c: guidance.inpaint(samplers.sample_euler, c.den, c.x, c.grid, images=c.x * NAN,
                                                      masks=torch.ones(4, 4).bool()),
     ValueError, r"^images: expected finite values"),
    # the text encoder
    ("build_tiny d_model 0", lambda c: T5TextEncoder.build_tiny(**{**T5_KWARGS, "d_model": 0}), ValueError,
     r"^t5_config\.d_model: expected an int >= 1"),
    ("build_tiny unknown field", lambda c: T5TextEncoder.build_tiny(foo=1), ValueError,
     r"^t5_config\.foo: not a T5Config field"),
    ("build_tiny max_length a string", lambda c: T5TextEncoder.build_tiny(max_length="abc"), TypeError,
     r"^max_length: expected an int"),
    # configuration values (a config in the form examples/ and the CLI read)
    ("config steps a string", lambda c: parse_config(_config("stages.0.train.steps=abc")), ConfigError,
     r"^stages\.0\.train\.steps: expected an int, got 'abc'"),
    ("config block a string", lambda c: parse_config(_config("stages.0.train=abc")), ConfigError,
     r"^stages\.0\.train: expected a mapping with some of the keys"),
    ("config stage a string", lambda c: parse_config(_config("stages.1=abc")), ConfigError,
     r"^stages\.1: expected a mapping"),
    ("config sampler block a list", lambda c: parse_config(_config("stages.0.sampler=[1]")), ConfigError,
     r"^stages\.0\.sampler: expected a mapping"),
    ("config cond_scale NaN", lambda c: parse_config(_config("stages.0.sampler.cond_scale=.nan")), ConfigError,
     r"^stages\.0\.sampler\.cond_scale: expected a finite number"),
    ("config DDIM eta=-1", lambda c: parse_config(_config("stages.0.sampler.sampler=ddim",
                                                          "stages.0.sampler.options={eta: -1}")),
     ConfigError, r"^stages\.0\.sampler\.options\.eta: expected a finite number >= 0"),
    ("config random_crop_size too big", lambda c: build_cascade(_config("stages.0.random_crop_size=100")),
     ConfigError, r"^stages\.0\.random_crop_size: "),
    ("config diffusion value", lambda c: build_cascade(_config("stages.0.diffusion.config={sigma_data: -1}")),
     ConfigError, r"^stages\.0\.diffusion\.config: sigma_data"),
    ("config sample seed negative", lambda c: sample_settings(_config("sample.seed=-5")), ConfigError,
     r"^sample\.seed: expected an int >= 0"),
    ("config seed negative", lambda c: parse_config(_config("seed=-1")), ConfigError, r"^seed: expected an int >= 0"),
    ("config data seed 2**70", lambda c: parse_config(_config(f"data.seed={2**70}")), ConfigError,
     r"^data\.seed: expected an int >= 0"),
    ("config T5 seed negative", lambda c: parse_config({**_config(), "text_encoder": {"build_tiny": {}, "seed": -1}}),
     ConfigError, r"^text_encoder\.seed: expected an int >= 0"),
    ("config T5 field a string", lambda c: build_text_encoder({"build_tiny": {**T5_KWARGS, "d_model": "abc"}}),
     ConfigError, r"^text_encoder\.build_tiny\.d_model: expected an int"),
    ("config T5 unknown field", lambda c: build_text_encoder({"build_tiny": {"foo": 1}}), ConfigError,
     r"^text_encoder\.build_tiny\.foo: not a T5Config field"),
]


@pytest.mark.parametrize("call, error, pattern", [pytest.param(*row[1:], id=row[0]) for row in ROWS])
def test_bad_input_names_the_argument(ctx, call, error, pattern):
    with pytest.raises(error, match=pattern) as raised:
        call(ctx)
    assert isinstance(raised.value, (ValueError, TypeError))


def test_rows_have_unique_names():
    names = [row[0] for row in ROWS]
    assert len(names) == len(set(names))


def test_type_violations_are_type_errors_that_name_the_parameter(ctx):
    """beartype's violations on the public API are TypeErrors (ArgumentTypeError), message first the name."""
    for call in (lambda: ctx.cascade.sample(["a"], seed="0"), lambda: ctx.cascade(images(2, 16), stage="0"),
                 lambda: samplers.sample_heun(ctx.den, ctx.x, ctx.grid, callback=3)):
        with pytest.raises(TypeError) as raised:
            call()
        assert isinstance(raised.value, ArgumentTypeError)
        assert raised.value.args[0].split(":")[0] in ("seed", "stage", "callback")


def test_text_encoder_encode_refuses_non_strings():
    enc = T5TextEncoder.build_tiny(**T5_KWARGS, max_length=8)
    with pytest.raises(TypeError, match=r"^texts: "):
        enc.encode([1, 2])
    with pytest.raises(TypeError, match=r"^texts: expected a non-empty list of strings"):
        enc.encode("a single string")
    with pytest.raises(ValueError, match=r"^texts: expected a non-empty list of strings, got an empty one"):
        enc.encode([])
    with pytest.raises(TypeError, match=r"^model: "):
        enc.encode(["a"], model="ema")


@pytest.mark.parametrize("flag, value, pattern", [
    ("--seed", "-1", r"^--seed: expected an int >= 0"),
    ("--seed", str(2**70), r"^--seed: "),
    ("--num-images-per-prompt", "0", r"^--num-images-per-prompt: expected an int >= 1"),
    ("--batch-size", "0", r"^--batch-size: "),
    ("--steps", "0", r"^--steps: "),
    ("--cond-scale", "nan", r"^--cond-scale: expected a finite number"),
])
def test_sample_command_checks_its_options_before_loading(tmp_path, flag, value, pattern):
    from imagen_lib.cli import main

    missing = tmp_path / "no-checkpoint"  # never opened: the options fail first
    with pytest.raises(ValueError, match=pattern):
        main(["sample", str(missing), "--prompt", "a", "--out", str(tmp_path / "out"), flag, value])


def test_valid_calls_still_pass(ctx):
    """The checks refuse only bad inputs: the boundary values themselves are accepted."""
    assert ctx.cascade(images(2, 16).clamp(-1, 1), texts=["a", "b"], stage=1).isfinite()
    out = _sample(ctx, seed=2**63 - 2, cond_scale=1, stage_overrides={1: SamplerSettings(steps=1)},
                  start=StartImages(torch.ones(2, 3, 8, 8)), inpaint=Inpainting(torch.zeros(2, 3, 16, 16),
                                                                               torch.zeros(2, 16, 16).bool()))
    assert out.shape == (2, 3, 16, 16)
    assert SamplerSettings(steps=4.0, options={"S_tmax": INF, "S_churn": 0}, sampler="heun").steps == 4
    assert samplers.sample_ddim(ctx.den, ctx.x, [2.0, 1.0, 0.0], eta=0).shape == ctx.x.shape
    assert sample_settings(_config("sample.seed=0"))["seed"] == 0
