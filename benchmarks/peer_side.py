"""The peer's side of the benchmark: lucidrains' imagen-pytorch 2.1.0 (``ElucidatedImagen`` + its ``Unet``).

Runs in benchmarks/.peer-venv (see setup_peer.sh). Two facts of that environment are handled here:
- imagen-pytorch reads ``google/t5-v1_1-base``'s config from the hub at import (a default argument);
  ``import_peer`` points ``HF_HOME`` at benchmarks/.hf-cache, which holds only that config, offline.
- torchvision 0.28.0 on PyPI is a CUDA build whose C++ ops do not load next to the CPU torch; its Python
  part then fails while registering fake kernels for two ops it could not load. imagen-pytorch uses
  torchvision only for ``ToPILImage`` (not on any path measured here), so the two op names are declared
  before the import and the rest of torchvision imports normally. Nothing the benchmark times is touched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import common
import torch

HERE = Path(__file__).resolve().parent

# Networks of the peer's own design (its BaseUnet64 / SRUnet256 recipes, scaled down to CPU size):
# attention and cross-attention at every level but the first for the base stage, cross-attention only at
# the lowest level for super-resolution, as its presets do. Parameter counts are printed by the harness.
SHARED = dict(dim=32, dim_mults=(1, 2, 4), attn_heads=4, attn_dim_head=32, ff_mult=2.0)
CONFIGS: dict[str, dict[str, Any]] = {
    "base": dict(SHARED, num_resnet_blocks=2, layer_attns=(False, True, True), layer_cross_attns=(False, True, True),
                 memory_efficient=False),
    "sr": dict(SHARED, num_resnet_blocks=(1, 2, 2), layer_attns=(False, False, True),
               layer_cross_attns=(False, False, True), memory_efficient=True),
}
IMAGE_SIZES = (32, 64)
STAGES = ("base", "sr")


def import_peer() -> Any:
    """Import imagen_pytorch offline (see the module docstring) and return the module."""
    os.environ.setdefault("HF_HOME", str(HERE / ".hf-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        import sys

        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP.append(lib)  # the declarations live as long as the Library object
        import torchvision  # noqa: F401
    import imagen_pytorch

    return imagen_pytorch


_KEEP: list[Any] = []


def version() -> str:
    from importlib.metadata import version as dist_version

    return dist_version("imagen-pytorch")


def build_imagen(text_embed_dim: int = 768, cond_drop_prob: float = 0.1):
    """The two-stage ``ElucidatedImagen`` (32 px base, 32->64 SR) with the peer's default sampler settings
    (Heun, 32 steps, S_churn 80, lowres_sample_noise_level 0.2)."""
    imagen_pytorch = import_peer()
    unets = [imagen_pytorch.Unet(**CONFIGS[s], text_embed_dim=text_embed_dim) for s in STAGES]
    return imagen_pytorch.ElucidatedImagen(
        unets=unets,
        image_sizes=IMAGE_SIZES,
        text_embed_dim=text_embed_dim,
        cond_drop_prob=cond_drop_prob,
        num_sample_steps=32,
    )


class PeerSide(common.Side):
    """Training one stage's optimiser step the way the peer's ``ImagenTrainer`` does (Adam, lr 1e-4, grad
    clipping; its accelerate wrapper adds no work in one CPU process), and sampling the cascade."""

    name = "imagen-pytorch"

    def __init__(self, device: torch.device, lr: float = 1e-4):
        super().__init__(device, lr)
        self.imagen = build_imagen().to(device)
        self.image_sizes = dict(zip(STAGES, IMAGE_SIZES))

    def network(self, stage: str) -> torch.nn.Module:
        return self.imagen.unets[STAGES.index(stage)]

    def loss(
        self, stage: str, images: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """``images`` in [-1, 1] at the stage's size (the peer makes the low-resolution input itself)."""
        self.imagen.train()
        number = STAGES.index(stage) + 1
        return self.imagen((images + 1) / 2, text_embeds=text_embeds, text_masks=text_mask, unet_number=number)

    def _sample(
        self, text_embeds: torch.Tensor, text_mask: torch.Tensor, *, cond_scale: float, steps: int, sampler: str,
        seed: int,
    ) -> torch.Tensor:
        """At the peer's defaults but ``steps``; its only sampler is stochastic Heun."""
        if sampler != "heun":
            raise ValueError(f"the peer has only its Heun sampler, got sampler={sampler!r}")
        self.imagen.hparams = [hp._replace(num_sample_steps=steps) for hp in self.imagen.hparams]
        torch.manual_seed(seed)
        return self.imagen.sample(text_embeds=text_embeds, text_masks=text_mask, cond_scale=cond_scale, use_tqdm=False)
