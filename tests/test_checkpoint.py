"""Checkpoint folders through fsspec: round trips, no pickles, no silent overwrite, no half checkpoints."""

import json
import os
import random

import fsspec
import numpy as np
import pytest
import torch

from imagen_lib import checkpoint as ckpt


def _write(path, value=1.0, **kwargs):
    return ckpt.write_checkpoint(
        path, config={"value": value}, tensors={"stage0": {"w": torch.full((2, 3), value), "b": torch.arange(3)}},
        json_files={"trainer": {"run_id": kwargs.pop("owner", None)}}, **kwargs,
    )


def test_memory_round_trip_holds_only_json_and_safetensors():
    path = "memory://ckpt-test/round"
    _write(path, 2.0)
    assert ckpt.read_config(path) == {"value": 2.0}
    state = ckpt.read_tensors(path, "stage0")
    assert torch.equal(state["w"], torch.full((2, 3), 2.0)) and torch.equal(state["b"], torch.arange(3))
    fs = fsspec.filesystem("memory")
    top = sorted(n.rsplit("/", 1)[1] for n in fs.ls("/ckpt-test/round", detail=False))
    version = json.loads(fs.cat_file("/ckpt-test/round/latest"))["version"]
    assert top == ["latest", version]  # one committed version and its pointer
    names = fs.ls(f"/ckpt-test/round/{version}", detail=False)
    assert sorted(n.rsplit("/", 1)[1] for n in names) == ["config.json", "stage0.safetensors", "trainer.json"]


def test_local_folder_round_trip_with_a_copied_folder(tmp_path):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "a.json").write_text("{}")
    ckpt.write_checkpoint(tmp_path / "ck", config={}, folders={"text_encoder": tmp_path / "src"})
    out = ckpt.download_folder(tmp_path / "ck", "text_encoder", tmp_path / "copy")
    assert (out / "sub" / "a.json").read_text() == "{}"


def test_never_overwrites_a_foreign_checkpoint(tmp_path):
    path = tmp_path / "ck"
    _write(path, 1.0, run_id="run-a", owner="run-a")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _write(path, 2.0, run_id="run-b", owner="run-b")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _write(path, 2.0)
    assert ckpt.read_config(path) == {"value": 1.0}
    _write(path, 3.0, run_id="run-a", owner="run-a")  # the run that wrote it may replace it
    assert ckpt.read_config(path) == {"value": 3.0}
    _write(path, 4.0, overwrite=True)
    assert ckpt.read_config(path) == {"value": 4.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary folders left


def test_a_failed_write_leaves_the_old_checkpoint_and_no_debris(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    _write(path, 1.0, run_id="r", owner="r")
    real = os.fsync
    calls = []

    def failing(fd):  # locally every written file is fsync-ed: the second one fails
        calls.append(fd)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="disk full"):
        _write(path, 2.0, run_id="r", owner="r")
    monkeypatch.undo()
    assert ckpt.read_config(path) == {"value": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    _write(path, 3.0, run_id="r", owner="r")  # the next save removes what the failed one left
    assert ckpt.read_config(path) == {"value": 3.0}
    assert sorted(p.name for p in path.iterdir()) == ["latest", ckpt.resolve(path).rsplit("/", 1)[1]]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        ckpt.read_config(tmp_path / "nothing")
    _write(tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="stage7"):
        ckpt.read_tensors(tmp_path / "ck", "stage7")


def test_optimizer_state_splits_into_tensors_and_json():
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors = {}
    plain = ckpt.split_state(opt.state_dict(), "opt", tensors)
    plain = json.loads(json.dumps(plain))  # it really is plain JSON
    restored = ckpt.join_state(plain, tensors)
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=5.0)
    fresh.load_state_dict(restored)
    for a, b in zip(opt.state_dict()["state"].values(), fresh.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert fresh.param_groups[0]["lr"] == 1e-3
    with pytest.raises(TypeError, match="without pickle"):
        ckpt.split_state({"f": object()}, "x", {})


def test_rng_state_round_trip():
    tensors = {}
    state = ckpt.rng_state(tensors)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(10), random.random(), np.random.rand(5)
    ckpt.set_rng_state(state, tensors)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_a_registered_process_of_your_own_round_trips_through_a_checkpoint(monkeypatch):
    from test_cascade import LogUniformVE, LowNoiseEDM
    from tiny_cascade import tiny_cascade

    from imagen_lib.cascade import Cascade, Stage
    from imagen_lib.diffusion import processes, register_diffusion

    monkeypatch.setattr(processes, "DIFFUSIONS", dict(processes.DIFFUSIONS))  # registrations end with the test
    base = tiny_cascade(text_embed_dim=None)
    cascade = Cascade([Stage(base.stages[0].net, LogUniformVE(sigma_max=5.0), 8), base.stages[1]])
    cascade.save("memory://custom-process/ck")
    with pytest.raises(ValueError, match="register_diffusion"):
        Cascade.from_checkpoint("memory://custom-process/ck")
    assert register_diffusion(LogUniformVE) is LogUniformVE
    loaded = Cascade.from_checkpoint("memory://custom-process/ck")
    assert type(loaded.stages[0].diffusion) is LogUniformVE and loaded.stages[0].diffusion.sigma_max == 5.0
    assert loaded.config == cascade.config
    a = cascade.sample(num_images_per_prompt=2, seed=1, stop_at_stage=0, disable_progress=True)
    assert torch.equal(a, loaded.sample(num_images_per_prompt=2, seed=1, stop_at_stage=0, disable_progress=True))
    with pytest.raises(ValueError, match="already names"):
        register_diffusion(LowNoiseEDM, "ElucidatedDiffusion")
    register_diffusion(LowNoiseEDM, "edm-low-noise")  # under a name of your choosing
    assert Stage(base.stages[0].net, LowNoiseEDM(), 8).config["diffusion"]["kind"] == "edm-low-noise"
