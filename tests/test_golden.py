"""Golden numbers: a seeded tiny cascade trained three steps per stage and sampled (both stages, guidance on,
dynamic thresholding), and every sampler run on a fixed closed-form denoiser, against stored statistics.

These numbers were recorded once and must never move: a refactor that changes one of them changes what the
library computes. Only a deliberate behaviour change may re-record them (say so in its commit).
"""

from __future__ import annotations

import math

import pytest
import torch

from imagen_lib import (
    Cascade,
    EfficientUnet,
    ElucidatedDiffusion,
    GaussianDiffusionContinuous,
    NoiseAugmentation,
    SamplerSettings,
    ShapesDataset,
    Stage,
    T5TextEncoder,
    Trainer,
    Unet,
)
from imagen_lib.diffusion.samplers import SAMPLERS
from imagen_lib.diffusion.schedules import karras_sigmas

# float32 reproduces these to ~1e-7 on one CPU kind; the tolerance leaves room for another CPU's kernels
# while catching any change of what is computed (one moves these numbers by 1e-3 or more)
RTOL, ATOL = 1e-5, 1e-7

GOLDEN_TRAINING = {
    "losses": [1.3381823301315308, 1.4147453308105469, 1.593177080154419, 0.9806695580482483,
               1.019661784172058, 0.9265855550765991],
    "stage0_param_sum": 749.4068865218319,
    "stage1_param_sum": 233.95070824740338,
    "stage0_ema_param_sum": 747.970297207597,
    "stage1_ema_param_sum": 232.97210625756514,
    "base_mean": 0.5187699794769287,
    "base_std": 0.09704753756523132,
    "final_mean": 0.5063017010688782,
    "final_std": 0.18335235118865967,
    "final_pixels": [0.5507028102874756, 0.4396093785762787, 0.6117154359817505, 0.5054778456687927],
}

GOLDEN_SAMPLERS = {
    "ddim": [-0.006466161790228145, 0.35075453439761217],
    "dpmpp_2m": [-0.011178094419254528, 0.6063515622827973],
    "euler": [-0.0064661617902281405, 0.350754534397612],
    "euler_ancestral": [0.06241665577206615, 0.264566666483516],
    "heun": [-0.013542735919946277, 0.7346206584637555],
}


def _tiny_cascade() -> Cascade:
    torch.manual_seed(0)
    encoder = T5TextEncoder.build_tiny(seed=0, max_length=16, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                       num_heads=4)
    base = Unet(embed_dim=16, image_size=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                num_attn_heads=2, per_head_channels=8, text_embed_dim=32)
    sr = EfficientUnet(embed_dim=16, image_size=16, channel_mult=(1, 2), num_res_blocks=(1, 1),
                       attention_levels=(False, True), num_attn_heads=2, per_head_channels=8, text_embed_dim=32,
                       lowres_cond=True)
    stages = [
        Stage(base, ElucidatedDiffusion(), 8, SamplerSettings(steps=3, cond_scale=2.0, threshold="dynamic")),
        Stage(sr, GaussianDiffusionContinuous(noise_schedule="linear"), 16,
              SamplerSettings(steps=2, cond_scale=2.0, threshold="dynamic"), lowres_aug=NoiseAugmentation()),
    ]
    return Cascade(stages, text_encoder=encoder)


def _param_sum(net: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in net.parameters()))


def _close(actual, expected) -> None:
    assert actual == pytest.approx(expected, rel=RTOL, abs=ATOL)


def _train_and_sample() -> dict:
    cascade = _tiny_cascade()
    trainer = Trainer(cascade, lr=1e-3, cpu=True, ema_update_after_step=1, ema_update_every=1, warmup_steps=0)
    torch.manual_seed(1)
    losses = []
    for k, size in enumerate((8, 16)):
        data = ShapesDataset(image_size=size, length=16, seed=k, supersample=1)
        batch = data.batch(list(range(4)))
        losses += [trainer.train_step(k, batch) for _ in range(3)]
    prompts = ["a red circle", "a blue square on a white background"]
    base = trainer.sample(prompts, seed=0, stop_at_stage=0, disable_progress=True)
    final = trainer.sample(prompts, seed=0, disable_progress=True)
    emas = trainer.ema_networks()
    return {
        "losses": losses,
        "stage0_param_sum": _param_sum(cascade.stages[0].net),
        "stage1_param_sum": _param_sum(cascade.stages[1].net),
        "stage0_ema_param_sum": _param_sum(emas[0]),
        "stage1_ema_param_sum": _param_sum(emas[1]),
        "base_mean": float(base.mean()), "base_std": float(base.std()),
        "final_mean": float(final.mean()), "final_std": float(final.std()),
        "final_pixels": [float(final[0, 0, 3, 5]), float(final[0, 1, 8, 8]), float(final[1, 2, 15, 0]),
                         float(final[1, 0, 10, 12])],
    }


def test_tiny_cascade_training_and_sampling_match_the_golden_numbers():
    got = _train_and_sample()
    assert set(got) == set(GOLDEN_TRAINING)
    for key, expected in GOLDEN_TRAINING.items():
        _close(got[key], expected)


def _gaussian_denoiser(sigma_data: float = 0.5):
    """The exact denoiser of data ~ N(0, sigma_data^2): E[x0 | x] = x * sigma_data^2 / (sigma_data^2 + sigma^2)."""
    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return x * sigma_data**2 / (sigma_data**2 + s**2)
    return denoiser


@pytest.mark.parametrize("name", sorted(GOLDEN_SAMPLERS))
def test_samplers_on_a_fixed_denoiser_match_the_golden_numbers(name):
    sigmas = karras_sigmas(8, sigma_min=0.002, sigma_max=80.0, rho=7.0).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) * sigmas[0]
    out = SAMPLERS[name](_gaussian_denoiser(), x, sigmas, generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.float64 and not math.isnan(float(out.sum()))
    _close([float(out.mean()), float(out.std())], GOLDEN_SAMPLERS[name])
