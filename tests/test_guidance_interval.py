"""Guidance in a limited interval (Kynkaanniemi et al. 2024): the wrapper equals plain CFG when the interval
covers every sigma and the conditional denoiser when it covers none, runs the network once on the single batch
per call outside it, under every diffusion process and several samplers; the setting's checks and its trips
through SamplerSettings, the config, checkpoints and the CLI."""

import json

import pytest
import torch
from tiny_cascade import perturbed_checkpoint, tiny_cascade, tiny_config

from imagen_lib.cascade import Cascade, SamplerSettings
from imagen_lib.cli import main
from imagen_lib.config import build_cascade
from imagen_lib.diffusion import DiscreteDiffusion, ElucidatedDiffusion, GaussianDiffusionContinuous
from imagen_lib.diffusion.guidance import check_guidance_interval, classifier_free_guidance, guidance_interval
from imagen_lib.diffusion.samplers import get_sampler
from imagen_lib.sampling_options import guided_denoiser

PROCESSES = [ElucidatedDiffusion(), GaussianDiffusionContinuous(), DiscreteDiffusion()]


class RecordingNet(torch.nn.Module):
    """A stand-in network whose output depends on x, the noise level and the text; it records each call's batch."""

    channels, lowres_cond, text_embed_dim, config = 3, False, 4, {}

    def __init__(self, shift: float = 0.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(0.7 + shift))
        self.batches = []

    def forward(self, x, noise_cond, *, text_embeds=None, text_mask=None, lowres_img=None, lowres_noise_cond=None):
        self.batches.append(x.shape[0])
        shape = (-1,) + (1,) * (x.ndim - 1)
        out = torch.tanh(self.weight * x) + 0.1 * noise_cond.reshape(shape)
        if text_embeds is not None:
            out = out + 0.2 * (text_embeds * text_mask[..., None]).sum((1, 2)).reshape(shape)
        return out


def text_kwargs(batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"text_embeds": torch.randn(batch, 3, 4, generator=g), "text_mask": torch.ones(batch, 3, dtype=torch.bool)}


def run_sampler(process, net, settings, sampler="euler", steps=6, guide=None):
    """Sample with the stage denoiser built as the cascade builds it; returns the images and the sigmas seen."""
    den = guided_denoiser(process, net, settings.replace(threshold="none"), text_kwargs(), guide)
    seen = []

    def spy(x, sigma):
        seen.append(float(sigma[0]))
        return den(x, sigma)

    sigmas = process.sigmas(steps)
    x = process.initial_noise((2, 3, 4, 4), sigmas, torch.Generator().manual_seed(0))
    out = get_sampler(sampler)(spy, x, sigmas, generator=torch.Generator().manual_seed(1), disable_progress=True)
    return out, seen


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "euler_ancestral"])
def test_interval_covering_all_is_cfg_and_covering_none_is_the_conditional_denoiser(process, sampler):
    net = RecordingNet()
    guided, _ = run_sampler(process, net, SamplerSettings(cond_scale=3.0), sampler)
    assert set(net.batches) == {4}  # plain CFG: the doubled batch at every call
    net.batches.clear()
    everywhere, _ = run_sampler(process, net, SamplerSettings(cond_scale=3.0, guidance_interval=(0.0, 1e4)), sampler)
    assert torch.equal(everywhere, guided) and set(net.batches) == {4}
    net.batches.clear()
    nowhere, _ = run_sampler(process, net, SamplerSettings(cond_scale=3.0, guidance_interval=(1e4, 1e5)), sampler)
    conditional, _ = run_sampler(process, RecordingNet(), SamplerSettings(cond_scale=1.0), sampler)
    assert torch.equal(nowhere, conditional)
    assert set(net.batches) == {2}  # one network evaluation of the single batch per call
    assert not torch.equal(guided, conditional)


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m"])
def test_the_doubled_pass_runs_exactly_at_the_sigmas_inside_the_interval(process, sampler):
    grid = process.sigmas(8)
    lo, hi = float(grid[5]), float(grid[2])  # the samplers' own VE levels, whatever the process
    net = RecordingNet()
    _, seen = run_sampler(process, net, SamplerSettings(cond_scale=3.0, guidance_interval=(lo, hi)), sampler, 8)
    lo32, hi32 = (float(torch.tensor(v, dtype=torch.float32)) for v in (lo, hi))  # samplers call in float32
    inside = [lo32 <= s <= hi32 for s in seen]
    assert 0 < sum(inside) < len(seen)
    assert net.batches == [4 if i else 2 for i in inside]


def test_rows_straddling_the_interval_take_their_own_denoiser():
    calls = []

    def conditional(x, sigma):
        calls.append("cond")
        return x * 0 + 1.0

    def guided(x, sigma):
        calls.append("guided")
        return x * 0 + 5.0

    den = guidance_interval(guided, conditional, 0.5, 2.0)
    x = torch.zeros(3, 1, 2, 2)
    out = den(x, torch.tensor([0.1, 1.0, 3.0]))
    assert out[:, 0, 0, 0].tolist() == [1.0, 5.0, 1.0]
    assert sorted(calls) == ["cond", "guided"]
    calls.clear()
    assert torch.equal(den(x, torch.tensor(2.0)), x * 0 + 5.0) and calls == ["guided"]  # both ends belong to it
    calls.clear()
    assert torch.equal(den(x, torch.tensor(0.4)), x * 0 + 1.0) and calls == ["cond"]
    with pytest.raises(ValueError, match=r"^sigma_lo, sigma_hi: expected sigma_lo <= sigma_hi, got 2.0, 1.0"):
        guidance_interval(guided, conditional, 2.0, 1.0)
    with pytest.raises(ValueError, match=r"^sigma_hi: expected a finite number >= 0"):
        guidance_interval(guided, conditional, 0.0, float("inf"))
    with pytest.raises(TypeError, match=r"^conditional: expected a callable denoiser"):
        guidance_interval(guided, None, 0.0, 1.0)


def test_interval_wrapper_equals_cfg_inside():
    def doubled(x, sigma):
        offset = torch.cat([torch.full((x.shape[0] // 2,), 0.3), torch.full((x.shape[0] // 2,), -1.0)])
        return x * sigma.reshape(-1, 1) + offset.reshape(-1, 1)

    cfg = classifier_free_guidance(doubled, 4.0)
    den = guidance_interval(cfg, lambda x, s: doubled(torch.cat([x, x]), torch.cat([s, s]))[: x.shape[0]], 0.0, 1.0)
    x = torch.randn(2, 5)
    assert torch.equal(den(x, torch.tensor([0.5, 0.5])), cfg(x, torch.tensor([0.5, 0.5])))


@pytest.mark.parametrize("value, pattern", [
    ((2.0, 1.0), r"^guidance_interval: expected sigma_lo <= sigma_hi, got \(2.0, 1.0\)"),
    ((0.1, float("inf")), r"^guidance_interval\[1\]: expected a finite number >= 0"),
    ((float("nan"), 1.0), r"^guidance_interval\[0\]: expected a finite number"),
    ((-0.1, 1.0), r"^guidance_interval\[0\]: expected a finite number >= 0"),
    ((0.1, 1.0, 2.0), r"^guidance_interval: expected None or two noise levels"),
    ("0.1,1", r"^guidance_interval: expected None or two noise levels"),
    (0.5, r"^guidance_interval: expected None or two noise levels"),
])
def test_bad_intervals_name_the_field(value, pattern):
    with pytest.raises(ValueError, match=pattern):
        SamplerSettings(guidance_interval=value)


def test_interval_round_trips_through_settings_config_and_checkpoint(tmp_path):
    settings = SamplerSettings(guidance_interval=[0.25, 5])
    assert settings.guidance_interval == (0.25, 5.0)
    again = SamplerSettings(**json.loads(json.dumps(settings.config)))
    assert again == settings
    assert check_guidance_interval("x", None) is None
    config = tiny_config(text=False)
    config["text_embed_dim"] = 32
    config["stages"][0]["sampler"]["guidance_interval"] = [0.3, 5.0]
    cascade = build_cascade(config)
    assert cascade.stages[0].sampler.guidance_interval == (0.3, 5.0)
    loaded = Cascade.from_checkpoint(cascade.save(tmp_path / "ckpt"))
    assert loaded.stages[0].sampler.guidance_interval == (0.3, 5.0)
    assert loaded.stages[1].sampler.guidance_interval is None
    config["stages"][0]["sampler"]["guidance_interval"] = [5.0, 0.3]
    with pytest.raises(ValueError, match=r"stages\.0\.sampler\.guidance_interval: expected sigma_lo <= sigma_hi"):
        build_cascade(config)
    config["stages"][0]["sampler"]["guidance_interval"] = [0.3]
    with pytest.raises(ValueError, match=r"stages\.0\.sampler\.guidance_interval: expected a list of numbers"):
        build_cascade(config)


def test_cascade_sample_skips_the_unconditional_pass_outside_the_interval():
    cascade = tiny_cascade()
    embeds = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    batches = []
    hook = cascade.stages[0].net.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    kwargs = {"text_embeds": embeds, "seed": 0, "stop_at_stage": 0, "disable_progress": True, "cond_scale": 3.0}
    try:
        plain = cascade.sample(**kwargs)
        assert set(batches) == {4}
        batches.clear()
        limited = cascade.sample(**kwargs, guidance_interval=(1e3, 1e4))
        assert set(batches) == {2}
    finally:
        hook.remove()
    assert torch.equal(limited, cascade.sample(**{**kwargs, "cond_scale": 1.0}))
    assert torch.equal(cascade.sample(**kwargs, guidance_interval=(0.0, 1e3)), plain)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return perturbed_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint")


def test_cli_interval_reaches_the_sampler_in_sample_and_eval_shapes(checkpoint, tmp_path):
    from test_sample_flags import read_images

    dest = tmp_path / "out"
    flags = ["--guidance-interval", "0.1", "2.5", "--guidance-interval", "1=0.05", "1"]
    assert main(["sample", checkpoint, "--prompt", "a red circle", "--out", str(dest), "--seed", "2", *flags]) == 0
    cascade = Cascade.from_checkpoint(checkpoint)
    expected = cascade.sample(["a red circle"], seed=2, guidance_interval=(0.1, 2.5),
                              stage_overrides={1: {"guidance_interval": (0.05, 1.0)}}, disable_progress=True)
    torch.testing.assert_close(read_images(dest, 1), expected, atol=1 / 255 + 1e-6, rtol=0)
    assert (expected - cascade.sample(["a red circle"], seed=2, disable_progress=True)).abs().mean() > 1e-3
    out = tmp_path / "eval"
    assert main(["eval-shapes", checkpoint, "--n", "2", "--out", str(out), "--guidance-interval", "0=0.1", "2.5"]) == 0
    record = json.loads((out / "eval_shapes.json").read_text())
    assert record["stage_overrides"] == {"0": {"guidance_interval": [0.1, 2.5]}}


@pytest.mark.parametrize("flags, pattern", [
    (["--guidance-interval", "2", "1"], r"^--guidance-interval: expected sigma_lo <= sigma_hi, got \(2.0, 1.0\)"),
    (["--guidance-interval", "a", "1"], r"^--guidance-interval: expected two numbers LO HI .*got 'a 1'"),
    (["--guidance-interval", "0.1", "inf"], r"^--guidance-interval\[1\]: expected a finite number"),
    (["--guidance-interval", "0.1", "1", "--guidance-interval", "0.2", "1"], r"^--guidance-interval: given twice"),
    (["--guidance-interval", "x=0.1", "1"], r"^--guidance-interval: expected STAGE=VALUE with a stage index"),
])
def test_bad_interval_flags_are_named_before_the_checkpoint_is_read(tmp_path, flags, pattern):
    with pytest.raises(ValueError, match=pattern):
        main(["sample", str(tmp_path / "none"), "--prompt", "a", "--out", str(tmp_path / "out"), *flags])
    with pytest.raises(ValueError, match=pattern):
        main(["eval-shapes", str(tmp_path / "none"), "--n", "2", *flags])


def test_a_stage_the_checkpoint_lacks_is_named(checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"^--guidance-interval: stage 2 does not exist; this checkpoint has "
                                         r"stages 0 to 1"):
        main(["sample", checkpoint, "--prompt", "a", "--out", str(tmp_path / "o"), "--guidance-interval", "2=0", "1"])


def test_eval_shapes_guides_one_stage_and_leaves_the_other_as_saved(checkpoint, tmp_path):
    """``--cond-scale 0=6`` reaches the base stage only (a single value would guide every stage), together with
    a per-stage interval; the judged images are the cascade's own samples under the same overrides."""
    from imagen_lib.commands.eval_shapes import evaluate_cascade

    out = tmp_path / "eval"
    flags = ["--cond-scale", "0=6", "--guidance-interval", "0=0.1", "2.5"]
    assert main(["eval-shapes", checkpoint, "--n", "2", "--out", str(out), *flags]) == 0
    record = json.loads((out / "eval_shapes.json").read_text())
    assert record["cond_scale"] is None
    assert record["stage_overrides"] == {"0": {"cond_scale": 6.0, "guidance_interval": [0.1, 2.5]}}
    cascade = Cascade.from_checkpoint(checkpoint)
    overrides = {0: {"cond_scale": 6.0, "guidance_interval": (0.1, 2.5)}}
    report, _, _ = evaluate_cascade(cascade, 2, 0, progress=False, stage_overrides=overrides)
    assert report["all_correct"] == record["all_correct"]
    with pytest.raises(ValueError, match=r"^--cond-scale: stage 5 does not exist"):
        main(["eval-shapes", checkpoint, "--n", "2", "--out", str(out), "--cond-scale", "5=2"])
