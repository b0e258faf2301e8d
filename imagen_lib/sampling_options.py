"""What :meth:`imagen_lib.cascade.Cascade.sample` is told besides the prompts: a stage's :class:`SamplerSettings`,
:class:`StartImages` to begin at a super-resolution stage, :class:`Inpainting` images and masks; :func:`resize`,
the one way the cascade resizes images between stages; and :func:`guided_denoiser`, a stage's denoiser with its
guidance (classifier-free, autoguidance, in an interval) and thresholding wrapped around it.

Each checks its values when it is built (issue 23), with :mod:`imagen_lib.validation`: a bad value fails there,
with a message that names the field, not later inside a sampler. All are re-exported by
:mod:`imagen_lib.cascade` and :mod:`imagen_lib`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from imagen_lib.diffusion import guidance
from imagen_lib.diffusion.guidance import INPAINT_OPTIONS, check_guidance_interval
from imagen_lib.diffusion.noise import Generator, randn
from imagen_lib.diffusion.samplers import check_sampler_options, get_sampler
from imagen_lib.validation import (
    check_bool_mask,
    check_embeddings,
    check_field_types,
    check_images,
    check_int,
    check_number,
    check_texts,
)

__all__ = [
    "InitImages", "Inpainting", "NegativePrompt", "SamplerSettings", "StartImages", "check_guide_networks",
    "eval_mode", "guidance_pair", "guided_denoiser", "negative_rows", "resize", "sdedit_start",
]

THRESHOLDS = ("dynamic", "static", "none")


@dataclass
class SamplerSettings:
    """How a stage samples; every field can be overridden per call.

    Attributes:
        sampler: a name in :data:`imagen_lib.diffusion.samplers.SAMPLERS`; None (default) = the diffusion process's
            ``default_sampler`` (``dpmpp_2m``).
        steps: sampling steps; None (default) = the process's ``default_steps`` (25).
        cond_scale: classifier-free guidance weight, a finite number, default 3.0; 1.0 = no guidance (Imagen:
            5-10, NeMo's ``cfg``). Ignored by stages without text conditioning.
        guidance_rescale: CFG rescale of Lin et al. 2023 in [0, 1], default 0.0 (paper: 0.7).
        threshold: ``"dynamic"`` (default, Imagen's), ``"static"`` (clip x0 to [-1, 1]) or ``"none"``.
        threshold_percentile: dynamic thresholding percentile in (0, 1], default 0.995 (Imagen's).
        threshold_max: optional cap (>= 1) on the dynamic threshold (DeepFloyd IF), default None.
        lowres_aug_level: noise-augmentation level in [0, 1] of the low-resolution input of a super-resolution
            stage while sampling; None (default) = the stage's ``lowres_aug.sample_level`` (0.2).
        options: extra keyword arguments of the sampler (``S_churn``, ``eta``, ...) or of RePaint inpainting
            (``resample_times``, ``jump_length``), default none; names and values are checked.
        guidance_interval: ``(sigma_lo, sigma_hi)``, two finite levels ``0 <= lo <= hi`` of the samplers' VE sigma:
            guidance (CFG and autoguidance) acts only for ``sigma_lo <= sigma <= sigma_hi`` and the conditional
            network runs alone elsewhere (Kynkaanniemi et al. 2024); default None = guidance at every step.
        autoguidance_scale: the autoguidance weight ``w`` (Karras et al. 2024), a finite number, default 1.0 =
            off; other values need a guide network for the stage (:meth:`Cascade.using`'s ``guide_networks``).
    """

    sampler: Optional[str] = None
    steps: Optional[int] = None
    cond_scale: float = 3.0
    guidance_rescale: float = 0.0
    threshold: Literal["dynamic", "static", "none"] = "dynamic"
    threshold_percentile: float = 0.995
    threshold_max: Optional[float] = None
    lowres_aug_level: Optional[float] = None
    options: dict = field(default_factory=dict)
    guidance_interval: Optional[tuple[float, float]] = None
    autoguidance_scale: float = 1.0

    def __post_init__(self):
        if self.sampler is not None:
            if not isinstance(self.sampler, str):
                raise TypeError(f"sampler: expected None or a sampler name, got {type(self.sampler).__name__}")
            get_sampler(self.sampler)  # raises with the list of choices
        if self.steps is not None:
            self.steps = check_int("steps", self.steps, low=1)
        if not isinstance(self.threshold, str) or self.threshold not in THRESHOLDS:
            raise ValueError(f"threshold: expected 'dynamic', 'static' or 'none', got {self.threshold!r}")
        self.cond_scale = check_number("cond_scale", self.cond_scale)
        check_number("guidance_rescale", self.guidance_rescale, low=0, high=1)
        check_number("threshold_percentile", self.threshold_percentile, low=0, high=1, low_open=True)
        check_number("threshold_max", self.threshold_max, low=1, optional=True)
        check_number("lowres_aug_level", self.lowres_aug_level, low=0, high=1, optional=True)
        self.options = check_sampler_options(self.options, self.sampler, extra=INPAINT_OPTIONS)
        self.guidance_interval = check_guidance_interval("guidance_interval", self.guidance_interval)
        self.autoguidance_scale = check_number("autoguidance_scale", self.autoguidance_scale)
        check_field_types(self)

    @property
    def config(self) -> dict:
        """Plain JSON values; ``SamplerSettings(**settings.config)`` rebuilds it."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "SamplerSettings":
        """A copy with some fields changed (unknown names raise)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"sampler settings: unknown field(s) {unknown}; expected some of {sorted(names)}")
        return dataclasses.replace(self, **changes)


def resize(images: Tensor, size: int) -> Tensor:
    """Resize (B, C, H, W) to (B, C, size, size): bilinear, antialiased when shrinking."""
    if images.shape[-2:] == (size, size):
        return images
    shrinking = size < images.shape[-1] or size < images.shape[-2]
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)


def _check_given_images(images: Any) -> None:
    """Images a user gives to sample from: (B, C, H, W), finite, in [0, 1] (with a hint for [0, 255])."""
    if images is None:
        raise ValueError("images: missing; expected a (B, C, H, W) tensor in [0, 1]")
    check_images("images", images, value_range=(0, 1))


@dataclass(frozen=True)
class StartImages:
    """Begin sampling at a super-resolution ``stage`` (default 1) from your own ``images``: (B, C, H, W) in
    [0, 1], one per prompt or one per image, any size (each stage resizes its input)."""

    images: Tensor
    stage: int = 1

    def __post_init__(self):
        _check_given_images(self.images)
        if isinstance(self.stage, bool) or not isinstance(self.stage, int) or self.stage < 1:
            raise ValueError(f"stage: expected a super-resolution stage index (1 or more), got {self.stage!r}")
        check_field_types(self)


@dataclass(frozen=True)
class Inpainting:
    """RePaint inpainting at every stage: ``images`` (B, C, H, W) in [0, 1], one per prompt or one per image,
    and bool ``masks`` (H, W), (B, H, W) or (B, 1, H, W), True = keep that pixel of ``images``."""

    images: Tensor
    masks: Tensor

    def __post_init__(self):
        _check_given_images(self.images)
        masks = check_bool_mask("masks", self.masks, ndims=(2, 3, 4), meaning="(H, W), (B, H, W) or (B, 1, H, W), "
                                "True = keep")
        if masks.ndim == 4 and masks.shape[1] not in (1, self.images.shape[1]):
            raise ValueError(f"masks: expected (B, 1, H, W) with one channel, got shape {tuple(masks.shape)}")
        check_field_types(self)


@dataclass(frozen=True)
class InitImages:
    """Image-to-image at the base stage (SDEdit, Meng et al. 2021): ``images`` (B, C, H, W) in [0, 1], one for all
    prompts, one per prompt or one per image, any size (resized to the base stage's), noised to the level reached after
    ``1 - strength`` of the base stage's sampling grid; only the remaining ``round(strength * steps)`` steps
    (at least one) run, then the later stages as usual. ``strength`` in (0, 1], default 0.8 (diffusers'):
    1 is text-to-image from noise (the same images for the same seed), small values stay close to ``images``."""

    images: Tensor
    strength: float = 0.8

    def __post_init__(self):
        _check_given_images(self.images)
        check_number("strength", self.strength, low=0, high=1, low_open=True)
        check_field_types(self)


@dataclass(frozen=True)
class NegativePrompt:
    """A negative prompt given as precomputed embeddings: ``text_embeds`` a finite float (B, N, D) tensor with
    one row for all prompts or one per prompt, ``text_mask`` a bool (B, N) mask (default: the non-zero rows of
    ``text_embeds``). Classifier-free guidance then pushes away from this text instead of from the null text
    (zero embeddings, all-False mask, what training's text dropout shows the nets)."""

    text_embeds: Tensor
    text_mask: Optional[Tensor] = None

    def __post_init__(self):
        check_embeddings("text_embeds", self.text_embeds)
        if self.text_mask is not None:
            mask = check_bool_mask("text_mask", self.text_mask, ndims=(2,), meaning="True = a real token")
            if tuple(mask.shape) != tuple(self.text_embeds.shape[:2]):
                raise ValueError(f"text_mask: expected shape {tuple(self.text_embeds.shape[:2])} (the embeddings' "
                                 f"first two dimensions), got {tuple(mask.shape)}")


def negative_rows(negative: Union[str, Sequence[str], NegativePrompt], prompts: int,
                  condition: Callable[..., tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The negative prompt's (embeds, mask) with one row per prompt, through ``condition`` (the cascade's
    :meth:`~imagen_lib.cascade.Cascade.condition`): a string for all prompts, a list of strings one per prompt,
    or :class:`NegativePrompt` embeddings with one row for all prompts or one per prompt."""
    if isinstance(negative, NegativePrompt):
        given = {"text_embeds": negative.text_embeds, "text_mask": negative.text_mask}
    else:
        texts = [negative] if isinstance(negative, str) else check_texts("negative_prompt", negative)
        if not isinstance(negative, str) and len(texts) != prompts:
            raise ValueError(f"negative_prompt: expected one string for all prompts or a list of {prompts} (one "
                             f"per prompt), got a list of {len(texts)}")
        given = {"texts": texts}
    try:
        embeds, mask = condition(None, **given)
    except (TypeError, ValueError) as error:  # the cascade's message names its own argument: say whose it is
        raise type(error)(f"negative_prompt: {error} (for text without an encoder: NegativePrompt(text_embeds, "
                          f"text_mask))" if "texts" in given else f"negative_prompt: {error}") from None
    if embeds.shape[0] == 1 and prompts > 1:
        return embeds.expand(prompts, -1, -1), mask.expand(prompts, -1)
    if embeds.shape[0] != prompts:
        raise ValueError(f"negative_prompt: expected text_embeds with 1 row or {prompts} (one per prompt), "
                         f"got {embeds.shape[0]}")
    return embeds, mask


def _pad_tokens(embeds: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Right-pad (B, N, D) embeddings with zero tokens and their mask with False up to ``length`` tokens."""
    extra = length - embeds.shape[1]
    if extra == 0:
        return embeds, mask
    return F.pad(embeds, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def guidance_pair(embeds: Tensor, mask: Tensor, negative: Optional[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The doubled batch of classifier-free guidance: conditional rows first, then the unconditional ones, which
    see the ``negative`` (embeds, mask) rows or, when None, the null text (zeros, all False, as the text dropout
    of training makes it). Token counts that differ are padded (zero tokens, masked out) to the longer one."""
    if negative is None:
        negative = (torch.zeros_like(embeds), torch.zeros_like(mask))
    length = max(embeds.shape[1], negative[0].shape[1])
    (e1, m1), (e2, m2) = _pad_tokens(embeds, mask, length), _pad_tokens(*negative, length)
    return torch.cat([e1, e2]), torch.cat([m1, m2])


def sdedit_start(diffusion: Any, images: Tensor, strength: float, sigmas: Tensor, generator: Generator,
                 shape: tuple[int, ...], device: Any) -> tuple[Tensor, Tensor]:
    """SDEdit's starting point: ``(sigmas, x)``, the tail of the sampling grid ``sigmas`` that still runs and the
    images ([-1, 1], ``shape``) noised to its first level, ``x = images + sigma * noise`` (the samplers' VE
    coordinates, whatever the process). ``strength`` 1 returns the whole grid and the process's own
    :meth:`initial_noise`, so it is text-to-image exactly; otherwise ``round(strength * steps)`` steps remain (at
    least one)."""
    steps = len(sigmas) - 1
    skip = steps - max(1, min(steps, round(strength * steps)))
    if skip == 0:
        return sigmas, diffusion.initial_noise(shape, sigmas, generator, device=device, dtype=torch.float32)
    sigmas = sigmas[skip:]
    noise = randn(shape, generator, device, torch.float32)
    return sigmas, images.to(device, torch.float32) + float(sigmas[0]) * noise


def check_guide_networks(guide_networks: Any, stages: Sequence[Any]) -> dict[int, Any]:
    """``{stage: network}`` checked against the cascade's ``stages``: each a :class:`~imagen_lib.protocols.Network`
    that takes the stage's inputs (the same channels, text width and low-resolution conditioning), on its net's
    device; any configuration otherwise (a smaller preset, an earlier checkpoint's EMA)."""
    from imagen_lib.protocols import Network, check_protocol

    if not isinstance(guide_networks, Mapping):
        raise TypeError(f"guide_networks: expected a mapping {{stage: network}}, got {type(guide_networks).__name__}")
    checked = {}
    for k, net in guide_networks.items():
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(stages):
            raise ValueError(f"guide_networks: stage {k!r} does not exist; expected indices in [0, {len(stages) - 1}]")
        check_protocol(net, Network, f"guide_networks[{k}]")
        if not isinstance(net, torch.nn.Module):
            raise TypeError(f"guide_networks[{k}]: expected a torch.nn.Module network, got {type(net).__name__}")
        own = stages[k].net
        for name in ("channels", "text_embed_dim", "lowres_cond"):
            if getattr(net, name, None) != getattr(own, name, None):
                raise ValueError(f"guide_networks[{k}]: expected {name}={getattr(own, name, None)!r} like stage {k}'s "
                                 f"net, got {getattr(net, name, None)!r}")
        device, own_device = (next((p.device for p in m.parameters()), None) for m in (net, own))
        if None not in (device, own_device) and device != own_device:
            raise ValueError(f"guide_networks[{k}]: on {device}, stage {k}'s net on {own_device}; move it with .to()")
        checked[k] = net
    return checked


@contextmanager
def eval_mode(*modules: Optional[torch.nn.Module]):
    """The given modules (None skipped) in eval mode inside the block, each back in its own mode after."""
    modules = [m for m in modules if m is not None]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)


def guided_denoiser(diffusion: Any, net: Any, settings: SamplerSettings, kwargs: dict, guide: Any = None,
                    stage: int = 0) -> Callable[[Tensor, Tensor], Tensor]:
    """Stage ``stage``'s denoiser: ``diffusion.denoiser(net, **kwargs)`` with classifier-free guidance (when the
    nets take text and ``cond_scale != 1``; its unconditional rows see ``kwargs["negative"]`` (embeds, mask) when
    given, else the null text), autoguidance by the network ``guide`` (``autoguidance_scale != 1``), both only in
    ``guidance_interval`` when set, and thresholding wrapped around it (:mod:`imagen_lib.diffusion.guidance`)."""
    kwargs = dict(kwargs)
    negative = kwargs.pop("negative", None)
    cfg = "text_embeds" in kwargs and settings.cond_scale != 1.0
    auto = settings.autoguidance_scale != 1.0
    if auto and guide is None:
        raise ValueError(f"autoguidance_scale: stage {stage} samples with {settings.autoguidance_scale} but has no "
                         f"guide network; pass Cascade.using(guide_networks={{{stage}: network}})")
    conditional = diffusion.denoiser(net, **kwargs)
    den = conditional
    if cfg:  # doubled batch: conditional rows first, then the same rows with the negative or null text
        doubled = {name: torch.cat([v, v]) for name, v in kwargs.items()}
        doubled["text_embeds"], doubled["text_mask"] = guidance_pair(kwargs["text_embeds"], kwargs["text_mask"],
                                                                     negative)
        den = diffusion.denoiser(net, **doubled)
    if auto:
        den = guidance.autoguidance(den, diffusion.denoiser(guide, **kwargs), settings.autoguidance_scale,
                                    settings.cond_scale if cfg else 1.0, settings.guidance_rescale)
    elif cfg:
        den = guidance.classifier_free_guidance(den, settings.cond_scale, settings.guidance_rescale)
    if (cfg or auto) and settings.guidance_interval is not None:
        den = guidance.guidance_interval(den, conditional, *settings.guidance_interval)
    return guidance.thresholded(den, settings.threshold, settings.threshold_percentile, settings.threshold_max)
