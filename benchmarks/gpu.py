"""The GPU part of the benchmarks: bf16 matmul peak, MFU of a base64-500m training step, cascade memory.

    python benchmarks/gpu.py --out benchmarks/results_gpu.json                  # on a CUDA machine
    python benchmarks/gpu.py --device cpu --smoke --out /tmp/gpu_smoke.json     # minutes, tiny presets

Three measurements, each case in a fresh child process (``gpu.py --child SPEC``, by the harness's protocol in
child.py: its peak memory is its own and an out-of-memory error ends only that case):

1. ``peak``: the best and median bf16 ``torch.mm`` rate at n = 8192 after a warm-up.
2. ``train``: one optimiser step of ``--preset`` (``base64-500m``) through our ``Cascade`` /
   ``ElucidatedDiffusion`` loss (text dropout 0.1, 64 px images, precomputed random text embeddings of
   ``--text-len`` tokens with a mask, AdamW, gradient clipping 1.0) for each ``variant@batch`` of
   ``--train-grid``. A variant joins options with ``+``: ``bf16`` (autocast), ``cl`` (channels-last),
   ``compile`` (``nn.Module.compile``), ``ckpt`` (gradient checkpointing). FLOPs of one forward + backward
   are counted with ``FlopCounterMode`` on the uncompiled net; MFU = counted FLOPs / step time / the
   measured bf16 matmul peak. ``--profile`` also runs ``torch.profiler`` over 3 steps of each case.
3. ``sample``: peak GPU memory and seconds of one 64 -> 256 -> 1024 cascade run (``--sample-presets``),
   stopped at each target resolution (a cascade of the first 1, 2 or 3 stages, as NeMo's table is laid
   out), at each batch of ``--sample-batches``, for each ``--sample-modes`` entry: ``bf16`` / ``fp16``
   (weights in that dtype, autocast in it) or ``amp`` (fp32 weights, bf16 autocast); a ``+t5`` suffix keeps
   a randomly initialised T5-11B encoder (NeMo's text encoder, width 1024) resident in the same dtype and
   encodes the prompts with it, as NeMo's inference does.

Prints a Markdown table per section (``report.gpu_tables``) and writes everything to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import child
import common
import report
import torch

# T5-11B's encoder (the original T5, d_model 1024): what NeMo's Imagen encodes text with
T5_11B = dict(vocab_size=32128, d_model=1024, d_kv=128, d_ff=65536, num_layers=24, num_heads=128,
              feed_forward_proj="relu", dropout_rate=0.0)
SMOKE = dict(preset="tiny-32", train_grid="bf16@4,bf16+cl@4", text_len=16,
             sample_presets="tiny-32,tiny-sr64,tiny-sr64", sample_sizes="32,64,128", sample_batches="1,2",
             sample_modes="bf16", sample_steps=2, warmup=1, iters=2, min_seconds=0.0, peak_n=512)


# ---------------------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------------------


def text_batch(batch: int, length: int, dim: int, device: torch.device, seed: int = 0):
    """Random text embeddings (B, length, dim) and a mask with 8 .. length real tokens per row."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, length, dim, generator=g)
    lengths = torch.randint(min(8, length), length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None] < lengths[:, None]
    return (embeds * mask[..., None]).to(device), mask.to(device)


def gib(nbytes: float) -> float:
    return nbytes / 2**30


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak allocated / reserved by PyTorch, and the device memory in use now (what nvidia-smi shows,
    CUDA context included)."""
    if device.type != "cuda":
        return {"peak_rss_gib": common.peak_rss_mib() / 1024}
    free, total = torch.cuda.mem_get_info(device)
    return {"max_allocated_gib": gib(torch.cuda.max_memory_allocated(device)),
            "max_reserved_gib": gib(torch.cuda.max_memory_reserved(device)),
            "device_used_gib": gib(total - free)}


def matmul_peak(device: torch.device, n: int = 8192, reps: int = 30) -> dict[str, Any]:
    """bf16 (fp32 on CPU) ``torch.mm`` FLOP/s at n x n x n: best and median of ``reps`` timed products."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    times = common.matmul_seconds(device, dtype, n, warmup=5, iters=reps)  # warm-up: kernel choice, clocks up
    flops = 2 * n**3
    return {"n": n, "dtype": str(dtype), "reps": reps, "best_flops": flops / min(times),
            "median_flops": flops / common.median(times)}


# ---------------------------------------------------------------------------------------------------------
# training step
# ---------------------------------------------------------------------------------------------------------


def build_training(spec: dict[str, Any], device: torch.device):
    """The preset's net in a one-stage Cascade, a batch, and AdamW."""
    from imagen_lib.cascade import Cascade, Stage
    from imagen_lib.diffusion import ElucidatedDiffusion
    from imagen_lib.nn import presets

    opts = spec["variant"].split("+")
    torch.manual_seed(0)
    overrides = {"gradient_checkpointing": True} if "ckpt" in opts else {}
    net = presets.build(spec["preset"], device=device, **overrides)
    size = net.config.image_size
    cascade = Cascade([Stage(net, ElucidatedDiffusion(), size)], cond_drop_prob=0.1).train()
    b = spec["batch"]
    images = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1
    if "cl" in opts:
        net.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    embeds, mask = text_batch(b, spec["text_len"], net.text_embed_dim, device)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01, **fused)
    return cascade, net, optimizer, (images, embeds, mask), opts


def train_case(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Images/s, counted FLOPs, MFU and peak memory of one ``variant@batch``."""
    cascade, net, optimizer, (images, embeds, mask), opts = build_training(spec, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in opts)

    def forward_backward() -> None:
        with amp:
            loss = cascade(images, text_embeds=embeds, text_mask=mask, stage=0)
        loss.backward()

    flops = common.count_flops(forward_backward)  # uncompiled: the counter sees every aten op
    net.zero_grad(set_to_none=True)
    if "compile" in opts:
        net.compile()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step()  # first step: compilation, cuDNN autotuning
    common.synchronize(device)
    first = time.perf_counter() - start
    times = common.time_loop(step, device, spec["warmup"], spec["iters"], spec["min_seconds"])
    seconds = common.median(times)
    out = {"params": common.param_count(net), "flops_per_step": flops, "flops_per_image": flops / spec["batch"],
           "first_step_s": first, "step_seconds": times, "median_step_s": seconds,
           "images_per_s": spec["batch"] / seconds, "achieved_flops": flops / seconds, **memory_stats(device)}
    if spec.get("profile"):
        out["profile"] = profile_steps(step, device, spec.get("artifacts"), spec["name"], seconds)
    return out


KERNEL_KINDS = (  # (kind, substrings of a kernel name), first match wins
    ("attention", ("fmha", "flash", "attention", "sdpa")),
    ("convolution", ("conv", "implicit_gemm", "xmma", "dgrad", "wgrad", "fprop", "cudnn", "nhwc", "nchw")),
    ("matmul", ("gemm", "cublas", "cutlass", "sm90_", "matmul")),
    ("norm", ("norm",)),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("fused elementwise (triton)", ("triton",)),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other elementwise / copies"


def profile_steps(step, device: torch.device, artifacts: Optional[str], name: str, step_s: float,
                  steps: int = 3) -> dict[str, Any]:
    """GPU kernel time by kind, the top kernels and the top operators (with input shapes) over ``steps``
    steps. ``gpu_busy`` is kernel time per step over the unprofiled median step time ``step_s`` (the
    profiler's own overhead would understate it)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    common.synchronize(device)
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        common.synchronize(device)
    kernels: dict[str, float] = {}
    for evt in prof.events():
        # kernels and memcpys on the GPU; "## Call CompiledFxGraph ... ##" spans are annotations that
        # cover the compiled graphs' kernels, so counting them would count those kernels twice
        if evt.device_type == torch.autograd.DeviceType.CUDA and not evt.name.startswith("## "):
            kernels[evt.name] = kernels.get(evt.name, 0.0) + getattr(evt, "device_time", 0.0) / 1e6
    total = sum(kernels.values()) or 1e-12
    kinds: dict[str, float] = {}
    for kname, seconds in kernels.items():
        kinds[kernel_kind(kname)] = kinds.get(kernel_kind(kname), 0.0) + seconds
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    by_shape = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    by_shape.sort(key=lambda e: -getattr(e, "self_device_time_total", 0.0))
    ops = [{"op": e.key, "shapes": str(e.input_shapes)[:200], "calls_per_step": e.count / steps,
            "ms_per_step": getattr(e, "self_device_time_total", 0.0) / 1e3 / steps} for e in by_shape[:15]]
    if artifacts:
        path = Path(artifacts)
        path.mkdir(parents=True, exist_ok=True)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        (path / f"profile_{safe}.txt").write_text(
            prof.key_averages().table(sort_by=sort, row_limit=60) + "\n\n"
            + prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=60))
    return {"steps": steps, "gpu_kernel_ms_per_step": 1e3 * total / steps, "gpu_busy": total / steps / step_s,
            "by_kind": {k: v / total for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:140], "share": s / total, "ms_per_step": 1e3 * s / steps} for n, s in top],
            "top_ops_by_shape": ops}


# ---------------------------------------------------------------------------------------------------------
# cascade sampling
# ---------------------------------------------------------------------------------------------------------


def build_t5(dtype: torch.dtype, device: torch.device):
    """A randomly initialised T5-11B encoder (memory and time do not depend on the weights)."""
    from transformers import T5Config, T5EncoderModel

    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = T5EncoderModel(T5Config(**T5_11B))
        finally:
            torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def build_cascade(spec: dict[str, Any], device: torch.device, dtype: torch.dtype):
    from imagen_lib.cascade import Cascade, SamplerSettings, Stage
    from imagen_lib.diffusion import ElucidatedDiffusion
    from imagen_lib.nn import presets

    torch.manual_seed(0)
    stages = []
    for name, size in zip(spec["presets"][: spec["stages"]], spec["sizes"]):
        net = presets.build(name, device=device, dtype=dtype).eval().requires_grad_(False)
        settings = SamplerSettings(sampler=spec["sampler"], steps=spec["steps"], cond_scale=spec["cond_scale"])
        stages.append(Stage(net, ElucidatedDiffusion(), size, sampler=settings))
    return Cascade(stages)


def sample_case(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Peak memory and seconds of one cascade run stopped at stage ``spec["stages"] - 1``."""
    mode, _, extra = spec["mode"].partition("+")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "amp": torch.bfloat16}[mode]
    weight_dtype = torch.float32 if mode == "amp" else amp_dtype
    cascade = build_cascade(spec, device, weight_dtype)
    encoder = build_t5(weight_dtype, device) if extra == "t5" else None
    b, length = spec["batch"], spec["text_len"]
    amp = torch.autocast(device.type, dtype=amp_dtype)

    def run(steps: int) -> torch.Tensor:
        embeds, mask = text_batch(b, length, cascade.text_embed_dim, device)
        if encoder is not None:  # encode random token ids: the encoder's activations count as well
            ids = torch.randint(0, T5_11B["vocab_size"], (b, length), device=device)
            with torch.no_grad(), amp:
                hidden = encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            embeds = torch.nan_to_num(hidden.float()) * mask[..., None]
        with amp:
            return cascade.sample(text_embeds=embeds, text_mask=mask, steps=steps, seed=0, disable_progress=True)

    run(1)  # warm-up: kernel choice, allocator
    common.synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    images = run(spec["steps"])
    common.synchronize(device)
    seconds = time.perf_counter() - start
    size = spec["sizes"][spec["stages"] - 1]
    if images.shape != (b, 3, size, size):
        raise RuntimeError(f"cascade returned {tuple(images.shape)}, expected {(b, 3, size, size)}")
    weights = sum(p.numel() * p.element_size() for p in cascade.parameters())
    if encoder is not None:
        weights += sum(p.numel() * p.element_size() for p in encoder.parameters())
    return {"output_size": size, "seconds_per_set": seconds, "seconds_per_image": seconds / b,
            "finite": bool(torch.isfinite(images).all()), "weights_gib": gib(weights), **memory_stats(device)}


# ---------------------------------------------------------------------------------------------------------
# child processes
# ---------------------------------------------------------------------------------------------------------


def child_main(spec: dict[str, Any]) -> None:
    """Run one case in this process and print ``RESULT {json}``; errors become a result too."""
    device = torch.device(spec["device"])
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        if spec["task"] == "peak":
            result = matmul_peak(device, spec["n"])
        elif spec["task"] == "train":
            result = train_case(spec, device)
        else:
            result = sample_case(spec, device)
    except torch.cuda.OutOfMemoryError as err:
        result = {"oom": True, "error": str(err).splitlines()[0][:300]}
    except Exception as err:  # reported, so that one failing case does not hide the others
        result = {"error": f"{type(err).__name__}: {str(err)[:2000]}", "traceback": traceback.format_exc()[-4000:]}
    child.print_result({**spec, **result})


def run_case(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one case in a fresh ``gpu.py --child`` process (child.py's protocol); a failure becomes its row."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    start = time.perf_counter()
    try:
        result = child.run_child(cmd, timeout=timeout)
    except child.ChildFailed as err:
        return {**spec, "error": str(err), "output": err.output}
    result["child_wall_s"] = time.perf_counter() - start
    return result


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny presets and few steps (a CPU check of the script)")
    p.add_argument("--sections", default="peak,train,sample", help="any of peak, train, sample")
    p.add_argument("--out", default="benchmarks/results_gpu.json")
    p.add_argument("--artifacts", default="", help="folder for the profiler tables")
    p.add_argument("--preset", default="base64-500m", help="training preset")
    p.add_argument("--train-grid", default="bf16@64,bf16+cl@32,bf16+cl@64,bf16+cl@128,bf16+cl+compile@64,"
                                           "bf16+cl+compile@128", help="variant@batch, comma separated")
    p.add_argument("--profile", action="store_true", help="torch.profiler over 3 steps of every training case")
    p.add_argument("--text-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--min-seconds", type=float, default=3.0)
    p.add_argument("--peak-n", type=int, default=8192)
    p.add_argument("--sample-presets", default="base64-500m,sr256-400m,sr1024-400m")
    p.add_argument("--sample-sizes", default="64,256,1024")
    p.add_argument("--sample-batches", default="1,8")
    p.add_argument("--sample-modes", default="fp16+t5,bf16", help="bf16 | fp16 | amp, optionally +t5")
    p.add_argument("--sample-targets", default="", help="stages run per case (default 1,2,3: every output size)")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--sample-steps", type=int, default=4, help="dpmpp_2m steps per stage")
    p.add_argument("--cond-scale", type=float, default=5.0)
    p.add_argument("--child-timeout", type=float, default=420.0)
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


def case_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every child case, in the order they run."""
    base = {"device": args.device, "text_len": args.text_len}
    sections = [s.strip() for s in args.sections.split(",")]
    specs: list[dict[str, Any]] = []
    if "peak" in sections:
        specs.append({**base, "task": "peak", "n": args.peak_n})
    if "train" in sections:
        for item in args.train_grid.split(","):
            variant, _, batch = item.strip().partition("@")
            specs.append({**base, "task": "train", "preset": args.preset, "variant": variant, "batch": int(batch),
                          "warmup": args.warmup, "iters": args.iters, "min_seconds": args.min_seconds,
                          "profile": args.profile, "artifacts": args.artifacts,
                          "name": f"{variant}@{batch}"})
    if "sample" in sections:
        presets_ = args.sample_presets.split(",")
        sizes = [int(s) for s in args.sample_sizes.split(",")]
        targets = ([int(t) for t in args.sample_targets.split(",")] if args.sample_targets
                   else range(1, len(presets_) + 1))
        for mode in args.sample_modes.split(","):
            for stages in targets:
                for batch in (int(b) for b in args.sample_batches.split(",")):
                    specs.append({**base, "task": "sample", "mode": mode, "presets": presets_, "sizes": sizes,
                                  "stages": stages, "batch": batch, "sampler": args.sampler,
                                  "steps": args.sample_steps, "cond_scale": args.cond_scale})
    return specs


def environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
    if device.type == "cuda":
        env.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(),
                   device_memory_gib=gib(torch.cuda.get_device_properties(device).total_memory))
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return
    device = torch.device(args.device)
    results: dict[str, Any] = {"environment": environment(device), "settings": vars(args), "train": [], "sample": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for spec in case_specs(args):
        result = run_case(spec, args.child_timeout)
        if spec["task"] == "peak":
            results["peak"] = result
        else:
            results[spec["task"]].append(result)
        brief = {k: result.get(k) for k in ("task", "variant", "mode", "batch", "stages", "images_per_s",
                                            "max_allocated_gib", "seconds_per_set", "best_flops", "error")}
        print(json.dumps({k: v for k, v in brief.items() if v is not None}), flush=True)
        out.write_text(json.dumps(results, indent=1))  # after every case: a time-out keeps what was measured
    print(report.gpu_tables(results))


if __name__ == "__main__":
    main()
