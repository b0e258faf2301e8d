"""Trackers in every front end (issue 25): ``imagen-lib train --log-with tensorboard`` writes loss, learning
rate, gradient norm and images/s per logged step and the sample grids as image summaries (read back with
TensorBoard's EventAccumulator); a tracker that is not installed is a one-line error with its install command."""

import json
import sys

import pytest
from tiny_cascade import tiny_config

from imagen_lib.cli import entry_point, main
from imagen_lib.config import build_cascade
from imagen_lib.training import tracking
from imagen_lib.training.loop import tracker_options
from imagen_lib.training.trainer import Trainer, lr_factor


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    config = root / "tiny.json"
    config.write_text(json.dumps(tiny_config(steps=3)))
    out = root / "run"
    # clipping at a tiny norm: the logged norm is the one before clipping, far above it
    assert main(["train", str(config), "--out", str(out), "--cpu", "--no-progress", "--log-with", "tensorboard",
                 "--log-every", "2", "--sample-every", "2", "--set", "stages.1.train.steps=1",
                 "--set", "trainer.max_grad_norm=1e-6"]) == 0
    return out


def test_train_logs_loss_lr_grad_norm_and_images_per_second_at_the_logged_steps(logged_run):
    events = _events(logged_run / tracking.PROJECT)  # the default logging folder: OUT/imagen_lib/
    expected = {0: [2, 3], 1: [1]}  # every log_every steps, and the stage's last step
    for k, steps in expected.items():
        for name in ("loss", "lr", "grad_norm", "images_per_second"):
            scalars = events.Scalars(f"stage{k}/{name}")
            assert [e.step for e in scalars] == steps, (k, name)
            assert all(e.value > 0 for e in scalars), (k, name)
        assert all(e.value > 1e-3 for e in events.Scalars(f"stage{k}/grad_norm"))  # before clipping at 1e-6
    # the rate the logged step was taken at (step s is taken at the schedule's index s - 1)
    lrs = [1e-3 * lr_factor(step - 1, 0, 3, 0.1) for step in (2, 3)]
    assert [e.value for e in events.Scalars("stage0/lr")] == pytest.approx(lrs, rel=1e-6)


def test_train_logs_the_sample_grids_as_images(logged_run):
    from PIL import Image

    events = _events(logged_run / tracking.PROJECT)
    assert [e.step for e in events.Images("stage0/samples")] == [2]  # as OUT/samples/stage0-000002.png
    assert [e.step for e in events.Images("samples")] == [3]  # the final grid, OUT/samples.png
    grid = Image.open(logged_run / "samples" / "stage0-000002.png")
    logged = events.Images("stage0/samples")[0]
    assert (logged.width, logged.height) == grid.size


def _hide(monkeypatch, *modules):
    """Make ``modules`` look uninstalled (find_spec gives None and importing fails), as in a bare install."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_a_missing_tracker_is_a_one_line_error_with_the_install_command(tmp_path, monkeypatch, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config(steps=1)))
    _hide(monkeypatch, "tensorboard", "tensorboardX")
    out = tmp_path / "run"
    assert entry_point(["train", str(config), "--out", str(out), "--log-with", "tensorboard", "--cpu"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == ("imagen-lib train: error: log_with: the tracker 'tensorboard' is not installed; "
                                   'install it with: pip install "imagen_lib[tensorboard]"')
    assert not out.exists()  # refused before anything was built or written
    # without --log-with (and no tracking.log_with) the default is tensorboard only when installed
    assert tracker_options(tiny_config(), out, default=None)["log_with"] is None


def test_a_missing_tracker_from_python_is_a_value_error_naming_log_with(monkeypatch):
    _hide(monkeypatch, "wandb")
    cascade = build_cascade(tiny_config())
    with pytest.raises(ValueError, match=r"^log_with: the tracker 'wandb' is not installed; .*pip install wandb$"):
        Trainer(cascade, log_with="wandb", cpu=True)
    _hide(monkeypatch, "tensorboard", "tensorboardX")
    with pytest.raises(ValueError, match="log_with: 'all' found no tracker installed; .*imagen_lib.tensorboard"):
        tracking.check_log_with("all")


def test_log_with_names_are_checked_and_normalised():
    assert tracking.check_log_with(None) is None
    assert tracking.check_log_with("none") is None
    assert tracking.check_log_with("TensorBoard, tensorboard") == ["tensorboard"]
    with pytest.raises(ValueError, match=r"^log_with: expected tensorboard, wandb, all or none, got 'tensorbord'"):
        tracking.check_log_with("tensorbord")
    with pytest.raises(TypeError, match="^log_with: expected a tracker name"):
        tracking.check_log_with(3)


def test_the_config_chooses_the_trackers_and_their_folder_and_the_flag_wins(tmp_path):
    config = {**tiny_config(), "tracking": {"log_with": "none", "logging_dir": str(tmp_path / "logs")}}
    assert tracker_options(config, tmp_path / "out", default="tensorboard") == {
        "log_with": None, "project_dir": str(tmp_path / "logs")}
    chosen = tracker_options(config, tmp_path / "out", log_with="tensorboard")
    assert chosen["log_with"] == ["tensorboard"]
    assert tracker_options(tiny_config(), tmp_path / "out", default="tensorboard")["project_dir"] == str(
        tmp_path / "out")
    with pytest.raises(ValueError, match="log_with: expected tensorboard, wandb, all or none, got 'mlflow'"):
        tracker_options({**tiny_config(), "tracking": {"log_with": ["mlflow"]}}, tmp_path)


def test_count_images_of_a_batch_and_of_micro_batches():
    import torch

    batch = {"images": torch.zeros(4, 3, 8, 8), "texts": ["a"] * 4}
    assert tracking.count_images(batch) == 4
    assert tracking.count_images([batch, {"images": torch.zeros(2, 3, 8, 8)}]) == 6
    assert tracking.count_images(torch.zeros(5, 3, 8, 8)) == 5


def test_examples_train_checks_its_trackers_with_the_same_function(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train.py"
    spec = importlib.util.spec_from_file_location("example_train_tracking", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _hide(monkeypatch, "tensorboard", "tensorboardX")
    with pytest.raises(ValueError, match=r'^log_with: .*pip install "imagen_lib\[tensorboard\]"'):
        script.make_trainer(tiny_config(), tmp_path / "run", "tensorboard")


def test_stages_trained_in_their_own_processes_log_to_their_own_folders(tmp_path):
    """``parallel_stages`` (the main job's mode): a stage trained in a background process logs its scalars too,
    to ``OUT/stage{k}/imagen_lib/`` (one TensorBoard folder per process)."""
    config = tiny_config(steps=3)
    config["parallel_stages"] = {"threads_per_stage": 1}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out), "--cpu", "--no-progress", "--log-with", "tensorboard",
                 "--log-every", "1"]) == 0
    background = _events(out / "stage1" / tracking.PROJECT)
    assert [e.step for e in background.Scalars("stage1/loss")] == [1, 2, 3]
    assert [e.step for e in _events(out / tracking.PROJECT).Scalars("stage0/loss")] == [1, 2, 3]
