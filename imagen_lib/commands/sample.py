"""``imagen-lib sample CHECKPOINT (--prompt TEXT ... | --prompts-file FILE) --out DIR``: writes
``DIR/0000.png``, ``DIR/0001.png``, ... (image ``p * N + j`` is the ``j``-th of prompt ``p``, N images per
prompt) at the last stage's resolution, and ``DIR/grid.png`` with the captions. Runs on the GPU when there is
one, else on the CPU."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder or fsspec URL (written by imagen-lib train)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", dest="prompts", action="extend", nargs="+", metavar="TEXT",
                        help="one or more prompts (repeatable)")
    source.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps for every stage (default: the checkpoint's)")
    parser.add_argument("--cond-scale", type=float, default=None,
                        help="classifier-free guidance scale (default: the checkpoint's)")
    parser.add_argument("--num-images-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="images generated at once (default 16)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA ones")
    parser.add_argument("--encoder", default=None, metavar="NAME_OR_FOLDER",
                        help="T5 encoder for the prompts when the checkpoint holds none (trained on precomputed "
                             "embeddings): the same model the embeddings came from, a hub name or a local folder")
    parser.add_argument("--max-length", type=int, default=128, help="token limit for --encoder (default 128)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


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
                             "precomputed embeddings); pass --encoder with the T5 name or folder they came from")
        return cascade
    if cascade.text_encoder is not None:
        raise SystemExit("imagen-lib sample: --encoder given, but the checkpoint already holds its text encoder")
    from imagen_lib.text import T5TextEncoder

    encoder = T5TextEncoder(args.encoder, max_length=args.max_length, device=device)
    if encoder.embed_dim != cascade.text_embed_dim:
        raise SystemExit(f"imagen-lib sample: --encoder {args.encoder} gives {encoder.embed_dim}-wide embeddings, "
                         f"the checkpoint's networks expect {cascade.text_embed_dim}")
    return cascade.using(text_encoder=encoder.eval())


def check_arguments(args: argparse.Namespace) -> None:
    """The numeric options, checked before the checkpoint is loaded (errors name the option)."""
    from imagen_lib.validation import check_int, check_number, check_seed

    check_int("--num-images-per-prompt", args.num_images_per_prompt, low=1)
    check_int("--batch-size", args.batch_size, low=1)
    check_int("--steps", args.steps, low=1, optional=True)
    check_int("--max-length", args.max_length, low=1)
    check_number("--cond-scale", args.cond_scale, optional=True)
    check_seed("--seed", args.seed)


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
    per_call = max(1, args.batch_size // n)  # prompts per call; image index (and its seed) is global
    images = []
    for p0 in range(0, len(prompts), per_call):
        chunk = prompts[p0 : p0 + per_call]
        images.append(cascade.sample(chunk, num_images_per_prompt=n, seed=args.seed + p0 * n, steps=args.steps,
                                     cond_scale=args.cond_scale).cpu())
    images = torch.cat(images)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        to_pil(image).save(args.out / f"{i:04d}.png")
    captions = [p for p in prompts for _ in range(n)]
    save_png(str(args.out / "grid.png"), captioned_grid(images, captions, nrow=min(8, max(n, 4))))
    print(f"wrote {len(images)} images ({images.shape[-1]}x{images.shape[-2]}) and grid.png to {args.out}")
    return 0
