"""``imagen-lib sample CHECKPOINT (--prompt TEXT ... | --prompts-file FILE) --out DIR``: writes
``DIR/0000.png``, ``DIR/0001.png``, ... (image ``p * N + j`` is the ``j``-th of prompt ``p``, N images per
prompt) at the last stage's resolution, and ``DIR/grid.png`` with the captions. Runs on the GPU when there is
one, else on the CPU.

``--sampler``, ``--steps`` and ``--cond-scale`` take one value for every stage or ``STAGE=VALUE`` for one stage
(repeatable: ``--steps 30 --steps 1=15``); ``--negative-prompt`` steers guidance away from a text;
``--init-image`` with ``--strength`` starts the base stage from an image (SDEdit); ``--guidance-interval``,
``--autoguidance`` and ``--guide-checkpoint``: :mod:`imagen_lib.commands.guidance_flags`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from imagen_lib.commands.guidance_flags import (
    add_guidance_arguments,
    attach_guide,
    guidance_arguments,
    parse_number,
    stage_settings,
)

STAGE_OPTIONS = {"sampler": "--sampler", "steps": "--steps", "cond_scale": "--cond-scale"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder or fsspec URL (written by imagen-lib train)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", dest="prompts", action="extend", nargs="+", metavar="TEXT",
                        help="one or more prompts (repeatable)")
    source.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    add_stage_options(parser)
    parser.add_argument("--negative-prompt", default=None, metavar="TEXT",
                        help="guidance steers away from this text instead of the empty one (all prompts)")
    parser.add_argument("--init-image", type=Path, default=None, metavar="PATH",
                        help="image-to-image: start the base stage from this image (SDEdit)")
    parser.add_argument("--strength", type=float, default=None,
                        help="with --init-image: how much of the base stage's schedule runs, in (0, 1]; 1 ignores "
                             "the image, small values stay close to it (default 0.8)")
    parser.add_argument("--num-images-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="images generated at once (default 16)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA ones")
    parser.add_argument("--encoder", default=None, metavar="NAME_OR_FOLDER",
                        help="text encoder for the prompts when the checkpoint holds none (trained on precomputed "
                             "embeddings): the same model the embeddings came from, a hub name or a local folder")
    add_encoder_options(parser)
    add_guidance_arguments(parser)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def add_stage_options(parser: argparse.ArgumentParser) -> None:
    """``--steps``, ``--cond-scale`` and ``--sampler``: one value for every stage or ``STAGE=VALUE`` for one
    (also ``imagen-lib eval-shapes``'s; read back with :func:`sampler_arguments`)."""
    parser.add_argument("--steps", action="append", default=None, metavar="N|STAGE=N",
                        help="sampling steps for every stage, or STAGE=N for one (repeatable; default: the "
                             "checkpoint's)")
    parser.add_argument("--cond-scale", action="append", default=None, metavar="S|STAGE=S",
                        help="classifier-free guidance scale for every stage, or STAGE=S for one (repeatable; "
                             "default: the checkpoint's; 1 = no guidance)")
    parser.add_argument("--sampler", action="append", default=None, metavar="NAME|STAGE=NAME",
                        help="sampler for every stage, or STAGE=NAME for one (repeatable): euler, heun, "
                             "euler_ancestral, ddim, dpmpp_2m (default: the checkpoint's)")


def add_encoder_options(parser: argparse.ArgumentParser) -> None:
    """``--encoder-kind``, ``--max-length`` and ``--layer``: how ``--encoder`` is built (also ``imagen-lib
    precache``'s)."""
    parser.add_argument("--encoder-kind", default=None, metavar="KIND",
                        help="text encoder kind of --encoder, t5 or clip (imagen_lib.text.TEXT_ENCODERS; default: "
                             "read from its config.json's model_type)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per caption for --encoder (default: the encoder's, T5 128, CLIP 77)")
    parser.add_argument("--layer", default=None, choices=["last", "penultimate"],
                        help="CLIP only: the layer whose output conditions the images (default penultimate, SD 2; "
                             "last for SD 1.x)")


def build_encoder(args: argparse.Namespace, device, dtype=None):
    """The encoder named by ``--encoder`` with ``--encoder-kind``, ``--max-length`` and ``--layer`` (through the
    one text-encoder builder, :func:`imagen_lib.text.load_text_encoder`); errors name the option."""
    from imagen_lib.text import load_text_encoder

    try:
        return load_text_encoder(args.encoder, args.encoder_kind, max_length=args.max_length, layer=args.layer,
                                 dtype=dtype, device=device)
    except ValueError as error:
        option = {"max_length": "--max-length", "layer": "--layer", "kind": "--encoder-kind"}
        name = str(error).split(":", 1)[0]
        raise ValueError(f"{option.get(name, '--encoder')}: {error}") from error


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file is not None:
        prompts = [line.strip() for line in args.prompts_file.read_text(encoding="utf-8").splitlines()]
        prompts = [p for p in prompts if p]
    else:
        prompts = list(args.prompts)
    if not prompts:
        raise SystemExit("imagen-lib sample: no prompts given")
    return prompts


def attach_encoder(cascade, args: argparse.Namespace, device):
    """The cascade, given the encoder named by ``--encoder`` when its checkpoint was trained on precomputed
    embeddings (:meth:`Cascade.using`)."""
    if args.encoder is None:
        if cascade.text_encoder is None and cascade.text_embed_dim is not None:
            raise SystemExit("imagen-lib sample: this checkpoint holds no text encoder (it was trained on "
                             "precomputed embeddings); pass --encoder with the encoder's name or folder they came "
                             "from")
        return cascade
    if cascade.text_encoder is not None:
        raise SystemExit("imagen-lib sample: --encoder given, but the checkpoint already holds its text encoder")
    encoder = build_encoder(args, device)
    if encoder.embed_dim != cascade.text_embed_dim:
        raise SystemExit(f"imagen-lib sample: --encoder {args.encoder} gives {encoder.embed_dim}-wide embeddings, "
                         f"the checkpoint's networks expect {cascade.text_embed_dim}")
    return cascade.using(text_encoder=encoder.eval())


def _parse_int(option: str, text: str) -> int:
    from imagen_lib.validation import check_int

    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{option}: expected a positive int or STAGE=INT, got {text!r}") from None
    return check_int(option, value, low=1)


def _parse_sampler(option: str, text: str) -> str:
    from imagen_lib.diffusion.samplers import SAMPLERS

    if text not in SAMPLERS:
        raise ValueError(f"{option}: expected one of {sorted(SAMPLERS)} or STAGE=NAME, got {text!r}")
    return text


def sampler_arguments(args: argparse.Namespace, stages: Optional[int] = None) -> tuple[dict, dict]:
    """``--sampler``, ``--steps`` and ``--cond-scale`` as :meth:`Cascade.sample`'s call-wide settings and its
    ``stage_overrides``; with ``stages``, every named stage must exist."""
    parsers = {"sampler": _parse_sampler, "steps": _parse_int, "cond_scale": parse_number}
    texts = {name: getattr(args, name) for name in STAGE_OPTIONS}
    return stage_settings(STAGE_OPTIONS, texts, parsers, stages)


def check_arguments(args: argparse.Namespace) -> None:
    """The options, checked before the checkpoint is loaded (errors name the option)."""
    from imagen_lib.validation import check_int, check_number, check_seed

    check_int("--num-images-per-prompt", args.num_images_per_prompt, low=1)
    check_int("--batch-size", args.batch_size, low=1)
    check_int("--max-length", args.max_length, low=1, optional=True)
    for option, value in (("--encoder-kind", args.encoder_kind), ("--layer", args.layer)):
        if value is not None and args.encoder is None:
            raise ValueError(f"{option}: given without --encoder (it says how that encoder is built)")
    check_seed("--seed", args.seed)
    sampler_arguments(args)
    guidance_arguments(args)
    if args.strength is not None and args.init_image is None:
        raise ValueError("--strength: given without --init-image (it sets how much of that image is kept)")
    check_number("--strength", args.strength, low=0, high=1, low_open=True, optional=True)
    if args.init_image is not None and not args.init_image.is_file():
        raise FileNotFoundError(f"--init-image: no file at {args.init_image}")
    if args.negative_prompt is not None and not args.negative_prompt.strip():
        raise ValueError("--negative-prompt: expected a non-empty text")


def read_init_image(path: Path, channels: int, device):
    """The image at ``path`` as a (1, C, H, W) tensor in [0, 1] with the cascade's ``channels``."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255
    except UnidentifiedImageError:
        raise ValueError(f"--init-image: {path} is not an image file PIL can read") from None
    tensor = torch.from_numpy(pixels).reshape(*pixels.shape[:2], -1).permute(2, 0, 1)[None]
    if tensor.shape[1] != channels:
        raise ValueError(f"--init-image: this cascade makes {channels}-channel images, {path} gives {tensor.shape[1]}")
    return tensor.to(device)


def run(args: argparse.Namespace) -> int:
    import torch

    from imagen_lib.cascade import Cascade
    from imagen_lib.images import captioned_grid, save_png, to_pil

    prompts = read_prompts(args)
    check_arguments(args)
    n = args.num_images_per_prompt
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cascade = Cascade.from_checkpoint(str(args.checkpoint), use_ema=not args.no_ema, device=device)
    cascade = attach_encoder(cascade, args, device)
    cascade = attach_guide(cascade, args, *guidance_arguments(args, len(cascade.stages)))
    images = sample_all(cascade, prompts, args)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        to_pil(image).save(args.out / f"{i:04d}.png")
    captions = [p for p in prompts for _ in range(n)]
    save_png(str(args.out / "grid.png"), captioned_grid(images, captions, nrow=min(8, max(n, 4))))
    print(f"wrote {len(images)} images ({images.shape[-1]}x{images.shape[-2]}) and grid.png to {args.out}")
    return 0


def sample_all(cascade, prompts: list[str], args: argparse.Namespace):
    """Every prompt's images, ``--batch-size`` at a time; image ``i`` seeded with ``--seed + i``."""
    import torch

    from imagen_lib.cascade import InitImages

    settings, overrides = sampler_arguments(args, len(cascade.stages))
    more, more_overrides = guidance_arguments(args, len(cascade.stages))
    settings.update(more)
    for k, values in more_overrides.items():
        overrides.setdefault(k, {}).update(values)
    init = None if args.init_image is None else read_init_image(args.init_image, cascade.channels, cascade.device)
    strength = 0.8 if args.strength is None else args.strength
    n = args.num_images_per_prompt
    per_call = max(1, args.batch_size // n)  # prompts per call; image index (and its seed) is global
    images = []
    for p0 in range(0, len(prompts), per_call):
        chunk = prompts[p0 : p0 + per_call]
        start = None if init is None else InitImages(init, strength)
        images.append(cascade.sample(chunk, num_images_per_prompt=n, seed=args.seed + p0 * n,
                                     negative_prompt=args.negative_prompt, stage_overrides=overrides, start=start,
                                     **settings).cpu())
    return torch.cat(images)
