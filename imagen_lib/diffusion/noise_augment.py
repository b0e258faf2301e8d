"""Noise-conditioning augmentation for super-resolution stages (Ho et al. 2021, "Cascaded Diffusion Models";
Imagen, Saharia et al. 2022): the low-resolution conditioning image is noised with the VP forward process to
a level in [0, 1], and the network is told that level (as a log-SNR) through ``lowres_noise_cond``.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from torch import Tensor

from imagen_lib.diffusion.noise import Generator, rand, randn
from imagen_lib.diffusion.schedules import LOG_SNR_SCHEDULES


class NoiseAugmentation:
    """Noise images to a VP level ``t`` in [0, 1] and return the log-SNR the network is conditioned on.

    Args:
        schedule: the log-SNR schedule, ``"cosine"`` (default) or ``"linear"``.
        sample_level: the fixed level used at sampling time, 0.2 (imagen-pytorch's default; Imagen sweeps
            it and reports good results in 0-0.3).
        max_train_level: training levels are drawn from ``U(0, max_train_level)``, default 1.0.

    ``aug(images, level, generator=None) -> (noised, noise_cond)``: ``level`` is a float, a (B,) tensor, or
    None (random training levels); ``noised = alpha images + sigma_vp eps`` with
    ``alpha^2 = sigmoid(log_snr(level))``, ``noise_cond = log_snr(level)`` of shape (B,).
    """

    def __init__(
        self, schedule: Literal["cosine", "linear"] = "cosine", sample_level: float = 0.2,
        max_train_level: float = 1.0,
    ):
        if schedule not in LOG_SNR_SCHEDULES:
            raise ValueError(f"schedule: expected one of {sorted(LOG_SNR_SCHEDULES)}, got {schedule!r}")
        for name, value in (("sample_level", sample_level), ("max_train_level", max_train_level)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: expected a level in [0, 1], got {value}")
        self.schedule, self.sample_level, self.max_train_level = schedule, float(sample_level), float(max_train_level)

    @property
    def config(self) -> dict:
        """Plain JSON values; ``NoiseAugmentation(**aug.config)`` rebuilds it."""
        return {"schedule": self.schedule, "sample_level": self.sample_level, "max_train_level": self.max_train_level}

    def __repr__(self) -> str:
        return f"NoiseAugmentation({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"

    def log_snr(self, level: Tensor) -> Tensor:
        """The conditioning value (log-SNR) of a level in [0, 1]."""
        return LOG_SNR_SCHEDULES[self.schedule](level)

    def random_levels(self, batch: int, generator: Generator = None, device=None, dtype=None) -> Tensor:
        """Training levels (B,) drawn from ``U(0, max_train_level)``."""
        return rand((batch,), generator, device, dtype) * self.max_train_level

    def __call__(
        self, images: Tensor, level: Union[None, float, Tensor] = None, generator: Generator = None
    ) -> tuple[Tensor, Tensor]:
        if not isinstance(images, Tensor) or not images.is_floating_point() or images.ndim < 2:
            raise TypeError("images: expected a floating-point tensor (B, C, H, W) in [-1, 1]")
        b = images.shape[0]
        if level is None:
            level = self.random_levels(b, generator, images.device, images.dtype)
        level = torch.as_tensor(level, dtype=images.dtype, device=images.device)
        if level.ndim == 0:
            level = level.expand(b)
        if level.shape != (b,):
            raise ValueError(f"level: expected a float or shape ({b},), got {tuple(level.shape)}")
        if ((level < 0) | (level > 1)).any():
            raise ValueError("level: expected values in [0, 1]")
        log_snr = self.log_snr(level)
        shape = (-1, *([1] * (images.ndim - 1)))
        alpha = torch.sigmoid(log_snr).sqrt().reshape(shape)
        sigma_vp = torch.sigmoid(-log_snr).sqrt().reshape(shape)
        eps = randn(images.shape, generator, images.device, images.dtype)
        return alpha * images + sigma_vp * eps, log_snr

    def sampling_level(self, batch: int, level: Optional[float] = None, device=None, dtype=None) -> Tensor:
        """The fixed level (B,) used at sampling time (``sample_level`` unless ``level`` is given)."""
        value = self.sample_level if level is None else float(level)
        return torch.full((batch,), value, device=device, dtype=dtype or torch.get_default_dtype())
