"""Loading a checkpoint names the file and says what is wrong with it (table-driven), never runs a pickle
planted under any of its file names, checks weights where they meet a network, and never leaks temporary
folders."""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_cascade import tiny_config

from imagen_lib import checkpoint as ckpt
from imagen_lib.cascade import Cascade


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trainer checkpoint of a cascade with a trained tiny T5 (every kind of file a checkpoint holds)."""
    from imagen_lib.config import build_cascade
    from imagen_lib.training.trainer import Trainer

    path = tmp_path_factory.mktemp("saved") / "ck"
    Trainer(build_cascade(tiny_config(trainable=True)), lr=1e-3, cpu=True).save(path)
    return path


@pytest.fixture
def checkpoint(saved, tmp_path):
    """A fresh copy of the saved checkpoint and its version folder (where the files are)."""
    path = tmp_path / "ck"
    shutil.copytree(saved, path)
    return path, Path(ckpt.resolve(path))


def _trainer_load(path):
    from imagen_lib.config import build_cascade
    from imagen_lib.training.trainer import Trainer

    Trainer(build_cascade(tiny_config(trainable=True)), lr=1e-3, cpu=True).load(path)


def _loader(name):
    """A load that reads the file ``name`` of a checkpoint."""
    if name.startswith("trainer") or name == "text_encoder.safetensors":
        return _trainer_load
    if name == "stage0.safetensors":
        return lambda path: Cascade.from_checkpoint(path, use_ema=False)
    return Cascade.from_checkpoint


class Payload:
    """Unpickling it runs code: writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the payload ran')",)


def _pickled(kind, marker):
    if kind == "torch.save":
        from io import BytesIO

        buffer = BytesIO()
        torch.save(Payload(marker), buffer)
        return buffer.getvalue()
    return pickle.dumps(Payload(marker), protocol=int(kind[-1]))


CHECKPOINT_FILES = ["stage0.safetensors", "stage0.ema.safetensors", "stage1.ema.safetensors", "trainer.safetensors",
                    "text_encoder.safetensors", "text_encoder.ema.safetensors", "config.json", "trainer.json"]


def test_the_fixture_holds_every_file_named_here(checkpoint):
    _, version = checkpoint
    names = {p.name for p in version.iterdir() if p.is_file()}
    assert set(CHECKPOINT_FILES) <= names
    assert {"model.safetensors", "config.json", "tokenizer_config.json"} <= {p.name for p in
                                                                              (version / "text_encoder").iterdir()}


@pytest.mark.parametrize("kind", ["protocol2", "protocol4", "protocol5", "torch.save"])
def test_a_pickle_planted_under_any_checkpoint_file_name_is_refused_and_never_runs(checkpoint, tmp_path, kind):
    path, version = checkpoint
    marker = tmp_path / "marker"
    planted = [*CHECKPOINT_FILES, *(f"text_encoder/{p.name}" for p in (version / "text_encoder").iterdir())]
    for name in planted:
        original = (version / name).read_bytes()
        (version / name).write_bytes(_pickled(kind, marker))
        with pytest.raises(ValueError) as refused:
            _loader(name)(path)
        message = str(refused.value)
        assert Path(name).name in message and "is a Python pickle (or a torch.save archive)" in message, name
        assert "never loads" in message and "safetensors.torch.save_file" in message
        (version / name).write_bytes(original)
    assert not marker.exists()


def test_a_pickle_of_protocol_0_or_a_pickle_named_file_is_refused_too(checkpoint, tmp_path):
    path, version = checkpoint
    marker = tmp_path / "marker"
    (version / "stage0.ema.safetensors").write_bytes(pickle.dumps(Payload(marker), protocol=0))
    with pytest.raises(ValueError, match=r"stage0\.ema\.safetensors in .* is not a safetensors file"):
        Cascade.from_checkpoint(path)
    shutil.copy(checkpoint[0].parent / "ck" / version.name / "stage0.safetensors", version / "stage0.ema.safetensors")
    (version / "config.json").write_bytes(pickle.dumps({"a": 1}, protocol=0))
    with pytest.raises(ValueError, match=r"config\.json in .* is not valid JSON: line 1 column 1"):
        Cascade.from_checkpoint(path)
    assert not marker.exists()


def test_a_pickle_file_beside_the_text_encoder_weights_is_refused(checkpoint, tmp_path):
    path, version = checkpoint
    (version / "text_encoder" / "pytorch_model.bin").write_bytes(b"anything")
    with pytest.raises(ValueError, match=r"text_encoder/pytorch_model\.bin in .*a kind of file \(pickle\)"):
        Cascade.from_checkpoint(path)


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    return f"is truncated \\({len(data) // 2:,} of {len(data):,} bytes its header announces\\)"


def _retype(file, dtype=torch.int32):
    tensors = load_file(file)
    key = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, file)
    return f": tensor '{re.escape(key)}' is torch.int32 where the network holds floating-point weights"


def _poison(file):
    tensors = load_file(file)
    key = sorted(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[1] = float("nan")
    save_file(tensors, file)
    return f": tensor '{re.escape(key)}': expected finite values, got 1 NaN or infinite value"


def _write(content):
    def plant(file):
        file.write_bytes(content)
        return None

    return plant


def _other_network(file):
    save_file({"w": torch.zeros(3)}, file)
    return "does not fit the network"


BAD_FILES = {  # case: (file, how it is damaged -> expected message after the file's name, error type)
    "truncated": ("stage0.ema.safetensors", _truncate, ValueError),
    "empty": ("stage0.ema.safetensors", _write(b""), ValueError, r"is empty \(0 bytes\)"),
    "cut in its header": ("stage1.ema.safetensors", _write(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"w\":"), ValueError,
                          r"is truncated \(13 of at least 72 bytes its header announces\)"),
    "not safetensors": ("stage0.ema.safetensors", _write(b"hello, not tensors at all"), ValueError,
                        r"is not a safetensors file \(it starts with b'hello, n'\)"),
    "pickle": ("stage1.ema.safetensors", _write(pickle.dumps([1, 2], protocol=4)), ValueError,
               r"is a Python pickle \(or a torch.save archive\), which imagen_lib never loads: convert it with "
               r"safetensors.torch.save_file"),
    "bad json": ("config.json", _write(b'{\n "stages": [\n  1,\n    ]\n}'), ValueError,
                 r"is not valid JSON: line 4 column 5: "),
    "empty json": ("config.json", _write(b"  \n"), ValueError, "is empty"),
    "json not an object": ("config.json", _write(b"[1, 2]"), ValueError, "expected a JSON object, got list"),
    "not utf-8 json": ("config.json", _write(b'{"a": "\xff"}'), ValueError, "is not valid JSON: it is not UTF-8"),
    "int32 weights": ("stage0.ema.safetensors", _retype, ValueError),
    "NaN weights": ("stage1.ema.safetensors", _poison, ValueError),
    "another network's weights": ("stage0.ema.safetensors", _other_network, ValueError),
    "damaged text encoder weights": ("text_encoder/model.safetensors", _truncate, ValueError),
    "damaged tokenizer": ("text_encoder/tokenizer_config.json", _write(b"{"), ValueError, "is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_damaged_file_is_named_with_what_is_wrong(checkpoint, case):
    path, version = checkpoint
    name, damage, error, *expected = BAD_FILES[case]
    pattern = damage(version / name) or expected[0]
    with pytest.raises(error) as raised:
        Cascade.from_checkpoint(path)
    message = str(raised.value)
    assert re.search(re.escape(f"{name} in {version}") + r"\S*" + ".*" + pattern, message), message


def test_damaged_trainer_files_are_named(checkpoint):
    path, version = checkpoint
    (version / "trainer.json").write_text('{"run_id": "x",\n "steps": [1 2]}')
    with pytest.raises(ValueError, match=r"trainer\.json in .* is not valid JSON: line 2 column 14"):
        _trainer_load(path)


@pytest.mark.parametrize("trainable", [True, False])
def test_a_missing_text_encoder_folder_is_an_error_not_a_random_encoder(tmp_path, trainable):
    from imagen_lib.config import build_cascade

    path = tmp_path / "ck"
    build_cascade(tiny_config(trainable=trainable)).save(path)
    shutil.rmtree(Path(ckpt.resolve(path)) / "text_encoder")
    how = "trained" if trainable else "built locally"
    with pytest.raises(FileNotFoundError, match=f"has no text_encoder/ folder, but its config.json says the text "
                                                f"encoder was {how}"):
        Cascade.from_checkpoint(path)
    assert Cascade.from_checkpoint(path, load_text_encoder=False).text_encoder is None  # precomputed embeddings


def test_load_weights_checks_dtypes_and_values_and_names_the_place():
    net = torch.nn.Linear(2, 2)
    good = {k: v.clone() for k, v in net.state_dict().items()}
    assert ckpt.load_weights(net, good, "here") is net
    with pytest.raises(ValueError, match=r"here: tensor 'weight' is torch.int64 where the network holds"):
        ckpt.load_weights(net, {**good, "weight": torch.ones(2, 2, dtype=torch.long)}, "here")
    with pytest.raises(ValueError, match=r"here: tensor 'bias': expected finite values, got 1 NaN or infinite"):
        ckpt.load_weights(net, {**good, "bias": torch.tensor([1.0, float("inf")])}, "here")
    with pytest.raises(ValueError, match="here does not fit the network: .*Missing key"):
        ckpt.load_weights(net, {"weight": good["weight"]}, "here")


def test_staging_folders_of_dead_processes_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    names = [f"imagen_lib_te_pid{int(dead.stdout)}_0123abcd", f"imagen_lib_te_pid{os.getpid()}_0123abcd",
             f"imagen_lib_te_pid{os.getppid()}_0123abcd", "imagen_lib_te_unrelated"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x")
    assert ckpt.sweep_staging_folders(tmp_path) == [names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


@pytest.mark.parametrize("where", ["local", "memory"])
def test_saving_and_loading_a_text_encoder_leaves_no_temporary_folder(tmp_path, monkeypatch, where):
    from imagen_lib.config import build_cascade

    cascade = build_cascade(tiny_config())
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = tmp_path / "ck" if where == "local" else f"memory://no-leak-{os.getpid()}/ck"
    cascade.save(path)
    loaded = Cascade.from_checkpoint(path)
    assert list((tmp_path / "tmp").iterdir()) == []
    a = cascade.text_encoder.encode(["a red circle"])[0]
    assert torch.equal(a, loaded.text_encoder.encode(["a red circle"])[0])
    if where == "local":  # written straight into the version folder
        assert json.loads((Path(ckpt.resolve(path)) / "text_encoder" / "config.json").read_text())
