"""Captioned shape pairs (imagen_lib/data/shapes_pairs.py) and their judge: the judge reads the data set's own
images, the held-out colour arrangements never reach training, captions and images agree, and the two-object
config trains, samples and is judged end to end at tiny settings."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from imagen_lib.data.shapes_pairs import (
    COLOR_NAMES,
    HELDOUT_COLOR_PAIRS,
    RELATION_PHRASES,
    RELATIONS,
    ShapePairsDataset,
    is_heldout,
    make_pair_caption,
    pair_vocabulary,
    random_pair_attributes,
    render_pairs,
    sample_pair_captions,
    slot_colors,
)
from imagen_lib.data.shapes_pairs_reader import judge_pair, read_pairs, relation_between, score_pairs

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_the_judge_reads_the_data_sets_own_images(split):
    batch = ShapePairsDataset(64, 1000, seed=5, split=split).batch(range(150))
    report = score_pairs(batch["images"], batch["attributes"], value_range=(-1, 1))
    assert report["accuracy"]["everything_two_shapes"] >= 0.98
    assert all(report["accuracy"][k] >= 0.98 for k in ("color", "shape", "size", "relation", "background"))
    # every relation and both caption orders (the first-named object in the first slot or in the second)
    assert set(Counter(a["relation"] for a in batch["attributes"])) == set(RELATIONS)
    assert {RELATIONS[a["relation"]][1] for a in batch["attributes"]} == {0, 1}


def test_the_judge_reads_smaller_images_too():
    batch = ShapePairsDataset(32, 1000, seed=6).batch(range(60))
    assert score_pairs(batch["images"], batch["attributes"], value_range=(-1, 1))["accuracy"]["everything"] >= 0.98


def test_the_judge_catches_a_swapped_arrangement_and_a_missing_shape():
    _, attributes = sample_pair_captions(8, seed=1, split="train")
    swapped = [{**a, "relation": {"left of": "right of", "right of": "left of", "above": "below",
                                  "below": "above"}[a["relation"]]} for a in attributes]
    images = (render_pairs(swapped, 48) + 1) / 2
    report = score_pairs(images, attributes)
    assert report["accuracy"]["relation"] == 0.0 and report["accuracy"]["everything"] == 0.0
    assert report["accuracy"]["color"] == 1.0 and report["accuracy"]["two_shapes"] == 1.0
    assert report["accuracy"]["relation_given_colors"] == 0.0  # the binding failure, told apart from colour
    blank = torch.full((1, 3, 48, 48), 0.5)
    row = judge_pair(read_pairs(blank)[0], attributes[0])
    assert not row["everything"] and not row["two_shapes"] and not row["relation"]


def test_relation_given_colors_counts_only_images_with_both_colours_right():
    _, attributes = sample_pair_captions(6, seed=2, split="heldout")
    def third_colour(a):
        return next(c for c in COLOR_NAMES if c not in (a["objects"][0]["color"], a["objects"][1]["color"]))

    # the first object drawn in a colour the caption does not name: colours wrong, not counted
    recoloured = [{**a, "objects": [{**a["objects"][0], "color": third_colour(a)}, a["objects"][1]]}
                  for a in attributes[:2]]
    swapped = [{**a, "relation": {"left of": "right of", "right of": "left of", "above": "below",
                                  "below": "above"}[a["relation"]]} for a in attributes[2:3]]
    images = (render_pairs([*recoloured, *swapped, *attributes[3:]], 48) + 1) / 2
    accuracy = score_pairs(images, attributes)["accuracy"]
    assert accuracy["relation_given_colors"] == pytest.approx(3 / 4)  # 3 right of the 4 with both colours right
    assert accuracy["color"] == pytest.approx(10 / 12)


def test_relation_between_reads_the_farther_apart_axis():
    assert relation_between((0.2, 0.5), (0.8, 0.55)) == "left of"
    assert relation_between((0.8, 0.5), (0.2, 0.45)) == "right of"
    assert relation_between((0.5, 0.2), (0.45, 0.8)) == "above"
    assert relation_between((0.5, 0.8), (0.55, 0.2)) == "below"


def test_heldout_arrangements_never_reach_training_over_an_epoch():
    from imagen_lib.training.loop import stage_loader

    config = yaml.safe_load((REPO / "examples" / "shapes2.yaml").read_text())
    # the config's own data options (its caption-order share too), a shorter epoch
    config["data"] = {**config["data"], "seed": 3, "length": 1200, "supersample": 1}
    config["stages"][0]["image_size"] = 8
    seen = Counter()
    for batch in stage_loader(config, 0):  # one epoch, shuffled as training draws it
        seen.update(slot_colors(a) for a in batch["attributes"])
    assert sum(seen.values()) == 1200 // 16 * 16
    assert not set(seen) & HELDOUT_COLOR_PAIRS
    assert len(seen) == 30 - len(HELDOUT_COLOR_PAIRS)  # every other ordered pair of colours is trained on
    heldout = ShapePairsDataset(8, 300, split="heldout", supersample=1).batch(range(300))["attributes"]
    assert all(is_heldout(a) for a in heldout) and {slot_colors(a) for a in heldout} == HELDOUT_COLOR_PAIRS


def _first_slot_first_share(attributes):
    return float(np.mean([RELATIONS[a["relation"]][1] == 0 for a in attributes]))


def test_first_slot_first_sets_the_share_of_captions_naming_the_left_or_top_object_first():
    def attributes(share, n=2000):
        data = ShapePairsDataset(8, n, seed=4, supersample=1, first_slot_first=share)
        return [data._draw(i)[1] for i in range(n)]

    assert _first_slot_first_share(attributes(0.5)) == pytest.approx(0.5, abs=0.03)
    assert _first_slot_first_share(attributes(0.75)) == pytest.approx(0.75, abs=0.03)
    assert _first_slot_first_share(attributes(1.0, 300)) == 1.0
    assert _first_slot_first_share(attributes(0.0, 300)) == 0.0
    # only the caption's order moves: the same scenes (slot colours, hence the split) item by item
    plain, biased = attributes(0.5, 300), attributes(0.75, 300)
    assert [slot_colors(a) for a in plain] == [slot_colors(a) for a in biased]
    assert not any(is_heldout(a) for a in biased)
    with pytest.raises(ValueError, match="first_slot_first"):
        ShapePairsDataset(8, 10, first_slot_first=1.5)


def test_a_list_of_shares_gives_each_epoch_its_own_and_the_last_holds_after():
    data = ShapePairsDataset(8, 300, seed=4, supersample=1, first_slot_first=[1.0, 0.0])
    epochs = {}
    for epoch in (0, 1, 5):
        data.set_epoch(epoch)
        epochs[epoch] = [data._draw(i) for i in range(300)]
    assert _first_slot_first_share([d[1] for d in epochs[0]]) == 1.0
    assert _first_slot_first_share([d[1] for d in epochs[1]]) == 0.0
    assert [d[0] for d in epochs[5]] == [d[0] for d in epochs[1]]  # the last share holds
    # the same scenes every epoch: slot colours and placement jitter item by item
    assert [slot_colors(d[1]) for d in epochs[0]] == [slot_colors(d[1]) for d in epochs[1]]
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(epochs[0], epochs[1]))
    with pytest.raises(ValueError, match="non-empty list"):
        ShapePairsDataset(8, 10, first_slot_first=[])
    with pytest.raises(ValueError, match=r"first_slot_first\[1\]"):
        ShapePairsDataset(8, 10, first_slot_first=[0.5, 1.5])
    with pytest.raises(ValueError, match="epoch"):
        data.set_epoch(-1)


@pytest.mark.parametrize("workers", [0, 1])
def test_the_training_data_order_moves_the_share_epoch_by_epoch_and_on_resume(workers):
    """Through the trainer's loader and data order (shuffled, loader processes or not): epoch 0's batches name
    the left / top object first, epoch 1's and later ones the other; a run resumed in epoch 1 draws epoch 1's."""
    from imagen_lib.training.data_order import DataOrder, DataPosition
    from imagen_lib.training.loop import stage_loader

    config = yaml.safe_load((REPO / "examples" / "shapes2.yaml").read_text())
    config["data"].update(length=8, supersample=1, first_slot_first=[1.0, 0.0], num_workers=workers)
    config["stages"][0]["image_size"] = 8
    config["stages"][0]["train"] = {"steps": 6, "batch_size": 4}  # two batches an epoch

    def shares(start, n):
        order = iter(DataOrder(stage_loader(config, 0), start))
        return [_first_slot_first_share(next(order)["attributes"]) for _ in range(n)]

    assert shares(DataPosition(), 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert shares(DataPosition(epoch=1, batch=1, batches=3), 2) == [0.0, 0.0]


def test_a_turned_around_caption_describes_the_same_image():
    from imagen_lib.data.shapes_pairs import turned_around

    rng = np.random.default_rng(0)
    for _ in range(20):
        a = random_pair_attributes(rng)
        b = turned_around(a)
        assert slot_colors(a) == slot_colors(b) and b["relation"] != a["relation"]
        jitter = rng.random((1, 6))
        assert torch.equal(render_pairs([a], 16, jitter=jitter, supersample=1),
                           render_pairs([b], 16, jitter=jitter, supersample=1))
        assert turned_around(b) == a
    data = ShapePairsDataset(32, 100, seed=7, first_slot_first=0.9)
    batch = data.batch(range(100))  # the judge agrees with the turned-around captions
    assert score_pairs(batch["images"], batch["attributes"], value_range=(-1, 1))["accuracy"]["everything"] >= 0.98


def test_every_heldout_arrangement_is_trained_on_in_reverse():
    assert len(HELDOUT_COLOR_PAIRS) == 6
    assert all((b, a) not in HELDOUT_COLOR_PAIRS for a, b in HELDOUT_COLOR_PAIRS)


def test_captions_say_what_the_attributes_hold():
    texts, attributes = sample_pair_captions(300, seed=2, split="train")
    vocabulary = set(pair_vocabulary())
    orders = Counter()
    for text, a in zip(texts, attributes):
        assert set(text.split()) <= vocabulary
        first, second = a["objects"]
        phrase = next(p for p in sorted(RELATION_PHRASES[a["relation"]], key=len, reverse=True) if f" {p} " in text)
        head, tail = text.split(f" {phrase} ")
        assert head.endswith(f"{first['color']} {first['shape']}") and f"{second['color']} {second['shape']}" in tail
        assert (f"on a {a['background']}" in text or f"against a {a['background']}" in text) == (
            "background" in a["mentioned"])
        for i in range(2):
            part = head if i == 0 else tail
            sizes = {"small", "little", "large", "big"} & set(part.split())
            assert bool(sizes) == (f"size{i}" in a["mentioned"])
        orders[RELATIONS[a["relation"]][1]] += 1
    assert orders[0] > 100 and orders[1] > 100  # the first-named object is left/top as often as right/bottom


def test_the_data_set_is_deterministic_and_checks_its_arguments():
    a, b = ShapePairsDataset(16, 50, seed=4), ShapePairsDataset(16, 50, seed=4)
    assert a[7]["texts"] == b[7]["texts"] and torch.equal(a[7]["images"], b[7]["images"])
    assert a[7]["texts"] != ShapePairsDataset(16, 50, seed=4, split="heldout")[7]["texts"]
    with pytest.raises(ValueError, match="split"):
        ShapePairsDataset(16, split="test")
    with pytest.raises(ValueError, match="length"):
        ShapePairsDataset(16, length=0)
    with pytest.raises(ValueError, match="split"):
        sample_pair_captions(3, split="val")
    bad = {"objects": [{"color": "red", "shape": "circle", "size": "small"}] * 2, "relation": "above",
           "background": "white", "mentioned": []}
    with pytest.raises(ValueError, match="colours must differ"):
        make_pair_caption(bad, np.random.default_rng(0))


def test_the_one_object_vocabulary_is_unchanged_and_extended():
    from imagen_lib.data.shapes import vocabulary

    assert set(vocabulary()) < set(pair_vocabulary())
    assert set(pair_vocabulary()) - set(vocabulary()) == {"above", "below", "of", "to"}


def test_the_two_object_config_trains_samples_and_is_judged(tmp_path, capsys):
    from imagen_lib.cli import main

    config = yaml.safe_load((REPO / "examples" / "shapes2.yaml").read_text())
    config["data"]["length"] = 64
    config["data"]["supersample"] = 1
    config["stages"][0]["train"] = {"steps": 2, "batch_size": 4}
    config["stages"][1]["train"] = {"steps": 2, "batch_size": 4}
    config["parallel_stages"]["join_at_step"] = 1
    config["sample"]["prompts"] = config["sample"]["prompts"][:2]
    path = tmp_path / "shapes2.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out), "--no-progress", "--cpu",
                 "--set", "stages.0.sampler.steps=2", "--set", "stages.1.sampler.steps=2"]) == 0
    assert (out / "samples.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["eval-shapes", str(out / "checkpoint"), "--n", "3", "--batch-size", "3", "--steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "heldout" in printed and "everything" in printed  # the pair report, found from the run's config
    summary = json.loads((out / "eval-shapes" / "eval_pairs.json").read_text())
    assert set(summary["splits"]) == {"seen", "heldout"} and summary["splits"]["heldout"]["n"] == 3
    texts = [i["text"] for i in summary["splits"]["heldout"]["images"]]
    assert texts == sample_pair_captions(3, seed=0, split="heldout")[0]
    assert all(is_heldout(i["attributes"]) for i in summary["splits"]["heldout"]["images"])
    assert (out / "eval-shapes" / "eval_pairs.png").stat().st_size > 0
