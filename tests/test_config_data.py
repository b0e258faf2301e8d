"""Training on users' own images from a YAML config: ``data: {type: folder}`` and ``data: {type: shards}``,
with captions encoded online or precomputed by ``imagen-lib precache`` (then no text encoder is ever loaded),
and the Trainer's handling of data sets that split themselves across processes."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from imagen_lib.checkpoint import resolve
from imagen_lib.cli import main
from imagen_lib.config import build_cascade, build_dataset
from imagen_lib.data.shapes import ShapesDataset
from imagen_lib.data.shards import ShardDataset, write_shards
from imagen_lib.images import to_pil

T5 = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 2}
UNET = {"kind": "Unet", "config": {"embed_dim": 16, "image_size": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                                   "attention_resolutions": [8], "num_attn_heads": 2, "per_head_channels": 8}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """16 captioned images of different sizes and aspect ratios (resized and cropped to 16 px by the data)."""
    root = tmp_path_factory.mktemp("own_images")
    data = ShapesDataset(24, seed=3)
    batch = data.batch(range(16))
    for i, (image, text) in enumerate(zip(batch["images"], batch["texts"])):
        pil = to_pil(image, value_range=(-1, 1))
        pil = pil.resize((24 + 4 * (i % 3), 24)) if i % 2 else pil  # some wider than tall
        (root / "sub" if i >= 12 else root).mkdir(exist_ok=True)
        path = (root / "sub" if i >= 12 else root) / f"{i:02d}.png"
        pil.save(path)
        path.with_suffix(".txt").write_text(text)
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    """The folder's images as 4 WebDataset shards of 4 samples."""
    out = tmp_path_factory.mktemp("shards")
    samples = [{"__key__": p.stem, "png": p.read_bytes(), "txt": p.with_suffix(".txt").read_text()}
               for p in sorted(folder.rglob("*.png"))]
    write_shards(samples, str(out), samples_per_shard=4)
    return out


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny random T5 + ByT5 tokenizer saved to disk, as a user's downloaded T5 would be."""
    from imagen_lib.text import T5TextEncoder

    folder = tmp_path_factory.mktemp("t5")
    T5TextEncoder.build_tiny(folder, seed=0, **T5)
    return folder


def config(data: dict, *, encoder: bool = True, prompts=("a red circle",), steps: int = 2) -> dict:
    cfg = {
        "seed": 0,
        "stages": [{"image_size": 16, "network": copy.deepcopy(UNET), "sampler": {"steps": 2, "cond_scale": 2.0},
                    "train": {"steps": steps, "batch_size": 4}}],
        "data": data,
        "trainer": {"lr": 1e-3, "ema_update_after_step": 0, "ema_update_every": 1},
        "sample": {"prompts": list(prompts), "seed": 0},
    }
    if encoder:
        cfg["text_encoder"] = {"build_tiny": dict(T5), "seed": 0, "max_length": 48}
    return cfg


def train(tmp_path, cfg: dict, capsys) -> str:
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--no-progress", "--cpu"]) == 0
    return capsys.readouterr().out


def trained_steps(tmp_path) -> list:
    return json.loads((Path(resolve(tmp_path / "run" / "checkpoint")) / "trainer.json").read_text())["steps"]


@pytest.fixture
def no_text_encoder(monkeypatch):
    """Any attempt to load or build a T5 fails the test."""
    import transformers

    from imagen_lib.text import T5TextEncoder

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder was loaded")

    monkeypatch.setattr(T5TextEncoder, "__init__", refuse)
    monkeypatch.setattr(transformers.T5EncoderModel, "from_pretrained", refuse)


# ---------------------------------------------------------------------------------------------------------
# captions encoded online


def test_folder_config_trains_through_the_command_and_writes_a_checkpoint(folder, tmp_path, capsys):
    out = train(tmp_path, config({"type": "folder", "root": str(folder), "crop": "random", "flip": True}), capsys)
    assert "stage 0: 2 steps" in out
    assert trained_steps(tmp_path) == [2]
    assert (Path(resolve(tmp_path / "run" / "checkpoint")) / "stage0.ema.safetensors").is_file()
    assert (tmp_path / "run" / "samples.png").is_file()


def test_shards_config_trains_through_the_command_and_writes_a_checkpoint(shards, tmp_path, capsys):
    data = {"type": "shards", "urls": str(shards / "*.tar"), "shuffle_buffer": 8, "crop": "random"}
    out = train(tmp_path, config(data, steps=3), capsys)
    assert "stage 0: 3 steps" in out
    assert trained_steps(tmp_path) == [3]


def test_the_config_builds_the_data_sets_it_names(folder, shards):
    dataset, workers = build_dataset(config({"type": "folder", "root": str(folder), "num_workers": 1}), 16)
    assert len(dataset) == 16 and workers == 1
    batch = dataset.collate_fn([dataset[i] for i in range(4)])
    assert batch["images"].shape == (4, 3, 16, 16) and len(batch["texts"]) == 4
    assert -1 <= batch["images"].min() and batch["images"].max() <= 1
    brace = str(shards / "shard-{000000..000001}.tar")  # a brace pattern: half the shards
    dataset, _ = build_dataset(config({"type": "shards", "urls": brace, "shuffle_buffer": 0}), 16)
    assert isinstance(dataset, ShardDataset) and len(dataset.urls) == 2
    assert len(list(dataset)) == 8


# ---------------------------------------------------------------------------------------------------------
# precomputed embeddings: precache, then train with no text encoder


def test_precache_folder_then_train_without_loading_the_encoder(
    folder, encoder_dir, tmp_path, capsys, request
):
    store = tmp_path / "store"
    assert main(["precache", "--encoder", str(encoder_dir), "--max-length", "48", "--no-progress",
                 str(folder), str(store)]) == 0
    request.getfixturevalue("no_text_encoder")  # from here on, loading a T5 fails the test
    cfg = config({"type": "folder", "root": str(folder), "embeddings": str(store), "token_length": 40},
                 encoder=False, prompts=())
    out = train(tmp_path, cfg, capsys)
    assert "stage 0: 2 steps" in out and trained_steps(tmp_path) == [2]
    saved = json.loads((Path(resolve(tmp_path / "run" / "checkpoint")) / "config.json").read_text())
    assert saved["text_encoder"] is None
    assert saved["stages"][0]["network"]["config"]["text_embed_dim"] == 32  # read from the store


def test_precache_shards_then_train_without_loading_the_encoder_and_sample_with_it(
    shards, encoder_dir, tmp_path, capsys, monkeypatch
):
    from imagen_lib.cascade import Cascade
    from imagen_lib.text import T5TextEncoder

    precached = tmp_path / "precached"
    assert main(["precache", "--encoder", str(encoder_dir), "--max-length", "48", "--no-progress",
                 str(shards / "shard-{000000..000003}.tar"), str(precached)]) == 0
    original_init = T5TextEncoder.__init__
    loads = []
    monkeypatch.setattr(T5TextEncoder, "__init__", lambda *a, **k: loads.append(1) or original_init(*a, **k))
    cfg = config({"type": "shards", "urls": [str(p) for p in sorted(precached.glob("*.tar"))]},
                 encoder=False, prompts=())
    train(tmp_path, cfg, capsys)
    assert loads == [] and trained_steps(tmp_path) == [2]
    # afterwards, sampling encodes prompts with the same T5 the captions were precached with
    cascade = Cascade.from_checkpoint(tmp_path / "run" / "checkpoint")
    encoder = T5TextEncoder(encoder_dir, max_length=48)
    images = cascade.using(text_encoder=encoder).sample(["a red circle"], seed=0, disable_progress=True)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    # the command line does the same with --encoder, and says what is missing without it
    checkpoint, out = str(tmp_path / "run" / "checkpoint"), tmp_path / "cli"
    with pytest.raises(SystemExit, match="--encoder"):
        main(["sample", checkpoint, "--prompt", "a red circle", "--out", str(out)])
    assert main(["sample", checkpoint, "--prompt", "a red circle", "--out", str(out), "--encoder", str(encoder_dir),
                 "--max-length", "48"]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "0000.png")), np.asarray(to_pil(images[0])))


# ---------------------------------------------------------------------------------------------------------
# the Trainer and data sets that split themselves


def test_trainer_does_not_reshard_split_data_and_sets_the_epoch(shards):
    from tiny_cascade import tiny_cascade

    from imagen_lib.training.trainer import Trainer

    class Recording(ShardDataset):
        epochs: list

        def set_epoch(self, epoch):
            self.epochs.append(epoch)
            super().set_epoch(epoch)

    data = Recording(str(shards / "shard-000000.tar"), 16, text="texts", shuffle_buffer=0)
    data.epochs = []
    loader = DataLoader(data, batch_size=4, collate_fn=data.collate_fn)  # one batch per epoch
    trainer = Trainer(tiny_cascade(text_embed_dim=None), lr=1e-3, cpu=True)
    assert trainer._prepare_loader(loader) is loader  # Accelerate does not wrap (and re-shard) it
    batches = []
    trainer.train_step = lambda k, batch: batches.append(batch) or 0.0
    trainer.fit(loader, 0, 3, disable_progress=True)
    assert data.epochs == [0, 1, 2] and len(batches) == 3
    # a map-style data set is still prepared by Accelerate
    folder_like = DataLoader(ShapesDataset(8, length=8), batch_size=4)
    assert trainer._prepare_loader(folder_like) is not folder_like


# ---------------------------------------------------------------------------------------------------------
# configuration errors name the key


@pytest.mark.parametrize("data, match", [
    ({"type": "photos"}, r"data\.type.*folder.*shards"),
    ({"type": "folder"}, r"data\.root: missing"),
    ({"type": "shards", "url": "x.tar"}, r"data\.url: unknown key; expected one of \['type', 'urls'"),
    ({"type": "folder", "root": "x", "num_workers": -1}, r"data\.num_workers"),
    ({"type": "folder", "root": "/no/such/folder"}, r"data \(folder\): root"),
    ({"type": "folder", "root": "FOLDER", "crop": "middle"}, r"data\.crop: expected one of \['center', 'random'\]"),
    ({"type": "shards", "urls": "/no/such/*.tar"}, r"data \(shards\): urls"),
])
def test_data_errors_name_the_key(folder, data, match):
    data = {k: str(folder) if v == "FOLDER" else v for k, v in data.items()}
    with pytest.raises(ValueError, match=match):
        build_dataset(config(data), 16)


def test_text_source_errors_are_caught_before_training(folder, shards, encoder_dir, tmp_path):
    with pytest.raises(ValueError, match="text_encoder: captions need a text_encoder block"):
        build_cascade(config({"type": "folder", "root": str(folder)}, encoder=False))
    with pytest.raises(ValueError, match="text_encoder: captions need"):  # raw shards, no encoder
        build_cascade(config({"type": "shards", "urls": str(shards / "*.tar")}, encoder=False))
    assert main(["precache", "--encoder", str(encoder_dir), "--no-progress", str(folder), str(tmp_path / "s")]) == 0
    cached = {"type": "folder", "root": str(folder), "embeddings": str(tmp_path / "s")}
    wrong_width = {**config(cached, encoder=False), "text_embed_dim": 64}
    with pytest.raises(ValueError, match="32 wide, but text_embed_dim is 64"):
        build_cascade(wrong_width)
    with pytest.raises(ValueError, match="sample.prompts"):
        build_dataset(config(cached, encoder=False), 16)
    with pytest.raises(ValueError, match=r"data \(folder\): embeddings: missing"):
        build_dataset(config({"type": "folder", "root": str(folder)}, encoder=False, prompts=()), 16)
