"""Training: the Trainer (optimizers, EMA, Accelerate) and the loop that trains a configured cascade."""

from imagen_lib.training.trainer import Trainer, TrainerSettings

__all__ = ["Trainer", "TrainerSettings"]
