"""The README's Python blocks are the first code a user copies: they must run as written.

Every fenced ``python`` block runs, in order, in one namespace and in a temporary folder, with the training
shortened from ``steps=2000`` to 2 steps per stage.
"""

import re
from pathlib import Path

import torch

from imagen_lib.checkpoint import resolve

README = Path(__file__).resolve().parents[1] / "README.md"
MAX_README_BYTES = 8_500  # a front door: the tuning history lives in docs/experiments/


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_readme_stays_short():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes (limit {MAX_README_BYTES}): move detail to docs/"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = _python_blocks()
    assert blocks, "the README should show the Python API in at least one ```python block"
    code = "\n".join(blocks)
    assert "steps=2000" in code, "the test shortens the training by rewriting steps=2000"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for index, block in enumerate(blocks):
        exec(compile(block.replace("steps=2000", "steps=2"), f"{README}:python block {index}", "exec"), scope)

    # what the blocks promise: a checkpoint on disk, and images in [0, 1] at the last stage's size
    assert (Path(resolve(tmp_path / "runs" / "mine" / "checkpoint")) / "config.json").is_file()
    images = scope["images"]
    assert images.shape == (4, 3, 64, 64)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
