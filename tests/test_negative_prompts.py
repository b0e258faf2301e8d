"""Negative prompts: classifier-free guidance's unconditional rows see the negative text instead of the null text
(zero embeddings, all-False mask). References: the null text given as a negative prompt reproduces plain CFG
bit for bit at every stage with every sampler; the guided prediction equals ``cond + (s - 1) (cond - neg)``
computed from two separate passes of the net; at scale 1 a negative prompt has no effect."""

import pytest
import torch
from tiny_cascade import T5_KWARGS, TEXT_DIM, tiny_cascade

from imagen_lib.cascade import NegativePrompt, SamplerSettings
from imagen_lib.diffusion.samplers import SAMPLERS
from imagen_lib.text import T5TextEncoder

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def encoder():
    return T5TextEncoder.build_tiny(seed=0, max_length=16, **T5_KWARGS)


def randomised(cascade, seed: int = 0):
    """The cascade with every weight perturbed (fresh nets zero their output layers, so text would not matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cascade.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return cascade.eval()


@pytest.fixture(scope="module")
def cascade(encoder):
    return randomised(tiny_cascade(text_encoder=encoder))


def null_text(rows: int, tokens: int = 16) -> NegativePrompt:
    return NegativePrompt(torch.zeros(rows, tokens, TEXT_DIM), torch.zeros(rows, tokens, dtype=torch.bool))


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_the_null_text_as_negative_prompt_reproduces_plain_guidance(cascade, sampler):
    plain = cascade.sample(PROMPTS, seed=3, sampler=sampler, cond_scale=4.0, disable_progress=True)
    for negative in (null_text(1), null_text(2)):
        same = cascade.sample(PROMPTS, seed=3, sampler=sampler, cond_scale=4.0, negative_prompt=negative,
                              disable_progress=True)
        assert torch.equal(plain, same)


def test_a_negative_prompt_changes_the_images_at_every_stage_and_not_at_scale_one(cascade):
    kwargs = {"seed": 3, "cond_scale": 4.0, "disable_progress": True}
    plain, steered = (cascade.sample(PROMPTS, negative_prompt=n, **kwargs) for n in (None, "a green triangle"))
    assert (plain - steered).abs().mean() > 1e-3
    # the super-resolution stage alone also uses it: same base images, then the negative only at stage 1
    only_sr = cascade.sample(PROMPTS, negative_prompt="a green triangle", stage_overrides={0: {"cond_scale": 1.0}},
                             **{**kwargs, "cond_scale": 4.0})
    base_unguided = cascade.sample(PROMPTS, stage_overrides={0: {"cond_scale": 1.0}}, **kwargs)
    assert (only_sr - base_unguided).abs().mean() > 1e-4
    kwargs["cond_scale"] = 1.0
    assert torch.equal(cascade.sample(PROMPTS, **kwargs),
                       cascade.sample(PROMPTS, negative_prompt="a green triangle", **kwargs))


def test_the_guided_prediction_equals_the_formula_on_two_separate_passes(cascade, encoder):
    embeds, mask = encoder.encode(PROMPTS)
    neg_embeds, neg_mask = encoder.encode(["blurry", "a circle"])
    settings = SamplerSettings(cond_scale=5.0, threshold="none")
    kwargs = {"text_embeds": embeds, "text_mask": mask, "negative": (neg_embeds, neg_mask)}
    guided = cascade._denoiser(0, cascade.stages[0].net, settings, kwargs)
    x, sigma = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([2.0, 0.5])
    diffusion, net = cascade.stages[0].diffusion, cascade.stages[0].net
    with torch.no_grad():
        cond = diffusion.denoiser(net, text_embeds=embeds, text_mask=mask)(x, sigma)
        neg = diffusion.denoiser(net, text_embeds=neg_embeds, text_mask=neg_mask)(x, sigma)
        torch.testing.assert_close(guided(x, sigma), cond + 4.0 * (cond - neg), atol=1e-5, rtol=1e-5)
    assert (cond - neg).abs().mean() > 1e-3  # the negative text does reach the net


def test_one_string_a_list_and_embeddings_are_the_same_negative_prompt(cascade, encoder):
    kwargs = {"seed": 5, "cond_scale": 3.0, "num_images_per_prompt": 2, "disable_progress": True}
    one = cascade.sample(PROMPTS, negative_prompt="a green triangle", **kwargs)
    listed = cascade.sample(PROMPTS, negative_prompt=["a green triangle"] * 2, **kwargs)
    embeds, mask = encoder.encode(["a green triangle"])
    given = cascade.sample(PROMPTS, negative_prompt=NegativePrompt(embeds, mask), **kwargs)
    assert torch.equal(one, listed) and torch.equal(one, given)
    other = cascade.sample(PROMPTS, negative_prompt=["a green triangle", "a red circle"], **kwargs)
    assert torch.equal(other[:2], one[:2]) and not torch.equal(other[2:], one[2:])


def test_a_negative_prompt_of_another_length_is_padded(cascade, encoder):
    embeds, mask = encoder.encode(["blur"])
    short = int(mask.sum())
    kwargs = {"seed": 2, "cond_scale": 3.0, "stop_at_stage": 0, "disable_progress": True}
    full = cascade.sample(PROMPTS, negative_prompt=NegativePrompt(embeds, mask), **kwargs)
    cut = cascade.sample(PROMPTS, negative_prompt=NegativePrompt(embeds[:, :short], mask[:, :short]), **kwargs)
    torch.testing.assert_close(full, cut, atol=1e-5, rtol=0)
    longer = NegativePrompt(torch.cat([embeds, torch.zeros(1, 4, TEXT_DIM)], 1), torch.cat(
        [mask, torch.zeros(1, 4, dtype=torch.bool)], 1))
    torch.testing.assert_close(full, cascade.sample(PROMPTS, negative_prompt=longer, **kwargs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("negative, error, message", [
    (["a", "b", "c"], ValueError, r"^negative_prompt: expected one string for all prompts or a list of 2"),
    (["a"], ValueError, r"^negative_prompt: expected one string .* got a list of 1"),
    ([1, "b"], TypeError, r"(?s)^negative_prompt: .*not instance of str"),
    (3, TypeError, r"^negative_prompt: "),
    (b"bytes", TypeError, r"^negative_prompt: "),
    (NegativePrompt(torch.zeros(3, 4, TEXT_DIM)), ValueError, r"^negative_prompt: expected text_embeds with 1 row"),
    (NegativePrompt(torch.zeros(1, 4, TEXT_DIM + 1)), ValueError, r"^negative_prompt: text_embeds: expected"),
])
def test_bad_negative_prompts_are_named(cascade, negative, error, message):
    with pytest.raises(error, match=message):
        cascade.sample(PROMPTS, negative_prompt=negative, disable_progress=True)


def test_bad_negative_embeddings_are_named_when_built():
    with pytest.raises(ValueError, match=r"^text_mask: expected shape \(1, 4\)"):
        NegativePrompt(torch.zeros(1, 4, TEXT_DIM), torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"^text_mask: expected a bool tensor"):
        NegativePrompt(torch.zeros(1, 4, TEXT_DIM), torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"^text_embeds: "):
        NegativePrompt(torch.full((1, 4, TEXT_DIM), float("nan")))


def test_an_unconditional_cascade_refuses_a_negative_prompt():
    cascade = tiny_cascade(text_embed_dim=None)
    with pytest.raises(ValueError, match=r"^negative_prompt: this cascade is unconditional"):
        cascade.sample(negative_prompt="x", disable_progress=True)


def test_a_text_negative_prompt_without_an_encoder_points_to_embeddings(encoder):
    cascade = tiny_cascade(text_encoder=None)
    embeds, mask = encoder.encode(PROMPTS)
    with pytest.raises(ValueError, match=r"^negative_prompt: texts: this cascade has no text encoder.*NegativePrompt"):
        cascade.sample(text_embeds=embeds, text_mask=mask, negative_prompt="blurry", disable_progress=True)
    neg, neg_mask = encoder.encode(["blurry"])
    out = cascade.sample(text_embeds=embeds, text_mask=mask, negative_prompt=NegativePrompt(neg, neg_mask),
                         stop_at_stage=0, steps=2, disable_progress=True)
    assert out.shape == (2, 3, 8, 8)
