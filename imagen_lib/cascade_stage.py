"""A stage of a cascade (:class:`Stage`): a network, a diffusion process, an image size, sampler settings and,
for a latent stage, a frozen first-stage autoencoder; and :func:`random_crops`, the windows a stage trains on.
Re-exported by :mod:`imagen_lib.cascade`; the latent stages' encoding and decoding are
:mod:`imagen_lib.cascade_latent`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from imagen_lib.diffusion import diffusion_kind
from imagen_lib.diffusion.noise import Generator, rand
from imagen_lib.diffusion.noise_augment import NoiseAugmentation
from imagen_lib.diffusion.samplers import SAMPLERS
from imagen_lib.nn.networks import NETWORK_OF_CONFIG, network_kind
from imagen_lib.protocols import Autoencoder, DiffusionProcess, Network, check_protocol, plain_config
from imagen_lib.sampling_options import SamplerSettings

__all__ = ["Stage", "random_crops"]


@dataclass
class Stage:
    """One stage of a cascade.

    Attributes:
        net: a network following :class:`imagen_lib.protocols.Network` (:class:`~imagen_lib.nn.unet.Unet`,
            :class:`~imagen_lib.nn.efficient_unet.EfficientUnet`, or one of your own).
        diffusion: a process following :class:`imagen_lib.protocols.DiffusionProcess`
            (:class:`~imagen_lib.diffusion.GaussianDiffusionContinuous`,
            :class:`~imagen_lib.diffusion.ElucidatedDiffusion`, a subclass or one of your own; to load it from
            a checkpoint, register its class with :func:`imagen_lib.diffusion.register_diffusion`).
        image_size: side of the square images this stage produces.
        sampler: its :class:`SamplerSettings`.
        lowres_aug: the noise-conditioning augmentation of a super-resolution stage (its ``max_train_level``
            is the training range, its ``sample_level`` the default sampling level); default
            ``NoiseAugmentation()`` when ``net.lowres_cond``, None otherwise.
        random_crop_size: train on random square crops of this side (the target and its low-resolution input
            cut at the same place) instead of whole images; sampling still makes whole images. Imagen trains
            its super-resolution nets this way (64 px crops of 256 px images): a convolutional net without
            self-attention sees the same local statistics at a fraction of the cost per step. Default None.
        autoencoder: a frozen autoencoder following :class:`imagen_lib.protocols.Autoencoder`
            (:class:`~imagen_lib.latent.AutoencoderKL`) makes this a latent stage (latent diffusion): its net
            works on latents of side ``image_size / downsampling_factor`` with ``latent_channels`` channels,
            training encodes the images and sampling decodes its result (:mod:`imagen_lib.cascade_latent`).
            Default None (a pixel stage).

    ``sampler`` defaults to ``SamplerSettings()``, with ``threshold="none"`` for a latent stage: latents are not
    in [-1, 1], so clipping them (static or dynamic thresholding) would distort them (SD does not threshold).
    """

    net: Network
    diffusion: DiffusionProcess
    image_size: int
    sampler: Optional[SamplerSettings] = None
    lowres_aug: Optional[NoiseAugmentation] = None
    random_crop_size: Optional[int] = None
    autoencoder: Optional[Autoencoder] = field(default=None, repr=False)

    def __post_init__(self):
        check_protocol(self.net, Network, "net")
        check_protocol(self.diffusion, DiffusionProcess, "diffusion")
        if self.diffusion.default_sampler not in SAMPLERS:
            raise ValueError(f"diffusion: its default_sampler {self.diffusion.default_sampler!r} is not one of "
                             f"{sorted(SAMPLERS)}")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size: expected a positive int, got {self.image_size!r}")
        if self.sampler is None:
            self.sampler = SamplerSettings(threshold="none") if self.autoencoder is not None else SamplerSettings()
        if not isinstance(self.sampler, SamplerSettings):
            raise TypeError(f"sampler: expected SamplerSettings, got {type(self.sampler).__name__}")
        if self.net.lowres_cond and self.lowres_aug is None:
            self.lowres_aug = NoiseAugmentation()
        crop, size = self.random_crop_size, self.image_size
        if crop is not None and (not isinstance(crop, int) or isinstance(crop, bool) or not 1 <= crop <= size):
            raise ValueError(f"random_crop_size: expected None or an int in [1, image_size={size}], got {crop!r}")
        if self.autoencoder is not None:
            self._check_autoencoder()

    def _check_autoencoder(self) -> None:
        auto = self.autoencoder
        check_protocol(auto, Autoencoder, "autoencoder")
        f = auto.downsampling_factor
        if self.image_size % f:
            raise ValueError(f"image_size: a latent stage's image_size must be a multiple of its autoencoder's "
                             f"downsampling_factor {f}, got {self.image_size}")
        if self.random_crop_size is not None and self.random_crop_size % f:
            raise ValueError(f"random_crop_size: expected a multiple of the autoencoder's downsampling_factor {f}, "
                             f"got {self.random_crop_size}")
        if self.net.channels != auto.latent_channels:
            raise ValueError(f"autoencoder: its latent_channels {auto.latent_channels} differ from the net's "
                             f"channels {self.net.channels}")

    @property
    def latent(self) -> bool:
        """Whether this is a latent stage (it has an autoencoder)."""
        return self.autoencoder is not None

    @property
    def net_size(self) -> int:
        """Side of what the net works on: ``image_size`` (pixels), or ``image_size / f`` (latents)."""
        return self.image_size // self.autoencoder.downsampling_factor if self.latent else self.image_size

    @property
    def image_channels(self) -> int:
        """Channels of the images this stage makes: the net's, or its autoencoder's ``image_channels`` (3 when it
        does not say) for a latent stage."""
        return int(getattr(self.autoencoder, "image_channels", 3)) if self.latent else self.net.channels

    @property
    def config(self) -> dict:
        """Plain JSON values: the network's and process's kind and configuration, and the stage's settings (and
        the autoencoder's configuration, for a latent stage only)."""
        config = {
            "network": {"kind": _network_kind(self.net), "config": plain_config(self.net.config)},
            "diffusion": {"kind": diffusion_kind(self.diffusion), "config": dict(self.diffusion.config)},
            "image_size": self.image_size,
            "sampler": self.sampler.config,
            "lowres_aug": None if self.lowres_aug is None else self.lowres_aug.config,
            "random_crop_size": self.random_crop_size,
        }
        if self.latent:
            config["autoencoder"] = dict(self.autoencoder.config)
        return config


def _network_kind(net) -> str:
    """The network's kind as checkpoints record it: the :data:`~imagen_lib.nn.networks.NETWORKS` name its config's
    type builds (``Unet``, ``EfficientUnet``), whatever the module's class became (FSDP's ``fully_shard`` makes
    it ``FSDPUnet``); a network of one's own, with another config type, is recorded by its class name."""
    if type(net.config) in NETWORK_OF_CONFIG:
        return network_kind(net.config)
    return type(net).__name__


def random_crops(images: Sequence[Tensor], size: int, generator: Generator = None) -> list[Tensor]:
    """The same random ``size`` x ``size`` window of each row cut from every tensor of ``images`` (all
    (B, C, H, W) with equal B, H, W): row ``b`` keeps ``[top_b : top_b + size, left_b : left_b + size]``, offsets
    uniform over the positions that fit."""
    b, _, h, w = images[0].shape
    device = images[0].device
    tops = (rand((b,), generator, device) * (h - size + 1)).long().clamp_(max=h - size)
    lefts = (rand((b,), generator, device) * (w - size + 1)).long().clamp_(max=w - size)
    offsets = torch.arange(size, device=device)
    rows = (tops[:, None] + offsets)[:, None, :, None]      # (B, 1, size, 1)
    cols = (lefts[:, None] + offsets)[:, None, None, :]     # (B, 1, 1, size)
    batch = torch.arange(b, device=device)[:, None, None, None]
    return [x[batch, torch.arange(x.shape[1], device=device)[None, :, None, None], rows, cols] for x in images]
