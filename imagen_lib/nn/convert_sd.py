"""Stable Diffusion U-Net weights in and out of our ``Unet`` (presets ``sd-v1``, ``sd-v2``; docs/latent.md).

Two published layouts hold the same tensors under different names:

- ``"diffusers"``: diffusers' ``UNet2DConditionModel`` (``conv_in``, ``time_embedding.linear_1``,
  ``down_blocks.{level}.resnets.{j}`` / ``.attentions.{j}`` / ``.downsamplers.0``, ``mid_block``,
  ``up_blocks.{u}`` with the deepest level first, ``conv_norm_out``, ``conv_out``);
- ``"ldm"``: the original latent-diffusion code's ``UNetModel`` (SD 1.x/2.x ``.ckpt`` files and NeMo
  checkpoints, under ``model.diffusion_model.``): ``input_blocks.{k}`` (one per res block or downsample,
  ``input_blocks.0.0`` the input conv), ``middle_block.{0,1,2}``, ``output_blocks.{k}``, ``time_embed``, ``out``.

Our ``Unet`` walks the same blocks in the same order (``down.{k-1}`` is ``input_blocks.{k}``, ``up.{k}`` is
``output_blocks.{k}``), so the map is a renaming made from the network's own structure: any size of the
architecture converts, the real presets and tiny test ones alike. Nothing here imports diffusers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, Union

import torch
from torch import Tensor

from imagen_lib.nn import presets
from imagen_lib.nn.unet import Unet

Layout = Literal["diffusers", "ldm"]
LAYOUTS = ("diffusers", "ldm")

# our module -> theirs, for the blocks that occur once
_FIXED = {
    "diffusers": {"init_conv": "conv_in", "cond.noise.1.0": "time_embedding.linear_1",
                  "cond.noise.1.2": "time_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out"},
    "ldm": {"init_conv": "input_blocks.0.0", "cond.noise.1.0": "time_embed.0", "cond.noise.1.2": "time_embed.2",
            "out.0": "out.0", "out.2": "out.2"},
}
# a ResBlock's layers
_RES = {
    "diffusers": {"norm1": "norm1", "conv1": "conv1", "cond_proj": "time_emb_proj", "norm2": "norm2",
                  "conv2": "conv2", "skip": "conv_shortcut"},
    "ldm": {"norm1": "in_layers.0", "conv1": "in_layers.2", "cond_proj": "emb_layers.1", "norm2": "out_layers.0",
            "conv2": "out_layers.3", "skip": "skip_connection"},
}
_DOWN = {"diffusers": {"op": "conv"}, "ldm": {"op": "op"}}
_UP = {"conv": "conv"}
# inside a spatial transformer both layouts use the same names; ours differ where theirs index a Sequential
_TRANSFORMER = ((".to_out.", ".to_out.0."), (".ff.proj.", ".ff.net.0.proj."), (".ff.out.", ".ff.net.2."))
# keys that identify a layout: (a key it always has, a second one, so that a VAE's conv_in is not taken for it)
_MARKERS = {"diffusers": ("conv_in.weight", "time_embedding.linear_1.weight"),
            "ldm": ("input_blocks.0.0.weight", "time_embed.0.weight")}


class SDLoadReport(NamedTuple):
    """What :func:`load_sd_unet_weights` did.

    Attributes:
        layout: ``"diffusers"`` or ``"ldm"``, as detected.
        prefix: the prefix the U-Net's keys had in the state dict (e.g. ``"model.diffusion_model."``).
        missing: our parameter names that the state dict did not provide (each with the name it was sought
            under, ``"ours <- theirs"``; they keep their values).
        unexpected: the state dict's keys under ``prefix`` that no parameter of ours took.
    """

    layout: str
    prefix: str
    missing: list[str]
    unexpected: list[str]


def _check_net(net: Unet) -> None:
    if not isinstance(net, Unet):
        raise TypeError(f"net: expected an imagen_lib Unet (e.g. presets.build('sd-v2')), got {type(net).__name__}")
    if net.config.resblock_updown or not net.config.resample_with_conv:
        raise ValueError("net: Stable Diffusion resamples with convolutions; expected resblock_updown=False and "
                         "resample_with_conv=True")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def _down_pairs(net: Unet, layout: str) -> list[tuple[str, str, str]]:
    """(our module, theirs, kind) for the down path; ``down.{k}`` is the LDM's ``input_blocks.{k + 1}``."""
    pairs, k = [], 0
    levels = len(net.config.channel_mult)
    for level in range(levels):
        for j in range(net.config.num_res_blocks[level]):
            ldm = f"input_blocks.{k + 1}"
            theirs = f"down_blocks.{level}.resnets.{j}" if layout == "diffusers" else f"{ldm}.0"
            pairs.append((f"down.{k}.main", theirs, "res"))
            theirs = f"down_blocks.{level}.attentions.{j}" if layout == "diffusers" else f"{ldm}.1"
            pairs.append((f"down.{k}.attn", theirs, "attn"))
            k += 1
        if level < levels - 1:
            theirs = f"down_blocks.{level}.downsamplers.0" if layout == "diffusers" else f"input_blocks.{k + 1}.0"
            pairs.append((f"down.{k}.main", theirs, "down"))
            k += 1
    return pairs


def _middle_pairs(net: Unet, layout: str) -> list[tuple[str, str, str]]:
    if layout == "diffusers":
        return [("middle.main", "mid_block.resnets.0", "res"), ("middle.attn", "mid_block.attentions.0", "attn"),
                ("middle.post", "mid_block.resnets.1", "res")]
    last = 2 if net.middle.attn is not None else 1
    return [("middle.main", "middle_block.0", "res"), ("middle.attn", "middle_block.1", "attn"),
            ("middle.post", f"middle_block.{last}", "res")]


def _up_pairs(net: Unet, layout: str) -> list[tuple[str, str, str]]:
    """``up.{k}`` is the LDM's ``output_blocks.{k}``; diffusers' ``up_blocks`` count from the deepest level."""
    pairs, k = [], 0
    levels = len(net.config.channel_mult)
    for u, level in enumerate(reversed(range(levels))):
        for j in range(net.config.num_res_blocks[level] + 1):
            step = net.up[k]
            if layout == "diffusers":
                main, attn, post = (f"up_blocks.{u}.resnets.{j}", f"up_blocks.{u}.attentions.{j}",
                                    f"up_blocks.{u}.upsamplers.0")
            else:
                post_index = 2 if step.attn is not None else 1
                main, attn, post = f"output_blocks.{k}.0", f"output_blocks.{k}.1", f"output_blocks.{k}.{post_index}"
            pairs += [(f"up.{k}.main", main, "res"), (f"up.{k}.attn", attn, "attn"), (f"up.{k}.post", post, "up")]
            k += 1
    return pairs


def _module_pairs(net: Unet, layout: str) -> list[tuple[str, str, str]]:
    fixed = [(ours, theirs, "plain") for ours, theirs in _FIXED[layout].items()]
    return fixed + _down_pairs(net, layout) + _middle_pairs(net, layout) + _up_pairs(net, layout)


def _rename(rest: str, kind: str, layout: str) -> Optional[str]:
    """The name of a parameter below a module of ``kind`` (``rest`` = our name below it); None: no counterpart."""
    if kind == "plain":
        return rest
    if kind == "attn":
        dotted = f".{rest}"
        for ours, theirs in _TRANSFORMER:
            dotted = dotted.replace(ours, theirs)
        return dotted[1:]
    head, _, tail = rest.partition(".")
    table = {"res": _RES[layout], "down": _DOWN[layout], "up": _UP}[kind]
    return f"{table[head]}.{tail}" if head in table else None


def sd_unet_key_map(net: Unet, layout: Layout) -> dict[str, Optional[str]]:
    """Every state-dict key of ``net`` -> its name in ``layout`` (``"diffusers"`` or ``"ldm"``, without a
    prefix such as ``model.diffusion_model.``); None where the layout has no such tensor (e.g. a learned null
    token). ``net`` is a :class:`Unet` of Stable Diffusion's design (presets ``sd-v1``/``sd-v2`` or smaller)."""
    _check_net(net)
    _check_layout(layout)
    pairs = sorted(_module_pairs(net, layout), key=lambda pair: -len(pair[0]))  # longest prefix first
    mapping: dict[str, Optional[str]] = {}
    for key in net.state_dict():
        match = next(((ours, theirs, kind) for ours, theirs, kind in pairs if key.startswith(ours + ".")), None)
        if match is None:
            mapping[key] = None
            continue
        ours, theirs, kind = match
        rest = _rename(key[len(ours) + 1:], kind, layout)
        mapping[key] = None if rest is None else f"{theirs}.{rest}"
    return mapping


def _check_state_dict(state_dict) -> Mapping[str, Tensor]:
    if isinstance(state_dict, Mapping) and isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]  # an LDM/NeMo .ckpt: the weights sit under "state_dict"
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        raise TypeError("state_dict: expected a mapping of parameter names to tensors, "
                        f"got {type(state_dict).__name__}")
    return state_dict


def detect_sd_layout(state_dict: Mapping[str, Tensor], prefix: Optional[str] = None) -> tuple[str, str]:
    """``(layout, prefix)`` of the Stable Diffusion U-Net in ``state_dict``: diffusers' names (any prefix, e.g.
    ``"unet."``) or the original ones (e.g. under ``"model.diffusion_model."``). ``prefix`` restricts the
    search to that prefix. Raises a ValueError when there is no U-Net or more than one."""
    state_dict = _check_state_dict(state_dict)
    found = set()
    for key in state_dict:
        for layout, (first, second) in _MARKERS.items():
            if key.endswith(first):
                start = key[: len(key) - len(first)]
                if start + second in state_dict and (prefix is None or start == prefix):
                    found.add((layout, start))
    if len(found) == 1:
        return found.pop()
    if not found:
        where = "" if prefix is None else f" under prefix {prefix!r}"
        raise ValueError(f"state_dict: no Stable Diffusion U-Net found{where}: expected diffusers' names "
                         "(conv_in.weight, time_embedding.linear_1.weight, ...) or the original ones "
                         "(input_blocks.0.0.weight, time_embed.0.weight, ...; e.g. under model.diffusion_model.)")
    raise ValueError(f"state_dict: holds more than one U-Net {sorted(found)}; choose one with prefix=")


def _fit(tensor: Tensor, shape: torch.Size) -> Optional[Tensor]:
    """``tensor`` in ``shape``: as it is, or a 1x1 conv's weight as a linear layer's and back (the same map;
    SD 1.x and 2.x differ only there). None if it does not fit."""
    if tensor.shape == shape:
        return tensor
    if tensor.dim() >= 2 and len(shape) >= 2 and tensor.shape[:2] == shape[:2]:
        if all(s == 1 for s in tensor.shape[2:]) and all(s == 1 for s in shape[2:]):
            return tensor.reshape(shape)
    return None


def _listing(names: list[str], limit: int = 12) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_sd_unet_weights(net: Unet, state_dict: Mapping[str, Tensor], *, strict: bool = True,
                         prefix: Optional[str] = None) -> SDLoadReport:
    """Load Stable Diffusion U-Net weights (either layout, detected) into ``net`` in place.

    Args:
        net: a :class:`Unet` of SD's design (``presets.build("sd-v2")``, ``"sd-v1"``, or a smaller one with the
            same options).
        state_dict: diffusers' ``UNet2DConditionModel`` state dict, or an original / NeMo checkpoint's (the
            whole model's is fine: only the keys under the U-Net's prefix are read; a top-level
            ``"state_dict"`` entry is unwrapped).
        strict: raise a ValueError naming every missing and unexpected key, loading nothing (True); False:
            load what matches and report the rest.
        prefix: the U-Net's key prefix when the state dict holds several (None: detected).
    Returns a :class:`SDLoadReport`. A tensor whose shape does not fit always raises (naming it); a 1x1
    conv's weight loads into a linear projection and back. Tensors are copied into ``net``'s dtype.
    """
    layout, prefix = detect_sd_layout(state_dict, prefix)
    state_dict = _check_state_dict(state_dict)
    theirs = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    ours = net.state_dict()
    mapping = sd_unet_key_map(net, layout)
    loaded, missing, wrong = {}, [], []
    for key, name in mapping.items():
        if name is None or name not in theirs:
            missing.append(f"{key} <- {name or '(no counterpart)'}")
            continue
        fitted = _fit(theirs[name], ours[key].shape)
        if fitted is None:
            wrong.append(f"{name} {tuple(theirs[name].shape)} for {key} {tuple(ours[key].shape)}")
        else:
            loaded[key] = fitted
    unexpected = sorted(set(theirs) - set(mapping.values()))
    if wrong:
        raise ValueError(f"state_dict: {len(wrong)} tensor(s) do not fit this network (a different size or "
                         f"version of the U-Net?): {_listing(wrong)}")
    if strict and (missing or unexpected):
        raise ValueError(f"state_dict: {len(missing)} missing key(s) [{_listing(missing)}] and {len(unexpected)} "
                         f"unexpected key(s) [{_listing(unexpected)}] in the {layout} layout under prefix "
                         f"{prefix!r}; nothing was loaded (strict=False loads the rest)")
    net.load_state_dict(loaded, strict=False)
    return SDLoadReport(layout, prefix, missing, unexpected)


def sd_unet_state_dict(net: Unet, layout: Layout = "diffusers") -> dict[str, Tensor]:
    """``net``'s weights under ``layout``'s names (``"diffusers"``, default, or ``"ldm"``, no prefix): what
    diffusers' ``UNet2DConditionModel.load_state_dict`` or the original code takes. Raises a ValueError
    naming any parameter the layout has no place for."""
    mapping = sd_unet_key_map(net, layout)
    homeless = [key for key, name in mapping.items() if name is None]
    if homeless:
        raise ValueError(f"net: {len(homeless)} parameter(s) have no place in the {layout} layout: "
                         f"{_listing(homeless)}")
    return {mapping[key]: value for key, value in net.state_dict().items()}


def read_sd_state_dict(path: Union[str, Path]) -> dict[str, Tensor]:
    """The tensors of a local SD U-Net file: ``.safetensors``, or a ``.ckpt``/``.pt``/``.bin`` read with
    ``torch.load(weights_only=True)`` (no code runs); a folder: its (or its ``unet/``'s)
    ``diffusion_pytorch_model.safetensors``. Pass the result to :func:`load_sd_unet_weights`."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / name / "diffusion_pytorch_model.safetensors" for name in (".", "unet")]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"path: {path} holds no diffusion_pytorch_model.safetensors (nor unet/ one)")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    return dict(_check_state_dict(loaded))


# seed 003's unet_config key -> our config field, where only the name differs
_NEMO_SD_RENAMES = {"in_channels": "channels", "out_channels": "out_channels", "model_channels": "embed_dim",
                    "num_res_blocks": "num_res_blocks", "channel_mult": "channel_mult", "context_dim": "text_embed_dim",
                    "use_linear_in_transformer": "use_linear_in_transformer", "transformer_depth": "transformer_depth",
                    "use_checkpoint": "gradient_checkpointing", "image_size": "image_size", "dropout": "dropout",
                    "use_scale_shift_norm": "scale_shift_norm", "resblock_updown": "resblock_updown"}
# keys with no effect here: the class path, NeMo's head-count convention (the same heads for SD's configs),
# flash attention (SDPA chooses its kernels), where weights come from (from_pretrained is read below)
_NEMO_SD_IGNORED = {"_target_", "legacy", "use_flash_attention", "from_NeMo", "from_pretrained"}


def _nemo_sd_fields(unet_config: Mapping[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in unet_config.items():
        if key == "model_channels":
            fields["cond_dim"] = 4 * value  # the original code's time_embed_dim
        if key in _NEMO_SD_RENAMES:
            fields[_NEMO_SD_RENAMES[key]] = value
        elif key == "attention_resolutions":  # downsampling factors: 1 is the first level
            levels = len(unet_config.get("channel_mult", presets.get("sd-v2").channel_mult))
            fields["attention_levels"] = tuple(2**level in set(value) for level in range(levels))
        elif key == "num_head_channels":
            fields["per_head_channels"] = None if value in (-1, None) else value
        elif key == "num_heads":
            if value not in (-1, None):
                fields["num_attn_heads"] = value
        elif key == "use_spatial_transformer":
            if not value:
                raise ValueError("unet_config.use_spatial_transformer: only spatial-transformer U-Nets (true) are "
                                 "Stable Diffusion's")
        elif key not in _NEMO_SD_IGNORED:
            raise ValueError(f"unet_config.{key}: not a key of seed 003's unet_config this library knows")
    if "num_heads" in unet_config and "num_head_channels" not in unet_config:
        fields["per_head_channels"] = None  # SD 1.x: a head count, not a head width
    return fields


def unet_from_nemo_sd(unet_config: Mapping[str, Any], **overrides: Any) -> Unet:
    """The :class:`Unet` of a NeMo Stable Diffusion ``model.unet_config`` block (seed 003; a dict from its yaml).

    Keys map onto the ``sd-v2`` preset's fields (a key left out keeps the preset's value, except
    ``use_linear_in_transformer``: NeMo's default, false) (``model_channels`` -> ``embed_dim``, ``context_dim`` ->
    ``text_embed_dim``, ``attention_resolutions`` (downsampling factors) -> ``attention_levels``,
    ``num_head_channels`` -> ``per_head_channels``, ``num_heads`` -> ``num_attn_heads``, ``use_checkpoint`` ->
    ``gradient_checkpointing``; ``use_flash_attention`` and ``legacy`` have no effect: SDPA picks flash kernels
    itself). ``from_pretrained`` (a NeMo/LDM ``.ckpt`` or a diffusers file or folder; ``from_NeMo`` is not needed,
    the layout is detected) is loaded with :func:`load_sd_unet_weights`. ``overrides``: config fields applied last.
    An unknown key raises a ValueError naming it.
    """
    if not isinstance(unet_config, Mapping):
        raise TypeError(f"unet_config: expected a mapping (NeMo's model.unet_config), got {type(unet_config).__name__}")
    base = presets.get("sd-v2").replace(use_linear_in_transformer=False)  # NeMo's default when the key is left out
    net = Unet(base.replace(**{**_nemo_sd_fields(unet_config), **overrides}))
    if unet_config.get("from_pretrained"):
        load_sd_unet_weights(net, read_sd_state_dict(unet_config["from_pretrained"]))
    return net
