"""How much does the caption help the base stage? A quick check of a text encoder choice.

Trains stage 0 of a config for a few hundred steps (plain Adam with a linear warm-up, no EMA), then compares
the denoising error on held-out shapes images at a few noise levels with the right caption, with another
image's caption and with no caption. A text path that the network has learned to read shows as a clearly
larger error for the wrong caption; when "right" and "wrong" are close, the network is ignoring the words.

    python benchmarks/text_signal.py --steps 200                                   # examples/shapes.yaml as it is
    python benchmarks/text_signal.py --steps 200 --set text_encoder.trainable=true
    python benchmarks/text_signal.py --steps 200 --set text_encoder.vocabulary=null --set text_encoder.max_length=80
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from imagen_lib import config as cfg
from imagen_lib.data.shapes import ShapesDataset

REPO = Path(__file__).resolve().parent.parent


def train_base(cascade, steps: int, batch: int, lr: float, warmup: int = 50) -> float:
    """Adam on stage 0 (and a trainable encoder); returns seconds per step."""
    params = [*cascade.stages[0].net.parameters()]
    if cascade.text_encoder is not None:
        params += [p for p in cascade.text_encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99))
    data = ShapesDataset(image_size=cascade.stages[0].image_size, seed=0, length=10**7)
    cascade.train()
    start = time.perf_counter()
    for step in range(steps):
        items = data.batch(range(step * batch, (step + 1) * batch))
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        loss = cascade(items["images"], items["texts"], stage=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    return (time.perf_counter() - start) / max(steps, 1)


@torch.no_grad()
def denoising_errors(cascade, n: int = 128, sigmas=(1.0, 3.0, 10.0)) -> dict[float, dict[str, float]]:
    """Mean squared error of the base stage's x0 estimate with the right, a wrong and no caption."""
    cascade.eval()
    stage = cascade.stages[0]
    items = ShapesDataset(image_size=stage.image_size, seed=123, length=n).batch(range(n))
    x0 = items["images"]
    embeds, mask = cascade.condition(n, items["texts"])
    other = torch.roll(torch.arange(n), 1)  # each image gets its neighbour's caption
    captions = {"right": (embeds, mask), "wrong": (embeds[other], mask[other]),
                "none": (torch.zeros_like(embeds), torch.zeros_like(mask))}
    out = {}
    for sigma in sigmas:
        noisy = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
        levels = torch.full((n,), sigma)
        denoised = {name: stage.diffusion.denoiser(stage.net, text_embeds=e, text_mask=m)(noisy, levels)
                    for name, (e, m) in captions.items()}
        out[sigma] = {name: float(((x - x0) ** 2).mean()) for name, x in denoised.items()}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "examples" / "shapes.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = cfg.apply_overrides(cfg.load_config(args.config), args.overrides)
    cascade = cfg.build_cascade(config)
    seconds = train_base(cascade, args.steps, args.batch, args.lr)
    print(f"{args.steps} steps of batch {args.batch}, {seconds:.2f} s/step; overrides: {args.overrides or 'none'}")
    print("sigma | right caption | wrong caption | no caption | wrong / right")
    for sigma, e in denoising_errors(cascade).items():
        print(f"{sigma:5g} | {e['right']:.4f} | {e['wrong']:.4f} | {e['none']:.4f} | {e['wrong'] / e['right']:.2f}")


if __name__ == "__main__":
    main()
