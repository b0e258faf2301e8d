"""The package as a new user meets it: the README's commands and a fast offline import."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "imagen_lib"


def _readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("```bash")
    block = lines[start + 1 : lines.index("```", start + 1)]
    return [line for line in block if line and not line.startswith("#")]


def test_readme_opens_with_the_main_job_and_the_test_command():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert [line for line in lines[: lines.index("```bash")] if line.strip()] == ["# imagen_lib"], (
        "the README should open with its title and then the bash block of the two commands"
    )
    main_job, test_command = _readme_commands()
    assert "imagen-lib train" in main_job and "pip install -q torch==2.13.0" in main_job
    assert "pytest" in test_command and "torch==2.13.0" in test_command


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert _readme_commands()[1] in ci_lines


def test_import_is_offline_and_lazy():
    # transformers and accelerate are heavy and may look for the hub: a bare import must not load them.
    code = (
        "import sys, imagen_lib; "
        "heavy = [m for m in ('transformers', 'accelerate', 'kornia', 'diffusers') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_latent_diffusion_names_are_exported_lazily():
    # CLIP, the discrete process and the VAE resolve to their modules' classes, still without loading
    # transformers or diffusers (those load when an encoder or an autoencoder is built).
    code = (
        "import sys, imagen_lib; "
        "from imagen_lib.diffusion.discrete import DiscreteDiffusion; "
        "from imagen_lib.latent.autoencoder import AutoencoderKL; "
        "from imagen_lib.text_clip import CLIPTextEncoder; "
        "assert imagen_lib.DiscreteDiffusion is DiscreteDiffusion; "
        "assert imagen_lib.AutoencoderKL is AutoencoderKL; "
        "assert imagen_lib.CLIPTextEncoder is CLIPTextEncoder; "
        "names = ('CLIPTextEncoder', 'DiscreteDiffusion', 'AutoencoderKL'); "
        "assert all(n in imagen_lib.__all__ and n in dir(imagen_lib) for n in names); "
        "print(','.join(m for m in ('transformers', 'diffusers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_unknown_attribute_names_the_attribute():
    import imagen_lib

    with pytest.raises(AttributeError, match="NoSuchThing"):
        imagen_lib.NoSuchThing  # noqa: B018
