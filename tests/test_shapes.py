"""The captioned shapes data set and its judge, against the specification's numbers."""

import math
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from imagen_lib.data.shapes import (
    ATTRIBUTE_KEYS,
    BACKGROUNDS,
    COLORS,
    POSITION_PHRASES,
    ShapesDataset,
    render,
    render_batch,
    sample_captions,
)
from imagen_lib.data.shapes_reader import format_report, read_shapes, score_shapes


def _attrs(**overrides):
    base = {"color": "red", "shape": "square", "size": "large", "position": "center", "background": "white"}
    return {**base, **overrides}


def _unit(rgb):
    return torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1


def _coverage(image, attributes):
    """Per-pixel shape coverage recovered from a rendered image, in float64."""
    bg = _unit(BACKGROUNDS[attributes["background"]]).double()[:, None, None]
    fg = _unit(COLORS[attributes["color"]]).double()[:, None, None]
    return ((image.double() - bg) / (fg - bg)).mean(0)


def test_items_have_the_documented_structure():
    ds = ShapesDataset(image_size=32, length=10, seed=0)
    item = ds[3]
    assert set(item) == {"images", "texts", "attributes"}
    assert item["images"].shape == (3, 32, 32) and item["images"].dtype == torch.float32
    assert -1 <= item["images"].min() and item["images"].max() <= 1
    assert set(item["attributes"]) == set(ATTRIBUTE_KEYS) | {"mentioned"}
    assert {"color", "shape"} <= set(item["attributes"]["mentioned"]) <= set(ATTRIBUTE_KEYS)
    assert isinstance(item["texts"], str) and item["attributes"]["color"] in item["texts"]
    assert len(ds) == 10
    with pytest.raises(IndexError, match="out of range"):
        ds[10]


def test_deterministic_for_a_seed_and_independent_of_the_batch():
    a, b, c = ShapesDataset(32, seed=5), ShapesDataset(32, seed=5), ShapesDataset(32, seed=6)
    batch = a.batch([7, 2, 9])
    single = b[2]
    assert torch.equal(batch["images"][1], single["images"])
    assert batch["texts"][1] == single["texts"] and batch["attributes"][1] == single["attributes"]
    assert [c[i]["texts"] for i in range(8)] != [a[i]["texts"] for i in range(8)]


def test_flat_colours_exactly_from_the_palette():
    for attributes in (_attrs(), _attrs(color="yellow", background="black", shape="circle")):
        image = render(attributes, 64)
        # the corner is background, the centre is inside the shape
        torch.testing.assert_close(image[:, 0, 0], _unit(BACKGROUNDS[attributes["background"]]))
        torch.testing.assert_close(image[:, 32, 32], _unit(COLORS[attributes["color"]]))
        coverage = _coverage(image, attributes)
        assert ((coverage > 0.05) & (coverage < 0.95)).any(), "edges must be antialiased"


@pytest.mark.parametrize(
    "shape, area",
    [
        ("square", lambda s: s * s),
        ("circle", lambda s: math.pi * s * s / 4),
        ("triangle", lambda s: math.sqrt(3) / 4 * s * s),
    ],
)
@pytest.mark.parametrize("size, side", [("small", 0.22), ("large", 0.40)])
def test_area_matches_the_geometry(shape, area, size, side):
    attributes = _attrs(shape=shape, size=size, position="top right")
    coverage = _coverage(render(attributes, 64), attributes)
    expected = area(side * 64)
    # 4x vertical supersampling places the top and bottom edges to 1/8 px: about 2% of a small shape
    assert coverage.sum().item() == pytest.approx(expected, rel=0.025)
    ys, xs = torch.meshgrid(torch.arange(64.0) + 0.5, torch.arange(64.0) + 0.5, indexing="ij")
    cx = (coverage * xs).sum() / coverage.sum()
    assert cx.item() == pytest.approx(0.75 * 64, abs=0.05)


def test_jitter_spans_the_documented_ranges():
    attributes = [_attrs(shape="square")] * 2
    low = render_batch(attributes, 64, jitter=np.zeros((2, 3)))
    high = render_batch(attributes, 64, jitter=np.full((2, 3), 1 - 1e-9))
    ys, xs = torch.meshgrid(torch.arange(64.0) + 0.5, torch.arange(64.0) + 0.5, indexing="ij")
    for image, shift, scale in ((low[0], -0.03, 0.9), (high[0], 0.03, 1.1)):
        coverage = _coverage(image, attributes[0])
        assert coverage.sum().item() == pytest.approx((0.40 * scale * 64) ** 2, rel=0.01)
        for grid in (xs, ys):
            centre = ((coverage * grid).sum() / coverage.sum()).item()
            assert centre == pytest.approx((0.5 + shift) * 64, abs=0.13)


def test_caption_grammar_statistics():
    texts, records = sample_captions(3000, seed=1)
    assert (texts, records) == sample_captions(3000, seed=1)
    for key in ("size", "position", "background"):
        share = np.mean([key in r["mentioned"] for r in records])
        assert share == pytest.approx(0.7, abs=0.03), key
    for key, count in (("color", 6), ("shape", 3), ("position", 9)):
        values = [r[key] for r in records]
        assert len(set(values)) == count
        assert max(values.count(v) for v in set(values)) / len(values) < 1.4 / count
    backgrounds = set(BACKGROUNDS)
    for text, r in zip(texts, records):
        words = set(re.findall(r"[a-z]+", text))
        assert r["color"] in words and r["shape"] in words
        assert bool(words & {"small", "little", "large", "big"}) == ("size" in r["mentioned"])
        assert bool(words & backgrounds) == ("background" in r["mentioned"])
        stated = any(p in text for p in POSITION_PHRASES[r["position"]])
        assert stated == ("position" in r["mentioned"]), text
    # several phrasings per attribute
    assert {"small", "little"} <= set(" ".join(texts).split())
    assert any(t.startswith(("a ", "an ")) for t in texts) and any("," in t for t in texts)
    assert any("an orange" in t for t in texts) and not any("a orange" in t for t in texts)


def test_dataloader_renders_whole_batches():
    ds = ShapesDataset(32, length=64, seed=3)
    loader = DataLoader(ds, batch_size=8, collate_fn=ds.collate_fn)
    batch = next(iter(loader))
    assert batch["images"].shape == (8, 3, 32, 32) and len(batch["texts"]) == 8 == len(batch["attributes"])
    assert torch.equal(batch["images"], ds.batch(range(8))["images"])


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="color"):
        render(_attrs(color="pink"))
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset(image_size=2)
    with pytest.raises(ValueError, match="jitter"):
        render_batch([_attrs()], 32, jitter=np.zeros((2, 3)))


@pytest.mark.parametrize("image_size", [32, 64])
def test_reader_reads_the_data_set_almost_perfectly(image_size):
    batch = ShapesDataset(image_size, seed=11).batch(range(300))
    readings = read_shapes(batch["images"], value_range=(-1, 1))
    for key in ATTRIBUTE_KEYS:
        accuracy = np.mean([r[key] == a[key] for r, a in zip(readings, batch["attributes"])])
        assert accuracy >= 0.99, (key, accuracy)
    assert all(r["count"] == 1 for r in readings)


def test_reader_counts_the_shapes_drawn():
    left = render(_attrs(position="left", shape="triangle", size="small"), 64)
    right = render(_attrs(position="right", shape="triangle", size="small"), 64)
    two = torch.minimum(left, right)  # red on white: the darker pixel of each pair is the shape's
    readings = read_shapes(torch.stack([left, two]), value_range=(-1, 1))
    assert [r["count"] for r in readings] == [1, 2]
    assert readings[1]["shape"] == "triangle" and readings[1]["color"] == "red"
    wanted = [{**_attrs(shape="triangle", size="small"), "mentioned": ["color", "shape", "size"]}] * 2
    report = score_shapes(torch.stack([left, two]), wanted, value_range=(-1, 1))
    assert report["all_correct"] == 1.0  # the attributes the captions mention are all right ...
    assert report["one_shape"] == 0.5 and report["all_correct_one_shape"] == 0.5  # ... but one image has two
    assert "one shape" in format_report(report)
    assert read_shapes(torch.full((3, 32, 32), 128 / 255))[0]["count"] == 0


def test_reader_tolerates_pixel_noise():
    batch = ShapesDataset(64, seed=12).batch(range(100))
    noisy = ((batch["images"] + 1) / 2 + 0.03 * torch.randn(batch["images"].shape)).clamp(0, 1)
    report = score_shapes(noisy, [{**a, "mentioned": list(ATTRIBUTE_KEYS)} for a in batch["attributes"]])
    assert report["all_correct"] >= 0.95, format_report(report)


def test_score_counts_only_mentioned_attributes_and_catches_wrong_ones():
    batch = ShapesDataset(32, seed=13).batch(range(40))
    report = score_shapes(batch["images"], batch["attributes"], value_range=(-1, 1))
    assert report["n"] == 40 and report["all_correct"] == 1.0
    for key in ATTRIBUTE_KEYS:
        assert report["mentioned"][key] == sum(key in a["mentioned"] for a in batch["attributes"])
    # ask every image for a colour it does not have
    colours = list(COLORS)
    wrong = [{**a, "color": colours[(colours.index(a["color"]) + 1) % 6]} for a in batch["attributes"]]
    report = score_shapes(batch["images"], wrong, value_range=(-1, 1))
    assert report["accuracy"]["color"] == 0.0 and report["all_correct"] == 0.0
    assert report["accuracy"]["shape"] == 1.0
    assert "color" in format_report(report) and "0.0%" in format_report(report)
    with pytest.raises(ValueError, match="attribute dicts"):
        score_shapes(batch["images"], wrong[:3], value_range=(-1, 1))


def test_blank_image_reads_no_shape_and_pil_input_reads_the_same():
    blank = read_shapes(torch.full((3, 32, 32), 128 / 255))[0]
    assert blank["background"] == "gray" and blank["shape"] is None and blank["color"] is None
    from imagen_lib.images import to_pil

    image = render(_attrs(shape="circle", color="green", background="gray", position="bottom left"), 32)
    from_tensor = read_shapes(image, value_range=(-1, 1))[0]
    from_pil = read_shapes([to_pil(image, value_range=(-1, 1))])[0]
    for key in ATTRIBUTE_KEYS:
        assert from_tensor[key] == from_pil[key]
    assert from_pil["position"] == "bottom left" and from_pil["shape"] == "circle"


class _OracleCascade:
    """Draws exactly what each caption asks for (the renderer), recording the seeds it was given."""

    def __init__(self, lookup, image_size=32):
        self.lookup, self.image_size, self.seeds = lookup, image_size, []

    def sample(self, texts, *, seed, disable_progress, **kwargs):
        self.seeds.append((seed, len(texts), kwargs))
        return (render_batch([self.lookup[t] for t in texts], self.image_size) + 1) / 2


def test_evaluate_cascade_scores_a_perfect_drawer_perfectly_and_seeds_per_image():
    from imagen_lib.commands.eval_shapes import evaluate_cascade

    texts, attributes = sample_captions(10, seed=4)
    oracle = _OracleCascade(dict(zip(texts, attributes)))
    report, drawn, images = evaluate_cascade(oracle, 10, seed=4, batch_size=4, progress=False, steps=3)
    assert drawn == texts and images.shape == (10, 3, 32, 32)
    assert report["all_correct"] == 1.0 and all(v == 1.0 for v in report["accuracy"].values())
    assert [(s, n) for s, n, _ in oracle.seeds] == [(4, 4), (8, 4), (12, 2)]  # image i uses seed + i
    assert oracle.seeds[0][2] == {"steps": 3}


def test_eval_shapes_command_on_a_checkpoint(tmp_path, capsys):
    import json

    from imagen_lib.cascade import Cascade, SamplerSettings, Stage
    from imagen_lib.cli import main
    from imagen_lib.diffusion import ElucidatedDiffusion
    from imagen_lib.nn.unet import Unet
    from imagen_lib.text import T5TextEncoder

    encoder = T5TextEncoder.build_tiny(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, max_length=80)
    net = Unet(
        embed_dim=8, image_size=16, channel_mult=(1,), num_res_blocks=1, attention_type=None, attention_resolutions=(),
        middle_attention=False, text_embed_dim=encoder.embed_dim, num_attn_heads=1, per_head_channels=8,
    )
    cascade = Cascade([Stage(net, ElucidatedDiffusion(), 16, sampler=SamplerSettings(steps=2))], text_encoder=encoder)
    checkpoint = cascade.save(tmp_path / "run" / "checkpoint")
    assert main(["eval-shapes", str(checkpoint), "--n", "5", "--seed", "3", "--batch-size", "4", "--steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "background" in printed and "all" in printed
    summary = json.loads((tmp_path / "run" / "eval-shapes" / "eval_shapes.json").read_text())
    assert summary["n"] == 5 and summary["seed"] == 3 and summary["steps"] == 1
    assert [i["text"] for i in summary["images"]] == sample_captions(5, seed=3)[0]
    assert set(summary["accuracy"]) == set(ATTRIBUTE_KEYS)
    assert (tmp_path / "run" / "eval-shapes" / "eval_shapes.png").stat().st_size > 0
