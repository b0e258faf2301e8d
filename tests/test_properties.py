"""Property-based tests (hypothesis): random shapes, dtypes and values (NaN, Inf, huge, negative, wrong rank,
empty, ints, strings) thrown at the public entry points. A valid input must succeed; any other must fail with a
ValueError or TypeError (never an IndexError, a RuntimeError from deep inside torch, or silence)."""

from __future__ import annotations

import copy
import math
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tiny_cascade import TEXT_DIM, tiny_cascade, tiny_config

from imagen_lib.cascade import Inpainting, SamplerSettings, StartImages
from imagen_lib.config import build_cascade, parse_config

# few examples, no deadline (a loaded CI machine), the same examples on every run (derandomize: a failure
# reproduces), nothing written to disk
FAST = settings(max_examples=25, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
USER_ERRORS = (ValueError, TypeError)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool]
FILLS = ["inside", "nan", "inf", "-inf", "huge", "negative", "255"]


def _encoder(texts):
    embeds = torch.zeros(len(texts), 3, TEXT_DIM)
    embeds[:, 0] = 0.5
    return embeds, embeds.abs().amax(-1) > 0


@pytest.fixture(scope="module")
def cascade():
    return tiny_cascade().using(text_encoder=_encoder)


@st.composite
def tensors(draw, low: float, high: float, ranks=(0, 1, 2, 3, 4, 5), channels: Optional[int] = 3, valid_rank=4):
    """A tensor of random rank, shape (empty dims included), dtype and fill; and whether it is a valid
    (B, ``channels``, H, W) float image batch in [low, high] (``channels`` None: any number). Half of the
    draws aim at a valid batch, so that both outcomes are exercised."""
    aim_valid = draw(st.booleans())
    rank = valid_rank if aim_valid else draw(st.sampled_from(ranks))
    shape = [draw(st.sampled_from([1, 2, 5] if aim_valid else [0, 1, 2, 5])) for _ in range(rank)]
    if rank == 4:
        shape[1] = channels if aim_valid and channels else draw(st.sampled_from([1, 3, 4]))
    dtype = draw(st.sampled_from(DTYPES[:3] if aim_valid else DTYPES))
    fill = "inside" if aim_valid else draw(st.sampled_from(FILLS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    values = low + (high - low) * torch.rand(shape, generator=g, dtype=torch.float64)
    if values.numel() and fill != "inside":
        bad = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "huge": 1e30, "negative": low - 3, "255": 255.0}
        values.view(-1)[draw(st.integers(0, values.numel() - 1))] = bad[fill]
    tensor = values.to(dtype) if dtype.is_floating_point else values.clamp(0, 255).nan_to_num(0).to(dtype)
    valid = (rank == 4 and 0 not in shape and shape[1] == (channels or shape[1]) and dtype.is_floating_point
             and bool(torch.isfinite(tensor).all()) and low - 0.01 <= float(tensor.min()) <= float(tensor.max())
             <= high + 0.01)
    return tensor, valid


ODD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                       st.text(max_size=3), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2),
                                                                                                 st.integers(),
                                                                                                 max_size=1))


def _outcome(call, valid: bool):
    """``call()`` succeeds when the input is valid and raises only ValueError/TypeError when it is not."""
    event("valid" if valid else "invalid")
    if valid:
        return call()
    with pytest.raises(USER_ERRORS):
        call()
    return None


@FAST
@given(batch=tensors(-1.0, 1.0), stage=st.one_of(st.sampled_from([0, 1, -1]), st.sampled_from([2, "0", 1.0, None])))
def test_forward_accepts_valid_batches_and_refuses_the_rest(cascade, batch, stage):
    images, valid = batch
    valid = valid and stage in (0, 1, -1) and not isinstance(stage, float)
    texts = ["a"] * (images.shape[0] if images.ndim else 1)
    loss = _outcome(lambda: cascade(images, texts=texts, stage=stage), valid)
    assert loss is None or bool(torch.isfinite(loss))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# every argument of a sampling call: values it accepts, then values it refuses (of the right and the wrong kind)
SAMPLE_ARGUMENTS = {
    "cond_scale": (st.one_of(st.none(), st.floats(-5, 10), st.integers(-5, 10)),
                   st.one_of(st.sampled_from([math.nan, math.inf, -math.inf]), st.text(max_size=2))),
    "seed": (st.one_of(st.none(), st.integers(0, 2**63 - 4)),
             st.one_of(st.integers(-2**70, -1), st.integers(2**63 - 1, 2**70), st.floats(0, 9), st.text(max_size=2))),
    "num_images_per_prompt": (st.integers(1, 2), st.one_of(st.integers(-2, 0), st.floats(0, 2), st.text(max_size=1))),
    "stop_at_stage": (st.one_of(st.none(), st.integers(-2, 1)), st.one_of(st.integers(2, 9), st.integers(-9, -3),
                                                                           st.text(max_size=1))),
    "steps": (st.one_of(st.none(), st.integers(1, 2), st.just(2.0)), st.sampled_from([0, -1, 0.5, math.nan, "2"])),
}


@st.composite
def sample_arguments(draw) -> dict:
    """Valid values for every argument, then (in most draws) one or two of them replaced by refused ones."""
    arguments = {name: draw(good) for name, (good, _) in SAMPLE_ARGUMENTS.items()}
    for name in draw(st.lists(st.sampled_from(sorted(SAMPLE_ARGUMENTS)), max_size=2)):
        arguments[name] = draw(SAMPLE_ARGUMENTS[name][1])
    return arguments


@FAST
@given(arguments=sample_arguments())
def test_sample_accepts_valid_arguments_and_refuses_the_rest(cascade, arguments):
    cond_scale, seed, steps = arguments["cond_scale"], arguments["seed"], arguments["steps"]
    per_prompt, stop = arguments["num_images_per_prompt"], arguments["stop_at_stage"]
    count = 2 * per_prompt if _is_int(per_prompt) else 0
    valid = _is_int(per_prompt) and per_prompt >= 1
    valid &= cond_scale is None or (_is_number(cond_scale) and math.isfinite(cond_scale))
    valid &= seed is None or (_is_int(seed) and 0 <= seed <= 2**63 - count)
    valid &= stop is None or (_is_int(stop) and -2 <= stop <= 1)
    valid &= steps is None or (_is_number(steps) and steps >= 1 and steps == int(steps))
    images = _outcome(lambda: cascade.sample(["a", "b"], disable_progress=True, **arguments), valid)
    assert images is None or (images.shape[0] == count and bool(torch.isfinite(images).all()))


@FAST
@given(embeds=st.one_of(tensors(-3.0, 3.0, ranks=(0, 2, 3, 4), valid_rank=3),
                        st.builds(lambda v: (v, False), ODD_VALUES)),
       mask_kind=st.one_of(st.sampled_from(["none", "bool"]), st.sampled_from(["long", "float", "wrong shape"])))
def test_sample_from_embeddings_checks_them(cascade, embeds, mask_kind):
    embeds, _ = embeds
    is_tensor = isinstance(embeds, torch.Tensor)
    if is_tensor and embeds.ndim == 3 and embeds.shape[-1] > 0:  # the nets' width, so the shape can be right
        embeds = embeds[..., :1].expand(*embeds.shape[:2], TEXT_DIM).contiguous()
    valid = (is_tensor and embeds.ndim == 3 and embeds.shape[-1] == TEXT_DIM and embeds.is_floating_point()
             and 0 not in embeds.shape and bool(torch.isfinite(embeds).all()))
    mask = None
    if mask_kind != "none" and is_tensor and embeds.ndim >= 2:
        shape = embeds.shape[:2] if mask_kind != "wrong shape" else (embeds.shape[0], embeds.shape[1] + 1)
        mask = torch.ones(shape, dtype={"long": torch.long, "float": torch.float32}.get(mask_kind, torch.bool))
        valid &= mask_kind == "bool"
    _outcome(lambda: cascade.sample(text_embeds=embeds, text_mask=mask, seed=0, steps=1, stop_at_stage=0,
                                    disable_progress=True), valid)


@FAST
@given(batch=tensors(0.0, 1.0, channels=None), stage=st.one_of(st.integers(1, 3), st.one_of(st.integers(-1, 0),
                                                                                             ODD_VALUES)))
def test_start_images_accept_valid_images_and_refuse_the_rest(batch, stage):
    images, valid = batch
    valid = valid and isinstance(stage, int) and not isinstance(stage, bool) and stage >= 1
    start = _outcome(lambda: StartImages(images, stage=stage), valid)
    assert start is None or start.images is images


@FAST
@given(batch=tensors(0.0, 1.0, channels=None), good_mask=st.booleans(), mask_rank=st.sampled_from([2, 3, 4, 0, 1, 5]),
       mask_dtype=st.sampled_from(DTYPES), mask_channels=st.sampled_from([1, 2, 3]))
def test_inpainting_accepts_valid_masks_and_refuses_the_rest(batch, good_mask, mask_rank, mask_dtype, mask_channels):
    images, valid = batch
    if good_mask:
        mask_rank, mask_dtype, mask_channels = min(max(mask_rank, 2), 4), torch.bool, 1
    shape = [2, mask_channels, 4, 4][4 - mask_rank:] if mask_rank <= 4 else [1, 2, 1, 4, 4]
    masks = torch.ones(shape).to(mask_dtype)
    valid = (valid and mask_dtype == torch.bool and 2 <= mask_rank <= 4
             and (mask_rank < 4 or mask_channels in (1, images.shape[1])))
    _outcome(lambda: Inpainting(images, masks), valid)


@FAST
@given(field=st.sampled_from(["sampler", "steps", "cond_scale", "guidance_rescale", "threshold",
                              "threshold_percentile", "threshold_max", "lowres_aug_level", "options"]),
       value=st.one_of(ODD_VALUES, st.floats(-2, 3), st.sampled_from(["ddim", "heun", "static", "none"]),
                       st.fixed_dictionaries({"eta": st.floats(allow_nan=True)}),
                       st.fixed_dictionaries({"S_churn": st.integers(-5, 5)})))
def test_sampler_settings_accept_valid_fields_and_refuse_the_rest(field, value):
    try:
        made = SamplerSettings(**{field: value})
    except USER_ERRORS:
        return
    # what was accepted is usable: a sampler name, a whole number of steps, finite numbers in range
    assert SamplerSettings(**made.config) == made
    assert made.steps is None or (type(made.steps) is int and made.steps >= 1)
    assert math.isfinite(made.cond_scale) and 0 <= made.guidance_rescale <= 1
    assert 0 < made.threshold_percentile <= 1 and made.threshold in ("dynamic", "static", "none")
    assert all(v >= 0 for k, v in made.options.items() if k in ("eta", "S_churn"))


def _paths(node, prefix=()):
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from _paths(value, prefix + (key,))


def _changed(config: dict, path: tuple, value) -> dict:
    config = copy.deepcopy(config)
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return config


def _names_its_key(error: Exception, path: tuple) -> bool:
    """A configuration error starts with a dotted key inside the changed block (or the config itself)."""
    return str(error).split(":")[0].split(".")[0].split(" ")[0] in {str(path[0]), "config"}


WITH_TEXT, WITHOUT_TEXT = tiny_config(), tiny_config(text=False)


@FAST
@given(path=st.sampled_from([p for p in _paths(WITH_TEXT) if p]), value=ODD_VALUES)
def test_config_parsing_refuses_wrong_values_with_their_key(path, value):
    try:
        parse_config(_changed(WITH_TEXT, path, value))
    except USER_ERRORS as error:
        assert _names_its_key(error, path), str(error)


@settings(FAST, max_examples=15)
@given(path=st.sampled_from([p for p in _paths(WITHOUT_TEXT) if p]),
       value=st.one_of(ODD_VALUES, st.integers(-3, 40), st.floats(-2, 2)))
def test_config_that_parses_builds_or_says_which_key_is_wrong(path, value):
    config = _changed(WITHOUT_TEXT, path, value)
    try:
        build_cascade(config)
    except USER_ERRORS as error:
        assert _names_its_key(error, path) or str(error).startswith(("cond_drop_prob", "stages", "text_")), str(error)
