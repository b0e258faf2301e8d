"""The seams between the parts of a cascade, as protocols (docs/architecture.md): what a network, a diffusion
process, a text encoder and a latent stage's autoencoder must offer for :class:`~imagen_lib.cascade.Cascade` to
use them.

They are structural: any object with these members plugs in, a subclass of a library class or a class of
your own alike; nothing needs to inherit from them. :func:`check_protocol` raises a ``TypeError`` that names
what is missing. Only torch and typing are imported here (the foundation layer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Protocol, Union, runtime_checkable

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``denoiser(x, sigma) -> x0_hat`` in the VE parametrisation ``x = x0 + sigma * eps``; ``sigma`` is (B,)."""


@runtime_checkable
class Network(Protocol):
    """A denoising network (:class:`~imagen_lib.nn.unet.Unet`, :class:`~imagen_lib.nn.efficient_unet.EfficientUnet`).

    ``net(x, noise_cond, *, text_embeds=None, text_mask=None, lowres_img=None, lowres_noise_cond=None)``
    returns (B, C_out, H, W); ``noise_cond`` (B,) is chosen by the diffusion process. ``config`` holds plain
    JSON values (or an object with ``to_dict()``) from which ``type(net)(**config)`` rebuilds it.
    """

    config: Any
    channels: int
    lowres_cond: bool
    text_embed_dim: Optional[int]

    def __call__(
        self, x: Tensor, noise_cond: Tensor, *, text_embeds: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None, lowres_img: Optional[Tensor] = None,
        lowres_noise_cond: Optional[Tensor] = None,
    ) -> Tensor: ...


@runtime_checkable
class DiffusionProcess(Protocol):
    """A training process and its sampling grid (the continuous :class:`~imagen_lib.diffusion.ElucidatedDiffusion`
    and :class:`~imagen_lib.diffusion.GaussianDiffusionContinuous`, Stable Diffusion's discrete
    :class:`~imagen_lib.diffusion.DiscreteDiffusion`); ``net_kwargs`` go to the network unchanged.
    ``default_sampler`` names a sampler of :data:`imagen_lib.diffusion.samplers.SAMPLERS`; ``config`` holds
    plain JSON values from which ``type(proc)(**config)`` rebuilds it."""

    default_sampler: str
    default_steps: int

    @property
    def config(self) -> dict: ...

    def loss(self, net: Callable[..., Tensor], x0: Tensor, *, generator: Any = None, **net_kwargs: Any) -> Tensor:
        """Scalar training loss on clean images ``x0`` (B, C, H, W) in [-1, 1] (a latent stage's scaled
        latents)."""

    def denoiser(self, net: Callable[..., Tensor], **net_kwargs: Any) -> Denoiser:
        """The sampler's ``denoiser(x, sigma) -> x0_hat`` with ``net_kwargs`` bound."""

    def sigmas(self, steps: Optional[int] = None, device: Any = None) -> Tensor:
        """The sampling grid: (steps + 1,), decreasing, ending at 0."""

    def initial_noise(self, shape: Sequence[int], sigmas: Tensor, generator: Any = None, device: Any = None,
                      dtype: torch.dtype = torch.float32) -> Tensor:
        """The sampler's starting point at ``sigmas[0]``."""


@runtime_checkable
class TextEncoder(Protocol):
    """Captions to ``(text_embeds (B, N, embed_dim), text_mask (B, N) bool)`` (:class:`~imagen_lib.text.T5TextEncoder`,
    :class:`~imagen_lib.text_clip.CLIPTextEncoder`; :data:`imagen_lib.text.TEXT_ENCODERS` maps a ``config``'s
    ``kind`` to its class).

    ``trainable`` says whether it is trained with the cascade (then checkpoints hold its files, written by
    ``save_pretrained(folder)``); ``config`` holds plain JSON values stored in checkpoints.
    """

    embed_dim: int
    trainable: bool

    @property
    def config(self) -> dict: ...

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]: ...

    def save_pretrained(self, folder: Union[str, Path]) -> None: ...


@runtime_checkable
class Autoencoder(Protocol):
    """A frozen first-stage autoencoder of a latent stage (latent diffusion, seed 003's ``AutoencoderKL``:
    :class:`imagen_lib.latent.AutoencoderKL`).

    ``encode(images)`` takes images (B, 3, H, W) in [-1, 1] and returns latents (B, latent_channels,
    H / downsampling_factor, W / downsampling_factor) already multiplied by ``scaling_factor``;
    ``decode(latents)`` divides by ``scaling_factor`` and returns images in about [-1, 1]. The factor is
    applied exactly once on each side, so the diffusion process only ever sees scaled latents. ``config``
    holds plain JSON values stored in checkpoints; ``save_pretrained(folder)`` writes the weights there.
    """

    latent_channels: int
    downsampling_factor: int
    scaling_factor: float

    @property
    def config(self) -> dict: ...

    def encode(self, images: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...

    def save_pretrained(self, folder: Union[str, Path]) -> None: ...


def plain_config(config: Any) -> dict:
    """A network's ``config`` as a plain dict: ``config.to_dict()`` when it has one (a config dataclass), else
    ``dict(config)``. Checkpoints store this form and configurations are compared in it."""
    to_dict = getattr(config, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else dict(config)


def protocol_members(protocol: type) -> list[str]:
    """The names ``protocol`` requires: its annotated attributes, properties and methods (``__call__``
    included), in the order written."""
    names = list(getattr(protocol, "__annotations__", {}))
    for name, value in vars(protocol).items():
        if callable(value) or isinstance(value, property):
            if name == "__call__" or not name.startswith("_"):
                names.append(name)
    return list(dict.fromkeys(names))


def check_protocol(obj: Any, protocol: type, name: str) -> None:
    """Raise ``TypeError`` naming the argument ``name`` and the members of ``protocol`` that ``obj`` lacks."""
    if isinstance(obj, protocol):
        return
    missing = [m for m in protocol_members(protocol) if not hasattr(obj, m)]
    raise TypeError(
        f"{name}: expected an object following the {protocol.__name__} protocol (imagen_lib.protocols); "
        f"{type(obj).__name__} lacks {', '.join(missing) or 'a member'}"
    )
