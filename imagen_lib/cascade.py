"""The cascade: a text encoder (optional) and a list of stages, each a network, a diffusion process, an image
size and sampler settings. It joins the parts and has no maths of its own: losses come from the diffusion
processes, samplers from :mod:`imagen_lib.diffusion.samplers`, guidance, thresholding and inpainting from
:mod:`imagen_lib.diffusion.guidance`, low-resolution conditioning noise from :mod:`imagen_lib.diffusion.noise_augment`.

Images are in [-1, 1] for training (:meth:`Cascade.forward`) and in [0, 1] (or PIL) out of
:meth:`Cascade.sample`, whose options (:class:`SamplerSettings`, :class:`StartImages`, :class:`InitImages`,
:class:`Inpainting`, :class:`NegativePrompt`) live in
:mod:`imagen_lib.sampling_options` and are re-exported here. The public methods check their arguments once, on
entry (:mod:`imagen_lib.validation`: types by beartype, values by hand), so a bad one fails with its name. The
parts are checked structurally against :mod:`imagen_lib.protocols`, so a network, process or text encoder of
your own plugs in; checkpoints are read and written by :mod:`imagen_lib.cascade_checkpoint`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from imagen_lib import cascade_checkpoint, cascade_latent
from imagen_lib.cascade_stage import Stage, random_crops
from imagen_lib.diffusion import diffusion_from_config, guidance
from imagen_lib.diffusion.noise import Generator, rand
from imagen_lib.diffusion.noise_augment import NoiseAugmentation
from imagen_lib.diffusion.samplers import get_sampler
from imagen_lib.protocols import Network, TextEncoder, check_protocol, plain_config
from imagen_lib.sampling_options import (
    InitImages,
    Inpainting,
    NegativePrompt,
    SamplerSettings,
    StartImages,
    check_guide_networks,
    eval_mode,
    guided_denoiser,
    negative_rows,
    resize,
    sdedit_start,
)
from imagen_lib.validation import (
    check_bool_mask,
    check_embeddings,
    check_images,
    check_int,
    check_number,
    check_seed,
    check_stage,
    check_texts,
    typechecked,
)

__all__ = [
    "CONFIG_FORMAT", "Cascade", "InitImages", "Inpainting", "NegativePrompt", "PromptEncoder", "SamplerSettings",
    "Stage", "StartImages", "random_crops", "resize",
]

CONFIG_FORMAT = "imagen_lib.cascade/1"
_SEED_END = 2**63  # image i draws from torch.Generator().manual_seed(seed + i), which takes a signed 64-bit value


# ---------------------------------------------------------------------------------------------------------
# the cascade
# ---------------------------------------------------------------------------------------------------------

PromptEncoder = Callable[[Sequence[str]], tuple[Tensor, Tensor]]


class Cascade(nn.Module):
    """A cascade of diffusion stages with an optional text encoder.

    Args:
        stages: the stages, lowest resolution first; every stage after the first is a super-resolution
            stage (``net.lowres_cond``) whose input is the previous stage's output.
        text_encoder: an encoder following :class:`imagen_lib.protocols.TextEncoder`
            (:class:`~imagen_lib.text.T5TextEncoder`), or None (default) to pass precomputed ``text_embeds`` +
            ``text_mask`` everywhere (or for an unconditional cascade).
        cond_drop_prob: probability of dropping the text of a training example, for classifier-free
            guidance, default 0.1 (Imagen's; NeMo's ``drop_rate``).
    """

    def __init__(
        self, stages: Sequence[Stage], text_encoder: Optional[TextEncoder] = None, cond_drop_prob: float = 0.1,
    ):
        super().__init__()
        stages = list(stages)
        if not stages or not all(isinstance(s, Stage) for s in stages):
            raise TypeError("stages: expected a non-empty list of Stage")
        check_number("cond_drop_prob", cond_drop_prob, low=0, high=1, high_open=True)
        if text_encoder is not None:
            check_protocol(text_encoder, TextEncoder, "text_encoder")
        self._check_stages(stages, text_encoder)
        self.stages = stages
        self.nets = nn.ModuleList([s.net for s in stages])  # registered so .to(), .parameters() see them
        self.text_encoder = text_encoder
        self.cond_drop_prob = float(cond_drop_prob)
        self._prompt_encoder: Optional[PromptEncoder] = None  # set by using(); None: the text encoder
        self._guide_networks: dict[int, nn.Module] = {}  # set by using(): autoguidance's networks by stage

    @staticmethod
    def _check_stages(stages: list[Stage], text_encoder) -> None:
        if stages[0].net.lowres_cond:
            raise ValueError("stages: the first stage must not be a super-resolution (lowres_cond) network")
        for k, (prev, cur) in enumerate(zip(stages, stages[1:]), start=1):
            if not cur.net.lowres_cond:
                raise ValueError(f"stages: stage {k} follows another stage, so its net needs lowres_cond=True")
            if cur.image_size < prev.image_size:
                raise ValueError(f"stages: stage {k} ({cur.image_size} px) is smaller than stage {k - 1}")
        channels = {s.image_channels for s in stages}  # a latent stage's net has its autoencoder's channels
        dims = {s.net.text_embed_dim for s in stages}
        if len(channels) > 1 or len(dims) > 1:
            raise ValueError(f"stages: all stages need the same image channels and text_embed_dim, got {channels}, "
                             f"{dims}")
        dim = dims.pop()
        if text_encoder is not None and dim != text_encoder.embed_dim:
            raise ValueError(f"text_encoder: embed_dim {text_encoder.embed_dim} differs from the nets' {dim}")

    def using(
        self, networks: Optional[Sequence[nn.Module]] = None, text_encoder: Optional[PromptEncoder] = None,
        guide_networks: Optional[Mapping[int, nn.Module]] = None,
    ) -> "Cascade":
        """A view of this cascade that runs other modules (e.g. the Trainer's EMA copies); the original is
        left untouched. ``networks``: one per stage with its stage's configuration, in place of the stages'
        nets; ``text_encoder``: any callable ``texts -> (text_embeds, text_mask)`` (a T5TextEncoder, a function)
        that encodes prompts in place of the cascade's own; ``guide_networks``: ``{stage: network}``, the guiding
        (worse) networks of autoguidance (``autoguidance_scale``), e.g. an earlier checkpoint's EMA net or a smaller
        preset of that stage (:func:`~imagen_lib.sampling_options.check_guide_networks`). All default to what this
        cascade uses. Everything else is shared: processes, sampler settings, noise augmentation,
        ``cond_drop_prob`` and the text encoder that :attr:`config` and checkpoints describe."""
        stages = self.stages
        if networks is not None:
            networks = list(networks)
            if len(networks) != len(stages):
                raise ValueError(f"networks: expected {len(stages)} networks (one per stage), got {len(networks)}")
            for k, (net, st) in enumerate(zip(networks, stages)):
                check_protocol(net, Network, f"networks[{k}]")
                if plain_config(net.config) != plain_config(st.net.config):
                    raise ValueError(f"networks[{k}]: expected the configuration of stage {k}'s net, got another")
            stages = [dataclasses.replace(st, net=net) for st, net in zip(stages, networks)]
        view = Cascade(stages, text_encoder=self.text_encoder, cond_drop_prob=self.cond_drop_prob)
        view.training = self.training  # the flag only: train() would reach into the shared modules
        view._guide_networks = (dict(self._guide_networks) if guide_networks is None
                                else check_guide_networks(guide_networks, stages))
        encoder = text_encoder if text_encoder is not None else self._prompt_encoder
        if encoder is not None:
            dim = getattr(encoder, "embed_dim", self.text_embed_dim)  # checked when the encoder says
            if self.text_embed_dim is None or not callable(encoder) or dim != self.text_embed_dim:
                raise ValueError(f"text_encoder: expected a callable giving {self.text_embed_dim}-wide embeddings "
                                 f"for this cascade's nets, got {type(encoder).__name__}")
            view._prompt_encoder = encoder
        return view

    # ----------------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.nets.parameters()).device

    @property
    def text_embed_dim(self) -> Optional[int]:
        """Width of the text embeddings the nets take (None: an unconditional cascade)."""
        return self.stages[0].net.text_embed_dim

    @property
    def channels(self) -> int:
        """Channels of the images (a latent stage's nets see its autoencoder's latent channels instead)."""
        return self.stages[0].image_channels

    @property
    def config(self) -> dict:
        """Plain JSON values that rebuild this cascade's architecture (:meth:`from_config`)."""
        return {
            "format": CONFIG_FORMAT,
            "cond_drop_prob": self.cond_drop_prob,
            "text_encoder": None if self.text_encoder is None else self.text_encoder.config,
            "stages": [s.config for s in self.stages],
        }

    def _stage_index(self, stage: int, name: str = "stage") -> int:
        return check_stage(name, stage, len(self.stages))

    def _check_text_inputs(self, texts, text_embeds, text_mask) -> Optional[list[str]]:
        """``texts`` as a list; the precomputed embeddings and mask checked (finite float, bool, shapes)."""
        if texts is not None and text_embeds is not None:
            raise ValueError("texts, text_embeds: pass one of them, not both")
        if text_mask is not None and text_embeds is None:
            raise ValueError("text_mask: given without text_embeds (texts are masked by their encoder)")
        if self.text_embed_dim is None and (texts is not None or text_embeds is not None):
            raise ValueError("texts: this cascade is unconditional (its nets take no text)")
        if text_embeds is not None:
            check_embeddings("text_embeds", text_embeds, width=self.text_embed_dim)
        if text_mask is not None:
            check_bool_mask("text_mask", text_mask, ndims=(2,), meaning="True = a real token")
        return None if texts is None else [texts] if isinstance(texts, str) else check_texts("texts", texts)

    @typechecked
    def condition(
        self, batch: Optional[int], texts: Optional[Sequence[str]] = None, text_embeds: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None, text_encoder: Optional[PromptEncoder] = None,
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The nets' ``(text_embeds, text_mask)`` for a batch of ``batch`` rows (None: as many as given), from
        ``texts`` (a non-empty list of strings, encoded by ``text_encoder`` when given, else by the cascade's: see
        :meth:`using`) or precomputed embeddings (a finite float (B, N, D) tensor, and a bool (B, N) mask).
        ``text_mask`` defaults to the non-zero rows of ``text_embeds`` (padded positions are zero).
        ``(None, None)`` when unconditional."""
        batch = check_int("batch", batch, low=1, optional=True)
        texts = self._check_text_inputs(texts, text_embeds, text_mask)
        if self.text_embed_dim is None:
            return None, None
        if texts is not None:
            encoder = next((e for e in (text_encoder, self._prompt_encoder, self.text_encoder) if e is not None), None)
            if encoder is None:
                raise ValueError("texts: this cascade has no text encoder; pass text_embeds and text_mask")
            text_embeds, text_mask = encoder(texts)
        elif text_embeds is None:
            raise ValueError("texts: this cascade is text-conditioned; pass texts or text_embeds + text_mask")
        if text_embeds.ndim != 3 or text_embeds.shape[-1] != self.text_embed_dim:
            raise ValueError(f"text_embeds: expected (B, N, {self.text_embed_dim}), got {tuple(text_embeds.shape)}")
        if text_mask is None:
            text_mask = text_embeds.abs().amax(-1) > 0
        if text_mask.shape != text_embeds.shape[:2]:
            raise ValueError(f"text_mask: expected shape {tuple(text_embeds.shape[:2])}, got {tuple(text_mask.shape)}")
        if batch is not None and text_embeds.shape[0] != batch:
            raise ValueError(f"text_embeds: expected {batch} rows (one per image), got {text_embeds.shape[0]}")
        return text_embeds.to(self.device, torch.float32), text_mask.to(self.device).bool()

    # ----------------------------------------------------------------------------------------------------
    # training
    # ----------------------------------------------------------------------------------------------------

    @typechecked
    def forward(
        self, images: Optional[Tensor] = None, texts: Optional[Sequence[str]] = None,
        text_embeds: Optional[Tensor] = None, text_mask: Optional[Tensor] = None, stage: int = 0, *,
        net: Optional[Callable[..., Tensor]] = None, text_encoder: Optional[PromptEncoder] = None,
        generator: Generator = None, latents: Optional[Tensor] = None,
    ) -> Tensor:
        """Training loss (scalar, mean over the batch) of ``stage`` on ``images``: a non-empty float (B, C, H, W)
        tensor with finite values in [-1, 1] (checked, like the text inputs: see :meth:`condition`).

        Images are resized (antialiased) to the stage's size. A super-resolution stage gets as its
        low-resolution input the images resized to the previous stage's size and back, noised by its
        ``lowres_aug`` at a random level. A stage with ``random_crop_size`` then sees the same random window of
        both. In training mode each example's text is dropped with probability
        ``cond_drop_prob`` (its mask row set to all False). ``net`` / ``text_encoder`` stand in for the
        stage's own modules (the Trainer passes its distributed wrappers).

        A latent stage (:mod:`imagen_lib.cascade_latent`) trains on the images encoded by its autoencoder, or on
        precomputed ``latents`` (B, latent_channels, image_size / f, image_size / f) in their place
        (``imagen-lib precache --autoencoder``); ``images`` may then be omitted unless the stage is a
        super-resolution stage (its low-resolution input comes from the images). A pixel stage ignores
        ``latents`` when it has ``images``, so one data set with precached latents feeds every stage.
        """
        k = self._stage_index(stage)
        st = self.stages[k]
        if latents is not None and not st.latent and images is not None:
            latents = None
        images, b = self._training_rows(st, images, latents)
        embeds, mask = self.condition(b, texts, text_embeds, text_mask, text_encoder)
        if embeds is not None and self.training and self.cond_drop_prob > 0:
            keep = rand((b,), generator, self.device) >= self.cond_drop_prob
            mask = mask & keep[:, None]
            embeds = embeds * mask.unsqueeze(-1).to(embeds.dtype)
        kwargs: dict[str, Any] = {}
        if embeds is not None:
            kwargs.update(text_embeds=embeds, text_mask=mask)
        x0, low = self._training_targets(k, images, latents, generator)
        if low is not None:
            kwargs["lowres_img"], kwargs["lowres_noise_cond"] = st.lowres_aug(low, None, generator)
        return st.diffusion.loss(net if net is not None else st.net, x0, generator=generator, **kwargs)

    def _training_rows(self, st: Stage, images: Optional[Tensor], latents: Optional[Tensor]):
        """``images`` checked and on the cascade's device (or None with precomputed ``latents``), and the rows."""
        if latents is not None:
            cascade_latent.check_latents("latents", st, latents, None)
            if st.net.lowres_cond and images is None:
                raise ValueError("images: missing; a super-resolution stage takes its low-resolution input from "
                                 "the images, also when latents are given")
        elif images is None:
            raise ValueError("images: missing; expected a (B, C, H, W) tensor in [-1, 1]")
        if images is not None:
            check_images("images", images, channels=self.channels, value_range=(-1, 1))
            images = images.to(self.device, torch.float32)
        b = images.shape[0] if images is not None else latents.shape[0]
        if latents is not None and latents.shape[0] != b:
            raise ValueError(f"latents: expected {b} rows (one per image), got {latents.shape[0]}")
        return images, b

    def _training_targets(self, k: int, images: Optional[Tensor], latents: Optional[Tensor], generator: Generator):
        """Stage ``k``'s diffusion target and low-resolution input (None for a base stage), cropped when it trains
        on crops; latents for a latent stage."""
        st = self.stages[k]
        x0 = resize(images, st.image_size) if latents is None else None
        low = resize(resize(images, self.stages[k - 1].image_size), st.image_size) if st.net.lowres_cond else None
        if st.latent:
            x0, low = cascade_latent.training_inputs(st, x0, low, latents.to(self.device) if latents is not None
                                                     else None)
        crop = cascade_latent.net_crop_size(st)
        if crop is not None:
            crops = random_crops([x0] if low is None else [x0, low], crop, generator)
            x0, low = crops[0], (crops[1] if low is not None else None)
        return x0, low

    # ----------------------------------------------------------------------------------------------------
    # sampling
    # ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _call_wide(settings: dict) -> dict:
        """The :class:`SamplerSettings` fields a call sets for every stage (None values keep each stage's own)."""
        names = {f.name for f in dataclasses.fields(SamplerSettings)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(f"sample() got unexpected keyword arguments {unknown}: expected SamplerSettings fields "
                            f"{sorted(names)} (other modules: Cascade.using; start=StartImages or InitImages, "
                            "inpaint=Inpainting, negative_prompt=...)")
        return {name: v for name, v in settings.items() if v is not None}

    def _settings(self, call_wide: dict, stage_overrides) -> list[SamplerSettings]:
        """Every stage's settings: its own < call-wide settings < ``stage_overrides[k]``; all are built (and so
        checked) before any stage samples."""
        n, overrides = len(self.stages), dict(stage_overrides or {})
        for k, override in overrides.items():
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n:
                raise ValueError(f"stage_overrides: stage {k!r} does not exist; expected stage indices in [0, {n - 1}]")
            if not isinstance(override, (Mapping, SamplerSettings)):
                raise TypeError(f"stage_overrides[{k}]: expected a dict of SamplerSettings fields or a "
                                f"SamplerSettings, got {type(override).__name__}")
        resolved = []
        for k, st in enumerate(self.stages):
            override = overrides.get(k, {})
            try:
                resolved.append(override if isinstance(override, SamplerSettings)
                                else st.sampler.replace(**{**call_wide, **dict(override)}))
            except (TypeError, ValueError) as error:
                if not override:
                    raise
                raise (TypeError if isinstance(error, TypeError) else ValueError)(
                    f"stage_overrides[{k}]: {error}") from None
        return resolved

    @staticmethod
    def _base_seed(seed: Optional[int], images: int) -> Optional[int]:
        """``seed`` checked: image ``i`` seeds a generator with ``seed + i``, which must stay below 2**63."""
        seed = check_seed("seed", seed, optional=True)
        if seed is not None and seed + images > _SEED_END:
            raise ValueError(f"seed: expected an int <= 2**63 - {images} (image i draws from seed + i, for "
                             f"{images} images), got {seed}")
        return seed

    def _denoiser(self, k: int, net: nn.Module, settings: SamplerSettings, kwargs: dict):
        """The stage's denoiser with its guidance and thresholding: :func:`sampling_options.guided_denoiser`."""
        return guided_denoiser(self.stages[k].diffusion, net, settings, kwargs, self._guide_networks.get(k), k)

    def _sample_stage(
        self, k: int, settings: SamplerSettings, cond: dict, prev: Optional[Tensor],
        generators: list[torch.Generator], inpaint: Optional[tuple[Tensor, Tensor]], disable_progress: bool,
        init: Optional[tuple[Tensor, float]] = None,
    ) -> Tensor:
        """Run stage ``k`` with its net in eval mode; ``prev`` is the previous stage's output in [-1, 1];
        ``init``: SDEdit's images in [-1, 1] and strength (base stage). Returns [-1, 1] images (a latent stage
        samples latents and returns them decoded: :mod:`imagen_lib.cascade_latent`)."""
        st = self.stages[k]
        b = len(generators)
        kwargs = dict(cond)
        if st.net.lowres_cond:
            if prev is None:
                raise ValueError(f"start: stage {k} is a super-resolution stage and needs low-resolution images")
            low = cascade_latent.encode_for_sampling(st, resize(prev, st.image_size))
            level = st.lowres_aug.sampling_level(b, settings.lowres_aug_level, self.device, low.dtype)
            kwargs["lowres_img"], kwargs["lowres_noise_cond"] = st.lowres_aug(low, level, generators)
        sampler_fn = get_sampler(settings.sampler or st.diffusion.default_sampler)
        sigmas = st.diffusion.sigmas(settings.steps or st.diffusion.default_steps)
        shape = (b, st.net.channels, st.net_size, st.net_size)
        if init is None:
            x = st.diffusion.initial_noise(shape, sigmas, generators, device=self.device, dtype=torch.float32)
        else:
            start = cascade_latent.encode_for_sampling(st, resize(init[0], st.image_size))
            sigmas, x = sdedit_start(st.diffusion, start, init[1], sigmas, generators, shape, self.device)
        options = {"generator": generators, **settings.options}
        with eval_mode(st.net, self._guide_networks.get(k)):
            den = self._denoiser(k, st.net, settings, kwargs)
            if inpaint is None:
                x = sampler_fn(den, x, sigmas, disable_progress=disable_progress, **options)
            else:
                images, masks = cascade_latent.inpaint_inputs(st, inpaint[0], inpaint[1])
                x = guidance.inpaint(sampler_fn, den, x, sigmas, images=images, masks=masks,
                                     disable_progress=disable_progress, **options)
            return cascade_latent.decode_output(st, x)

    @staticmethod
    def _per_image(t: Tensor, prompts: int, per_prompt: int, name: str, device) -> Tensor:
        """Give a per-prompt or per-image tensor one row per image."""
        t = torch.as_tensor(t).to(device)
        if t.shape[0] == prompts * per_prompt:
            return t
        if t.shape[0] == prompts:
            return t.repeat_interleave(per_prompt, 0)
        raise ValueError(f"{name}: expected {prompts} (one per prompt) or {prompts * per_prompt} rows, got {len(t)}")

    def _inpaint_inputs(self, inpaint: Inpainting, prompts: int, per_prompt: int) -> tuple[Tensor, Tensor]:
        """Images in [-1, 1] and float masks (B, 1, H, W), one row per image."""
        images = self._per_image(inpaint.images, prompts, per_prompt, "inpaint.images", self.device).float() * 2 - 1
        masks = torch.as_tensor(inpaint.masks, device=self.device)
        if masks.ndim == 2:
            masks = masks.expand(images.shape[0], *masks.shape)
        if masks.ndim == 3:
            masks = masks[:, None]
        masks = self._per_image(masks, prompts, per_prompt, "inpaint.masks", self.device).float()
        return images, masks

    def _prompt_conditioning(self, texts, text_embeds, text_mask, per_prompt: int, negative) -> tuple[int, dict]:
        """The number of prompts (1 when unconditional) and the nets' text keyword arguments with one row per
        image (and ``"negative"``: the negative prompt's (embeds, mask), one row per image, when given)."""
        embeds, mask = self.condition(None, texts, text_embeds, text_mask)
        if embeds is None:
            if negative is not None:
                raise ValueError("negative_prompt: this cascade is unconditional (its nets take no text)")
            return 1, {}
        cond = {"text_embeds": embeds.repeat_interleave(per_prompt, 0),
                "text_mask": mask.repeat_interleave(per_prompt, 0)}
        if negative is not None:
            neg_embeds, neg_mask = negative_rows(negative, embeds.shape[0], self.condition)
            cond["negative"] = (neg_embeds.repeat_interleave(per_prompt, 0), neg_mask.repeat_interleave(per_prompt, 0))
        return embeds.shape[0], cond

    def _check_given_images(self, start: Optional[StartImages], inpaint: Optional[Inpainting]) -> None:
        """The channels of the images given to start from or inpaint (their own checks ran when built)."""
        for name, given in (("start.images", start and start.images), ("inpaint.images", inpaint and inpaint.images)):
            if given is not None and given.shape[1] != self.channels:
                raise ValueError(f"{name}: expected (B, {self.channels}, H, W) images (this cascade's channels), "
                                 f"got shape {tuple(given.shape)}")

    @torch.no_grad()
    @typechecked
    def sample(
        self, texts: Optional[Sequence[str]] = None, *, text_embeds: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None, negative_prompt: Union[None, str, Sequence[str], NegativePrompt] = None,
        num_images_per_prompt: int = 1, seed: Optional[int] = None, stop_at_stage: Optional[int] = None,
        return_pil: bool = False, disable_progress: bool = False,
        stage_overrides: Optional[Mapping[int, Union[dict, SamplerSettings]]] = None,
        start: Union[None, StartImages, InitImages] = None, inpaint: Optional[Inpainting] = None, **settings: Any,
    ) -> Union[Tensor, list]:
        """Generate images, returned in [0, 1] as (B, C, H, W) (or a list of PIL images with ``return_pil``).
        Every argument is checked before the first stage runs.

        Args:
            texts / text_embeds + text_mask: the prompts (B_p of them); omit both for an unconditional
                cascade, which then draws ``num_images_per_prompt`` images.
            negative_prompt: what classifier-free guidance steers away from, in place of the null text (default
                None): one string for all prompts, a list with one per prompt, or :class:`NegativePrompt`
                embeddings. It acts at every stage with text and ``cond_scale != 1``.
            num_images_per_prompt: images per prompt, default 1; image ``p * n + j`` is prompt ``p``'s ``j``-th.
            cond_scale, **settings: :class:`SamplerSettings` fields for every stage (``steps=15``,
                ``sampler="heun"``, ``threshold="static"``, ...); None (default) keeps each stage's own.
            stage_overrides: ``{stage: dict of SamplerSettings fields, or a SamplerSettings}`` for single stages,
                over the call-wide settings.
            seed: image ``i`` draws all its noise from ``torch.Generator().manual_seed(seed + i)``, so it does
                not depend on the batch it is drawn in (``seed + i < 2**63``); None draws a base seed from torch's
                global RNG.
            stop_at_stage: the last stage run (default: the last one).
            start: :class:`StartImages` to begin at a super-resolution stage from given images, or
                :class:`InitImages` for image-to-image (SDEdit) at the base stage (default None).
            inpaint: :class:`Inpainting` images and masks, RePaint at every stage (default None).

        Other networks, another text encoder or autoguidance's guide networks: ``cascade.using(...).sample(...)``.
        """
        first = 0 if not isinstance(start, StartImages) else self._stage_index(start.stage, "start.stage")
        last = self._stage_index(stop_at_stage, "stop_at_stage") if stop_at_stage is not None else len(self.stages) - 1
        if last < first:
            raise ValueError(f"stop_at_stage: expected >= the start stage {first}, got {last}")
        stage_settings = self._settings(self._call_wide(settings), stage_overrides)
        n = check_int("num_images_per_prompt", num_images_per_prompt, low=1)
        self._check_given_images(start, inpaint)
        prompts, cond = self._prompt_conditioning(texts, text_embeds, text_mask, n, negative_prompt)
        seed = self._base_seed(seed, prompts * n)
        base = int(torch.randint(0, 2**62, ()).item()) if seed is None else seed
        generators = [torch.Generator().manual_seed(base + i) for i in range(prompts * n)]
        prev = init = None
        if start is not None:
            given = start.images
            if isinstance(start, InitImages) and len(given) == 1:  # one init image for every prompt
                given = given.expand(prompts, -1, -1, -1)
            given = self._per_image(given, prompts, n, "start.images", self.device).float() * 2 - 1
            prev, init = (given, None) if isinstance(start, StartImages) else (None, (given, start.strength))
        painting = None if inpaint is None else self._inpaint_inputs(inpaint, prompts, n)
        for k in range(first, last + 1):
            prev = self._sample_stage(k, stage_settings[k], cond, prev, generators, painting, disable_progress,
                                      init if k == 0 else None)
        images = ((prev.clamp(-1, 1) + 1) / 2).float()
        if return_pil:
            from imagen_lib.images import to_pil

            return [to_pil(img) for img in images]
        return images

    # ----------------------------------------------------------------------------------------------------
    # configuration and checkpoints
    # ----------------------------------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls, config: dict, text_encoder: Optional[TextEncoder] = None, load_text_encoder: bool = True,
        autoencoders: Optional[Mapping[int, Any]] = None,
    ) -> "Cascade":
        """A freshly initialised cascade from :attr:`config` (the text encoder is rebuilt from its source
        unless ``text_encoder`` is given or ``load_text_encoder`` is False). A process of your own is rebuilt
        once its class is registered (:func:`imagen_lib.diffusion.register_diffusion`). A latent stage's
        autoencoder is ``autoencoders[k]`` when given, else rebuilt from its source (a pretrained folder or name,
        read lazily; random weights for one described by its configuration alone)."""
        from imagen_lib.latent import autoencoder_from_config
        from imagen_lib.nn.networks import network_from_config

        if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
            raise ValueError(f"config: expected a Cascade.config dict with format {CONFIG_FORMAT!r}")
        stages, autoencoders = [], dict(autoencoders or {})
        for k, sc in enumerate(config["stages"]):
            aug = sc.get("lowres_aug")
            if k not in autoencoders and sc.get("autoencoder") is not None:
                autoencoders[k] = autoencoder_from_config(sc["autoencoder"], random_weights=True)
            stages.append(Stage(
                net=network_from_config(sc["network"]["kind"], sc["network"]["config"]),
                diffusion=diffusion_from_config(sc["diffusion"]["kind"], sc["diffusion"]["config"]),
                image_size=int(sc["image_size"]),
                sampler=SamplerSettings(**sc.get("sampler", {})),
                lowres_aug=None if aug is None else NoiseAugmentation(**aug),
                random_crop_size=sc.get("random_crop_size"),
                autoencoder=autoencoders.get(k),
            ))
        if text_encoder is None and load_text_encoder and config.get("text_encoder") is not None:
            from imagen_lib.text import text_encoder_from_config

            text_encoder = text_encoder_from_config(config["text_encoder"])
        return cls(stages, text_encoder=text_encoder, cond_drop_prob=config.get("cond_drop_prob", 0.1))

    def save(self, path: Union[str, Path], *, overwrite: bool = False) -> str:
        """Write the configuration and the current weights as a checkpoint folder (any fsspec URL); an existing
        one is replaced only with ``overwrite=True``. Returns the path."""
        return cascade_checkpoint.save_cascade(self, path, overwrite=overwrite)

    @classmethod
    def from_checkpoint(
        cls, path: Union[str, Path], use_ema: bool = True, device: Union[None, str, torch.device] = None,
        load_text_encoder: bool = True,
    ) -> "Cascade":
        """Rebuild a cascade from a checkpoint alone, with its EMA weights (``use_ema``, default True, when the
        checkpoint has them) or the raw ones; ``load_text_encoder=False`` skips the encoder (precomputed
        embeddings). The cascade is returned in eval mode on ``device`` (default CPU)."""
        return cascade_checkpoint.read_cascade(
            cls, path, use_ema=use_ema, device=device, load_text_encoder=load_text_encoder
        )
