"""A real training process killed with SIGKILL at random instants (mid-step and mid-save), then started again,
ends bit for bit where an uninterrupted run ends, for both front ends (`imagen-lib train` and
`examples/train.py`), and the next saves leave no orphaned folders (issue 23).

Each front end trains the tiny 8 -> 16 px cascade with a checkpoint after every step, so most instants fall
in or near a save. The kill instants are drawn from a seeded generator over the uninterrupted run's wall time;
where a run ends before its kill, the next draw kills the restarted one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_cascade import tiny_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16
KILLS_PER_SEED = 3


def _command(front_end: str, config: Path, out: Path) -> list[str]:
    common = ["--save-every", "1", "--log-every", "1", "--no-progress"]
    if front_end == "cli":
        resume = ["--resume"] if (out / "checkpoint" / "latest").exists() else []
        return [sys.executable, "-m", "imagen_lib.cli", "train", str(config), "--out", str(out), "--cpu", *common,
                *resume]
    return [sys.executable, str(ROOT / "examples" / "train.py"), "--config", str(config), "--out", str(out),
            "--sample-every", "0", *common]  # resumes from OUT/checkpoint by itself


def _environment() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("IMAGEN_LIB_DEBUG", None)
    return env


def _start(front_end: str, config: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(_command(front_end, config, out), cwd=ROOT, env=_environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def _config_file(folder: Path) -> Path:
    config = tiny_config(steps=STEPS)
    config["data"]["length"] = 24  # several epochs in a run, so a kill also lands across an epoch boundary
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _committed(out: Path) -> Path:
    folder = out / "checkpoint"
    return folder / json.loads((folder / "latest").read_text())["version"]


def _state(out: Path) -> dict:
    """Every tensor of the committed checkpoint (weights, EMA weights, optimizer moments, counters, RNG) and the
    trainer's plain values other than the run id, plus the final sample grid's bytes."""
    version = _committed(out)
    tensors = {f"{file.name}:{key}": value for file in sorted(version.glob("*.safetensors"))
               for key, value in load_file(str(file)).items()}
    trainer = json.loads((version / "trainer.json").read_text())
    trainer.pop("run_id")
    return {"tensors": tensors, "trainer": trainer, "samples": (out / "samples.png").read_bytes()}


def _assert_same_run(a: dict, b: dict) -> None:
    assert a["trainer"] == b["trainer"]
    assert sorted(a["tensors"]) == sorted(b["tensors"])
    different = [k for k in a["tensors"] if not torch.equal(a["tensors"][k], b["tensors"][k])]
    assert not different, different
    assert a["samples"] == b["samples"]


def _assert_no_orphans(out: Path) -> None:
    folder = out / "checkpoint"
    latest = json.loads((folder / "latest").read_text())
    assert set(os.listdir(folder)) == {"latest", latest["version"], *latest.get("kept", [])}
    assert not [p.name for p in out.iterdir() if p.name.startswith("checkpoint.")]


def _wait_for_a_save(out: Path, since: float, process: subprocess.Popen) -> None:
    """Return once this process has written into OUT/checkpoint (training has begun) or has ended."""
    folder = out / "checkpoint"
    while process.poll() is None:
        if _written_since(folder, since):
            return
        time.sleep(0.01)


def _written_since(folder: Path, since: float) -> bool:
    try:
        return any(entry.stat().st_mtime > since for entry in os.scandir(folder))
    except FileNotFoundError:  # not there yet, or an entry removed by the run's own clean-up while we looked
        return False


@pytest.fixture(scope="module", params=["cli", "example"])
def uninterrupted(request, tmp_path_factory):
    """The front end, its config, the final state of a run never interrupted, and how long that run took from its
    first save to its end (the window the kills aim at)."""
    folder = tmp_path_factory.mktemp(f"whole-{request.param}")
    config = _config_file(folder)
    process = _start(request.param, config, folder / "out")
    _wait_for_a_save(folder / "out", time.time() - 1, process)
    first_save = time.monotonic()
    _finish(process)
    return request.param, config, _state(folder / "out"), time.monotonic() - first_save


@pytest.mark.parametrize("seed", [0, 1])
def test_a_run_killed_at_random_instants_resumes_to_the_same_weights(uninterrupted, seed, tmp_path):
    front_end, config, expected, seconds = uninterrupted
    draw = random.Random(f"{front_end}-{seed}")
    out = tmp_path / "out"
    kills = 0
    while kills < KILLS_PER_SEED:
        since = time.time()
        process = _start(front_end, config, out)
        _wait_for_a_save(out, since, process)  # the imports take most of a run's time: aim at the training
        try:
            process.wait(timeout=draw.uniform(0.0, 1.0) * seconds)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.communicate()
            kills += 1
            continue
        break  # finished before the kill: the run is complete
    assert kills >= 1  # a first run always ends after its kill instant (it has all of the training window left)
    _finish(_start(front_end, config, out))
    _assert_same_run(_state(out), expected)
    _assert_no_orphans(out)
