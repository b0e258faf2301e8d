"""Both diffusion processes: preconditioning round trips, losses at their analytic optimum, configs,
and the noise-conditioning augmentation. The preconditioning is re-derived here from the papers' formulas."""

import json
import math

import pytest
import torch
from test_sampling import mixture_denoiser

from imagen_lib import ElucidatedDiffusion, GaussianDiffusionContinuous, NoiseAugmentation
from imagen_lib.diffusion import DIFFUSIONS, diffusion_from_config, schedules
from imagen_lib.diffusion.samplers import SAMPLERS

F64 = torch.float64


def _col(v, x):
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def edm_optimal_net(proc, denoiser):
    """The network whose preconditioned output is exactly ``denoiser`` (Karras et al. 2022, Table 1)."""
    sd = proc.sigma_data

    def net(x_in, c_noise):
        sigma = _col(torch.exp(4 * c_noise), x_in)
        x = x_in * torch.sqrt(sigma**2 + sd**2)  # undo c_in
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / torch.sqrt(sigma**2 + sd**2)
        return (denoiser(x, sigma.flatten()) - c_skip * x) / c_out

    return net


def vp_optimal_net(objective, denoiser):
    """The VP network (input alpha x0 + sigma_vp eps, log-SNR) predicting ``objective`` from ``denoiser``."""

    def net(x_t, log_snr):
        alpha, sig = _col(torch.sigmoid(log_snr).sqrt(), x_t), _col(torch.sigmoid(-log_snr).sqrt(), x_t)
        sigma_ve = sig / alpha
        x0 = denoiser(x_t / alpha, sigma_ve.flatten())
        eps = (x_t - alpha * x0) / sig
        return {"noise": eps, "x_start": x0, "v": alpha * eps - sig * x0}[objective]

    return net


SIGMAS = torch.tensor([0.002, 0.05, 0.5, 2.0, 30.0, 80.0], dtype=F64)


def _noisy_points():
    """Points around the mixture at the noise levels SIGMAS (float64)."""
    noise = torch.randn(6, 2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    return noise * SIGMAS.reshape(6, 1, 1, 1) + 0.3


def test_edm_preconditioning_round_trip_in_float64():
    proc = ElucidatedDiffusion()
    x = _noisy_points()
    den = proc.denoiser(edm_optimal_net(proc, mixture_denoiser))
    assert torch.allclose(den(x, SIGMAS), mixture_denoiser(x, SIGMAS), rtol=1e-10, atol=1e-12)
    # a scalar sigma broadcasts over the batch
    assert torch.allclose(den(x, torch.tensor(0.5, dtype=F64)), mixture_denoiser(x, torch.full((6,), 0.5, dtype=F64)))


@pytest.mark.parametrize("objective", ["noise", "x_start", "v"])
def test_vp_preconditioning_round_trip_in_float64(objective):
    proc = GaussianDiffusionContinuous(pred_objective=objective)
    x = _noisy_points()
    den = proc.denoiser(vp_optimal_net(objective, mixture_denoiser))
    assert torch.allclose(den(x, SIGMAS), mixture_denoiser(x, SIGMAS), rtol=1e-9, atol=1e-10)


def test_networks_receive_the_documented_noise_conditioning_and_kwargs():
    seen = {}

    def net(x, noise_cond, **kwargs):
        seen.update(noise_cond=noise_cond, kwargs=kwargs)
        return torch.zeros_like(x)

    sigma = torch.tensor([0.5, 2.0])
    x = torch.randn(2, 1, 2, 2)
    ElucidatedDiffusion().denoiser(net, text_embeds="E")(x, sigma)
    assert torch.allclose(seen["noise_cond"], sigma.log() / 4) and seen["kwargs"] == {"text_embeds": "E"}
    GaussianDiffusionContinuous().denoiser(net, lowres_img="L")(x, sigma)
    assert torch.allclose(seen["noise_cond"], -2 * sigma.log()) and seen["kwargs"] == {"lowres_img": "L"}
    GaussianDiffusionContinuous().loss(net, x, t=torch.tensor([0.0, 0.5]))
    assert torch.allclose(seen["noise_cond"], schedules.log_snr_cosine(torch.tensor([0.0, 0.5])))


def _gaussian_denoiser(var):
    return lambda x, sigma: x * var / (var + _col(sigma, x) ** 2)


@pytest.mark.parametrize("data_std", [0.5, 0.3])
def test_edm_loss_at_the_optimum_equals_its_analytic_minimum(data_std):
    proc = ElucidatedDiffusion(sigma_data=0.5)
    var = data_std**2
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 1, 128, 128, dtype=F64, generator=gen) * data_std
    net = edm_optimal_net(proc, _gaussian_denoiser(var))
    losses = proc.loss(net, x0, sigma=SIGMAS, generator=gen, reduction="none")
    # E |D(x) - x0|^2 = posterior variance; lambda(sigma) times it is 1 when data_std == sigma_data
    expected = proc.loss_weight(SIGMAS) * var * SIGMAS**2 / (var + SIGMAS**2)
    assert torch.allclose(losses, expected, rtol=0.04)
    if data_std == 0.5:
        assert torch.allclose(expected, torch.ones_like(expected))
    # any other network does worse
    losses = proc.loss(net, x0, sigma=SIGMAS, generator=torch.Generator().manual_seed(1), reduction="none")
    worse = proc.loss(lambda x, c: net(x, c) + 0.1, x0, sigma=SIGMAS, generator=torch.Generator().manual_seed(1),
                      reduction="none")
    assert (worse > losses).all()


@pytest.mark.parametrize("objective", ["noise", "x_start", "v"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_vp_loss_at_the_optimum_equals_its_analytic_minimum(objective, gamma):
    proc = GaussianDiffusionContinuous(pred_objective=objective, min_snr_gamma=gamma)
    var = 0.3**2
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.9], dtype=F64)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 1, 128, 128, dtype=F64, generator=gen) * math.sqrt(var)
    losses = proc.loss(vp_optimal_net(objective, _gaussian_denoiser(var)), x0, t=t, generator=gen, reduction="none")
    log_snr = schedules.log_snr_cosine(t)
    a2, s2 = torch.sigmoid(log_snr), torch.sigmoid(-log_snr)
    post = var * s2 / (a2 * var + s2)  # Var(x0 | x_t)
    expected = {"noise": a2 * post / s2, "x_start": post, "v": post / s2}[objective]
    if gamma is not None:  # Min-SNR-gamma (Hang et al. 2023)
        snr = a2 / s2
        expected = expected * {"noise": snr.clamp(max=gamma) / snr, "x_start": snr.clamp(max=gamma),
                               "v": snr.clamp(max=gamma) / (snr + 1)}[objective]
    assert torch.allclose(losses, expected, rtol=0.04)


@pytest.mark.parametrize("loss_type, expected", [
    ("l2", 1.0),
    ("l1", math.sqrt(2 / math.pi)),
    # huber (delta 1) of a standard normal: E[z^2 / 2; |z| < 1] + E[|z| - 1/2; |z| >= 1]
    ("huber", 0.5 * (math.erf(1 / math.sqrt(2)) - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi))
     + 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) - 0.5 * (1 - math.erf(1 / math.sqrt(2)))),
])
def test_edm_network_target_has_unit_variance(loss_type, expected):
    # with data std = sigma_data, the target (x0 - c_skip x) / c_out is N(0, 1) at every sigma (EDM's point),
    # so a network that outputs 0 has loss E[loss_type(z)] for z ~ N(0, 1)
    proc = ElucidatedDiffusion(loss_type=loss_type)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 1, 128, 128, dtype=F64, generator=gen) * 0.5
    loss = proc.loss(lambda x, c: torch.zeros_like(x), x0, generator=gen)
    assert loss.item() == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("proc", [ElucidatedDiffusion(), GaussianDiffusionContinuous(pred_objective="v")])
def test_loss_reductions_weights_and_seeds(proc):
    net = lambda x, c: 0.1 * x  # noqa: E731
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    per = proc.loss(net, x0, generator=torch.Generator().manual_seed(3), reduction="none")
    mean = proc.loss(net, x0, generator=torch.Generator().manual_seed(3))
    assert per.shape == (4,) and mean.shape == () and torch.allclose(mean, per.mean())
    weight = torch.tensor([1.0, 0.0, 2.0, 0.0])
    weighted = proc.loss(net, x0, generator=torch.Generator().manual_seed(3), sample_weight=weight)
    assert torch.allclose(weighted, (per * weight).mean())
    other = proc.loss(net, x0, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(mean, other)
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    assert proc.loss(net, x0, generator=gens, reduction="none").shape == (4,)
    with pytest.raises(ValueError, match="reduction"):
        proc.loss(net, x0, reduction="sum")
    with pytest.raises(ValueError, match="sample_weight"):
        proc.loss(net, x0, sample_weight=torch.ones(3))


def test_loss_backpropagates_to_the_network():
    w = torch.zeros((), requires_grad=True)
    for proc in (ElucidatedDiffusion(), GaussianDiffusionContinuous()):
        proc.loss(lambda x, c: w * x, torch.randn(2, 1, 4, 4)).backward()
        assert w.grad is not None and w.grad != 0
        w.grad = None


@pytest.mark.parametrize("proc, steps", [
    (ElucidatedDiffusion(), None),
    (GaussianDiffusionContinuous(), None),
    (GaussianDiffusionContinuous("linear", "x_start"), None),
    # the schedule's own grid (uniform in t) needs more steps than the Karras grid for the same accuracy
    (GaussianDiffusionContinuous("linear", sampling_grid="schedule"), 100),
])
def test_default_grid_and_sampler_draw_the_data(proc, steps):
    # the process's own defaults on the exact optimal network reproduce the data's std
    var = 0.4**2
    if isinstance(proc, ElucidatedDiffusion):
        net = edm_optimal_net(proc, _gaussian_denoiser(var))
    else:
        net = vp_optimal_net(proc.pred_objective, _gaussian_denoiser(var))
    steps = steps or proc.default_steps
    grid = proc.sigmas(steps)
    assert grid.shape == (steps + 1,) and grid[-1] == 0 and (grid[1:] < grid[:-1]).all()
    x = proc.initial_noise((512, 1, 4, 4), grid, torch.Generator().manual_seed(0), dtype=F64)
    out = SAMPLERS[proc.default_sampler](proc.denoiser(net), x, grid)
    assert out.std().item() == pytest.approx(0.4, rel=0.05)


def test_configs_round_trip_through_json():
    for proc in (ElucidatedDiffusion(sigma_max=160.0, default_sampler="heun", default_steps=32),
                 GaussianDiffusionContinuous("linear", "v", "huber", min_snr_gamma=5.0)):
        config = json.loads(json.dumps(proc.config))
        rebuilt = type(proc)(**config)
        assert rebuilt.config == proc.config
        assert diffusion_from_config(type(proc).__name__, config).config == proc.config
        assert proc.default_sampler in SAMPLERS
    assert set(DIFFUSIONS) == {"GaussianDiffusionContinuous", "ElucidatedDiffusion", "DiscreteDiffusion"}
    assert ElucidatedDiffusion().sigmas(4)[0].item() == pytest.approx(80.0)
    with pytest.raises(ValueError, match="kind"):
        diffusion_from_config("DDPM", {})


@pytest.mark.parametrize("make, match", [
    (lambda: ElucidatedDiffusion(loss_type="l3"), "loss_type"),
    (lambda: ElucidatedDiffusion(sigma_min=1.0, sigma_max=0.5), "sigma_min"),
    (lambda: ElucidatedDiffusion(default_sampler=""), "default_sampler"),  # known names: the Stage checks them
    (lambda: GaussianDiffusionContinuous(noise_schedule="sigmoid"), "noise_schedule"),
    (lambda: GaussianDiffusionContinuous(pred_objective="eps"), "pred_objective"),
    (lambda: GaussianDiffusionContinuous(min_snr_gamma=0.0), "min_snr_gamma"),
    (lambda: GaussianDiffusionContinuous(sampling_grid="uniform"), "sampling_grid"),
])
def test_bad_options_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs_name_the_argument():
    net = lambda x, c: x  # noqa: E731
    with pytest.raises(TypeError, match="x0"):
        ElucidatedDiffusion().loss(net, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="sigma"):
        ElucidatedDiffusion().denoiser(net)(torch.ones(2, 1, 2, 2), torch.ones(3))
    with pytest.raises(ValueError, match="t: expected"):
        GaussianDiffusionContinuous().loss(net, torch.ones(2, 1, 2, 2), t=torch.ones(3))


# --- noise-conditioning augmentation ---------------------------------------------------------------------


def test_noise_augmentation_levels_and_conditioning():
    aug = NoiseAugmentation("cosine")
    images = torch.zeros(3, 1, 64, 64, dtype=F64)
    levels = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    noised, cond = aug(images, levels, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(cond, schedules.log_snr_cosine(levels))
    sigma_vp = torch.sigmoid(-cond).sqrt()
    assert torch.allclose(noised.flatten(1).std(1), sigma_vp, rtol=0.05)
    # signal is scaled by alpha: at level 0 the image is kept up to a 1.3 % noise
    ones = torch.ones(2, 1, 64, 64, dtype=F64)
    kept, _ = aug(ones, 0.0, generator=torch.Generator().manual_seed(0))
    assert (kept - ones).abs().mean().item() < 0.02
    assert torch.allclose(aug.sampling_level(4), torch.full((4,), 0.2))


def test_noise_augmentation_random_levels_and_seeds():
    aug = NoiseAugmentation("linear", max_train_level=0.5)
    images = torch.randn(4, 3, 8, 8)
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    noised, cond = aug(images, None, generator=gens)
    assert noised.shape == images.shape and cond.shape == (4,)
    assert (cond >= schedules.log_snr_linear(torch.tensor(0.5))).all()
    single, _ = aug(images[2:3], None, generator=[torch.Generator().manual_seed(2)])
    assert torch.allclose(single[0], noised[2])
    assert NoiseAugmentation(**aug.config).config == aug.config
    with pytest.raises(ValueError, match="level"):
        aug(images, 1.5)
    with pytest.raises(ValueError, match="level"):
        aug(images, torch.zeros(3))
    with pytest.raises(ValueError, match="schedule"):
        NoiseAugmentation("sigmoid")
