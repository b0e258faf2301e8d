"""Resume continues the same run (issue 23, findings 1 and 5): the data position (skipped non-finite steps
included) is saved and restored, a resumed run ends bit for bit where an uninterrupted one does, other step
counts than the checkpoint's schedule need an explicit extend, periodic saves reach the checkpoint writer,
every stage's data is checked before the first step, and trainer.json's values are checked on load."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from tiny_cascade import tiny_cascade, tiny_config
from torch.utils.data import DataLoader, Dataset, IterableDataset

from imagen_lib import checkpoint as ckpt
from imagen_lib.cli import entry_point, main
from imagen_lib.config import build_cascade, trainer_settings
from imagen_lib.training import trainer as trainer_module
from imagen_lib.training.data_order import DataOrder, DataPosition
from imagen_lib.training.loop import RunOptions, train_stages
from imagen_lib.training.nonfinite import NonFiniteStepWarning
from imagen_lib.training.trainer import Trainer

SETTINGS = {"lr": 1e-3, "total_steps": 10, "ema_update_after_step": 0, "ema_update_every": 1}
NAN_ITEMS = (0, 13)


class Items(Dataset):
    """24 images with text embeddings, each from its own seed; items ``NAN_ITEMS`` hold one NaN pixel."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        image = torch.rand(3, 16, 16, generator=g) * 2 - 1
        if i in NAN_ITEMS:
            image[1, 3, 4] = float("nan")
        return {"images": image, "text_embeds": torch.randn(3, 32, generator=g), "text_mask": torch.ones(3, dtype=bool)}


def _loader():
    return DataLoader(Items(), batch_size=4, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(3))


def _trainer():
    torch.manual_seed(0)
    return Trainer(tiny_cascade(seed=0), **SETTINGS)


def _fit(trainer, steps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteStepWarning)
        trainer.fit(_loader(), 0, steps, start_batch=None, disable_progress=True)


def _state(trainer):
    st = trainer.stages[0]
    opt = st.optimizer.state_dict()["state"]
    return ([p.detach().clone() for p in trainer.cascade.stages[0].net.parameters()]
            + [p.detach().clone() for p in st.ema.ema_model.parameters()]
            + [v.clone() for s in opt.values() for v in s.values()] + [st.ema.step.clone(), torch.get_rng_state()])


def test_a_run_with_skipped_steps_killed_and_resumed_equals_an_uninterrupted_one(tmp_path):
    whole = _trainer()
    _fit(whole, 10)
    first = _trainer()
    _fit(first, 4)
    assert first.stages[0].skipped > 0  # a NaN batch was skipped before the kill
    position = first.stages[0].data
    assert position.batches == 4 + first.stages[0].skipped and position.epoch * 6 + position.batch == position.batches
    first.save(tmp_path / "checkpoint")
    saved = ckpt.read_json(tmp_path / "checkpoint", "trainer")
    assert saved["data"][0] == position.as_dict() and saved["nonfinite"][0]["skipped"] == first.stages[0].skipped
    torch.manual_seed(123)  # the new process's own state: load restores the run's
    resumed = Trainer(tiny_cascade(seed=1), **SETTINGS).load(tmp_path / "checkpoint")
    _fit(resumed, 6)
    assert whole.steps == resumed.steps == [10, 0] and whole.stages[0].data == resumed.stages[0].data
    assert whole.stages[0].skipped == resumed.stages[0].skipped > first.stages[0].skipped - 1
    for a, b in zip(_state(whole), _state(resumed), strict=True):
        assert torch.equal(a, b)


class Stream(IterableDataset):
    """An iterable data set of 10 items per epoch that can skip batches (as ShardDataset does)."""

    def __init__(self, can_skip=True):
        self.epoch, self.skip, self.calls = 0, 0, []
        if can_skip:
            self.skip_batches = self._skip_batches

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _skip_batches(self, batches, batch_size):
        self.calls.append((self.epoch, batches, batch_size))
        self.skip = batches * batch_size

    def __iter__(self):
        skip, self.skip = self.skip, 0  # one-shot
        for i in range(skip, 10):
            yield torch.tensor([100 * self.epoch + i])


def _take(order, n):
    out = []
    for batch in order:
        out.append(batch.flatten().tolist())
        if len(out) == n:
            return out


def test_an_iterable_data_set_resumes_through_skip_batches_or_warns():
    stream = Stream()
    order = DataOrder(DataLoader(stream, batch_size=2), DataPosition(epoch=3, batch=4, batches=19))
    assert _take(order, 3) == [[308, 309], [400, 401], [402, 403]]
    assert stream.calls == [(3, 4, 2)] and order.position == DataPosition(4, 2, 22)
    at_end = DataOrder(DataLoader(Stream(), batch_size=2), DataPosition(epoch=1, batch=5, batches=10))
    assert _take(at_end, 1) == [[200, 201]]  # resumed at an epoch's end: the next epoch
    plain = DataOrder(DataLoader(Stream(can_skip=False), batch_size=2), DataPosition(epoch=2, batch=3, batches=13))
    with pytest.warns(UserWarning, match="cannot skip the 3 batch"):
        assert _take(plain, 1) == [[200, 201]]
    assert plain.position == DataPosition(2, 1, 14)
    with pytest.raises(ValueError, match=r"dataloader: it yielded no batch in epoch 0 \(is its batch size larger"):
        _take(DataOrder([], DataPosition()), 1)


# ---------------------------------------------------------------------------------------------------------
# train_stages and the command line
# ---------------------------------------------------------------------------------------------------------


def _config(steps, **trainer):
    config = tiny_config(steps=steps)
    config["trainer"].update(trainer)
    return config


def _run(config, out, **options):
    trainer = Trainer(build_cascade(config), settings=trainer_settings(config), cpu=True)
    train_stages(trainer, config, out, RunOptions(progress=False, **options))
    return trainer


def test_resuming_with_other_steps_needs_extend_which_recomputes_the_horizon(tmp_path):
    _run(_config(2), tmp_path, stages=[0])
    with pytest.raises(ValueError, match=r"stages\.0\.train\.steps: .* over 2 steps, this config over 4; .*--extend"):
        _run(_config(4), tmp_path, resume=True, stages=[0])
    trainer = _run(_config(4), tmp_path, resume=True, stages=[0], extend=True)
    assert trainer.steps == [4, 0] and trainer.horizons[0] == 4
    saved = ckpt.read_json(tmp_path / "checkpoint", "trainer")
    assert saved["horizons"][0] == 4 and saved["data"][0]["batches"] == 4


@pytest.fixture
def writes(monkeypatch):
    """Each checkpoint write's steps and versioning options (a writer that takes keep_last and label)."""
    seen = []
    real = trainer_module.write_cascade_checkpoint

    def writer(cascade, path, *, tensors, json_files=None, overwrite=False, run_id=None, keep_last=2, label=None):
        seen.append((json_files["trainer"]["steps"], keep_last, label))
        return real(cascade, path, tensors=tensors, json_files=json_files, overwrite=overwrite, run_id=run_id)

    monkeypatch.setattr(trainer_module, "write_cascade_checkpoint", writer)
    return seen


def test_the_configs_save_every_and_keep_last_reach_the_checkpoint_writer(tmp_path, writes):
    _run(_config(4, save_every=2, keep_last=3), tmp_path / "config")
    # every second step of each stage (the end of a stage is one: it is not written twice)
    assert writes == [([2, 0], 3, "step-000002-000000"), ([4, 0], 3, "step-000004-000000"),
                      ([4, 2], 3, "step-000004-000002"), ([4, 4], 3, "step-000004-000004")]
    writes.clear()
    _run(_config(4, save_every=2, keep_last=3), tmp_path / "options", save_every=3, keep_last=1, stages=[0])
    assert writes == [([3, 0], 1, "step-000003-000000"), ([4, 0], 1, "step-000004-000000")]


def test_the_command_lines_save_every_and_keep_last_reach_the_checkpoint_writer(tmp_path, writes):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(_config(3, save_every=2)))
    assert main(["train", str(config), "--out", str(tmp_path / "a"), "--stages", "0", "--no-progress"]) == 0
    assert writes == [([2, 0], 2, "step-000002-000000"), ([3, 0], 2, "step-000003-000000")]
    writes.clear()
    assert main(["train", str(config), "--out", str(tmp_path / "b"), "--stages", "0", "--save-every", "1",
                 "--keep-last", "4", "--no-progress"]) == 0
    assert [(steps, keep) for steps, keep, _ in writes] == [([1, 0], 4), ([2, 0], 4), ([3, 0], 4)]


def test_every_stages_data_is_checked_before_the_first_step(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(_config(2)))
    out = tmp_path / "run"
    bad = ["--set", "stages.1.train.batch_size=100"]
    assert entry_point(["train", str(config), "--out", str(out), *bad, "--no-progress"]) == 2
    assert "stages.1.train.batch_size: 100 is more than the 64 items" in capsys.readouterr().err
    assert not (out / "checkpoint").exists()  # stage 0 never trained


def test_the_data_check_leaves_the_random_state_alone():
    from imagen_lib.training.loop import check_stage_data

    torch.manual_seed(7)
    before = torch.get_rng_state()
    check_stage_data(_config(2), [0, 1])
    assert torch.equal(before, torch.get_rng_state())


# ---------------------------------------------------------------------------------------------------------
# checks on load
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "checkpoint"
    Trainer(tiny_cascade(), lr=1e-3).save(folder)
    return folder


@pytest.mark.parametrize("key,value,message", [
    ("steps", [-5, 1], r"steps\[0\]: expected an int >= 0"),
    ("steps", [1, 1e12], r"steps\[1\]: expected an int >= 0"),
    ("steps", [1], "steps: expected a list of 2 values"),
    ("horizons", [None, "x"], r"horizons\[1\]: expected an int >= 0 or null"),
    ("data", [{"epoch": 0, "batch": -1, "batches": 0}, {"epoch": 0, "batch": 0, "batches": 0}],
     r"data\[0\]\.batch: expected an int >= 0"),
    ("data", [{"epoch": 0}, {}], r"data\[0\]: expected \{epoch, batch, batches\}"),
    ("nonfinite", [{"skipped": 1.5, "in_a_row": 0}, {"skipped": 0, "in_a_row": 0}], r"nonfinite\[0\]\.skipped"),
    ("run_id", None, "run_id: missing"),
])
def test_trainer_json_values_are_checked_on_load(saved, tmp_path, key, value, message):
    import shutil

    folder = tmp_path / "checkpoint"
    shutil.copytree(saved, folder)
    version = Path(ckpt.resolve(folder))  # the committed version's files
    state = json.loads((version / "trainer.json").read_text())
    if value is None:
        del state[key]
    else:
        state[key] = value
    (version / "trainer.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=f"trainer.json: {message}"):
        Trainer(tiny_cascade(), lr=1e-3).load(folder)


def test_an_old_trainer_json_without_positions_resumes_at_its_step_count(saved, tmp_path):
    import shutil

    folder = tmp_path / "checkpoint"
    shutil.copytree(saved, folder)
    version = Path(ckpt.resolve(folder))  # the committed version's files
    state = json.loads((version / "trainer.json").read_text())
    state["steps"] = [5, 0]
    del state["data"], state["nonfinite"]
    (version / "trainer.json").write_text(json.dumps(state))
    trainer = Trainer(tiny_cascade(), lr=1e-3).load(folder)
    assert trainer.stages[0].data == DataPosition(0, 5, 5) and trainer.stages[0].skipped == 0


def test_a_stage_saved_at_another_image_size_warns(saved, tmp_path):
    import shutil

    folder = tmp_path / "checkpoint"
    shutil.copytree(saved, folder)
    version = Path(ckpt.resolve(folder))  # the committed version's files
    config = json.loads((version / "config.json").read_text())
    config["stages"][1]["image_size"] = 32
    (version / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="stage 1 of checkpoint .* was trained at image_size 32, this trainer's"):
        Trainer(tiny_cascade(), lr=1e-3).load(folder)
