"""``imagen-lib sample``'s sampling flags: ``--sampler``, ``--steps`` and ``--cond-scale`` for every stage or per
stage (``STAGE=VALUE``), ``--negative-prompt``, ``--init-image`` + ``--strength``; checked with one-line errors
that name the flag; the files equal what :meth:`Cascade.sample` gives for the same settings."""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_cascade import perturbed_checkpoint

from imagen_lib.cascade import Cascade, InitImages
from imagen_lib.cli import main
from imagen_lib.commands.sample import add_arguments, sampler_arguments

PROMPTS = ["a red circle", "a blue square"]


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["ckpt", "--prompt", "a", "--out", "o", *flags])


def test_one_value_sets_every_stage_and_stage_values_override():
    args = parse("--steps", "30", "--steps", "1=15", "--cond-scale", "0=7.5", "--sampler", "heun",
                 "--sampler", "1=euler")
    settings, overrides = sampler_arguments(args, stages=2)
    assert settings == {"steps": 30, "sampler": "heun"}
    assert overrides == {1: {"steps": 15, "sampler": "euler"}, 0: {"cond_scale": 7.5}}
    assert sampler_arguments(parse(), stages=2) == ({}, {})


@pytest.mark.parametrize("flags, pattern", [
    (["--steps", "x"], r"^--steps: expected a positive int or STAGE=INT, got 'x'"),
    (["--steps", "1=0"], r"^--steps: expected an int >= 1"),
    (["--steps", "3", "--steps", "4"], r"^--steps: given twice for every stage"),
    (["--steps", "1=3", "--steps", "1=4"], r"^--steps: stage 1 given twice"),
    (["--steps", "a=3"], r"^--steps: expected STAGE=VALUE with a stage index"),
    (["--cond-scale", "inf"], r"^--cond-scale: expected a finite number"),
    (["--cond-scale", "0=big"], r"^--cond-scale: expected a number or STAGE=NUMBER, got 'big'"),
    (["--sampler", "eulr"], r"^--sampler: expected one of \['ddim', .*got 'eulr'"),
    (["--strength", "0.5"], r"^--strength: given without --init-image"),
    (["--negative-prompt", " "], r"^--negative-prompt: expected a non-empty text"),
])
def test_bad_flags_are_named_before_the_checkpoint_is_read(tmp_path, flags, pattern):
    missing = tmp_path / "no-checkpoint"
    with pytest.raises(ValueError, match=pattern):
        main(["sample", str(missing), "--prompt", "a", "--out", str(tmp_path / "out"), *flags])


def test_init_image_and_strength_are_checked(tmp_path):
    base = ["sample", str(tmp_path / "none"), "--prompt", "a", "--out", str(tmp_path / "out")]
    with pytest.raises(FileNotFoundError, match=r"^--init-image: no file at"):
        main([*base, "--init-image", str(tmp_path / "missing.png")])
    Image.new("RGB", (8, 8)).save(tmp_path / "init.png")
    with pytest.raises(ValueError, match=r"^--strength: expected a value in \(0, 1\]|^--strength: "):
        main([*base, "--init-image", str(tmp_path / "init.png"), "--strength", "0"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return perturbed_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint")


def read_images(folder, count: int) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(Image.open(folder / f"{i:04d}.png"), dtype=np.float32))
                        .permute(2, 0, 1) / 255 for i in range(count)])


def test_the_flags_reach_the_sampler(checkpoint, tmp_path):
    init = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    Image.fromarray((init[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "init.png")
    dest = tmp_path / "out"
    flags = ["--sampler", "heun", "--sampler", "1=euler", "--steps", "3", "--steps", "1=2", "--cond-scale", "4",
             "--cond-scale", "1=1.5", "--negative-prompt", "a green triangle", "--init-image",
             str(tmp_path / "init.png"), "--strength", "0.7"]
    assert main(["sample", checkpoint, "--prompt", *PROMPTS, "--out", str(dest), "--seed", "3", *flags]) == 0
    cascade = Cascade.from_checkpoint(checkpoint)
    pixels = torch.from_numpy(np.asarray(Image.open(tmp_path / "init.png"), dtype=np.float32)).permute(2, 0, 1) / 255
    expected = cascade.sample(PROMPTS, seed=3, sampler="heun", steps=3, cond_scale=4.0,
                              stage_overrides={1: {"sampler": "euler", "steps": 2, "cond_scale": 1.5}},
                              negative_prompt="a green triangle", start=InitImages(pixels[None], 0.7),
                              disable_progress=True)
    torch.testing.assert_close(read_images(dest, 2), expected, atol=1 / 255 + 1e-6, rtol=0)
    plain = cascade.sample(PROMPTS, seed=3, disable_progress=True)
    assert (expected - plain).abs().mean() > 1e-3
    with pytest.raises(ValueError, match=r"^--steps: stage 2 does not exist; this checkpoint has stages 0 to 1"):
        main(["sample", checkpoint, "--prompt", "a", "--out", str(tmp_path / "x"), "--steps", "2=4"])
