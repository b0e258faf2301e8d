"""The checkpoint commit protocol: a kill injected at every file-system operation of a save (locally and on an
fsspec memory file system) leaves the previous or the new checkpoint, complete, and the next save leaves no
orphans; keep_last, labels, flat (pre-version) checkpoints, and overwrite protection without check-then-act."""

import json
import os
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from imagen_lib import checkpoint as ckpt
from imagen_lib.checkpoint import commit


class Killed(BaseException):
    """A simulated SIGKILL: not an Exception, so no ``except Exception`` clean-up runs, as in a real kill."""


class KillAfter:
    """Counts file-system operations; from operation ``at`` on (None: never) each one raises :class:`Killed`,
    as a dead process does nothing more."""

    def __init__(self, at=None):
        self.at, self.count = at, 0

    def wrap(self, fn, torn_write=False):
        def wrapped(*args, **kwargs):
            if self.at is not None and self.count >= self.at:
                if torn_write:  # the file being made durable loses its second half, as in a crash before fsync
                    _tear(args[0])
                raise Killed(f"killed at operation {self.count}")
            self.count += 1
            return fn(*args, **kwargs)

        return wrapped


def _tear(fd):
    try:
        os.ftruncate(fd, os.fstat(fd).st_size // 2)
    except OSError:  # a folder's descriptor
        pass


LOCAL_OPS = ("fsync", "replace", "unlink", "rmdir", "mkdir", "rename")
MEMORY_OPS = ("pipe_file", "rm", "rm_file", "makedirs", "mkdir", "mv", "cp_file", "put_file")


def _inject(monkeypatch, backend, killer):
    if backend == "file":
        for name in LOCAL_OPS:
            monkeypatch.setattr(os, name, killer.wrap(getattr(os, name), torn_write=name == "fsync"))
    else:
        for name in MEMORY_OPS:
            monkeypatch.setattr(MemoryFileSystem, name, killer.wrap(getattr(MemoryFileSystem, name)))


def _new_path(backend, tmp_path):
    name = uuid.uuid4().hex[:8]
    return f"file://{tmp_path}/{name}/ck" if backend == "file" else f"memory://crash-{name}/ck"


def _encoder_folder(tmp_path, value):
    folder = tmp_path / f"te-{value}"
    if folder.exists():  # made once, outside the operations counted
        return folder
    (folder / "sub").mkdir(parents=True)
    (folder / "tokenizer.json").write_text(json.dumps({"value": value}))
    (folder / "sub" / "model.safetensors").write_bytes(_safetensors(value))
    return folder


def _safetensors(value):
    from safetensors.torch import save

    return save({"w": torch.full((3,), float(value))})


def _tensors(value):
    return {"stage0": {"w": torch.full((4, 5), float(value)), "b": torch.arange(5) + int(value)},
            "stage0.ema": {"w": torch.full((4, 5), float(value) / 2), "b": torch.arange(5)}}


def _save(path, value, tmp_path, keep_last=2, **kwargs):
    return ckpt.write_checkpoint(path, config={"value": value}, tensors=_tensors(value),
                                 json_files={"trainer": {"run_id": "run-a", "value": value}},
                                 folders={"text_encoder": _encoder_folder(tmp_path, value)}, run_id="run-a",
                                 keep_last=keep_last, **kwargs)


def _save_flat(path, value):
    """A checkpoint as imagen_lib wrote them before versions: the files directly in the folder."""
    from safetensors.torch import save

    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(f"{root}/text_encoder/sub", exist_ok=True)
    for name, state in _tensors(value).items():
        fs.pipe_file(f"{root}/{name}.safetensors", save(state))
    fs.pipe_file(f"{root}/trainer.json", json.dumps({"run_id": "run-a", "value": value}).encode())
    fs.pipe_file(f"{root}/text_encoder/tokenizer.json", json.dumps({"value": value}).encode())
    fs.pipe_file(f"{root}/text_encoder/sub/model.safetensors", _safetensors(value))
    fs.pipe_file(f"{root}/config.json", json.dumps({"value": value}).encode())


def _assert_complete(path, value, tmp_path):
    """The committed checkpoint at ``path`` is exactly the one saved with ``value``, every file of it."""
    assert ckpt.read_config(path) == {"value": value}
    assert ckpt.read_json(path, "trainer")["value"] == value
    for name, state in _tensors(value).items():
        loaded = ckpt.read_tensors(path, name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    copy = ckpt.download_folder(path, "text_encoder", tmp_path / f"copy-{uuid.uuid4().hex[:6]}")
    assert json.loads((copy / "tokenizer.json").read_text()) == {"value": value}
    assert (copy / "sub" / "model.safetensors").read_bytes() == _safetensors(value)


def _entries(path):
    fs, root = fsspec.core.url_to_fs(path)
    fs.invalidate_cache()
    return sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(root, detail=False))


def _siblings(path):
    fs, root = fsspec.core.url_to_fs(path)
    fs.invalidate_cache()
    return sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(root.rsplit("/", 1)[0], detail=False))


def _operations_of_a_save(backend, previous, tmp_path, monkeypatch):
    path = _new_path(backend, tmp_path)
    if previous == "versioned":
        _save(path, 1, tmp_path)
    elif previous == "flat":
        _save_flat(path, 1)
    counter = KillAfter()
    with monkeypatch.context() as m:
        _inject(m, backend, counter)
        _save(path, 2, tmp_path)
    return counter.count


@pytest.mark.parametrize("previous", ["none", "versioned", "flat"])
@pytest.mark.parametrize("backend", ["file", "memory"])
def test_a_kill_at_any_operation_of_a_save_leaves_the_old_or_the_new_checkpoint(backend, previous, tmp_path,
                                                                                 monkeypatch):
    for value in (1, 2, 3):
        _encoder_folder(tmp_path, value)
    total = _operations_of_a_save(backend, previous, tmp_path, monkeypatch)
    assert total > 5
    outcomes = set()
    for at in range(total + 1):  # the last one is not killed
        path = _new_path(backend, tmp_path)
        if previous == "versioned":
            _save(path, 1, tmp_path)
        elif previous == "flat":
            _save_flat(path, 1)
        with monkeypatch.context() as m:
            _inject(m, backend, KillAfter(at))
            try:
                _save(path, 2, tmp_path)
            except Killed:
                assert at < total
            else:
                assert at == total
        if previous == "none" and not ckpt.is_checkpoint(path):
            outcomes.add(None)
        else:
            value = ckpt.read_config(path)["value"]
            _assert_complete(path, value, tmp_path)
            outcomes.add(value)
        committed = ckpt.resolve(path) if ckpt.is_checkpoint(path) else None
        _save(path, 3, tmp_path)  # the next save, not killed, removes everything the killed one left
        _assert_complete(path, 3, tmp_path)
        pointer = json.loads(fsspec.open(f"{path}/latest", "rb").open().read())
        kept = [committed.rsplit("/", 1)[-1]] if committed and committed != path else []
        assert pointer["kept"] == kept, at
        assert _entries(path) == sorted(["latest", pointer["version"], *kept]), at
        assert _siblings(path) == ["ck"], at
    assert outcomes == {1 if previous != "none" else None, 2}  # kills before and after the commit were tried


def test_keep_last_two_keeps_the_two_newest_versions_and_points_at_the_newest(tmp_path):
    path = tmp_path / "ck"
    for value in (1, 2, 3):
        _save(path, value, tmp_path, keep_last=2, label=f"step-{value:06d}-000040")
    pointer = json.loads((path / "latest").read_text())
    versions = sorted((p.name for p in path.iterdir() if p.is_dir()), key=ckpt.version_seq)
    assert len(versions) == 2 and pointer["version"] == versions[-1] and pointer["kept"] == [versions[0]]
    assert pointer["version"].startswith("v000003-step-000003-000040-") and pointer["run_id"] == "run-a"
    assert ckpt.resolve(path) == str(path / pointer["version"])
    _assert_complete(path, 3, tmp_path)
    _assert_complete(path / versions[0], 2, tmp_path)  # the kept version is complete too
    _save(path, 4, tmp_path, keep_last=1)
    assert sorted(p.name for p in path.iterdir()) == sorted(["latest", ckpt.resolve(path).rsplit("/", 1)[-1]])
    with pytest.raises(ValueError, match="keep_last"):
        _save(path, 5, tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="label"):
        _save(path, 5, tmp_path, label="../escape")


def test_a_flat_checkpoint_still_loads_and_is_replaced_only_after_the_commit(tmp_path):
    path = tmp_path / "ck"
    _save_flat(str(path), 1)
    (path / "notes.txt").write_text("mine")
    assert ckpt.resolve(path) == str(path) and ckpt.checkpoint_run_id(path) == "run-a"
    _assert_complete(path, 1, tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ckpt.write_checkpoint(path, config={"value": 9}, run_id="run-b")
    _save(path, 2, tmp_path)  # the same run continues it as a versioned checkpoint
    _assert_complete(path, 2, tmp_path)
    version = ckpt.resolve(path).rsplit("/", 1)[-1]
    assert sorted(p.name for p in path.iterdir()) == sorted(["latest", version, "notes.txt"])


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint_and_deletes_nothing(tmp_path):
    folder = tmp_path / "photos"
    (folder / "2024").mkdir(parents=True)
    (folder / "2024" / "a.jpg").write_bytes(b"jpeg")
    (folder / "notes.txt").write_text("keep me")
    for overwrite in (True, False):
        with pytest.raises(FileExistsError, match="holds files that are not a checkpoint; refusing to overwrite"):
            ckpt.write_checkpoint(folder, config={}, overwrite=overwrite)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == ["2024", "2024/a.jpg", "notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a checkpoint folder"):
        ckpt.write_checkpoint(tmp_path / "file", config={}, overwrite=True)


def test_the_run_id_is_checked_again_right_before_the_commit(tmp_path, monkeypatch):
    """Another run commits while this save writes its version: this save refuses, removes only its own
    version, and the other run's checkpoint stays committed and complete."""
    path = tmp_path / "ck"
    _save(path, 1, tmp_path)
    real = commit._write_version

    def and_meanwhile_another_run_saves(store, version, *args):
        real(store, version, *args)
        monkeypatch.setattr(commit, "_write_version", real)
        ckpt.write_checkpoint(path, config={"value": "other"}, tensors={"stage0": {"w": torch.ones(1)}},
                              run_id="run-b", overwrite=True)

    monkeypatch.setattr(commit, "_write_version", and_meanwhile_another_run_saves)
    with pytest.raises(FileExistsError, match="did not write"):
        _save(path, 2, tmp_path, overwrite=True)
    assert ckpt.read_config(path) == {"value": "other"} and ckpt.checkpoint_run_id(path) == "run-b"
    assert sorted(p.name for p in path.iterdir()) == sorted(["latest", ckpt.resolve(path).rsplit("/", 1)[-1]])


def test_debris_of_older_protocols_and_killed_saves_is_removed_by_the_next_save(tmp_path):
    path = tmp_path / "ck"
    _save(path, 1, tmp_path)
    for name in ("ck.tmp-0a1b2c3d", "ck.old-0a1b2c3d"):  # what the two-rename protocol left behind
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "ck.tmp-mine").mkdir()  # not of our naming: left alone
    (path / "v000007-0123abcd").mkdir()  # a killed save's version, never committed
    (path / "latest.tmp-999999-0123abcd").write_text("{")
    _save(path, 2, tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ck")) == ["ck", "ck.tmp-mine"]
    assert sorted(p.name for p in path.iterdir()) == sorted(["latest", ckpt.resolve(path).rsplit("/", 1)[-1]])
    assert ckpt.resolve(path).rsplit("/", 1)[-1].startswith("v000008-")  # numbered after every version seen


def test_missing_or_damaged_pointer_and_version_are_clear_errors(tmp_path):
    path = tmp_path / "ck"
    _save(path, 1, tmp_path)
    (path / "latest").write_text('{"version": "../../etc"}')
    with pytest.raises(ValueError, match="latest in .* 'version' must name a version folder"):
        ckpt.read_config(path)
    (path / "latest").write_text('{"version": "v000009-0123abcd"}')
    with pytest.raises(FileNotFoundError, match="names version v000009-0123abcd, which has no config.json"):
        ckpt.read_config(path)
    (tmp_path / "gone.old-0a1b2c3d").mkdir()
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder.*gone.old-0a1b2c3d.*rename it"):
        ckpt.read_config(tmp_path / "gone")
    assert not ckpt.is_checkpoint(tmp_path / "gone")


def test_a_cascade_round_trips_through_the_versioned_layout_on_memory(tmp_path):
    from tiny_cascade import tiny_cascade

    from imagen_lib.cascade import Cascade

    cascade = tiny_cascade(text_embed_dim=None)
    path = f"memory://cascade-{uuid.uuid4().hex[:6]}/ck"
    cascade.save(path)
    cascade.save(path, overwrite=True)
    assert len([e for e in _entries(path) if e != "latest"]) == 1  # Cascade.save keeps one version
    loaded = Cascade.from_checkpoint(path)
    for a, b in zip(cascade.stages, loaded.stages):
        assert all(torch.equal(x, y) for x, y in zip(a.net.state_dict().values(), b.net.state_dict().values()))
    assert Path(ckpt.resolve(path).split("://", 1)[1]).name.startswith("v000002-")
