"""The non-finite guard (issue 23, finding 2): a NaN pixel or a learning rate that blows up skips the step
(weights, optimizer moments, EMA and step count untouched), counts and warns; K such steps in a row stop the
run with an error naming the stage, the step and the last good checkpoint, whose files never change."""

import hashlib
import math

import pytest
import torch
from tiny_cascade import images, tiny_cascade, tiny_config

from imagen_lib.config import build_cascade, trainer_settings
from imagen_lib.training import NonFiniteLossError
from imagen_lib.training.loop import RunOptions, train_stages
from imagen_lib.training.nonfinite import NonFiniteStepWarning
from imagen_lib.training.trainer import Trainer

FAST_EMA = {"ema_update_after_step": 0, "ema_update_every": 1}


def _batch(seed=0, nan=False):
    x = images(4, 16, seed)
    if nan:
        x[2, 1, 5, 7] = float("nan")  # one pixel
    g = torch.Generator().manual_seed(seed)
    return {"images": x, "text_embeds": torch.randn(4, 3, 32, generator=g), "text_mask": torch.ones(4, 3, dtype=bool)}


def _snapshot(trainer, k):
    st = trainer.stages[k]
    opt = st.optimizer.state_dict()
    moments = [v.clone() for s in opt["state"].values() for v in s.values() if torch.is_tensor(v)]
    return {"net": [p.detach().clone() for p in trainer.cascade.stages[k].net.parameters()],
            "ema": [p.detach().clone() for p in st.ema.ema_model.parameters()],
            "moments": moments, "ema_step": st.ema.step.clone(), "step": st.step}


def _same(a, b):
    assert a["step"] == b["step"] and torch.equal(a["ema_step"], b["ema_step"])
    for key in ("net", "ema", "moments"):
        assert len(a[key]) == len(b[key]) and all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_a_nan_pixel_skips_the_step_and_k_in_a_row_stop_the_run(tmp_path, max_grad_norm):
    trainer = Trainer(tiny_cascade(), lr=1e-3, max_nonfinite_steps=3, max_grad_norm=max_grad_norm, **FAST_EMA)
    for seed in range(2):
        trainer.train_step(0, _batch(seed))
    good = trainer.save(tmp_path / "checkpoint")
    before_files, before = _hashes(tmp_path / "checkpoint"), _snapshot(trainer, 0)
    for count in (1, 2):
        with pytest.warns(NonFiniteStepWarning, match=rf"stage 0, step 2: .*skipped \({count} in a row"):
            loss = trainer.train_step(0, _batch(5, nan=True))
        assert math.isnan(loss)
        _same(before, _snapshot(trainer, 0))
        assert all(p.grad is None for p in trainer.cascade.stages[0].net.parameters())  # dropped, not carried
        assert (trainer.stages[0].skipped, trainer.stages[0].skipped_in_a_row) == (count, count)
    trainer.train_step(0, _batch(6))  # a good step ends the run of bad ones; the count stays
    assert trainer.steps[0] == 3 and (trainer.stages[0].skipped, trainer.stages[0].skipped_in_a_row) == (2, 0)
    after_good = _snapshot(trainer, 0)
    with pytest.warns(NonFiniteStepWarning):
        trainer.train_step(0, _batch(7, nan=True))
        trainer.train_step(0, _batch(8, nan=True))
        with pytest.raises(NonFiniteLossError, match=rf"stage 0, step 3: 3 steps in a row.*{good}") as error:
            trainer.train_step(0, _batch(9, nan=True))
    assert isinstance(error.value, ValueError) and "max_nonfinite_steps" in str(error.value)
    _same(after_good, _snapshot(trainer, 0))
    assert _hashes(tmp_path / "checkpoint") == before_files


def test_a_huge_learning_rate_is_stopped_and_the_last_good_checkpoint_is_kept(tmp_path):
    """trainer.lr=1e9 through train_stages: the gradients overflow, the steps are skipped, the run stops with
    an error naming the checkpoint it wrote (save_every) and that checkpoint's files are never replaced."""
    config = tiny_config(steps=40)
    config["trainer"].update(lr=1e9, max_nonfinite_steps=4, save_every=1)
    trainer = Trainer(build_cascade(config), settings=trainer_settings(config), cpu=True)
    checkpoint = tmp_path / "run" / "checkpoint"
    files = {}
    original_save = trainer.save

    def save(path, **kwargs):  # the files of the last checkpoint written
        out = original_save(path, **kwargs)
        files.update(_hashes(checkpoint))
        return out

    trainer.save = save
    with pytest.warns(NonFiniteStepWarning), pytest.raises(NonFiniteLossError, match=str(checkpoint)) as error:
        train_stages(trainer, config, tmp_path / "run", RunOptions(progress=False, stages=[0]))
    step = trainer.steps[0]
    assert f"stage 0, step {step}: 4 steps in a row" in str(error.value)
    assert trainer.stages[0].skipped >= 4 and files and _hashes(checkpoint) == files


def test_save_refuses_non_finite_weights_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(tiny_cascade(), lr=1e-3, **FAST_EMA)
    trainer.train_step(0, _batch(0))
    trainer.save(tmp_path / "checkpoint")
    before = _hashes(tmp_path / "checkpoint")
    with torch.no_grad():
        next(trainer.stages[1].ema.ema_model.parameters())[0].fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"stage1\.ema\.safetensors would hold NaN or infinite values"):
        trainer.save(tmp_path / "checkpoint")
    assert _hashes(tmp_path / "checkpoint") == before


def test_the_skip_count_is_saved_and_restored(tmp_path):
    trainer = Trainer(tiny_cascade(), lr=1e-3, **FAST_EMA)
    with pytest.warns(NonFiniteStepWarning):
        trainer.train_step(1, _batch(0, nan=True))
    trainer.save(tmp_path / "checkpoint")
    other = Trainer(tiny_cascade(), lr=1e-3, **FAST_EMA).load(tmp_path / "checkpoint")
    assert [(st.skipped, st.skipped_in_a_row) for st in other.stages] == [(0, 0), (1, 1)]
    assert other.last_checkpoint == str(tmp_path / "checkpoint")
