"""One measurement of one library in a fresh process; run.py starts these in turn (A B A B ...).

    python benchmarks/worker.py --lib ours|peer --task train|sample|quality|profile [options]

Prints one line ``RESULT {json}`` on stdout (child.py's protocol). The peer runs in benchmarks/.peer-venv,
ours in the Python that has imagen_lib's dependencies; both import only this folder's modules besides their
own library, and the shapes prompts from imagen_lib, which run.py puts on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

import child
import common
import torch

STAGE_SIZE = {"base": 32, "sr": 64}


def load_side(lib: str, device: torch.device, args: argparse.Namespace):
    if lib == "peer":
        import peer_side

        return peer_side.PeerSide(device, lr=args.lr)
    if lib == "ours":
        import ours_side

        return ours_side.OursSide(device, lr=args.lr, recipe=args.recipe)
    raise ValueError(f"--lib must be 'ours' or 'peer', got {lib!r}")


def library_version(lib: str) -> str:
    if lib == "ours":
        import imagen_lib

        return imagen_lib.__version__
    from importlib.metadata import version

    return version("imagen-pytorch")


def autocast(args: argparse.Namespace, device: torch.device):
    """bf16 autocast on a GPU when --bf16 is given; fp32 otherwise (the CPU figures are fp32)."""
    if args.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_networks(side: Any, stages: tuple[str, ...], args: argparse.Namespace) -> None:
    """GPU options: channels-last weights and ``nn.Module.compile`` in place (the module keeps its type)."""
    for stage in stages:
        net = side.network(stage)
        if args.channels_last:
            net.to(memory_format=torch.channels_last)
        if args.compile:
            net.compile()


def task_train(side: Any, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Images/s of forward + backward + optimiser step at batch 16, FLOPs per image and the FLOP/s fraction."""
    stage, size, batch = args.stage, STAGE_SIZE[args.stage], args.batch
    prepare_networks(side, (stage,), args)
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    text_embeds, text_mask = (t.to(device) for t in common.random_text_batch(batch))
    net = side.network(stage)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = common.matmul_peak_flops(device, dtype)

    def fwd_bwd() -> None:
        with autocast(args, device):
            loss = side.loss(stage, images, text_embeds, text_mask)
        loss.backward()

    flops = common.count_flops(fwd_bwd)
    net.zero_grad(set_to_none=True)
    rss_before = common.current_rss_mib()

    def step() -> None:
        with autocast(args, device):
            side.step(stage, images, text_embeds, text_mask)

    times = common.time_loop(step, device, args.warmup, args.iters, args.min_seconds)
    seconds = common.median(times)
    images_per_s = batch / seconds
    return {
        "stage": stage,
        "params": common.param_count(net),
        "batch": batch,
        "step_seconds": times,
        "images_per_s": images_per_s,
        "flops_per_image": flops / batch,
        "achieved_flops": flops / seconds,
        "matmul_peak_flops": peak,
        "fraction_of_peak": flops / seconds / peak,
        "rss_before_mib": rss_before,
        **memory_peak(device),
    }


def memory_peak(device: torch.device) -> dict[str, float]:
    out = {"peak_rss_mib": common.peak_rss_mib()}
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def eval_prompts(n: int, seed: int = 1234) -> tuple[list[str], list[dict[str, Any]]]:
    from imagen_lib.data.shapes import sample_captions

    return sample_captions(n, seed=seed)


def task_sample(side: Any, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per image for the 32 -> 64 cascade, for each sampler setting in --samplers."""
    prepare_networks(side, ("base", "sr"), args)
    texts, _ = eval_prompts(args.batch)
    text_embeds, text_mask = (t.to(device) for t in common.caption_embeddings(texts))
    rows = []
    for sampler, steps in common.parse_samplers(args.samplers):
        with autocast(args, device):
            side.sample(text_embeds[:1], text_mask[:1], cond_scale=args.cond_scale, steps=2, sampler=sampler)
        common.synchronize(device)
        start = time.perf_counter()
        with autocast(args, device):
            images = side.sample(text_embeds, text_mask, cond_scale=args.cond_scale, steps=steps, sampler=sampler)
        common.synchronize(device)
        elapsed = time.perf_counter() - start
        if images.shape != (args.batch, 3, 64, 64) or not torch.isfinite(images).all():
            finite = bool(torch.isfinite(images).all())
            raise RuntimeError(f"{sampler}:{steps} returned {tuple(images.shape)} (finite: {finite})")
        rows.append({"sampler": sampler, "steps": steps, "seconds_per_image": elapsed / args.batch})
    return {"batch": args.batch, "cond_scale": args.cond_scale, "samplers": rows, **memory_peak(device)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", choices=["ours", "peer"], required=True)
    parser.add_argument("--task", choices=["train", "sample", "quality", "profile"], required=True)
    parser.add_argument("--stage", choices=["base", "sr"], default="base")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--batch", type=int, default=common.BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--min-seconds", type=float, default=10.0)
    parser.add_argument("--samplers", default="heun:32",
                        help="name:steps list; ours also takes own:0 (the stages' own settings)")
    parser.add_argument("--recipe", choices=["matched", "quickstart"], default="matched",
                        help="ours: the matched networks, or the main job's cascade (examples/shapes.yaml)")
    parser.add_argument("--cond-scale", type=float, default=3.0)
    parser.add_argument("--minutes", type=float, default=3.0, help="quality: training minutes of the base stage")
    parser.add_argument("--sr-minutes", type=float, default=2.0, help="quality: training minutes of the SR stage")
    parser.add_argument("--eval-n", type=int, default=32, help="quality: prompts judged")
    parser.add_argument("--lr-warmup", type=int, default=100, help="quality: steps of linear learning-rate warm-up")
    parser.add_argument("--ema-beta", type=float, default=0.995, help="quality: EMA of the weights (0: none)")
    parser.add_argument("--artifacts", default="", help="quality/profile: folder for sample grids and traces")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    side = load_side(args.lib, device, args)
    rss_after_build = common.current_rss_mib()  # imports + networks: what a task's own memory adds to
    if args.task == "train":
        result = task_train(side, device, args)
    elif args.task == "sample":
        result = task_sample(side, device, args)
    elif args.task == "quality":
        import quality

        result = quality.run(side, device, args)
    else:
        import profile_step

        result = profile_step.run(side, device, args)
    result.update(rss_after_build_mib=rss_after_build, lib=args.lib, task=args.task,
                  version=library_version(args.lib), torch=torch.__version__, threads=torch.get_num_threads(),
                  device=str(device))
    child.print_result(result)


if __name__ == "__main__":
    main()
