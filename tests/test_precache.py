"""Precomputed T5 embeddings: the memory-mapped store, shards with embeddings, the CLI, and training on them."""

import pytest
import torch

from imagen_lib.data.collate import collate_image_text
from imagen_lib.data.embeddings import EmbeddingStore, fit_token_length
from imagen_lib.data.folder import ImageTextFolder
from imagen_lib.data.precache import precache_captions, precache_shards
from imagen_lib.data.shapes import ShapesDataset
from imagen_lib.data.shards import ShardDataset, write_shards
from imagen_lib.images import to_pil

MAX_LENGTH = 96


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny random T5 encoder with the ByT5 tokenizer, saved like a pretrained one."""
    from imagen_lib.text import T5TextEncoder

    folder = tmp_path_factory.mktemp("t5")
    T5TextEncoder.build_tiny(folder, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, seed=0)
    return folder


@pytest.fixture(scope="module")
def encoder(encoder_dir):
    from imagen_lib.text import T5TextEncoder

    return T5TextEncoder(encoder_dir, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    batch = ShapesDataset(24, seed=2).batch(range(20))
    for i, (image, text) in enumerate(zip(batch["images"], batch["texts"])):
        to_pil(image, value_range=(-1, 1)).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(text)
    return root


class CountingEncoder:
    """Wraps an encoder, counting captions, and fails after ``fail_after`` calls when asked to."""

    def __init__(self, encoder, fail_after=None):
        self.encoder, self.fail_after, self.calls, self.captions = encoder, fail_after, 0, 0
        self.max_length, self.config = encoder.max_length, encoder.config

    def __call__(self, texts):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("interrupted")
        self.calls += 1
        self.captions += len(texts)
        return self.encoder(texts)


def test_fit_token_length_trims_and_pads():
    embeds, mask = torch.randn(2, 5, 3), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    e, m = fit_token_length(embeds, mask, 3)
    assert torch.equal(e, embeds[:, :3]) and torch.equal(m, mask[:, :3])
    e, m = fit_token_length(embeds, mask, 7)
    assert e.shape == (2, 7, 3) and torch.equal(e[:, :5], embeds) and (e[:, 5:] == 0).all()
    assert torch.equal(m[:, :5], mask) and not m[:, 5:].any()
    with pytest.raises(ValueError, match="token_length"):
        fit_token_length(embeds, mask, 0)


def test_store_matches_online_encoding_in_float16(encoder, folder, tmp_path):
    items = ImageTextFolder(folder, image_size=24).captions()
    store = precache_captions(encoder, items, tmp_path / "store", batch_size=8, progress=False)
    assert len(store) == 20 and store.complete and store.dim == 32 and store.max_length == MAX_LENGTH
    online, mask = encoder([caption for _, caption in items])
    for i in (0, 7, 19):
        raw, raw_mask = store[i]
        assert raw.dtype == torch.float16 and raw.shape[0] == int(mask[i].sum()) < MAX_LENGTH  # trimmed
        embeds, padded_mask = store.get(i)
        assert torch.equal(padded_mask, mask[i])
        torch.testing.assert_close(embeds, online[i], atol=2e-3, rtol=2e-3)
        assert store.index(items[i][0]) == i
    # bytes on disk: float16 for the real tokens only
    assert (tmp_path / "store" / "embeds.f16").stat().st_size == int(mask.sum()) * 32 * 2


def test_precache_resumes_after_an_interruption(encoder, folder, tmp_path):
    items = ImageTextFolder(folder, image_size=24).captions()
    flaky = CountingEncoder(encoder, fail_after=3)  # the probe and two batches, then "Ctrl-C"
    with pytest.raises(KeyboardInterrupt):
        precache_captions(flaky, items, tmp_path / "store", batch_size=6, progress=False)
    partial = EmbeddingStore(tmp_path / "store")
    assert len(partial) == 12 and not partial.complete
    # a crash in the middle of a write leaves bytes past the last commit: they must be cut away
    with open(tmp_path / "store" / "embeds.f16", "ab") as handle:
        handle.write(b"\x01" * 1000)
    counting = CountingEncoder(encoder)
    resumed = precache_captions(counting, items, tmp_path / "store", batch_size=6, progress=False)
    assert counting.captions == 1 + 8  # the probe, then only the 8 captions not yet stored
    clean = precache_captions(encoder, items, tmp_path / "clean", batch_size=6, progress=False)
    for i in range(20):
        assert torch.equal(resumed[i][0], clean[i][0]) and torch.equal(resumed[i][1], clean[i][1])
    with pytest.raises(ValueError, match="keys differ"):
        precache_captions(encoder, items[::-1], tmp_path / "store", progress=False)


def test_folder_reads_precomputed_embeddings_without_the_encoder(encoder, folder, tmp_path):
    captions = ImageTextFolder(folder, image_size=24).captions()
    store = precache_captions(encoder, captions, tmp_path / "s", progress=False)
    ds = ImageTextFolder(folder, image_size=24, embeddings=tmp_path / "s", token_length=16)
    batch = collate_image_text([ds[i] for i in range(4)])
    assert set(batch) == {"images", "text_embeds", "text_mask", "keys"}
    assert batch["text_embeds"].shape == (4, 16, 32) and batch["text_mask"].shape == (4, 16)
    assert batch["text_embeds"].dtype == torch.float32 and batch["text_mask"].dtype == torch.bool
    expected, _ = store.get(store.index("00.png"), 16)
    assert torch.equal(batch["text_embeds"][0], expected)
    (folder / "20.png").write_bytes((folder / "00.png").read_bytes())
    (folder / "20.txt").write_text("a new caption")
    try:
        with pytest.raises(ValueError, match="not precomputed"):
            ImageTextFolder(folder, image_size=24, embeddings=store)
    finally:
        (folder / "20.png").unlink()
        (folder / "20.txt").unlink()


def _tiny_cascade(encoder):
    from imagen_lib.cascade import Cascade, SamplerSettings, Stage
    from imagen_lib.diffusion import ElucidatedDiffusion
    from imagen_lib.nn.unet import Unet

    torch.manual_seed(0)
    net = Unet(
        embed_dim=16, image_size=16, channel_mult=(1, 2), num_res_blocks=1, attention_type=None,
        attention_resolutions=(),
        middle_attention=False, text_embed_dim=encoder.embed_dim, num_attn_heads=2, per_head_channels=8,
    )
    return Cascade([Stage(net, ElucidatedDiffusion(), 16, sampler=SamplerSettings(steps=2))], text_encoder=encoder)


def test_training_on_precomputed_embeddings_matches_online_encoding(encoder, folder, tmp_path):
    from imagen_lib.training.trainer import Trainer

    precache_captions(encoder, ImageTextFolder(folder, image_size=16).captions(), tmp_path / "s", progress=False)
    online = ImageTextFolder(folder, image_size=16)
    cached = ImageTextFolder(folder, image_size=16, embeddings=tmp_path / "s")
    batches = {
        "online": collate_image_text([online[i] for i in range(4)]),
        "cached": collate_image_text([cached[i] for i in range(4)]),
    }
    assert set(batches["online"]) == {"images", "texts", "keys"}
    assert set(batches["cached"]) == {"images", "text_embeds", "text_mask", "keys"}
    # the same embeddings for the wrong images: proves the loss below does depend on the text
    swapped = {**batches["cached"], "text_embeds": batches["cached"]["text_embeds"].roll(1, 0),
               "text_mask": batches["cached"]["text_mask"].roll(1, 0)}
    losses = {}
    for name, batch in (*batches.items(), ("swapped", swapped)):
        cascade = _tiny_cascade(encoder)
        with torch.no_grad():  # move zero-initialised layers off zero, so that the text matters at once
            for p in cascade.stages[0].net.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        trainer = Trainer(cascade, lr=1e-3, cpu=True)
        torch.manual_seed(100)  # the same noise levels, noise and text dropout for every run
        losses[name] = trainer.train_step(0, batch)
    assert losses["cached"] == pytest.approx(losses["online"], rel=1e-5)  # float16 storage only
    assert losses["swapped"] != pytest.approx(losses["online"], rel=1e-3)


def _shards(folder, out):
    samples = []
    for path in sorted(folder.glob("*.png")):
        samples.append({"__key__": path.stem, "png": path.read_bytes(), "txt": path.with_suffix(".txt").read_text()})
    return write_shards(samples, str(out), samples_per_shard=8)


def test_precache_shards_adds_embeddings_and_skips_finished_shards(encoder, folder, tmp_path):
    inputs = _shards(folder, tmp_path / "in")
    pattern = str(tmp_path / "in" / "shard-{000000..000002}.tar")
    outputs = precache_shards(encoder, pattern, str(tmp_path / "out"), batch_size=5, progress=False)
    assert [o.rsplit("/", 1)[-1] for o in outputs] == [i.rsplit("/", 1)[-1] for i in inputs]
    items = list(
        ShardDataset(str(tmp_path / "out" / "*.tar"), image_size=16, shuffle_buffer=0, token_length=MAX_LENGTH)
    )
    assert len(items) == 20 and all("texts" not in item for item in items)
    by_key = {item["keys"]: item for item in items}
    captions = [(folder / f"{k}.txt").read_text() for k in sorted(by_key)]
    online, mask = encoder(captions)
    for row, key in enumerate(sorted(by_key)):
        assert torch.equal(by_key[key]["text_mask"], mask[row])
        torch.testing.assert_close(by_key[key]["text_embeds"], online[row], atol=2e-3, rtol=2e-3)
    as_texts = list(ShardDataset(str(tmp_path / "out" / "*.tar"), image_size=16, shuffle_buffer=0, text="texts"))
    assert sorted(i["texts"] for i in as_texts) == sorted(captions)
    # resumable: an existing output shard is not encoded again
    (tmp_path / "out" / "shard-000001.tar").unlink()
    counting = CountingEncoder(encoder)
    precache_shards(counting, pattern, str(tmp_path / "out"), batch_size=5, progress=False)
    assert counting.captions == 8 and (tmp_path / "out" / "shard-000001.tar").exists()
    with pytest.raises(ValueError, match="emb.npy"):
        list(ShardDataset(inputs, image_size=16, text="embeddings"))


def test_precache_command_on_a_folder_and_a_captions_file(encoder_dir, folder, tmp_path, capsys):
    from imagen_lib.cli import main

    assert main(["precache", "--encoder", str(encoder_dir), "--max-length", "40", "--no-progress",
                 str(folder), str(tmp_path / "store")]) == 0
    assert "20 captions" in capsys.readouterr().out
    store = EmbeddingStore(tmp_path / "store")
    assert len(store) == 20 and store.max_length == 40 and store.keys[0] == "00.png"
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na blue square at the top\n")
    assert main(["precache", "--encoder", str(encoder_dir), "--no-progress", str(captions), str(tmp_path / "c")]) == 0
    assert EmbeddingStore(tmp_path / "c").keys == ["0", "1"]
    with pytest.raises(SystemExit, match="INPUT"):
        main(["precache", "--encoder", str(encoder_dir), str(tmp_path / "missing"), str(tmp_path / "x")])


def test_store_rejects_a_different_encoder(encoder, encoder_dir, folder, tmp_path):
    from imagen_lib.text import T5TextEncoder

    items = [("a", "a red circle")]
    precache_captions(encoder, items, tmp_path / "s", progress=False)
    other = T5TextEncoder(encoder_dir, max_length=16)
    with pytest.raises(ValueError, match="max_length"):
        precache_captions(other, items, tmp_path / "s", progress=False)
    with pytest.raises(FileNotFoundError, match="not an embedding store"):
        EmbeddingStore(tmp_path)

