"""The configuration schema (imagen_lib.config): every block round-trips through plain values, errors name the
dotted key with what was expected, NeMo's names are read only through from_nemo, and a built cascade's
Cascade.config holds what the YAML says (a checkpoint's stage is itself a valid stage block)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch
from tiny_cascade import tiny_config

from imagen_lib.config import (
    ConfigError,
    apply_overrides,
    build_cascade,
    build_network,
    data_block,
    from_dict,
    from_nemo,
    load_config,
    parallel_settings,
    parse_config,
    sample_settings,
    stage_from_nemo,
    stage_training,
    to_dict,
    trainer_settings,
)
from imagen_lib.config.schema import (
    DATA_BLOCKS,
    NetworkBlock,
    ParallelConfig,
    RunConfig,
    SampleConfig,
    StageConfig,
    TextEncoderConfig,
    TrainBlock,
)
from imagen_lib.diffusion import diffusion_from_config
from imagen_lib.diffusion.noise_augment import NoiseAugmentation

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
YAMLS = sorted(EXAMPLES.glob("*.yaml"))


# ---------------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_example_round_trips_through_plain_values(path):
    run = parse_config(load_config(path))
    plain = to_dict(run)
    assert json.loads(json.dumps(plain)) == plain  # plain JSON values only
    assert from_dict(RunConfig, plain) == run
    blocks = [run.data, run.trainer, run.sample, *run.stages]
    blocks += [b for s in run.stages for b in (s.network, s.diffusion, s.sampler, s.train)]
    blocks += [b for b in (run.text_encoder, run.parallel_stages) if b is not None]
    for block in blocks:
        assert from_dict(type(block), to_dict(block)) == block, type(block).__name__


def test_small_blocks_round_trip_with_their_defaults():
    for cls, value in [(TextEncoderConfig, {"name_or_path": "t5", "dtype": "bfloat16"}), (TrainBlock, {}),
                       (SampleConfig, {"prompts": ["a"]}), (ParallelConfig, {"join_at_step": 3}),
                       (NetworkBlock, {"preset": "tiny-32", "config": {"embed_dim": 8}})]:
        block = from_dict(cls, value)
        assert from_dict(cls, to_dict(block)) == block and to_dict(block).items() >= value.items()
    for kind, cls in DATA_BLOCKS.items():
        required = {"root": "x"} if kind == "folder" else {"urls": ["a.tar"]} if kind == "shards" else {}
        block = from_dict(cls, {"type": kind, **required})
        assert from_dict(cls, to_dict(block)) == block


@pytest.mark.parametrize("kind", sorted(DATA_BLOCKS))
def test_data_blocks_hold_the_data_sets_own_arguments_and_defaults(kind):
    from imagen_lib.data.folder import ImageTextFolder
    from imagen_lib.data.shapes import ShapesDataset
    from imagen_lib.data.shapes_pairs import ShapePairsDataset
    from imagen_lib.data.shards import ShardDataset

    data_set = {"shapes": ShapesDataset, "shape_pairs": ShapePairsDataset, "folder": ImageTextFolder,
                "shards": ShardDataset}[kind]
    params = inspect.signature(data_set).parameters
    for f in dataclasses.fields(DATA_BLOCKS[kind]):
        if f.name in ("type", "num_workers"):
            continue
        assert f.name in params, f"data ({kind}).{f.name} is no argument of {data_set.__name__}"
        if f.default is not dataclasses.MISSING and f.default is not None:
            assert params[f.name].default == f.default, f"data ({kind}).{f.name}: default differs"


# ---------------------------------------------------------------------------------------------------------
# errors name the key


@pytest.mark.parametrize("where, value, match", [
    (("stages", 1, "sampler", "stepz"), 3, r"^stages\.1\.sampler\.stepz: unknown key; expected one of \[.*'steps'"),
    (("stages", 0, "diffusion", "config", "p_meen"), 0.0,
     r"^stages\.0\.diffusion\.config\.p_meen: unknown key; expected one of \[.*'P_mean'"),
    (("stages", 0, "train", "epochs"), 3, r"^stages\.0\.train\.epochs: unknown key; expected one of \['steps'"),
    (("trainer", "lrr"), 0.1, r"^trainer\.lrr: unknown key; expected one of \['lr'"),
    (("data", "url"), "x.tar", r"^data\.url: unknown key; expected one of \['type', 'length'"),
    (("colour",), "red", r"^colour: unknown key; expected one of \['seed'"),
])
def test_unknown_keys_name_the_dotted_key_and_list_the_allowed_ones(where, value, match):
    config = tiny_config(text=False)
    node = config
    for key in where[:-1]:
        node = node[key] if isinstance(key, int) else node.setdefault(key, {})
    node[where[-1]] = value
    with pytest.raises(ConfigError, match=match):
        parse_config(config)


@pytest.mark.parametrize("override, match", [
    ("stages.0.image_size=big", r"^stages\.0\.image_size: expected an int, got 'big'"),
    ("stages.0.image_size=0", r"^stages\.0\.image_size: expected an int >= 1, got 0"),
    ("stages.1.sampler.threshold=soft",
     r"^stages\.1\.sampler\.threshold: expected one of \['dynamic', 'static', 'none'\]"),
    ("stages.1.lowres_aug={schedule: cubic}",
     r"^stages\.1\.lowres_aug\.schedule: expected one of \['cosine', 'linear'\]"),
    ("stages.0.diffusion.config.P_mean=low", r"^stages\.0\.diffusion\.config\.P_mean: expected a number, got 'low'"),
    ("stages.0.diffusion.kind=VE", r"^stages\.0\.diffusion\.kind: expected one of \["),
    ("stages.0.network=tiny-99", r"^stages\.0\.network: preset: expected one of \[.*'tiny-32'"),
    ("stages.0.network.kind=null", r"^stages\.0\.network\.preset: expected exactly one of preset"),
    ("stages.0.train.batch_size=2.5", r"^stages\.0\.train\.batch_size: expected an int, got 2\.5"),
    ("trainer.lr=fast", r"^trainer\.lr: expected a number or a list of numbers, got 'fast'"),
    ("cond_drop_prob=[0.1]", r"^cond_drop_prob: expected a number, got \[0\.1\]"),
    ("data.flip=maybe", r"^data\.flip: expected true or false, got 'maybe'"),
    ("parallel_stages.threads_per_stage=0", r"^parallel_stages\.threads_per_stage: expected an int >= 1, got 0"),
    ("sample.prompts=a red circle", r"^sample\.prompts: expected a list of strings, got 'a red circle'"),
    ("stages=[]", r"^stages: expected a non-empty list"),
    ("text_encoder.vocabulary=birds", r"^text_encoder\.vocabulary: expected 'shapes' or a list of words"),
])
def test_wrong_values_name_the_key_and_what_was_expected(override, match):
    config = {**tiny_config(text=True), "data": {"type": "folder", "root": "x"}, "parallel_stages": {}}
    with pytest.raises(ConfigError, match=match):
        parse_config(apply_overrides(config, [override]))


def test_missing_keys_and_network_arguments_name_the_key():
    config = tiny_config(text=False)
    del config["stages"][1]["network"]
    with pytest.raises(ConfigError, match=r"^stages\.1\.network: missing"):
        parse_config(config)
    with pytest.raises(ConfigError, match=r"^data\.urls: missing"):
        parse_config({**tiny_config(text=False), "data": {"type": "shards"}})
    with torch.device("meta"):  # a raw block builds as its parsed form does
        by_name = build_network("tiny-e16", text_embed_dim=None, lowres_cond=False)
        parsed = build_network(from_dict(NetworkBlock, {"preset": "tiny-e16"}), text_embed_dim=None, lowres_cond=False)
    assert by_name.config == parsed.config and by_name.text_embed_dim is None
    config = tiny_config(text=False)
    config["stages"][0]["network"]["kind"] = "Resnet"
    with pytest.raises(ConfigError, match=r"^stages\.0\.network\.kind: kind: expected one of"):
        build_cascade(config)
    config = tiny_config(text=False)
    config["stages"][0]["network"]["config"]["depth"] = 3
    with pytest.raises(ConfigError, match=r"^stages\.0\.network\.config: .*depth"):
        build_cascade(config)


@pytest.mark.parametrize("where, old, new", [
    ((), "unet", "network"),
    ((), "preconditioning_type", "diffusion"),
    ((), "preconditioning", "diffusion"),
    ((), "noise_aug", "lowres_aug"),
    (("sampler",), "cfg", "cond_scale"),
    (("diffusion", "config"), "p_mean", "P_mean"),
    (("network",), "type", "kind"),
])
def test_old_vocabulary_says_what_to_write_instead(where, old, new):
    config = tiny_config(text=False)
    node = config["stages"][0]
    for key in where:
        node = node.setdefault(key, {})
    node[old] = "x"
    with pytest.raises(ConfigError, match=rf"{old}: unknown key \(NeMo's or the old name: write '{new}' instead, "
                                          r"or convert the config with imagen_lib\.config\.from_nemo\)"):
        parse_config(config)
    text = {**tiny_config(text=True)}
    text["text_encoder"]["token_length"] = 16
    with pytest.raises(ConfigError, match=r"^text_encoder\.token_length: .*write 'max_length'"):
        parse_config(text)
    config = tiny_config(text=False)
    config["stages"][0]["network"]["embed_dim"] = 8
    with pytest.raises(ConfigError, match=r"network\.embed_dim: unknown key \(a network's own arguments go inside"):
        parse_config(config)


# ---------------------------------------------------------------------------------------------------------
# NeMo's names


def test_from_nemo_maps_nemo_names_to_ours():
    nemo = {
        "seed": 1, "drop_rate": 0.2,
        "text_encoder": {"encoder_path": "google/t5-v1_1-base", "token_length": 64},
        "stages": [
            {"image_size": 32, "unet": "tiny-32", "preconditioning_type": "edm",
             "preconditioning": {"loss_type": "l1", "sigma_data": 0.5, "p_mean": -1.0, "p_std": 1.4},
             "sampler": {"name": "heun", "step": 7, "cfg": 4.5}, "train": {"steps": 3}},
            {"image_size": 64, "unet": {"preset": "tiny-sr64", "embed_dim": 16}, "preconditioning_type": "DDPM",
             "preconditioning": {"pred_objective": "v", "noise_schedule": "linear"},
             "noise_aug": {"sample_level": 0.1}},
            {"image_size": 128, "unet": {"type": "EfficientUnet", "embed_dim": 8}},
            {"image_size": 256, "unet": {"embed_dim": 8}},
        ],
    }
    kept = copy.deepcopy(nemo)
    ours = from_nemo(nemo)
    assert nemo == kept  # the input is not modified
    assert ours == {
        "seed": 1, "cond_drop_prob": 0.2,
        "text_encoder": {"name_or_path": "google/t5-v1_1-base", "max_length": 64},
        "stages": [
            {"image_size": 32, "network": "tiny-32",
             "diffusion": {"kind": "ElucidatedDiffusion",
                           "config": {"loss_type": "l1", "sigma_data": 0.5, "P_mean": -1.0, "P_std": 1.4}},
             "sampler": {"sampler": "heun", "steps": 7, "cond_scale": 4.5}, "train": {"steps": 3}},
            {"image_size": 64, "network": {"preset": "tiny-sr64", "config": {"embed_dim": 16}},
             "diffusion": {"kind": "GaussianDiffusionContinuous",
                           "config": {"pred_objective": "v", "noise_schedule": "linear"}},
             "lowres_aug": {"sample_level": 0.1}},
            {"image_size": 128, "network": {"kind": "EfficientUnet", "config": {"embed_dim": 8}}},
            {"image_size": 256, "network": {"kind": "Unet", "config": {"embed_dim": 8}}},
        ],
    }
    parse_config(ours)  # valid in our vocabulary
    assert from_nemo(ours) == ours  # our names pass through
    assert stage_from_nemo(nemo["stages"][0]) == ours["stages"][0]


def test_from_nemo_refuses_unknown_types_and_doubled_settings():
    with pytest.raises(ValueError, match=r"stages\.0\.preconditioning_type: expected one of \['EDM', 'DDPM'\]"):
        from_nemo({"stages": [{"image_size": 8, "unet": "tiny-32", "preconditioning_type": "VE"}]})
    with pytest.raises(ValueError, match="both 'step' and 'steps'"):
        stage_from_nemo({"sampler": {"step": 3, "steps": 4}})
    with pytest.raises(ValueError, match="both 'unet'|both 'network'"):
        stage_from_nemo({"unet": "tiny-32", "network": "tiny-32"})


# ---------------------------------------------------------------------------------------------------------
# the YAML and the checkpoint speak one vocabulary


def _normalised(block: dict, k: int, text_embed_dim: int) -> dict:
    """The shared normalisation: a stage block through StageConfig, each part as the config of the object it
    describes (the network's with the cascade's text width and lowres_cond, on the meta device)."""
    stage = from_dict(StageConfig, block, f"stages.{k}")
    with torch.device("meta"):
        net = build_network(stage.network, text_embed_dim=text_embed_dim, lowres_cond=k > 0)
    aug = NoiseAugmentation(**stage.lowres_aug) if stage.lowres_aug is not None else NoiseAugmentation() if k else None
    return {
        "network": {"kind": type(net).__name__, "config": net.config.to_dict()},
        "diffusion": {"kind": stage.diffusion.kind,
                      "config": diffusion_from_config(stage.diffusion.kind, stage.diffusion.config).config},
        "image_size": stage.image_size,
        "sampler": stage.sampler.config,
        "lowres_aug": None if aug is None else aug.config,
        "random_crop_size": stage.random_crop_size,
    }


@pytest.mark.parametrize("name", ["tiny.yaml", "shapes.yaml"])
def test_a_built_cascade_config_holds_what_the_yaml_says(name):
    config = load_config(EXAMPLES / name)
    cascade = build_cascade(config)
    dim = cascade.text_encoder.embed_dim
    for k, (given, built) in enumerate(zip(config["stages"], cascade.config["stages"])):
        assert built == _normalised(given, k, dim)
        assert _normalised(built, k, dim) == built  # a checkpoint's stage is a stage block
        network = built["network"]["config"]
        assert network["text_embed_dim"] == dim and network["lowres_cond"] == (k > 0)  # from the cascade
    # the checkpoint's stage blocks, written back into the YAML, build the same cascade
    rebuilt = build_cascade({**config, "stages": [{**s, "train": g["train"]}
                                                  for s, g in zip(cascade.config["stages"], config["stages"])]})
    assert rebuilt.config == cascade.config
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), cascade.state_dict().values()))


def test_the_main_jobs_overrides_keep_working():
    config = load_config(EXAMPLES / "shapes.yaml")
    par = apply_overrides(config, ["stages.0.train.steps=300", "stages.1.train.steps=120",
                                   "parallel_stages.join_at_step=200"])
    assert stage_training(par, 0) == {"steps": 300, "batch_size": 16} and stage_training(par, 1)["steps"] == 120
    assert parallel_settings(par) == {"threads_per_stage": 1, "join_at_step": 200}
    seq = apply_overrides(config, ["stages.0.train.steps=150", "parallel_stages=null"])
    assert parallel_settings(seq) is None and stage_training(seq, 0)["steps"] == 150
    assert parallel_settings({**config, "parallel_stages": True}) == {"threads_per_stage": 1, "join_at_step": None}


def test_settings_read_only_their_own_block():
    assert sample_settings({}) == {"prompts": [], "seed": 0, "num_images_per_prompt": 1}
    assert trainer_settings({"trainer": {"lr": [1e-3, 2e-3]}}).lr == [1e-3, 2e-3]
    assert data_block({"data": {"length": 8}}) == ("shapes", {"length": 8, "seed": 0, "supersample": 4}, 0)
    with pytest.raises(ConfigError, match=r"^trainer\.lrr: unknown key"):
        trainer_settings({"trainer": {"lrr": 1}})
    with pytest.raises(ConfigError, match=r"^stages: missing"):
        stage_training({}, 0)
