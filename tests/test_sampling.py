"""Samplers against closed-form optimal denoisers: a Gaussian mixture and a single Gaussian."""

import math

import pytest
import torch

from imagen_lib.diffusion import samplers, schedules
from imagen_lib.diffusion.noise import randn
from imagen_lib.diffusion.samplers import SAMPLERS
from imagen_lib.diffusion.schedules import initial_noise, karras_sigmas, log_snr_sigmas

# a 1-D two-mode mixture: weights, means, stds
WEIGHTS, MEANS, STDS = (0.3, 0.7), (-1.0, 1.0), (0.15, 0.15)
MIX_MEAN = sum(w * m for w, m in zip(WEIGHTS, MEANS))
MIX_STD = math.sqrt(sum(w * (s**2 + m**2) for w, m, s in zip(WEIGHTS, MEANS, STDS)) - MIX_MEAN**2)


def mixture_denoiser(x, sigma, weights=WEIGHTS, means=MEANS, stds=STDS):
    """E[x0 | x] for x = x0 + sigma eps and x0 from an isotropic Gaussian mixture (any number of dims)."""
    s2 = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(torch.float64) ** 2
    xd = x.to(torch.float64)
    dims = x[0].numel()
    logits, means_post = [], []
    for w, m, s in zip(weights, means, stds):
        var = s**2 + s2
        sq = ((xd - m) ** 2 / var).flatten(1).sum(1)
        logits.append(math.log(w) - 0.5 * dims * torch.log(var.flatten(1)[:, 0]) - 0.5 * sq)
        means_post.append(m + (s**2 / var) * (xd - m))
    resp = torch.softmax(torch.stack(logits), dim=0).reshape(len(weights), *([x.shape[0]] + [1] * (x.ndim - 1)))
    return sum(r * mp for r, mp in zip(resp, means_post)).to(x.dtype)


def gaussian_denoiser(var):
    return lambda x, sigma: x * (var / (var + sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2))


MIXTURE_CASES = {
    "heun": dict(steps=32, options={}),
    "heun_churn": dict(steps=32, options=dict(S_churn=40.0, S_tmin=0.05, S_tmax=50.0, S_noise=1.0)),
    "euler": dict(steps=100, options={}),
    "euler_ancestral": dict(steps=100, options={}),
    "ddim": dict(steps=50, options={}),
    "dpmpp_2m": dict(steps=25, options={}),
}


@pytest.mark.parametrize("case", sorted(MIXTURE_CASES))
def test_every_sampler_draws_the_gaussian_mixture(case):
    name = case.replace("_churn", "")
    steps, options = MIXTURE_CASES[case]["steps"], MIXTURE_CASES[case]["options"]
    grid = karras_sigmas(steps)
    gen = torch.Generator().manual_seed(0)
    x = initial_noise((4000, 1, 1, 1), grid, gen, dtype=torch.float64)
    out = SAMPLERS[name](mixture_denoiser, x, grid, generator=gen, **options).flatten()
    assert out.mean().item() == pytest.approx(MIX_MEAN, abs=0.05)
    assert out.std().item() == pytest.approx(MIX_STD, abs=0.03)
    upper = out > 0
    assert upper.double().mean().item() == pytest.approx(WEIGHTS[1], abs=0.03)
    # each mode is resolved with its own width, not blurred or collapsed
    assert out[upper].std().item() == pytest.approx(STDS[1], rel=0.15)
    assert out[~upper].mean().item() == pytest.approx(MEANS[0], abs=0.05)


@pytest.mark.parametrize("name, steps", [("heun", 64), ("dpmpp_2m", 64), ("ddim", 400), ("euler", 400)])
def test_deterministic_samplers_match_a_gaussians_std_within_one_percent(name, steps):
    var = 0.5**2
    grid = karras_sigmas(steps)
    noise = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = (noise - noise.mean()) / noise.std()  # exactly unit std: the flow is linear, no Monte Carlo error
    out = SAMPLERS[name](gaussian_denoiser(var), noise * grid[0].item(), grid)
    exact_scale = math.sqrt(var) / math.sqrt(var + grid[0].item() ** 2) * grid[0].item()
    assert out.std().item() == pytest.approx(math.sqrt(var), rel=0.01)
    assert out.std().item() == pytest.approx(exact_scale, rel=0.01)


@pytest.mark.parametrize("name, order", [("heun", 2), ("dpmpp_2m", 2), ("euler", 1)])
def test_sampler_convergence_order(name, order):
    # on a Gaussian the probability-flow ODE is x ~ sqrt(var + sigma^2); doubling the steps divides the
    # error by 2^order
    var = 0.25
    errors = []
    for steps in (16, 32):
        grid = karras_sigmas(steps)
        x = torch.full((1, 1, 1, 1), grid[0].item(), dtype=torch.float64)
        exact = grid[0].item() * math.sqrt(var / (var + grid[0].item() ** 2))
        errors.append(abs(SAMPLERS[name](gaussian_denoiser(var), x, grid).item() - exact))
    assert errors[0] / errors[1] == pytest.approx(2**order, rel=0.25)


def test_ddim_without_noise_is_euler_and_with_full_noise_is_ancestral():
    grid = karras_sigmas(10)
    x = initial_noise((8, 1, 2, 2), grid, torch.Generator().manual_seed(0), dtype=torch.float64)
    ddim = samplers.sample_ddim(mixture_denoiser, x, grid)
    assert torch.allclose(ddim, samplers.sample_euler(mixture_denoiser, x, grid), atol=1e-12)
    anc = samplers.sample_euler_ancestral(mixture_denoiser, x, grid, generator=torch.Generator().manual_seed(1))
    ddim1 = samplers.sample_ddim(mixture_denoiser, x, grid, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(anc, ddim1) and not torch.allclose(anc, ddim)


def test_float64_grid_with_float32_images_calls_the_denoiser_in_float32():
    seen = []

    def denoiser(x, sigma):
        seen.append((x.dtype, sigma.dtype, tuple(sigma.shape)))
        return gaussian_denoiser(0.25)(x, sigma)

    events = []
    grid = karras_sigmas(5)
    assert grid.dtype == torch.float64
    for name, fn in SAMPLERS.items():
        seen.clear(), events.clear()
        x = torch.randn(3, 2, 4, 4) * 80
        out = fn(denoiser, x, grid, generator=torch.Generator().manual_seed(0), callback=events.append)
        assert out.dtype == torch.float32 and out.shape == x.shape, name
        assert set(seen) == {(torch.float32, torch.float32, (3,))}, name
        assert [e["i"] for e in events] == list(range(5)), name
        assert set(events[0]) == {"i", "x", "sigma", "denoised"}
        assert events[0]["sigma"] == pytest.approx(80.0)


def test_progress_bar_is_shown_only_when_asked(capsys):
    grid = karras_sigmas(3)
    x = torch.randn(1, 1, 2, 2)
    samplers.sample_dpmpp_2m(gaussian_denoiser(0.25), x, grid, disable_progress=False)
    assert "dpmpp_2m" in capsys.readouterr().err
    samplers.sample_dpmpp_2m(gaussian_denoiser(0.25), x, grid)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_image_k_does_not_depend_on_its_batch(name):
    grid = karras_sigmas(6)
    options = {"S_churn": 10.0} if name in ("heun", "euler") else {}

    def draw(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        x = initial_noise((len(seeds), 3, 8, 8), grid, gens)
        return SAMPLERS[name](mixture_denoiser, x, grid, generator=gens, **options)

    batch = draw([10, 11, 12])
    alone = draw([11])
    assert torch.allclose(batch[1], alone[0], rtol=0, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


def test_randn_generator_rules():
    a = randn((2, 3), [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)])
    assert torch.equal(a[1], torch.randn(3, generator=torch.Generator().manual_seed(6)))
    one = randn((2, 3), torch.Generator().manual_seed(5))
    assert torch.equal(one, torch.randn(2, 3, generator=torch.Generator().manual_seed(5)))
    assert randn((4,), None, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="generator"):
        randn((3, 2), [torch.Generator(), torch.Generator()])
    with pytest.raises(TypeError, match="generator"):
        randn((1, 2), ["seed"])


def test_initial_noise_scales_for_each_process():
    grid = torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64)
    ve = initial_noise((2, 4), grid, torch.Generator().manual_seed(0))
    vp = initial_noise((2, 4), grid, torch.Generator().manual_seed(0), process="vp")
    base = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ve, base * 10) and torch.allclose(vp, base * math.sqrt(101))
    with pytest.raises(ValueError, match="process"):
        initial_noise((1,), grid, process="edm")


def test_karras_grid():
    s = karras_sigmas(10, 0.002, 80.0, 7.0)
    assert s.dtype == torch.float64 and s.shape == (11,)
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002) and s[-1] == 0
    assert (s[1:] < s[:-1]).all()
    # eq. 5: the rho-th roots are evenly spaced
    roots = s[:-1] ** (1 / 7)
    assert torch.allclose(roots.diff(), roots.diff()[0].expand(9), atol=1e-12)
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(5, 1.0, 0.5)


def test_log_snr_schedules_against_their_definitions():
    t = torch.linspace(0, 0.95, 20, dtype=torch.float64)
    alpha2 = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    assert torch.allclose(torch.sigmoid(schedules.log_snr_cosine(t)), alpha2, atol=1e-12)
    # linear schedule: sigma_vp^2 = 1 - exp(-(1e-4 + 10 t^2))
    sigma2 = 1 - torch.exp(-(1e-4 + 10 * t**2))
    assert torch.allclose(torch.sigmoid(-schedules.log_snr_linear(t)), sigma2, atol=1e-12)
    assert schedules.log_snr_cosine(torch.tensor(1.0)).item() == schedules.LOG_SNR_MIN
    grid = log_snr_sigmas(8, "linear")
    assert grid.shape == (9,) and grid[-1] == 0 and (grid[1:] < grid[:-1]).all()
    assert grid[-2].item() == pytest.approx(math.exp(math.log(1e-4) / 2), rel=1e-3)
    with pytest.raises(ValueError, match="schedule"):
        log_snr_sigmas(8, "quadratic")


def test_bad_grids_and_inputs_are_rejected():
    x = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="sigmas"):
        samplers.sample_heun(gaussian_denoiser(1.0), x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="sigmas"):
        samplers.sample_euler(gaussian_denoiser(1.0), x, torch.tensor([1.0]))
    with pytest.raises(TypeError, match="x"):
        samplers.sample_ddim(gaussian_denoiser(1.0), torch.ones(1, 2, dtype=torch.long), karras_sigmas(2))
    with pytest.raises(ValueError, match="sampler"):
        samplers.get_sampler("plms")
