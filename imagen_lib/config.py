"""Training configurations: one YAML or JSON file describes the cascade, the data and the training.

The vocabulary follows NeMo's Imagen configs where they have a word for it (``unet``,
``preconditioning_type`` / ``preconditioning``, ``token_length``, ``drop_rate``, a ``sampler`` block with
``step`` / ``cfg``)::

    seed: 0                          # weight initialisation and training noise
    cond_drop_prob: 0.1              # text dropout for classifier-free guidance (NeMo: drop_rate)
    text_embed_dim: null             # width of precomputed embeddings when there is no text_encoder
    text_encoder:                    # omit (or null) for precomputed embeddings or an unconditional cascade
      name_or_path: google/t5-v1_1-base    # a hub name or local folder, or instead:
      build_tiny: {d_model: 64}            # a small random T5 built locally (T5Config fields) ...
      seed: 0                              # ... from this seed
      vocabulary: shapes                   # ... with a word-level tokenizer (shapes' words, or a list; default bytes)
      max_length: 32                       # tokens per caption (NeMo: token_length)
      trainable: false                     # train it jointly with the cascade
    stages:                          # lowest resolution first
      - image_size: 32
        unet: tiny-32                # a preset name, {preset: NAME, **overrides} or {type: Unet|EfficientUnet, **kwargs}
        preconditioning_type: EDM    # EDM (ElucidatedDiffusion) or DDPM (GaussianDiffusionContinuous)
        preconditioning: {loss_type: l2, sigma_data: 0.5, p_mean: -1.2, p_std: 1.2}
        sampler: {sampler: dpmpp_2m, steps: 25, cond_scale: 3.0, threshold: dynamic}   # SamplerSettings
        noise_aug: {schedule: cosine, sample_level: 0.2, max_train_level: 1.0}        # SR stages only
        random_crop_size: null       # train on random crops of this side (Imagen's SR stages: 64 of 256)
        train: {steps: 1000, batch_size: 32}
    data: {type: shapes, seed: 0, length: 100000, num_workers: 0}      # the built-in captioned shapes, or
    data:                            # a folder of images with a same-named .txt caption beside each
      type: folder
      root: path/to/images
      embeddings: path/to/store      # optional: imagen-lib precache's store; then no text_encoder is loaded
      token_length: 128              # optional: trim or pad precomputed embeddings (default: the store's)
      crop: center                   # or random; flip: false; min_size: null (image_size // 2); seed: 0
    data:                            # or WebDataset shards (local paths or any fsspec URL)
      type: shards
      urls: data/shard-{000000..000099}.tar       # a list, a brace pattern or a glob
      text: auto                     # auto | texts | embeddings (precached shards); token_length, crop, flip,
      shuffle_buffer: 1000           # shuffle_shards (true) and seed as for folders; num_workers for both
    trainer: {lr: 1.0e-4, warmup_steps: 100, mixed_precision: "no"}     # TrainerSettings fields
    sample: {prompts: ["a red circle"], seed: 0, num_images_per_prompt: 1}
    parallel_stages:                 # optional, single-process runs: train stages 1.. in their own processes
      threads_per_stage: 1           # ... with this many torch threads each, while stage 0 trains on the rest;
      join_at_step: 5000             # stage 0 waits for them at this step, then takes every thread (null: at its end)

``--set key=value`` overrides use dotted keys, list items by index (``stages.1.train.steps=200``); the value
is read as YAML (``1e-4``, ``true``, ``[1, 2]``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import yaml

TOP_KEYS = {"seed", "cond_drop_prob", "text_embed_dim", "text_encoder", "stages", "data", "trainer", "sample",
            "parallel_stages"}
PARALLEL_KEYS = {"threads_per_stage", "join_at_step"}
STAGE_KEYS = {"image_size", "unet", "preconditioning_type", "preconditioning", "sampler", "noise_aug", "train",
              "random_crop_size"}
TEXT_KEYS = {"name_or_path", "encoder_path", "build_tiny", "vocabulary", "seed", "max_length", "token_length",
             "trainable", "dtype"}
TRAIN_KEYS = {"steps", "batch_size"}
SAMPLE_KEYS = {"prompts", "seed", "num_images_per_prompt"}
# data.type -> the keys its block may hold besides ``type`` and ``num_workers``
DATA_KEYS = {
    "shapes": {"length", "seed", "supersample"},
    "folder": {"root", "embeddings", "token_length", "crop", "flip", "min_size", "extensions", "seed"},
    "shards": {"urls", "text", "token_length", "crop", "flip", "shuffle_buffer", "shuffle_shards", "seed"},
}
DATA_TYPES = tuple(DATA_KEYS)
DATA_REQUIRED = {"folder": ("root", "the folder of images with a .txt caption beside each"),
                 "shards": ("urls", "shard paths or fsspec URLs: a list, a brace pattern or a glob")}
# NeMo's preconditioning names -> ours
EDM_KEYS = {"loss_type": "loss_type", "sigma_data": "sigma_data", "p_mean": "P_mean", "P_mean": "P_mean",
            "p_std": "P_std", "P_std": "P_std", "sigma_min": "sigma_min", "sigma_max": "sigma_max", "rho": "rho"}
DDPM_KEYS = {"loss_type": "loss_type", "pred_objective": "pred_objective", "noise_schedule": "noise_schedule",
             "min_snr_gamma": "min_snr_gamma"}
SAMPLER_ALIASES = {"step": "steps", "cfg": "cond_scale", "name": "sampler"}


class _Loader(yaml.SafeLoader):
    """YAML with ``1e-4`` read as a number (YAML 1.1 wants ``1.0e-4``, a common surprise in configs)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML (or JSON) text with :class:`_Loader`."""
    return yaml.load(text, Loader=_Loader)


def _check_keys(block: Any, allowed: set, where: str) -> dict:
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(block).__name__}")
    unknown = sorted(set(block) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(allowed)}")
    return block


# ---------------------------------------------------------------------------------------------------------
# reading and overriding
# ---------------------------------------------------------------------------------------------------------


def load_config(path: Union[str, Path]) -> dict:
    """Read a YAML or JSON configuration file (YAML is a superset of JSON) and check its top-level keys."""
    text = Path(path).read_text(encoding="utf-8")
    config = json.loads(text) if str(path).endswith(".json") else parse_yaml(text)
    if not isinstance(config, dict):
        raise ValueError(f"config: {path!s} does not hold a mapping")
    return config


def apply_overrides(config: dict, assignments: Sequence[str]) -> dict:
    """A copy of ``config`` with ``key.sub.0.name=value`` assignments applied (values parsed as YAML)."""
    config = copy.deepcopy(config)
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"--set: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ValueError(f"--set: empty key in {item!r}")
        node = config
        for i, part in enumerate(parts[:-1]):
            node = _child(node, part, parts[i + 1], item)
        _assign(node, parts[-1], parse_yaml(raw), item)
    return config


def _child(node: Any, part: str, next_part: str, item: str) -> Any:
    if isinstance(node, list):
        index = _index(node, part, item)
        return node[index]
    if not isinstance(node, dict):
        raise ValueError(f"--set {item!r}: {part!r} is inside a value that is not a mapping or list")
    if node.get(part) is None:
        node[part] = [] if next_part.isdigit() else {}
    return node[part]


def _index(node: list, part: str, item: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ValueError(f"--set {item!r}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)


def _assign(node: Any, part: str, value: Any, item: str) -> None:
    if isinstance(node, list):
        node[_index(node, part, item)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise ValueError(f"--set {item!r}: cannot set {part!r} inside a {type(node).__name__}")


# ---------------------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------------------


def build_text_encoder(block: Optional[dict]):
    """A :class:`~imagen_lib.text.T5TextEncoder` from a ``text_encoder`` block (None when the block is empty)."""
    block = _check_keys(block, TEXT_KEYS, "text_encoder")
    if not block:
        return None
    from imagen_lib.text import T5TextEncoder

    max_length = int(block.get("max_length", block.get("token_length", 128)))
    trainable = bool(block.get("trainable", False))
    name = block.get("name_or_path", block.get("encoder_path"))
    if (name is None) == ("build_tiny" not in block):
        raise ValueError("text_encoder: expected exactly one of name_or_path (or encoder_path) and build_tiny")
    if name is not None:
        return T5TextEncoder(name, max_length=max_length, dtype=block.get("dtype"), trainable=trainable)
    return T5TextEncoder.build_tiny(seed=int(block.get("seed", 0)), max_length=max_length, trainable=trainable,
                                    vocabulary=_vocabulary(block.get("vocabulary")), **(block["build_tiny"] or {}))


def _vocabulary(value: Any) -> Optional[list[str]]:
    """``text_encoder.vocabulary`` of a ``build_tiny`` encoder: None (bytes), ``shapes`` (the built-in caption
    grammar's words) or a list of words."""
    if value is None:
        return None
    if value == "shapes":
        from imagen_lib.data.shapes import vocabulary

        return vocabulary()
    if isinstance(value, list) and value and all(isinstance(w, str) for w in value):
        return value
    raise ValueError(f"text_encoder.vocabulary: expected 'shapes' or a list of words, got {value!r}")


def build_network(unet: Any, *, text_embed_dim: Optional[int], lowres_cond: bool):
    """A network from a stage's ``unet`` entry: a preset name, ``{preset: NAME, **overrides}`` or
    ``{type: Unet|EfficientUnet, **kwargs}``. ``text_embed_dim`` (the text encoder's width, or the config's
    ``text_embed_dim``; None = no text) and ``lowres_cond`` (True for every stage after the first) come from
    the cascade, over a preset's values, unless the ``unet`` entry sets them itself."""
    from imagen_lib.nn import presets
    from imagen_lib.nn.networks import network_from_config

    if isinstance(unet, str):
        unet = {"preset": unet}
    if not isinstance(unet, dict):
        raise ValueError(f"unet: expected a preset name or a mapping, got {unet!r}")
    unet = dict(unet)
    if "preset" in unet:
        name = unet.pop("preset")
        kwargs = presets.config(name)  # raises with the list of names
        kind = presets.PRESETS[name][0].__name__
        if "type" in unet and unet.pop("type") != kind:
            raise ValueError(f"unet: 'type' differs from the preset's network type {kind!r}")
    else:
        kind, kwargs = unet.pop("type", "Unet"), {}
    kwargs.update({"text_embed_dim": text_embed_dim, "lowres_cond": lowres_cond})
    kwargs.update(unet)
    return network_from_config(kind, kwargs)


def build_diffusion(kind: str, block: Optional[dict]):
    """``preconditioning_type`` EDM -> ElucidatedDiffusion, DDPM -> GaussianDiffusionContinuous."""
    from imagen_lib.diffusion import ElucidatedDiffusion, GaussianDiffusionContinuous

    table = {"EDM": (ElucidatedDiffusion, EDM_KEYS), "DDPM": (GaussianDiffusionContinuous, DDPM_KEYS)}
    if str(kind).upper() not in table:
        raise ValueError(f"preconditioning_type: expected 'EDM' or 'DDPM', got {kind!r}")
    cls, names = table[str(kind).upper()]
    block = _check_keys(block, set(names), f"preconditioning ({kind})")
    return cls(**{names[k]: v for k, v in block.items()})


def build_sampler_settings(block: Optional[dict]):
    from imagen_lib.cascade import SamplerSettings

    block = {SAMPLER_ALIASES.get(k, k): v for k, v in (block or {}).items()}
    return SamplerSettings().replace(**block)


def build_cascade(config: dict):
    """The :class:`~imagen_lib.cascade.Cascade` a configuration describes (weights drawn under ``seed``)."""
    import torch

    from imagen_lib.cascade import Cascade, Stage
    from imagen_lib.diffusion.noise_augment import NoiseAugmentation

    _check_keys(config, TOP_KEYS, "config")
    stages_cfg = config.get("stages")
    if not isinstance(stages_cfg, list) or not stages_cfg:
        raise ValueError("stages: expected a non-empty list of stage blocks")
    if config.get("seed") is not None:
        torch.manual_seed(int(config["seed"]))
    encoder = build_text_encoder(config.get("text_encoder"))
    dim = _text_embed_dim(config, encoder)
    stages = []
    for k, sc in enumerate(stages_cfg):
        sc = _check_keys(sc, STAGE_KEYS, f"stages.{k}")
        for key in ("image_size", "unet"):
            if key not in sc:
                raise ValueError(f"stages.{k}.{key}: missing")
        net = build_network(sc["unet"], text_embed_dim=dim, lowres_cond=k > 0)
        aug = sc.get("noise_aug")
        stages.append(Stage(
            net=net, diffusion=build_diffusion(sc.get("preconditioning_type", "EDM"), sc.get("preconditioning")),
            image_size=int(sc["image_size"]), sampler=build_sampler_settings(sc.get("sampler")),
            lowres_aug=NoiseAugmentation(**aug) if aug else None, random_crop_size=sc.get("random_crop_size"),
        ))
    return Cascade(stages, text_encoder=encoder, cond_drop_prob=float(config.get("cond_drop_prob", 0.1)))


def trainer_settings(config: dict):
    """The :class:`~imagen_lib.training.trainer.TrainerSettings` of the ``trainer`` block."""
    import dataclasses

    from imagen_lib.training.trainer import TrainerSettings

    names = {f.name for f in dataclasses.fields(TrainerSettings)}
    block = _check_keys(config.get("trainer"), names, "trainer")
    return TrainerSettings(**block)


def stage_training(config: dict, k: int) -> dict:
    """``{"steps", "batch_size"}`` of stage ``k`` (defaults 1000 and 16)."""
    block = _check_keys(config["stages"][k].get("train"), TRAIN_KEYS, f"stages.{k}.train")
    return {"steps": int(block.get("steps", 1000)), "batch_size": int(block.get("batch_size", 16))}


def parallel_settings(config: dict) -> Optional[dict]:
    """``{"threads_per_stage", "join_at_step"}`` of the ``parallel_stages`` block, or None without one."""
    block = config.get("parallel_stages")
    if block is None or block is False:
        return None
    block = {} if block is True else _check_keys(block, PARALLEL_KEYS, "parallel_stages")
    threads = block.get("threads_per_stage", 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"parallel_stages.threads_per_stage: expected an int >= 1, got {threads!r}")
    join = block.get("join_at_step")
    if join is not None and (not isinstance(join, int) or isinstance(join, bool) or join < 1):
        raise ValueError(f"parallel_stages.join_at_step: expected a step number >= 1 or null, got {join!r}")
    return {"threads_per_stage": threads, "join_at_step": join}


def sample_settings(config: dict) -> dict:
    """``{"prompts", "seed", "num_images_per_prompt"}`` of the ``sample`` block."""
    block = _check_keys(config.get("sample"), SAMPLE_KEYS, "sample")
    return {"prompts": list(block.get("prompts", [])), "seed": int(block.get("seed", 0)),
            "num_images_per_prompt": int(block.get("num_images_per_prompt", 1))}


def data_block(config: dict) -> tuple[str, dict, int]:
    """``(type, options, num_workers)`` of the ``data`` block (default ``{type: shapes}``), checked."""
    block = config.get("data")
    block = {"type": "shapes"} if block is None else block
    if not isinstance(block, dict):
        raise ValueError(f"data: expected a mapping with a 'type', got {type(block).__name__}")
    block = dict(block)
    kind = block.pop("type", "shapes")
    if kind not in DATA_KEYS:
        raise ValueError(f"data.type: expected one of {list(DATA_TYPES)}, got {kind!r}")
    num_workers = block.pop("num_workers", 0)
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise ValueError(f"data.num_workers: expected an int >= 0, got {num_workers!r}")
    _check_keys(block, DATA_KEYS[kind], f"data ({kind})")
    if kind in DATA_REQUIRED:
        key, what = DATA_REQUIRED[kind]
        if not block.get(key):
            raise ValueError(f"data.{key}: missing; expected {what}")
    return kind, block, num_workers


def precomputed_text_dim(config: dict) -> Optional[int]:
    """Width of the precomputed caption embeddings the ``data`` block reads (None when it reads captions):
    the store's for a folder with ``embeddings``, the first sample's ``emb.npy`` for precached shards."""
    kind, block, _ = data_block(config)
    with _data_errors(kind):
        if kind == "folder" and block.get("embeddings") is not None:
            from imagen_lib.data.precache import EmbeddingStore

            return EmbeddingStore(block["embeddings"]).dim
        if kind == "shards" and block.get("text", "auto") != "texts":
            import io

            import numpy as np

            from imagen_lib.data.shards import expand_urls, iter_shard_samples

            with contextlib.closing(iter_shard_samples(expand_urls(block["urls"])[0])) as samples:
                first = next(samples, None)  # closing the generator closes the shard's stream
            if first is not None and "emb.npy" in first:
                return int(np.load(io.BytesIO(first["emb.npy"]), allow_pickle=False).shape[-1])
    return None


def _text_embed_dim(config: dict, encoder) -> Optional[int]:
    """The nets' text width: the encoder's, else ``text_embed_dim``, else the precomputed embeddings'; the
    precomputed embeddings must agree with the first two."""
    given = encoder.embed_dim if encoder is not None else config.get("text_embed_dim")
    if data_block(config)[0] == "shapes":
        return given
    stored = precomputed_text_dim(config)
    if stored is not None and given is not None and stored != given:
        source = "the text_encoder's width" if encoder is not None else "text_embed_dim"
        raise ValueError(f"data: the precomputed embeddings are {stored} wide, but {source} is {given}")
    if stored is None and given is None:
        raise ValueError(
            "text_encoder: captions need a text_encoder block, or precomputed embeddings "
            "(imagen-lib precache, then data.embeddings for a folder or the precached shards' urls)"
        )
    return given if given is not None else stored


def build_dataset(config: dict, image_size: int):
    """The training data set of the ``data`` block at ``image_size``, and its ``num_workers``.

    ``shapes``: :class:`~imagen_lib.data.shapes.ShapesDataset`; ``folder``:
    :class:`~imagen_lib.data.folder.ImageTextFolder`; ``shards``: :class:`~imagen_lib.data.shards.ShardDataset`
    (it splits itself across processes and workers). Without a ``text_encoder`` block the data must carry
    precomputed embeddings, and ``sample.prompts`` must be empty (there is nothing to encode them with).
    """
    kind, block, num_workers = data_block(config)
    if kind == "shapes":
        from imagen_lib.data.shapes import ShapesDataset

        return ShapesDataset(image_size=image_size, **block), num_workers
    has_encoder = bool(config.get("text_encoder"))
    if not has_encoder and sample_settings(config)["prompts"]:
        raise ValueError(
            "sample.prompts: this config has no text_encoder (it trains on precomputed embeddings), so prompts "
            "cannot be encoded; remove them and sample the checkpoint with the encoder afterwards"
        )
    with _data_errors(kind):
        if kind == "folder":
            return _folder(block, image_size, has_encoder), num_workers
        return _shards(block, image_size, has_encoder), num_workers


@contextlib.contextmanager
def _data_errors(kind: str):
    """The data sets' errors name their argument; say that it came from the config's ``data`` block."""
    try:
        yield
    except (TypeError, ValueError, OSError) as error:
        raise ValueError(f"data ({kind}): {error}") from error


def _folder(block: dict, image_size: int, has_encoder: bool):
    from imagen_lib.data.folder import ImageTextFolder

    if not has_encoder and block.get("embeddings") is None:
        raise ValueError("embeddings: missing; without a text_encoder block the captions must be precomputed "
                         "(imagen-lib precache --encoder T5 ROOT STORE, then data.embeddings: STORE)")
    block = dict(block)
    if "extensions" in block:
        block["extensions"] = tuple(block["extensions"])
    return ImageTextFolder(block.pop("root"), image_size, **block)


def _shards(block: dict, image_size: int, has_encoder: bool):
    from imagen_lib.data.shards import ShardDataset

    block = dict(block)
    text = block.pop("text", "auto")
    if not has_encoder:
        if text == "texts":
            raise ValueError("text: 'texts' needs a text_encoder block; use precached shards with text: embeddings")
        text = "embeddings"  # a shard without emb.npy then fails with a message naming precache
    return ShardDataset(block.pop("urls"), image_size, text=text, **block)
