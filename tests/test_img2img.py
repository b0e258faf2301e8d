"""Image-to-image at the base stage (SDEdit, Meng et al. 2021): ``start=InitImages(images, strength)``. References:
strength 1 is text-to-image from noise bit for bit (same seed); the start point is the init image noised with the
image's own generator to the grid's level after ``1 - strength`` of it, and only the remaining steps run; the
output moves further from the init image as the strength grows; later stages run as usual."""

import pytest
import torch
from tiny_cascade import T5_KWARGS, tiny_cascade

from imagen_lib.cascade import InitImages, StartImages
from imagen_lib.diffusion import GaussianDiffusionContinuous
from imagen_lib.diffusion.samplers import SAMPLERS
from imagen_lib.sampling_options import sdedit_start
from imagen_lib.text import T5TextEncoder

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def cascade():
    cascade = tiny_cascade(text_encoder=T5TextEncoder.build_tiny(seed=0, max_length=16, **T5_KWARGS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # fresh nets zero their output layers: perturb them so the samples depend on the net
        for p in cascade.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return cascade.eval()


def init_images(rows: int = 2, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.nn.functional.interpolate(torch.rand(rows, 3, 4, 4, generator=g), size=(size, size),
                                           mode="bilinear", align_corners=False)


class Recorder(torch.nn.Module):
    """Wraps a net and keeps the noise level of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.levels = net, []
        self.config, self.channels, self.lowres_cond = net.config, net.channels, net.lowres_cond
        self.text_embed_dim = net.text_embed_dim

    def forward(self, x, noise_cond, **kwargs):
        self.levels.append(torch.as_tensor(noise_cond).flatten()[0].item())
        return self.net(x, noise_cond, **kwargs)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_strength_one_is_text_to_image_from_noise(cascade, sampler):
    kwargs = {"seed": 4, "sampler": sampler, "steps": 4, "disable_progress": True}
    plain = cascade.sample(PROMPTS, **kwargs)
    assert torch.equal(plain, cascade.sample(PROMPTS, start=InitImages(init_images(), 1.0), **kwargs))


def test_strength_one_uses_the_process_own_initial_noise():
    process = GaussianDiffusionContinuous(noise_schedule="cosine")
    sigmas = process.sigmas(6)
    shape = (2, 3, 8, 8)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    grid, x = sdedit_start(process, init_images() * 2 - 1, 1.0, sigmas, gens, shape, "cpu")
    expected = process.initial_noise(shape, sigmas, [torch.Generator().manual_seed(i) for i in range(2)])
    assert torch.equal(grid, sigmas) and torch.equal(x, expected)


def test_the_start_is_the_init_image_noised_to_the_remaining_grid():
    process = GaussianDiffusionContinuous(noise_schedule="cosine")
    sigmas = process.sigmas(10)
    images = init_images() * 2 - 1
    grid, x = sdedit_start(process, images, 0.3, sigmas, [torch.Generator().manual_seed(i) for i in range(2)],
                           (2, 3, 8, 8), "cpu")
    assert torch.equal(grid, sigmas[7:])  # 3 of 10 steps remain
    noise = torch.stack([torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    torch.testing.assert_close(x, images + float(sigmas[7]) * noise)
    grid, _ = sdedit_start(process, images, 0.01, sigmas, None, (2, 3, 8, 8), "cpu")
    assert len(grid) == 2  # at least one step runs


def test_only_the_remaining_steps_run_and_later_stages_as_usual(cascade):
    recs = [Recorder(s.net) for s in cascade.stages]
    view = cascade.using(networks=recs)
    out = view.sample(PROMPTS, seed=1, sampler="euler", steps=10, cond_scale=1.0,
                      start=InitImages(init_images(), 0.4), disable_progress=True)
    assert out.shape == (2, 3, 16, 16)
    assert len(recs[0].levels) == 4 and len(recs[1].levels) == 10
    full = Recorder(cascade.stages[0].net)
    cascade.using(networks=[full, cascade.stages[1].net]).sample(
        PROMPTS, seed=1, sampler="euler", steps=10, cond_scale=1.0, stop_at_stage=0, disable_progress=True)
    assert recs[0].levels == pytest.approx(full.levels[6:])  # the tail of the same grid


def test_the_image_stays_closer_to_the_init_image_at_lower_strength(cascade):
    init = init_images(4)
    prompts = PROMPTS * 2
    distance = []
    for strength in (0.1, 0.3, 1.0):
        out = cascade.sample(prompts, seed=2, steps=10, stop_at_stage=0, start=InitImages(init, strength),
                             disable_progress=True)
        distance.append((out - init).abs().mean().item())
    assert distance == sorted(distance) and distance[0] < 0.5 * distance[-1], distance


def test_one_init_image_serves_every_prompt_and_rows_follow_images(cascade):
    init = init_images(1)
    kwargs = {"seed": 6, "steps": 4, "stop_at_stage": 0, "num_images_per_prompt": 2, "disable_progress": True}
    one = cascade.sample(PROMPTS, start=InitImages(init, 0.5), **kwargs)
    four = cascade.sample(PROMPTS, start=InitImages(init.expand(4, -1, -1, -1), 0.5), **kwargs)
    assert torch.equal(one, four)


@pytest.mark.parametrize("make, error, pattern", [
    (lambda: InitImages(init_images(), 0.0), ValueError, r"^strength: "),
    (lambda: InitImages(init_images(), 1.5), ValueError, r"^strength: "),
    (lambda: InitImages(init_images(), float("nan")), ValueError, r"^strength: expected a finite number"),
    (lambda: InitImages(init_images(), "0.5"), TypeError, r"^strength: "),
    (lambda: InitImages(None, 0.5), ValueError, r"^images: missing"),
    (lambda: InitImages(init_images() * 255, 0.5), ValueError, r"^images: "),
])
def test_bad_init_images_are_named_when_built(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


def test_bad_init_images_are_named_when_sampling(cascade):
    with pytest.raises(ValueError, match=r"^start\.images: expected \(B, 3, H, W\)"):
        cascade.sample(PROMPTS, start=InitImages(torch.rand(2, 1, 8, 8), 0.5), disable_progress=True)
    with pytest.raises(ValueError, match=r"^start\.images: expected 2 \(one per prompt\) or 2 rows, got 3"):
        cascade.sample(PROMPTS, start=InitImages(torch.rand(3, 3, 8, 8), 0.5), disable_progress=True)
    with pytest.raises(TypeError, match=r"^start: "):
        cascade.sample(PROMPTS, start=torch.rand(2, 3, 8, 8), disable_progress=True)
    assert StartImages(torch.rand(2, 3, 8, 8)).stage == 1  # the other kind of start is unchanged
