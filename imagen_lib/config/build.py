"""What a configuration describes, built: the cascade, the training data set and the settings of a run.

Every function takes a configuration dict (or a parsed :class:`~imagen_lib.config.schema.RunConfig`) and
checks what it reads: :func:`build_cascade` the whole configuration, the others only their blocks
(:func:`~imagen_lib.config.schema.parse_block`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import Any, Optional, Union

from imagen_lib.cascade import Cascade, Stage
from imagen_lib.config.convert import ConfigError, field_names, from_dict, to_dict
from imagen_lib.config.schema import (
    AutoencoderBlock,
    FolderData,
    NetworkBlock,
    RunConfig,
    ShapesData,
    ShardsData,
    StageConfig,
    TextEncoderConfig,
    parse_block,
    parse_config,
)
from imagen_lib.diffusion import diffusion_from_config
from imagen_lib.diffusion.noise_augment import NoiseAugmentation
from imagen_lib.nn import presets
from imagen_lib.nn.networks import network_from_config
from imagen_lib.training.trainer import TrainerSettings
from imagen_lib.validation import check_seed

Config = Union[dict, RunConfig]

# ---------------------------------------------------------------------------------------------------------
# the cascade
# ---------------------------------------------------------------------------------------------------------


def build_text_encoder(block: Union[None, dict, TextEncoderConfig]):
    """The text encoder of a ``text_encoder`` block (None when the block is empty): the class its ``kind`` names
    in :data:`imagen_lib.text.TEXT_ENCODERS` (default ``t5``), loaded by name or built with ``build_tiny``."""
    if not block:
        return None
    from imagen_lib.text import load_text_encoder, text_encoder_class  # lazy: transformers is heavy

    te = block if isinstance(block, TextEncoderConfig) else from_dict(TextEncoderConfig, block, "text_encoder")
    if te.name_or_path is not None:
        return load_text_encoder(te.name_or_path, te.kind, dtype=te.dtype, **te.options())
    rename = {"t5_config": "build_tiny", "clip_config": "build_tiny"}
    with _block_errors("text_encoder", keys=field_names(TextEncoderConfig), rename=rename):
        return text_encoder_class(te.kind).build_tiny(seed=te.seed, vocabulary=_vocabulary(te.vocabulary),
                                                      **te.options(), **te.build_tiny)


@contextlib.contextmanager
def _block_errors(where: str, keys: Sequence[str] = (), rename: Optional[dict] = None):
    """Errors of the objects a block builds, as :class:`ConfigError` that start with the block's dotted key:
    ``where.KEY: ...`` when the message starts with one of the block's ``keys`` (after ``rename``, which maps an
    argument's name to its key: ``t5_config`` -> ``build_tiny``), else ``where: ...``."""
    try:
        yield
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        message = str(error)
        for name, key in (rename or {}).items():
            message = re.sub(rf"^{name}\b", key, message)
        first = re.split(r"[.:,]", message, maxsplit=1)[0]
        raise ConfigError(f"{where}.{message}" if first in keys else f"{where}: {message}") from error


def _vocabulary(value: Union[None, str, list[str]]) -> Optional[list[str]]:
    """A ``build_tiny`` encoder's words: None (bytes), the built-in shapes captions' words, or the list."""
    if value == "shapes":
        from imagen_lib.data.shapes import vocabulary

        return vocabulary()
    if value == "shape_pairs":
        from imagen_lib.data.shapes_pairs import pair_vocabulary

        return pair_vocabulary()
    return value


def build_network(block: Union[str, dict, NetworkBlock], *, text_embed_dim: Optional[int], lowres_cond: bool,
                  where: str = "network", **cascade_values: Any):
    """The network of a ``network`` block (a preset name, ``{preset, config}`` or ``{kind, config}``);
    ``text_embed_dim`` (None: no text), ``lowres_cond`` and ``cascade_values`` (a latent stage's ``channels``)
    come from the cascade, over a preset's values, unless the block's ``config`` sets them. ``where`` names the
    block in errors."""
    if not isinstance(block, NetworkBlock):
        block = from_dict(NetworkBlock, {"preset": block} if isinstance(block, str) else block, where)
    arguments = {"text_embed_dim": text_embed_dim, "lowres_cond": lowres_cond, **cascade_values, **block.config}
    try:
        if block.preset is not None:
            return presets.build(block.preset, **arguments)
        return network_from_config(block.kind, arguments)
    except (TypeError, ValueError) as error:
        field = "kind" if str(error).startswith("kind:") else "config"
        raise ConfigError(f"{where}.{field}: {error}") from error


def build_autoencoder(block: Optional[AutoencoderBlock], where: str = "autoencoder"):
    """The :class:`~imagen_lib.latent.AutoencoderKL` of a stage's ``autoencoder`` block (None without one)."""
    if block is None:
        return None
    from imagen_lib.latent import AutoencoderKL  # lazy: diffusers is an optional extra

    with _block_errors(where, keys=field_names(AutoencoderBlock)):
        if block.pretrained is not None:
            return AutoencoderKL.from_pretrained(block.pretrained, posterior=block.posterior,
                                                 subfolder=block.subfolder, lazy=block.lazy)
        return AutoencoderKL.from_config(posterior=block.posterior, seed=block.seed, **block.config)


def build_stage(block: StageConfig, k: int, text_embed_dim: Optional[int], threshold_given: bool = True) -> Stage:
    """Stage ``k`` of the cascade (``lowres_cond`` for every stage after the first); a stage with an
    ``autoencoder`` block is a latent stage, its net taking the latent channels unless its config says, and
    sampling without thresholding unless its sampler block names a ``threshold`` (``threshold_given``)."""
    where = f"stages.{k}"
    autoencoder = build_autoencoder(block.autoencoder, f"{where}.autoencoder")
    sampler = block.sampler
    if autoencoder is not None and sampler is not None and not threshold_given:
        sampler = sampler.replace(threshold="none")  # latents are not in [-1, 1]
    net = build_network(block.network, text_embed_dim=text_embed_dim, lowres_cond=k > 0, where=f"{where}.network",
                        **({} if autoencoder is None else {"channels": autoencoder.latent_channels}))
    aug = block.lowres_aug
    with _block_errors(f"{where}.diffusion.config"):
        diffusion = diffusion_from_config(block.diffusion.kind, block.diffusion.config)
    with _block_errors(f"{where}.lowres_aug"):
        lowres_aug = NoiseAugmentation(**aug) if aug else None
    with _block_errors(where, keys=field_names(StageConfig)):
        return Stage(net=net, diffusion=diffusion, image_size=block.image_size, sampler=sampler,
                     lowres_aug=lowres_aug, random_crop_size=block.random_crop_size, autoencoder=autoencoder)


def build_cascade(config: Config) -> Cascade:
    """The :class:`~imagen_lib.cascade.Cascade` a configuration describes (weights drawn under ``seed``, which
    also seeds Python's and NumPy's global generators, so every generator a checkpoint restores starts from the
    config)."""
    import random

    import numpy as np
    import torch

    run = parse_config(config)
    if run.seed is not None:
        torch.manual_seed(run.seed)
        random.seed(run.seed)
        np.random.seed(run.seed % 2**32)
    encoder = build_text_encoder(run.text_encoder)
    dim = _text_embed_dim(run, encoder)
    given = _thresholds_given(config, len(run.stages))
    stages = [build_stage(block, k, dim, given[k]) for k, block in enumerate(run.stages)]
    return Cascade(stages, text_encoder=encoder, cond_drop_prob=float(run.cond_drop_prob))


def _thresholds_given(config: Config, count: int) -> list[bool]:
    """Whether each stage block's ``sampler`` names a ``threshold`` (a parsed RunConfig: taken as named)."""
    if isinstance(config, RunConfig):
        return [True] * count
    blocks = [b if isinstance(b, dict) else {} for b in config.get("stages", [])]
    return [isinstance(b.get("sampler"), dict) and "threshold" in b["sampler"] for b in blocks]


def _text_embed_dim(run: RunConfig, encoder) -> Optional[int]:
    """The nets' text width: the encoder's, else ``text_embed_dim``, else the precomputed embeddings'; the
    precomputed embeddings must agree with the first two."""
    given = encoder.embed_dim if encoder is not None else run.text_embed_dim
    if isinstance(run.data, ShapesData):  # ShapePairsData too
        return given
    stored = precomputed_text_dim(run)
    if stored is not None and given is not None and stored != given:
        source = "the text_encoder's width" if encoder is not None else "text_embed_dim"
        raise ValueError(f"data: the precomputed embeddings are {stored} wide, but {source} is {given}")
    if stored is None and given is None:
        raise ValueError(
            "text_encoder: captions need a text_encoder block, or precomputed embeddings "
            "(imagen-lib precache, then data.embeddings for a folder or the precached shards' urls)"
        )
    return given if given is not None else stored


# ---------------------------------------------------------------------------------------------------------
# settings of the run
# ---------------------------------------------------------------------------------------------------------


def trainer_settings(config: Config) -> TrainerSettings:
    """The :class:`~imagen_lib.training.trainer.TrainerSettings` of the ``trainer`` block."""
    return parse_block(config, "trainer")


def stage_training(config: Config, k: int) -> dict:
    """``{"steps", "batch_size"}`` of stage ``k`` (defaults 1000 and 16)."""
    train = parse_block(config, "stages")[k].train
    return {"steps": train.steps, "batch_size": train.batch_size}


def parallel_settings(config: Config) -> Optional[dict]:
    """``{"threads_per_stage", "join_at_step"}`` of the ``parallel_stages`` block, or None without one."""
    block = parse_block(config, "parallel_stages")
    return None if block is None else to_dict(block)


def sample_settings(config: Config) -> dict:
    """``{"prompts", "seed", "num_images_per_prompt"}`` of the ``sample`` block (the seed checked as
    :meth:`~imagen_lib.cascade.Cascade.sample` checks it: an int in [0, 2**63))."""
    settings = to_dict(parse_block(config, "sample"))
    with _block_errors("sample", keys=["seed"]):
        check_seed("seed", settings["seed"])
    return settings


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------


def data_block(config: Config) -> tuple[str, dict, int]:
    """``(type, options, num_workers)`` of the ``data`` block (default ``{type: shapes}``), checked; the
    options are the data set's keyword arguments."""
    data = parse_block(config, "data")
    options = {k: v for k, v in to_dict(data).items() if k not in ("type", "num_workers")}
    if isinstance(data, FolderData):
        if data.extensions is None:
            del options["extensions"]  # the folder's own list
        else:
            options["extensions"] = tuple(data.extensions)
    return data.type, options, data.num_workers


def precomputed_text_dim(config: Config) -> Optional[int]:
    """Width of the precomputed caption embeddings the ``data`` block reads (None when it reads captions):
    the store's for a folder with ``embeddings``, the first sample's ``emb.npy`` for precached shards."""
    data = parse_block(config, "data")
    with _data_errors(data.type):
        if isinstance(data, FolderData) and data.embeddings is not None:
            from imagen_lib.data.embedding_width import store_embedding_width

            return store_embedding_width(data.embeddings)
        if isinstance(data, ShardsData) and data.text != "texts":
            from imagen_lib.data.embedding_width import shard_embedding_width

            return shard_embedding_width(data.urls)
    return None


def build_dataset(config: Config, image_size: int) -> tuple[Any, int]:
    """The training data set of the ``data`` block at ``image_size``, and its ``num_workers``.

    ``shapes``: :class:`~imagen_lib.data.shapes.ShapesDataset`; ``shape_pairs``:
    :class:`~imagen_lib.data.shapes_pairs.ShapePairsDataset`; ``folder``:
    :class:`~imagen_lib.data.folder.ImageTextFolder`; ``shards``: :class:`~imagen_lib.data.shards.ShardDataset`
    (it splits itself across processes and workers). Without a ``text_encoder`` block the data must carry
    precomputed embeddings, and ``sample.prompts`` must be empty (there is nothing to encode them with).
    """
    kind, options, num_workers = data_block(config)
    if kind == "shapes":
        from imagen_lib.data.shapes import ShapesDataset

        with _data_errors(kind):
            return ShapesDataset(image_size=image_size, **options), num_workers
    if kind == "shape_pairs":
        from imagen_lib.data.shapes_pairs import ShapePairsDataset

        with _data_errors(kind):
            return ShapePairsDataset(image_size=image_size, **options), num_workers
    has_encoder = parse_block(config, "text_encoder") is not None
    if not has_encoder and parse_block(config, "sample").prompts:
        raise ValueError(
            "sample.prompts: this config has no text_encoder (it trains on precomputed embeddings), so prompts "
            "cannot be encoded; remove them and sample the checkpoint with the encoder afterwards"
        )
    with _data_errors(kind):
        if kind == "folder":
            return _folder(options, image_size, has_encoder), num_workers
        return _shards(options, image_size, has_encoder), num_workers


@contextlib.contextmanager
def _data_errors(kind: str):
    """The data sets' errors name their argument; say that it came from the config's ``data`` block."""
    try:
        yield
    except (TypeError, ValueError, OSError) as error:
        raise ValueError(f"data ({kind}): {error}") from error


def _folder(options: dict, image_size: int, has_encoder: bool):
    from imagen_lib.data.folder import ImageTextFolder

    if not has_encoder and options.get("embeddings") is None:
        raise ValueError("embeddings: missing; without a text_encoder block the captions must be precomputed "
                         "(imagen-lib precache --encoder T5 ROOT STORE, then data.embeddings: STORE)")
    options = dict(options)
    return ImageTextFolder(options.pop("root"), image_size, **options)


def _shards(options: dict, image_size: int, has_encoder: bool):
    from imagen_lib.data.shards import ShardDataset

    options = dict(options)
    text = options.pop("text")
    if not has_encoder:
        if text == "texts":
            raise ValueError("text: 'texts' needs a text_encoder block; use precached shards with text: embeddings")
        text = "embeddings"  # a shard without emb.npy then fails with a message naming precache
    return ShardDataset(options.pop("urls"), image_size, text=text, **options)
