"""``parallel_stages``: `imagen-lib train` (through imagen_lib.training.loop and .parallel) trains the later
stages in their own processes while the first trains here, joins them at a fixed step and writes one
checkpoint; the result does not depend on timing."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_cascade import tiny_config

from imagen_lib import checkpoint as ckpt
from imagen_lib.cli import main
from imagen_lib.config import parallel_settings
from imagen_lib.training.loop import RunOptions, _train_stage_in_process
from imagen_lib.training.parallel import BackgroundStages
from imagen_lib.training.trainer import Trainer


def _train(tmp_path, name, steps=4, **parallel):
    config = tiny_config(steps=steps)
    config["parallel_stages"] = parallel
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    out = tmp_path / name
    threads = torch.get_num_threads()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", str(path), "--out", str(out), "--no-progress", "--cpu"]) == 0
    assert torch.get_num_threads() == threads  # every thread back once the stages joined
    (out / "printed.txt").write_text(printed.getvalue())
    return out


def _weights(out, name):
    return load_file(str(Path(ckpt.resolve(out / "checkpoint")) / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    return [_train(root, f"run{i}", threads_per_stage=1, join_at_step=2) for i in range(2)]


def test_every_stage_is_trained_and_saved_in_one_checkpoint(runs):
    out = runs[0]
    state = json.loads((Path(ckpt.resolve(out / "checkpoint")) / "trainer.json").read_text())
    assert state["steps"] == [4, 4] and state["horizons"] == [4, 4]
    assert "done: 2 stage(s) trained" in (out / "printed.txt").read_text()  # the background stage counts too
    assert not any(p.name.startswith(".stage") for p in out.iterdir())  # the stages' own folders are merged
    from imagen_lib.config import build_cascade

    untrained = build_cascade(tiny_config()).stages[1].net.state_dict()
    trained = _weights(out, "stage1")
    assert any(not torch.equal(trained[k], untrained[k]) for k in untrained)
    assert (out / "samples.png").exists()


def test_a_parallel_run_is_reproduced_exactly(runs):
    for name in ("stage0", "stage0.ema", "stage1", "stage1.ema"):
        a, b = (_weights(out, name) for out in runs)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_settings_are_checked_and_named():
    assert parallel_settings({}) is None
    assert parallel_settings({"parallel_stages": True}) == {"threads_per_stage": 1, "join_at_step": None}
    with pytest.raises(ValueError, match="parallel_stages.threads_per_stage"):
        parallel_settings({"parallel_stages": {"threads_per_stage": 0}})
    with pytest.raises(ValueError, match="parallel_stages.join_at_step"):
        parallel_settings({"parallel_stages": {"join_at_step": "soon"}})
    with pytest.raises(ValueError, match="unknown key"):
        parallel_settings({"parallel_stages": {"workers": 2}})


def test_a_trainable_text_encoder_is_refused(tmp_path):
    config = tiny_config(trainable=True)
    config["parallel_stages"] = {}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="frozen text encoder"):
        main(["train", str(path), "--out", str(tmp_path / "o"), "--no-progress", "--cpu"])


def test_a_failed_background_stage_is_reported_by_name(tmp_path):
    # it resumes from a checkpoint that is not there: its process fails at once
    job = dict(config=tiny_config(), steps=2, out=str(tmp_path), options=RunOptions(progress=False),
               resume_from=str(tmp_path / "missing"))
    background = BackgroundStages(_train_stage_in_process, {1: job}, tmp_path, threads=1)
    from imagen_lib.config import build_cascade

    trainer = Trainer(build_cascade(tiny_config()), cpu=True)
    with pytest.raises(RuntimeError, match="stage 1, trained in its own process, failed"):
        background.join(trainer)
    background.stop()


def test_trainer_loads_only_the_stages_asked_for(tmp_path):
    from imagen_lib.config import build_cascade

    source = Trainer(build_cascade(tiny_config()), lr=1e-2, ema_update_after_step=0, ema_update_every=1, cpu=True)
    batch = {"images": torch.rand(4, 3, 16, 16) * 2 - 1, "texts": ["a"] * 4}
    source.train_step(1, batch)
    source.save(tmp_path / "ck")
    target = Trainer(build_cascade(tiny_config()), lr=1e-2, cpu=True)
    target.train_step(0, {"images": torch.rand(4, 3, 8, 8) * 2 - 1, "texts": ["b"] * 4})
    before0 = {k: v.clone() for k, v in target.cascade.stages[0].net.state_dict().items()}
    target.load(tmp_path / "ck", stages=[1])
    assert target.steps == [1, 1]
    assert all(torch.equal(v, before0[k]) for k, v in target.cascade.stages[0].net.state_dict().items())
    want = ckpt.read_tensors(tmp_path / "ck", "stage1")
    assert all(torch.equal(v, want[k]) for k, v in target.cascade.stages[1].net.state_dict().items())
    assert target.stages[1].optimizer.state_dict()["state"]  # the optimizer's moments came along
