"""Gradient accumulation (``TrainerSettings.gradient_accumulation_steps``): micro-batches give the update of one
batch of them all; steps, the LR schedule, the EMA and data positions count as they should; the config key and
the flags reach the trainer; and the single-process ``accelerate launch --cpu`` warning."""

import json
from pathlib import Path

import pytest
import torch
from tiny_cascade import images, tiny_cascade, tiny_config

from imagen_lib.cascade import Cascade
from imagen_lib.config import trainer_settings
from imagen_lib.training import loop
from imagen_lib.training.launcher import TWO_CPU_PROCESSES, single_process_launch_warning
from imagen_lib.training.trainer import Trainer, TrainerSettings, lr_factor

FAST_EMA = {"ema_update_after_step": 0, "ema_update_every": 1}
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _row_loss(self, images, texts=None, text_embeds=None, text_mask=None, stage=0, *, net=None, **_):
    """A deterministic loss (no noise, no dropout): the mean over rows of a per-row loss, as Cascade.forward's."""
    x = torch.nn.functional.interpolate(images, size=8)
    out = net(x, x.mean((1, 2, 3)) * 4, text_embeds=text_embeds, text_mask=text_mask)
    return ((out - x) ** 2).flatten(1).mean(1).mean()  # the networks' last layer starts at 0: aim at x


def _rows(n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed + 100)
    return {"images": images(n, 16, seed).to(dtype), "text_embeds": torch.randn(n, 3, 32, generator=g).to(dtype),
            "text_mask": torch.ones(n, 3, dtype=torch.bool)}


def _cat(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _perturbed_cascade():
    """The tiny cascade in float64, every weight perturbed (its zero-initialised output layers would otherwise
    leave most gradients at 0 for the first steps)."""
    cascade = tiny_cascade(seed=0).to(torch.float64)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in cascade.stages[0].net.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.05)
    return cascade


def _step_state(batch, steps=2, **settings):
    """Weights and AdamW moments of stage 0 after ``steps`` train_step calls on ``batch`` (one batch or a list
    of micro-batches), in float64."""
    cascade = _perturbed_cascade()
    trainer = Trainer(cascade, lr=1e-3, **FAST_EMA, **settings)
    for _ in range(steps):
        trainer.train_step(0, batch)
    opt = trainer.stages[0].optimizer.optimizer
    moments = [(opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
               for p in opt.param_groups[0]["params"]]
    return [p.detach().clone() for p in cascade.stages[0].net.parameters()], moments


def _assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    for (m1, v1), (m2, v2) in zip(a[1], b[1]):
        torch.testing.assert_close(m1, m2, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(v1, v2, rtol=1e-9, atol=1e-20)


@pytest.mark.parametrize("sizes, settings", [
    ((8, 8, 8, 8), {"max_grad_norm": None}),
    ((8, 8, 8, 8), {"max_grad_norm": 1e-3}),
    ((8, 8, 8, 8), {"max_grad_norm": None, "max_batch_size": 3}),  # and chunks within the micro-batches
    ((5, 11, 16), {"max_grad_norm": 1e-3}),  # unequal sizes: each example weighs the same
])
def test_micro_batches_give_the_update_of_one_batch_of_them_all(monkeypatch, sizes, settings):
    """4 x 8 accumulated = 32 at once, to float64 rounding: weights and AdamW moments after two steps."""
    monkeypatch.setattr(Cascade, "forward", _row_loss)
    micro = [_rows(n, seed) for seed, n in enumerate(sizes)]
    whole = _step_state(_cat(micro), **settings)
    _assert_same(_step_state(micro, **settings), whole)
    start = [p.detach() for p in _perturbed_cascade().stages[0].net.parameters()]
    moved = [not torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(start, whole[0])]
    assert sum(moved) > len(moved) // 2  # the two steps moved most weights (a test that can fail)
    if settings["max_grad_norm"] is not None:  # the clip acted (on the summed gradient): the moments shrank
        unclipped = _step_state(_cat(micro), max_grad_norm=None)
        first_moments = [sum(float(m.abs().sum()) for m, _ in state[1]) for state in (unclipped, whole)]
        assert first_moments[0] > 10 * first_moments[1] > 0


def test_fit_accumulates_loader_batches_as_one_step(monkeypatch):
    """fit with gradient_accumulation_steps=4 on batches of 8 = fit on batches of 32 (float64)."""
    monkeypatch.setattr(Cascade, "forward", _row_loss)
    micro = [_rows(8, seed) for seed in range(8)]
    results = []
    for loader, n in ((micro, 4), ([_cat(micro[:4]), _cat(micro[4:])], 1)):
        cascade = _perturbed_cascade()
        trainer = Trainer(cascade, lr=1e-3, gradient_accumulation_steps=n, **FAST_EMA)
        trainer.fit(loader, 0, steps=2, disable_progress=True)
        assert trainer.stages[0].data.batches == len(loader)  # 2 steps of n batches
        results.append([p.detach().clone() for p in cascade.stages[0].net.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_steps_schedule_and_ema_count_optimizer_steps():
    settings = dict(warmup_steps=4, min_lr_ratio=0.1, **FAST_EMA)
    trainer = Trainer(tiny_cascade(seed=0), lr=1e-3, gradient_accumulation_steps=4, **settings)
    loader = [{"images": images(2, 16, seed), "text_embeds": torch.randn(2, 3, 32),
               "text_mask": torch.ones(2, 3, dtype=torch.bool)} for seed in range(20)]
    seen = []
    trainer.fit(loader, 1, steps=3, disable_progress=True, on_step=seen.append)
    state = trainer.stages[1]
    assert seen == [1, 2, 3] and state.step == 3 and trainer.steps == [0, 3]
    assert state.horizon == 3  # fit's steps, not 12 micro-steps
    assert int(state.ema.step) == 3
    # the third step (0-based step 2) ran at lr_factor(2): still in warm-up; counting micro-steps it would
    # be lr_factor(11) on a horizon of 12
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(2, 4, 3, 0.1))
    assert lr_factor(2, 4, 3, 0.1) != pytest.approx(lr_factor(11, 4, 12, 0.1))
    assert (state.data.epoch, state.data.batch, state.data.batches) == (0, 12, 12)


def test_a_non_finite_micro_batch_skips_the_whole_step():
    trainer = Trainer(tiny_cascade(seed=0), lr=1e-3, gradient_accumulation_steps=2, **FAST_EMA)
    before = [p.detach().clone() for p in trainer.cascade.stages[0].net.parameters()]
    good = {"images": images(2, 16, 0), "text_embeds": torch.randn(2, 3, 32)}
    bad = {"images": images(2, 16, 1) * float("nan"), "text_embeds": torch.randn(2, 3, 32)}
    with pytest.warns(RuntimeWarning, match="not finite|NaN"):
        loss = trainer.train_step(0, [good, bad])
    assert loss != loss  # NaN
    state = trainer.stages[0]
    assert (state.step, state.skipped) == (0, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.cascade.stages[0].net.parameters()))
    with pytest.raises(ValueError, match="non-empty list of micro-batches"):
        trainer.train_step(0, [])


def test_the_setting_from_the_config_and_its_checks():
    assert TrainerSettings().gradient_accumulation_steps == 1
    assert trainer_settings({"trainer": {"gradient_accumulation_steps": 4}}).gradient_accumulation_steps == 4
    for bad in (0, 2.5, "2", True):
        with pytest.raises((TypeError, ValueError), match="gradient_accumulation_steps"):
            TrainerSettings(gradient_accumulation_steps=bad)
        with pytest.raises((TypeError, ValueError), match="gradient_accumulation_steps"):
            trainer_settings({"trainer": {"gradient_accumulation_steps": bad}})


def _capture_train_stages(monkeypatch, module):
    seen = {}

    def fake(trainer, config, out, options=None, **_):
        seen.update(steps=trainer.settings.gradient_accumulation_steps, config=config)
        return loop.RunResult(Path(out) / "checkpoint")

    monkeypatch.setattr(module, "train_stages", fake)
    return seen


def test_the_cli_flag_reaches_the_trainer_and_the_config(monkeypatch, tmp_path):
    from imagen_lib.cli import main

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config(text=False)))
    seen = _capture_train_stages(monkeypatch, loop)
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--cpu", "--gradient-accumulation-steps",
                 "3"]) == 0
    assert seen["steps"] == 3 and seen["config"]["trainer"]["gradient_accumulation_steps"] == 3
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--cpu"]) == 0
    assert seen["steps"] == 1
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        main(["train", str(config), "--out", str(tmp_path / "run"), "--cpu", "--gradient-accumulation-steps", "0"])


def _load_train_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("example_train_accumulation", EXAMPLES / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_flag_reaches_the_trainer_and_the_cpu_launch_warning(monkeypatch, tmp_path, capsys):
    example = _load_train_example()
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config(text=False)))
    seen = _capture_train_stages(monkeypatch, example)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert example.main(["--config", str(config), "--out", str(tmp_path / "run"), "--gradient-accumulation-steps",
                         "2"]) == 0
    assert seen["steps"] == 2
    assert "warning" not in capsys.readouterr().err
    # what `accelerate launch --cpu --num_processes 2` exports when it starts one process
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert example.main(["--config", str(config), "--out", str(tmp_path / "run2")]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and TWO_CPU_PROCESSES in err and "single process" in err


@pytest.mark.parametrize("env, processes, warns", [
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}, 1, True),  # --cpu --num_processes 2, no MPI
    ({"ACCELERATE_USE_CPU": "True"}, 1, False),  # --cpu --num_processes 1: no MASTER_ADDR
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"}, 2, False),  # torchrun path
    ({"ACCELERATE_USE_CPU": "1", "MASTER_ADDR": "h", "PMI_SIZE": "2"}, 2, False),  # MPI
    ({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1"}, 1, False),  # a GPU launch
    ({}, 1, False),  # plain python
])
def test_single_process_launch_warning(env, processes, warns):
    message = single_process_launch_warning(processes, env, script="train.py")
    assert (message is not None) == warns
    if warns:
        assert f"{TWO_CPU_PROCESSES} train.py" in message and "MPI" in message
