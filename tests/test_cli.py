"""The imagen-lib command line and the configuration format: help offline, train then sample from a tiny
config, the sample command's file layout, --set overrides and config errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_cascade import tiny_config

from imagen_lib.checkpoint import resolve
from imagen_lib.cli import COMMANDS, main
from imagen_lib.config import apply_overrides, build_cascade, from_nemo, load_config


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["sample", "--help"]])
def test_help_works_offline(args):
    out = subprocess.run([sys.executable, "-m", "imagen_lib.cli", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: imagen-lib" in out.stdout
    if args == ["--help"]:
        assert all(name in out.stdout for name in COMMANDS)


def test_unknown_command_fails_with_the_choices(capsys):
    assert main(["paint"]) == 2
    assert "train" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = root / "tiny.json"
    config.write_text(json.dumps(tiny_config(steps=2)))
    out = root / "run"
    assert main(["train", str(config), "--out", str(out), "--set", "stages.1.train.steps=1", "--no-progress",
                 "--cpu", "--sample-every", "2", "--save-every", "1"]) == 0
    return config, out


def test_train_writes_grids_every_sample_every_steps(trained):
    _, out = trained
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["stage0-000002.png"]


def test_train_writes_a_checkpoint_and_a_sample_grid(trained, capsys):
    config, out = trained
    committed = Path(resolve(out / "checkpoint"))  # the version the checkpoint's pointer names
    assert (committed / "config.json").exists()
    assert (committed / "stage1.ema.safetensors").exists()
    assert Image.open(out / "samples.png").size[0] > 16
    assert load_config(out / "config.yaml")["stages"][1]["train"]["steps"] == 1  # the override is recorded
    trainer_state = json.loads((committed / "trainer.json").read_text())
    assert trainer_state["steps"] == [2, 1]
    with pytest.raises(FileExistsError, match="--resume"):
        main(["train", str(config), "--out", str(out), "--no-progress"])


def test_train_resume_without_a_checkpoint_is_an_error(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config(steps=1)))
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*to continue from"):
        main(["train", str(config), "--out", str(tmp_path / "run"), "--resume", "--no-progress", "--cpu"])
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_sample_writes_numbered_images_in_prompt_order_and_a_grid(trained, tmp_path):
    _, out = trained
    prompts = ["a red circle", "a blue square"]
    dest = tmp_path / "s"
    assert main(["sample", str(out / "checkpoint"), "--prompt", *prompts, "--out", str(dest), "--seed", "5",
                 "--num-images-per-prompt", "2", "--steps", "2"]) == 0
    names = sorted(p.name for p in dest.iterdir())
    assert names == ["0000.png", "0001.png", "0002.png", "0003.png", "grid.png"]
    assert Image.open(dest / "0003.png").size == (16, 16)  # the last stage's resolution

    from imagen_lib.cascade import Cascade

    cascade = Cascade.from_checkpoint(out / "checkpoint")
    expected = cascade.sample(prompts, num_images_per_prompt=2, seed=5, steps=2, disable_progress=True)
    got = torch.from_numpy(np.asarray(Image.open(dest / "0002.png"), dtype=np.float32)).permute(2, 0, 1) / 255
    torch.testing.assert_close(got, expected[2], atol=1 / 255 + 1e-6, rtol=0)

    # a prompts file and one image per call give the same files: seeds follow the image index
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n")
    dest2 = tmp_path / "s2"
    assert main(["sample", str(out / "checkpoint"), "--prompts-file", str(tmp_path / "prompts.txt"), "--out",
                 str(dest2), "--seed", "5", "--num-images-per-prompt", "2", "--steps", "2", "--batch-size", "1"]) == 0
    for name in names[:-1]:
        a, b = (np.asarray(Image.open(d / name), dtype=np.int16) for d in (dest, dest2))
        assert np.abs(a - b).max() <= 1


def test_overrides_use_dotted_keys_and_yaml_values():
    config = {"stages": [{"train": {"steps": 5}}], "trainer": {"lr": 0.1}}
    out = apply_overrides(config, ["stages.0.train.steps=7", "trainer.lr=1e-4", "trainer.betas=[0.9, 0.95]",
                                   "sample.prompts=[a, b]"])
    assert out["stages"][0]["train"]["steps"] == 7 and out["trainer"]["lr"] == 1e-4
    assert out["trainer"]["betas"] == [0.9, 0.95] and out["sample"]["prompts"] == ["a", "b"]
    assert config["stages"][0]["train"]["steps"] == 5  # the input is not modified
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(config, ["trainer.lr"])
    with pytest.raises(ValueError, match="index"):
        apply_overrides(config, ["stages.3.train.steps=1"])


def test_config_errors_name_the_key():
    config = tiny_config(text=False)
    config["stages"][0]["networkk"] = "tiny-32"
    with pytest.raises(ValueError, match=r"stages\.0.*networkk"):
        build_cascade(config)
    config = tiny_config(text=False)
    config["stages"][0]["diffusion"]["kind"] = "VE"
    with pytest.raises(ValueError, match=r"stages\.0\.diffusion\.kind"):
        build_cascade(config)
    config = tiny_config(text=False)
    config["stages"][0]["diffusion"]["config"] = {"P_mean": -1.0, "pred_objective": "v"}
    with pytest.raises(ValueError, match="pred_objective"):
        build_cascade(config)


def test_nemo_vocabulary_and_presets_build_the_intended_cascade():
    config = tiny_config(text=True)
    for stage in config["stages"]:
        del stage["network"], stage["diffusion"]
    config["stages"][0].update(image_size=32, unet="tiny-32", preconditioning_type="EDM",
                               preconditioning={"loss_type": "l1", "p_mean": -1.0, "p_std": 1.4},
                               sampler={"step": 7, "cfg": 4.5})
    config["stages"][1].update(image_size=64, unet={"preset": "tiny-sr64", "embed_dim": 16},
                               preconditioning_type="DDPM", preconditioning={"pred_objective": "v"})
    cascade = build_cascade(from_nemo(config))
    base, sr = cascade.stages
    assert base.net.text_embed_dim == cascade.text_encoder.embed_dim == 32  # the encoder's width, over the preset's
    assert base.diffusion.P_mean == -1.0 and base.diffusion.loss_type == "l1"
    assert base.sampler.steps == 7 and base.sampler.cond_scale == 4.5
    assert type(sr.net).__name__ == "EfficientUnet" and sr.net.config.embed_dim == 16 and sr.net.lowres_cond
    assert sr.diffusion.pred_objective == "v"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "imagen_lib.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_a_user_error_is_one_line_and_exit_status_2_and_debug_shows_the_traceback(tmp_path):
    import os

    config = tiny_config()
    config["stages"][0]["unet"] = config["stages"][0].pop("network")  # the old vocabulary
    path = tmp_path / "old.json"
    path.write_text(json.dumps(config))
    out = _cli("train", path, "--out", tmp_path / "run", "--no-progress", "--cpu")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "imagen-lib train: error: stages.0.unet: unknown key" in out.stderr and "--debug" in out.stderr
    missing = _cli("train", tmp_path / "nowhere.yaml")
    assert missing.returncode == 2 and "nowhere.yaml" in missing.stderr and "Traceback" not in missing.stderr
    debug = _cli("train", path, "--out", tmp_path / "run", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "stages.0.unet" in debug.stderr
    by_env = _cli("train", path, "--out", tmp_path / "run", env={**os.environ, "IMAGEN_LIB_DEBUG": "1"})
    assert by_env.returncode == 1 and "Traceback" in by_env.stderr


def test_train_stages_out_of_range_is_a_one_line_error_naming_the_flag(tmp_path, capsys):
    from imagen_lib.cli import entry_point

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config(steps=1)))
    out = tmp_path / "run"
    assert entry_point(["train", str(config), "--out", str(out), "--stages", "0", "5", "--cpu", "--no-progress"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "imagen-lib train: error: --stages: expected stage indices in [0, 1] (the config has 2 stages), got 5")
    assert not out.exists()  # refused before anything was built


def test_the_closing_hint_of_a_run_on_precomputed_embeddings_names_its_encoder(tmp_path):
    import shlex

    from tiny_cascade import tiny_cascade, tiny_encoder_folder

    from imagen_lib.commands.train import sample_command
    from imagen_lib.data.precache import precache_captions
    from imagen_lib.text import T5TextEncoder

    encoder_dir = tiny_encoder_folder(tmp_path / "t5")
    store = tmp_path / "store"
    precache_captions(T5TextEncoder(encoder_dir, max_length=16), [("a.png", "a red circle")], store, progress=False)
    config = tiny_config(text=False)
    config["data"] = {"type": "folder", "root": str(tmp_path / "images"), "embeddings": str(store)}
    cascade = tiny_cascade(text_embed_dim=32)  # no text encoder, as a run on precomputed embeddings saves it
    checkpoint = cascade.save(tmp_path / "checkpoint")
    hint = sample_command(cascade, config, checkpoint, [], tmp_path / "samples")
    assert hint.endswith(f"--encoder {encoder_dir} --max-length 16")
    assert main(shlex.split(hint)[1:]) == 0  # the printed command runs as printed
    assert (tmp_path / "samples" / "grid.png").exists()
    # data that does not record its encoder (shards): a placeholder to fill in
    config["data"] = {"type": "shards", "urls": str(tmp_path / "shard-{0..1}.tar")}
    assert "--encoder T5_NAME_OR_FOLDER" in sample_command(cascade, config, checkpoint, [], tmp_path / "samples")
    # a checkpoint with its encoder needs none
    with_encoder = build_cascade(tiny_config())
    assert "--encoder" not in sample_command(with_encoder, tiny_config(), checkpoint, ["a red circle"], tmp_path)
