"""The one adapter from NeMo's Imagen vocabulary (and this library's configs before issue 20, which used it)
to ours. Nowhere else does the configuration accept another name for a key.

:func:`from_nemo` converts a whole configuration, :func:`stage_from_nemo` one stage block::

    unet: tiny-32                                  ->  network: tiny-32
    unet: {preset: tiny-sr64, embed_dim: 16}       ->  network: {preset: tiny-sr64, config: {embed_dim: 16}}
    unet: {type: EfficientUnet, embed_dim: 16}     ->  network: {kind: EfficientUnet, config: {embed_dim: 16}}
    preconditioning_type: EDM                      ->  diffusion: {kind: ElucidatedDiffusion, config: {...}}
    preconditioning: {p_mean: -1.2, p_std: 1.2}    ->  ... config: {P_mean: -1.2, P_std: 1.2}
    preconditioning_type: DDPM                     ->  diffusion: {kind: GaussianDiffusionContinuous, ...}
    sampler: {step: 25, cfg: 3.0, name: heun}      ->  sampler: {steps: 25, cond_scale: 3.0, sampler: heun}
    noise_aug: {...}                               ->  lowres_aug: {...}
    text_encoder: {encoder_path: .., token_length: 128}  ->  text_encoder: {name_or_path: .., max_length: 128}
    drop_rate: 0.1                                 ->  cond_drop_prob: 0.1

Keys that are already ours pass through, so a half-converted configuration converts too.
"""

from __future__ import annotations

import copy
from typing import Any

# block (the schema class that reads it) -> {NeMo's or the old name: ours}
RENAMES: dict[str, dict[str, str]] = {
    "RunConfig": {"drop_rate": "cond_drop_prob"},
    "TextEncoderConfig": {"encoder_path": "name_or_path", "token_length": "max_length"},
    "StageConfig": {"unet": "network", "preconditioning_type": "diffusion", "preconditioning": "diffusion",
                    "noise_aug": "lowres_aug"},
    "SamplerSettings": {"step": "steps", "cfg": "cond_scale", "name": "sampler"},
    "ElucidatedDiffusion": {"p_mean": "P_mean", "p_std": "P_std"},
    "NetworkBlock": {"type": "kind"},
}
# NeMo's preconditioning_type -> our diffusion process
PRECONDITIONING = {"EDM": "ElucidatedDiffusion", "DDPM": "GaussianDiffusionContinuous"}


def hint(block: str, key: str) -> str:
    """What to write instead of ``key`` in a ``block`` (empty when ``key`` is no NeMo or old name)."""
    new = RENAMES.get(block, {}).get(key)
    if new is None:
        if block == "NetworkBlock":
            return " (a network's own arguments go inside its config: mapping)"
        return ""
    return f" (NeMo's or the old name: write {new!r} instead, or convert the config with imagen_lib.config.from_nemo)"


def _renamed(block: Any, table: str, where: str) -> Any:
    if not isinstance(block, dict):
        return block
    out: dict[str, Any] = {}
    source: dict[str, str] = {}
    for key, value in block.items():
        new = RENAMES[table].get(key, key)
        if new in out:
            raise ValueError(f"{where}: both {source[new]!r} and {key!r} given; they are the same setting")
        out[new], source[new] = value, key
    return out


def _network(unet: Any) -> Any:
    """An old ``unet`` entry as a ``network`` block."""
    if not isinstance(unet, dict):
        return unet  # a preset name
    unet = dict(unet)
    if "preset" in unet:
        name = unet.pop("preset")
        unet.pop("type", None)  # the old form allowed it when it named the preset's own class
        return {"preset": name, "config": unet}
    return {"kind": unet.pop("type", "Unet"), "config": unet}


def _diffusion(kind: Any, options: Any, where: str) -> dict:
    name = PRECONDITIONING.get(str(kind).upper())
    if name is None:
        raise ValueError(f"{where}.preconditioning_type: expected one of {list(PRECONDITIONING)}, got {kind!r}")
    table = name if name in RENAMES else None
    config = _renamed(options or {}, table, f"{where}.preconditioning") if table else dict(options or {})
    return {"kind": name, "config": config}


def stage_from_nemo(block: dict, where: str = "stage") -> dict:
    """A stage block in NeMo's (or the old) vocabulary, in ours."""
    if not isinstance(block, dict):
        raise ValueError(f"{where}: expected a mapping, got {block!r}")
    block = copy.deepcopy(block)
    out: dict[str, Any] = {}
    if "unet" in block:
        out["network"] = _network(block.pop("unet"))
    if "preconditioning_type" in block or "preconditioning" in block:
        out["diffusion"] = _diffusion(block.pop("preconditioning_type", "EDM"), block.pop("preconditioning", None),
                                      where)
    if "noise_aug" in block:
        out["lowres_aug"] = block.pop("noise_aug")
    if isinstance(block.get("sampler"), dict):
        block["sampler"] = _renamed(block["sampler"], "SamplerSettings", f"{where}.sampler")
    for key, value in block.items():
        if key in out:
            raise ValueError(f"{where}: both {key!r} and its NeMo name given; they are the same setting")
        out[key] = value
    return out


def from_nemo(config: dict) -> dict:
    """A whole configuration in NeMo's (or the old) vocabulary, in ours (a new dict; the input is kept)."""
    if not isinstance(config, dict):
        raise ValueError(f"config: expected a mapping, got {config!r}")
    out = _renamed(copy.deepcopy(config), "RunConfig", "config")
    if isinstance(out.get("text_encoder"), dict):
        out["text_encoder"] = _renamed(out["text_encoder"], "TextEncoderConfig", "text_encoder")
    if isinstance(out.get("stages"), list):
        out["stages"] = [stage_from_nemo(s, f"stages.{k}") for k, s in enumerate(out["stages"])]
    return out
