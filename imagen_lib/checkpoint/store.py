"""The few operations a checkpoint save needs, on a local folder (with ``fsync`` and ``os.replace``) or on any
other fsspec file system (object stores: one ``pipe_file`` per file, a put being atomic there).

A save writes each file of a new version, makes them durable, then replaces one small pointer file in one
atomic step (:meth:`LocalStore.commit` / :meth:`FsspecStore.commit`); nothing else is ever renamed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Optional, Union

import fsspec

from imagen_lib.checkpoint.files import file_system, is_local, staging_folder

POINTER_TMP = "latest.tmp-"


def _fsync(path: Union[str, Path]) -> None:
    """Make a file's contents, or a folder's entries (files created or renamed in it), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(target: Path, data: bytes) -> None:
    """Write ``target`` and ``fsync`` it before returning."""
    with open(target, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class LocalStore:
    """A checkpoint folder on the local disk: every file and folder written is ``fsync``-ed before the pointer
    is replaced with ``os.replace``."""

    def __init__(self, root: str):
        self.root = Path(root)

    def kind(self) -> Optional[str]:
        """"dir", "file" or None (nothing at the root)."""
        return "dir" if self.root.is_dir() else "file" if self.root.exists() else None

    def entries(self) -> dict[str, bool]:
        """{name: is a folder} of the root's entries (empty when it does not exist)."""
        try:
            return {e.name: e.is_dir(follow_symlinks=False) for e in os.scandir(self.root)}
        except (FileNotFoundError, NotADirectoryError):
            return {}

    def read(self, name: str) -> Optional[bytes]:
        try:
            return (self.root / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def make_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, data: bytes) -> None:
        """Write ``root/name`` (its folder made first) and ``fsync`` it."""
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_durably(target, data)

    def write_folder(self, name: str, writer: Callable[[Path], None]) -> None:
        """Let ``writer`` fill the local folder ``root/name`` in place, then ``fsync`` what it wrote."""
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        writer(folder)
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                _fsync(file)

    def sync(self, folder: str) -> None:
        """Make ``root/folder``'s whole tree of entries, and the root's own entry of it, durable."""
        top = self.root / folder
        for sub in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            _fsync(sub)
        _fsync(top)
        _fsync(self.root)

    def commit(self, name: str, data: bytes) -> None:
        """Replace ``root/name`` atomically: a temporary file, ``fsync``, ``os.replace``, ``fsync`` of the root."""
        tmp = self.root / f"{POINTER_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        _write_durably(tmp, data)
        os.replace(tmp, self.root / name)
        _fsync(self.root)

    def remove(self, name: str) -> None:
        path = self.root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            os.unlink(path)

    def siblings(self) -> dict[str, Callable[[], None]]:
        """{name: remover} of the entries next to the root."""
        try:
            return {e.name: (lambda p=Path(e.path): LocalStore(str(p.parent)).remove(p.name))
                    for e in os.scandir(self.root.parent)}
        except OSError:
            return {}


class FsspecStore:
    """A checkpoint folder on any other fsspec file system (``memory://``, ``s3://``, ``gs://``, ...): one
    ``pipe_file`` per file; the pointer is one more ``pipe_file``, which object stores make atomic."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str):
        self.fs, self.root = fs, root

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def kind(self) -> Optional[str]:
        self.fs.invalidate_cache(self.root)
        if self.fs.isdir(self.root):
            return "dir"
        return "file" if self.fs.exists(self.root) else None

    def entries(self) -> dict[str, bool]:
        self.fs.invalidate_cache(self.root)
        try:
            listed = self.fs.ls(self.root, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["type"] == "directory" for e in listed
                if e["name"].rstrip("/") != self.root}

    def read(self, name: str) -> Optional[bytes]:
        try:
            return self.fs.cat_file(self._path(name))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def make_root(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    def write(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(name), data)

    def write_folder(self, name: str, writer: Callable[[Path], None]) -> None:
        """Let ``writer`` fill a local staging folder, then upload its files under ``root/name``."""
        with staging_folder() as local:
            writer(local)
            for file in sorted(local.rglob("*")):
                if file.is_file():
                    self.write(f"{name}/{file.relative_to(local).as_posix()}", file.read_bytes())

    def sync(self, folder: str) -> None:
        """Nothing to do: a put is durable once it returns."""

    def commit(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(name), data)

    def remove(self, name: str) -> None:
        try:
            self.fs.rm(self._path(name), recursive=True)
        except FileNotFoundError:
            pass

    def siblings(self) -> dict[str, Callable[[], None]]:
        parent = self.root.rsplit("/", 1)[0] if "/" in self.root.strip("/") else None
        if not parent:
            return {}
        names = FsspecStore(self.fs, parent).entries()
        return {name: (lambda n=name: FsspecStore(self.fs, parent).remove(n)) for name in names}


Store = Union[LocalStore, FsspecStore]


def open_store(path) -> Store:
    """The store of a checkpoint path or URL (local paths and ``file://`` URLs get :class:`LocalStore`)."""
    fs, root = file_system(path)
    return LocalStore(root) if is_local(fs) else FsspecStore(fs, root)
