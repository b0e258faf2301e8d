"""The Markdown tables of both entry points (standard library only): medians, ratios and tables of a
benchmarks/run.py result (:func:`summarise`, :func:`tables`), and the report of a benchmarks/gpu.py run
(:func:`gpu_tables`); one row writer for all."""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

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
        for value in out.values():
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


def fmt(value: Optional[float], digits: int = 3) -> str:
    """``digits`` significant digits, without an exponent from 10**digits up; None is "-"."""
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"


def row(cells: Sequence[Any]) -> str:
    """One Markdown table row; an empty cell stays narrow (``| |``)."""
    return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"


def header(columns: Sequence[str], align: str) -> list[str]:
    """A Markdown table's header and alignment rows; ``align`` has a letter a column: l(eft) or r(ight)."""
    return [row(columns), "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]


# ---------------------------------------------------------------------------------------------------------
# run.py: imagen_lib against imagen-pytorch
# ---------------------------------------------------------------------------------------------------------


def _train_table(summary: dict[str, Any]) -> list[str]:
    lines = ["\n**Training throughput** (forward + backward + optimiser step, batch 16, fp32)\n"]
    lines += header(["stage", "library", "params (M)", "images/s", "GFLOP/image", "achieved / matmul peak",
                     "peak RSS (MiB)"], "llrrrrr")
    for stage, by_lib in summary.items():
        for lib in ("ours", "peer"):
            r = by_lib[lib]
            lines.append(row([stage, lib, f"{r['params'] / 1e6:.2f}", fmt(r["images_per_s"]),
                              fmt(r["flops_per_image"] / 1e9),
                              f"{r['fraction_of_peak']:.0%} of {fmt(r['matmul_peak_flops'] / 1e9)} GFLOP/s",
                              f"{r['peak_rss_mib']:.0f}"]))
        ours, peer = by_lib["ours"], by_lib["peer"]
        lines.append(row([stage, "**ours / peer**", f"{by_lib['param_ratio']:.2f}", f"**{by_lib['speedup']:.2f}x**",
                          f"{ours['flops_per_image'] / peer['flops_per_image']:.2f}", "",
                          f"{ours['peak_rss_mib'] / peer['peak_rss_mib']:.2f}"]))
    return lines


def _sample_table(results: dict[str, Any]) -> list[str]:
    lines = ["\n**Sampling** the 32 -> 64 cascade, cond_scale 3 "
             f"(DPM++ steps: {results.get('dpm_steps')}, {results.get('dpm_steps_reason')})\n"]
    lines += header(["library sampler:steps", "s / image", "peer default / this", "peak RSS (MiB)"], "lrrr")
    for key, r in results["summary"]["sample"].items():
        speedup = r.get("speedup_vs_peer_default", float("nan"))
        lines.append(row([key, fmt(r["seconds_per_image"]), f"{speedup:.2f}x", f"{r['peak_rss_mib']:.0f}"]))
    return lines


def _quality_table(quality: dict[str, Any]) -> list[str]:
    first = next(iter(quality.values()))
    lines = ["\n**Quality per compute**: shapes judge on fixed prompts after the same training minutes "
             f"(batch {first['batch']}, Adam lr {first['lr']:g} after {first.get('lr_warmup', 0)} warm-up "
             f"steps, EMA beta {first.get('ema_beta', 0):g}, {first['eval_n']} prompts)\n"]
    lines += header(["library", "recipe (sizes)", "minutes base / sr", "steps base / sr", "sampler:steps",
                     "fully correct", "colour", "shape", "size", "position", "background"], "llrrlrrrrrr")
    for lib, r in quality.items():
        t = r["training"]
        sizes = r.get("sizes", {"base": 32, "sr": 64})
        recipe = f"{r.get('recipe', 'matched')} ({sizes['base']} -> {sizes['sr']})"
        for j in r["judged"]:
            acc = j["accuracy"]
            cells = ["-" if acc[k] is None else f"{acc[k]:.0%}"
                     for k in ("color", "shape", "size", "position", "background")]
            lines.append(row([lib, recipe, f"{r['minutes']['base']:g} / {r['minutes']['sr']:g}",
                              f"{t['base']['steps']} / {t['sr']['steps']}", f"{j['sampler']}:{j['steps']}",
                              f"{j['all_correct']:.0%}", *cells]))
    return lines


def tables(results: dict[str, Any]) -> str:
    """Markdown tables of a run.py result's summary."""
    s, m = results["summary"], results["machine"]
    parts = [f"Machine: {m['cpu']}, {m['cores']} cores visible; device `{results['device']}`; "
             f"{results['reps']} repetitions, median; started {results['started']}"
             + (" (QUICK SMOKE RUN: numbers are not measurements)" if results.get("quick") else "") + "."]
    if results.get("measured"):
        when = "; ".join(f"{section} {started}" for section, started in results["measured"].items())
        parts.append(f"\nSections carried over from earlier runs of the same harness; each was measured at: {when}.")
    if "train" in s:
        parts += _train_table(s["train"])
    if "sample" in s:
        parts += _sample_table(results)
    if "quality" in s:
        parts += _quality_table(results["quality"])
    if "profile" in results:
        parts.append("\n**Our training step's hot spots** (torch.profiler, self CPU time per step)\n")
        for stage, p in results["profile"].items():
            top = ", ".join(f"`{r['op']}` {r['share']:.0%}" for r in p["top_ops"][:8])
            parts.append(f"- {stage}: {top}")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------------
# gpu.py: matmul peak, training MFU, cascade sampling memory
# ---------------------------------------------------------------------------------------------------------

DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense, SXM (NVIDIA's datasheet), for context only
# NeMo's Imagen inference memory (seed 002, E.3.1 FP16): GB at batch 1 / 8 per output size
NEMO_FP16_GB = {64: (11.7, 11.9), 256: (12.5, 13.0), 1024: (14.1, 21.6)}


def _failure(r: dict[str, Any]) -> str:
    """Why a case has no numbers, for its table row."""
    return "out of memory" if r.get("oom") else r.get("error", "failed")[:80]


def _gpu_train_table(rows: list[dict[str, Any]], peak: float) -> list[str]:
    lines = header(["variant", "batch", "images/s", "step (ms)", "TFLOP/image", "TFLOP/s", "MFU (measured peak)",
                    "peak allocated (GiB)", "first step (s)"], "lrrrrrrrr")
    for r in rows:
        if "images_per_s" not in r:
            lines.append(row([r["variant"], r["batch"], _failure(r), "", "", "", "", "", ""]))
            continue
        lines.append(row([r["variant"], r["batch"], fmt(r["images_per_s"]), fmt(1e3 * r["median_step_s"]),
                          fmt(r["flops_per_image"] / 1e12), fmt(r["achieved_flops"] / 1e12),
                          f"**{100 * r['achieved_flops'] / peak:.1f}%**", fmt(r.get("max_allocated_gib")),
                          fmt(r["first_step_s"])]))
    return lines


def _gpu_sample_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = header(["mode", "output", "batch", "peak allocated (GiB)", "device in use (GiB)", "weights (GiB)",
                    "NeMo FP16 (GB)", "s / image set", "s / image"], "lrrrrrrrr")
    for r in rows:
        size = r["sizes"][r["stages"] - 1]
        nemo = NEMO_FP16_GB.get(size, (None, None))[0 if r["batch"] == 1 else 1] if r["batch"] in (1, 8) else None
        if "seconds_per_set" not in r:
            lines.append(row([r["mode"], size, r["batch"], _failure(r), "", "", fmt(nemo), "", ""]))
            continue
        lines.append(row([r["mode"], size, r["batch"], fmt(r.get("max_allocated_gib")), fmt(r.get("device_used_gib")),
                          fmt(r["weights_gib"]), fmt(nemo), fmt(r["seconds_per_set"]), fmt(r["seconds_per_image"])]))
    return lines


def _gpu_profile_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        prof = r.get("profile")
        if not prof:
            continue
        kinds = ", ".join(f"{k} {100 * v:.0f}%" for k, v in prof["by_kind"].items())
        top = "; ".join(f"`{k['name'][:60]}` {100 * k['share']:.0f}%" for k in prof["top_kernels"][:6])
        out.append(f"- {r['variant']}@{r['batch']}: GPU kernels busy {100 * prof['gpu_busy']:.0f}% of the step; "
                   f"kernel time by kind: {kinds}. Top kernels: {top}")
    return out


def gpu_tables(results: dict[str, Any]) -> str:
    """The Markdown report of a gpu.py result (one of results_gpu.json's ``runs``)."""
    env, peak = results["environment"], results.get("peak") or {}
    peak_flops = peak.get("best_flops")
    parts = [f"Device: {env['device_name']}; torch {env['torch']}; started {env['started']}."]
    if peak_flops:
        sheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in env["device_name"]), None)
        parts.append(f"Measured {peak['dtype']} mm peak (n={peak['n']}): best {peak_flops / 1e12:.0f} TFLOP/s, "
                     f"median {peak['median_flops'] / 1e12:.0f} TFLOP/s"
                     + (f" (datasheet dense bf16: {sheet:.0f})." if sheet else "."))
    if results.get("train") and peak_flops:
        parts += ["", *_gpu_train_table(results["train"], peak_flops), "",
                  "\n".join(_gpu_profile_lines(results["train"]))]
    if results.get("sample"):
        parts += ["", *_gpu_sample_table(results["sample"])]
    return "\n".join(parts)


def write_readme(path: Path, text: str) -> None:
    """Replace the text between the results markers of ``path`` (append the markers when missing)."""
    old = path.read_text() if path.exists() else ""
    block = f"{START}\n{text}{END}"
    if START in old and END in old:
        new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, old, flags=re.S)
    else:
        new = old + ("\n" if old else "") + block + "\n"
    path.write_text(new)
