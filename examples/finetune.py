"""Fine-tune one stage of a saved cascade on new data and write the result as a new checkpoint.

    python examples/finetune.py --checkpoint runs/shapes/checkpoint --stage 0 --out runs/shapes-pink \\
        --new-color pink --steps 500
    python examples/finetune.py --checkpoint runs/shapes/checkpoint --stage 1 --out runs/sr-ft \\
        --data path/to/images --freeze dblocks
    python examples/finetune.py --checkpoint runs/shapes/checkpoint --stage 0 --out runs/shapes-pink-lora \\
        --new-color pink --lora --lora-rank 8

The recipe: load the cascade with ``Cascade.from_checkpoint`` (EMA weights: the ones that sample best), train
stage k with a fresh optimizer at a lower learning rate (default: a tenth of the original run's), optionally
with parts of its network frozen, then write a new checkpoint folder. The original is only read: the other
stages' files (raw and EMA weights) are carried over unchanged, so the new checkpoint samples exactly like the
old one everywhere but stage k. Works under ``accelerate launch`` too (only the main process writes).

With ``--lora`` the stage's base weights stay frozen and LoRA adapters on its attention and feed-forward projections
are trained instead (``imagen_lib.training.lora``, through peft): they are written to ``OUT/lora`` (safetensors +
JSON, loadable onto the original with ``load_lora``), and ``OUT`` holds the cascade with them merged.

The default data teaches the shapes model a colour it never saw: a share of the built-in shapes is repainted
in ``--new-color`` and their captions say so ("a pink circle on the left"). A word-level text encoder does not
know that word (it would read it as ``<unk>``, like every other unknown word): the script adds the captions' new
words to its vocabulary and trains their embedding rows with the stage, every other word staying as it was
(``--keep-vocabulary`` turns this off).
"""

from __future__ import annotations

import argparse
import copy
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
from imagen_lib.cascade_checkpoint import read_text_encoder
from imagen_lib.data import shapes
from imagen_lib.training.lora import add_lora, has_lora, merge_lora, save_lora
from imagen_lib.training.vocabulary import fold_new_words, learn_new_words

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
    parser.add_argument("--lora", action="store_true",
                        help="train LoRA adapters (peft) instead of the stage's weights; written to OUT/lora too")
    parser.add_argument("--lora-rank", type=int, default=4, help="the adapters' rank (default 4)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="their scale numerator (default: the rank)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on their input (default 0)")
    parser.add_argument("--lora-target", action="append", default=None, metavar="NAME",
                        help="a Linear layer name to adapt (repeatable; default: the attention projections to_q, "
                             "to_kv, to_kv_text, proj_out and feed_forward)")
    parser.add_argument("--keep-vocabulary", action="store_true",
                        help="do not add the captions' unknown words to a word-level text encoder")
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


def captions(dataset: Dataset, limit: int = 256) -> list[str]:
    """The data set's captions (a folder's all, read without its images; else those of the first ``limit`` items)."""
    if hasattr(dataset, "captions"):
        return [text for _, text in dataset.captions()]
    items = dataset.__getitems__(list(range(min(limit, len(dataset)))))
    return [item["texts"] for item in items]


def teach_new_words(cascade: Cascade, dataset: Dataset, keep: bool) -> list[str]:
    """Add the captions' unknown words to a word-level encoder, their embedding rows trained with the stage."""
    encoder = cascade.text_encoder
    if encoder is None or encoder.word_vocabulary is None:
        return []
    unknown = encoder.unknown_words(captions(dataset))
    if unknown and keep:
        print(f"--keep-vocabulary: the text encoder reads {unknown} as <unk>")
    if not unknown or keep:
        return []
    new = learn_new_words(encoder, unknown)
    print(f"extending the text encoder's vocabulary with {new}: new embedding rows (the mean of the others) "
          "trained with the stage; every other word keeps its id and embedding")
    return new


def stage_weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``net``'s weights as the plain network has them (LoRA adapters merged into a copy)."""
    return merge_lora(copy.deepcopy(net)).state_dict() if has_lora(net) else net.state_dict()


def encoder_files(trainer: Trainer, source: str, local: str) -> tuple[dict, dict]:
    """The text encoder's folder and EMA weights for the new checkpoint: the original's files, or the extended
    encoder when new words were learned (its raw weights those of the original's raw encoder, new rows added)."""
    if trainer.text_ema is None:
        kept = {"text_encoder.ema": ckpt.read_tensors(source, "text_encoder.ema")} \
            if ckpt.has_file(source, "text_encoder.ema.safetensors") else {}
        folder = {"text_encoder": ckpt.download_folder(source, "text_encoder", local)} \
            if ckpt.has_file(source, "text_encoder") else {}
        return kept, folder
    encoder, ema = trainer.cascade.text_encoder, fold_new_words(trainer.text_ema.ema_model)
    fold_new_words(encoder.model)
    config = ckpt.read_config(source)["text_encoder"]
    raw = read_text_encoder(source, config, use_ema=False)  # the weights the original stores as raw
    raw.extend_vocabulary(encoder.source["added_words"])
    new_rows = slice(raw.model.get_input_embeddings().weight.shape[0] - len(encoder.source["added_words"]), None)
    with torch.no_grad():
        raw.model.get_input_embeddings().weight[new_rows] = encoder.model.get_input_embeddings().weight[new_rows]
    return {"text_encoder.ema": ema.state_dict()}, {"text_encoder": raw.save_pretrained}


def write_finetuned(trainer: Trainer, source: str, out: str, k: int, overwrite: bool) -> None:
    """The original checkpoint with stage k's raw and EMA weights replaced (LoRA adapters merged in): its config,
    the other stages' weight files and the text encoder's files are carried over as they are, save for new words
    the encoder learned (the optimizer state is left behind)."""
    tensors = {f"stage{k}": stage_weights(trainer.cascade.stages[k].net),
               f"stage{k}.ema": stage_weights(trainer.stages[k].ema.ema_model)}
    kept = [f"stage{j}{ema}" for j in range(trainer.num_stages) if j != k for ema in ("", ".ema")]
    tensors.update({name: ckpt.read_tensors(source, name) for name in kept
                    if ckpt.has_file(source, f"{name}.safetensors")})
    config = ckpt.read_config(source)
    if trainer.cascade.text_encoder is not None and "added_words" in trainer.cascade.text_encoder.source:
        config["text_encoder"]["source"] = dict(trainer.cascade.text_encoder.source)
    with tempfile.TemporaryDirectory() as local:
        encoder_tensors, folders = encoder_files(trainer, source, local)
        tensors.update(encoder_tensors)
        ckpt.write_checkpoint(out, config=config, tensors=tensors, folders=folders, overwrite=overwrite)


def add_adapters(cascade: Cascade, args: argparse.Namespace) -> int:
    """LoRA adapters on stage ``args.stage`` (errors name the option)."""
    if args.freeze:
        raise SystemExit("--freeze: LoRA already freezes every base weight of the stage; use one or the other")
    try:
        return add_lora(cascade, args.stage, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                        target_modules=args.lora_target)
    except (TypeError, ValueError) as error:
        option = {"rank": "--lora-rank", "alpha": "--lora-alpha", "dropout": "--lora-dropout",
                  "target_modules": "--lora-target"}.get(str(error).split(":")[0], "--lora")
        raise SystemExit(f"{option}: {error}") from error


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
    trained = add_adapters(cascade, args) if args.lora else freeze(cascade.stages[k].net, args.freeze)
    dataset = make_dataset(args, cascade.stages[k].image_size)
    new_words = teach_new_words(cascade, dataset, args.keep_vocabulary)

    base_lr = original_lr(args.checkpoint, k)
    lr = args.lr if args.lr is not None else (base_lr / 10 if base_lr is not None else 1e-5)
    # a short run: warm up briefly, and let the EMA follow from the first step with a shorter memory than
    # pre-training's 0.9999, or it would still hold the old weights at the end
    trainer = Trainer(cascade, lr=lr, cpu=args.cpu, warmup_steps=min(100, args.steps // 10),
                      ema_beta=0.995, ema_update_after_step=0, ema_update_every=1)
    torch.manual_seed(args.seed + trainer.accelerator.process_index)
    what = "LoRA adapter weights" if args.lora else "trained parameters"
    words = f" and the embeddings of {new_words}" if new_words else ""
    trainer.accelerator.print(f"fine-tuning stage {k} ({trained:,} {what}{words}) at lr {lr:g} for {args.steps} steps")

    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        collate_fn=dataset.collate_fn, generator=torch.Generator().manual_seed(args.seed))
    result = trainer.fit(loader, k, args.steps, disable_progress=args.no_progress)
    trainer.accelerator.print(f"stage {k}: {result['steps']} steps in {result['seconds']:.0f}s, "
                              f"loss {result['loss']:.4f}")

    if trainer.is_main_process:
        write_finetuned(trainer, args.checkpoint, args.out, k, args.overwrite)
        if args.lora:  # after the checkpoint: a folder holding only lora/ would not be one to write into
            save_lora(trainer, f"{args.out.rstrip('/')}/lora", base=args.checkpoint, overwrite=args.overwrite)
            print(f"wrote the adapters to {args.out.rstrip('/')}/lora (load_lora onto {args.checkpoint})")
        prompt = f"a {args.new_color} circle" if args.data == "shapes" else "a caption"
        print(f"wrote {args.out}; try: imagen-lib sample {args.out} --prompt \"{prompt}\" --out samples")
    trainer.accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
