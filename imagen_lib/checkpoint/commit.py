"""Writing a checkpoint so that a kill at any instant leaves the previous one or the new one, complete.

A checkpoint ``path`` is a folder of versions and a pointer::

    path/latest                    JSON: {"version": "v000012-step-000120-000040-3f2a91bc", "run_id": ...,
                                          "kept": [older committed versions, newest first], ...}
    path/v000012-.../              one complete version: config.json, stage{k}.safetensors, ... (the layout
    path/v000011-.../              of imagen_lib.checkpoint), kept while ``keep_last`` says so

A save writes every file of a new version folder (locally each file and folder ``fsync``-ed), re-reads the
pointer to check that the checkpoint is still this run's, then replaces the pointer in one atomic step
(locally a temporary file, ``fsync``, ``os.replace`` and ``fsync`` of the folder; elsewhere one put). Only then
does it delete what the pointer no longer needs: versions beyond ``keep_last``, versions and temporary files of
interrupted saves, the files of a flat checkpoint it replaced, and the ``path.tmp-*``/``path.old-*`` folders an
older imagen_lib left. Loaders only ever follow the pointer (:func:`resolve`); a flat folder (``config.json``
directly inside, no ``latest``: checkpoints written before versions) still loads.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from torch import Tensor

from imagen_lib.checkpoint.files import PathLike, decode_json_object, join, sweep_staging_folders
from imagen_lib.checkpoint.store import POINTER_TMP, Store, open_store
from imagen_lib.validation import check_int

POINTER = "latest"
CONFIG_FILE = "config.json"
FORMAT = "imagen_lib-checkpoint-1"
# beside the versions, never swept and no sign of a foreign folder: post-hoc EMA snapshots (training.posthoc_ema)
POSTHOC_FOLDER = "posthoc_ema"
_VERSION = re.compile(r"^v(\d{6,})-(?:([A-Za-z0-9][A-Za-z0-9._-]*)-)?([0-9a-f]{8})$")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_OLD_SIBLING = r"^{name}\.(tmp|old)-[0-9a-f]{{8}}$"  # the two-rename protocol of older imagen_lib versions
# what a flat checkpoint holds at its top level (removed once a versioned checkpoint replaced it)
_FLAT_ENTRY = re.compile(r"^(.+\.safetensors|(?!latest$).+\.json|text_encoder)$")

FolderSource = Union[PathLike, Callable[[Path], None]]


def version_name(seq: int, label: Optional[str] = None) -> str:
    """``v<seq, 6+ digits>-[<label>-]<8 random hex digits>``: unique, and sorted by ``seq``."""
    middle = f"{label}-" if label else ""
    return f"v{seq:06d}-{middle}{uuid.uuid4().hex[:8]}"


def version_seq(name: str) -> Optional[int]:
    """The sequence number of a version folder's name, or None when ``name`` is not one."""
    match = _VERSION.match(name)
    return int(match.group(1)) if match else None


@dataclass
class _State:
    """What a checkpoint folder holds now."""

    kind: str  # "missing", "file", "empty", "versioned", "flat", "foreign"
    pointer: Optional[dict] = None
    run_id: Optional[str] = None
    versions: list[str] = field(default_factory=list)


def read_pointer(store: Store, where: str) -> Optional[dict]:
    """The pointer's JSON, or None when there is none; a damaged one is an error naming it."""
    data = store.read(POINTER)
    if data is None:
        return None
    pointer = decode_json_object(data, f"{POINTER} in {where}")
    version = pointer.get("version")
    if not isinstance(version, str) or version_seq(version) is None:
        raise ValueError(f"{POINTER} in {where} is not valid: 'version' must name a version folder "
                         f"(v000001-...), got {version!r}")
    return pointer


def _flat_run_id(store: Store, where: str) -> Optional[str]:
    data = store.read("trainer.json")
    return None if data is None else decode_json_object(data, f"trainer.json in {where}").get("run_id")


def inspect(store: Store, where: str) -> _State:
    """Classify the folder: a versioned or a flat checkpoint, empty (or only debris of interrupted saves),
    missing, a file, or foreign (files that are not a checkpoint)."""
    kind = store.kind()
    if kind is None or kind == "file":
        return _State("missing" if kind is None else "file")
    entries = store.entries()
    versions = sorted((n for n, is_dir in entries.items() if is_dir and version_seq(n) is not None), key=version_seq)
    pointer = read_pointer(store, where) if POINTER in entries else None
    if pointer is not None:
        return _State("versioned", pointer, pointer.get("run_id"), versions)
    if CONFIG_FILE in entries and not entries[CONFIG_FILE]:
        return _State("flat", None, _flat_run_id(store, where), versions)
    ours = set(versions) | {POSTHOC_FOLDER} | {n for n in entries if n.startswith(POINTER_TMP)}
    return _State("empty" if set(entries) <= ours else "foreign", versions=versions)


def _check_may_write(state: _State, path: PathLike, overwrite: bool, run_id: Optional[str]) -> None:
    if state.kind == "file":
        raise FileExistsError(f"path: {path!s} exists and is not a checkpoint folder")
    if state.kind == "foreign":
        raise FileExistsError(f"path: {path!s} holds files that are not a checkpoint; refusing to overwrite")
    if state.kind in ("versioned", "flat") and not overwrite and (run_id is None or state.run_id != run_id):
        raise FileExistsError(f"path: {path!s} already holds a checkpoint that this run did not write (run "
                              f"{state.run_id}); pass overwrite=True to replace it")


def _write_version(store: Store, version: str, config: dict, tensors: Mapping, json_files: Mapping,
                   folders: Mapping[str, FolderSource]) -> None:
    """Every file of version folder ``version``, made durable (``config.json`` last, as in a flat folder)."""
    from safetensors.torch import save as save_safetensors

    for name, state in dict(tensors).items():
        # clone: safetensors refuses tensors that share storage (tied weights), and views must be contiguous
        plain = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
        store.write(f"{version}/{name}.safetensors", save_safetensors(plain))
    for name, payload in dict(json_files).items():
        store.write(f"{version}/{name}.json", json.dumps(payload, indent=1).encode())
    for name, source in dict(folders).items():
        store.write_folder(f"{version}/{name}", source if callable(source) else _copier(Path(source)))
    store.write(f"{version}/{CONFIG_FILE}", json.dumps(config, indent=1).encode())
    store.sync(version)


def _copier(source: Path) -> Callable[[Path], None]:
    def copy(target: Path) -> None:
        for file in sorted(source.rglob("*")):
            if file.is_file():
                out = target / file.relative_to(source)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(file.read_bytes())

    return copy


def write_checkpoint(
    path: PathLike, *, config: dict, tensors: Mapping[str, Mapping[str, Tensor]] = (),
    json_files: Mapping[str, dict] = (), folders: Mapping[str, FolderSource] = (), overwrite: bool = False,
    run_id: Optional[str] = None, keep_last: int = 1, label: Optional[str] = None,
) -> str:
    """Commit a new version of the checkpoint at ``path`` (a folder path or fsspec URL) and return ``path``.

    Args:
        config: written to ``config.json`` (plain JSON values).
        tensors: ``{"stage0": state_dict, ...}`` -> ``stage0.safetensors``, ...
        json_files: ``{"trainer": {...}}`` -> ``trainer.json``.
        folders: ``{"text_encoder": source}``: a local folder whose files are copied under that name, or a
            function that writes the files into the local folder it is given (locally: the version folder
            itself; elsewhere a temporary folder that is uploaded).
        overwrite: replace a checkpoint another run wrote (default False: ``FileExistsError``). A folder that
            holds files and is no checkpoint is never overwritten.
        run_id: the writer's run id, stored in the pointer; a checkpoint committed with the same one is
            replaced without ``overwrite`` (resumable runs). Checked again right before the pointer is written.
        keep_last: committed versions kept, the new one included (default 1).
        label: put in the version's name (letters, digits, ``.``, ``_``, ``-``), e.g. ``"step-000120-000040"``.
    """
    keep_last = check_int("keep_last", keep_last, low=1)
    if label is not None and not isinstance(label, str):
        raise TypeError(f"label: expected a string or None, got {type(label).__name__}")
    if label is not None and not _LABEL.match(label):
        raise ValueError(f"label: expected letters, digits, '.', '_' or '-' (at most 100), got {label!r}")
    sweep_staging_folders()
    store = open_store(path)
    before = inspect(store, str(path))
    _check_may_write(before, path, overwrite, run_id)
    store.make_root()
    seq = 1 + max([version_seq(v) for v in before.versions]
                  + [version_seq(before.pointer["version"]) if before.pointer else 0])
    version = version_name(seq, label)
    _write_version(store, version, config, tensors, json_files, folders)
    now = inspect(store, str(path))  # the authoritative check: what is committed right now
    try:
        # overwrite=True replaces what the caller saw, not a checkpoint committed since by someone else
        _check_may_write(now, path, overwrite and _same_commit(before, now), run_id)
    except FileExistsError:
        store.remove(version)  # ours, never committed
        raise
    kept = _kept(now.pointer, keep_last)
    pointer = {"format": FORMAT, "version": version, "run_id": run_id, "kept": kept,
               "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.commit(POINTER, json.dumps(pointer, indent=1).encode())
    _sweep(store, pointer, seq)
    return str(path)


def _same_commit(before: _State, now: _State) -> bool:
    return (before.kind, before.pointer, before.run_id) == (now.kind, now.pointer, now.run_id)


def _kept(previous: Optional[dict], keep_last: int) -> list[str]:
    """The committed versions the new pointer keeps (newest first): the previous one and those it kept."""
    if previous is None:
        return []
    older = [previous["version"], *[v for v in previous.get("kept", []) if isinstance(v, str)]]
    return [v for v in older if version_seq(v) is not None][: keep_last - 1]


def _sweep(store: Store, pointer: dict, seq: int) -> None:
    """Delete what the just committed ``pointer`` does not need: other versions up to ``seq`` (a save started
    later by someone else may be writing a higher one), temporary pointer files, a replaced flat checkpoint's
    files, and the tmp/old siblings of the older two-rename protocol."""
    needed = {pointer["version"], *pointer["kept"]}
    for name, is_dir in store.entries().items():
        number = version_seq(name) if is_dir else None
        stale_version = number is not None and number <= seq and name not in needed
        if stale_version or name.startswith(POINTER_TMP) or _FLAT_ENTRY.match(name):
            store.remove(name)
    old_sibling = re.compile(_OLD_SIBLING.format(name=re.escape(Path(str(store.root)).name)))
    for name, remove in store.siblings().items():
        if old_sibling.match(name):
            remove()


# ---------------------------------------------------------------------------------------------------------
# following the pointer
# ---------------------------------------------------------------------------------------------------------


def resolve(path: PathLike) -> str:
    """The folder of the committed version of the checkpoint at ``path`` (``path/<version>``, keeping a URL's
    protocol), or ``path`` itself for a flat checkpoint; ``FileNotFoundError`` when there is none."""
    store = open_store(path)
    pointer = read_pointer(store, str(path))
    if pointer is not None:
        version = pointer["version"]
        if store.read(f"{version}/{CONFIG_FILE}") is None:
            raise FileNotFoundError(f"path: checkpoint {path!s}: its {POINTER} names version {version}, which has "
                                    f"no {CONFIG_FILE} (the folder was removed or damaged)")
        return join(path, version)
    if store.read(CONFIG_FILE) is not None:
        return str(path)
    hint = ""
    old = re.compile(_OLD_SIBLING.format(name=re.escape(Path(str(store.root)).name)))
    left = sorted(n for n in store.siblings() if old.match(n) and ".old-" in n)
    if left and store.kind() is None:
        hint = f"; an interrupted save of an older imagen_lib left {left[-1]} beside it: rename it to recover"
    raise FileNotFoundError(f"path: {path!s} is not a checkpoint folder (no {POINTER} and no {CONFIG_FILE}){hint}")


def is_checkpoint(path: PathLike) -> bool:
    """True when ``path`` holds a committed checkpoint (versioned or flat)."""
    try:
        resolve(path)
    except FileNotFoundError:
        return False
    return True


def checkpoint_run_id(path: PathLike) -> Optional[str]:
    """The ``run_id`` the committed checkpoint at ``path`` was written with, or None (none recorded, or no
    checkpoint)."""
    state = inspect(open_store(path), str(path))
    return state.run_id if state.kind in ("versioned", "flat") else None
