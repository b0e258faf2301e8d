"""Trainer: steps, chunked batches with correctly weighted losses, the LR schedule, EMA, sampling with EMA
weights, fit, and save/load that resumes bit for bit."""

import pytest
import torch
from tiny_cascade import T5_KWARGS, images, tiny_cascade

from imagen_lib import checkpoint as ckpt
from imagen_lib.cascade import Cascade
from imagen_lib.text import T5TextEncoder
from imagen_lib.training.trainer import Trainer, TrainerSettings, lr_factor

FAST_EMA = {"ema_update_after_step": 0, "ema_update_every": 1}  # the EMA lags from the third step on


@pytest.fixture(scope="module")
def encoder():
    return T5TextEncoder.build_tiny(seed=0, max_length=16, **T5_KWARGS)


def _batch(n=4, size=16, seed=0):
    return {"images": images(n, size, seed), "texts": [f"caption {i}" for i in range(n)]}


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_train_step_updates_one_stage_and_its_ema(encoder):
    cascade = tiny_cascade(text_encoder=encoder)
    trainer = Trainer(cascade, lr=1e-3, **FAST_EMA)
    before = [_params(s.net) for s in cascade.stages]
    loss = trainer.train_step(1, _batch())
    assert isinstance(loss, float) and loss > 0
    after = [_params(s.net) for s in cascade.stages]
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert not all(torch.equal(a, b) for a, b in zip(before[1], after[1]))
    assert trainer.steps == [0, 1]
    trainer.train_step(1, _batch(seed=1))
    trainer.train_step(1, _batch(seed=2))
    ema = _params(trainer.stages[1].ema.ema_model)
    assert not all(torch.equal(a, b) for a, b in zip(ema, _params(cascade.stages[1].net)))  # lags behind
    assert all(torch.equal(a, b) for a, b in zip(_params(trainer.stages[0].ema.ema_model), before[0]))


def _grads_after_step(cascade, max_batch_size, batch):
    trainer = Trainer(cascade, lr=1e-3, max_batch_size=max_batch_size, max_grad_norm=None)
    seen = {}
    opt = trainer.stages[0].optimizer.optimizer
    opt.register_step_pre_hook(lambda o, a, k: seen.update(grads=[p.grad.clone() for p in o.param_groups[0]["params"]]))
    loss = trainer.train_step(0, batch)
    return loss, seen["grads"]


def test_max_batch_size_chunks_weight_the_losses_correctly(monkeypatch):
    """5 rows in chunks of 2, 2, 1: loss and gradients equal the whole batch's (for a deterministic loss;
    an unweighted mean of the chunk means would differ)."""
    batch = {"images": images(5, 16), "text_embeds": torch.randn(5, 3, 32),
             "text_mask": torch.ones(5, 3, dtype=torch.bool)}

    def row_loss(self, images, texts=None, text_embeds=None, text_mask=None, stage=0, *, net=None, **_):
        x = torch.nn.functional.interpolate(images, size=8)
        out = net(x, x.mean((1, 2, 3)) * 4, text_embeds=text_embeds, text_mask=text_mask)
        return (out**2).flatten(1).mean(1).mean()

    monkeypatch.setattr(Cascade, "forward", row_loss)
    (loss_full, g_full), (loss_chunked, g_chunked) = [_grads_after_step(tiny_cascade(seed=0), n, batch)
                                                      for n in (None, 2)]
    assert loss_chunked == pytest.approx(loss_full, rel=1e-5)
    for a, b in zip(g_full, g_chunked):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)


def test_fused_and_unfused_adamw_take_the_same_steps(encoder):
    weights = []
    start = _params(tiny_cascade(text_encoder=encoder, seed=0).stages[0].net)
    for fused in (True, False):
        cascade = tiny_cascade(text_encoder=encoder, seed=0)
        trainer = Trainer(cascade, lr=1e-3, fused_optimizer=fused, **FAST_EMA)
        assert trainer.stages[0].optimizer.optimizer.defaults["fused"] is (True if fused else None)
        for seed in range(3):
            torch.manual_seed(seed)  # same noise levels and noise for both runs
            trainer.train_step(0, _batch(seed=seed))
        weights.append(_params(cascade.stages[0].net))
    # each step moves a weight by up to lr = 1e-3; the kernels round differently, and Adam's g / sqrt(v)
    # magnifies that where gradients are near zero, so they agree to 5% of a step, and on average to 0.1%
    moved = torch.cat([(w - s).flatten() for w, s in zip(weights[0], start)]).abs()
    differ = torch.cat([(a - b).flatten() for a, b in zip(*weights)]).abs()
    assert moved.max() > 1e-3
    assert differ.max() < 5e-5 and differ.mean() < 1e-3 * moved.mean()


def test_lr_schedule_warms_up_then_decays_by_cosine():
    assert lr_factor(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, None, 0.1) == 1.0
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainerSettings(mixed_precision="fp8")


def test_fit_trains_logs_and_writes_samples(encoder, tmp_path):
    from torch.utils.data import DataLoader

    from imagen_lib.data.shapes import ShapesDataset

    cascade = tiny_cascade(text_encoder=encoder)
    trainer = Trainer(cascade, lr=1e-3, warmup_steps=1, **FAST_EMA)
    data = ShapesDataset(image_size=8, length=6, supersample=1)
    loader = DataLoader(data, batch_size=4, shuffle=True, collate_fn=data.collate_fn)
    result = trainer.fit(loader, 0, steps=3, log_every=2, sample_every=3, sample_prompts=["a red circle"],
                         out_dir=tmp_path, disable_progress=True)
    assert result["steps"] == 3 and result["loss"] > 0 and trainer.steps == [3, 0]
    assert trainer.horizons[0] == 3
    assert (tmp_path / "samples" / "stage0-000003.png").exists()
    with pytest.raises(ValueError, match="out_dir"):
        trainer.fit(loader, 0, steps=1, sample_every=1, sample_prompts=["x"])


def test_sampling_uses_the_ema_weights_unless_told_otherwise(encoder):
    cascade = tiny_cascade(text_encoder=encoder)
    trainer = Trainer(cascade, lr=1e-2, **FAST_EMA)
    for i in range(3):
        trainer.train_step(0, _batch(size=8, seed=i))
    kw = dict(seed=0, stop_at_stage=0, disable_progress=True)
    ema = trainer.sample(["a"], **kw)
    raw = trainer.sample(["a"], use_ema=False, **kw)
    assert not torch.allclose(ema, raw)
    assert torch.equal(raw, cascade.sample(["a"], **kw))
    assert torch.equal(ema, cascade.using(networks=trainer.ema_networks()).sample(["a"], **kw))
    assert trainer.valid_step(0, _batch(size=8)) > 0


def test_train_step_puts_the_cascade_back_in_training_mode(encoder):
    cascade = tiny_cascade(text_encoder=encoder)
    trainer = Trainer(cascade, lr=1e-3, **FAST_EMA)
    trainer.train_step(0, _batch(size=8))
    trainer.valid_step(0, _batch(size=8), use_ema=False)
    trainer.sample(["a"], seed=0, stop_at_stage=0, disable_progress=True, use_ema=False)
    cascade.eval()  # e.g. a notebook that sampled with the cascade directly
    trainer.train_step(0, _batch(size=8, seed=1))
    assert all(m.training for m in cascade.stages[0].net.modules())
    cascade.stages[1].net.eval()
    trainer.train_step(1, _batch(size=16, seed=2))
    assert all(m.training for s in cascade.stages for m in s.net.modules())
    assert not cascade.text_encoder.model.training  # a frozen encoder stays in eval mode


def test_save_load_resumes_exactly_and_from_checkpoint_samples_identically(encoder, tmp_path):
    path = tmp_path / "ck"
    trainer = Trainer(tiny_cascade(text_encoder=encoder), lr=1e-3, warmup_steps=2, total_steps=10, **FAST_EMA)
    for i in range(2):
        trainer.train_step(0, _batch(seed=i))
        trainer.train_step(1, _batch(seed=i))
    trainer.save(path)
    trainer.train_step(1, _batch(seed=5))
    expected = _params(trainer.cascade)
    expected_ema = _params(trainer.stages[1].ema.ema_model)

    other = Trainer(tiny_cascade(text_encoder=encoder, seed=1), lr=1e-3, warmup_steps=2, total_steps=10, **FAST_EMA)
    other.load(path)
    assert other.steps == [2, 2] and other.run_id == trainer.run_id
    other.train_step(1, _batch(seed=5))
    assert all(torch.equal(a, b) for a, b in zip(expected, _params(other.cascade)))
    assert all(torch.equal(a, b) for a, b in zip(expected_ema, _params(other.stages[1].ema.ema_model)))

    other.save(path)  # the same run may replace its own checkpoint
    loaded = Cascade.from_checkpoint(path)
    a = other.sample(["a red circle"], seed=4, disable_progress=True)
    assert torch.equal(a, loaded.sample(["a red circle"], seed=4, disable_progress=True))
    raw = Cascade.from_checkpoint(path, use_ema=False)
    assert torch.equal(other.sample(["x"], seed=1, use_ema=False, disable_progress=True),
                       raw.sample(["x"], seed=1, disable_progress=True))
    stranger = Trainer(tiny_cascade(text_encoder=encoder))
    with pytest.raises(FileExistsError, match="overwrite"):
        stranger.save(path)


def test_memory_checkpoint_round_trip(encoder):
    trainer = Trainer(tiny_cascade(text_encoder=encoder), **FAST_EMA)
    trainer.train_step(0, _batch(size=8))
    trainer.save("memory://trainer-test/ck")
    again = Trainer(tiny_cascade(text_encoder=encoder, seed=3), **FAST_EMA).load("memory://trainer-test/ck")
    assert all(torch.equal(a, b) for a, b in zip(_params(trainer.cascade), _params(again.cascade)))
    assert ckpt.read_json("memory://trainer-test/ck", "trainer")["steps"] == [1, 0]


def test_loading_another_architecture_is_refused(encoder, tmp_path):
    trainer = Trainer(tiny_cascade(text_encoder=encoder))
    trainer.save(tmp_path / "ck")
    cascade = tiny_cascade(text_embed_dim=None)
    with pytest.raises(ValueError, match="architecture"):
        Trainer(cascade).load(tmp_path / "ck")


def test_jointly_trained_text_encoder_is_trained_saved_and_restored(tmp_path):
    enc = T5TextEncoder.build_tiny(seed=0, max_length=16, trainable=True, **T5_KWARGS)
    trainer = Trainer(tiny_cascade(text_encoder=enc), lr=1e-2, **FAST_EMA)
    before = enc.model.shared.weight.detach().clone()
    for i in range(4):  # the nets' zero-initialised output layers pass no gradient to the text for 2 steps
        trainer.train_step(0, _batch(size=8, seed=i))
    assert not torch.equal(before, enc.model.shared.weight)
    trainer.save(tmp_path / "ck")
    loaded = Cascade.from_checkpoint(tmp_path / "ck", use_ema=False)
    assert torch.equal(loaded.text_encoder.model.shared.weight, enc.model.shared.weight)
    ema = Cascade.from_checkpoint(tmp_path / "ck")
    assert torch.equal(ema.text_encoder.model.shared.weight, trainer.text_ema.ema_model.shared.weight)
    a = trainer.sample(["a red circle"], seed=2, disable_progress=True)
    assert torch.equal(a, ema.sample(["a red circle"], seed=2, disable_progress=True))


def _forward_dtypes(trainer, batch):
    """The dtype of every convolution's output during one training step of stage 0."""
    seen = set()
    convs = [m for m in trainer.cascade.stages[0].net.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype)) for m in convs]
    try:
        assert 0 < trainer.train_step(0, batch) < 10
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_trainers_of_different_precisions_live_in_one_process():
    """The Trainer applies its precision itself (Accelerate's is one setting per process): a bf16 trainer, then
    an fp32 one, then the bf16 one again, each computes in its own precision and keeps float32 weights."""
    batch = {"images": images(4, 16), "text_embeds": torch.randn(4, 3, 32)}
    trainer = Trainer(tiny_cascade(), lr=1e-3, mixed_precision="bf16", **FAST_EMA)
    assert trainer.settings.mixed_precision == "bf16" and trainer.accelerator.mixed_precision == "no"
    assert _forward_dtypes(trainer, batch) == {torch.bfloat16}
    assert 0 < trainer.train_step(1, batch) < 10
    assert all(p.dtype == torch.float32 for p in trainer.cascade.parameters())
    again = Trainer(tiny_cascade(), lr=1e-3)  # a later trainer in the same process may go back to fp32
    assert _forward_dtypes(again, batch) == {torch.float32}
    assert _forward_dtypes(trainer, batch) == {torch.bfloat16}


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused on the CPU only")
def test_fp16_on_the_cpu_is_refused_by_name():
    with pytest.raises(ValueError, match="mixed_precision.*bf16"):
        Trainer(tiny_cascade(), mixed_precision="fp16")


def test_stage_state_holds_each_stage_and_steps_read_from_it(encoder):
    trainer = Trainer(tiny_cascade(text_encoder=encoder), lr=[1e-3, 2e-3], total_steps=7, **FAST_EMA)
    assert [st.lr for st in trainer.stages] == [1e-3, 2e-3] and trainer.horizons == [7, 7]
    trainer.train_step(1, _batch())
    assert trainer.steps == [0, 1] and trainer.stages[1].step == 1
    assert trainer.stages[1].optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * lr_factor(0, 0, 7, 0.1))
    with pytest.raises(AttributeError):
        trainer.steps = [5, 5]  # read-only: the stage states hold the counts


def test_trainers_ema_text_encoder_encodes_through_the_encoders_own_method():
    enc = T5TextEncoder.build_tiny(seed=0, max_length=16, trainable=True, **T5_KWARGS)
    trainer = Trainer(tiny_cascade(text_encoder=enc), lr=1e-2, **FAST_EMA)
    for i in range(4):
        trainer.train_step(0, _batch(size=8, seed=i))
    ema_model = trainer.text_ema.ema_model
    ema_model.train()
    embeds, mask = trainer._ema_text_encoder()(["a red circle"])
    assert ema_model.training  # its mode is put back
    with torch.no_grad():
        ema_model.eval()
        ids, want_mask = enc.tokenize(["a red circle"])
        want = ema_model(input_ids=ids, attention_mask=want_mask.long()).last_hidden_state * want_mask.unsqueeze(-1)
    assert torch.equal(mask, want_mask) and torch.equal(embeds, want)
    assert not torch.equal(embeds, enc.encode(["a red circle"])[0])  # the EMA copy, not the trained weights
