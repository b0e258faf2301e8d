"""The examples under examples/ run as they stand, at tiny settings.

- the notebook: tests/test_notebook.py;
- examples/train.py trains in two processes started by `accelerate launch`, writes one checkpoint that
  `imagen-lib sample` reads, and resumes from it by itself;
- examples/finetune.py changes only the chosen stage and never touches the original checkpoint;
- both scripts answer --help offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imagen_lib.checkpoint import resolve

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TINY = EXAMPLES / "tiny.yaml"
FAST = ["--set", "stages.0.train.steps=2", "--set", "stages.1.train.steps=2", "--no-progress"]


def run(cmd: list, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run a command offline, one thread per process (the CI machine has two cores); fail with its output."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Two processes on the CPU. `accelerate launch --cpu` starts a single process unless MPI is set up, so
    the processes are started by the launcher's torchrun path, and ACCELERATE_USE_CPU puts them on gloo."""
    out = tmp_path_factory.mktemp("train") / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", free_port(), "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    done = run([*launch, EXAMPLES / "train.py", "--config", TINY, "--out", out, "--sample-every", "2", *FAST],
               cwd=out.parent, ACCELERATE_USE_CPU="1")
    out.joinpath("log.txt").write_text(done.stdout + done.stderr)
    return out


def test_train_with_two_processes_writes_one_checkpoint(trained):
    log = trained.joinpath("log.txt").read_text()
    assert "process 1/2: done" in log and "process 2/2: done" in log  # both ranks ran, as a pair, and finished
    assert sorted(p.name for p in trained.iterdir()) == [  # no stray tmp folders
        "checkpoint", "config.yaml", "log.txt", "samples", "samples.png"]
    checkpoint = Path(resolve(trained / "checkpoint"))  # the committed version
    assert sorted(p.name for p in checkpoint.iterdir() if p.is_file()) == [
        "config.json", "stage0.ema.safetensors", "stage0.safetensors", "stage1.ema.safetensors", "stage1.safetensors",
        "trainer.json", "trainer.safetensors"]
    assert json.loads((checkpoint / "trainer.json").read_text())["steps"] == [2, 2]
    assert sorted(p.name for p in (trained / "samples").iterdir()) == ["stage0-000002.png", "stage1-000002.png"]


def test_sample_command_reads_the_checkpoint(trained, tmp_path):
    run([sys.executable, "-m", "imagen_lib.cli", "sample", trained / "checkpoint", "--prompt", "a red circle",
         "a small blue square", "--out", tmp_path / "s", "--steps", "2"], cwd=tmp_path)
    from PIL import Image

    assert [Image.open(tmp_path / "s" / f"000{i}.png").size for i in range(2)] == [(32, 32), (32, 32)]


def test_train_resumes_from_its_checkpoint(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained / "checkpoint", out / "checkpoint")
    done = run([sys.executable, EXAMPLES / "train.py", "--config", TINY, "--out", out, "--stage", "0",
                "--sample-every", "0", *FAST, "--set", "stages.0.train.steps=3", "--extend"], cwd=tmp_path)
    assert "resumed from" in done.stdout and "at steps [2, 2]" in done.stdout
    assert "stage 0: 1 steps" in done.stdout  # only the missing step is trained
    assert json.loads((Path(resolve(out / "checkpoint")) / "trainer.json").read_text())["steps"] == [3, 2]


def test_finetune_changes_only_its_stage_and_never_the_original(trained, tmp_path):
    from imagen_lib import Cascade

    original = trained / "checkpoint"
    before = file_hashes(original)
    out = tmp_path / "pink"
    run([sys.executable, EXAMPLES / "finetune.py", "--checkpoint", original, "--stage", "0", "--out", out,
         "--steps", "2", "--batch-size", "4", "--new-color-share", "1", "--no-progress"], cwd=tmp_path)
    assert file_hashes(original) == before  # not a byte of the original changed
    after, committed = file_hashes(Path(resolve(out))), file_hashes(Path(resolve(original)))
    for name in ("stage1.safetensors", "stage1.ema.safetensors", "config.json", "text_encoder/model.safetensors"):
        assert after[name] == committed[name], name
    for use_ema in (True, False):
        old = Cascade.from_checkpoint(original, use_ema=use_ema)
        new = Cascade.from_checkpoint(out, use_ema=use_ema)
        old_sr, new_sr = old.stages[1].net.state_dict(), new.stages[1].net.state_dict()
        assert all(torch.equal(old_sr[key], new_sr[key]) for key in old_sr)  # bit-identical
        old_base, new_base = old.stages[0].net.state_dict(), new.stages[0].net.state_dict()
        assert any(not torch.equal(old_base[key], new_base[key]) for key in old_base)  # stage 0 did train
    images = new.sample(["a pink circle"], seed=0, steps=2, disable_progress=True)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_finetune_refuses_to_write_into_the_original(tmp_path):
    finetune = load_example("finetune")
    with pytest.raises(SystemExit, match="overlaps the original"):
        finetune.check_out(str(tmp_path / "ckpt"), str(tmp_path / "ckpt"), overwrite=True)
    with pytest.raises(SystemExit, match="overlaps the original"):
        finetune.check_out(str(tmp_path / "ckpt"), str(tmp_path / "ckpt" / "inner"), overwrite=True)


@pytest.fixture(scope="module")
def word_level(tmp_path_factory) -> Path:
    """A tiny two-stage checkpoint whose frozen text encoder reads the shapes' words (it knows no 'pink'), its
    weights made non-zero everywhere."""
    from tiny_cascade import tiny_config

    from imagen_lib.config import build_cascade

    config = tiny_config()
    config["text_encoder"]["vocabulary"] = "shapes"
    path = tmp_path_factory.mktemp("words") / "checkpoint"
    cascade, generator = build_cascade(config), torch.Generator().manual_seed(1)
    with torch.no_grad():  # as if trained: no zero-initialised output layer hides what the adapters do
        for p in cascade.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    cascade.save(path)
    return path


def test_finetune_with_lora_teaches_the_new_colour_as_a_word_of_its_own(word_level, tmp_path):
    from imagen_lib import Cascade
    from imagen_lib.training.lora import load_lora

    before = file_hashes(word_level)
    out = tmp_path / "pink"
    finetune = load_example("finetune")
    finetune.main(["--checkpoint", str(word_level), "--stage", "0", "--out", str(out), "--steps", "2",
                   "--batch-size", "4", "--new-color-share", "1", "--lr", "1e-2", "--lora", "--no-progress", "--cpu"])
    assert file_hashes(word_level) == before
    old, new = Cascade.from_checkpoint(word_level), Cascade.from_checkpoint(out)
    assert old.text_encoder.unknown_words(["a pink circle"]) == ["pink"]
    assert new.text_encoder.unknown_words(["a pink circle"]) == []  # no longer <unk>
    pink = new.text_encoder.word_vocabulary["pink"]
    assert pink not in old.text_encoder.word_vocabulary.values()  # a new id of its own
    known = ["a red circle on the left", "a blue square"]
    assert torch.equal(old.text_encoder.encode(known)[0], new.text_encoder.encode(known)[0])
    old_sr, new_sr = old.stages[1].net.state_dict(), new.stages[1].net.state_dict()
    assert all(torch.equal(old_sr[key], new_sr[key]) for key in old_sr)
    # the adapters (and the word) load onto the original and sample as the merged checkpoint does
    adapted = load_lora(Cascade.from_checkpoint(word_level), out / "lora")
    assert adapted.text_encoder.word_vocabulary["pink"] == pink
    torch.testing.assert_close(adapted.text_encoder.encode(["a pink circle"])[0],
                               new.text_encoder.encode(["a pink circle"])[0])
    prompts = ["a pink circle", "a red square"]
    ours = adapted.sample(prompts, seed=0, disable_progress=True)
    torch.testing.assert_close(ours, new.sample(prompts, seed=0, disable_progress=True), atol=1e-4, rtol=1e-4)
    with pytest.warns(UserWarning, match=r"does not know \['pink'\]"):  # the original reads it as <unk>
        before_tuning = old.sample(prompts, seed=0, disable_progress=True)
    assert not torch.allclose(ours, before_tuning, atol=1e-3)


def test_finetune_lora_options_are_checked(word_level, tmp_path):
    finetune = load_example("finetune")
    common = ["--checkpoint", str(word_level), "--stage", "0", "--out", str(tmp_path / "o"), "--lora", "--cpu"]
    for extra, match in ((["--lora-rank", "0"], "--lora-rank: rank"),
                         (["--lora-target", "to_nothing"], "--lora-target: target_modules: 'to_nothing'"),
                         (["--freeze", "down"], "--freeze: LoRA")):
        with pytest.raises(SystemExit, match=match):
            finetune.main(common + extra)


def test_finetune_data_repaints_shapes_in_the_new_colour():
    finetune = load_example("finetune")
    from imagen_lib import ShapesDataset
    from imagen_lib.data import shapes

    base = ShapesDataset(image_size=32, seed=3)
    indices = list(range(6))
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(
        finetune.RecoloredShapes(base, "cyan", share=0.0).__getitems__(indices), base.__getitems__(indices)))
    cyan = torch.tensor(finetune.NEW_COLORS["cyan"], dtype=torch.float32)[:, None, None]
    for item, plain in zip(finetune.RecoloredShapes(base, "cyan", share=1.0).__getitems__(indices),
                           base.__getitems__(indices)):
        old = plain["attributes"]["color"]
        assert item["attributes"]["color"] == "cyan" and "cyan" in item["texts"] and old not in item["texts"]
        plain_px, new_px = (plain["images"] + 1) * 127.5, (item["images"] + 1) * 127.5  # 0..255
        fg = torch.tensor(shapes.COLORS[old], dtype=torch.float32)[:, None, None]
        bg = torch.tensor(shapes.BACKGROUNDS[plain["attributes"]["background"]], dtype=torch.float32)[:, None, None]
        inside = (plain_px - fg).abs().amax(0) < 0.5  # pixels fully covered by the shape
        outside = (plain_px - bg).abs().amax(0) < 1e-3  # not touched by the shape at all
        assert inside.any() and outside.any()
        assert (new_px - cyan).abs().amax(0)[inside].max() < 0.5  # now exactly the new colour
        assert torch.allclose(new_px[:, outside], plain_px[:, outside], atol=1e-3)  # background untouched


def test_scripts_answer_help_offline(tmp_path):
    for script, option in (("train.py", "--config"), ("finetune.py", "--checkpoint")):
        done = run([sys.executable, EXAMPLES / script, "--help"], cwd=tmp_path, HF_HUB_OFFLINE="1")
        assert option in done.stdout and "usage:" in done.stdout


def test_train_script_data_option_reads_a_folder_with_the_configs_folder_options(tmp_path):
    from PIL import Image

    from imagen_lib.data.folder import ImageTextFolder
    from imagen_lib.data.shapes import ShapesDataset

    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (20, 20), colour).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"a {colour} square")
    from imagen_lib.config import build_dataset

    train = load_example("train")
    config = {"text_encoder": {"build_tiny": {}}, "data": {"type": "shapes", "seed": 3, "length": 10}}
    dataset, workers = build_dataset(train.with_data(config, str(tmp_path)), 16)
    assert isinstance(dataset, ImageTextFolder) and len(dataset) == 2 and workers == 0
    config["data"] = {"type": "folder", "root": "elsewhere", "seed": 7, "num_workers": 1}
    dataset, workers = build_dataset(train.with_data(config, str(tmp_path)), 16)
    assert len(dataset) == 2 and workers == 1 and dataset.seed == 7
    assert isinstance(build_dataset(train.with_data(config, "shapes"), 16)[0], ShapesDataset)
    assert train.with_data(config, None) is config


def test_latent_shapes_trains_an_autoencoder_then_a_latent_stage_and_judges_it(tmp_path):
    """examples/latent_shapes.py at tiny settings: the autoencoder it trains first is saved and used by the
    latent stage, whose checkpoint holds it; eval-shapes judges the samples (figures: docs/latent.md)."""
    out = tmp_path / "latent"
    done = run([sys.executable, EXAMPLES / "latent_shapes.py", "--out", out, "--ae-steps", "2", "--ae-images", "32",
                "--eval-n", "2", "--no-progress", "--set", "stages.0.train.steps=2",
                "--set", "stages.0.sampler.steps=2"], cwd=REPO)
    assert "autoencoder: 2 steps" in done.stdout
    assert "times as far from the background" in done.stdout  # the P_mean shift its latents ask for
    assert (out / "autoencoder" / "config.json").exists()
    version = Path(resolve(out / "checkpoint"))
    assert (version / "autoencoder0").is_dir() and (version / "stage0.safetensors").exists()
    assert (out / "samples.png").exists() and any((out / "eval-shapes").iterdir())
