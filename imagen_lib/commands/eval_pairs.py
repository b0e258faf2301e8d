"""``imagen-lib eval-shapes --objects 2``: how often a cascade draws the two shapes and the relation a pair
caption asks for, on seen and on held-out colour combinations.

Draws N captions from each split of the shape-pairs grammar (``seen``: the training combinations, ``heldout``:
the colour arrangements never trained on; :mod:`imagen_lib.data.shapes_pairs`) with a fixed seed, samples one
image per caption (image ``i`` of a split uses seed + i), reads each with the pair judge
(:mod:`imagen_lib.data.shapes_pairs_reader`) and reports per-object, relation and everything-right accuracy,
the share with exactly two shapes and ``relation_given_colors`` (the relation among the images whose two
colours are right: whether order binds to place), per split. Writes ``eval_pairs.json`` and ``eval_pairs.png`` (held-out
captions first; a wrong reading is noted after the caption) under the output folder.
"""

from __future__ import annotations

from typing import Any, Optional

from imagen_lib.commands.judging import sample_in_batches, write_json

# the report's split names -> the data set's
PAIR_SPLITS: dict[str, str] = {"seen": "train", "heldout": "heldout"}


def config_objects(checkpoint: str) -> int:
    """2 when the run that wrote ``checkpoint`` trained on ``data: {type: shape_pairs}`` (read from the
    ``config.yaml`` that ``imagen-lib train`` writes beside the checkpoint folder), else 1."""
    import fsspec
    import yaml

    parent = checkpoint.rstrip("/").rsplit("/", 1)[0] if "/" in checkpoint.rstrip("/") else "."
    fs, path = fsspec.core.url_to_fs(f"{parent}/config.yaml")
    if not fs.exists(path):
        return 1
    with fs.open(path, "r") as handle:
        config = yaml.safe_load(handle) or {}
    data = config.get("data") if isinstance(config, dict) else None
    return 2 if isinstance(data, dict) and data.get("type") == "shape_pairs" else 1


def evaluate_pairs(
    cascade: Any, n: int = 200, seed: int = 0, *, batch_size: int = 32, progress: bool = True, **sample_kwargs: Any,
) -> dict[str, tuple[dict, list[str], Any]]:
    """Sample ``n`` pair captions of each split (seed ``seed``) with ``cascade.sample`` and score them.

    Returns ``{"seen": (report, texts, images), "heldout": (...)}``: the
    :func:`~imagen_lib.data.shapes_pairs_reader.score_pairs` report with the drawn ``attributes`` added, the
    captions and the images (n, 3, H, W) in [0, 1]. ``sample_kwargs`` go to ``cascade.sample``.
    """

    from imagen_lib.data.shapes_pairs import sample_pair_captions
    from imagen_lib.data.shapes_pairs_reader import score_pairs

    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}")
    results = {}
    for name, split in PAIR_SPLITS.items():
        texts, attributes = sample_pair_captions(n, seed=seed, split=split)
        images = sample_in_batches(cascade, texts, seed, batch_size=batch_size, progress=progress,
                                   desc=f"eval-pairs {name}", **sample_kwargs)
        report = score_pairs(images, attributes, value_range=(0.0, 1.0))
        report["attributes"] = attributes
        results[name] = (report, texts, images)
    return results


def _grid_captions(texts: list[str], report: dict) -> list[str]:
    captions = []
    for text, reading, correct in zip(texts, report["readings"], report["correct"]):
        wrong = [k for k, ok in correct.items() if not ok and k not in ("everything", "two_shapes")]
        if reading["count"] != 2:
            wrong.append(f"{reading['count']} shapes")
        captions.append(text + (f" [wrong: {', '.join(wrong)}]" if wrong else ""))
    return captions


def write_pair_results(out: str, results: dict, settings: dict, grid: int = 64) -> tuple[str, str]:
    """Write ``eval_pairs.json`` and ``eval_pairs.png`` under ``out`` (any fsspec URL); returns their paths."""
    import torch

    from imagen_lib.images import captioned_grid, save_png

    summary: dict[str, Any] = {**settings, "splits": {}}
    for name, (report, texts, _) in results.items():
        per_image = [{"text": t, "attributes": a, "reading": r, "correct": c}
                     for t, a, r, c in zip(texts, report["attributes"], report["readings"], report["correct"])]
        summary["splits"][name] = {"n": report["n"], "accuracy": report["accuracy"], "images": per_image}
    json_path = write_json(f"{out.rstrip('/')}/eval_pairs.json", summary)
    order = ["heldout", "seen"]
    shown = [max(grid // 2, 1)] * 2
    images = torch.cat([results[k][2][:m] for k, m in zip(order, shown)])
    captions = [c for k, m in zip(order, shown) for c in _grid_captions(results[k][1], results[k][0])[:m]]
    png_path = save_png(f"{out.rstrip('/')}/eval_pairs.png", captioned_grid(images, captions, nrow=8, max_lines=5))
    return json_path, png_path


def run_pairs(args: Any, cascade: Any, sample_kwargs: dict[str, Optional[Any]], out: str) -> int:
    """The ``--objects 2`` branch of ``imagen-lib eval-shapes``: evaluate, write, print the table."""
    from imagen_lib.data.shapes_pairs_reader import format_pair_report

    results = evaluate_pairs(cascade, args.n, args.seed, batch_size=args.batch_size, **sample_kwargs)
    settings = {"checkpoint": str(args.checkpoint), "seed": args.seed, "ema": not args.no_ema, **sample_kwargs}
    json_path, png_path = write_pair_results(out, results, settings, grid=args.grid)
    print(format_pair_report({name: report for name, (report, _, _) in results.items()}))
    print(f"eval-shapes: {args.n} pair prompts per split (seed {args.seed}); wrote {json_path} and {png_path}")
    return 0
