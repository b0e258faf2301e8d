"""``imagen-lib precache --encoder NAME_OR_PATH INPUT OUTPUT``: encode every caption once with a text encoder
(a T5 or a CLIP: ``--encoder-kind``, default read from the folder's ``config.json``).

INPUT is one of
- an image-caption folder (``cat.png`` + ``cat.txt``): OUTPUT is a memory-mapped embedding store (a local
  folder) that ``ImageTextFolder(root, size, embeddings=OUTPUT)`` reads;
- a text file with one caption per line: OUTPUT is an embedding store keyed by line number (from 0);
- WebDataset shards (a ``.tar`` URL, brace pattern or glob, any fsspec URL): OUTPUT is a folder (any fsspec
  URL) that receives a copy of every shard with ``emb.npy`` + ``emb_mask.npy`` added to each sample.

Embeddings are float16, trimmed to each caption's real token length, with the mask. The work is resumable:
run the same command again after an interruption and it continues where it stopped.

``--autoencoder VAE --image-size S`` also encodes every image for a latent stage (seed 003's precached
latents; :mod:`imagen_lib.data.precache_latents`): a folder gets a latent store in OUTPUT/latents (config:
``data.latents``), shards a ``latent.npy`` per sample. Training then needs neither the VAE's weights (``lazy:
true`` in the stage's autoencoder block) nor the text encoder.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from imagen_lib.commands.sample import add_encoder_options, build_encoder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT", help="image-caption folder, captions .txt file, or shard URLs")
    parser.add_argument("output", metavar="OUTPUT", help="embedding store folder, or output shard folder")
    parser.add_argument("--encoder", required=True, metavar="NAME_OR_PATH",
                        help="text encoder hub name (e.g. google/t5-v1_1-xxl, openai/clip-vit-large-patch14) or local "
                             "folder with model + tokenizer")
    add_encoder_options(parser)
    parser.add_argument("--batch-size", type=int, default=64, help="captions encoded at once (default 64)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda, then mps, then cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="encoder weights' dtype (default: as saved; bfloat16 halves a large T5's memory)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--autoencoder", default=None, metavar="VAE",
                        help="also write the images' latents, encoded by this VAE (folder or hub name; diffusers)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="with --autoencoder: the latent stage's image_size (images are resized and centre-"
                             "cropped to it before encoding)")


def input_kind(value: str) -> Literal["folder", "captions", "shards"]:
    """What INPUT is: a local folder, a local ``.txt`` captions file, or shards (anything with ``.tar``)."""
    if "://" not in value and Path(value).is_dir():
        return "folder"
    if value.endswith(".txt") and "://" not in value and Path(value).is_file():
        return "captions"
    if ".tar" in value:
        return "shards"
    raise SystemExit(
        f"imagen-lib precache: INPUT {value!r} is neither a folder, a .txt captions file nor .tar shards"
    )


def fastest_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def run(args: argparse.Namespace) -> int:
    from imagen_lib.data.precache import precache_captions, precache_shards

    kind = input_kind(args.input)
    if args.batch_size < 1 or (args.max_length is not None and args.max_length < 1):
        raise SystemExit("imagen-lib precache: --batch-size and --max-length must be positive")
    device = args.device or fastest_device()
    encoder = build_encoder(args, device, dtype=args.dtype)
    progress = not args.no_progress
    latents = latent_options(args, kind, device)
    if kind == "shards":
        urls = precache_shards(encoder, args.input, args.output, batch_size=args.batch_size, progress=progress,
                               latents=latents)
        added = " + latent.npy" if latents else ""
        print(f"precache: wrote {len(urls)} shards with emb.npy + emb_mask.npy{added} to {args.output}")
        return 0
    if latents is not None:
        folder_latents(args, latents, progress)
    if kind == "folder":
        from imagen_lib.data.folder import ImageTextFolder

        # the size only matters for skipping tiny images; 1 keeps every readable one
        items = ImageTextFolder(args.input, image_size=1, min_size=1).captions()
    else:
        lines = Path(args.input).read_text(encoding="utf-8").splitlines()
        items = [(str(i), line.strip()) for i, line in enumerate(lines)]
    store = precache_captions(encoder, items, args.output, batch_size=args.batch_size, progress=progress)
    tokens = int(store.lengths.sum())
    megabytes = tokens * store.dim * 2 / 2**20
    print(
        f"precache: {len(store)} captions, {tokens} tokens of {store.dim} dims in float16 ({megabytes:.1f} MiB) "
        f"on {device}, in {args.output}"
    )
    return 0


def latent_options(args: argparse.Namespace, kind: str, device: str):
    """``(autoencoder, image_size)`` with ``--autoencoder`` (None without it), checked against INPUT."""
    if args.autoencoder is None:
        if args.image_size is not None:
            raise SystemExit("imagen-lib precache: --image-size is for --autoencoder")
        return None
    if kind == "captions":
        raise SystemExit("imagen-lib precache: --autoencoder needs images (a folder or shards), not a captions file")
    if args.image_size is None or args.image_size < 1:
        raise SystemExit("imagen-lib precache: --autoencoder needs --image-size (the latent stage's image_size)")
    from imagen_lib.latent import AutoencoderKL

    autoencoder = AutoencoderKL.from_pretrained(args.autoencoder, posterior="mean")
    autoencoder.model.to(device)
    return autoencoder, args.image_size


def folder_latents(args: argparse.Namespace, latents, progress: bool) -> None:
    """Encode an image-caption folder's images into the latent store OUTPUT/latents."""
    from imagen_lib.data.folder import ImageTextFolder
    from imagen_lib.data.precache_latents import precache_folder_latents

    autoencoder, size = latents
    dataset = ImageTextFolder(args.input, image_size=size, min_size=1)
    store = precache_folder_latents(autoencoder, dataset, Path(args.output) / "latents",
                                    batch_size=args.batch_size, progress=progress)
    print(f"precache: {len(store)} latents of shape {tuple(store.latents.shape[1:])} in {store.folder}")
