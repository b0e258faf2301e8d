"""imagen_lib against imagen-pytorch 2.1.0, side by side in one run: the one command of benchmarks/.

    python benchmarks/run.py --out benchmarks/results.json            # the full measurement (about 1 hour)
    python benchmarks/run.py --quick --out /tmp/smoke.json             # a smoke run of every part (minutes)

Each measurement runs in a fresh process (worker.py, by child.py's protocol) so that peak memory belongs to
one library and one task; the libraries alternate (ours, peer, ours, peer, ...) and the median over --reps
repetitions is reported. The peer runs in benchmarks/.peer-venv (bash benchmarks/setup_peer.sh), ours in
--ours-python (default: this interpreter, which must have imagen_lib's dependencies; imagen_lib itself is
imported from this checkout). Needs only the standard library here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import child
import report

HERE = Path(__file__).resolve().parent
LIBS = ("ours", "peer")


def worker(args: argparse.Namespace, lib: str, task: str, *extra: str) -> dict[str, Any]:
    """Run one measurement in a fresh worker.py process (child.py's protocol) and return its result."""
    python = args.ours_python if lib == "ours" else args.peer_python
    cmd = [python, str(HERE / "worker.py"), "--lib", lib, "--task", task, "--device", args.device, *extra,
           *args.gpu_flags]
    env = dict(HF_HOME=str(HERE / ".hf-cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    try:
        result = child.run_child(cmd, env)
    except child.ChildFailed as err:
        sys.stderr.write(err.output)
        raise RuntimeError(f"worker failed ({err}): {' '.join(cmd)}") from None
    print(f"  {lib:<4} {task:<7} {' '.join(extra):<60} {time.perf_counter() - start:6.1f} s", flush=True)
    return result


def section_train(args: argparse.Namespace) -> dict[str, Any]:
    timing = ["--warmup", "1", "--iters", "2", "--min-seconds", "0"] if args.quick else \
        ["--warmup", "3", "--iters", "8", "--min-seconds", str(args.min_seconds)]
    runs: dict[str, dict[str, list]] = {s: {lib: [] for lib in LIBS} for s in ("base", "sr")}
    for _ in range(args.reps):
        for stage in ("base", "sr"):
            for lib in LIBS:  # A B A B: the order within a repetition is fixed, repetitions interleave
                runs[stage][lib].append(worker(args, lib, "train", "--stage", stage, *timing))
    return runs


def section_quality(args: argparse.Namespace) -> dict[str, Any]:
    minutes = ["--minutes", "0.05", "--sr-minutes", "0.05"] if args.quick else \
        ["--minutes", str(args.minutes), "--sr-minutes", str(args.sr_minutes)]
    eval_n = "4" if args.quick else str(args.eval_n)
    samplers = {"ours": args.ours_quality_samplers, "peer": "heun:32"}
    if args.quick:
        samplers = {"ours": "heun:4,dpmpp_2m:2", "peer": "heun:2"}
    out = {}
    for lib in LIBS:
        recipe = ["--recipe", args.ours_recipe] if lib == "ours" else []
        out[lib] = worker(args, lib, "quality", *minutes, *recipe, "--eval-n", eval_n, "--lr", str(args.lr),
                          "--lr-warmup", str(args.lr_warmup), "--ema-beta", str(args.ema_beta),
                          "--samplers", samplers[lib], "--artifacts", str(HERE / "artifacts"))
    return out


def dpm_steps_from_quality(quality: dict[str, Any], default: int) -> tuple[int, str]:
    """The fewest DPM-Solver++(2M) steps whose judged share of fully correct images is within 2 points of
    our 64-step Heun (the reference), from the quality section's sweep."""
    judged = quality.get("ours", {}).get("judged", [])
    reference = [j for j in judged if j["sampler"] == "heun" and j["steps"] == max(
        (k["steps"] for k in judged if k["sampler"] == "heun"), default=0)]
    if not reference:
        return default, "no quality sweep: default"
    ref = reference[0]["all_correct"]
    ok = sorted(j["steps"] for j in judged if j["sampler"] == "dpmpp_2m" and j["all_correct"] >= ref - 0.02)
    if not ok:
        return default, f"no DPM++ setting within 2 points of heun:{reference[0]['steps']} ({ref:.3f}): default"
    return ok[0], f"fewest dpmpp_2m steps within 2 points of heun:{reference[0]['steps']} ({ref:.3f})"


def section_sample(args: argparse.Namespace, dpm_steps: int) -> dict[str, Any]:
    batch = "2" if args.quick else str(args.sample_batch)
    steps = 2 if args.quick else 32
    samplers = {"ours": f"heun:{steps},dpmpp_2m:{2 if args.quick else dpm_steps}", "peer": f"heun:{steps}"}
    runs: dict[str, list] = {lib: [] for lib in LIBS}
    for _ in range(args.reps):
        for lib in LIBS:
            runs[lib].append(worker(args, lib, "sample", "--batch", batch, "--samplers", samplers[lib]))
    return runs


def section_profile(args: argparse.Namespace) -> dict[str, Any]:
    iters = ["--warmup", "1", "--iters", "1"] if args.quick else ["--warmup", "2", "--iters", "4"]
    return {stage: worker(args, "ours", "profile", "--stage", stage, *iters, "--artifacts", str(HERE / "artifacts"))
            for stage in ("base", "sr")}


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "results.json"))
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets, 1 repetition")
    parser.add_argument("--sections", default="train,quality,sample,profile",
                        help="comma list of train, quality, sample, profile")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ours-python", default=sys.executable)
    parser.add_argument("--peer-python", default=str(HERE / ".peer-venv" / "bin" / "python"))
    parser.add_argument("--min-seconds", type=float, default=10.0, help="train: timed seconds per measurement")
    parser.add_argument("--minutes", type=float, default=4.0, help="quality: training minutes, base stage")
    parser.add_argument("--sr-minutes", type=float, default=2.0, help="quality: training minutes, SR stage")
    parser.add_argument("--eval-n", type=int, default=48, help="quality: prompts judged")
    parser.add_argument("--lr", type=float, default=1e-3, help="quality: Adam learning rate (both libraries)")
    parser.add_argument("--lr-warmup", type=int, default=100, help="quality: linear warm-up steps (both libraries)")
    parser.add_argument("--ema-beta", type=float, default=0.995, help="quality: EMA of the weights (0: none)")
    parser.add_argument("--ours-quality-samplers", default="heun:64,heun:32,dpmpp_2m:8,dpmpp_2m:12,dpmpp_2m:16")
    parser.add_argument("--ours-recipe", choices=["matched", "quickstart"], default="matched",
                        help="quality: our matched networks, or the main job's cascade (16 px base, SR on crops)")
    parser.add_argument("--dpm-steps", type=int, default=0, help="sample: our DPM++ steps (0: from quality)")
    parser.add_argument("--sample-batch", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="GPU: bf16 autocast")
    parser.add_argument("--channels-last", action="store_true", help="GPU: channels-last memory format")
    parser.add_argument("--compile", action="store_true", help="GPU: torch.compile the networks")
    parser.add_argument("--readme", default="", help="write the tables into this README (default: none)")
    parser.add_argument("--keep-other-sections", action="store_true",
                        help="carry the sections not run now over from the existing --out file (each table "
                             "then says when it was measured)")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps = 1
    args.gpu_flags = [f for f, on in (("--bf16", args.bf16), ("--channels-last", args.channels_last),
                                      ("--compile", args.compile)) if on]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"train", "quality", "sample", "profile"}
    if unknown:
        parser.error(f"--sections: expected some of train, quality, sample, profile; got {sorted(unknown)}")
    if set(sections) - {"profile"} and not Path(args.peer_python).exists():  # every section but profile runs both
        parser.error(f"--peer-python: {args.peer_python} does not exist; run bash benchmarks/setup_peer.sh first")
    results: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
                               "quick": args.quick, "reps": args.reps, "device": args.device,
                               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    start = time.perf_counter()
    if "train" in sections:
        print("training throughput", flush=True)
        results["train"] = section_train(args)
    if "quality" in sections:
        print("quality per compute", flush=True)
        results["quality"] = section_quality(args)
    if "sample" in sections:
        dpm_steps, why = (args.dpm_steps, "--dpm-steps") if args.dpm_steps else \
            dpm_steps_from_quality(results.get("quality", {}), 16)
        results["dpm_steps"], results["dpm_steps_reason"] = dpm_steps, why
        print(f"sampling (dpmpp_2m steps {dpm_steps}: {why})", flush=True)
        results["sample"] = section_sample(args, dpm_steps)
    if "profile" in sections:
        print("profile of our training step", flush=True)
        results["profile"] = section_profile(args)
    results["wall_seconds"] = time.perf_counter() - start
    if args.keep_other_sections and Path(args.out).exists():
        carry_over(json.loads(Path(args.out).read_text()), results, sections)
    results["summary"] = report.summarise(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    text = report.tables(results)
    print(text)
    if args.readme:
        report.write_readme(Path(args.readme), text)


def carry_over(previous: dict[str, Any], results: dict[str, Any], sections: list[str]) -> None:
    """Copy the sections that were not run now from an earlier run's results, noting when they were measured."""
    measured = dict(previous.get("measured", {}))
    for section in ("train", "quality", "sample", "profile"):
        if section in sections:
            measured[section] = f"{results['started']} on {results['machine']['cpu']}"
        elif section in previous:
            results[section] = previous[section]
            measured[section] = previous.get("measured", {}).get(
                section, f"{previous['started']} on {previous['machine']['cpu']}")
            if section == "sample":
                results["dpm_steps"] = previous.get("dpm_steps")
                results["dpm_steps_reason"] = previous.get("dpm_steps_reason")
    results["measured"] = measured


if __name__ == "__main__":
    main()
