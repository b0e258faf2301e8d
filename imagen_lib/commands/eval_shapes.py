"""``imagen-lib eval-shapes CHECKPOINT``: how often a cascade draws what shapes captions ask for.

Draws N captions from the captioned-shapes grammar with a fixed seed, samples one image per caption
(image ``i`` uses seed + i, so the result does not depend on the batch size), reads each image back with
the classical judge of :mod:`imagen_lib.data.shapes_reader`, and reports for each attribute the share of
images that show it among those whose caption mentions it, and the share with every mentioned attribute
right. Prints a table and writes ``eval_shapes.json`` and ``eval_shapes.png`` (a captioned grid; a wrong
reading is noted after the caption) to ``--out`` (default: ``eval-shapes`` beside the checkpoint folder).
``--steps``, ``--cond-scale`` and ``--sampler`` take one value for every stage or ``STAGE=VALUE`` for one, as in
``imagen-lib sample`` (``--cond-scale 0=6`` guides the base harder and leaves a super-resolution stage as saved).
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

from imagen_lib.commands.guidance_flags import add_guidance_arguments, attach_guide, guidance_arguments
from imagen_lib.commands.judging import sample_in_batches, write_json
from imagen_lib.commands.sample import STAGE_OPTIONS, add_stage_options, sampler_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder or fsspec URL (written by imagen-lib train)")
    parser.add_argument("--n", type=int, default=200, help="captions to draw and sample (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the captions and of the sampling (default 0)")
    add_stage_options(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="images sampled at once (default 32)")
    parser.add_argument("--grid", type=int, default=64, help="images shown in the grid PNG (default 64)")
    parser.add_argument("--out", default=None,
                        help="output folder or fsspec URL (default: eval-shapes beside the checkpoint folder)")
    parser.add_argument("--stop-at-stage", type=int, default=None,
                        help="judge the output of this stage (0 = the base stage; default: the last stage)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA ones")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--objects", type=int, choices=(1, 2), default=None,
                        help="2: judge shape-pair captions, seen and held-out (default: 2 when the run trained on "
                             "data type shape_pairs, else 1)")
    add_guidance_arguments(parser)


def evaluate_cascade(
    cascade: Any,
    n: int = 200,
    seed: int = 0,
    *,
    batch_size: int = 32,
    progress: bool = True,
    **sample_kwargs: Any,
) -> tuple[dict, list[str], Any]:
    """Sample ``n`` shapes captions (seed ``seed``) with ``cascade.sample`` and score them.

    ``sample_kwargs`` go to ``cascade.sample`` (``steps``, ``cond_scale``, ``sampler``, ``stop_at_stage``, ...).
    Returns ``(report, texts, images)``: the :func:`~imagen_lib.data.shapes_reader.score_shapes` report with
    the drawn ``attributes`` added, the captions, and the images (n, 3, H, W) in [0, 1].
    """

    from imagen_lib.data.shapes import sample_captions
    from imagen_lib.data.shapes_reader import score_shapes

    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}")
    texts, attributes = sample_captions(n, seed=seed)
    images = sample_in_batches(cascade, texts, seed, batch_size=batch_size, progress=progress, **sample_kwargs)
    report = score_shapes(images, attributes, value_range=(0.0, 1.0))
    report["attributes"] = attributes
    return report, texts, images


def _grid_captions(texts: list[str], report: dict) -> list[str]:
    captions = []
    for text, reading, correct in zip(texts, report["readings"], report["correct"]):
        if reading["shape"] is None:
            captions.append(text + " [no shape found]")
            continue
        wrong = [f"{k}={reading[k]}" for k, ok in correct.items() if not ok]
        if reading["count"] != 1:
            wrong.append(f"{reading['count']} shapes")
        captions.append(text + (f" [read: {', '.join(wrong)}]" if wrong else ""))
    return captions


def write_results(
    out: str, report: dict, texts: list[str], images: Any, settings: dict, grid: int = 64,
) -> tuple[str, str]:
    """Write ``eval_shapes.json`` and ``eval_shapes.png`` under ``out`` (any fsspec URL); returns their paths."""

    from imagen_lib.images import captioned_grid, save_png

    per_image = [
        {"text": t, "attributes": a, "reading": {k: v for k, v in r.items() if k != "measured"},
         "measured": r["measured"], "correct": c}
        for t, a, r, c in zip(texts, report["attributes"], report["readings"], report["correct"])
    ]
    summary = {**settings, "n": report["n"], "accuracy": report["accuracy"], "mentioned": report["mentioned"],
               "all_correct": report["all_correct"], "one_shape": report["one_shape"],
               "all_correct_one_shape": report["all_correct_one_shape"], "images": per_image}
    json_path = write_json(f"{out.rstrip('/')}/eval_shapes.json", summary)
    shown = min(grid, len(texts))
    sheet = captioned_grid(images[:shown], _grid_captions(texts, report)[:shown], nrow=8, max_lines=5)
    png_path = save_png(f"{out.rstrip('/')}/eval_shapes.png", sheet)
    return json_path, png_path


def run(args: argparse.Namespace) -> int:
    import torch

    from imagen_lib.cascade import Cascade
    from imagen_lib.commands.eval_pairs import config_objects, run_pairs
    from imagen_lib.data.shapes_reader import format_report

    if args.n < 1 or args.batch_size < 1:
        raise SystemExit("imagen-lib eval-shapes: --n and --batch-size must be positive")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sampler_arguments(args), guidance_arguments(args)  # checked before the checkpoint loads
    cascade = Cascade.from_checkpoint(str(args.checkpoint), use_ema=not args.no_ema, device=device)
    stage_settings, overrides = sampler_arguments(args, len(cascade.stages))
    guide_settings, guide_overrides = guidance_arguments(args, len(cascade.stages))
    for k, values in guide_overrides.items():
        overrides.setdefault(k, {}).update(values)
    cascade = attach_guide(cascade, args, guide_settings, guide_overrides)
    sample_kwargs: dict[str, Optional[Any]] = {name: stage_settings.get(name) for name in STAGE_OPTIONS}
    sample_kwargs.update(stop_at_stage=args.stop_at_stage, **guide_settings, stage_overrides=overrides or None)
    checkpoint = str(args.checkpoint).rstrip("/")
    out = args.out or (checkpoint.rsplit("/", 1)[0] + "/eval-shapes" if "/" in checkpoint else "eval-shapes")
    if (args.objects or config_objects(checkpoint)) == 2:
        return run_pairs(args, cascade, sample_kwargs, out)
    report, texts, images = evaluate_cascade(cascade, args.n, args.seed, batch_size=args.batch_size, **sample_kwargs)
    settings = {"checkpoint": str(args.checkpoint), "seed": args.seed, "ema": not args.no_ema, **sample_kwargs,
                "guide_checkpoint": args.guide_checkpoint}
    json_path, png_path = write_results(out, report, texts, images, settings, grid=args.grid)
    print(format_report(report))
    print(f"eval-shapes: {args.n} prompts (seed {args.seed}); wrote {json_path} and {png_path}")
    return 0
