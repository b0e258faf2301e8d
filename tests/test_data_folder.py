"""Real training data: image-caption folders, transforms and WebDataset shards, on tiny generated files."""

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from imagen_lib.data.collate import collate_image_text
from imagen_lib.data.folder import ImageTextFolder
from imagen_lib.data.shapes import ShapesDataset
from imagen_lib.data.shards import ShardDataset, expand_urls, iter_shard_samples, write_shards
from imagen_lib.data.transforms import ImageTransform
from imagen_lib.images import to_pil

N_GOOD = 24


def _png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """24 good images (png, jpg, webp; non-square; one in a subfolder) and three bad ones."""
    root = tmp_path_factory.mktemp("folder")
    batch = ShapesDataset(48, seed=4).batch(range(N_GOOD))
    for i, (image, text) in enumerate(zip(batch["images"], batch["texts"])):
        pil = to_pil(image, value_range=(-1, 1)).resize((48, 40))  # wider than tall
        ext, fmt = [(".png", "PNG"), (".jpg", "JPEG"), (".webp", "WEBP")][i % 3]
        path = root / ("sub" if i == 5 else "") / f"img{i:02d}{ext}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(_png_bytes(pil, fmt))
        path.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    (root / "broken.png").write_bytes(b"not an image at all")
    (root / "broken.txt").write_text("broken", encoding="utf-8")
    Image.new("RGB", (6, 6), (255, 0, 0)).save(root / "tiny.png")
    (root / "tiny.txt").write_text("tiny", encoding="utf-8")
    Image.new("RGB", (48, 48)).save(root / "nocaption.png")
    return root, batch["texts"]


def test_folder_yields_normalised_batches_and_counts_skipped_files(folder):
    root, texts = folder
    with pytest.warns(UserWarning, match="skipped 3 images"):
        ds = ImageTextFolder(root, image_size=32, max_bad_share=0.05)
    assert len(ds) == N_GOOD
    assert ds.skipped == {"unreadable": 1, "too small": 1, "no caption": 1}
    assert "sub/img05.webp" in ds.keys
    loader = DataLoader(ds, batch_size=8, collate_fn=ds.collate_fn)
    batches = list(loader)
    assert len(batches) == 3
    batch = batches[0]
    assert set(batch) == {"images", "texts", "keys"}
    assert batch["images"].shape == (8, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert -1 <= batch["images"].min() < 0 < batch["images"].max() <= 1
    by_key = {k: t for b in batches for k, t in zip(b["keys"], b["texts"])}
    assert by_key["img00.png"] == texts[0] and by_key["sub/img05.webp"] == texts[5]


def test_image_that_fails_to_decode_is_skipped_mid_epoch(tmp_path):
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 100, 0, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    data = (tmp_path / "1.png").read_bytes()
    (tmp_path / "1.png").write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    ds = ImageTextFolder(tmp_path, image_size=16, max_bad_share=0.5)
    assert len(ds) == 3 and not ds.skipped
    with pytest.warns(UserWarning, match="1.png"):
        item = ds[1]
    assert item["keys"] == "2.png" and item["texts"] == "caption 2"
    assert ds.skipped["undecodable image"] == 1


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="root"):
        ImageTextFolder(tmp_path / "nope", image_size=8)
    with pytest.raises(ValueError, match="no usable image"):
        ImageTextFolder(tmp_path, image_size=8)


def test_transform_center_crop_keeps_the_middle_and_resizes_with_antialiasing():
    # 96 wide x 32 high: red | green (the middle half, with a margin for the filter) | blue
    array = np.zeros((32, 96, 3), np.uint8)
    array[:, :24] = (255, 0, 0)
    array[:, 24:72] = (0, 255, 0)
    array[:, 72:] = (0, 0, 255)
    out = ImageTransform(16)(Image.fromarray(array))
    assert out.shape == (3, 16, 16)
    expected = torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 16, 16)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # a one-pixel checkerboard shrunk 4x averages to grey instead of aliasing to black or white
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    small = ImageTransform(16, interpolation="bilinear")(np.repeat(checker[..., None], 3, -1))
    assert small.abs().max() < 0.05


def test_transform_random_crop_and_flip_are_seeded():
    image = torch.rand(3, 20, 30)
    transform = ImageTransform(20, crop="random", flip=True)
    a = transform(image, torch.Generator().manual_seed(1))
    b = transform(image, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    crops = {image[:, :, left : left + 20] * 2 - 1 for left in range(11)}
    outs = [transform(image, torch.Generator().manual_seed(s)) for s in range(40)]
    for out in outs:
        assert any(torch.allclose(out, c) or torch.allclose(out.flip(-1), c) for c in crops)
    assert any(not any(torch.allclose(o, c) for c in crops) for o in outs), "some outputs are flipped"
    with pytest.raises(ValueError, match="crop"):
        ImageTransform(8, crop="middle")


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    """The folder's 24 images as 4 shards of 6, plus one corrupt sample in the last shard."""
    root, texts = folder
    out = tmp_path_factory.mktemp("shards")
    samples = []
    for i in range(N_GOOD):
        pil = Image.open(next(p for p in root.rglob(f"img{i:02d}.*") if p.suffix != ".txt")).convert("RGB")
        samples.append({"__key__": f"s{i:02d}", "png": _png_bytes(pil), "txt": texts[i]})
    samples.append({"__key__": "bad", "png": b"garbage", "txt": "bad"})
    urls = write_shards(samples, str(out), samples_per_shard=6)
    assert len(urls) == 5
    return out, [s["txt"] for s in samples[:N_GOOD]]


def test_shards_yield_every_sample_once_and_skip_corrupt_ones(shards):
    out, texts = shards
    ds = ShardDataset(f"{out}/shard-{{000000..000004}}.tar", image_size=16, shuffle_buffer=10, seed=3,
                      max_bad_share=0.1)
    with pytest.warns(UserWarning, match="skipped sample bad"):
        items = list(ds)
    assert sorted(i["keys"] for i in items) == [f"s{i:02d}" for i in range(N_GOOD)]
    assert ds.skipped == {"undecodable image": 1}
    assert [i["keys"] for i in items] != sorted(i["keys"] for i in items), "the buffer shuffles"
    for item in items:
        assert item["images"].shape == (3, 16, 16) and -1 <= item["images"].min() and item["images"].max() <= 1
        assert item["texts"] == texts[int(item["keys"][1:])]
    batch = collate_image_text(items[:4])
    assert batch["images"].shape == (4, 3, 16, 16) and len(batch["texts"]) == 4


def test_each_process_and_worker_reads_its_own_shards(shards):
    out, _ = shards
    pattern = f"{out}/*.tar"
    assert len(expand_urls(pattern)) == 5
    keys = []
    for rank in range(2):
        ds = ShardDataset(pattern, image_size=8, shuffle_buffer=0, rank=rank, world_size=2, seed=9, max_bad_share=0.2)
        ds.set_epoch(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            keys.append({item["keys"] for item in ds})
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == N_GOOD
    # two DataLoader workers of one process: disjoint too, and nothing is lost
    ds = ShardDataset(pattern, image_size=8, shuffle_buffer=4, max_bad_share=0.2)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_image_text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read = [k for batch in loader for k in batch["keys"]]
    assert sorted(read) == [f"s{i:02d}" for i in range(N_GOOD)]


def test_shards_on_an_fsspec_url(folder):
    root, texts = folder
    pil = Image.open(root / "img00.png").convert("RGB")
    urls = write_shards(
        [{"__key__": f"m{i}", "png": _png_bytes(pil), "txt": texts[0]} for i in range(3)], "memory://shards-test"
    )
    assert urls == ["memory://shards-test/shard-000000.tar"]
    assert [s["__key__"] for s in iter_shard_samples(urls[0])] == ["m0", "m1", "m2"]
    items = list(ShardDataset("memory://shards-test/shard-000000.tar", image_size=8, shuffle_buffer=0))
    assert [i["texts"] for i in items] == [texts[0]] * 3


def test_process_split_reads_the_launcher_or_the_accelerator_and_creates_no_state():
    """Without an Accelerator the launcher's RANK / WORLD_SIZE count, and asking creates no Accelerate state;
    once an Accelerator exists (one process here) its split wins over the environment."""
    script = """
import os
import accelerate.state
from imagen_lib.data.shards import process_split
os.environ.update(RANK="2", WORLD_SIZE="3")
before = process_split()
created = accelerate.state.is_initialized()
del os.environ["RANK"], os.environ["WORLD_SIZE"]
accelerate.Accelerator(cpu=True)
os.environ.update(RANK="2", WORLD_SIZE="3")
print(before, created, process_split())
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "(2, 3) False (0, 1)"


def _folder_with_bad_files(root: Path) -> None:
    """8 good images 0..7 plus a corrupt image, a non-UTF-8 caption and a caption that cannot be read."""
    for i in range(8):
        Image.new("RGB", (20, 16), (i * 30, 0, 0)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"caption {i}")
    (root / "3b.png").write_bytes(b"\x89PNG\r\n\x1a\n but nothing else")
    (root / "3b.txt").write_text("corrupt image")
    Image.new("RGB", (20, 16)).save(root / "5b.png")
    (root / "5b.txt").write_bytes("légende".encode("latin-1"))
    Image.new("RGB", (20, 16)).save(root / "6b.png")
    (root / "6b.txt").write_text("locked")


def _unreadable(monkeypatch, name: str) -> None:
    """Reading the file ``name`` fails as a file without read permission does (even for root)."""
    read_bytes = Path.read_bytes

    def failing(path: Path) -> bytes:
        if path.name == name:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", failing)


def test_folder_leaves_out_a_corrupt_image_and_unreadable_captions_keeping_the_order(tmp_path, monkeypatch):
    _folder_with_bad_files(tmp_path)
    _unreadable(monkeypatch, "6b.txt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageTextFolder(tmp_path, image_size=8, max_bad_share=0.5)
    assert ds.keys == [f"{i}.png" for i in range(8)]
    assert ds.skipped == {"unreadable": 1, "caption not UTF-8": 1, "caption unreadable": 1}
    messages = [str(w.message) for w in caught]
    for key, reason in [("3b.png", "unreadable"), ("5b.png", "caption not UTF-8"), ("6b.png", "caption unreadable")]:
        assert sum(f"skipped sample {key} in {tmp_path / key}: {reason}" in m for m in messages) == 1, messages
    assert [ds[i]["texts"] for i in range(8)] == [f"caption {i}" for i in range(8)]
    # the share: 3 bad files of 11 is more than the default 1%
    with pytest.raises(ValueError) as error, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ImageTextFolder(tmp_path, image_size=8)
    for part in ["ImageTextFolder(", "3 of 11 samples are bad", "27.3%", "max_bad_share=0.01"]:
        assert part in str(error.value)


def test_folder_image_that_fails_later_is_replaced_once_and_counts_to_the_share(tmp_path):
    for i in range(4):
        Image.new("RGB", (40, 40), (i * 60, 0, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    data = (tmp_path / "2.png").read_bytes()
    (tmp_path / "2.png").write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    ds = ImageTextFolder(tmp_path, image_size=16, max_bad_share=0.25)
    with pytest.warns(UserWarning, match="2.png"):
        assert [ds[i]["keys"] for i in range(4)] == ["0.png", "1.png", "3.png", "3.png"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the file is not tried again
        assert ds[2]["keys"] == "3.png"
    assert ds.skipped == {"undecodable image": 1}
    strict = ImageTextFolder(tmp_path, image_size=16, max_bad_share=0.2)
    with pytest.raises(ValueError, match=r"1 of 4 samples are bad \(25.0%: 1 undecodable image\)"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strict[2]


def test_folder_of_only_bad_files_fails_with_the_share_error(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"broken")
        (tmp_path / f"{i}.txt").write_text("x")
    with pytest.raises(ValueError, match=r"3 of 3 samples are bad \(100.0%: 3 unreadable\)"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ImageTextFolder(tmp_path, image_size=8)
