"""examples/quickstart.ipynb runs as it stands, at tiny settings, from the repository root and from examples/.

The notebook is executed (nbclient) on a copy laid out as in the repository (``REPO/examples/quickstart.ipynb``)
with ``IMAGEN_QUICKSTART_TINY=1`` (read by its settings cell: a few steps and images). Wherever it starts, it
must write to ``REPO/runs/quickstart`` (never ``examples/runs``), show every picture it talks about, and its
closing ``imagen-lib sample`` command must succeed (a failing command fails its cell, and so the run). With the
main job's checkpoint in ``REPO/runs/shapes/checkpoint`` it loads that instead of training.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from imagen_lib.checkpoint import is_checkpoint

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"
# data preview, base samples, cascade samples, guidance, thresholding, samplers, inpainting, the command's grid
PICTURES = 8


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A repository layout holding only the notebook, with the notebook's tiny settings switched on."""
    monkeypatch.setenv("IMAGEN_QUICKSTART_TINY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    (tmp_path / "examples").mkdir()
    shutil.copy(NOTEBOOK, tmp_path / "examples" / NOTEBOOK.name)
    return tmp_path


def execute(cwd: Path):
    """Run the notebook with ``cwd`` as its working folder (as ``jupyter execute`` started there would)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def pictures(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def printed(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_notebook_is_stored_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])  # the settings cell comes first


@pytest.mark.parametrize("start", [".", "examples"])
def test_notebook_trains_and_writes_to_the_root_from_either_folder(repo, start):
    nb = execute(repo / start)
    out = repo / "runs" / "quickstart"
    assert is_checkpoint(out / "checkpoint")
    assert not (repo / "examples" / "runs").exists()
    assert pictures(nb) == PICTURES
    for name in ("data", "base-samples", "samples", "cond-scale", "thresholding", "samplers", "inpainting"):
        assert (out / f"{name}.png").is_file(), name
    # the closing command: printed to run from the root, run there, its grid written and shown
    assert f"cd {repo}" in printed(nb) and "imagen-lib sample runs/quickstart/checkpoint" in printed(nb)
    assert len(list((out / "cli-samples").glob("0*.png"))) == 8 and (out / "cli-samples" / "grid.png").is_file()


def test_notebook_loads_the_main_jobs_checkpoint_when_there_is_one(repo):
    execute(repo)  # trains a tiny cascade into runs/quickstart/checkpoint: it stands in for the main job's
    shutil.move(repo / "runs" / "quickstart", repo / "runs" / "shapes")
    nb = execute(repo / "examples")
    assert "loading it, not training" in printed(nb)
    assert not (repo / "runs" / "quickstart" / "checkpoint").exists()  # nothing trained
    assert "imagen-lib sample runs/shapes/checkpoint" in printed(nb)
    assert (repo / "runs" / "quickstart" / "cli-samples" / "grid.png").is_file()
    assert pictures(nb) == PICTURES
