"""WebDataset shards that never crash mid-epoch (bad samples skipped, counted, named; too many stop the run
with a clear error) and resume mid-epoch with ``skip_batches`` to the same batches, bit for bit."""

import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from imagen_lib.config import parse_config
from imagen_lib.config.convert import ConfigError
from imagen_lib.data.bad_samples import MIN_SAMPLES_TO_JUDGE
from imagen_lib.data.shards import ShardDataset, iter_shard_samples, read_shard, write_samples, write_shards


def _png(i: int, size: tuple[int, int] = (20, 14)) -> bytes:
    """A small non-square image that differs per ``i`` (so random crops and flips show)."""
    rng = np.random.default_rng(i)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _good(i: int, embeddings: bool = False) -> dict:
    sample = {"__key__": f"s{i:03d}", "png": _png(i), "txt": f"caption {i}"}
    if embeddings:
        sample["emb.npy"] = _npy(np.full((3 + i % 2, 4), i, np.float16))
        sample["emb_mask.npy"] = _npy(np.ones(3 + i % 2, bool))
    return sample


class Payload:
    """Unpickling this creates ``path``: proof that a pickle ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


# ---------------------------------------------------------------------------------------------------------
# bad samples


def _bad_kinds(tmp_path: Path) -> dict[str, tuple[str, dict]]:
    """key -> (reason, sample) for each kind of bad sample that a whole tar can hold."""
    png = _png(0)
    emb, mask = _npy(np.zeros((3, 4), np.float16)), _npy(np.ones(3, bool))
    pickled = _npy(np.array([Payload(str(tmp_path / "pwned")), 1], dtype=object), allow_pickle=True)
    kinds = {
        "garbage": ("undecodable image", {"png": b"not an image"}),
        "halfpng": ("undecodable image", {"png": png[: len(png) // 2]}),
        "noimage": ("no image", {}),
        "objemb": ("bad emb.npy", {"png": png, "emb.npy": pickled, "emb_mask.npy": mask}),
        "flatemb": ("bad emb.npy", {"png": png, "emb.npy": _npy(np.zeros(12, np.float16)), "emb_mask.npy": mask}),
        "intemb": ("bad emb.npy", {"png": png, "emb.npy": _npy(np.zeros((3, 4), np.int64)), "emb_mask.npy": mask}),
        "nanemb": ("bad emb.npy", {"png": png, "emb.npy": _npy(np.full((3, 4), np.nan, np.float32)),
                                   "emb_mask.npy": mask}),
        "nomask": ("missing emb_mask.npy", {"png": png, "emb.npy": emb}),
        "shortmask": ("bad emb_mask.npy", {"png": png, "emb.npy": emb, "emb_mask.npy": _npy(np.ones(2, bool))}),
        "noemb": ("missing emb.npy", {"png": png, "txt": "no embeddings"}),
    }
    for key, (_, fields) in kinds.items():
        fields.setdefault("txt", key)
    return kinds


def test_each_kind_of_bad_sample_is_skipped_counted_and_named(tmp_path):
    kinds = _bad_kinds(tmp_path)
    samples = [_good(i, embeddings=True) for i in range(4)]
    samples[2:2] = [{"__key__": key, **fields} for key, (_, fields) in kinds.items()]
    url = str(tmp_path / "bad.tar")
    write_samples(samples, url)
    ds = ShardDataset(url, image_size=8, text="embeddings", shuffle_buffer=0, max_bad_share=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(ds)
    assert [i["keys"] for i in items] == [f"s{i:03d}" for i in range(4)]
    expected = {}
    for reason, _ in kinds.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert ds.skipped == expected
    messages = [str(w.message) for w in caught]
    for key, (reason, _) in kinds.items():
        named = [m for m in messages if f"skipped sample {key} in {url}: {reason}" in m]
        assert len(named) == 1, (key, messages)
    assert not (tmp_path / "pwned").exists(), "a pickled emb.npy was loaded"


def test_captions_that_are_not_utf8_are_bad_in_text_mode_too(tmp_path):
    url = str(tmp_path / "t.tar")
    write_samples([_good(0), {"__key__": "bad", "png": _png(1), "txt": b"\xff\xfe"}, _good(2)], url)
    ds = ShardDataset(url, image_size=8, text="texts", shuffle_buffer=0, max_bad_share=0.5)
    with pytest.warns(UserWarning, match=r"skipped sample bad in .*t\.tar: caption not UTF-8"):
        items = list(ds)
    assert [i["texts"] for i in items] == ["caption 0", "caption 2"]


@pytest.mark.parametrize("cut", ["member", "header", "boundary", "garbage", "empty"])
def test_a_truncated_tar_is_skipped_from_the_break_and_the_next_shard_is_read(tmp_path, cut):
    urls = write_shards([_good(i) for i in range(6)], str(tmp_path), samples_per_shard=3)
    data = Path(urls[0]).read_bytes()
    with tarfile.open(urls[0]) as tar:  # each sample is two members: png, txt
        members = tar.getmembers()
    ends = {"member": members[2].offset_data + 300, "header": members[1].offset + 100, "boundary": members[2].offset}
    broken = {"garbage": b"junk" * 200, "empty": b""}[cut] if cut in ("garbage", "empty") else data[: ends[cut]]
    Path(urls[0]).write_bytes(broken)
    raw = list(read_shard(urls[0]))
    assert "__error__" in raw[-1] and raw[-1]["__error__"][0] == "truncated tar"
    with pytest.raises(OSError, match="truncated tar"):
        list(iter_shard_samples(urls[0]))
    ds = ShardDataset(urls, image_size=8, shuffle_buffer=0, shuffle_shards=False, max_bad_share=1.0)
    with pytest.warns(UserWarning, match=f"in {urls[0]}: truncated tar"):
        keys = [i["keys"] for i in ds]
    assert keys == {"member": ["s000"], "header": [], "boundary": []}.get(cut, []) + ["s003", "s004", "s005"]
    assert ds.skipped == {"truncated tar": 1}


def _write_mixed(tmp_path: Path, good: int, bad: list[int]) -> list[str]:
    samples = [_good(i) for i in range(good)]
    for position in sorted(bad, reverse=True):
        samples.insert(position, {"__key__": f"bad{position:03d}", "png": b"broken", "txt": "x"})
    return write_shards(samples, str(tmp_path / "mixed"), samples_per_shard=10)


def test_more_bad_samples_than_the_share_stop_with_a_clear_error(tmp_path):
    urls = _write_mixed(tmp_path, 27, [3, 11, 20])
    ds = ShardDataset(urls, image_size=8, shuffle_buffer=0)
    with pytest.raises(ValueError) as error, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(ds)
    message = str(error.value)
    for part in ["ShardDataset(3 shards", "3 of 30 samples are bad", "10.0%", "3 undecodable image",
                 "max_bad_share=0.01", "(1.0%)"]:
        assert part in message, message
    # the same data within a larger limit: trained on, the bad ones counted
    ok = ShardDataset(urls, image_size=8, shuffle_buffer=0, max_bad_share=0.1)
    assert len(_quiet(list, ok)) == 27 and ok.skipped == {"undecodable image": 3}
    with pytest.raises(ValueError, match="max_bad_share"):
        ShardDataset(urls, image_size=8, max_bad_share=1.5)


def test_a_high_share_stops_the_run_once_enough_samples_were_seen(tmp_path):
    urls = _write_mixed(tmp_path, 140, [1, 2, 5])
    ds = ShardDataset(urls, image_size=8, shuffle_buffer=0, shuffle_shards=False)
    taken = []
    with pytest.raises(ValueError, match=f"3 of {MIN_SAMPLES_TO_JUDGE} samples are bad"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for item in ds:
            taken.append(item)
    assert len(taken) < 140


@pytest.mark.parametrize("workers", [0, 2])
def test_a_data_set_of_only_bad_samples_fails_with_the_share_error(tmp_path, workers):
    url = str(tmp_path / "allbad.tar")
    write_samples([{"__key__": f"b{i}", "png": b"broken", "txt": "x"} for i in range(5)], url)
    ds = ShardDataset(url, image_size=8)
    loader = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=ds.collate_fn)
    with pytest.raises(ValueError, match=r"5 of 5 samples are bad \(100.0%: 5 undecodable image\)"):
        _quiet(list, loader)


def test_the_data_block_takes_max_bad_share():
    from tests.tiny_cascade import tiny_config

    config = {**tiny_config(text=False), "data": {"type": "shards", "urls": "x.tar", "max_bad_share": 0.05}}
    assert parse_config(config).data.max_bad_share == 0.05
    config["data"]["max_bad_share"] = 2
    with pytest.raises(ConfigError, match="max_bad_share"):
        parse_config(config)


# ---------------------------------------------------------------------------------------------------------
# resuming mid-epoch


@pytest.fixture(scope="module")
def resume_shards(tmp_path_factory):
    """4 shards of 10 samples (two bad, so readers hold different counts), non-square images."""
    samples = [_good(i) for i in range(40)]
    samples[7] = {"__key__": "bad007", "png": b"broken", "txt": "x"}
    samples[26] = {"__key__": "bad026", "png": _png(26)[:60], "txt": "y"}
    return write_shards(samples, str(tmp_path_factory.mktemp("resume")), samples_per_shard=10)


def _batches(ds, workers, batch_size, epoch, skip=None, drop_last=False):
    ds.set_epoch(epoch)
    if skip is not None:
        ds.skip_batches(skip, batch_size)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=ds.collate_fn,
                        drop_last=drop_last)
    return _quiet(list, loader)


def _assert_same(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a["keys"] == b["keys"] and a["texts"] == b["texts"]
        assert torch.equal(a["images"], b["images"])


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_batches_resumes_with_the_same_batches_bit_for_bit(resume_shards, workers):
    ds = ShardDataset(resume_shards, image_size=12, crop="random", flip=True, shuffle_buffer=6, seed=5,
                      max_bad_share=0.1)
    full = _batches(ds, workers, 3, epoch=2)
    assert sum(len(b["keys"]) for b in full) == 38
    other_epoch = _batches(ds, workers, 3, epoch=3)
    assert [b["keys"] for b in other_epoch] != [b["keys"] for b in full]
    for skip in [0, 1, 3, 4, 7]:
        _assert_same(_batches(ds, workers, 3, epoch=2, skip=skip), full[skip:])
    assert _batches(ds, workers, 3, epoch=2, skip=len(full)) == []
    # one-shot: the next iteration reads the whole epoch again
    _assert_same(_batches(ds, workers, 3, epoch=2), full)
    # the bad samples were met in the replayed part too: counted alike
    if workers == 0:
        _batches(ds, 0, 3, epoch=2, skip=len(full) - 1)
        assert ds.skipped == {"undecodable image": 2}


def test_skip_batches_with_the_training_loops_loader(resume_shards):
    """drop_last, two workers, and a batch size that leaves a remainder in each reader."""
    ds = ShardDataset(resume_shards, image_size=8, crop="random", flip=True, shuffle_buffer=4, seed=1,
                      max_bad_share=0.1)
    full = _batches(ds, 2, 4, epoch=0, drop_last=True)
    _assert_same(_batches(ds, 2, 4, epoch=0, skip=3, drop_last=True), full[3:])


def test_a_samples_crop_does_not_depend_on_what_was_read_before_it(resume_shards):
    ds = ShardDataset(resume_shards, image_size=8, crop="random", flip=True, shuffle_buffer=0,
                      shuffle_shards=False, max_bad_share=0.1)
    whole = {i["keys"]: i["images"] for i in _quiet(list, ds)}
    ds.skip_batches(5, 1)
    later = _quiet(list, ds)
    assert len(later) == len(whole) - 5
    for item in later:
        assert torch.equal(item["images"], whole[item["keys"]])


def test_skip_batches_checks_its_arguments(resume_shards):
    ds = ShardDataset(resume_shards, image_size=8)
    with pytest.raises(ValueError, match="batches"):
        ds.skip_batches(-1, 4)
    with pytest.raises(ValueError, match="batch_size"):
        ds.skip_batches(1, 0)
    with pytest.raises(ValueError, match="batch_size"):
        ds.skip_batches(1, 2.5)
    with pytest.raises(TypeError, match="batches"):
        ds.skip_batches("3", 2)


def test_the_embedding_width_is_read_past_a_bad_first_sample(tmp_path):
    from imagen_lib.data.embedding_width import shard_embedding_width

    first = {"__key__": "a", "png": _png(0), "txt": "a",
             "emb.npy": _npy(np.array([Payload(str(tmp_path / "pwned"))], dtype=object), allow_pickle=True),
             "emb_mask.npy": _npy(np.ones(1, bool))}
    write_samples([first, _good(1, embeddings=True)], str(tmp_path / "w.tar"))
    assert shard_embedding_width(str(tmp_path / "w.tar")) == 4
    assert not (tmp_path / "pwned").exists()
    write_samples([_good(2)], str(tmp_path / "t.tar"))
    assert shard_embedding_width(str(tmp_path / "t.tar")) is None
