"""DiscreteDiffusion, Stable Diffusion's discrete DDPM schedule: the schedule against its closed form and
diffusers' schedulers, the losses against hand-computed values, the VE denoiser against the forward noising,
every sampler on it, and a cascade stage that trains, saves, loads and samples with it."""

import json
import math

import pytest
import torch
from test_sampling import gaussian_denoiser, mixture_denoiser
from tiny_cascade import images, tiny_config

from imagen_lib.diffusion import DIFFUSIONS, DiscreteDiffusion, diffusion_from_config, diffusion_kind
from imagen_lib.diffusion.samplers import SAMPLERS

F64 = torch.float64


def closed_form_alphas_cumprod(schedule, T=1000, start=0.00085, end=0.012):
    """prod_{s <= t} (1 - beta_s) with beta_s written out in Python floats (float64)."""
    out, prod = [], 1.0
    for s in range(T):
        if schedule == "scaled_linear":
            beta = (math.sqrt(start) + s / (T - 1) * (math.sqrt(end) - math.sqrt(start))) ** 2
        else:
            beta = start + s / (T - 1) * (end - start)
        prod *= 1 - beta
        out.append(prod)
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_match_the_closed_form_and_diffusers(schedule):
    from diffusers import DDPMScheduler

    proc = DiscreteDiffusion(beta_schedule=schedule)
    assert proc.alphas_cumprod.dtype == F64 and proc.alphas_cumprod.shape == (1000,)
    torch.testing.assert_close(proc.alphas_cumprod, closed_form_alphas_cumprod(schedule), rtol=1e-12, atol=1e-14)
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=schedule)
    torch.testing.assert_close(proc.alphas_cumprod.float(), reference.alphas_cumprod, rtol=0, atol=2e-6)
    sigmas = ((1 - proc.alphas_cumprod) / proc.alphas_cumprod).sqrt()
    assert torch.equal(proc.train_sigmas, sigmas) and (sigmas[1:] > sigmas[:-1]).all()
    if schedule == "scaled_linear":  # SD's familiar largest sigma (k-diffusion's sigma_max for SD)
        assert proc.train_sigmas[-1].item() == pytest.approx(14.6146, rel=1e-4)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("steps", [1, 7, 25, 50, 999])
def test_timesteps_are_diffusers_ddim_timesteps(spacing, steps):
    from diffusers import DDIMScheduler

    proc = DiscreteDiffusion(timestep_spacing=spacing)
    reference = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    reference.set_timesteps(steps)
    assert torch.equal(proc.timesteps(steps), reference.timesteps)
    grid = proc.sigmas(steps)
    assert grid.shape == (steps + 1,) and grid[-1] == 0 and (grid[1:] < grid[:-1]).all()
    torch.testing.assert_close(grid[:-1], proc.train_sigmas[reference.timesteps], rtol=0, atol=0)
    assert proc.sigmas()[0] == proc.train_sigmas[999 if spacing == "trailing" else 961]


def _hand_loss(proc, net, x0, t, eps):
    """The loss written out from the definitions, in float64 Python-float schedule values."""
    abar = closed_form_alphas_cumprod(proc.beta_schedule)[t].reshape(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    x_t = a * x0.double() + s * eps.double()
    out = net(x_t.float(), (t.double() / 1000).float()).double()
    target = eps.double() if proc.parameterization == "eps" else a * eps.double() - s * x0.double()
    loss = ((out - target) ** 2).flatten(1).mean(1)
    if proc.min_snr_gamma is not None:  # Min-SNR-gamma (Hang et al. 2023)
        snr = (abar / (1 - abar)).flatten()
        loss = loss * torch.minimum(snr, torch.tensor(proc.min_snr_gamma, dtype=F64)) / (
            snr if proc.parameterization == "eps" else snr + 1)
    return loss


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_losses_equal_hand_computed_values(parameterization, gamma):
    proc = DiscreteDiffusion(parameterization=parameterization, min_snr_gamma=gamma)
    net = lambda x, c: 0.7 * x + c.reshape(-1, 1, 1, 1)  # noqa: E731
    x0 = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(5)) * 2 - 1
    # fixed timesteps: the noise is the generator's only draw
    t = torch.tensor([0, 500, 999])
    got = proc.loss(net, x0, t=t, generator=torch.Generator().manual_seed(1), reduction="none")
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got.double(), _hand_loss(proc, net, x0, t, eps), rtol=1e-5, atol=1e-6)
    # drawn timesteps: uniform integers first (floor(u T), u in float64), then the noise, from one generator
    g = torch.Generator().manual_seed(2)
    u = torch.rand((3,), generator=g, dtype=F64)
    t = (u * 1000).floor().long()
    eps = torch.randn(x0.shape, generator=g)
    got = proc.loss(net, x0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got.double(), _hand_loss(proc, net, x0, t, eps).mean(), rtol=1e-5, atol=1e-6)


def test_loss_reductions_weights_and_errors():
    proc = DiscreteDiffusion()
    net = lambda x, c: 0.1 * x  # noqa: E731
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    per = proc.loss(net, x0, generator=torch.Generator().manual_seed(3), reduction="none")
    weight = torch.tensor([1.0, 0.0, 2.0, 0.0])
    weighted = proc.loss(net, x0, generator=torch.Generator().manual_seed(3), sample_weight=weight)
    assert per.shape == (4,) and torch.allclose(weighted, (per * weight).mean())
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    assert proc.loss(net, x0, generator=gens, reduction="none").shape == (4,)
    w = torch.zeros((), requires_grad=True)
    proc.loss(lambda x, c: w * x, x0).backward()
    assert w.grad is not None and w.grad != 0
    for bad in (torch.tensor([0, 1, 2, 1000]), torch.tensor([0.5, 1.0, 2.0, 3.0]), torch.tensor([-1, 0, 0, 0])):
        with pytest.raises(ValueError, match="^t:"):
            proc.loss(net, x0, t=bad)


def _oracle(proc, x0, eps, t, seen):
    """A network that knows x0 and eps: it checks its input is the forward noising at timestep t and outputs
    the exact eps or v."""
    abar = proc.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()

    def net(x_in, noise_cond):
        seen.update(x_in=x_in, noise_cond=noise_cond)
        return eps if proc.parameterization == "eps" else a * eps - s * x0

    return net, a * x0 + s * eps


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_denoiser_at_a_training_sigma_inverts_the_forward_noising(parameterization):
    proc = DiscreteDiffusion(parameterization=parameterization)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 5, 5, generator=g, dtype=F64) * 2 - 1
    eps = torch.randn(4, 3, 5, 5, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 437, 999])
    seen = {}
    net, x_t = _oracle(proc, x0, eps, t, seen)
    sigma = proc.train_sigmas[t]
    x_ve = x_t / proc.alphas_cumprod[t].sqrt().reshape(-1, 1, 1, 1)  # = x0 + sigma eps
    torch.testing.assert_close(x_ve, x0 + sigma.reshape(-1, 1, 1, 1) * eps)
    torch.testing.assert_close(proc.denoiser(net)(x_ve, sigma), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(seen["x_in"], x_t, rtol=1e-12, atol=1e-12)  # the network sees x_t itself ...
    torch.testing.assert_close(seen["noise_cond"], t.double() / 1000, rtol=0, atol=1e-12)  # ... at t / T


def test_noise_cond_between_and_beyond_the_training_levels():
    seen = {}

    def net(x, c):
        seen["c"] = c
        return torch.zeros_like(x)

    for cond, scale in (("scaled", 1000.0), ("raw", 1.0)):
        proc = DiscreteDiffusion(timestep_cond=cond)
        log_mid = (proc.train_sigmas[[10, 700]].log() + proc.train_sigmas[[11, 701]].log()) / 2
        sigma = torch.cat([log_mid.exp(), torch.tensor([1e-6, 1e6], dtype=F64)])
        proc.denoiser(net)(torch.zeros(4, 1, 2, 2, dtype=F64), sigma)
        torch.testing.assert_close(seen["c"] * scale, torch.tensor([10.5, 700.5, 0.0, 999.0], dtype=F64))
        proc.loss(net, torch.zeros(2, 1, 2, 2), t=torch.tensor([3, 998]))
        torch.testing.assert_close(seen["c"] * scale, torch.tensor([3.0, 998.0]))


def _gaussian_net(proc, var):
    """The exact eps-network for data N(0, var): sigma from its (fractional) timestep as the process
    interpolates it, then eps = (x_VE - x0_hat) / sigma."""
    log_sigmas = proc.train_sigmas.log()

    def net(x_t, noise_cond):
        t = noise_cond.double() * proc.num_train_timesteps
        low = t.floor().long().clamp(max=proc.num_train_timesteps - 2)
        sigma = torch.exp(torch.lerp(log_sigmas[low], log_sigmas[low + 1], t - low)).reshape(-1, 1, 1, 1)
        x = x_t.double() * (1 + sigma**2).sqrt()
        return ((x - gaussian_denoiser(var)(x, sigma.flatten())) / sigma).to(x_t.dtype)

    return net


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_draws_the_data_on_the_default_grid(sampler):
    proc = DiscreteDiffusion()
    var = 0.4**2
    grid = proc.sigmas(100 if sampler == "euler_ancestral" else None)  # DDPM's sampler needs 100+ steps
    x = proc.initial_noise((512, 1, 4, 4), grid, torch.Generator().manual_seed(0), dtype=F64)
    assert x.std().item() == pytest.approx(math.sqrt(1 + grid[0].item() ** 2), rel=0.05)
    out = SAMPLERS[sampler](proc.denoiser(_gaussian_net(proc, var)), x, grid,
                            generator=torch.Generator().manual_seed(1))
    # the last level (timestep 39, sigma 0.2, at 25 steps) ends in E[x0 | x] there, of std var / sqrt(var + s^2)
    expected = var / math.sqrt(var + grid[-2].item() ** 2)
    assert torch.isfinite(out).all() and out.std().item() == pytest.approx(expected, rel=0.06)


def test_leading_grid_reaches_the_lowest_level():
    proc = DiscreteDiffusion(timestep_spacing="leading", default_steps=50)
    grid = proc.sigmas()
    x = proc.initial_noise((512, 1, 4, 4), grid, torch.Generator().manual_seed(0), dtype=F64)
    out = SAMPLERS[proc.default_sampler](proc.denoiser(_gaussian_net(proc, 0.16)), x, grid)
    assert out.std().item() == pytest.approx(0.4, rel=0.05)


def test_v_parameterization_round_trips_a_mixture_in_float64():
    proc = DiscreteDiffusion(parameterization="v", timestep_cond="raw")
    log_sigmas = proc.train_sigmas.log()

    def net(x_t, t):  # the exact v-network of the test mixture
        low = t.floor().long().clamp(max=998)
        sigma = torch.exp(torch.lerp(log_sigmas[low], log_sigmas[low + 1], t - low)).reshape(-1, 1, 1, 1)
        alpha, s_vp = torch.rsqrt(1 + sigma**2), sigma * torch.rsqrt(1 + sigma**2)
        x0 = mixture_denoiser(x_t / alpha, sigma.flatten())
        return alpha * (x_t - alpha * x0) / s_vp - s_vp * x0

    sigma = torch.tensor([0.03, 0.5, 2.0, 14.0], dtype=F64)
    x = torch.randn(4, 2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(0)) * sigma.reshape(4, 1, 1, 1)
    torch.testing.assert_close(proc.denoiser(net)(x, sigma), mixture_denoiser(x, sigma), rtol=1e-9, atol=1e-10)


def test_config_round_trip_registration_and_errors():
    proc = DiscreteDiffusion("linear", 500, 0.0001, 0.02, "v", "huber", 5.0, "leading", "raw", "ddim", 50)
    config = json.loads(json.dumps(proc.config))
    assert DiscreteDiffusion(**config).config == proc.config
    assert DIFFUSIONS["DiscreteDiffusion"] is DiscreteDiffusion and diffusion_kind(proc) == "DiscreteDiffusion"
    assert diffusion_from_config("DiscreteDiffusion", config).config == proc.config
    bad = [({"beta_schedule": "cosine"}, "beta_schedule"), ({"parameterization": "x0"}, "parameterization"),
           ({"timestep_spacing": "linspace"}, "timestep_spacing"), ({"timestep_cond": "log"}, "timestep_cond"),
           ({"beta_start": 0.02, "beta_end": 0.01}, "beta_start"), ({"num_train_timesteps": 1}, "num_train"),
           ({"loss_type": "l3"}, "loss_type"), ({"default_steps": 0}, "default_steps"),
           ({"min_snr_gamma": 0.0}, "min_snr_gamma")]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=f"^{name}"):
            DiscreteDiffusion(**kwargs)
    with pytest.raises(ValueError, match="^steps"):
        DiscreteDiffusion().sigmas(1001)
    with pytest.raises(ValueError, match="^steps"):
        DiscreteDiffusion(timestep_spacing="leading").sigmas(1000)


def test_a_cascade_stage_trains_saves_loads_and_samples_with_it(tmp_path):
    from imagen_lib.cascade import Cascade
    from imagen_lib.config import build_cascade

    config = tiny_config(text=False)
    config["text_embed_dim"] = None
    config["stages"] = config["stages"][:1]
    config["stages"][0]["diffusion"] = {"kind": "DiscreteDiffusion", "config": {"parameterization": "v",
                                                                                 "default_steps": 4}}
    config["stages"][0]["sampler"] = {"cond_scale": 1.0}
    cascade = build_cascade(config)
    assert isinstance(cascade.stages[0].diffusion, DiscreteDiffusion)
    optimizer = torch.optim.SGD(cascade.parameters(), lr=0.1)
    loss = cascade(images(4, 8), generator=torch.Generator().manual_seed(0))
    loss.backward()
    optimizer.step()
    cascade.save(tmp_path / "ck")
    loaded = Cascade.from_checkpoint(tmp_path / "ck")
    assert loaded.stages[0].diffusion.config == cascade.stages[0].diffusion.config
    a = cascade.eval().sample(num_images_per_prompt=2, seed=3, disable_progress=True)
    b = loaded.sample(num_images_per_prompt=2, seed=3, disable_progress=True)
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b)
