"""The two training processes: continuous-time VP diffusion (Imagen) and EDM (Karras et al. 2022).

Both follow one protocol (docs/architecture.md, "Diffusion process protocol")::

    proc.loss(net, x0, *, generator=None, reduction="mean", **net_kwargs) -> loss   # scalar, or (B,) with "none"
    proc.denoiser(net, **net_kwargs) -> denoiser(x, sigma) -> x0_hat              # VE space: x = x0 + sigma eps
    proc.sigmas(steps, device=None) -> (steps + 1,) float64 grid ending at 0
    proc.initial_noise(shape, sigmas, generator=None) -> the sampler's starting point
    proc.default_sampler, proc.default_steps, proc.config   # type(proc)(**proc.config) rebuilds it

The network is any callable ``net(x_scaled, noise_cond, **net_kwargs)`` with ``noise_cond`` of shape (B,):
``ln(sigma) / 4`` for EDM, the log-SNR for VP. Nothing here knows what the network is.

Recommended sampling (the ``default_sampler`` / ``default_steps`` each process reports):

* ``ElucidatedDiffusion``: ``dpmpp_2m`` with 25 steps on the Karras grid (0.002 to 80, rho 7) by default,
  25 network calls; ``heun`` with 32 steps (63 calls) for EDM reference quality (Karras et al. 2022):
  pass ``default_sampler="heun", default_steps=32``.
* ``GaussianDiffusionContinuous``: ``dpmpp_2m`` with 25 steps on a Karras grid from sigma 80 (log-SNR -8.8)
  down to the schedule's smallest level; ``euler_ancestral`` with 100+ steps is the DDPM sampler of the
  Imagen paper, ``heun`` 32 works as for EDM.

On the closed-form Gaussian of the tests, 25 steps of ``dpmpp_2m`` miss the data's std by about 2 %, 64 steps
by under 1 %; ``heun`` is the same per step at twice the network calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from imagen_lib.diffusion.noise import Generator, rand, randn
from imagen_lib.diffusion.schedules import LOG_SNR_SCHEDULES, initial_noise, karras_sigmas, log_snr_sigmas

Net = Callable[..., Tensor]
LossType = Literal["l1", "l2", "huber"]
Reduction = Literal["mean", "none"]
_LOSS_TYPES = ("l1", "l2", "huber")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def _check_defaults(default_sampler: str, default_steps: int) -> None:
    # the name itself is checked against the samplers by the cascade's Stage: the maths never sees samplers
    if not isinstance(default_sampler, str) or not default_sampler:
        raise ValueError(f"default_sampler: expected a sampler name, got {default_sampler!r}")
    if int(default_steps) < 1:
        raise ValueError(f"default_steps: expected a positive number of steps, got {default_steps}")


def _per_sample(x: Tensor, shape_of: Tensor) -> Tensor:
    """A (B,) or scalar level as a tensor that broadcasts against ``shape_of`` (B, C, H, W)."""
    x = torch.as_tensor(x, dtype=shape_of.dtype, device=shape_of.device)
    if x.ndim == 0:
        x = x.expand(shape_of.shape[0])
    if x.shape != (shape_of.shape[0],):
        raise ValueError(f"sigma: expected a scalar or shape ({shape_of.shape[0]},), got {tuple(x.shape)}")
    return x.reshape(-1, *([1] * (shape_of.ndim - 1)))


def _loss(pred: Tensor, target: Tensor, loss_type: str) -> Tensor:
    """Per-sample loss (B,): mean over every non-batch dimension."""
    if loss_type == "l2":
        err = (pred - target) ** 2
    elif loss_type == "l1":
        err = (pred - target).abs()
    else:  # huber with delta 1 (smooth L1)
        err = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)
    return err.flatten(1).mean(1)


def _reduce(per_sample: Tensor, reduction: str, sample_weight: Optional[Tensor]) -> Tensor:
    _check_choice("reduction", reduction, ("mean", "none"))
    if sample_weight is not None:
        sample_weight = torch.as_tensor(sample_weight, dtype=per_sample.dtype, device=per_sample.device)
        if sample_weight.shape != per_sample.shape:
            raise ValueError(
                f"sample_weight: expected shape {tuple(per_sample.shape)}, got {tuple(sample_weight.shape)}"
            )
        per_sample = per_sample * sample_weight
    return per_sample.mean() if reduction == "mean" else per_sample


def _check_x0(x0: Tensor) -> None:
    if not isinstance(x0, Tensor) or not x0.is_floating_point() or x0.ndim < 2:
        raise TypeError("x0: expected a floating-point tensor (B, C, H, W) in [-1, 1]")


# ---------------------------------------------------------------------------------------------------------
# EDM
# ---------------------------------------------------------------------------------------------------------


class ElucidatedDiffusion:
    """EDM (Karras et al. 2022): preconditioned denoiser, log-normal training noise, weighted loss.

    Args (defaults are the paper's):
        sigma_data: std of the data, 0.5.
        P_mean, P_std: training ``ln(sigma) ~ N(P_mean, P_std^2)``, -1.2 and 1.2.
        sigma_min, sigma_max, rho: the sampling grid :func:`schedules.karras_sigmas`, 0.002, 80, 7
            (imagen-pytorch suggests ``sigma_max`` 160 for super-resolution stages).
        loss_type: ``"l2"`` (default, the paper's), ``"l1"`` or ``"huber"``; computed on the network's
            output against its effective target ``(x0 - c_skip x) / c_out``, which for l2 equals the paper's
            ``lambda(sigma) |D(x) - x0|^2`` with ``lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``.
        default_sampler, default_steps: ``"dpmpp_2m"``, 25 (library default); ``"heun"``, 32 for reference
            quality.
    """

    variance_preserving = False

    def __init__(
        self, sigma_data: float = 0.5, P_mean: float = -1.2, P_std: float = 1.2, sigma_min: float = 0.002,
        sigma_max: float = 80.0, rho: float = 7.0, loss_type: LossType = "l2",
        default_sampler: str = "dpmpp_2m", default_steps: int = 25,
    ):
        if sigma_data <= 0 or P_std <= 0:
            raise ValueError(f"sigma_data, P_std: expected positive values, got {sigma_data}, {P_std}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        _check_choice("loss_type", loss_type, _LOSS_TYPES)
        _check_defaults(default_sampler, default_steps)
        self.sigma_data, self.P_mean, self.P_std = float(sigma_data), float(P_mean), float(P_std)
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.loss_type = loss_type
        self.default_sampler, self.default_steps = default_sampler, int(default_steps)

    @property
    def config(self) -> dict:
        """Plain JSON values; ``ElucidatedDiffusion(**proc.config)`` rebuilds this process."""
        keys = ("sigma_data", "P_mean", "P_std", "sigma_min", "sigma_max", "rho", "loss_type",
                "default_sampler", "default_steps")
        return {k: getattr(self, k) for k in keys}

    def __repr__(self) -> str:
        return f"ElucidatedDiffusion({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"

    def precondition(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` of Karras et al. 2022, Table 1, in the dtype of ``sigma``."""
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        c_skip = sd2 / total
        c_out = sigma * self.sigma_data / total.sqrt()
        c_in = 1 / total.sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def denoise(self, net: Net, x: Tensor, sigma: Tensor, **net_kwargs) -> Tensor:
        """``D(x; sigma) = c_skip x + c_out net(c_in x, c_noise)``; ``sigma`` scalar or (B,)."""
        sigma = _per_sample(sigma, x)
        c_skip, c_out, c_in, c_noise = self.precondition(sigma)
        out = net(c_in * x, c_noise.flatten(), **net_kwargs)
        return c_skip * x + c_out * out.to(x.dtype)

    def denoiser(self, net: Net, **net_kwargs) -> Callable[[Tensor, Tensor], Tensor]:
        """The sampler's ``denoiser(x, sigma) -> x0_hat`` with ``net_kwargs`` bound."""
        return lambda x, sigma: self.denoise(net, x, sigma, **net_kwargs)

    def sample_sigma(self, batch: int, generator: Generator = None, device=None, dtype=None) -> Tensor:
        """Training noise levels (B,): ``exp(P_mean + P_std * n)``, ``n ~ N(0, 1)``."""
        return (self.P_mean + self.P_std * randn((batch,), generator, device, dtype)).exp()

    def loss(
        self, net: Net, x0: Tensor, *, generator: Generator = None, sigma: Optional[Tensor] = None,
        reduction: Reduction = "mean", sample_weight: Optional[Tensor] = None, **net_kwargs,
    ) -> Tensor:
        """EDM training loss on clean images ``x0`` (B, C, H, W) in [-1, 1].

        ``sigma`` (B,) fixes the noise levels (default: drawn log-normal); ``reduction="none"`` returns the
        (B,) per-sample losses; ``sample_weight`` (B,) multiplies them before the reduction.
        """
        _check_x0(x0)
        b = x0.shape[0]
        if sigma is None:
            sigma = self.sample_sigma(b, generator, x0.device, x0.dtype)
        sigma = _per_sample(sigma, x0)
        x = x0 + sigma * randn(x0.shape, generator, x0.device, x0.dtype)
        c_skip, c_out, c_in, c_noise = self.precondition(sigma)
        out = net(c_in * x, c_noise.flatten(), **net_kwargs)
        target = (x0 - c_skip * x) / c_out  # what the network should output: c_out^2 lambda = 1
        return _reduce(_loss(out.to(x0.dtype), target, self.loss_type), reduction, sample_weight)

    def sigmas(self, steps: Optional[int] = None, device=None) -> Tensor:
        """The Karras grid with this process's ``sigma_min``, ``sigma_max``, ``rho`` (float64, ends at 0)."""
        steps = self.default_steps if steps is None else steps
        return karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho, device=device)

    def initial_noise(self, shape, sigmas: Tensor, generator: Generator = None, device=None,
                      dtype: torch.dtype = torch.float32) -> Tensor:
        """``sigmas[0] * noise``."""
        return initial_noise(shape, sigmas, generator, process="ve", device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# continuous-time VP (Imagen)
# ---------------------------------------------------------------------------------------------------------


class GaussianDiffusionContinuous:
    """Continuous-time variance-preserving diffusion (Kingma et al. 2021; Imagen, Saharia et al. 2022).

    Training: ``t ~ U(0, 1)``, ``x_t = alpha x0 + sigma_vp eps`` with ``alpha^2 = sigmoid(log_snr(t))``, the
    network is called as ``net(x_t, log_snr)`` and predicts ``pred_objective``.

    Args:
        noise_schedule: ``"cosine"`` (default; Imagen's base stage) or ``"linear"`` (Imagen's super-resolution
            stages); see :func:`schedules.log_snr_cosine` / :func:`schedules.log_snr_linear`.
        pred_objective: ``"noise"`` (default, Imagen), ``"x_start"`` or ``"v"`` (Salimans & Ho 2022).
        loss_type: ``"l2"`` (default), ``"l1"`` or ``"huber"``.
        min_snr_gamma: if set, Min-SNR-gamma loss weighting (Hang et al. 2023, paper value 5); default None.
        sampling_grid: ``"karras"`` (default): :func:`schedules.karras_sigmas` from ``sigma_max`` down to the
            schedule's smallest level (its sigma at ``t = 0``); ``"schedule"``: the schedule itself, uniform in
            ``t`` (:func:`schedules.log_snr_sigmas`; its first step is huge, so use it with ``dpmpp_2m``,
            ``ddim`` or ``euler_ancestral``, not ``heun``). On a Gaussian test set DPM-Solver++(2M) at 25 steps
            misses the data's std by 2.3 % on the Karras grid, 4.6 % (cosine) and 16-20 % (linear) on the
            schedule's grid, which needs about 100 steps to reach 1.5 %.
        sigma_max, rho: the Karras grid's top level (80; log-SNR -8.8, where the VP input ``alpha x`` is noise
            to within 1.3 % of the data) and ``rho`` (7).
        default_sampler, default_steps: ``"dpmpp_2m"`` and 25.
    """

    variance_preserving = True

    def __init__(
        self, noise_schedule: Literal["cosine", "linear"] = "cosine",
        pred_objective: Literal["noise", "x_start", "v"] = "noise", loss_type: LossType = "l2",
        min_snr_gamma: Optional[float] = None, sampling_grid: Literal["karras", "schedule"] = "karras",
        sigma_max: float = 80.0, rho: float = 7.0, default_sampler: str = "dpmpp_2m", default_steps: int = 25,
    ):
        _check_choice("noise_schedule", noise_schedule, tuple(LOG_SNR_SCHEDULES))
        _check_choice("pred_objective", pred_objective, ("noise", "x_start", "v"))
        _check_choice("loss_type", loss_type, _LOSS_TYPES)
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma: expected None or a positive number, got {min_snr_gamma}")
        _check_choice("sampling_grid", sampling_grid, ("karras", "schedule"))
        if not self.schedule_sigma_min(noise_schedule) < sigma_max:
            raise ValueError(f"sigma_max: expected a value above the schedule's smallest sigma, got {sigma_max}")
        _check_defaults(default_sampler, default_steps)
        self.sampling_grid, self.sigma_max, self.rho = sampling_grid, float(sigma_max), float(rho)
        self.noise_schedule, self.pred_objective, self.loss_type = noise_schedule, pred_objective, loss_type
        self.min_snr_gamma = None if min_snr_gamma is None else float(min_snr_gamma)
        self.default_sampler, self.default_steps = default_sampler, int(default_steps)

    @property
    def config(self) -> dict:
        """Plain JSON values; ``GaussianDiffusionContinuous(**proc.config)`` rebuilds this process."""
        keys = ("noise_schedule", "pred_objective", "loss_type", "min_snr_gamma", "sampling_grid", "sigma_max",
                "rho", "default_sampler", "default_steps")
        return {k: getattr(self, k) for k in keys}

    def __repr__(self) -> str:
        return f"GaussianDiffusionContinuous({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"

    @staticmethod
    def schedule_sigma_min(noise_schedule: str) -> float:
        """The VE sigma of ``noise_schedule`` at ``t = 0`` (cosine 0.0125, linear 0.01)."""
        t0 = torch.zeros((), dtype=torch.float64)
        return float(torch.exp(-LOG_SNR_SCHEDULES[noise_schedule](t0) / 2))

    def log_snr(self, t: Tensor) -> Tensor:
        """The schedule's log-SNR at times ``t`` in [0, 1] (clamped to [-20, 20])."""
        return LOG_SNR_SCHEDULES[self.noise_schedule](t)

    def to_x0(self, out: Tensor, x_t: Tensor, alpha: Tensor, sigma_vp: Tensor) -> Tensor:
        """The x0 prediction from the network output ``out`` at the VP point ``x_t``."""
        if self.pred_objective == "noise":
            return (x_t - sigma_vp * out) / alpha
        if self.pred_objective == "x_start":
            return out
        return alpha * x_t - sigma_vp * out  # v = alpha eps - sigma_vp x0

    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma_vp: Tensor) -> Tensor:
        """What the network should output for ``x_t = alpha x0 + sigma_vp eps``."""
        if self.pred_objective == "noise":
            return eps
        if self.pred_objective == "x_start":
            return x0
        return alpha * eps - sigma_vp * x0

    def denoise(self, net: Net, x: Tensor, sigma: Tensor, **net_kwargs) -> Tensor:
        """VE denoiser: ``x = x0 + sigma eps`` is the VP point ``alpha x`` with ``alpha = 1 / sqrt(1 + sigma^2)``."""
        sigma = _per_sample(sigma, x)
        log_snr = -2 * sigma.log()
        alpha = torch.rsqrt(1 + sigma**2)
        out = net(alpha * x, log_snr.flatten(), **net_kwargs).to(x.dtype)
        if self.pred_objective == "noise":  # x0 = x - sigma eps, without dividing by a tiny alpha
            return x - sigma * out
        return self.to_x0(out, alpha * x, alpha, sigma * alpha)

    def denoiser(self, net: Net, **net_kwargs) -> Callable[[Tensor, Tensor], Tensor]:
        """The sampler's ``denoiser(x, sigma) -> x0_hat`` with ``net_kwargs`` bound."""
        return lambda x, sigma: self.denoise(net, x, sigma, **net_kwargs)

    def loss_weight(self, log_snr: Tensor) -> Tensor:
        """Min-SNR-gamma weight for this objective (1 when ``min_snr_gamma`` is None)."""
        if self.min_snr_gamma is None:
            return torch.ones_like(log_snr)
        snr = log_snr.exp()
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.pred_objective == "noise":
            return clipped / snr
        if self.pred_objective == "x_start":
            return clipped
        return clipped / (snr + 1)

    def loss(
        self, net: Net, x0: Tensor, *, generator: Generator = None, t: Optional[Tensor] = None,
        reduction: Reduction = "mean", sample_weight: Optional[Tensor] = None, **net_kwargs,
    ) -> Tensor:
        """Training loss on clean images ``x0`` (B, C, H, W) in [-1, 1].

        ``t`` (B,) fixes the diffusion times (default ``U(0, 1)``); ``reduction="none"`` returns the (B,)
        per-sample losses; ``sample_weight`` (B,) multiplies them before the reduction.
        """
        _check_x0(x0)
        b = x0.shape[0]
        if t is None:
            t = rand((b,), generator, x0.device, x0.dtype)
        t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t: expected a scalar or shape ({b},), got {tuple(t.shape)}")
        log_snr = self.log_snr(t)
        shape = (-1, *([1] * (x0.ndim - 1)))
        alpha = torch.sigmoid(log_snr).sqrt().reshape(shape)
        sigma_vp = torch.sigmoid(-log_snr).sqrt().reshape(shape)
        eps = randn(x0.shape, generator, x0.device, x0.dtype)
        out = net(alpha * x0 + sigma_vp * eps, log_snr, **net_kwargs).to(x0.dtype)
        per_sample = _loss(out, self.target(x0, eps, alpha, sigma_vp), self.loss_type) * self.loss_weight(log_snr)
        return _reduce(per_sample, reduction, sample_weight)

    def sigmas(self, steps: Optional[int] = None, device=None) -> Tensor:
        """The sampling grid chosen by ``sampling_grid`` as VE sigmas (float64, decreasing, ends at 0)."""
        steps = self.default_steps if steps is None else steps
        if self.sampling_grid == "schedule":
            return log_snr_sigmas(steps, self.noise_schedule, device=device)
        sigma_min = self.schedule_sigma_min(self.noise_schedule)
        return karras_sigmas(steps, sigma_min, self.sigma_max, self.rho, device=device)

    def initial_noise(self, shape, sigmas: Tensor, generator: Generator = None, device=None,
                      dtype: torch.dtype = torch.float32) -> Tensor:
        """``sqrt(1 + sigmas[0]^2) * noise``: unit-variance noise in the VP space."""
        return initial_noise(shape, sigmas, generator, process="vp", device=device, dtype=dtype)


DIFFUSIONS: dict[str, type] = {
    "GaussianDiffusionContinuous": GaussianDiffusionContinuous,
    "ElucidatedDiffusion": ElucidatedDiffusion,
}
"""The processes a checkpoint can name, by kind; :func:`register_diffusion` adds your own."""


def register_diffusion(cls: type, kind: Optional[str] = None) -> type:
    """Let checkpoints rebuild processes of class ``cls`` (one of your own, or a subclass of a library
    process) by ``kind``, default its class name; returns ``cls``, so it also works as a class decorator.

    A cascade trains and samples with any object following the diffusion process protocol
    (:class:`imagen_lib.protocols.DiffusionProcess`) without this; registering is only needed to load it
    back from a checkpoint, and must happen before :meth:`Cascade.from_checkpoint` runs.
    """
    if not isinstance(cls, type):
        raise TypeError(f"cls: expected a class, got {type(cls).__name__}")
    kind = cls.__name__ if kind is None else kind
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind: expected a non-empty name, got {kind!r}")
    if DIFFUSIONS.get(kind, cls) is not cls:
        raise ValueError(f"kind: {kind!r} already names {DIFFUSIONS[kind].__qualname__}; choose another name")
    DIFFUSIONS[kind] = cls
    return cls


def diffusion_kind(process: Any) -> str:
    """The kind ``process`` is written under in a checkpoint: the name its exact class is registered by,
    else its class name."""
    for kind, cls in DIFFUSIONS.items():
        if type(process) is cls:
            return kind
    return type(process).__name__


def diffusion_from_config(kind: str, config: dict) -> Any:
    """Rebuild a process from its kind and ``config`` (an explicit table, no ``globals()``)."""
    if kind not in DIFFUSIONS:
        raise ValueError(f"kind: expected one of {sorted(DIFFUSIONS)}, got {kind!r}; a process of your own is "
                         "loaded after imagen_lib.diffusion.register_diffusion(YourClass)")
    return DIFFUSIONS[kind](**config)
