"""Fine-tune one stage of a saved cascade on new data and write the result as a new checkpoint.

    python examples/finetune.py --checkpoint runs/shapes/checkpoint --stage 0 --out runs/shapes-pink \\
        --new-color pink --steps 500
    python examples/finetune.py --checkpoint runs/shapes/checkpoint --stage 1 --out runs/sr-ft \\
        --data path/to/images --freeze dblocks

The recipe: load the cascade with ``Cascade.from_checkpoint`` (EMA weights: the ones that sample best), train
stage k with a fresh optimizer at a lower learning rate (default: a tenth of the original run's), optionally
with parts of its network frozen, then write a new checkpoint folder. The original is only read: the other
stages' files (raw and EMA weights) are carried over unchanged, so the new checkpoint samples exactly like the
old one everywhere but stage k. Works under ``accelerate launch`` too (only the main process writes).

The default data teaches the shapes model a colour it never saw: a share of the built-in shapes is repainted
in ``--new-color`` and their captions say so ("a pink circle on the left").
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from imagen_lib import Cascade, ShapesDataset, Trainer
from imagen_lib import checkpoint as ckpt
from imagen_lib.data import shapes

# Colours absent from the shapes data set (its palette is imagen_lib.data.shapes.COLORS), as RGB in 0..255.
NEW_COLORS: dict[str, tuple[int, int, int]] = {"pink": (245, 130, 190), "cyan": (40, 200, 210), "brown": (130, 80, 40)}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="the checkpoint to start from (folder or fsspec URL); never modified")
    parser.add_argument("--stage", type=int, required=True, help="index of the stage to fine-tune (0 = base)")
    parser.add_argument("--out", required=True, help="where the new checkpoint goes (a new folder)")
    parser.add_argument("--data", default="shapes",
                        help="'shapes' (default; with --new-color), or a folder of images with a same-named .txt "
                             "caption beside each")
    parser.add_argument("--new-color", default="pink", choices=sorted(NEW_COLORS),
                        help="colour taught on the shapes data (default pink)")
    parser.add_argument("--new-color-share", type=float, default=0.5,
                        help="share of shapes images repainted in it (default 0.5)")
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps (default 500)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size per process (default 16)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default: a tenth of the original run's, 1e-5 if it is not recorded)")
    parser.add_argument("--freeze", action="append", default=[], metavar="PREFIX",
                        help="freeze the stage's parameters whose names start with PREFIX (repeatable), e.g. "
                             "'cond', 'down' (Unet), 'dblocks' (EfficientUnet)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order and training noise (default 0)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# data: the shapes with a new colour
# ---------------------------------------------------------------------------------------------------------


class RecoloredShapes(Dataset):
    """The built-in shapes with a share of the items repainted in a new colour, captions changed to match.

    The renderer draws ``background + coverage * (colour - background)``, so each pixel's coverage is recovered
    exactly from the known colours and the shape is redrawn with the new one, antialiased edges included.
    """

    collate_fn = staticmethod(shapes.collate_shapes)

    def __init__(self, base: ShapesDataset, color: str, share: float = 0.5):
        if color not in NEW_COLORS:
            raise ValueError(f"color: expected one of {sorted(NEW_COLORS)}, got {color!r}")
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share: expected a fraction in [0, 1], got {share}")
        self.base, self.color, self.share = base, color, float(share)

    def __len__(self) -> int:
        return len(self.base)

    def _repaint(self, item: dict[str, Any]) -> dict[str, Any]:
        attrs = item["attributes"]
        bg = torch.tensor(shapes.BACKGROUNDS[attrs["background"]], dtype=torch.float32)[:, None, None]
        old = torch.tensor(shapes.COLORS[attrs["color"]], dtype=torch.float32)[:, None, None]
        new = torch.tensor(NEW_COLORS[self.color], dtype=torch.float32)[:, None, None]
        pixels = (item["images"] + 1) * 127.5  # [-1, 1] -> [0, 255]
        # least-squares coverage over the three channels (exact: the image is linear in the coverage)
        coverage = ((pixels - bg) * (old - bg)).sum(0) / (old - bg).square().sum()
        image = (bg + coverage.clamp(0, 1) * (new - bg)) / 127.5 - 1
        # "an orange circle" -> "a pink circle", "orange square, ..." -> "pink square, ..."
        text = re.sub(rf"\ban? {attrs['color']}\b", f"a {self.color}", item["texts"])
        text = re.sub(rf"\b{attrs['color']}\b", self.color, text)
        return {"images": image, "texts": text, "attributes": {**attrs, "color": self.color}}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        items = self.base.__getitems__(indices)
        # whether item i is repainted depends only on (seed, i), like everything else in the data set
        draws = [np.random.default_rng([self.base.seed, int(i), 0xC0102]).random() for i in indices]
        return [self._repaint(it) if u < self.share else it for it, u in zip(items, draws)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]


def make_dataset(args: argparse.Namespace, image_size: int) -> Dataset:
    if args.data == "shapes":
        shapes_data = ShapesDataset(image_size=image_size, seed=args.seed)
        return RecoloredShapes(shapes_data, args.new_color, args.new_color_share)
    from imagen_lib.data.folder import ImageTextFolder

    return ImageTextFolder(args.data, image_size)


# ---------------------------------------------------------------------------------------------------------
# the fine-tuning
# ---------------------------------------------------------------------------------------------------------


def freeze(net: torch.nn.Module, prefixes: Sequence[str]) -> int:
    """Stop gradients to parameters whose names start with one of ``prefixes``; returns how many remain trained."""
    tops = sorted({name.split(".")[0] for name, _ in net.named_parameters()})
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name, _ in net.named_parameters()):
            raise SystemExit(f"--freeze: no parameter name starts with {prefix!r}; the top-level parts are {tops}")
    for name, p in net.named_parameters():
        if any(name.startswith(prefix) for prefix in prefixes):
            p.requires_grad_(False)
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def original_lr(path: str, k: int) -> Optional[float]:
    """Stage k's peak learning rate in the run that wrote ``path`` (None when it has no trainer state)."""
    if not ckpt.has_file(path, "trainer.json"):
        return None
    lr = ckpt.read_json(path, "trainer").get("settings", {}).get("lr")
    return float(lr[k] if isinstance(lr, list) else lr) if lr is not None else None


def check_out(source: str, out: str, overwrite: bool) -> None:
    """The new checkpoint must go somewhere else: never into (or around) the original."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if "://" not in source and "://" not in out and (dst == src or src in dst.parents or dst in src.parents):
        raise SystemExit(f"--out: {out} overlaps the original checkpoint {source}; choose a new folder")
    if ckpt.is_checkpoint(out) and not overwrite:
        raise SystemExit(f"--out: {out} already holds a checkpoint; pass --overwrite or choose a new folder")


def write_finetuned(trainer: Trainer, source: str, out: str, k: int, overwrite: bool) -> None:
    """The original checkpoint with stage k's raw and EMA weights replaced: its config, the other stages' weight
    files and the text encoder's files are carried over as they are (the optimizer state is left behind)."""
    tensors = {f"stage{k}": trainer.cascade.stages[k].net.state_dict(),
               f"stage{k}.ema": trainer.stages[k].ema.ema_model.state_dict()}
    kept = [f"stage{j}{ema}" for j in range(trainer.num_stages) if j != k for ema in ("", ".ema")]
    kept.append("text_encoder.ema")
    tensors.update({name: ckpt.read_tensors(source, name) for name in kept
                    if ckpt.has_file(source, f"{name}.safetensors")})
    with tempfile.TemporaryDirectory() as local:
        folders = {}
        if ckpt.has_file(source, "text_encoder"):
            folders["text_encoder"] = ckpt.download_folder(source, "text_encoder", local)
        ckpt.write_checkpoint(out, config=ckpt.read_config(source), tensors=tensors, folders=folders,
                              overwrite=overwrite)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    check_out(args.checkpoint, args.out, args.overwrite)
    cascade = Cascade.from_checkpoint(args.checkpoint)  # EMA weights where the checkpoint has them
    n = len(cascade.stages)
    if not 0 <= args.stage < n:
        raise SystemExit(f"--stage: expected an index in [0, {n - 1}], got {args.stage}")
    k = args.stage
    if cascade.text_encoder is not None:  # shared by all stages: training it would change the stages we keep
        cascade.text_encoder.set_trainable(False)
    trained = freeze(cascade.stages[k].net, args.freeze)

    base_lr = original_lr(args.checkpoint, k)
    lr = args.lr if args.lr is not None else (base_lr / 10 if base_lr is not None else 1e-5)
    # a short run: warm up briefly, and let the EMA follow from the first step with a shorter memory than
    # pre-training's 0.9999, or it would still hold the old weights at the end
    trainer = Trainer(cascade, lr=lr, cpu=args.cpu, warmup_steps=min(100, args.steps // 10),
                      ema_beta=0.995, ema_update_after_step=0, ema_update_every=1)
    torch.manual_seed(args.seed + trainer.accelerator.process_index)
    trainer.accelerator.print(f"fine-tuning stage {k} ({trained:,} trained parameters) at lr {lr:g} "
                              f"for {args.steps} steps")

    dataset = make_dataset(args, cascade.stages[k].image_size)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        collate_fn=dataset.collate_fn, generator=torch.Generator().manual_seed(args.seed))
    result = trainer.fit(loader, k, args.steps, disable_progress=args.no_progress)
    trainer.accelerator.print(f"stage {k}: {result['steps']} steps in {result['seconds']:.0f}s, "
                              f"loss {result['loss']:.4f}")

    if trainer.is_main_process:
        write_finetuned(trainer, args.checkpoint, args.out, k, args.overwrite)
        prompt = f"a {args.new_color} circle" if args.data == "shapes" else "a caption"
        print(f"wrote {args.out}; try: imagen-lib sample {args.out} --prompt \"{prompt}\" --out samples")
    trainer.accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
