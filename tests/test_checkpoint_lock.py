"""The run lock: one training run per output folder; a second one refuses with a message that says who holds
it; a lock left by a killed process never blocks the next run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from imagen_lib.checkpoint import LOCK_FILE, FolderInUseError, RunLock

LOCK_MODULE = Path(__file__).resolve().parents[1] / "imagen_lib" / "checkpoint" / "lock.py"

# takes the lock with the module alone (standard library only: starts fast), says so, then waits to be killed
HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("lock", sys.argv[1])
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)
lock.RunLock(sys.argv[2], "run-in-subprocess").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_lock_on_the_folder_refuses_and_names_the_holder(tmp_path):
    out = tmp_path / "run"
    with RunLock(out, "run-a") as first:
        record = json.loads((out / LOCK_FILE).read_text())
        assert record["run_id"] == "run-a" and record["pid"] == os.getpid() and record["host"] and record["started"]
        with pytest.raises(FolderInUseError) as refused:
            RunLock(out, "run-b").acquire()
        message = str(refused.value)
        assert isinstance(refused.value, FileExistsError)
        assert str(out) in message and "in use by another training run" in message
        assert "run-a" in message and f"pid {os.getpid()}" in message and record["started"] in message
        assert "another output folder" in message
        assert first.path.exists()
    assert not (out / LOCK_FILE).exists()  # released and removed
    with RunLock(out, "run-b"):
        pass


def test_a_lock_held_by_a_process_that_was_killed_does_not_block(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(LOCK_MODULE), str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUseError, match=f"run-in-subprocess, pid {holder.pid} on "):
            RunLock(out, "run-b").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()
    assert (out / LOCK_FILE).exists()  # the kill left the file; the kernel freed the lock on it
    with RunLock(out, "run-b"):
        assert json.loads((out / LOCK_FILE).read_text())["run_id"] == "run-b"


def test_a_training_run_refuses_a_folder_another_run_holds(tmp_path):
    from tiny_cascade import tiny_config

    from imagen_lib.cli import main

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config(steps=1)))
    out = tmp_path / "run"
    with RunLock(out, "the-other-run"):
        with pytest.raises(FolderInUseError, match="in use by another training run .*the-other-run"):
            main(["train", str(config), "--out", str(out), "--no-progress", "--cpu"])
    assert sorted(p.name for p in out.iterdir()) == []  # it wrote nothing
