"""Training: the Trainer (optimizers, EMA, Accelerate; :mod:`.trainer`), the one loop that trains a configured
cascade (:mod:`.loop`) and ``parallel_stages`` (:mod:`.parallel`). The loop's names are imported lazily, so
importing the Trainer does not import the configuration layer."""

from importlib import import_module
from typing import TYPE_CHECKING

from imagen_lib.training.nonfinite import NonFiniteLossError
from imagen_lib.training.trainer import StageState, Trainer, TrainerSettings

_LAZY = {"train_stages": "imagen_lib.training.loop", "RunOptions": "imagen_lib.training.loop",
         "RunResult": "imagen_lib.training.loop", "BackgroundStages": "imagen_lib.training.parallel"}

__all__ = ["NonFiniteLossError", "StageState", "Trainer", "TrainerSettings", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'imagen_lib.training' has no attribute {name!r}")
    return getattr(import_module(_LAZY[name]), name)


if TYPE_CHECKING:  # static tools see the real names
    from imagen_lib.training.loop import RunOptions, RunResult, train_stages
    from imagen_lib.training.parallel import BackgroundStages
