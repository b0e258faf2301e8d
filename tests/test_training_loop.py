"""train_stages, the one training loop of `imagen-lib train` and examples/train.py: each stage's data order is
seeded ``seed + stage``; a run stopped half-way and resumed ends bit for bit where an uninterrupted one does
(its data order continues where it stopped, across an epoch boundary); resuming asks for a checkpoint."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_cascade import tiny_config

from imagen_lib.checkpoint import resolve
from imagen_lib.config import build_cascade, trainer_settings
from imagen_lib.training.loop import RunOptions, stage_loader, train_stages
from imagen_lib.training.trainer import Trainer

QUIET = RunOptions(progress=False, log_every=1)


def _config(steps: int) -> dict:
    config = tiny_config(steps=steps)
    config["data"]["length"] = 24  # 6 batches of 4 per epoch: half of 14 steps crosses an epoch's end
    config["trainer"]["total_steps"] = 14  # the same schedule for a run that stops half-way
    return config


def _run(config: dict, out, **options):
    trainer = Trainer(build_cascade(config), settings=trainer_settings(config), cpu=True)
    return train_stages(trainer, config, out, QUIET, **options)


def test_each_stage_loader_is_seeded_seed_plus_stage():
    config = _config(2)
    config["seed"] = 5
    loaders = [stage_loader(config, k) for k in (0, 1)]
    assert [loader.generator.initial_seed() for loader in loaders] == [5, 6]
    assert [loader.batch_size for loader in loaders] == [4, 4] and all(loader.drop_last for loader in loaders)


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tmp_path):
    whole, half = tmp_path / "whole", tmp_path / "half"
    _run(_config(14), whole)
    first = _run(_config(7), half, stages=[0])  # stops after 7 steps of stage 0 (one epoch and a batch)
    assert not first.resumed and first.stages[0]["steps"] == 7
    second = _run(_config(14), half, resume=True)  # a new trainer: 7 more steps of stage 0, then stage 1
    assert second.resumed and [r["steps"] for r in second.stages] == [7, 14]
    for name in ("stage0", "stage0.ema", "stage1", "stage1.ema"):
        a, b = (load_file(str(Path(resolve(out / "checkpoint")) / f"{name}.safetensors")) for out in (whole, half))
        assert all(torch.equal(a[key], b[key]) for key in a), name
    assert json.loads((Path(resolve(half / "checkpoint")) / "trainer.json").read_text())["steps"] == [14, 14]
    assert (half / "samples.png").exists() and (half / "config.yaml").exists()


def test_resuming_needs_a_checkpoint_and_a_fresh_start_needs_an_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume: there is no checkpoint"):
        _run(_config(1), tmp_path / "none", resume=True)
    _run(_config(1), tmp_path / "run")
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        _run(_config(1), tmp_path / "run", resume=False)
    again = _run(_config(1), tmp_path / "run")  # resume=None: continues, nothing is left to train
    assert again.resumed and again.stages == []
    with pytest.raises(ValueError, match="stages: expected stage indices"):
        _run(_config(1), tmp_path / "other", stages=[2])
