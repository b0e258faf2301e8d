"""Medians, ratios and the Markdown tables of a benchmarks/run.py result (standard library only)."""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

START, END = "<!-- results:start -->", "<!-- results:end -->"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _train_summary(train: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for stage, by_lib in train.items():
        row = {}
        for lib, runs in by_lib.items():
            row[lib] = {
                "params": runs[0]["params"],
                "images_per_s": _median([r["images_per_s"] for r in runs]),
                "images_per_s_runs": [r["images_per_s"] for r in runs],
                "flops_per_image": _median([r["flops_per_image"] for r in runs]),
                "fraction_of_peak": _median([r["fraction_of_peak"] for r in runs]),
                "matmul_peak_flops": _median([r["matmul_peak_flops"] for r in runs]),
                "peak_rss_mib": _median([r["peak_rss_mib"] for r in runs]),
            }
        row["speedup"] = row["ours"]["images_per_s"] / row["peer"]["images_per_s"]
        row["param_ratio"] = row["ours"]["params"] / row["peer"]["params"]
        out[stage] = row
    return out


def _sample_summary(sample: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for lib, runs in sample.items():
        settings = [(s["sampler"], s["steps"]) for s in runs[0]["samplers"]]
        for i, (sampler, steps) in enumerate(settings):
            out[f"{lib} {sampler}:{steps}"] = {
                "seconds_per_image": _median([r["samplers"][i]["seconds_per_image"] for r in runs]),
                "peak_rss_mib": _median([r["peak_rss_mib"] for r in runs]),
            }
    peer = [v for k, v in out.items() if k.startswith("peer heun")]
    if peer:
        for key, value in out.items():
            value["speedup_vs_peer_default"] = peer[0]["seconds_per_image"] / value["seconds_per_image"]
    return out


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if "train" in results:
        summary["train"] = _train_summary(results["train"])
    if "sample" in results:
        summary["sample"] = _sample_summary(results["sample"])
    if "quality" in results:
        summary["quality"] = {
            lib: {f"{j['sampler']}:{j['steps']}": j["all_correct"] for j in r["judged"]}
            for lib, r in results["quality"].items()
        }
    return summary


def _g(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}"


def tables(results: dict[str, Any]) -> str:
    """Markdown tables of the summary."""
    s, parts = results["summary"], []
    m = results["machine"]
    parts.append(f"Machine: {m['cpu']}, {m['cores']} cores visible; device `{results['device']}`; "
                 f"{results['reps']} repetitions, median; started {results['started']}"
                 + (" (QUICK SMOKE RUN: numbers are not measurements)" if results.get("quick") else "") + ".")
    if results.get("measured"):
        when = "; ".join(f"{section} {started}" for section, started in results["measured"].items())
        parts.append(f"\nSections carried over from earlier runs of the same harness; each was measured at: {when}.")
    if "train" in s:
        parts.append("\n**Training throughput** (forward + backward + optimiser step, batch 16, fp32)\n")
        parts.append("| stage | library | params (M) | images/s | GFLOP/image | achieved / matmul peak | peak RSS (MiB) |")
        parts.append("|---|---|---:|---:|---:|---:|---:|")
        for stage, row in s["train"].items():
            for lib in ("ours", "peer"):
                r = row[lib]
                parts.append(f"| {stage} | {lib} | {r['params'] / 1e6:.2f} | {_g(r['images_per_s'])} | "
                             f"{_g(r['flops_per_image'] / 1e9)} | {r['fraction_of_peak']:.0%} of "
                             f"{_g(r['matmul_peak_flops'] / 1e9)} GFLOP/s | {r['peak_rss_mib']:.0f} |")
            parts.append(f"| {stage} | **ours / peer** | {row['param_ratio']:.2f} | **{row['speedup']:.2f}x** | "
                         f"{row['ours']['flops_per_image'] / row['peer']['flops_per_image']:.2f} | | "
                         f"{row['ours']['peak_rss_mib'] / row['peer']['peak_rss_mib']:.2f} |")
    if "sample" in s:
        parts.append("\n**Sampling** the 32 -> 64 cascade, cond_scale 3 "
                     f"(DPM++ steps: {results.get('dpm_steps')}, {results.get('dpm_steps_reason')})\n")
        parts.append("| library sampler:steps | s / image | peer default / this | peak RSS (MiB) |")
        parts.append("|---|---:|---:|---:|")
        for key, r in s["sample"].items():
            parts.append(f"| {key} | {_g(r['seconds_per_image'])} | {r.get('speedup_vs_peer_default', float('nan')):.2f}x"
                         f" | {r['peak_rss_mib']:.0f} |")
    if "quality" in s:
        q = results["quality"]
        first = next(iter(q.values()))
        parts.append("\n**Quality per compute**: shapes judge on fixed prompts after the same training minutes "
                     f"(batch {first['batch']}, Adam lr {first['lr']:g} after {first.get('lr_warmup', 0)} warm-up "
                     f"steps, EMA beta {first.get('ema_beta', 0):g}, {first['eval_n']} prompts)\n")
        parts.append("| library | recipe (sizes) | minutes base / sr | steps base / sr | sampler:steps | fully correct | colour | shape | "
                     "size | position | background |")
        parts.append("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
        for lib, r in q.items():
            t = r["training"]
            for j in r["judged"]:
                acc = j["accuracy"]
                cells = " | ".join("-" if acc[k] is None else f"{acc[k]:.0%}"
                                   for k in ("color", "shape", "size", "position", "background"))
                sizes = r.get("sizes", {"base": 32, "sr": 64})
                recipe = f"{r.get('recipe', 'matched')} ({sizes['base']} -> {sizes['sr']})"
                parts.append(f"| {lib} | {recipe} | {r['minutes']['base']:g} / {r['minutes']['sr']:g} | {t['base']['steps']} / {t['sr']['steps']} | "
                             f"{j['sampler']}:{j['steps']} | {j['all_correct']:.0%} | {cells} |")
    if "profile" in results:
        parts.append("\n**Our training step's hot spots** (torch.profiler, self CPU time per step)\n")
        for stage, p in results["profile"].items():
            top = ", ".join(f"`{r['op']}` {r['share']:.0%}" for r in p["top_ops"][:8])
            parts.append(f"- {stage}: {top}")
    return "\n".join(parts) + "\n"


def write_readme(path: Path, text: str) -> None:
    """Replace the text between the results markers of ``path`` (append the markers when missing)."""
    old = path.read_text() if path.exists() else ""
    block = f"{START}\n{text}{END}"
    if START in old and END in old:
        new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, old, flags=re.S)
    else:
        new = old + ("\n" if old else "") + block + "\n"
    path.write_text(new)
