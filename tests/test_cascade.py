"""Cascade: training losses per stage, sampling (texts or embeddings, seeds, stages, inpainting, guidance),
views with other modules, processes of a user's own, configuration and checkpoints, on a tiny 8 -> 16 px
cascade."""

import copy
import math

import pytest
import torch
from tiny_cascade import T5_KWARGS, TEXT_DIM, images, tiny_cascade

from imagen_lib.cascade import Cascade, Inpainting, SamplerSettings, Stage, StartImages, random_crops, resize
from imagen_lib.diffusion import ElucidatedDiffusion
from imagen_lib.diffusion.noise import rand, randn
from imagen_lib.diffusion.schedules import initial_noise, karras_sigmas
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
        # the network protocol's members, the wrapped net's
        self.config, self.channels, self.lowres_cond = net.config, net.channels, net.lowres_cond
        self.text_embed_dim = net.text_embed_dim

    def forward(self, x, noise_cond, **kwargs):
        self.calls += 1
        self.batches.append(x.shape[0])
        self.kwargs = kwargs
        return self.net(x, noise_cond, **kwargs)


class LogUniformVE:
    """A diffusion process of a user's own, in no table: VE noise at log-uniform training levels, the net
    predicting x0 from the unit-variance input."""

    default_sampler, default_steps = "euler", 3

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 10.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    @property
    def config(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def denoiser(self, net, **net_kwargs):
        def denoise(x, sigma):
            return net(x * (1 + sigma**2).rsqrt().view(-1, 1, 1, 1), sigma.log() / 4, **net_kwargs)
        return denoise

    def loss(self, net, x0, *, generator=None, **net_kwargs):
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        sigma = (lo + (hi - lo) * rand((x0.shape[0],), generator, x0.device)).exp()
        x = x0 + sigma.view(-1, 1, 1, 1) * randn(x0.shape, generator, x0.device)
        return ((self.denoiser(net, **net_kwargs)(x, sigma) - x0) ** 2).mean()

    def sigmas(self, steps=None, device=None):
        return karras_sigmas(steps or self.default_steps, self.sigma_min, self.sigma_max, device=device)

    def initial_noise(self, shape, sigmas, generator=None, device=None, dtype=torch.float32):
        return initial_noise(shape, sigmas, generator, device=device, dtype=dtype)


class LowNoiseEDM(ElucidatedDiffusion):
    """A subclass of a library process, as a user writes one to change a default."""

    def __init__(self, **config):
        super().__init__(**{"P_mean": -1.6, **config})


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
    assert corners == {6 * top + left for top in range(3) for left in range(3)}  # every window that fits, none beyond
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
    view = cascade.using(networks=[rec, cascade.stages[1].net])
    view.sample(["a"], seed=0, stop_at_stage=0, cond_scale=1.0, sampler="euler", steps=3, disable_progress=True)
    assert rec.batches == [1, 1, 1]
    rec.batches.clear()
    view.sample(["a"], seed=0, stop_at_stage=0, cond_scale=4.0, sampler="euler", steps=3, disable_progress=True)
    assert rec.batches == [2, 2, 2]


def test_per_stage_overrides(cascade):
    recs = [Recorder(s.net) for s in cascade.stages]
    cascade.using(networks=recs).sample(["a"], seed=0, sampler="euler", steps=4, stage_overrides={1: {"steps": 2}},
                                        disable_progress=True)
    assert [r.calls for r in recs] == [4, 2]
    with pytest.raises(ValueError, match="unknown field"):
        cascade.sample(["a"], stage_overrides={0: {"stepz": 2}}, disable_progress=True)
    with pytest.raises(TypeError, match="stepz"):  # call-wide settings are SamplerSettings fields too
        cascade.sample(["a"], stepz=2, disable_progress=True)


def test_start_at_a_super_resolution_stage(cascade):
    low = torch.rand(2, 3, 8, 8)
    out = cascade.sample(["a", "b"], seed=0, start=StartImages(low, stage=1), disable_progress=True)
    assert out.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="images"):
        cascade.sample(["a"], start=StartImages(None, stage=1), disable_progress=True)
    with pytest.raises(ValueError, match="stage"):
        StartImages(low, stage=0)


def test_inpainting_keeps_the_known_pixels(cascade):
    known = torch.rand(1, 3, 16, 16)
    keep = torch.zeros(16, 16, dtype=torch.bool)
    keep[:, :8] = True
    out = cascade.sample(["a"], seed=0, inpaint=Inpainting(known, keep), disable_progress=True)
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


def test_network_kind_comes_from_the_config_not_the_module_class():
    # FSDP's fully_shard swaps a module's class for a subclass named FSDP<Name>; the recorded kind stays the
    # network the config builds, so a checkpoint written under FSDP rebuilds a plain network
    cascade = tiny_cascade()
    before = cascade.config
    for stage in cascade.stages:
        cls = type(stage.net)
        stage.net.__class__ = type(f"FSDP{cls.__name__}", (cls,), {})
    assert cascade.config == before
    assert [s["network"]["kind"] for s in before["stages"]] == [type(s.net).__mro__[1].__name__
                                                                for s in cascade.stages]
    assert Cascade.from_config(cascade.config).config == before


def test_a_process_of_your_own_and_a_subclass_train_and_sample(encoder):
    base = tiny_cascade(text_encoder=encoder)
    own, sub = LogUniformVE(), LowNoiseEDM()
    cascade = Cascade([Stage(base.stages[0].net, own, 8), Stage(base.stages[1].net, sub, 16)], text_encoder=encoder)
    for k in range(2):
        loss = cascade(images(2, 16), texts=["a", "b"], stage=k)
        loss.backward()
        assert loss.ndim == 0 and torch.isfinite(loss)
    rec = Recorder(cascade.stages[0].net)
    out = cascade.using(networks=[rec, cascade.stages[1].net]).sample(["a red circle"], seed=0, steps=2,
                                                                     disable_progress=True)
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    assert rec.batches == [2, 2]  # own.default_sampler "euler": one guided (doubled) call per step
    kinds = [s["diffusion"] for s in cascade.config["stages"]]
    assert kinds == [{"kind": "LogUniformVE", "config": own.config},
                     {"kind": "LowNoiseEDM", "config": {**ElucidatedDiffusion().config, "P_mean": -1.6}}]


def test_parts_missing_a_protocol_member_are_refused_by_name(cascade):
    net, process = cascade.stages[0].net, cascade.stages[0].diffusion
    no_denoiser = type("NoDenoiser", (), {k: v for k, v in vars(LogUniformVE).items() if k != "denoiser"})
    with pytest.raises(TypeError, match="diffusion: .*NoDenoiser lacks denoiser"):
        Stage(net, no_denoiser(), 8)

    class NoLowresCond(torch.nn.Module):
        config, channels, text_embed_dim = {}, 3, TEXT_DIM

        def forward(self, x, noise_cond, **kwargs):
            return x

    with pytest.raises(TypeError, match="net: .*lacks lowres_cond"):
        Stage(NoLowresCond(), process, 8)
    with pytest.raises(TypeError, match="text_encoder: .*lacks embed_dim, trainable, config, save_pretrained"):
        Cascade(cascade.stages, text_encoder=lambda texts: None)
    with pytest.raises(ValueError, match="default_sampler 'plms'"):
        Stage(net, ElucidatedDiffusion(default_sampler="plms"), 8)


def test_using_samples_with_the_given_networks_and_leaves_the_original_untouched(cascade, encoder):
    before = cascade.sample(["a red circle"], seed=2, disable_progress=True)
    others = [copy.deepcopy(s.net) for s in cascade.stages]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (p for net in others for p in net.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    view = cascade.using(networks=others)
    assert [s.net for s in view.stages] == others and view.stages[1].diffusion is cascade.stages[1].diffusion
    assert view.config == cascade.config
    out = view.sample(["a red circle"], seed=2, disable_progress=True)
    assert not torch.allclose(out, before)
    stages = [Stage(n, s.diffusion, s.image_size, s.sampler, s.lowres_aug) for n, s in zip(others, cascade.stages)]
    assert torch.equal(out, Cascade(stages, text_encoder=encoder).sample(["a red circle"], seed=2,
                                                                         disable_progress=True))
    assert all(s.net is net and net is not other for s, net, other in zip(cascade.stages, cascade.nets, others))
    assert torch.equal(cascade.sample(["a red circle"], seed=2, disable_progress=True), before)
    seen = []

    def encode(texts):  # any callable encodes prompts in a view
        seen.append(list(texts))
        return encoder(texts)

    assert torch.equal(cascade.using(text_encoder=encode).sample(["a red circle"], seed=2, disable_progress=True),
                       before)
    assert seen == [["a red circle"]] and cascade.text_encoder is encoder
    with pytest.raises(ValueError, match="networks: expected 2"):
        cascade.using(networks=others[:1])
    with pytest.raises(ValueError, match=r"networks\[0\]"):
        cascade.using(networks=others[::-1])
