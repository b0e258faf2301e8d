"""The benchmarks' one child-process protocol: every measurement runs in a fresh Python process.

A fresh process per measurement makes its peak memory its own and keeps one failure (an out-of-memory
error, a crash) from ending the others. The child prints one line ``RESULT {json}`` on stdout
(:func:`print_result`); the parent (:func:`run_child`) starts it in the repository root with the repository
first on ``PYTHONPATH``, so that ``imagen_lib`` (and the shapes data set and judge the peer's environment
borrows from it) imports from this checkout whether or not it is installed, and returns the JSON of the
last such line. Used by run.py (children: worker.py, in our environment and in the peer's) and gpu.py
(children: gpu.py itself). Standard library only.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
PREFIX = "RESULT "
OUTPUT_TAIL = 4000  # characters of a failed child's stdout and of its stderr kept for the report


class ChildFailed(RuntimeError):
    """A child that printed no ``RESULT`` line; ``output`` is the tail of its stdout and stderr."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output


def print_result(result: dict[str, Any]) -> None:
    """The child's side: hand ``result`` (JSON-able) to the parent."""
    print(PREFIX + json.dumps(result), flush=True)


def child_environment(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """This process's environment with the repository first on ``PYTHONPATH``, updated with ``extra``."""
    paths = [str(REPO), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **(extra or {})}


def _tail(stdout: Any, stderr: Any) -> str:
    text = [s.decode(errors="replace") if isinstance(s, bytes) else (s or "") for s in (stdout, stderr)]
    return text[0][-OUTPUT_TAIL:] + text[1][-OUTPUT_TAIL:]


def run_child(cmd: list[str], env: Optional[dict[str, str]] = None, timeout: Optional[float] = None) -> dict[str, Any]:
    """The parent's side: run ``cmd`` in the repository root (environment: :func:`child_environment` of
    ``env``) and return the JSON of the last ``RESULT`` line it printed, whatever its exit status (a result
    printed before a crash at exit still counts). Raises :class:`ChildFailed` when it printed none or ran
    past ``timeout`` seconds (default None: no limit)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_environment(env), cwd=REPO,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise ChildFailed(f"timed out after {timeout:.0f} s", _tail(err.stdout, err.stderr)) from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith(PREFIX)]
    if not lines:
        raise ChildFailed(f"child exited with {proc.returncode}", _tail(proc.stdout, proc.stderr))
    return json.loads(lines[-1][len(PREFIX):])
