"""The first-stage autoencoder of latent diffusion (seed 003's ``AutoencoderKL``), wrapping diffusers' class.

diffusers' ``AutoencoderKL`` is the dependency because it loads every published SD 1.x / 2.x / SDXL VAE as it
is (a local folder or a hub name) and is what the field trains and ships; it is the ``[latent]`` extra
(``pip install "imagen_lib[latent]"``) and is imported only when an autoencoder is built.

:class:`AutoencoderKL` follows :class:`imagen_lib.protocols.Autoencoder`: ``encode`` takes images in [-1, 1]
and returns latents multiplied by ``scaling_factor`` (shifted first by ``shift_factor`` where the VAE has one,
as SD 3's); ``decode`` undoes both. It is frozen (eval mode, no gradients): a latent stage trains only its
U-Net. A VAE built here from seed 003's vocabulary (:func:`diffusers_config`) or loaded with
:meth:`AutoencoderKL.from_pretrained` is saved with :meth:`AutoencoderKL.save_pretrained` (config.json +
safetensors), which ``from_pretrained`` reads back.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

SD_SCALING_FACTOR = 0.18215
"""SD 1.x / 2.x's latent scale: 1 / the standard deviation of its VAE's latents on its training images."""

POSTERIORS = ("sample", "mean")


def _diffusers_vae() -> type:
    try:
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    except ImportError as error:  # the optional extra
        raise ImportError(
            "imagen_lib.latent.AutoencoderKL needs diffusers: pip install \"imagen_lib[latent]\"") from error
    return DiffusersAutoencoderKL


def diffusers_config(
    *, embed_dim: int = 4, z_channels: int = 4, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4),
    num_res_blocks: int = 2, double_z: bool = True, resolution: int = 256, in_channels: int = 3, out_ch: int = 3,
    attn_resolutions: Sequence[int] = (), dropout: float = 0.0, norm_num_groups: int = 32,
) -> dict:
    """diffusers' ``AutoencoderKL`` configuration for seed 003's ``ddconfig`` vocabulary (defaults: SD's VAE).

    ``ch * ch_mult`` are the levels' widths (``block_out_channels``), ``num_res_blocks`` the ResNet blocks per
    level (``layers_per_block``), ``z_channels`` the latent channels; the images shrink by
    ``2 ** (len(ch_mult) - 1)``. diffusers' class, like SD's, has attention only in the middle block, a
    doubled ``z`` (mean and log-variance) and ``embed_dim == z_channels``, so other values are refused rather
    than silently changed; ``resolution`` is recorded (``sample_size``) but never used. ``norm_num_groups``
    (32 in SD) must divide ``ch``: tiny VAEs need fewer groups. The scaling factor is SD's (0.18215):
    :meth:`AutoencoderKL.from_config` and :func:`~imagen_lib.latent.train_autoencoder` set another.
    """
    if embed_dim != z_channels:
        raise ValueError(f"embed_dim: diffusers' AutoencoderKL needs embed_dim == z_channels ({z_channels}), "
                         f"got {embed_dim}")
    if not double_z:
        raise ValueError("double_z: expected True (a KL autoencoder predicts a mean and a log-variance)")
    if list(attn_resolutions):
        raise ValueError(f"attn_resolutions: expected [] (SD's VAE has attention only in its middle block), "
                         f"got {list(attn_resolutions)}")
    if dropout != 0:
        raise ValueError(f"dropout: expected 0.0 (diffusers' AutoencoderKL has no dropout), got {dropout}")
    mult = [int(m) for m in ch_mult]
    if not mult or min(mult) < 1 or ch < 1 or num_res_blocks < 1 or z_channels < 1:
        raise ValueError(f"ch, ch_mult, num_res_blocks, z_channels: expected positive values, got {ch}, {mult}, "
                         f"{num_res_blocks}, {z_channels}")
    if any(ch * m % norm_num_groups for m in mult):
        raise ValueError(f"norm_num_groups: expected a divisor of every width {[ch * m for m in mult]}, "
                         f"got {norm_num_groups}")
    return {
        "in_channels": int(in_channels), "out_channels": int(out_ch),
        "down_block_types": ["DownEncoderBlock2D"] * len(mult), "up_block_types": ["UpDecoderBlock2D"] * len(mult),
        "block_out_channels": [ch * m for m in mult], "layers_per_block": int(num_res_blocks),
        "latent_channels": int(z_channels), "norm_num_groups": int(norm_num_groups),
        "sample_size": int(resolution), "scaling_factor": SD_SCALING_FACTOR,
    }


class AutoencoderKL(nn.Module):
    """A frozen KL autoencoder (diffusers' ``AutoencoderKL``) following :class:`imagen_lib.protocols.Autoencoder`.

    Args:
        model: a diffusers ``AutoencoderKL`` (or None with ``source`` to load it when first used).
        posterior: ``"sample"`` (default; SD trains on a draw of the posterior) or ``"mean"`` (deterministic;
            precached latents and tests use it).
        source: where the weights come from, recorded in :attr:`config`: ``{"pretrained": path_or_name}``
            (default ``{"built": "from_config"}``: built or trained here, so checkpoints must hold them).
        lazy_config: with ``model=None``, the diffusers configuration of the weights at ``source``; they are
            read on first use, so training on precached latents never loads them.

    Build one with :meth:`from_config` (seed 003's ``ddconfig`` keys, random weights) or
    :meth:`from_pretrained` (a folder or hub name with config.json + weights).
    """

    def __init__(self, model: Any = None, *, posterior: str = "sample", source: Optional[dict] = None,
                 lazy_config: Optional[dict] = None):
        super().__init__()
        if posterior not in POSTERIORS:
            raise ValueError(f"posterior: expected one of {POSTERIORS}, got {posterior!r}")
        if model is None and (lazy_config is None or not source or "pretrained" not in source):
            raise ValueError("model: expected a diffusers AutoencoderKL, or None with source={'pretrained': ...} "
                             "and lazy_config")
        self._model = [model]  # a list, so the VAE is no submodule: cascades and optimizers never see its weights
        self._vae_config = dict(model.config if model is not None else lazy_config)
        self.posterior = posterior
        self.source = dict(source) if source is not None else {"built": "from_config"}
        self.latent_channels = int(self._vae_config["latent_channels"])
        self.downsampling_factor = 2 ** (len(self._vae_config["block_out_channels"]) - 1)
        scaling = self._vae_config.get("scaling_factor")
        self.scaling_factor = float(SD_SCALING_FACTOR if scaling is None else scaling)
        shift = self._vae_config.get("shift_factor")
        self.shift_factor = 0.0 if shift is None else float(shift)
        if model is not None:
            self._freeze(model)

    @staticmethod
    def _freeze(model: nn.Module) -> None:
        model.eval()
        model.requires_grad_(False)

    @classmethod
    def from_config(cls, posterior: str = "sample", seed: Optional[int] = None,
                    scaling_factor: float = SD_SCALING_FACTOR, **ddconfig: Any) -> "AutoencoderKL":
        """Random weights (drawn from ``torch.manual_seed(seed)`` when given) for seed 003's ``ddconfig`` keys
        (:func:`diffusers_config`; defaults: SD's VAE), latents scaled by ``scaling_factor`` (SD's 0.18215)."""
        config = {**diffusers_config(**ddconfig), "scaling_factor": float(scaling_factor)}
        with torch.random.fork_rng(enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            model = _diffusers_vae()(**config)
        return cls(model, posterior=posterior)

    @classmethod
    def from_pretrained(
        cls, name_or_path: Union[str, Path], *, posterior: str = "sample", subfolder: Optional[str] = None,
        lazy: bool = False,
    ) -> "AutoencoderKL":
        """A published VAE (e.g. ``stabilityai/sd-vae-ft-mse``, or a pipeline's ``subfolder="vae"``) or a folder
        written by :meth:`save_pretrained`. ``lazy=True`` reads only its config.json now and the weights on
        first use."""
        source = {"pretrained": str(name_or_path), **({"subfolder": subfolder} if subfolder else {})}
        kwargs = {"subfolder": subfolder} if subfolder else {}
        if lazy:
            config = _diffusers_vae().load_config(str(name_or_path), **kwargs)
            return cls(None, posterior=posterior, source=source, lazy_config=dict(config))
        return cls(_diffusers_vae().from_pretrained(str(name_or_path), **kwargs), posterior=posterior, source=source)

    @property
    def model(self) -> nn.Module:
        """The diffusers model (loaded now when this autoencoder was made lazily)."""
        if self._model[0] is None:
            kwargs = {"subfolder": self.source["subfolder"]} if "subfolder" in self.source else {}
            model = _diffusers_vae().from_pretrained(self.source["pretrained"], **kwargs)
            self._freeze(model)
            self._model[0] = model
        return self._model[0]

    @property
    def loaded(self) -> bool:
        """Whether the weights have been read (always, unless made with ``lazy=True`` and not used yet)."""
        return self._model[0] is not None

    def diffusers_config(self) -> dict:
        """The diffusers configuration as plain JSON values (diffusers' private ``_`` keys left out)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self._vae_config.items()
                if not k.startswith("_")}

    @property
    def config(self) -> dict:
        """Plain JSON values stored in checkpoints: the diffusers configuration, the posterior and the source."""
        return {"kind": "AutoencoderKL", "diffusers_config": self.diffusers_config(), "posterior": self.posterior,
                "source": dict(self.source)}

    def _on(self, x: Tensor) -> nn.Module:
        model = self.model
        param = next(model.parameters())
        if param.device != x.device:
            model.to(x.device)
        return model

    @property
    def device(self) -> torch.device:
        """Where the weights are (they follow the inputs of :meth:`encode` and :meth:`decode`)."""
        return next(self.model.parameters()).device

    @property
    def image_channels(self) -> int:
        """Channels of the images it encodes and decodes (3 for SD's VAE)."""
        return int(self._vae_config.get("in_channels", 3))

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Latents ``(z - shift_factor) * scaling_factor`` (B, latent_channels, H / f, W / f) of images
        (B, C, H, W) in [-1, 1], ``z`` the posterior's mean or a draw from it (torch's global RNG), as
        :attr:`posterior` says."""
        return self._encode(images, self.posterior)

    def encode_mean(self, images: Tensor) -> Tensor:
        """:meth:`encode` with the posterior's mean whatever :attr:`posterior` says (sampling and precaching)."""
        return self._encode(images, "mean")

    @torch.no_grad()
    def _encode(self, images: Tensor, posterior: str) -> Tensor:
        model = self._on(images)
        param = next(model.parameters())
        dist = model.encode(images.to(param.dtype)).latent_dist
        z = dist.mean if posterior == "mean" else dist.sample()
        return ((z.float() - self.shift_factor) * self.scaling_factor).to(images.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images (B, C, H * f, W * f) in about [-1, 1] from latents as :meth:`encode` returns them."""
        model = self._on(latents)
        param = next(model.parameters())
        z = latents.float() / self.scaling_factor + self.shift_factor
        return model.decode(z.to(param.dtype)).sample.to(latents.dtype)

    def save_pretrained(self, folder: Union[str, Path]) -> None:
        """Write config.json + diffusion_pytorch_model.safetensors to ``folder`` (read by :meth:`from_pretrained`)."""
        self.model.save_pretrained(str(folder), safe_serialization=True)

    def extra_repr(self) -> str:
        return (f"latent_channels={self.latent_channels}, downsampling_factor={self.downsampling_factor}, "
                f"scaling_factor={self.scaling_factor}, posterior={self.posterior!r}")


def autoencoder_from_config(config: dict, folder: Union[None, str, Path] = None,
                            random_weights: bool = False) -> AutoencoderKL:
    """The autoencoder that :attr:`AutoencoderKL.config` describes: from ``folder`` (a checkpoint's copy of its
    weights) when given, else from its source (a pretrained folder or name, read on first use); one described
    by its configuration alone gets random weights only with ``random_weights`` (a fresh cascade), else it is
    an error (a decoder of random weights would go unnoticed)."""
    if not isinstance(config, dict) or config.get("kind") != "AutoencoderKL":
        raise ValueError(f"autoencoder: expected an AutoencoderKL config dict, got {config!r:.200}")
    posterior = config.get("posterior", "sample")
    source = dict(config.get("source", {}))
    if folder is not None:
        auto = AutoencoderKL(_diffusers_vae().from_pretrained(str(folder)), posterior=posterior, source=source)
    elif "pretrained" in source:
        auto = AutoencoderKL.from_pretrained(source["pretrained"], posterior=posterior,
                                             subfolder=source.get("subfolder"), lazy=True)
    elif random_weights:
        model = _diffusers_vae()(**config["diffusers_config"])
        auto = AutoencoderKL(model, posterior=posterior, source=source)
    else:
        raise FileNotFoundError("autoencoder: its weights live only in a checkpoint's autoencoder folder, which "
                                "is missing")
    found = auto.diffusers_config()
    if any(found.get(k) != v for k, v in config.get("diffusers_config", {}).items()):
        raise ValueError("autoencoder: the weights found describe another architecture than the stored config")
    return auto
