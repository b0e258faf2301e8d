"""Latent diffusion on the built-in shapes, on a CPU: train a small KL autoencoder (unless one is given), judge
its reconstructions (the ceiling of any latent stage on it), then train the latent stage of
examples/latent_shapes.yaml on its latents, then judge the samples with eval-shapes.

    python examples/latent_shapes.py --out runs/latent_shapes
    python examples/latent_shapes.py --out runs/ls --autoencoder VAE_FOLDER --set stages.0.train.steps=500

Writes OUT/autoencoder (config.json + safetensors), OUT/checkpoint, OUT/samples.png and OUT/eval-shapes/.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from imagen_lib.cli import main as imagen_lib_cli

CONFIG = Path(__file__).with_name("latent_shapes.yaml")
# TINY_VAE (widths 16-32-32, one ResNet block a level) with two levels: images shrink by f = 2, so 32 px images
# become 16 x 16 x 4 latents. With f = 4 (8 x 8 x 4) the judge read the shapes of only 59% of the
# reconstructions after 600 steps (f = 2: 71%; docs/experiments/2026-11-30-s9-latent-shapes.md).
AE_CONFIG = {"ch_mult": [1, 2]}
PIXEL_P_MEAN = -0.4  # examples/shapes.yaml's 16 px pixel base, which learns the position words


def shapes_images(count: int, size: int, seed: int) -> torch.Tensor:
    """``count`` shapes images (count, 3, size, size) in [-1, 1], drawn apart from the training stream's seed."""
    from imagen_lib.data.shapes import ShapesDataset

    data = ShapesDataset(image_size=size, length=count, seed=seed)
    return torch.stack([data[i]["images"] for i in range(count)])


def autoencoder_folder(args: argparse.Namespace, out: Path) -> str:
    """The given autoencoder, or a small one trained here on shapes images and saved to OUT/autoencoder."""
    if args.autoencoder:
        return args.autoencoder
    from imagen_lib.latent import train_autoencoder

    folder = out / "autoencoder"
    if (folder / "config.json").exists():
        print(f"autoencoder: reusing {folder}")
        return str(folder)
    start = time.time()
    images = shapes_images(args.ae_images, args.image_size, seed=12345)
    # the objects' pixels weigh 1 + foreground_weight: in a plain mean the background decides the error, and
    # the small objects' colours and outlines were lost (3% of the reconstructions all right, session 8)
    auto = train_autoencoder(images, ddconfig=AE_CONFIG, steps=args.ae_steps, batch_size=args.ae_batch_size,
                             lr=2e-3, foreground_weight=args.ae_foreground_weight, progress=not args.no_progress)
    with torch.no_grad():
        error = (auto.decode(auto.encode_mean(images[:256])) - images[:256]).abs().mean().item()
    auto.save_pretrained(folder)
    print(f"autoencoder: {args.ae_steps} steps in {(time.time() - start) / 60:.1f} min, reconstruction L1 "
          f"{error:.4f} (images in [-1, 1]), scaling factor {auto.scaling_factor:.4f}, saved to {folder}")
    print(f"autoencoder: its reconstructions of {args.eval_n} held-out images read "
          f"{judge_reconstructions(auto, args.eval_n, args.image_size):.1%} all right (the latent stage's ceiling)")
    return str(folder)


def judge_reconstructions(auto, count: int, size: int) -> float:
    """The share of ``count`` held-out shapes images whose reconstruction (posterior mean) the judge reads right."""
    from imagen_lib.data.shapes import ShapesDataset
    from imagen_lib.data.shapes_reader import score_shapes

    items = [ShapesDataset(image_size=size, length=count, seed=777)[i] for i in range(count)]
    images = torch.stack([item["images"] for item in items])
    with torch.no_grad():
        rebuilt = auto.decode(auto.encode_mean(images)).clamp(-1, 1)
    return score_shapes(rebuilt, [item["attributes"] for item in items], value_range=(-1, 1))["all_correct"]


def config_sigma_data() -> float:
    """The latent stage's ``sigma_data`` in examples/latent_shapes.yaml (before any --set)."""
    import yaml

    return float(yaml.safe_load(CONFIG.read_text())["stages"][0]["diffusion"]["config"]["sigma_data"])


def report_noise_level(folder: str, size: int, sigma_data: float) -> None:
    """Print how much louder the objects are in the latents (in units of the latent stage's ``sigma_data``) than
    in the pixel base's 16 px images (sigma_data 0.5), as the shift of EDM's P_mean it asks for
    (:func:`imagen_lib.latent.noise_level_shift`): the latent stage must train that much higher to learn where
    the captions put the objects (docs/latent.md)."""
    from imagen_lib.latent import AutoencoderKL, noise_level_shift
    from imagen_lib.sampling_options import resize

    images = shapes_images(256, size, seed=777)
    with torch.no_grad():
        latents = AutoencoderKL.from_pretrained(folder).encode_mean(images)
    shift = noise_level_shift(latents, sigma_data, resize(images, 16), 0.5)
    print(f"autoencoder: its latents' objects stand {math.exp(shift):.2f} times as far from the background as the "
          f"16 px pixels' (each in units of its sigma_data): P_mean {PIXEL_P_MEAN} + ln {math.exp(shift):.2f} = "
          f"{PIXEL_P_MEAN + shift:.2f} trains the latent stage as often as the pixel base at the noise levels that "
          f"decide the layout")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/latent_shapes", help="output folder (default runs/latent_shapes)")
    parser.add_argument("--autoencoder", default=None, help="a saved or published VAE (default: train one here)")
    parser.add_argument("--ae-steps", type=int, default=1500, help="autoencoder training steps (default 1500)")
    parser.add_argument("--ae-batch-size", type=int, default=32, help="autoencoder batch size (default 32)")
    parser.add_argument("--ae-images", type=int, default=4096, help="images it trains on (default 4096)")
    parser.add_argument("--ae-foreground-weight", type=float, default=10.0,
                        help="extra loss weight of the objects' pixels (default 10)")
    parser.add_argument("--image-size", type=int, default=32, help="pixel size (default 32, the config's)")
    parser.add_argument("--eval-n", type=int, default=200, help="captions eval-shapes judges (default 200)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides, as imagen-lib train --set")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    vae = autoencoder_folder(args, out)
    report_noise_level(vae, args.image_size, sigma_data=config_sigma_data())
    quiet = ["--no-progress"] if args.no_progress else []
    sets = [f"--set={s}" for s in [f"stages.0.autoencoder.pretrained={vae}", *args.overrides]]
    status = imagen_lib_cli(["train", str(CONFIG), "--out", str(out), "--cpu", *sets, *quiet])
    if status == 0:
        status = imagen_lib_cli(["eval-shapes", str(out / "checkpoint"), "--n", str(args.eval_n),
                                 "--out", str(out / "eval-shapes")])
    print(f"latent_shapes: {(time.time() - start) / 60:.1f} min in all")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
