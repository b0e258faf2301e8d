"""Classifier-free guidance, thresholding and RePaint inpainting as denoiser wrappers."""

import math

import pytest
import torch
from test_sampling import mixture_denoiser

from imagen_lib.diffusion import guidance, samplers
from imagen_lib.diffusion.guidance import (
    classifier_free_guidance,
    dynamic_threshold,
    inpaint,
    static_threshold,
    thresholded,
)
from imagen_lib.diffusion.samplers import SAMPLERS
from imagen_lib.diffusion.schedules import initial_noise, karras_sigmas


def doubled_denoiser(cond_offset, uncond_offset, calls):
    """A denoiser on a doubled batch whose two halves differ, standing in for text / null text."""

    def den(x, sigma):
        calls.append(x.shape[0])
        offset = torch.cat([cond_offset, uncond_offset]).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.tanh(x) * sigma.reshape(offset.shape) / (1 + sigma.reshape(offset.shape)) + offset

    return den


def test_cfg_scale_one_is_the_conditional_denoiser_in_one_batched_call():
    calls = []
    cond, uncond = torch.tensor([0.3, -0.2]), torch.tensor([1.0, 2.0])
    den = doubled_denoiser(cond, uncond, calls)
    x, sigma = torch.randn(2, 3, 4, 4), torch.tensor([0.5, 3.0])
    out = classifier_free_guidance(den, 1.0)(x, sigma)
    reference = den(torch.cat([x, x]), torch.cat([sigma, sigma]))[:2]
    assert torch.equal(out, reference)
    assert calls == [4, 4]  # one batched forward per guided call
    # scale w: uncond + w (cond - uncond)
    both = den(torch.cat([x, x]), torch.cat([sigma, sigma]))
    guided = classifier_free_guidance(den, 7.5)(x, sigma)
    assert torch.allclose(guided, both[2:] + 7.5 * (both[:2] - both[2:]), atol=1e-5)
    # a scalar sigma is accepted
    assert classifier_free_guidance(den, 3.0)(x, torch.tensor(0.5)).shape == x.shape


def test_guidance_rescale_matches_the_conditional_std():
    calls = []
    den = doubled_denoiser(torch.tensor([0.0, 0.0]), torch.tensor([0.5, -0.5]), calls)
    x, sigma = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1.0, 1.0])
    both = den(torch.cat([x, x]), torch.cat([sigma, sigma]))
    cond = both[:2]
    full = classifier_free_guidance(den, 8.0, rescale=1.0)(x, sigma)
    assert torch.allclose(full.flatten(1).std(1), cond.flatten(1).std(1), rtol=1e-5)
    plain = classifier_free_guidance(den, 8.0)(x, sigma)
    half = classifier_free_guidance(den, 8.0, rescale=0.5)(x, sigma)
    assert torch.allclose(half, 0.5 * (plain + full), atol=1e-5)
    with pytest.raises(ValueError, match="rescale"):
        classifier_free_guidance(den, 5.0, rescale=1.5)


def reference_dynamic_threshold(x0, p, max_value=None):
    """Per sample in float64 Python: linear-interpolation quantile, as in the Imagen paper's pseudocode."""
    out = []
    for row in x0.to(torch.float64):
        values = sorted(abs(v) for v in row.flatten().tolist())
        pos = p * (len(values) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(values) - 1)
        s = values[lo] + (pos - lo) * (values[hi] - values[lo])
        s = max(s, 1.0)
        if max_value is not None:
            s = min(s, max_value)
        out.append(row.clamp(-s, s) / s)
    return torch.stack(out)


@pytest.mark.parametrize("p, max_value", [(0.995, None), (0.9, None), (0.995, 1.5)])
def test_dynamic_threshold_against_a_direct_reference(p, max_value):
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.3, 1.0, 2.0, 5.0]).reshape(4, 1, 1, 1)  # below and above the [-1, 1] range
    x0 = torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64) * scales
    out = dynamic_threshold(x0, p, max_value)
    assert torch.allclose(out, reference_dynamic_threshold(x0, p, max_value), atol=1e-6)
    assert out.abs().max() <= 1.0
    assert torch.equal(out[0], x0[0])  # a sample already inside [-1, 1] is left alone


def test_dynamic_threshold_row_by_row_path_agrees(monkeypatch):
    x0 = torch.randn(3, 1, 20, 20, generator=torch.Generator().manual_seed(0)) * 3
    vectorised = dynamic_threshold(x0)
    monkeypatch.setattr(guidance, "_QUANTILE_MAX", 10)  # force the path used for very large batches
    assert torch.allclose(dynamic_threshold(x0), vectorised)
    half = dynamic_threshold(x0.half())
    assert half.dtype == torch.float16 and torch.allclose(half.float(), vectorised, atol=2e-3)


def test_static_threshold_and_the_thresholded_wrapper():
    x0 = torch.linspace(-3, 3, 16).reshape(1, 1, 4, 4)
    assert torch.equal(static_threshold(x0), x0.clamp(-1, 1))
    den = lambda x, sigma: x * 2  # noqa: E731
    sigma = torch.ones(1)
    assert torch.equal(thresholded(den, "static")(x0, sigma), (2 * x0).clamp(-1, 1))
    assert torch.equal(thresholded(den, "dynamic", percentile=0.9)(x0, sigma), dynamic_threshold(2 * x0, 0.9))
    assert torch.equal(thresholded(den, "none")(x0, sigma), 2 * x0)
    with pytest.raises(ValueError, match="method"):
        thresholded(den, "soft")
    with pytest.raises(ValueError, match="percentile"):
        dynamic_threshold(x0, 1.5)


def test_thresholding_reaches_every_sampler():
    # a denoiser that over-shoots the data range; with thresholding every sample stays in [-1, 1]
    den = thresholded(lambda x, sigma: 3 * torch.tanh(x), "dynamic")
    grid = karras_sigmas(8)
    for name, fn in SAMPLERS.items():
        x = initial_noise((2, 1, 8, 8), grid, torch.Generator().manual_seed(0))
        out = fn(den, x, grid, generator=torch.Generator().manual_seed(1))
        assert out.abs().max() <= 1.0 + 1e-5, name


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("resample_times, jump_length", [(1, 1), (3, 2)])
def test_inpainting_keeps_known_pixels_with_every_sampler(name, resample_times, jump_length):
    grid = karras_sigmas(6)
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    masks = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    masks[:, :, :, :4] = True  # keep the left half
    x = initial_noise(images.shape, grid, torch.Generator().manual_seed(1))
    out = inpaint(SAMPLERS[name], mixture_denoiser, x, grid, images=images, masks=masks,
                  resample_times=resample_times, jump_length=jump_length,
                  generator=torch.Generator().manual_seed(2))
    assert torch.equal(out[..., :4], images[..., :4])
    assert torch.isfinite(out).all() and not torch.allclose(out[..., 4:], images[..., 4:])


@pytest.mark.parametrize("name, resample_times", [("dpmpp_2m", 1), ("heun", 1), ("euler_ancestral", 3)])
def test_inpainting_conditions_the_unknown_pixels_on_the_known_ones(name, resample_times):
    # data: two perfectly correlated pixels (a, a) with a = +1 or -1; knowing pixel 0 = +1 fixes pixel 1
    means_plus, means_minus = torch.ones(1, 2, 1, 1), -torch.ones(1, 2, 1, 1)

    def den(x, sigma):
        s2 = sigma.reshape(-1, 1, 1, 1) ** 2
        logit = ((x - means_minus) ** 2 - (x - means_plus) ** 2).flatten(1).sum(1) / (2 * s2.flatten())
        r = torch.sigmoid(logit).reshape(-1, 1, 1, 1)
        return r * means_plus + (1 - r) * means_minus

    n = 400
    grid = karras_sigmas(20, sigma_max=20.0)
    images = torch.ones(n, 2, 1, 1)
    masks = torch.tensor([True, False]).reshape(1, 2, 1, 1).expand(n, 2, 1, 1)
    x = initial_noise(images.shape, grid, torch.Generator().manual_seed(0))
    out = inpaint(SAMPLERS[name], den, x, grid, images=images, masks=masks, resample_times=resample_times,
                  jump_length=2, generator=torch.Generator().manual_seed(1))
    assert (out[:, 1] > 0).float().mean() > 0.95
    # without the known pixel the two modes come out in equal shares
    free = SAMPLERS[name](den, x, grid, generator=torch.Generator().manual_seed(1))
    assert 0.35 < (free[:, 1] > 0).float().mean() < 0.65


def test_inpainting_mask_shapes_and_errors():
    grid = karras_sigmas(3)
    images = torch.zeros(2, 1, 4, 4)
    x = initial_noise(images.shape, grid, torch.Generator().manual_seed(0))
    keep = torch.zeros(4, 4, dtype=torch.bool)
    keep[0] = True
    out = inpaint(samplers.sample_euler, mixture_denoiser, x, grid, images=images, masks=keep)
    assert torch.equal(out[:, :, 0], images[:, :, 0])
    with pytest.raises(ValueError, match="masks"):
        inpaint(samplers.sample_euler, mixture_denoiser, x, grid, images=images, masks=torch.ones(3, 5, 5))
    with pytest.raises(ValueError, match="images"):
        inpaint(samplers.sample_euler, mixture_denoiser, x, grid, images=images[:1], masks=keep)
    with pytest.raises(ValueError, match="resample_times"):
        inpaint(samplers.sample_euler, mixture_denoiser, x, grid, images=images, masks=keep, resample_times=0)
