"""``imagen-lib ema CHECKPOINT``: post-hoc EMA (EDM2) from the snapshots a run stored with its checkpoint
(``trainer.posthoc_ema`` in the config; :mod:`imagen_lib.training.posthoc_ema`).

- ``--sigma-rel 0.08 --out NEW``: write a checkpoint whose EMA weights are the EMA of that relative length,
  reconstructed by least squares over the snapshots (an existing checkpoint at ``NEW`` only with
  ``--overwrite``); sample or judge it like any other.
- ``--sweep 0.03 0.05 0.08 0.12 0.2``: reconstruct each length and judge it with the shapes judge
  (``eval-shapes``' sampling and scoring), beside the checkpoint's own (classic) EMA, and print a table, so
  the EMA length is chosen after the run.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder or fsspec URL whose run stored post-hoc EMA snapshots")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--sigma-rel", type=float, default=None,
                      help="relative EMA length to reconstruct into --out (EDM2's sigma_rel, in (0, 0.2887))")
    what.add_argument("--sweep", type=float, nargs="+", default=None, metavar="SIGMA_REL",
                      help="reconstruct each length and judge it with the shapes judge (prints a table)")
    parser.add_argument("--out", default=None, help="with --sigma-rel: the new checkpoint's folder or URL")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already at --out")
    parser.add_argument("--step", type=int, default=None,
                        help="training step to reconstruct (default: the last snapshot of each stage)")
    parser.add_argument("--from-sigma-rels", type=float, nargs="+", default=None, metavar="SIGMA_REL",
                        help="use only the snapshots of these tracked lengths (default: all)")
    parser.add_argument("--n", type=int, default=200, help="--sweep: captions judged per length (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="--sweep: seed of captions and sampling (default 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="--sweep: images sampled at once (default 32)")
    parser.add_argument("--stop-at-stage", type=int, default=None,
                        help="--sweep: judge the output of this stage (0 = the base; default: the last stage), e.g. "
                             "for a run that trained only the base (--stages 0)")
    parser.add_argument("--json", default=None, help="--sweep: also write the table as JSON to this file")
    parser.add_argument("--device", default=None, help="--sweep: torch device (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    from imagen_lib.training.posthoc_ema import save_reconstruction

    if args.sweep is None:
        if args.out is None:
            raise ValueError("--out: needed with --sigma-rel (the folder of the new checkpoint)")
        path = save_reconstruction(args.checkpoint, args.out, args.sigma_rel, args.step,
                                   from_sigma_rels=args.from_sigma_rels, overwrite=args.overwrite)
        print(f"ema: wrote {path} (EMA of sigma_rel {args.sigma_rel} reconstructed from {args.checkpoint})")
        return 0
    if args.out is not None:
        raise ValueError("--out: only with --sigma-rel (a sweep writes no checkpoint; --json writes its table)")
    rows = sweep(args.checkpoint, args.sweep, step=args.step, from_sigma_rels=args.from_sigma_rels, n=args.n,
                 seed=args.seed, batch_size=args.batch_size, device=args.device, stop_at_stage=args.stop_at_stage)
    print(format_sweep(rows, args.n, args.seed))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0


def sweep(checkpoint: str, sigma_rels: list[float], *, step: Optional[int] = None,
          from_sigma_rels: Optional[list[float]] = None, n: int = 200, seed: int = 0, batch_size: int = 32,
          device: Optional[str] = None, progress: bool = True, stop_at_stage: Optional[int] = None,
          ) -> list[dict[str, Any]]:
    """Judge the checkpoint's classic EMA and the reconstruction of each of ``sigma_rels`` on ``n`` shapes
    captions (seed ``seed``; :func:`imagen_lib.commands.eval_shapes.evaluate_cascade`) at the output of
    ``stop_at_stage`` (default: the last stage); one row each: ``{"ema", "all_correct", "accuracy"}``."""
    import torch

    from imagen_lib import checkpoint as ckpt
    from imagen_lib.cascade import Cascade
    from imagen_lib.commands.eval_shapes import evaluate_cascade
    from imagen_lib.training.posthoc_ema import check_sigma_rel, reconstruct_ema

    sigma_rels = [check_sigma_rel(f"sweep[{i}]", v) for i, v in enumerate(sigma_rels)]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cascade = Cascade.from_checkpoint(str(checkpoint), use_ema=True, device=device)
    reconstructions = {s: reconstruct_ema(checkpoint, s, step, from_sigma_rels=from_sigma_rels) for s in sigma_rels}
    rows = []
    for label in ["classic", *sigma_rels]:
        if label != "classic":
            for k, weights in reconstructions[label].items():
                where = f"the reconstruction of stage {k} (sigma_rel {label})"
                ckpt.load_weights(cascade.stages[k].net, weights, where)
        report, _, _ = evaluate_cascade(cascade, n, seed, batch_size=batch_size, progress=progress,
                                        stop_at_stage=stop_at_stage)
        rows.append({"ema": label, "all_correct": report["all_correct"], "accuracy": report["accuracy"]})
        if progress:
            print(f"ema {label}: {100 * report['all_correct']:.1f}% all right", flush=True)
    return rows


def format_sweep(rows: list[dict[str, Any]], n: int, seed: int) -> str:
    """The sweep as a plain-text table: all-right share and each attribute's accuracy per EMA."""
    keys = list(rows[0]["accuracy"])
    lines = [f"{'EMA':<12}{'all right':>10}" + "".join(f"{k:>12}" for k in keys)]
    for row in rows:
        label = row["ema"] if row["ema"] == "classic" else f"sigma {row['ema']:g}"
        cells = "".join(f"{_percent(row['accuracy'][k]):>12}" for k in keys)
        lines.append(f"{label:<12}{100 * row['all_correct']:>9.1f}%{cells}")
    lines.append(f"({n} shapes captions, seed {seed}; 'classic': the checkpoint's own EMA)")
    return "\n".join(lines)


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
