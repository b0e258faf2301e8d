"""Autoguidance (Karras et al. 2024): ``D = D_bad + w (D_good - D_bad)`` as a denoiser wrapper; w = 1 and a model
guided by itself give the good model alone; its sum with classifier-free guidance; the guide networks of
Cascade.using, with text conditioning, under each diffusion process; the interval skips the guide too; the
settings, errors and CLI flags."""

import json

import pytest
import torch
from test_guidance_interval import PROCESSES, RecordingNet, run_sampler
from tiny_cascade import BASE_NET, T5_KWARGS, tiny_cascade

from imagen_lib.cascade import Cascade, SamplerSettings
from imagen_lib.cli import main
from imagen_lib.diffusion.guidance import autoguidance, classifier_free_guidance
from imagen_lib.nn.networks import network_from_config
from imagen_lib.text import T5TextEncoder


def good(x, sigma):
    return torch.tanh(x) * 0.9 + 0.1


def bad(x, sigma):
    return torch.tanh(x) * 0.5 - 0.2


def test_weight_one_and_a_self_guided_model_are_the_good_model_alone():
    x, sigma = torch.randn(3, 2, 4, 4), torch.full((3,), 1.5)
    assert torch.equal(autoguidance(good, bad, 1.0)(x, sigma), good(x, sigma))
    assert torch.equal(autoguidance(good, good, 2.5)(x, sigma), good(x, sigma))
    torch.testing.assert_close(autoguidance(good, bad, 2.5)(x, sigma), bad(x, sigma) + 2.5 * (good(x, sigma)
                                                                                              - bad(x, sigma)))


def test_with_cfg_the_two_directions_add_to_the_conditional_prediction():
    calls = []

    def doubled(x, sigma):  # conditional rows first, then unconditional
        calls.append(("good", x.shape[0]))
        b = x.shape[0] // 2
        return torch.cat([good(x[:b], sigma[:b]), good(x[b:], sigma[b:]) - 0.4])

    def guide(x, sigma):
        calls.append(("bad", x.shape[0]))
        return bad(x, sigma)

    x, sigma = torch.randn(2, 3, 4, 4), torch.full((2,), 0.8)
    out = autoguidance(doubled, guide, 2.0, cond_scale=3.0)(x, sigma)
    cond, uncond = good(x, sigma), good(x, sigma) - 0.4
    torch.testing.assert_close(out, cond + 2.0 * (cond - uncond) + 1.0 * (cond - bad(x, sigma)))
    assert calls == [("good", 4), ("bad", 2)]  # one doubled pass of the good model, one single pass of the guide
    assert torch.equal(autoguidance(doubled, guide, 1.0, cond_scale=3.0)(x, sigma),
                       classifier_free_guidance(doubled, 3.0)(x, sigma))
    rescaled = autoguidance(doubled, guide, 2.0, cond_scale=3.0, rescale=1.0)(x, sigma)
    torch.testing.assert_close(rescaled.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))


@pytest.mark.parametrize("name, args, pattern, error", [
    ("guide", (good, None, 2.0), r"^guide: expected a callable denoiser", TypeError),
    ("weight", (good, bad, float("nan")), r"^weight: expected a finite number", ValueError),
    ("cond_scale", (good, bad, 2.0, float("inf")), r"^cond_scale: expected a finite number", ValueError),
    ("rescale", (good, bad, 2.0, 1.0, 1.5), r"^rescale: expected a value in \[0, 1\]", ValueError),
])
def test_bad_arguments_are_named(name, args, pattern, error):
    with pytest.raises(error, match=pattern):
        autoguidance(*args)


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_stage_denoiser_under_each_process_and_the_interval_skips_the_guide(process, sampler):
    net, guide = RecordingNet(), RecordingNet(shift=-0.4)
    plain, _ = run_sampler(process, net, SamplerSettings(cond_scale=1.0), sampler)
    itself, _ = run_sampler(process, net, SamplerSettings(cond_scale=1.0, autoguidance_scale=3.0), sampler, guide=net)
    assert torch.equal(itself, plain)
    net.batches.clear()
    guided, seen = run_sampler(process, net, SamplerSettings(cond_scale=1.0, autoguidance_scale=3.0), sampler,
                               guide=guide)
    assert not torch.equal(guided, plain)
    assert net.batches == [2] * len(seen) and guide.batches == [2] * len(seen)  # equal evaluations to CFG's
    net.batches.clear()
    guide.batches.clear()
    grid = process.sigmas(6)
    lo = float(grid[2])
    settings = SamplerSettings(cond_scale=2.0, autoguidance_scale=3.0, guidance_interval=(lo, 1e4))
    _, seen = run_sampler(process, net, settings, sampler, guide=guide)
    inside = [s >= float(torch.tensor(lo, dtype=torch.float32)) for s in seen]
    assert net.batches == [4 if i else 2 for i in inside]
    assert len(guide.batches) == sum(inside) < len(seen)


def test_cascade_using_guide_networks_with_text():
    cascade = tiny_cascade()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in cascade.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    embeds = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    kwargs = {"text_embeds": embeds, "seed": 0, "stop_at_stage": 0, "disable_progress": True}
    own = cascade.stages[0].net
    plain = cascade.sample(**kwargs)
    self_guided = cascade.using(guide_networks={0: own})
    # with CFG the good rows run in the doubled batch and the guide's in the single one: equal to float rounding
    torch.testing.assert_close(self_guided.sample(**kwargs, autoguidance_scale=2.0), plain, atol=1e-5, rtol=0)
    assert torch.equal(self_guided.sample(**kwargs, autoguidance_scale=2.0, cond_scale=1.0),
                       cascade.sample(**kwargs, cond_scale=1.0))
    smaller = network_from_config(BASE_NET["kind"], {**BASE_NET["config"], "embed_dim": 8, "text_embed_dim": 32})
    with torch.no_grad():
        for p in smaller.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    seen = []
    smaller.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["text_embeds"].shape[0]), with_kwargs=True)
    smaller.train()
    view = cascade.using(guide_networks={0: smaller})
    guided = view.sample(**kwargs, autoguidance_scale=2.0)
    assert seen and set(seen) == {2} and smaller.training  # the text reaches it; its mode is restored
    assert not torch.equal(guided, plain)
    assert torch.equal(view.sample(**kwargs, autoguidance_scale=1.0), plain)
    assert torch.equal(view.using(networks=list(cascade.nets)).sample(**kwargs, autoguidance_scale=2.0), guided)
    with pytest.raises(ValueError, match=r"^autoguidance_scale: stage 0 samples with 2.0 but has no guide network"):
        cascade.sample(**kwargs, autoguidance_scale=2.0)


def test_guide_networks_are_checked():
    cascade = tiny_cascade()
    with pytest.raises(ValueError, match=r"^guide_networks\[0\]: expected lowres_cond=False like stage 0's net"):
        cascade.using(guide_networks={0: cascade.stages[1].net})
    with pytest.raises(ValueError, match=r"^guide_networks: stage 2 does not exist"):
        cascade.using(guide_networks={2: cascade.stages[0].net})
    with pytest.raises(TypeError, match=r"^guide_networks: expected a mapping"):
        cascade.using(guide_networks=[cascade.stages[0].net])
    with pytest.raises(TypeError, match=r"guide_networks\[0\]"):
        cascade.using(guide_networks={0: torch.nn.Linear(2, 2)})
    with pytest.raises(ValueError, match=r"^autoguidance_scale: expected a finite number"):
        SamplerSettings(autoguidance_scale=float("inf"))
    settings = SamplerSettings(autoguidance_scale=2)
    assert SamplerSettings(**json.loads(json.dumps(settings.config))) == settings


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A checkpoint and a worse one of the same cascade (its own weights, less perturbed)."""
    encoder = T5TextEncoder.build_tiny(seed=0, max_length=16, **T5_KWARGS)
    folder = tmp_path_factory.mktemp("ckpts")
    paths = []
    for scale in (0.2, 0.05):
        cascade = tiny_cascade(text_encoder=encoder)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in cascade.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
        paths.append(cascade.save(folder / f"checkpoint{scale}"))
    return paths


def test_cli_guide_checkpoint_reaches_the_sampler(checkpoints, tmp_path):
    from test_sample_flags import read_images

    ckpt, early = checkpoints
    dest = tmp_path / "out"
    flags = ["--guide-checkpoint", early, "--autoguidance", "0=2.5"]
    assert main(["sample", ckpt, "--prompt", "a red circle", "--out", str(dest), "--seed", "1", *flags]) == 0
    cascade = Cascade.from_checkpoint(ckpt)
    guide = Cascade.from_checkpoint(early)
    expected = cascade.using(guide_networks={0: guide.stages[0].net}).sample(
        ["a red circle"], seed=1, stage_overrides={0: {"autoguidance_scale": 2.5}}, disable_progress=True)
    torch.testing.assert_close(read_images(dest, 1), expected, atol=1 / 255 + 1e-6, rtol=0)
    assert (expected - cascade.sample(["a red circle"], seed=1, disable_progress=True)).abs().mean() > 1e-3
    out = tmp_path / "eval"
    assert main(["eval-shapes", ckpt, "--n", "2", "--out", str(out), *flags]) == 0
    record = json.loads((out / "eval_shapes.json").read_text())
    assert record["guide_checkpoint"] == early and record["stage_overrides"] == {"0": {"autoguidance_scale": 2.5}}


@pytest.mark.parametrize("flags, pattern", [
    (["--autoguidance", "2"], r"^--autoguidance: given without --guide-checkpoint"),
    (["--guide-checkpoint", "x"], r"^--guide-checkpoint: given without --autoguidance"),
    (["--autoguidance", "0=w", "--guide-checkpoint", "x"], r"^--autoguidance: expected a number or STAGE=NUMBER"),
    (["--autoguidance", "nan", "--guide-checkpoint", "x"], r"^--autoguidance: expected a finite number"),
])
def test_bad_autoguidance_flags_are_named_before_the_checkpoint_is_read(tmp_path, flags, pattern):
    with pytest.raises(ValueError, match=pattern):
        main(["sample", str(tmp_path / "none"), "--prompt", "a", "--out", str(tmp_path / "out"), *flags])
    with pytest.raises(ValueError, match=pattern):
        main(["eval-shapes", str(tmp_path / "none"), "--n", "2", *flags])


def test_a_guide_checkpoint_without_the_named_stage_is_named(checkpoints, tmp_path):
    ckpt, early = checkpoints
    with pytest.raises(ValueError, match=r"^--autoguidance: stage 3 does not exist"):
        main(["sample", ckpt, "--prompt", "a", "--out", str(tmp_path / "o"), "--guide-checkpoint", early,
              "--autoguidance", "3=2"])
