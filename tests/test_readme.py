"""The README's Python block is the first code a user copies: it must run as written (2 steps per stage)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_python_block_runs(tmp_path, monkeypatch):
    blocks = _python_blocks()
    assert len(blocks) == 1, "the README should hold exactly one Python block (this test runs it)"
    code = blocks[0]
    assert "steps=2000" in code, "the test shortens the training by rewriting steps=2000"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace("steps=2000", "steps=2"), str(README), "exec"), scope)

    # what the block promises: a checkpoint on disk, and images in [0, 1] at the last stage's size
    assert (tmp_path / "runs" / "mine" / "checkpoint" / "config.json").is_file()
    images = scope["images"]
    assert images.shape == (4, 3, 64, 64)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
