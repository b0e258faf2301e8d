"""What :meth:`Trainer.save <imagen_lib.training.trainer.Trainer.save>` writes besides the weights, and its
checks on load.

``trainer.json`` holds ``run_id``, ``steps`` (optimizer steps per stage), ``horizons`` (each stage's cosine
horizon, null until set), ``settings``, ``optimizers`` (their state without tensors), ``rng``, ``scaler``,
``data`` (per stage ``{"epoch", "batch", "batches"}``: the data position, see
:class:`~imagen_lib.training.data_order.DataPosition`) and ``nonfinite`` (per stage ``{"skipped", "in_a_row"}``:
steps skipped for a non-finite loss or gradient, in all and in the current run of them);
``trainer.safetensors`` holds the optimizer tensors, the EMA counters and the RNG states. Checkpoints written
before ``data`` and ``nonfinite`` existed load as ``steps`` batches taken and nothing skipped.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping
from typing import Any, Optional

from torch import Tensor

from imagen_lib import checkpoint as ckpt
from imagen_lib.checkpoint import PathLike
from imagen_lib.training import sharding
from imagen_lib.training.data_order import DataPosition


def trainer_state(trainer: Any, optimizers: Optional[list] = None) -> tuple[dict[str, Tensor], dict]:
    """(``trainer.safetensors``'s tensors, ``trainer.json``'s values) of ``trainer`` (a
    :class:`~imagen_lib.training.trainer.Trainer`, not imported here: it imports this module); ``optimizers``:
    each stage's optimizer state (default: ``optimizer.state_dict()``; under FSDP the gathered one)."""
    if optimizers is None:
        optimizers = [st.optimizer.state_dict() for st in trainer.stages]
    tensors: dict[str, Tensor] = {}
    state = {
        "run_id": trainer.run_id, "steps": trainer.steps, "horizons": trainer.horizons,
        "settings": trainer.settings.config,
        "optimizers": [ckpt.split_state(state, f"opt{k}", tensors) for k, state in enumerate(optimizers)],
        "rng": ckpt.rng_state(tensors),
        "scaler": None if trainer.scaler is None else trainer.scaler.state_dict(),
        "data": [st.data.as_dict() for st in trainer.stages],
        "nonfinite": [{"skipped": st.skipped, "in_a_row": st.skipped_in_a_row} for st in trainer.stages],
    }
    for k, st in enumerate(trainer.stages):
        tensors[f"ema{k}.step"], tensors[f"ema{k}.initted"] = st.ema.step, st.ema.initted
    if trainer.text_ema is not None:
        tensors["ema_text.step"], tensors["ema_text.initted"] = trainer.text_ema.step, trainer.text_ema.initted
    return tensors, state


# ---------------------------------------------------------------------------------------------------------
# checks on load
# ---------------------------------------------------------------------------------------------------------


def _where(path: PathLike, key: str) -> str:
    return f"{path!s}/trainer.json: {key}"


def _count(path: PathLike, key: str, value: Any, optional: bool = False) -> Optional[int]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{_where(path, key)}: expected an int >= 0{' or null' if optional else ''}, "
                         f"got {value!r}")
    return int(value)


def _per_stage(path: PathLike, state: Mapping, key: str, num_stages: int, default: Any = None) -> list:
    values = state.get(key, default)
    if not isinstance(values, list) or len(values) != num_stages:
        raise ValueError(f"{_where(path, key)}: expected a list of {num_stages} values (one per stage), "
                         f"got {values!r}")
    return values


def check_trainer_json(state: Any, num_stages: int, path: PathLike) -> dict:
    """``trainer.json``'s values checked (each names the file and the key) and completed for checkpoints
    written before ``data`` and ``nonfinite`` existed; returns them."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{path!s}/trainer.json: expected an object, got {type(state).__name__}")
    for key in ("run_id", "steps", "horizons", "optimizers", "rng"):
        if key not in state:
            raise ValueError(f"{_where(path, key)}: missing")
    out = dict(state)
    out["steps"] = [_count(path, f"steps[{k}]", v) for k, v in enumerate(_per_stage(path, state, "steps", num_stages))]
    out["horizons"] = [_count(path, f"horizons[{k}]", v, optional=True)
                       for k, v in enumerate(_per_stage(path, state, "horizons", num_stages))]
    _per_stage(path, state, "optimizers", num_stages)
    old_data = [{"epoch": 0, "batch": s, "batches": s} for s in out["steps"]]  # before positions were saved
    out["data"] = [_position(path, k, v) for k, v in enumerate(_per_stage(path, state, "data", num_stages, old_data))]
    none = [{"skipped": 0, "in_a_row": 0}] * num_stages
    out["nonfinite"] = [_nonfinite(path, k, v) for k, v in
                        enumerate(_per_stage(path, state, "nonfinite", num_stages, none))]
    return out


def _position(path: PathLike, k: int, value: Any) -> DataPosition:
    if not isinstance(value, Mapping) or set(value) != {"epoch", "batch", "batches"}:
        raise ValueError(f"{_where(path, f'data[{k}]')}: expected {{epoch, batch, batches}}, got {value!r}")
    return DataPosition(**{name: _count(path, f"data[{k}].{name}", v) for name, v in value.items()})


def _nonfinite(path: PathLike, k: int, value: Any) -> tuple[int, int]:
    if not isinstance(value, Mapping) or set(value) != {"skipped", "in_a_row"}:
        raise ValueError(f"{_where(path, f'nonfinite[{k}]')}: expected {{skipped, in_a_row}}, got {value!r}")
    return (_count(path, f"nonfinite[{k}].skipped", value["skipped"]),
            _count(path, f"nonfinite[{k}].in_a_row", value["in_a_row"]))


def check_stage_configs(saved: dict, mine: dict, path: PathLike) -> None:
    """A checkpoint of another architecture is refused; a stage saved at another ``image_size`` than this
    trainer's is loaded with a warning (the weights fit, but they learned another resolution)."""
    if [s["network"] for s in saved["stages"]] != [s["network"] for s in mine["stages"]]:
        raise ValueError(f"path: checkpoint {path!s} holds a different cascade architecture than this trainer's")
    for k, (theirs, ours) in enumerate(zip(saved["stages"], mine["stages"])):
        if theirs.get("image_size") != ours.get("image_size"):
            warnings.warn(f"path: stage {k} of checkpoint {path!s} was trained at image_size "
                          f"{theirs.get('image_size')}, this trainer's stage {k} is {ours.get('image_size')}",
                          stacklevel=3)


def load_stage(trainer: Any, path: PathLike, k: int, state: dict, tensors: dict) -> None:
    """Stage ``k``'s weights, EMA, optimizer state, step count, horizon, data position and non-finite counts
    from a checkpoint (``state``: checked by :func:`check_trainer_json`)."""
    st, net, sharded = trainer.stages[k], trainer.cascade.stages[k].net, getattr(trainer, "sharded", False)
    for module, name in ((net, f"stage{k}"), (st.ema.ema_model, f"stage{k}.ema")):
        weights, where = ckpt.read_tensors(path, name, trainer.device), f"{name}.safetensors in {path}"
        if sharded:  # every process passes the whole tensors and keeps its shard
            sharding.load_full_state_dict(module, weights, where)
        else:
            ckpt.load_weights(module, weights, where)
    sharding.load_optimizer_state(net, st.optimizer, ckpt.join_state(state["optimizers"][k], tensors), sharded)
    st.ema.step.copy_(tensors[f"ema{k}.step"])
    st.ema.initted.copy_(tensors[f"ema{k}.initted"])
    st.step, st.horizon = state["steps"][k], state["horizons"][k]
    st.data = state["data"][k]
    st.skipped, st.skipped_in_a_row = state["nonfinite"][k]
