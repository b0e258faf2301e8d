"""Wrappers around a denoiser ``denoiser(x, sigma) -> x0_hat``: classifier-free guidance, autoguidance, guidance
in a limited interval, thresholding, and RePaint inpainting around any sampler. No sampler knows about any of them.

Every process of the library hands its denoiser the samplers' VE noise level ``sigma`` (``x = x0 + sigma eps``;
for a VP or discrete process ``sigma = sqrt((1 - alphabar) / alphabar) = exp(-log_snr / 2)``), so a guidance
interval is given in those sigmas whatever the process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, Optional

import torch
from torch import Tensor

from imagen_lib.diffusion.noise import Generator, randn
from imagen_lib.protocols import Denoiser
from imagen_lib.validation import check_finite, check_int, check_number

# the options of :func:`inpaint` itself (the rest go to the sampler)
INPAINT_OPTIONS = ("resample_times", "jump_length")

# torch.quantile refuses inputs above 2**24 elements; larger batches are thresholded row by row
_QUANTILE_MAX = 2**24


def _batch_sigma(sigma, x: Tensor) -> Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def _check_denoiser(name: str, denoiser: Any) -> None:
    if not callable(denoiser):
        raise TypeError(f"{name}: expected a callable denoiser(x, sigma), got {type(denoiser).__name__}")


def _check_rescale(rescale: float) -> None:
    if check_number("rescale", rescale) is not None and not 0.0 <= rescale <= 1.0:
        raise ValueError(f"rescale: expected a value in [0, 1], got {rescale}")


def _rescaled(out: Tensor, cond: Tensor, rescale: float) -> Tensor:
    """Lin et al. 2023: the guided ``out`` rescaled to the per-sample std of ``cond``, mixed in with ``rescale``."""
    if rescale <= 0:
        return out
    dims = tuple(range(1, out.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_out = out.std(dim=dims, keepdim=True).clamp_min(1e-12)
    return rescale * (out * (std_cond / std_out)) + (1 - rescale) * out


def _cfg_outputs(denoiser: Denoiser, x: Tensor, sigma, cond_scale: float) -> tuple[Tensor, Tensor]:
    """(conditional output, guided output ``cond + (cond_scale - 1) (cond - uncond)``) of a denoiser built on
    the doubled batch (conditional rows first), from one batched forward of ``x`` twice."""
    sigma = _batch_sigma(sigma, x)
    cond, uncond = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma])).chunk(2)
    return cond, cond + (cond - uncond) * (cond_scale - 1)


def classifier_free_guidance(denoiser: Denoiser, cond_scale: float, rescale: float = 0.0) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper.

    ``denoiser`` must be built on a doubled batch: rows ``[:B]`` conditional, rows ``[B:]`` unconditional
    (e.g. ``proc.denoiser(net, text_embeds=cat([embeds, null]), text_mask=cat([mask, all_false]))``). The
    returned denoiser takes the single batch, runs both passes in one batched forward and returns
    ``cond + (cond_scale - 1) (cond - uncond)``, which is exactly the conditional output at scale 1.

    Args:
        cond_scale: guidance weight; 1 is no guidance (Imagen samples with 5-10).
        rescale: guidance rescale of Lin et al. 2023 in [0, 1] (default 0 = off; paper 0.7): the guided
            x0 prediction is rescaled to the per-sample std of the conditional one and mixed in with this
            weight, which prevents over-saturation at high scales.
    """
    _check_denoiser("denoiser", denoiser)
    check_number("cond_scale", cond_scale)
    _check_rescale(rescale)

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        cond, out = _cfg_outputs(denoiser, x, sigma, cond_scale)
        return _rescaled(out, cond, rescale)

    return guided


def autoguidance(
    denoiser: Denoiser, guide: Denoiser, weight: float, cond_scale: float = 1.0, rescale: float = 0.0,
) -> Denoiser:
    """Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself") as a denoiser
    wrapper: ``D = D_bad + w (D_good - D_bad)``, computed as ``D_good + (w - 1) (D_good - D_bad)`` (the same
    number, and exactly ``D_good`` at ``w = 1`` or when ``D_bad == D_good``).

    ``denoiser`` is the good model, ``guide`` the bad one (a less-trained or smaller network of the same stage),
    both conditional, on the same inputs (text included). With ``cond_scale != 1`` it is combined with
    classifier-free guidance: ``denoiser`` must then be built on the doubled batch of
    :func:`classifier_free_guidance` (conditional rows first) and the result is

        ``D = D_good(c) + (cond_scale - 1) (D_good(c) - D_good(null)) + (w - 1) (D_good(c) - D_bad(c))``,

    the two guidance directions added to the good model's conditional prediction, so ``w = 1`` is plain CFG and
    ``cond_scale = 1`` the paper's autoguidance. ``rescale`` (Lin et al. 2023, default 0) acts on that sum.
    Each call runs ``denoiser`` once (doubled with CFG) and ``guide`` once on the single batch.

    Args:
        weight: the guidance weight ``w``, a finite number; 1 is no autoguidance (paper: about 2-3).
        cond_scale: classifier-free guidance weight, default 1.0 (none).
        rescale: guidance rescale in [0, 1], default 0.0.
    """
    _check_denoiser("denoiser", denoiser)
    _check_denoiser("guide", guide)
    check_number("weight", weight)
    check_number("cond_scale", cond_scale)
    _check_rescale(rescale)

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        if cond_scale != 1.0:
            cond, out = _cfg_outputs(denoiser, x, sigma, cond_scale)
        else:
            cond = out = denoiser(x, sigma)
        out = out + (cond - guide(x, sigma)) * (weight - 1)
        return _rescaled(out, cond, rescale)

    return guided


def check_guidance_interval(name: str, interval: Any) -> Optional[tuple[float, float]]:
    """``interval`` checked: None, or two finite numbers ``(sigma_lo, sigma_hi)`` with ``0 <= sigma_lo <=
    sigma_hi``; returned as a tuple of floats."""
    if interval is None:
        return None
    if isinstance(interval, (str, bytes)) or not isinstance(interval, Sequence) or len(interval) != 2:
        raise ValueError(f"{name}: expected None or two noise levels (sigma_lo, sigma_hi), got {interval!r}")
    lo = check_number(f"{name}[0]", interval[0], low=0)
    hi = check_number(f"{name}[1]", interval[1], low=0)
    if lo > hi:
        raise ValueError(f"{name}: expected sigma_lo <= sigma_hi, got ({lo}, {hi})")
    return float(lo), float(hi)


def guidance_interval(guided: Denoiser, conditional: Denoiser, sigma_lo: float, sigma_hi: float) -> Denoiser:
    """Guidance in a limited interval (Kynkaanniemi et al. 2024): the ``guided`` denoiser (CFG, autoguidance)
    where ``sigma_lo <= sigma <= sigma_hi``, the ``conditional`` one alone elsewhere, so the guidance's extra
    network evaluations are skipped there; with CFG ``D = D(c) + (s - 1) [sigma in I] (D(c) - D(null))``.

    ``sigma`` is the samplers' VE noise level (see the module's docstring). When a call's rows straddle the
    interval (a per-row ``sigma``; the library's samplers give one level per step) both run and each row takes
    its own. The paper's EDM2 interval on ImageNet-512 was about (0.28, 5.42].
    """
    _check_denoiser("guided", guided)
    _check_denoiser("conditional", conditional)
    lo, hi = check_number("sigma_lo", sigma_lo, low=0), check_number("sigma_hi", sigma_hi, low=0)
    if lo > hi:
        raise ValueError(f"sigma_lo, sigma_hi: expected sigma_lo <= sigma_hi, got {lo}, {hi}")

    def wrapped(x: Tensor, sigma: Tensor) -> Tensor:
        levels = _batch_sigma(sigma, x)
        inside = (levels >= lo) & (levels <= hi)
        if bool(inside.all()):
            return guided(x, sigma)
        if not bool(inside.any()):
            return conditional(x, sigma)
        rows = inside.reshape(-1, *([1] * (x.ndim - 1)))
        return torch.where(rows, guided(x, sigma), conditional(x, sigma))

    return wrapped


def dynamic_threshold(x0: Tensor, percentile: float = 0.995, max_value: Optional[float] = None) -> Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, default ``percentile`` 0.995).

    Per sample ``s = quantile(|x0|, percentile)``, ``s = max(s, 1)`` (and ``min(s, max_value)`` when given,
    as DeepFloyd IF caps it), then ``clamp(x0, -s, s) / s``: values stay in [-1, 1] and saturated pixels
    are pushed inwards instead of clipped.
    """
    _check_threshold(percentile, max_value)
    flat = x0.detach().flatten(1).abs().float()
    if flat.numel() <= _QUANTILE_MAX:
        s = torch.quantile(flat, percentile, dim=1)
    else:
        s = torch.stack([torch.quantile(row, percentile) for row in flat])
    s = s.clamp(min=1.0, max=max_value).to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def _check_threshold(percentile: float, max_value: Optional[float]) -> None:
    if check_number("percentile", percentile) is not None and not 0.0 < percentile <= 1.0:
        raise ValueError(f"percentile: expected a value in (0, 1], got {percentile}")
    if max_value is not None and check_number("max_value", max_value) < 1:
        raise ValueError(f"max_value: expected None or a value >= 1, got {max_value}")


def static_threshold(x0: Tensor) -> Tensor:
    """Static thresholding: clip the x0 prediction to [-1, 1]."""
    return x0.clamp(-1.0, 1.0)


def thresholded(
    denoiser: Denoiser, method: Literal["dynamic", "static", "none"] = "dynamic", percentile: float = 0.995,
    max_value: Optional[float] = None,
) -> Denoiser:
    """Apply a thresholding ``method`` to the denoiser's output, so every sampler gets it."""
    _check_denoiser("denoiser", denoiser)
    if method == "dynamic":
        _check_threshold(percentile, max_value)  # now, not at the first step
    if method == "none":
        return denoiser
    if method == "static":
        return lambda x, sigma: static_threshold(denoiser(x, sigma))
    if method == "dynamic":
        return lambda x, sigma: dynamic_threshold(denoiser(x, sigma), percentile, max_value)
    raise ValueError(f"method: expected 'dynamic', 'static' or 'none', got {method!r}")


def _prepare_mask(masks: Tensor, images: Tensor) -> Tensor:
    masks = torch.as_tensor(masks, device=images.device)
    if masks.ndim == images.ndim - 2:  # (H, W)
        masks = masks[None, None]
    elif masks.ndim == images.ndim - 1:  # (B, H, W)
        masks = masks[:, None]
    try:
        torch.broadcast_shapes(masks.shape, images.shape)
    except RuntimeError:
        raise ValueError(
            f"masks: expected a shape that broadcasts to the images {tuple(images.shape)} "
            f"((H, W), (B, H, W), (B, 1, H, W) or (B, C, H, W)), got {tuple(masks.shape)}"
        ) from None
    return masks.to(images.dtype) if masks.dtype == torch.bool else (masks > 0.5).to(images.dtype)


def _known_region_denoiser(denoiser: Denoiser, images: Tensor, keep: Tensor, generator: Generator) -> Denoiser:
    """At each call the known pixels of the input are replaced by the known image noised to the current
    sigma (fresh noise, RePaint), and the prediction there is the known image itself."""

    def wrapped(x: Tensor, sigma: Tensor) -> Tensor:
        s = _batch_sigma(sigma, x).reshape(-1, *([1] * (x.ndim - 1)))
        noised = images + s * randn(x.shape, generator, x.device, x.dtype)
        x = keep * noised + (1 - keep) * x
        return keep * images + (1 - keep) * denoiser(x, sigma)

    return wrapped


def inpaint(
    sampler: Callable[..., Tensor], denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, images: Tensor,
    masks: Tensor, resample_times: int = 1, jump_length: int = 1, generator: Generator = None,
    **sampler_options,
) -> Tensor:
    """RePaint inpainting (Lugmayr et al. 2022) around any sampler.

    ``masks`` is True where the pixel of ``images`` is KNOWN and must be kept (True = keep, False = fill
    in); shapes (H, W), (B, H, W), (B, 1, H, W) or (B, C, H, W). ``images`` are in the denoiser's data
    space ([-1, 1]). At every denoiser call the known region is re-noised to the current sigma with fresh
    noise, so any sampler (multistep ones included) inpaints. With ``resample_times`` > 1 (paper: 10) the
    grid is walked in chunks of ``jump_length`` steps (paper: 10); each chunk is sampled, noised back up to
    its start level and sampled again ``resample_times`` times in all, which harmonises the boundary
    (a multistep sampler restarts its history in each chunk). The returned image holds ``images`` exactly
    where the mask is True.
    """
    resample_times = check_int("resample_times", resample_times, low=1)
    jump_length = check_int("jump_length", jump_length, low=1)
    if not isinstance(images, Tensor):
        raise TypeError(f"images: expected a tensor of the shape of x {tuple(x.shape)}, got {type(images).__name__}")
    images = check_finite("images", images.to(x.device, x.dtype))
    if images.shape != x.shape:
        raise ValueError(f"images: expected the shape of x {tuple(x.shape)}, got {tuple(images.shape)}")
    keep = _prepare_mask(masks, images)
    wrapped = _known_region_denoiser(denoiser, images, keep, generator)
    grid = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    if resample_times == 1:  # one pass over the whole grid keeps multistep samplers' history
        x = sampler(wrapped, x, grid, generator=generator, **sampler_options)
    else:
        n = grid.numel() - 1
        for start in range(0, n, jump_length):
            chunk = grid[start : min(start + jump_length, n) + 1]
            x_start = x
            for r in range(resample_times):
                x = sampler(wrapped, x_start, chunk, generator=generator, **sampler_options)
                if r < resample_times - 1:  # noise back up from chunk[-1] to chunk[0]
                    up = math.sqrt(float(chunk[0]) ** 2 - float(chunk[-1]) ** 2)
                    x_start = x + up * randn(x.shape, generator, x.device, x.dtype)
    return keep * images + (1 - keep) * x
