"""Cascade: training losses per stage, sampling (texts or embeddings, seeds, stages, inpainting, guidance),
configuration and checkpoints, on a tiny 8 -> 16 px cascade."""

import pytest
import torch
from tiny_cascade import T5_KWARGS, TEXT_DIM, images, tiny_cascade

from imagen_lib.cascade import Cascade, SamplerSettings, Stage, random_crops, resize
from imagen_lib.diffusion import ElucidatedDiffusion
from imagen_lib.text import T5TextEncoder


@pytest.fixture(scope="module")
def encoder():
    return T5TextEncoder.build_tiny(seed=0, max_length=16, **T5_KWARGS)


@pytest.fixture
def cascade(encoder):
    return tiny_cascade(text_encoder=encoder)


class Recorder(torch.nn.Module):
    """Wraps a net, counting calls and keeping the keyword arguments of the last one."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls, self.batches, self.kwargs = net, 0, [], {}

    def forward(self, x, noise_cond, **kwargs):
        self.calls += 1
        self.batches.append(x.shape[0])
        self.kwargs = kwargs
        return self.net(x, noise_cond, **kwargs)


def test_each_stage_loss_trains_only_that_stage(cascade):
    x = images(4, 16)
    for k in range(2):
        cascade.zero_grad()
        loss = cascade(x, texts=["a", "b", "c", "d"], stage=k)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        grads = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.net.parameters()) for s in cascade.stages]
        assert grads == [k == 0, k == 1]


def test_super_resolution_input_is_the_image_down_then_up(cascade):
    stage = cascade.stages[1]
    seen = {}

    def no_noise(low, level, generator):  # stands in for the augmentation to see its input exactly
        seen["level"] = level
        return low, torch.full((low.shape[0],), 7.0)

    stage.lowres_aug = no_noise
    rec = Recorder(stage.net)
    x = images(2, 16)
    cascade(x, texts=["a", "b"], stage=1, net=rec)
    torch.testing.assert_close(rec.kwargs["lowres_img"], resize(resize(x, 8), 16))
    assert not torch.allclose(rec.kwargs["lowres_img"], x, atol=1e-3)  # the detail above 8 px is gone
    assert seen["level"] is None  # random training levels
    assert rec.kwargs["lowres_noise_cond"].tolist() == [7.0, 7.0]


def test_random_crops_cut_the_same_window_from_each_tensor():
    a = torch.arange(3 * 2 * 6 * 6, dtype=torch.float64).reshape(3, 2, 6, 6)
    b = -a[:, :1]
    g = torch.Generator().manual_seed(0)
    ca, cb = random_crops([a, b], 4, g)
    assert ca.shape == (3, 2, 4, 4) and cb.shape == (3, 1, 4, 4)
    g = torch.Generator().manual_seed(0)  # the offsets, drawn as random_crops draws them
    tops = (torch.rand((3,), generator=g) * 3).long()
    lefts = (torch.rand((3,), generator=g) * 3).long()
    for row, (top, left) in enumerate(zip(tops.tolist(), lefts.tolist())):
        assert torch.equal(ca[row], a[row, :, top:top + 4, left:left + 4])
        assert torch.equal(cb[row], b[row, :, top:top + 4, left:left + 4])
    many = random_crops([a.repeat(100, 1, 1, 1)], 4, torch.Generator().manual_seed(1))[0]
    corners = {(int(c[0, 0, 0]) % 36) for c in many}  # top-left pixel index within its 6 x 6 image
    assert corners == {6 * t + l for t in range(3) for l in range(3)}  # every window that fits, none beyond
    assert torch.equal(random_crops([a], 6)[0], a)


def test_super_resolution_trains_on_crops_and_samples_whole_images(cascade):
    stage = cascade.stages[1]
    stage.random_crop_size = 8
    seen = {}

    def no_noise(low, level, generator):
        seen["low"] = low
        return low, torch.zeros(low.shape[0])

    stage.lowres_aug, augmentation = no_noise, stage.lowres_aug
    rec = Recorder(stage.net)
    x = images(2, 16)
    loss = cascade(x, texts=["a", "b"], stage=1, net=rec)
    stage.lowres_aug = augmentation
    assert torch.isfinite(loss) and rec.batches == [2]
    low = seen["low"]
    assert low.shape == (2, 3, 8, 8)
    full_low = resize(resize(x, 8), 16)
    for row in range(2):  # each crop is a window of that row's own down-then-up image
        windows = full_low[row].unfold(1, 8, 1).unfold(2, 8, 1)  # (C, 9, 9, 8, 8)
        assert any(torch.equal(windows[:, i, j], low[row]) for i in range(9) for j in range(9))
    out = cascade.sample(["a red circle"], seed=0, disable_progress=True)
    assert out.shape == (1, 3, 16, 16)
    rebuilt = Cascade.from_config(cascade.config, text_encoder=cascade.text_encoder)
    assert rebuilt.stages[1].random_crop_size == 8
    with pytest.raises(ValueError, match="random_crop_size"):
        Stage(stage.net, stage.diffusion, 16, random_crop_size=32)


def test_text_dropout_in_training_only(encoder):
    cascade = Cascade(tiny_cascade(text_encoder=encoder).stages, text_encoder=encoder, cond_drop_prob=0.5)
    rec = Recorder(cascade.stages[0].net)
    texts = ["a red circle"] * 64
    cascade.train()
    cascade(images(64, 8), texts=texts, stage=0, net=rec)
    dropped = ~rec.kwargs["text_mask"].any(1)
    assert 10 < dropped.sum() < 54
    assert torch.all(rec.kwargs["text_embeds"][dropped] == 0)
    cascade.eval()
    cascade(images(64, 8), texts=texts, stage=0, net=rec)
    assert rec.kwargs["text_mask"].any(1).all()


def test_sample_shapes_range_and_pil(cascade):
    out = cascade.sample(["a red circle", "a blue square"], num_images_per_prompt=2, seed=0, disable_progress=True)
    assert out.shape == (4, 3, 16, 16) and out.min() >= 0 and out.max() <= 1
    pils = cascade.sample(["x"], seed=0, return_pil=True, disable_progress=True)
    assert len(pils) == 1 and pils[0].size == (16, 16)
    assert cascade.sample(["x"], seed=0, stop_at_stage=0, disable_progress=True).shape == (1, 3, 8, 8)


def test_an_image_does_not_depend_on_its_batch(cascade):
    both = cascade.sample(["a red circle", "a blue square"], num_images_per_prompt=2, seed=7, disable_progress=True)
    alone = cascade.sample(["a blue square"], num_images_per_prompt=2, seed=9, disable_progress=True)
    torch.testing.assert_close(both[2:], alone, atol=1e-5, rtol=0)
    again = cascade.sample(["a red circle", "a blue square"], num_images_per_prompt=2, seed=7, disable_progress=True)
    assert torch.equal(both, again)
    other = cascade.sample(["a red circle", "a blue square"], num_images_per_prompt=2, seed=8, disable_progress=True)
    assert not torch.allclose(both, other)


def test_texts_and_precomputed_embeddings_give_the_same_images(cascade, encoder):
    texts = ["a red circle", "a big green triangle"]
    embeds, mask = encoder.encode(texts)
    a = cascade.sample(texts, seed=1, disable_progress=True)
    b = cascade.sample(text_embeds=embeds, text_mask=mask, seed=1, disable_progress=True)
    assert torch.equal(a, b)
    without_encoder = tiny_cascade(text_encoder=None)
    without_encoder.load_state_dict(cascade.state_dict(), strict=False)
    c = without_encoder.sample(text_embeds=embeds, text_mask=mask, seed=1, disable_progress=True)
    assert torch.equal(a, c)
    with pytest.raises(ValueError, match="no text encoder"):
        without_encoder.sample(texts)


def test_guidance_doubles_the_batch_and_scale_one_does_not(cascade):
    rec = Recorder(cascade.stages[0].net)
    nets = [rec, cascade.stages[1].net]
    cascade.sample(["a"], seed=0, stop_at_stage=0, networks=nets, cond_scale=1.0, sampler="euler", steps=3,
                   disable_progress=True)
    assert rec.batches == [1, 1, 1]
    rec.batches.clear()
    cascade.sample(["a"], seed=0, stop_at_stage=0, networks=nets, cond_scale=4.0, sampler="euler", steps=3,
                   disable_progress=True)
    assert rec.batches == [2, 2, 2]


def test_per_stage_overrides(cascade):
    recs = [Recorder(s.net) for s in cascade.stages]
    cascade.sample(["a"], seed=0, networks=recs, sampler="euler", steps=4, stage_overrides={1: {"steps": 2}},
                   disable_progress=True)
    assert [r.calls for r in recs] == [4, 2]
    with pytest.raises(ValueError, match="unknown field"):
        cascade.sample(["a"], stage_overrides={0: {"stepz": 2}}, disable_progress=True)


def test_start_at_a_super_resolution_stage(cascade):
    low = torch.rand(2, 3, 8, 8)
    out = cascade.sample(["a", "b"], seed=0, start_at_stage=1, start_images=low, disable_progress=True)
    assert out.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="start_images"):
        cascade.sample(["a"], start_at_stage=1, disable_progress=True)


def test_inpainting_keeps_the_known_pixels(cascade):
    known = torch.rand(1, 3, 16, 16)
    keep = torch.zeros(16, 16, dtype=torch.bool)
    keep[:, :8] = True
    out = cascade.sample(["a"], seed=0, inpaint_images=known, inpaint_masks=keep, disable_progress=True)
    torch.testing.assert_close(out[..., :8], known[..., :8], atol=1e-5, rtol=0)
    assert not torch.allclose(out[..., 8:], known[..., 8:], atol=1e-2)


def test_unconditional_cascade():
    cascade = tiny_cascade(text_embed_dim=None)
    assert cascade.text_embed_dim is None
    loss = cascade(images(2, 16), stage=1)
    assert torch.isfinite(loss)
    out = cascade.sample(num_images_per_prompt=3, seed=0, disable_progress=True)
    assert out.shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match="unconditional"):
        cascade.sample(["a"], disable_progress=True)


def test_bad_inputs_name_the_argument(cascade):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        cascade(images(2, 16) * 200, texts=["a", "b"], stage=0)
    with pytest.raises(ValueError, match="texts"):
        cascade(images(2, 16), stage=0)
    with pytest.raises(ValueError, match="stage"):
        cascade(images(2, 16), texts=["a", "b"], stage=5)
    with pytest.raises(ValueError, match="text_embeds"):
        cascade(images(2, 16), text_embeds=torch.zeros(2, 4, TEXT_DIM + 1), stage=0)
    with pytest.raises(ValueError, match="sampler"):
        SamplerSettings(sampler="nope")
    with pytest.raises(ValueError, match="lowres_cond"):
        Cascade([cascade.stages[0], Stage(cascade.stages[0].net, ElucidatedDiffusion(), 16)])


def test_config_round_trip_and_checkpoint_gives_identical_samples(cascade):
    rebuilt = Cascade.from_config(cascade.config, text_encoder=cascade.text_encoder)
    assert rebuilt.config == cascade.config
    cascade.save("memory://cascade-test/ck")
    loaded = Cascade.from_checkpoint("memory://cascade-test/ck")
    assert loaded.config == cascade.config
    a = cascade.sample(["a red circle"], seed=3, disable_progress=True)
    b = loaded.sample(["a red circle"], seed=3, disable_progress=True)
    assert torch.equal(a, b)
    with pytest.raises(FileExistsError):
        cascade.save("memory://cascade-test/ck")
