"""The configuration schema: one dataclass per block of a training configuration.

A YAML (or JSON) configuration is the serialized form of :class:`RunConfig`; its stage blocks use the
``{kind, config}`` pairs and the field names that :attr:`Cascade.config <imagen_lib.cascade.Cascade.config>`
writes into a checkpoint, so a checkpoint's stage is a valid stage block. The keys a block may hold are its
dataclass's fields (or, for ``diffusion.config`` and ``lowres_aug``, the arguments of the class they
configure); :func:`~imagen_lib.config.convert.from_dict` checks them. NeMo's names are read only by
:func:`imagen_lib.config.nemo.from_nemo`.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, Optional, Union, get_type_hints

from imagen_lib.cascade import SamplerSettings
from imagen_lib.config.convert import ConfigError, check_arguments, check_value, field_names, from_dict
from imagen_lib.diffusion import DIFFUSIONS
from imagen_lib.diffusion.noise_augment import NoiseAugmentation
from imagen_lib.nn import presets
from imagen_lib.training.settings import TrainerSettings
from imagen_lib.training.tracking import tracker_names
from imagen_lib.validation import check_number, check_seed


def _at_least(name: str, value: Optional[int], low: int, what: str = "an int") -> None:
    if value is not None and value < low:
        raise ValueError(f"{name}: expected {what} >= {low}, got {value!r}")


# ---------------------------------------------------------------------------------------------------------
# text encoder
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TextEncoderConfig:
    """``text_encoder``: a pretrained encoder loaded by name, or a small random one built locally.

    Attributes:
        kind: ``t5`` (default; Imagen) or ``clip`` (Stable Diffusion), a key of
            :data:`imagen_lib.text.TEXT_ENCODERS`.
        name_or_path: a hub name or a local folder (``google/t5-v1_1-base``, ``openai/clip-vit-large-patch14``);
            or instead
        build_tiny: model config fields of a small random encoder built locally (``T5Config``'s ``{d_model: 64}``,
            ``CLIPTextConfig``'s ``{hidden_size: 64}``) ...
        seed: ... from this seed, default 0 ...
        vocabulary: ... with a word-level tokenizer: ``shapes`` (the built-in captions' words), ``shape_pairs``
            (those and the pair captions' words) or a list of words; default None: bytes (ByT5's tokenizer for
            T5, one token per character for CLIP).
        max_length: tokens per caption, default None: the encoder class's default (T5 128, CLIP 77), for a
            ``build_tiny`` encoder too.
        trainable: train it jointly with the cascade, default False.
        dtype: the weights' dtype of a loaded encoder (``bfloat16``), default None (as saved).
        layer: CLIP only: ``penultimate`` (SD 2, seed 003) or ``last`` (SD 1.x), default None: ``penultimate``.
        mask_padding: CLIP only: mask padded tokens out (True) or attend all of them as SD does (False, the
            default when None).
    """

    kind: str = "t5"
    name_or_path: Optional[str] = None
    build_tiny: Optional[dict] = None
    seed: int = 0
    vocabulary: Union[None, str, list[str]] = None
    max_length: Optional[int] = None
    trainable: bool = False
    dtype: Optional[str] = None
    layer: Optional[Literal["last", "penultimate"]] = None
    mask_padding: Optional[bool] = None

    def __post_init__(self):
        from imagen_lib.text import TEXT_ENCODERS

        if self.kind not in TEXT_ENCODERS:
            raise ValueError(f"kind: expected a text encoder kind, one of {sorted(TEXT_ENCODERS)}, got {self.kind!r}")
        if (self.name_or_path is None) == (self.build_tiny is None):
            raise ValueError("name_or_path: expected exactly one of name_or_path and build_tiny")
        named = ("shapes", "shape_pairs")
        if isinstance(self.vocabulary, str) and self.vocabulary not in named or self.vocabulary == []:
            raise ValueError(f"vocabulary: expected 'shapes' or a list of words (or 'shape_pairs'), "
                             f"got {self.vocabulary!r}")
        for name in ("layer", "mask_padding"):
            if getattr(self, name) is not None and self.kind != "clip":
                raise ValueError(f"{name}: a CLIP option (kind: clip); this text_encoder's kind is {self.kind!r}")
        _at_least("max_length", self.max_length, 1)
        check_seed("seed", self.seed)

    def options(self) -> dict:
        """The encoder's keyword arguments this block sets (None values leave the encoder's defaults; a None
        ``max_length`` is the class constructor's default, which ``build_tiny`` then gets too)."""
        import inspect

        from imagen_lib.text import text_encoder_class

        max_length = self.max_length
        if max_length is None:
            parameter = inspect.signature(text_encoder_class(self.kind)).parameters.get("max_length")
            max_length = None if parameter is None or parameter.default is parameter.empty else parameter.default
        options = {"max_length": max_length, "trainable": self.trainable, "layer": self.layer,
                   "mask_padding": self.mask_padding}
        return {name: value for name, value in options.items() if value is not None}


# ---------------------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------------------


@dataclass
class NetworkBlock:
    """``network``: a preset, ``{preset: NAME, config: {overrides}}`` (a plain ``NAME`` is short for
    ``{preset: NAME}``), or a network class and its arguments, ``{kind: Unet | EfficientUnet, config: {...}}``
    (the form checkpoints write). ``text_embed_dim`` and ``lowres_cond`` come from the cascade (the text
    width; True after the first stage) unless ``config`` sets them."""

    preset: Optional[str] = None
    kind: Optional[str] = None
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        if (self.preset is None) == (self.kind is None):
            raise ValueError("preset: expected exactly one of preset (a preset name) and kind (a network class)")
        if self.preset is not None and self.preset not in presets.names():
            raise ValueError(f"preset: expected one of {presets.names()}, got {self.preset!r}")


@dataclass
class DiffusionBlock:
    """``diffusion``: ``{kind: ElucidatedDiffusion | GaussianDiffusionContinuous | DiscreteDiffusion, config:
    {...}}`` with the class's own argument names (``P_mean``, ``P_std``, ``pred_objective``, ``beta_schedule``,
    ``parameterization``, ...); default EDM with the paper's values. ``DiscreteDiffusion`` is Stable Diffusion's
    discrete schedule (``scaled_linear``, 1000 steps, ``eps`` or ``v``)."""

    kind: str = "ElucidatedDiffusion"
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in DIFFUSIONS:
            raise ValueError(f"kind: expected one of {sorted(DIFFUSIONS)}, got {self.kind!r}")
        self.config = check_arguments(DIFFUSIONS[self.kind], self.config, "config")


@dataclass
class TrainBlock:
    """A stage's ``train``: ``steps`` (default 1000) of ``batch_size`` images (default 16)."""

    steps: int = 1000
    batch_size: int = 16

    def __post_init__(self):
        _at_least("steps", self.steps, 0)
        _at_least("batch_size", self.batch_size, 1)


@dataclass
class AutoencoderBlock:
    """A stage's ``autoencoder`` (a latent stage, :class:`~imagen_lib.latent.AutoencoderKL`): a published or saved
    VAE, ``{pretrained: FOLDER_OR_NAME, subfolder: vae}``, or random weights from seed 003's ``ddconfig`` keys,
    ``{config: {ch: 128, ch_mult: [1, 2, 4, 4], ...}, seed: 0}`` (tests; a checkpoint keeps the weights).
    ``posterior``: ``sample`` (default, SD's) or ``mean``; ``lazy``: read the weights on first use (default
    False; True when training on precached latents)."""

    pretrained: Optional[str] = None
    subfolder: Optional[str] = None
    config: Optional[dict] = None
    seed: int = 0
    posterior: Literal["sample", "mean"] = "sample"
    lazy: bool = False

    def __post_init__(self):
        if (self.pretrained is None) == (self.config is None):
            raise ValueError("pretrained: expected exactly one of pretrained (a folder or hub name) and config")
        check_seed("seed", self.seed)


@dataclass
class StageConfig:
    """One entry of ``stages`` (lowest resolution first).

    Attributes:
        image_size: side of the images this stage makes.
        network: a :class:`NetworkBlock` (or a preset name).
        diffusion: a :class:`DiffusionBlock`, default EDM.
        sampler: :class:`~imagen_lib.cascade.SamplerSettings` fields (default: its defaults, without
            thresholding for a latent stage).
        lowres_aug: :class:`~imagen_lib.diffusion.noise_augment.NoiseAugmentation` arguments of a
            super-resolution stage, default None (its defaults).
        random_crop_size: train on random crops of this side (Imagen's SR stages: 64 of 256), default None.
        train: a :class:`TrainBlock`.
        autoencoder: an :class:`AutoencoderBlock` for a latent stage, default None (a pixel stage).
    """

    image_size: int
    network: Union[str, NetworkBlock]
    diffusion: DiffusionBlock = field(default_factory=DiffusionBlock)
    sampler: Optional[SamplerSettings] = None
    lowres_aug: Optional[dict] = None
    random_crop_size: Optional[int] = None
    train: TrainBlock = field(default_factory=TrainBlock)
    autoencoder: Optional[AutoencoderBlock] = None

    def __post_init__(self):
        _at_least("image_size", self.image_size, 1)
        if isinstance(self.network, str):
            try:
                self.network = NetworkBlock(preset=self.network)
            except ValueError as error:
                raise ValueError(f"network: {error}") from error
        if self.lowres_aug is not None:
            self.lowres_aug = check_arguments(NoiseAugmentation, self.lowres_aug, "lowres_aug")


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ShapesData:
    """``data: {type: shapes}``: :class:`~imagen_lib.data.shapes.ShapesDataset` (its defaults), read by
    ``num_workers`` loader processes (default 0)."""

    type: Literal["shapes"] = "shapes"
    length: int = 100_000
    seed: int = 0
    supersample: int = 4
    num_workers: int = 0

    def __post_init__(self):
        _at_least("num_workers", self.num_workers, 0)
        check_seed("seed", self.seed)


@dataclass(kw_only=True)
class ShapePairsData(ShapesData):
    """``data: {type: shape_pairs}``: :class:`~imagen_lib.data.shapes_pairs.ShapePairsDataset`, two shapes and
    their relation: the fields of ``shapes``, ``split`` (``train``: never a held-out colour combination) and
    ``first_slot_first`` (share of the captions naming the left / top object first, default 0.5, or a list of
    shares, one per epoch)."""

    type: Literal["shape_pairs"] = "shape_pairs"
    split: Literal["train", "heldout"] = "train"
    first_slot_first: Union[float, list[float]] = 0.5

    def __post_init__(self):
        super().__post_init__()
        from imagen_lib.data.shapes_pairs import first_slot_first_schedule

        first_slot_first_schedule(self.first_slot_first)


@dataclass(kw_only=True)
class FolderData:
    """``data: {type: folder}``: :class:`~imagen_lib.data.folder.ImageTextFolder`, images with a same-named
    .txt caption beside each (its arguments and defaults; ``extensions`` None: its default list); ``latents``:
    a latent store of its images (``imagen-lib precache --autoencoder``), default None."""

    type: Literal["folder"] = "folder"
    root: str
    embeddings: Optional[str] = None
    latents: Optional[str] = None
    token_length: Optional[int] = None
    crop: Literal["center", "random"] = "center"
    flip: bool = False
    min_size: Optional[int] = None
    extensions: Optional[list[str]] = None
    seed: int = 0
    max_bad_share: float = 0.01
    num_workers: int = 0

    def __post_init__(self):
        _at_least("num_workers", self.num_workers, 0)
        check_number("max_bad_share", self.max_bad_share, low=0.0, high=1.0)
        check_seed("seed", self.seed)


@dataclass(kw_only=True)
class ShardsData:
    """``data: {type: shards}``: :class:`~imagen_lib.data.shards.ShardDataset`, WebDataset shards (local
    paths or any fsspec URL: a list, a brace pattern or a glob; its arguments and defaults)."""

    type: Literal["shards"] = "shards"
    urls: Union[str, list[str]]
    text: Literal["auto", "texts", "embeddings"] = "auto"
    token_length: Optional[int] = None
    crop: Literal["center", "random"] = "center"
    flip: bool = False
    shuffle_buffer: int = 1000
    shuffle_shards: bool = True
    seed: int = 0
    max_bad_share: float = 0.01
    num_workers: int = 0

    def __post_init__(self):
        _at_least("num_workers", self.num_workers, 0)
        check_number("max_bad_share", self.max_bad_share, low=0.0, high=1.0)
        check_seed("seed", self.seed)


DataConfig = Union[ShapesData, ShapePairsData, FolderData, ShardsData]
DATA_BLOCKS: dict[str, type] = {"shapes": ShapesData, "shape_pairs": ShapePairsData, "folder": FolderData,
                                "shards": ShardsData}
# data.type -> the keys its block may hold besides ``type`` and ``num_workers`` (read off the dataclasses)
DATA_KEYS: dict[str, set[str]] = {kind: set(field_names(cls)) - {"type", "num_workers"}
                                  for kind, cls in DATA_BLOCKS.items()}


# ---------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SampleConfig:
    """``sample``: the grid written after training: ``prompts`` (default none), ``seed`` (0),
    ``num_images_per_prompt`` (1)."""

    prompts: list[str] = field(default_factory=list)
    seed: int = 0
    num_images_per_prompt: int = 1

    def __post_init__(self):
        _at_least("num_images_per_prompt", self.num_images_per_prompt, 1)
        check_seed("seed", self.seed)


@dataclass
class ParallelConfig:
    """``parallel_stages`` (single-process CPU runs): stages 1.. train in their own processes with
    ``threads_per_stage`` torch threads each (default 1) while stage 0 trains on the rest; stage 0 waits for
    them at step ``join_at_step`` (default None: at its end), then takes every thread."""

    threads_per_stage: int = 1
    join_at_step: Optional[int] = None

    def __post_init__(self):
        _at_least("threads_per_stage", self.threads_per_stage, 1)
        _at_least("join_at_step", self.join_at_step, 1, "a step number")


@dataclass
class TrackingConfig:
    """``tracking``: the experiment trackers of ``imagen-lib train`` and ``examples/train.py``: ``log_with``
    (``tensorboard``, ``wandb``, ``all``, ``none`` or a list; default None: the front end's default, which its
    ``--log-with`` overrides) and ``logging_dir`` (default None: the run's output folder; TensorBoard writes
    to ``logging_dir/imagen_lib/``). What is logged: :mod:`imagen_lib.training.tracking`."""

    log_with: Union[None, str, list[str]] = None
    logging_dir: Optional[str] = None

    def __post_init__(self):
        tracker_names(self.log_with)  # installed or not is checked when a run starts


@dataclass(kw_only=True)
class RunConfig:
    """A whole training configuration.

    Attributes:
        seed: weight initialisation and training noise, default None (torch's current state).
        cond_drop_prob: text dropout for classifier-free guidance, default 0.1.
        text_embed_dim: width of precomputed embeddings when there is no text encoder, default None (read
            from the data's embeddings).
        text_encoder: a :class:`TextEncoderConfig`, default None (precomputed embeddings or no text).
        stages: the :class:`StageConfig` blocks, lowest resolution first.
        data: :class:`ShapesData` (default), :class:`ShapePairsData`, :class:`FolderData` or :class:`ShardsData`,
            by ``type``.
        trainer: :class:`~imagen_lib.training.settings.TrainerSettings` fields (checked by name).
        sample: a :class:`SampleConfig`.
        parallel_stages: a :class:`ParallelConfig` (``true``: its defaults), default None (stages in turn).
        tracking: a :class:`TrackingConfig`.
    """

    seed: Optional[int] = None
    cond_drop_prob: float = 0.1
    text_embed_dim: Optional[int] = None
    text_encoder: Optional[TextEncoderConfig] = None
    stages: list[StageConfig]
    data: DataConfig = field(default_factory=ShapesData)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    sample: SampleConfig = field(default_factory=SampleConfig)
    parallel_stages: Union[None, bool, ParallelConfig] = None
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        if not self.stages:
            raise ValueError("stages: expected a non-empty list of stage blocks")
        check_seed("seed", self.seed, optional=True)
        self.parallel_stages = _parallel(self.parallel_stages)


def _parallel(value: Union[None, bool, ParallelConfig]) -> Optional[ParallelConfig]:
    """``parallel_stages: true`` is short for its defaults, ``false`` for none."""
    return (ParallelConfig() if value else None) if isinstance(value, bool) else value


def parse_config(config: Union[dict, RunConfig]) -> RunConfig:
    """A configuration dict checked and converted to :class:`RunConfig` (a RunConfig passes through)."""
    return config if isinstance(config, RunConfig) else from_dict(RunConfig, config)


def parse_block(config: Union[dict, RunConfig], name: str) -> Any:
    """One top-level block of a configuration, checked as :func:`parse_config` checks it (its default when
    the configuration has none); the rest of the configuration is not read."""
    if isinstance(config, RunConfig):
        return getattr(config, name)
    if not isinstance(config, dict):
        raise ConfigError(f"config: expected a mapping, got {config!r}")
    spec = RunConfig.__dataclass_fields__[name]
    if name not in config:
        if spec.default is not MISSING:
            return spec.default
        if spec.default_factory is not MISSING:
            return spec.default_factory()
        raise ConfigError(f"{name}: missing")
    value = check_value(config[name], get_type_hints(RunConfig)[name], name)
    return _parallel(value) if name == "parallel_stages" else value
