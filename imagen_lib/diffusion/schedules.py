"""Noise schedules in the variance-exploding (VE) parametrisation ``x = x0 + sigma * eps``: the Karras grid,
the VP log-SNR schedules and their VE grid, and the sampler's starting point.

A variance-preserving process converts itself to this form (``sigma = exp(-log_snr / 2)``, network inputs
scaled by ``alpha = 1 / sqrt(1 + sigma^2)``), so one grid and one set of samplers serve both processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from imagen_lib.diffusion.noise import Generator, randn

# The VP log-SNR is kept in this range: the networks are told to resolve it (docs/architecture.md),
# and the cosine schedule reaches -inf at t = 1 without a bound.
LOG_SNR_MIN, LOG_SNR_MAX = -20.0, 20.0


def karras_sigmas(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, device=None
) -> Tensor:
    """The grid of Karras et al. 2022 (eq. 5): ``n`` levels from ``sigma_max`` to ``sigma_min``, then 0.

    Defaults are the paper's (``sigma_min`` 0.002, ``sigma_max`` 80, ``rho`` 7). Returns float64 ``(n + 1,)``.
    """
    if n < 1:
        raise ValueError(f"n: expected at least 1 step, got {n}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def log_snr_cosine(t: Tensor, s: float = 0.008) -> Tensor:
    """Log-SNR of the cosine schedule (Nichol & Dhariwal 2021): ``alpha^2 = cos^2((t + s) / (1 + s) * pi / 2)``.

    ``log_snr = -2 log tan((t + s) / (1 + s) * pi / 2)``, clamped to [-20, 20] (it is -inf at ``t = 1``).
    """
    # written with the complementary angle u, since tan(pi / 2) rounds to a negative float32 near t = 1
    u = (1 - t) / (1 + s) * (math.pi / 2)
    return (2.0 * torch.log(torch.tan(u).clamp_min(1e-30))).clamp(LOG_SNR_MIN, LOG_SNR_MAX)


def log_snr_linear(t: Tensor) -> Tensor:
    """Log-SNR of the continuous linear-beta schedule (Kingma et al. 2021): ``-log(expm1(1e-4 + 10 t^2))``."""
    return (-torch.log(torch.expm1(1e-4 + 10.0 * t**2))).clamp(LOG_SNR_MIN, LOG_SNR_MAX)


LOG_SNR_SCHEDULES: dict[str, Callable[[Tensor], Tensor]] = {"cosine": log_snr_cosine, "linear": log_snr_linear}


def log_snr_sigmas(n: int, schedule: Literal["cosine", "linear"] = "cosine", device=None) -> Tensor:
    """VE grid of a VP log-SNR schedule: ``t`` uniform from 1 to 0 in ``n`` levels, ``sigma = exp(-log_snr / 2)``,
    then 0. Returns float64 ``(n + 1,)``.
    """
    if n < 1:
        raise ValueError(f"n: expected at least 1 step, got {n}")
    if schedule not in LOG_SNR_SCHEDULES:
        raise ValueError(f"schedule: expected one of {sorted(LOG_SNR_SCHEDULES)}, got {schedule!r}")
    t = torch.linspace(1, 0, n, dtype=torch.float64, device=device)
    sigmas = torch.exp(-LOG_SNR_SCHEDULES[schedule](t) / 2)
    return torch.cat([sigmas, sigmas.new_zeros(1)])



def initial_noise(
    shape: Sequence[int],
    sigmas: Tensor,
    generator: Generator = None,
    *,
    process: Literal["ve", "vp"] = "ve",
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The sampler's starting point at ``sigmas[0]``.

    ``process="ve"`` (EDM): ``sigmas[0] * noise``. ``process="vp"`` (GaussianDiffusionContinuous):
    ``sqrt(1 + sigmas[0]^2) * noise``, i.e. unit-variance noise in the VP space, the exact prior of a VP
    process. ``device`` defaults to the device of ``sigmas``.
    """
    if process not in ("ve", "vp"):
        raise ValueError(f"process: expected 've' or 'vp', got {process!r}")
    sigmas = torch.as_tensor(sigmas)
    sigma_max = float(sigmas[0])
    scale = sigma_max if process == "ve" else math.sqrt(1.0 + sigma_max**2)
    device = sigmas.device if device is None else device
    return randn(shape, generator, device, dtype) * scale

