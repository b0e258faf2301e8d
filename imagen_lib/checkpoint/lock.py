"""One training run per output folder: :class:`RunLock` holds ``OUT/.imagen_lib.lock`` for the whole run.

The lock is an ``fcntl.flock`` on that file, which the kernel releases when the process ends however it ends,
so a run killed with SIGKILL never blocks the next one (resume after a kill just works). The file records who
holds it (run id, pid, host, start time) for the message a second run gets. Local folders only: ``flock`` does
not reach across object stores (and not reliably across network file systems). Standard library only, so it
can be taken before anything heavy is imported.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional, Union

LOCK_FILE = ".imagen_lib.lock"


class FolderInUseError(FileExistsError):
    """Another live process holds the run lock of this folder."""


class RunLock:
    """Exclusive hold on a run's local output ``folder`` (created if missing), for a ``with`` block or between
    :meth:`acquire` and :meth:`release`.

    Args:
        folder: the run's output folder (a local path).
        run_id: recorded in the lock file for the message another run gets [None].
    """

    def __init__(self, folder: Union[str, Path], run_id: Optional[str] = None):
        self.folder, self.run_id = Path(folder), run_id
        self.path = self.folder / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise :class:`FolderInUseError` naming the run that holds it."""
        if self._fd is not None:
            raise RuntimeError(f"RunLock: {self.path} is already held by this RunLock")
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise FolderInUseError(self._in_use_message(holder)) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # a holder released (and removed) the file between our open and our lock: retry
        self._fd = fd
        record = {"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return self

    def release(self) -> None:
        """Give the lock back (the file is removed first, while still held, so nobody locks a stale one)."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                os.unlink(self.path)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _in_use_message(self, holder: dict) -> str:
        who = (f"run {holder.get('run_id')}, pid {holder.get('pid')} on {holder.get('host')}, started "
               f"{holder.get('started')}") if holder else "no details recorded"
        return (f"out: {self.folder} is in use by another training run ({who}); wait for it to end or stop it, "
                f"or choose another output folder (the lock, {self.path}, frees itself when that process ends)")


def _same_file(fd: int, path: Path) -> bool:
    try:
        held, named = os.fstat(fd), os.stat(path)
        return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> dict:
    try:
        value = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
