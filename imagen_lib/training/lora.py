"""LoRA fine-tuning of a stage's network through ``peft`` (Hu et al. 2021: ``W x + (alpha / r) B A x`` with a
trained rank-``r`` pair ``A`` (r x in), ``B`` (out x r) beside each frozen projection ``W``; ``B`` starts at zero,
so a freshly adapted network computes exactly what the base one does).

The recipe::

    cascade = Cascade.from_checkpoint("runs/shapes/checkpoint")
    add_lora(cascade, stage=0, rank=8)            # only the adapters are trainable from here on
    trainer = Trainer(cascade, lr=1e-4, ...)      # trains them (and keeps their EMA)
    trainer.fit(loader, 0, 500)
    save_lora(trainer, "runs/shapes-pink/lora", base="runs/shapes/checkpoint")

    cascade = Cascade.from_checkpoint("runs/shapes/checkpoint")
    load_lora(cascade, "runs/shapes-pink/lora")   # EMA adapters by default
    merge_lora(cascade)                           # optional: fold B A into W for sampling speed

Adapters go on the attention projections (``to_q``, ``to_kv``, ``to_kv_text``, ``proj_out`` of
:class:`~imagen_lib.nn.attention.ImageAttention`) and the two projections of each
:class:`~imagen_lib.nn.attention.FeedForward` (named ``feed_forward`` here) by default; any ``nn.Linear`` may be
targeted by the last part of its name (e.g. ``cond_proj``). An adapter folder is a checkpoint of its own
(:mod:`imagen_lib.checkpoint`: safetensors + JSON, versioned, never pickled): ``stage{k}.safetensors`` (the
adapters as trained), ``stage{k}.ema.safetensors`` (their EMA, when a Trainer saved them), ``config.json`` (rank,
alpha, dropout, targets and the network each was trained on) and, when the word-level text encoder learned new
words with them (:mod:`imagen_lib.training.vocabulary`), those words' embedding rows
(``text_encoder.words[.ema].safetensors``). A cascade's own checkpoint refuses weights that hold
adapters (:func:`imagen_lib.cascade_checkpoint.write_cascade_checkpoint`): save them here or merge them first.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from imagen_lib import checkpoint as ckpt
from imagen_lib.cascade import Cascade
from imagen_lib.checkpoint import PathLike
from imagen_lib.nn.attention import FeedForward
from imagen_lib.validation import check_int, check_number, check_stage

FORMAT = "imagen_lib.lora/1"
FEED_FORWARD = "feed_forward"  # the Linear layers of every FeedForward block
DEFAULT_TARGETS = ("to_q", "to_kv", "to_kv_text", "proj_out", FEED_FORWARD)
_SPEC = "imagen_lora"  # attribute of an adapted network holding its LoRA settings (plain JSON values)


def _linear_layers(net: nn.Module) -> dict[str, tuple[nn.Linear, bool]]:
    """Every ``nn.Linear`` of ``net`` by full name, with whether it sits in a FeedForward block."""
    inside = {f"{name}.{child}" if name else child
              for name, module in net.named_modules() if isinstance(module, FeedForward)
              for child, _ in module.named_modules() if child}
    return {name: (module, name in inside) for name, module in net.named_modules() if isinstance(module, nn.Linear)}


def lora_targets(net: nn.Module, target_modules: Optional[Sequence[str]] = None) -> list[str]:
    """The full names of the Linear layers of ``net`` that ``target_modules`` picks: ``feed_forward`` (the
    FeedForward blocks' projections) or the last part of a Linear layer's name (``to_q``). Each given target
    must pick at least one layer (``ValueError`` naming it and the choices); the default, None, picks those of
    :data:`DEFAULT_TARGETS` the network has (a network without text has no ``to_kv_text``), at least one."""
    layers = _linear_layers(net)
    picked: list[str] = []
    for target in DEFAULT_TARGETS if target_modules is None else target_modules:
        names = [name for name, (_, in_ff) in layers.items()
                 if (in_ff if target == FEED_FORWARD else name.rsplit(".", 1)[-1] == target)]
        if not names and target_modules is not None:
            choices = sorted({name.rsplit(".", 1)[-1] for name, (_, in_ff) in layers.items() if not in_ff}
                             - set("0123456789"))
            raise ValueError(f"target_modules: {target!r} names no Linear layer of this network; expected "
                             f"{FEED_FORWARD!r} or one of {choices}")
        picked.extend(name for name in names if name not in picked)
    if not picked:
        raise ValueError(f"target_modules: the network has none of the default targets {list(DEFAULT_TARGETS)} "
                         "(no attention); name its Linear layers to adapt (e.g. 'cond_proj')")
    return picked


def has_lora(net: nn.Module) -> bool:
    """Whether ``net`` carries LoRA adapters (added by :func:`add_lora` and not merged)."""
    from peft.tuners.lora import LoraLayer

    return any(isinstance(module, LoraLayer) for module in net.modules())


def lora_spec(rank: int = 4, alpha: Optional[float] = None, dropout: float = 0.0,
              target_modules: Optional[Sequence[str]] = None) -> dict:
    """The checked LoRA settings as plain JSON values (``alpha`` defaults to ``rank``: a scale of 1;
    ``target_modules`` None: the attention and feed-forward projections the network has)."""
    rank = check_int("rank", rank, low=1)
    alpha = float(rank) if alpha is None else check_number("alpha", alpha, low=0, low_open=True)
    dropout = check_number("dropout", dropout, low=0, high=1, high_open=True)
    if target_modules is not None:
        if isinstance(target_modules, str) or not isinstance(target_modules, Sequence) or not target_modules:
            raise ValueError(f"target_modules: expected None or a non-empty list of module names, got "
                             f"{target_modules!r}")
        if not all(isinstance(t, str) and t for t in target_modules):
            raise TypeError(f"target_modules: expected module names (non-empty strings), got {target_modules!r}")
        target_modules = list(target_modules)
    return {"rank": rank, "alpha": alpha, "dropout": dropout, "target_modules": target_modules}


def add_lora_to_network(net: nn.Module, spec: dict) -> int:
    """Put adapters (:func:`lora_spec`'s settings) on ``net`` in place and freeze everything else; returns the
    number of trainable (adapter) weights."""
    from peft import LoraConfig, inject_adapter_in_model

    if has_lora(net):
        raise ValueError("net: already carries LoRA adapters (merge them with merge_lora or start from the base)")
    targets = lora_targets(net, spec["target_modules"])
    config = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                        target_modules=targets, bias="none")
    inject_adapter_in_model(config, net)
    for name, param in net.named_parameters():
        param.requires_grad_(".lora_" in name)
    setattr(net, _SPEC, dict(spec))
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def add_lora(
    cascade: Cascade, stage: int = 0, *, rank: int = 4, alpha: Optional[float] = None, dropout: float = 0.0,
    target_modules: Optional[Sequence[str]] = None,
) -> int:
    """Add LoRA adapters to stage ``stage``'s network [0] and freeze its base weights; returns how many weights
    are trained. ``rank`` [4], ``alpha`` [rank: the adapters' output scale is alpha / rank], ``dropout`` on the
    adapters' input [0.0], ``target_modules`` [None: those of :data:`DEFAULT_TARGETS` the network has;
    see :func:`lora_targets`]. Build the Trainer afterwards: it then
    optimizes (and keeps the EMA of) the adapters only."""
    if not isinstance(cascade, Cascade):
        raise TypeError(f"cascade: expected a Cascade, got {type(cascade).__name__}")
    k = check_stage("stage", stage, len(cascade.stages))
    return add_lora_to_network(cascade.stages[k].net, lora_spec(rank, alpha, dropout, target_modules))


def lora_weights(net: nn.Module) -> dict[str, Tensor]:
    """The adapter weights of ``net`` only (``down.2.attn.layers.0.to_q.lora_A.weight``, ...)."""
    return {name.replace(".default.", "."): t.detach() for name, t in net.state_dict().items() if ".lora_" in name}


def _adapted_stages(cascade: Cascade) -> list[int]:
    return [k for k, stage in enumerate(cascade.stages) if has_lora(stage.net)]


def save_lora(source: Any, path: PathLike, *, base: Optional[PathLike] = None, overwrite: bool = False) -> str:
    """Write the adapters of every adapted stage of ``source`` (a Cascade, or a Trainer: then their EMA too) as
    a checkpoint at ``path`` (``stage{k}.safetensors``, ``stage{k}.ema.safetensors``, ``config.json``); ``base``,
    the checkpoint they were trained on, is recorded for reference. Returns ``path``."""
    from imagen_lib.training.trainer import Trainer

    trainer = source if isinstance(source, Trainer) else None
    cascade = trainer.cascade if trainer is not None else source
    if not isinstance(cascade, Cascade):
        raise TypeError(f"source: expected a Cascade or a Trainer, got {type(source).__name__}")
    stages = _adapted_stages(cascade)
    if not stages:
        raise ValueError("source: no stage carries LoRA adapters (add them with add_lora, or they were merged)")
    tensors, specs = {}, {}
    for k in stages:
        net = cascade.stages[k].net
        tensors[f"stage{k}"] = lora_weights(net)
        if trainer is not None:
            tensors[f"stage{k}.ema"] = lora_weights(trainer.stages[k].ema.ema_model)
        specs[str(k)] = {**getattr(net, _SPEC), "network": cascade.stages[k].config["network"]}
    words = [] if cascade.text_encoder is None else list(cascade.text_encoder.source.get("added_words", []))
    if words:  # words the encoder learned with the adapters (imagen_lib.training.vocabulary) go with them
        tensors["text_encoder.words"] = {"weight": _word_rows(cascade.text_encoder.model, cascade, words)}
        if trainer is not None and trainer.text_ema is not None:
            tensors["text_encoder.words.ema"] = {"weight": _word_rows(trainer.text_ema.ema_model, cascade, words)}
    config = {"format": FORMAT, "stages": specs, "base": None if base is None else str(base), "added_words": words}
    return ckpt.write_checkpoint(path, config=config, tensors=tensors, overwrite=overwrite)


def _word_rows(model: nn.Module, cascade: Cascade, words: list[str]) -> Tensor:
    vocab = cascade.text_encoder.word_vocabulary
    return model.get_input_embeddings().weight.detach()[[vocab[w] for w in words]]


def _load_words(cascade: Cascade, path: str, words: list[str], use_ema: bool) -> None:
    """Add the words saved with the adapters to the cascade's word-level encoder, with their embedding rows."""
    encoder = cascade.text_encoder
    if encoder is None:
        warnings.warn(f"cascade: has no text encoder, so the words {words} saved with the adapters at {path} are "
                      "not added (precomputed embeddings must hold them)", stacklevel=3)
        return
    name = "text_encoder.words.ema" if use_ema and ckpt.has_file(path, "text_encoder.words.ema.safetensors") \
        else "text_encoder.words"
    rows = ckpt.read_tensors(path, name)["weight"]
    if rows.shape != (len(words), encoder.embed_dim) or not torch.isfinite(rows).all():
        raise ValueError(f"{name}.safetensors in {path}: expected {len(words)} finite rows of width "
                         f"{encoder.embed_dim}, got shape {tuple(rows.shape)}")
    encoder.extend_vocabulary(words)  # a ValueError naming 'words' when the encoder is not word-level
    vocab, table = encoder.word_vocabulary, encoder.model.get_input_embeddings().weight
    with torch.no_grad():
        table[[vocab[w] for w in words]] = rows.to(table.device, table.dtype)


def _read_lora_config(path: str) -> dict:
    config = ckpt.read_config(path)
    if config.get("format") != FORMAT or not isinstance(config.get("stages"), dict):
        raise ValueError(f"path: {path} is not a LoRA adapter checkpoint (config.json format {config.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return config


def _load_adapter_weights(net: nn.Module, tensors: dict[str, Tensor], where: str) -> None:
    """Copy saved adapter weights into ``net``'s adapters: every adapter filled, nothing else touched."""
    own = {name.replace(".default.", "."): name for name in net.state_dict() if ".lora_" in name}
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{where}: adapters do not match the network (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    state = net.state_dict()
    for name, value in tensors.items():
        if value.shape != state[own[name]].shape:
            raise ValueError(f"{where}: {name} has shape {tuple(value.shape)}, the network's adapter "
                             f"{tuple(state[own[name]].shape)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{where}: {name} holds NaN or infinite values")
    net.load_state_dict({own[name]: value for name, value in tensors.items()}, strict=False)


def load_lora(cascade: Cascade, path: PathLike, *, use_ema: bool = True) -> Cascade:
    """Add the adapters saved at ``path`` (by :func:`save_lora`) to ``cascade`` (the base they were trained on):
    their EMA weights when saved and ``use_ema`` [True], else the trained ones; new words saved with them are
    added to the cascade's word-level text encoder with their embedding rows. Returns ``cascade``; its base
    weights are left as they are and frozen, the adapters trainable, as after :func:`add_lora` (a Trainer built
    now continues training them); :func:`merge_lora` folds the adapters into the base weights."""
    if not isinstance(cascade, Cascade):
        raise TypeError(f"cascade: expected a Cascade, got {type(cascade).__name__}")
    path = ckpt.resolve(path)
    config = _read_lora_config(path)
    for key, spec in sorted(config["stages"].items()):
        k = check_stage(f"stage {key} of {path}", int(key), len(cascade.stages))
        stage = cascade.stages[k]
        if spec.get("network") != json.loads(json.dumps(stage.config["network"])):
            raise ValueError(f"cascade: stage {k}'s network differs from the one the adapters at {path} were "
                             "trained on (config.json 'network'); load them onto their base checkpoint")
        name = f"stage{k}.ema" if use_ema and ckpt.has_file(path, f"stage{k}.ema.safetensors") else f"stage{k}"
        tensors = ckpt.read_tensors(path, name)
        device = next(stage.net.parameters()).device
        add_lora_to_network(stage.net, lora_spec(spec["rank"], spec["alpha"], spec["dropout"],
                                                 spec["target_modules"]))
        stage.net.to(device)
        _load_adapter_weights(stage.net, tensors, f"{name}.safetensors in {path}")
    if config.get("added_words"):
        _load_words(cascade, path, list(config["added_words"]), use_ema)
    return cascade


def merge_lora_into_network(net: nn.Module) -> nn.Module:
    """Fold every adapter of ``net`` into its base weight (``W += alpha / r * B A``) and put the plain layer
    back, so ``net`` is an ordinary network again (its state dict has the base names). Returns ``net``."""
    from peft.tuners.lora import LoraLayer

    adapted = [(name, module) for name, module in net.named_modules() if isinstance(module, LoraLayer)]
    for name, module in adapted:
        module.merge(safe_merge=True)  # raises instead of writing NaN into the weights
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, child, module.get_base_layer())
    if hasattr(net, _SPEC):
        delattr(net, _SPEC)
    return net


def merge_lora(target: Union[Cascade, nn.Module]) -> Union[Cascade, nn.Module]:
    """Merge the adapters of a cascade's every adapted stage (or of one network) into its weights, for sampling
    without the adapters' extra matrix products; the result can be saved as an ordinary checkpoint."""
    if isinstance(target, Cascade):
        for k in _adapted_stages(target):
            merge_lora_into_network(target.stages[k].net)
        return target
    if isinstance(target, nn.Module):
        return merge_lora_into_network(target)
    raise TypeError(f"target: expected a Cascade or a network, got {type(target).__name__}")
