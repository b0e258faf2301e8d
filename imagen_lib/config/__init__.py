"""Training configurations: one YAML or JSON file describes the cascade, the data and the training.

The file is the serialized form of :class:`~imagen_lib.config.schema.RunConfig`, and its stage blocks use the
``{kind, config}`` pairs a checkpoint's ``config.json`` holds (:attr:`imagen_lib.cascade.Cascade.config`)::

    seed: 0                          # weight initialisation and training noise
    cond_drop_prob: 0.1              # text dropout for classifier-free guidance
    text_embed_dim: null             # width of precomputed embeddings when there is no text_encoder
    text_encoder:                    # omit (or null) for precomputed embeddings or an unconditional cascade
      name_or_path: google/t5-v1_1-base    # a hub name or local folder, or instead:
      build_tiny: {d_model: 64}            # a small random T5 built locally (T5Config fields) ...
      seed: 0                              # ... from this seed
      vocabulary: shapes                   # ... with a word-level tokenizer (shapes' words, or a list; default bytes)
      max_length: 32                       # tokens per caption
      trainable: false                     # train it jointly with the cascade
    stages:                          # lowest resolution first
      - image_size: 32
        network: tiny-32             # a preset name, {preset: NAME, config: {overrides}} or
                                     # {kind: Unet|EfficientUnet, config: {constructor arguments}}
        diffusion:                   # ElucidatedDiffusion (default) or GaussianDiffusionContinuous
          kind: ElucidatedDiffusion
          config: {loss_type: l2, sigma_data: 0.5, P_mean: -1.2, P_std: 1.2}   # the class's arguments
        sampler: {sampler: dpmpp_2m, steps: 25, cond_scale: 3.0, threshold: dynamic}   # SamplerSettings
        lowres_aug: {schedule: cosine, sample_level: 0.2, max_train_level: 1.0}       # NoiseAugmentation (SR stages)
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
    tracking: {log_with: tensorboard, logging_dir: null}   # trackers: tensorboard | wandb | all | none; logs in OUT

``--set key=value`` overrides use dotted keys, list items by index (``stages.1.train.steps=200``); the value
is read as YAML (``1e-4``, ``true``, ``[1, 2]``). A configuration in NeMo's vocabulary (``unet``,
``preconditioning_type``, ``token_length``, ...) converts with :func:`from_nemo`.

Modules: :mod:`.schema` (the dataclasses), :mod:`.convert` (checked dict <-> dataclass conversion),
:mod:`.build` (cascade, data set, settings), :mod:`.files` (reading, ``--set``), :mod:`.nemo` (NeMo's names).
"""

from imagen_lib.config.build import (
    build_cascade,
    build_dataset,
    build_network,
    build_stage,
    build_text_encoder,
    data_block,
    parallel_settings,
    precomputed_text_dim,
    sample_settings,
    stage_training,
    trainer_settings,
)
from imagen_lib.config.convert import ConfigError, from_dict, to_dict
from imagen_lib.config.files import apply_overrides, load_config, parse_yaml
from imagen_lib.config.nemo import from_nemo, stage_from_nemo
from imagen_lib.config.schema import DATA_KEYS, RunConfig, StageConfig, parse_config

__all__ = [
    "DATA_KEYS", "ConfigError", "RunConfig", "StageConfig", "apply_overrides", "build_cascade", "build_dataset",
    "build_network", "build_stage", "build_text_encoder", "data_block", "from_dict", "from_nemo", "load_config",
    "parallel_settings", "parse_config", "parse_yaml", "precomputed_text_dim", "sample_settings",
    "stage_from_nemo", "stage_training", "to_dict", "trainer_settings",
]
