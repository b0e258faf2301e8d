"""The discrete-time DDPM process of Stable Diffusion (Ho et al. 2020; Rombach et al. 2022), beside the two
continuous processes of :mod:`.processes` and on the same protocol, so SD-style stages train and sample with
their own schedule and every sampler, guidance and inpainting of the library.

The schedule: ``beta_t`` for ``t = 0 .. T - 1`` (``T = num_train_timesteps``, 1000), ``alphabar_t =
prod_{s <= t} (1 - beta_s)``. ``"scaled_linear"`` (SD) is linear in ``sqrt(beta)`` from ``sqrt(beta_start)``
to ``sqrt(beta_end)``, then squared; ``"linear"`` (DDPM) is linear in ``beta``. SD's values are ``beta_start``
0.00085 and ``beta_end`` 0.012.

Training draws ``t`` uniformly from the T integers and noises ``x_t = sqrt(alphabar_t) x0 + sqrt(1 -
alphabar_t) eps``; the network predicts ``eps`` or ``v = sqrt(alphabar_t) eps - sqrt(1 - alphabar_t) x0``
(``parameterization``, ldm's and NeMo's name).

Sampling happens in the VE coordinates of the samplers: ``x_VE = x_t / sqrt(alphabar_t)``, ``sigma_t =
sqrt((1 - alphabar_t) / alphabar_t)``. ``denoiser(x, sigma)`` gives the network ``x / sqrt(1 + sigma^2)`` at the
timestep of ``sigma``, interpolated linearly in ``log sigma`` between the two nearest training timesteps (as
k-diffusion's ``DiscreteSchedule`` does), so any grid works; the default grid is made of training timesteps.

The network's ``noise_cond`` (``timestep_cond``): ``"scaled"`` (default) passes ``t / T`` in [0, 1), a range
the library's networks resolve (their noise embedding is laid out for values within a few units, like EDM's
``ln(sigma) / 4``; see docs/architecture.md); ``"raw"`` passes ``t`` itself in [0, T - 1], what published SD
U-Nets were trained with (diffusers' ``UNet2DConditionModel``, ldm's ``timestep_embedding``): use it with a
network whose timestep embedding expects raw timesteps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Optional

import torch
from torch import Tensor

from imagen_lib.diffusion.noise import Generator, rand, randn
from imagen_lib.diffusion.processes import (
    _LOSS_TYPES,
    LossType,
    Net,
    Reduction,
    _check_choice,
    _check_defaults,
    _check_x0,
    _loss,
    _per_sample,
    _reduce,
    register_diffusion,
)
from imagen_lib.diffusion.schedules import initial_noise
from imagen_lib.validation import check_int, check_number

BETA_SCHEDULES = ("scaled_linear", "linear")
TIMESTEP_SPACINGS = ("trailing", "leading")


def discrete_betas(schedule: str = "scaled_linear", num_timesteps: int = 1000, beta_start: float = 0.00085,
                   beta_end: float = 0.012) -> Tensor:
    """``beta_t`` for ``t = 0 .. num_timesteps - 1`` in float64: ``"scaled_linear"`` (SD, the default)
    ``linspace(sqrt(beta_start), sqrt(beta_end), n) ** 2``, ``"linear"`` ``linspace(beta_start, beta_end, n)``."""
    _check_choice("beta_schedule", schedule, BETA_SCHEDULES)
    n = check_int("num_train_timesteps", num_timesteps, low=2)
    if not 0 < beta_start < beta_end < 1:
        raise ValueError(f"beta_start, beta_end: expected 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2


@register_diffusion
class DiscreteDiffusion:
    """Discrete-time DDPM with Stable Diffusion's schedule (see the module docstring for the maths).

    Args (defaults are SD's):
        beta_schedule: ``"scaled_linear"`` (default) or ``"linear"``.
        num_train_timesteps: T, 1000.
        beta_start, beta_end: 0.00085 and 0.012.
        parameterization: ``"eps"`` (default; SD 1.x, SD 2 base) or ``"v"`` (SD 2 768-v).
        loss_type: ``"l2"`` (default, SD's), ``"l1"`` or ``"huber"``, on the prediction.
        min_snr_gamma: if set, Min-SNR-gamma loss weighting (Hang et al. 2023, paper value 5; popular for SD
            fine-tuning), ``min(snr, gamma) / snr`` for eps and ``min(snr, gamma) / (snr + 1)`` for v, with ``snr =
            alphabar / (1 - alphabar)``; default None (unweighted, SD's).
        timestep_spacing: the sampling grid's timesteps (:meth:`timesteps`): ``"trailing"`` (default; starts at
            ``T - 1``, the noisiest level trained, so sampling starts from what the network knows: Lin et al.
            2024) or ``"leading"`` (SD's original DDIM/PNDM grid, ``T // steps`` apart from timestep 1, which
            never reaches ``T - 1``).
        timestep_cond: the network's ``noise_cond``: ``"scaled"`` (default) ``t / T``, or ``"raw"`` ``t``.
        default_sampler, default_steps: ``"dpmpp_2m"`` and 25 (the library's default; DPM-Solver++(2M) is also
            the common choice for SD); ``"ddim"`` with 50 steps is SD's reference setting.
    """

    variance_preserving = True

    def __init__(
        self, beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear", num_train_timesteps: int = 1000,
        beta_start: float = 0.00085, beta_end: float = 0.012, parameterization: Literal["eps", "v"] = "eps",
        loss_type: LossType = "l2", min_snr_gamma: Optional[float] = None,
        timestep_spacing: Literal["trailing", "leading"] = "trailing",
        timestep_cond: Literal["scaled", "raw"] = "scaled", default_sampler: str = "dpmpp_2m",
        default_steps: int = 25,
    ):
        beta_start, beta_end = check_number("beta_start", beta_start), check_number("beta_end", beta_end)
        self.betas = discrete_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        _check_choice("parameterization", parameterization, ("eps", "v"))
        _check_choice("loss_type", loss_type, _LOSS_TYPES)
        min_snr_gamma = check_number("min_snr_gamma", min_snr_gamma, low=0, low_open=True, optional=True)
        _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("timestep_cond", timestep_cond, ("scaled", "raw"))
        _check_defaults(default_sampler, default_steps)
        self.beta_schedule, self.num_train_timesteps = beta_schedule, int(num_train_timesteps)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.parameterization, self.loss_type = parameterization, loss_type
        self.min_snr_gamma = None if min_snr_gamma is None else float(min_snr_gamma)
        self.timestep_spacing, self.timestep_cond = timestep_spacing, timestep_cond
        self.default_sampler, self.default_steps = default_sampler, int(default_steps)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # float64 (T,)
        self.train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()  # increasing in t
        self._log_sigmas = self.train_sigmas.log()

    @property
    def config(self) -> dict:
        """Plain JSON values; ``DiscreteDiffusion(**proc.config)`` rebuilds this process."""
        keys = ("beta_schedule", "num_train_timesteps", "beta_start", "beta_end", "parameterization", "loss_type",
                "min_snr_gamma", "timestep_spacing", "timestep_cond", "default_sampler", "default_steps")
        return {k: getattr(self, k) for k in keys}

    def __repr__(self) -> str:
        return f"DiscreteDiffusion({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"

    # ----------------------------------------------------------------------------------------------------

    def noise_cond(self, t: Tensor) -> Tensor:
        """The network's conditioning value at (possibly fractional) timesteps ``t``: ``t / T`` or ``t``."""
        return t / self.num_train_timesteps if self.timestep_cond == "scaled" else t

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The fractional timestep (float64, same shape) of VE levels ``sigma``: linear in ``log sigma`` between
        the two nearest training levels, clamped to [0, T - 1]; exactly ``t`` at a training level's sigma."""
        log_sigmas = self._log_sigmas.to(sigma.device)
        log_sigma = sigma.to(torch.float64).clamp_min(1e-30).log().clamp(log_sigmas[0], log_sigmas[-1])
        high = torch.searchsorted(log_sigmas, log_sigma).clamp(1, self.num_train_timesteps - 1)
        low = high - 1
        w = (log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
        return low + w

    def to_x0(self, out: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        """The x0 prediction from the network output ``out`` at the VE point ``x`` (the VP point ``alpha x``,
        ``alpha = 1 / sqrt(1 + sigma^2)``); ``sigma`` broadcasts against ``x``."""
        if self.parameterization == "eps":  # x0 = x - sigma eps, without dividing by a tiny alpha
            return x - sigma * out
        alpha = torch.rsqrt(1 + sigma**2)
        return alpha**2 * x - sigma * alpha * out  # x0 = alpha x_t - sigma_vp v, x_t = alpha x, sigma_vp = sigma alpha

    def denoise(self, net: Net, x: Tensor, sigma: Tensor, **net_kwargs) -> Tensor:
        """VE denoiser ``x0_hat(x, sigma)``; ``sigma`` scalar or (B,)."""
        sigma = _per_sample(sigma, x)
        t = self.sigma_to_t(sigma.flatten())
        out = net(torch.rsqrt(1 + sigma**2) * x, self.noise_cond(t).to(x.dtype), **net_kwargs).to(x.dtype)
        return self.to_x0(out, x, sigma)

    def denoiser(self, net: Net, **net_kwargs) -> Callable[[Tensor, Tensor], Tensor]:
        """The sampler's ``denoiser(x, sigma) -> x0_hat`` with ``net_kwargs`` bound."""
        return lambda x, sigma: self.denoise(net, x, sigma, **net_kwargs)

    # ----------------------------------------------------------------------------------------------------

    def sample_timesteps(self, batch: int, generator: Generator = None, device=None) -> Tensor:
        """Training timesteps (B,) int64, uniform over ``0 .. T - 1``."""
        u = rand((batch,), generator, device, torch.float64)
        return (u * self.num_train_timesteps).floor().long().clamp(max=self.num_train_timesteps - 1)

    def loss(
        self, net: Net, x0: Tensor, *, generator: Generator = None, t: Optional[Tensor] = None,
        reduction: Reduction = "mean", sample_weight: Optional[Tensor] = None, **net_kwargs,
    ) -> Tensor:
        """Training loss on clean images (or latents) ``x0`` (B, C, H, W).

        ``t`` (B,) integer timesteps fixes the levels (default: uniform); ``reduction="none"`` returns the (B,)
        per-sample losses; ``sample_weight`` (B,) multiplies them before the reduction.
        """
        _check_x0(x0)
        b = x0.shape[0]
        t = self.sample_timesteps(b, generator, x0.device) if t is None else self._check_t(t, b, x0.device)
        abar = self.alphas_cumprod.to(x0.device)[t]
        shape = (-1, *([1] * (x0.ndim - 1)))
        alpha, sigma_vp = abar.sqrt().to(x0.dtype).reshape(shape), (1 - abar).sqrt().to(x0.dtype).reshape(shape)
        eps = randn(x0.shape, generator, x0.device, x0.dtype)
        out = net(alpha * x0 + sigma_vp * eps, self.noise_cond(t.to(x0.dtype)), **net_kwargs).to(x0.dtype)
        target = eps if self.parameterization == "eps" else alpha * eps - sigma_vp * x0
        per_sample = _loss(out, target, self.loss_type) * self.loss_weight(abar).to(x0.dtype)
        return _reduce(per_sample, reduction, sample_weight)

    def loss_weight(self, alphas_cumprod: Tensor) -> Tensor:
        """Min-SNR-gamma weight at these ``alphabar`` values (1 when ``min_snr_gamma`` is None)."""
        if self.min_snr_gamma is None:
            return torch.ones_like(alphas_cumprod)
        snr = alphas_cumprod / (1 - alphas_cumprod)
        clipped = snr.clamp(max=self.min_snr_gamma)
        return clipped / snr if self.parameterization == "eps" else clipped / (snr + 1)

    def _check_t(self, t, batch: int, device) -> Tensor:
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,) or t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"t: expected integer timesteps of shape ({batch},), got {t.dtype} {tuple(t.shape)}")
        if bool((t < 0).any() or (t >= self.num_train_timesteps).any()):
            raise ValueError(f"t: expected timesteps in [0, {self.num_train_timesteps - 1}]")
        return t.long()

    # ----------------------------------------------------------------------------------------------------

    def timesteps(self, steps: Optional[int] = None) -> Tensor:
        """The sampling grid's training timesteps (int64, decreasing, ``steps`` of them, at most T):
        ``"trailing"``: ``round(T - i T / steps) - 1`` (999, 959, ... for 25 steps); ``"leading"``:
        ``(steps - 1 - i) (T // steps) + 1`` (961, 921, ..., 1: SD's scheduler with ``steps_offset`` 1; at most
        T - 1 steps)."""
        # leading starts at timestep 1, so its ``steps`` levels fit below T only up to T - 1 of them
        most = self.num_train_timesteps - (self.timestep_spacing == "leading")
        steps = check_int("steps", self.default_steps if steps is None else steps, low=1, high=most)
        i = torch.arange(steps, dtype=torch.float64)
        if self.timestep_spacing == "trailing":
            return (torch.round(self.num_train_timesteps - i * (self.num_train_timesteps / steps)) - 1).long()
        return ((steps - 1 - i) * (self.num_train_timesteps // steps) + 1).long()

    def sigmas(self, steps: Optional[int] = None, device=None) -> Tensor:
        """The VE levels of :meth:`timesteps`, then 0 (float64, decreasing)."""
        sigmas = self.train_sigmas[self.timesteps(steps)]
        return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device)

    def initial_noise(self, shape, sigmas: Tensor, generator: Generator = None, device=None,
                      dtype: torch.dtype = torch.float32) -> Tensor:
        """``sqrt(1 + sigmas[0]^2) * noise``: unit-variance noise in the VP space, the process's prior."""
        return initial_noise(shape, sigmas, generator, process="vp", device=device, dtype=dtype)
