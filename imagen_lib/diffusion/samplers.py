"""Samplers in the variance-exploding (VE) parametrisation.

Every sampler here works on one protocol (Karras et al. 2022): a denoiser ``denoiser(x, sigma) -> x0_hat``
where ``x = x0 + sigma * eps`` and ``sigma`` is a ``(B,)`` tensor in the dtype of ``x``
(:data:`imagen_lib.protocols.Denoiser`). Grids come from :mod:`imagen_lib.diffusion.schedules`, noise from
:mod:`imagen_lib.diffusion.noise`.

All samplers share one signature::

    sample_X(denoiser, x, sigmas, *, generator=None, callback=None, disable_progress=True, **options) -> x

``sigmas`` is a decreasing grid (usually ending at 0; float64 is welcome: the grid arithmetic is done in
float64 Python floats, the denoiser is always called in the dtype of ``x``). ``callback`` receives a dict
``{"i", "x", "sigma", "denoised"}`` after every step.

Recommended settings (what the processes use by default):

* the library default is ``dpmpp_2m`` (DPM-Solver++(2M), Lu et al. 2022) with 25 steps: one network
  evaluation per step and good images in 20-25 steps, for both processes;
* ``heun`` with 32 steps on the Karras grid (63 evaluations) is the EDM reference-quality setting
  (Karras et al. 2022, Table 1 uses 18-40 steps); add ``S_churn`` (40-80) for stochastic sampling;
* ``euler_ancestral`` is the DDPM ancestral sampler (Ho et al. 2020): from noise a base model needs 100+
  steps, but its fresh noise at every step cleans edges on a super-resolution stage (the shapes main job
  samples its SR stage with 25);
* ``ddim`` with ``eta=0`` is the deterministic DDIM of Song et al. 2021 (identical to ``euler`` in the
  VE parametrisation), ``eta=1`` is the ancestral sampler.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from imagen_lib.diffusion.noise import Generator, randn
from imagen_lib.protocols import Denoiser
from imagen_lib.validation import check_finite, check_number, typechecked

Callback = Optional[Callable[[dict], None]]
Sigmas = Union[Tensor, Sequence[float]]

# the samplers' numeric options and what each accepts (``S_tmax`` may be infinite: churn at every level)
_OPTION_BOUNDS: dict[str, dict[str, Any]] = {
    "S_churn": {"low": 0}, "S_tmin": {"low": 0}, "S_tmax": {"low": 0, "allow_inf": True}, "S_noise": {"low": 0},
    "eta": {"low": 0}, "s_noise": {"low": 0},
}


def _check_options(**options: Any) -> None:
    """The samplers' numeric options, each checked against :data:`_OPTION_BOUNDS` (values are left as given)."""
    for name, value in options.items():
        check_number(name, value, **_OPTION_BOUNDS[name])


def _grid(sigmas: Tensor | Sequence[float]) -> list[float]:
    """Check a grid and return it as float64 Python floats (all grid arithmetic happens in float64)."""
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(f"sigmas: expected a 1-D grid of at least 2 levels, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all() or (s < 0).any() or not (s[1:] < s[:-1]).all():
        raise ValueError("sigmas: expected finite, non-negative, strictly decreasing levels")
    return s.tolist()


def _check_x(x: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise TypeError("x: expected a floating-point tensor with a batch dimension")
    check_finite("x", x)


def _den(denoiser: Denoiser, x: Tensor, sigma: float) -> Tensor:
    """Call the denoiser with a (B,) sigma in the dtype of x."""
    return denoiser(x, x.new_full((x.shape[0],), sigma))


def _report(callback: Callback, i: int, x: Tensor, sigma: float, denoised: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})


def _churn(
    x: Tensor, sigma: float, n_steps: int, generator: Generator,
    S_churn: float, S_tmin: float, S_tmax: float, S_noise: float,
) -> tuple[Tensor, float]:
    """Karras Alg. 2 lines 4-6: raise the noise level from sigma to sigma_hat = sigma (1 + gamma)."""
    gamma = min(S_churn / n_steps, math.sqrt(2) - 1) if S_tmin <= sigma <= S_tmax else 0.0
    sigma_hat = sigma * (1 + gamma)
    if gamma > 0:
        eps = randn(x.shape, generator, x.device, x.dtype) * S_noise
        x = x + eps * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


@torch.no_grad()
@typechecked
def sample_heun(
    denoiser: Denoiser, x: Tensor, sigmas: Sigmas, *, generator: Generator = None, callback: Callback = None,
    disable_progress: bool = True, S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = float("inf"),
    S_noise: float = 1.0, second_order: bool = True,
) -> Tensor:
    """Heun's 2nd-order sampler, Algorithm 2 of Karras et al. 2022 (deterministic when ``S_churn`` is 0).

    Stochasticity: ``S_churn`` 0 (paper: 40-80 on ImageNet-64), ``S_tmin`` 0 (paper 0.05), ``S_tmax`` inf
    (paper 50), ``S_noise`` 1.0 (paper 1.003). The last step to sigma 0 is an Euler step.
    """
    _check_options(S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise)
    _check_x(x)
    grid = _grid(sigmas)
    n = len(grid) - 1
    for i in tqdm(range(n), disable=disable_progress, desc="heun" if second_order else "euler"):
        sigma, sigma_next = grid[i], grid[i + 1]
        x, sigma_hat = _churn(x, sigma, n, generator, S_churn, S_tmin, S_tmax, S_noise)
        denoised = _den(denoiser, x, sigma_hat)
        d = (x - denoised) / sigma_hat
        x_next = x + d * (sigma_next - sigma_hat)  # Euler step
        if second_order and sigma_next > 0:  # 2nd-order correction
            d_next = (x_next - _den(denoiser, x_next, sigma_next)) / sigma_next
            x_next = x + (d + d_next) * (0.5 * (sigma_next - sigma_hat))
        x = x_next
        _report(callback, i, x, sigma, denoised)
    return x


@typechecked
def sample_euler(
    denoiser: Denoiser, x: Tensor, sigmas: Sigmas, *, generator: Generator = None, callback: Callback = None,
    disable_progress: bool = True, S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = float("inf"),
    S_noise: float = 1.0,
) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 without the correction).

    Accepts the same churn options as :func:`sample_heun` (all off by default).
    """
    return sample_heun(
        denoiser, x, sigmas, generator=generator, callback=callback, disable_progress=disable_progress,
        S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise, second_order=False,
    )


@torch.no_grad()
@typechecked
def sample_ddim(
    denoiser: Denoiser, x: Tensor, sigmas: Sigmas, *, generator: Generator = None, callback: Callback = None,
    disable_progress: bool = True, eta: float = 0.0, s_noise: float = 1.0,
) -> Tensor:
    """DDIM (Song et al. 2021) written in sigma: ``eta`` 0 (default) is deterministic, 1 is DDPM ancestral.

    From ``sigma`` to ``sigma_next`` the exact Gaussian posterior given ``x0_hat`` has mean
    ``x0_hat + (sigma_next / sigma)^2 (x - x0_hat)`` and std ``sigma_next sqrt(1 - (sigma_next / sigma)^2)``;
    DDIM keeps ``eta`` times that std and puts the rest of ``sigma_next`` on the predicted noise direction.
    """
    _check_options(eta=eta, s_noise=s_noise)
    return _ddim_steps(denoiser, x, sigmas, generator, callback, disable_progress, eta, s_noise, "ddim")


@torch.no_grad()
def _ddim_steps(denoiser, x, sigmas, generator, callback, disable_progress, eta, s_noise, label) -> Tensor:
    """The DDIM loop of :func:`sample_ddim`; ``label`` names the progress bar after the sampler asked for."""
    _check_x(x)
    grid = _grid(sigmas)
    for i in tqdm(range(len(grid) - 1), disable=disable_progress, desc=label):
        sigma, sigma_next = grid[i], grid[i + 1]
        denoised = _den(denoiser, x, sigma)
        ratio = sigma_next / sigma
        sigma_up = eta * sigma_next * math.sqrt(max(1.0 - ratio**2, 0.0))
        sigma_down = math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))
        x = denoised + (x - denoised) * (sigma_down / sigma)  # deterministic part
        if sigma_up > 0:  # fresh noise
            x = x + randn(x.shape, generator, x.device, x.dtype) * (sigma_up * s_noise)
        _report(callback, i, x, sigma, denoised)
    return x


@typechecked
def sample_euler_ancestral(
    denoiser: Denoiser, x: Tensor, sigmas: Sigmas, *, generator: Generator = None, callback: Callback = None,
    disable_progress: bool = True, eta: float = 1.0, s_noise: float = 1.0,
) -> Tensor:
    """The DDPM ancestral step (Ho et al. 2020) in sigma: sample the exact posterior given ``x0_hat``.

    ``eta`` 1.0 (default) is DDPM; smaller values interpolate towards DDIM. ``s_noise`` scales the fresh noise.
    """
    _check_options(eta=eta, s_noise=s_noise)
    return _ddim_steps(denoiser, x, sigmas, generator, callback, disable_progress, eta, s_noise, "euler_ancestral")


@torch.no_grad()
@typechecked
def sample_dpmpp_2m(
    denoiser: Denoiser, x: Tensor, sigmas: Sigmas, *, generator: Generator = None, callback: Callback = None,
    disable_progress: bool = True,
) -> Tensor:
    """DPM-Solver++(2M), the multistep 2nd-order data-prediction solver of Lu et al. 2022 (their Alg. 2).

    Works in ``lambda = -log(sigma)``; the first step and the final step to sigma 0 are first order.
    One denoiser call per step: the library's default sampler, 20-25 steps. ``generator`` is unused.
    """
    _check_x(x)
    grid = _grid(sigmas)
    prev_denoised, h_prev = None, None
    for i in tqdm(range(len(grid) - 1), disable=disable_progress, desc="dpmpp_2m"):
        sigma, sigma_next = grid[i], grid[i + 1]
        denoised = _den(denoiser, x, sigma)
        if sigma_next == 0:  # the solution at sigma 0 is the last prediction
            x = denoised
        else:
            h = math.log(sigma / sigma_next)  # lambda_next - lambda
            estimate = denoised
            if prev_denoised is not None:  # 2nd-order multistep correction
                r = h_prev / h
                estimate = denoised * (1 + 1 / (2 * r)) - prev_denoised * (1 / (2 * r))
            x = x * (sigma_next / sigma) - estimate * math.expm1(-h)
            h_prev = h
        prev_denoised = denoised
        _report(callback, i, x, sigma, denoised)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "euler_ancestral": sample_euler_ancestral,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler called ``name`` in :data:`SAMPLERS`, with an error listing the choices."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]


# set by the caller of a sampler (Cascade.sample: the per-image generators), not by a sampler's options
_RESERVED_OPTIONS = ("denoiser", "x", "sigmas", "generator", "disable_progress")


def sampler_options(sampler: Optional[str] = None) -> list[str]:
    """The options a sampler takes (its keyword arguments besides the common ones); for ``None`` (a stage's
    default sampler) those of any sampler."""
    functions = [get_sampler(sampler)] if sampler is not None else list(SAMPLERS.values())
    names = {name for fn in functions for name in inspect.signature(fn).parameters}
    return sorted(names - set(_RESERVED_OPTIONS))


def check_sampler_options(options: Any, sampler: Optional[str] = None, extra: Sequence[str] = ()) -> dict:
    """``options`` (a mapping of sampler keyword arguments, e.g. ``{"eta": 0.5}``) checked: every name is an
    option of ``sampler`` (:func:`sampler_options`) or in ``extra``, numeric options are in range. Errors
    name the option as ``options.NAME``. Returns a copy; the values are left as given."""
    if not isinstance(options, Mapping):
        raise TypeError(f"options: expected a mapping of sampler options, got {type(options).__name__}")
    allowed = sorted({*sampler_options(sampler), *extra})
    for name, value in options.items():
        if name not in allowed:
            whose = f"the {sampler!r} sampler's" if sampler is not None else "a sampler's"
            raise ValueError(f"options.{name}: not one of {whose} options {allowed}")
        if name in _OPTION_BOUNDS:
            check_number(f"options.{name}", value, **_OPTION_BOUNDS[name])
    return dict(options)
