"""Sharded training: FSDP (version 2, ``fully_shard``) through Accelerate, and the collective state-dict gathers
it needs.

When the accelerator shards (``accelerate launch --config_file fsdp.yaml`` with ``distributed_type: FSDP`` and
``fsdp_version: 2``, or ``TrainerSettings.fsdp``, which builds :func:`fsdp_plugin`), each stage's network and
its optimizer are prepared together (:func:`prepare_stage`: Accelerate maps the optimizer onto the sharded
parameters), and every state dict the Trainer saves or loads goes through torch's distributed state-dict API
(``torch.distributed.checkpoint.state_dict``): a collective that every process enters. Saves gather whole
tensors on the main process (CPU memory), so a checkpoint written under FSDP is the same files a single process
writes and loads into a plain :class:`~imagen_lib.cascade.Cascade` as it is; loads give every process the whole
tensors read from the checkpoint, each keeping its own shard. Optimizer states are saved with parameter indices,
as ``torch.optim.Optimizer.state_dict`` numbers them, so FSDP and single-process checkpoints resume either way.

The EMA lives on the shards: the EMA copy is made before the network is sharded, then sharded with the same plan
(:func:`shard_ema`), so each process averages its own slice of every parameter (local arithmetic, no
communication) and holds 1/N of the EMA. The alternative, an EMA of whole parameters gathered at every update,
costs one all-gather per update and a whole fp32 copy of the network on every GPU (8.4 GB for ``base64-2b``),
the memory FSDP is there to save. The EMA is gathered at save like the weights; sampling with it is a forward
pass every process takes part in (:meth:`Trainer.write_samples` samples on every process, the main one writes).

Not covered: FSDP version 1 (its flat parameters need another EMA and optimizer-state mapping: set
``fsdp_version: 2``), DeepSpeed (its engine owns the optimizer step, clipping and checkpoint format, so it is not
the same code path as FSDP 2 in Accelerate: refused with an error), and a trainable text encoder under FSDP (it
is shared by every stage's optimizer; freeze it or train without sharding).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn

from imagen_lib.training import nonfinite
from imagen_lib.validation import check_finite

__all__ = ["WRAP_CLASSES", "fsdp_plugin", "is_sharded", "prepare_stage", "shard_ema", "full_state_dict",
           "load_full_state_dict", "optimizer_state", "load_optimizer_state", "whole", "check_finite_weights"]

WRAP_CLASSES = ("ResBlock", "AttentionBlock")
"""The network blocks each made an FSDP unit of their own by :func:`fsdp_plugin` (gathered one at a time in the
forward and backward passes, so at most a block's whole weights are resident beside the shards)."""


def fsdp_plugin(activation_checkpointing: bool = False):
    """Accelerate's ``FullyShardedDataParallelPlugin`` for ``TrainerSettings.fsdp``: FSDP 2, one unit per
    :data:`WRAP_CLASSES` block (and the network as the root unit), weights resharded after the forward pass
    (ZeRO-3), whole-tensor checkpoints; ``activation_checkpointing`` recomputes each block's activations in
    the backward pass [False; the network's own ``gradient_checkpointing`` does the same without FSDP]."""
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=list(WRAP_CLASSES),
        reshard_after_forward=True, state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False,
        activation_checkpointing=activation_checkpointing)


def is_sharded(accelerator: Any, train_text: bool = False, asked: bool = False) -> bool:
    """Whether ``accelerator`` shards the networks (FSDP 2); refuses the set-ups this module does not cover with
    an error that says what to change. ``asked`` (``TrainerSettings.fsdp``) warns when it does not shard."""
    from accelerate.utils import DistributedType

    if asked and accelerator.distributed_type != DistributedType.FSDP:
        warnings.warn(f"fsdp: ignored: Accelerate shards only over several GPUs (this run: "
                      f"{accelerator.num_processes} process(es), {accelerator.distributed_type}, on "
                      f"{accelerator.device.type}); the networks train unsharded", stacklevel=4)

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise ValueError("accelerator: DeepSpeed is not supported by the Trainer (its engine owns the optimizer step "
                         "and the checkpoint format); use FSDP 2 for sharding (distributed_type: FSDP, fsdp_version: "
                         "2 in the Accelerate config, or trainer.fsdp: true)")
    if kind != DistributedType.FSDP:
        return False
    version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
    if version != 2:
        raise ValueError(f"accelerator: FSDP version {version} is not supported by the Trainer; set fsdp_version: 2 "
                         "in the Accelerate config file (fsdp_config) or use trainer.fsdp: true")
    if train_text:
        raise ValueError("text_encoder.trainable: a trainable text encoder cannot be sharded (every stage's optimizer "
                         "shares it); set text_encoder.trainable: false, or train without FSDP")
    return True


def prepare_stage(accelerator: Any, net: nn.Module, optimizer: torch.optim.Optimizer,
                  sharded: bool) -> tuple[nn.Module, Any]:
    """The stage's network and optimizer as Accelerate prepares them: together under FSDP (``fully_shard``
    replaces the parameters, and Accelerate points the optimizer at the new ones), apart otherwise (distributed
    data parallel wraps the network and keeps its parameters)."""
    if sharded:
        return accelerator.prepare(net, optimizer)
    return accelerator.prepare_model(net), accelerator.prepare_optimizer(optimizer)


def shard_ema(accelerator: Any, ema: Any) -> None:
    """Shard the EMA copy (``ema.ema_model``, an ema-pytorch EMA) of a network with the plan its network was
    sharded with (same units, same mesh), so the EMA update is local arithmetic on each process's slice. The
    update then lerps tensor by tensor: its one fused call over every tensor cannot mix the sharded parameters
    with the buffers, which FSDP leaves whole."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    fsdp2_prepare_model(accelerator, ema.ema_model)
    ema.use_foreach = False


def _options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def full_state_dict(module: nn.Module, sharded: bool) -> dict[str, Tensor]:
    """``module.state_dict()``, or under FSDP its whole tensors gathered on the main process in CPU memory (other
    processes get an empty dict). A collective when sharded: every process calls it."""
    if not sharded:
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(module: nn.Module, tensors: Mapping[str, Tensor], where: str) -> None:
    """Load whole tensors (every process holds them, read from a checkpoint) into a sharded ``module``: each
    process cuts out its own shard (no communication). The same checks as an unsharded load (finite floats,
    keys, shapes), naming ``where``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = module.state_dict()
    shards = {}
    for key, value in tensors.items():
        if value.is_floating_point():
            check_finite(f"{where}: tensor {key!r}", value)
        mine = own.get(key)
        if isinstance(mine, DTensor) and tuple(value.shape) == tuple(mine.shape):
            value = distribute_tensor(value.to(mine.device, mine.dtype), mine.device_mesh, mine.placements,
                                      src_data_rank=None)  # this process's slice of its own copy
        shards[key] = value
    try:
        module.load_state_dict(shards)
    except RuntimeError as error:  # missing or unexpected keys, shapes
        raise ValueError(f"{where} does not fit the network: {' '.join(str(error).split())}") from None


def _parameter_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter in the order ``Optimizer.state_dict`` numbers them."""
    names = {id(p): name for name, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(module: nn.Module, optimizer: Any, sharded: bool) -> dict:
    """``optimizer.state_dict()``, or under FSDP the whole state gathered on the main process (a collective),
    renumbered with parameter indices as an unsharded optimizer numbers them (other processes get {})."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer
    full = get_optimizer_state_dict(module, inner, options=_options(full_state_dict=True, cpu_offload=True))
    if not full:
        return {}
    index = {name: i for i, name in enumerate(_parameter_names(module, inner))}
    groups = [dict(group, params=[index[name] for name in group["params"]]) for group in full["param_groups"]]
    return {"state": {index[name]: state for name, state in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(module: nn.Module, optimizer: Any, state: Mapping, sharded: bool) -> None:
    """Inverse of :func:`optimizer_state`: a state numbered by parameter index loaded into ``optimizer``
    (under FSDP every process passes the whole state and keeps its shard: a collective)."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    names = _parameter_names(module, inner)
    full = {"state": {names[int(i)]: value for i, value in state["state"].items()},
            "param_groups": [dict(group, params=[names[int(i)] for i in group["params"]])
                             for group in state["param_groups"]]}
    set_optimizer_state_dict(module, inner, full, options=_options(full_state_dict=True))


def whole(norm: Optional[Tensor]) -> Optional[Tensor]:
    """A gradient norm as a plain tensor: under FSDP ``clip_grad_norm_`` returns a distributed tensor (its
    reduction over every shard is made here); anything else unchanged."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def check_finite_weights(accelerator: Any, files: Mapping[str, Mapping[str, Tensor]], path: str,
                         last_good: Optional[str], sharded: bool) -> None:
    """:func:`~imagen_lib.training.nonfinite.check_finite_weights` on every process (unsharded: each holds the
    same weights), or under FSDP on the main process, which holds the gathered tensors, and its verdict
    broadcast so that every process raises together (a collective)."""
    if not sharded:
        nonfinite.check_finite_weights(files, path, last_good)
        return
    from accelerate.utils import broadcast_object_list

    verdict = [None]
    if accelerator.is_main_process:
        try:
            nonfinite.check_finite_weights(files, path, last_good)
        except nonfinite.NonFiniteLossError as error:
            verdict = [str(error)]
    verdict = broadcast_object_list(verdict)
    if verdict[0] is not None:
        raise nonfinite.NonFiniteLossError(verdict[0])
