"""The optimiser of a run: AdamW with a learning-rate schedule per step and a rate per part.

The fine-tuning recipe of the field (IRRA, open_clip, big_vision) in one Keras optimiser:

- `StepSchedule`: a factor of the base rate at each optimiser step, linear warm-up from
  `warmup_from` over the first `warmup_steps`, then constant or a cosine down to 0 at the last
  step. It reads the optimiser's own step counter, which backups save, so a resumed run takes
  exactly the rates the uninterrupted one took. The base rate stays the optimiser's
  ``learning_rate`` variable, which the plateau cuts (`dualenc.training.selection`) set per epoch.
- Per-part rates: the towers (pretrained, or trained from scratch) take the base rate; every
  other trained variable (projection heads, temperature, SigLIP bias, CMPC classifier) takes it
  times `head_lr_multiplier` (IRRA trains its new modules 5x faster than CLIP's towers).
- Decoupled weight decay (Loshchilov & Hutter) at each variable's own rate, on matrices and
  kernels only: never on norms' scales and offsets, biases, or scalars such as the temperature
  (rank < 2, open_clip's rule), whose decay would pull them towards values the data never asked for.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import keras
import tensorflow as tf

from dualenc.core import config as configs


@dataclasses.dataclass(frozen=True)
class StepSchedule:
    """The base rate's factor at each optimiser step (see the module docstring).

    `kind` is "constant" or "cosine"; `total_steps` is the run's length, which the cosine
    reaches 0 at. The default is a factor of 1 throughout.
    """

    kind: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1
    warmup_from: float = 1.0

    @classmethod
    def for_run(cls, config: configs.TrainConfig, steps_per_epoch: int) -> StepSchedule:
        """`config`'s schedule for a run of ``config.epochs`` epochs of `steps_per_epoch` steps; a
        warm-up longer than the run covers the whole run."""
        total = max(1, config.epochs * steps_per_epoch)
        warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
        return cls(config.schedule, warmup, total, config.warmup_from)

    def factor(self, step: tf.Tensor) -> tf.Tensor:
        """The factor (float32 scalar) for the optimiser step `step` (counted from 0)."""
        step = tf.cast(step, tf.float32)
        after_warmup = tf.constant(1.0)
        if self.kind == "cosine":
            progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            after_warmup = 0.5 * (1.0 + tf.cos(math.pi * tf.clip_by_value(progress, 0.0, 1.0)))
        if not self.warmup_steps:
            return after_warmup
        warming = self.warmup_from + (1.0 - self.warmup_from) * step / self.warmup_steps
        return tf.where(step < self.warmup_steps, warming, after_warmup)


class PartwiseAdamW(keras.optimizers.Adam):
    """Adam with decoupled weight decay, a per-step `StepSchedule` and a rate per part.

    `tower_variables` take the base rate; every other variable the optimiser is built on takes
    it times `head_lr_multiplier`. Weight decay `weight_decay` (times each variable's rate) applies
    to variables of rank >= 2 only.
    """

    def __init__(
        self,
        learning_rate: float,
        weight_decay: float,
        *,
        tower_variables: Iterable[keras.Variable] = (),
        head_lr_multiplier: float = 1.0,
        name: str = "partwise_adamw",
        **kwargs,
    ) -> None:
        # Keras' own decay would use the base rate for every variable; it is applied per part here.
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.decoupled_weight_decay = float(weight_decay)
        self.head_lr_multiplier = float(head_lr_multiplier)
        self.step_schedule = StepSchedule()
        self._tower_ids = {id(variable) for variable in tower_variables}
        self._multipliers: list[float] = []
        self._decayed: list[bool] = []

    def build(self, variables: list) -> None:
        super().build(variables)
        self._multipliers = [1.0 if id(variable) in self._tower_ids else self.head_lr_multiplier for variable in variables]
        self._decayed = [len(variable.shape) >= 2 for variable in variables]

    def multiplier(self, variable: keras.Variable) -> float:
        """`variable`'s rate as a multiple of the scheduled base rate."""
        return self._multipliers[self._get_variable_index(variable)]

    def scheduled_learning_rate(self) -> float:
        """The towers' rate at the next step: the base rate times the schedule's factor."""
        # Read as tensors: under a distribution strategy both are mirrored variables.
        rate = tf.convert_to_tensor(self.learning_rate) * self.step_schedule.factor(tf.convert_to_tensor(self.iterations))
        return float(rate)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        rate = learning_rate * self.step_schedule.factor(self.iterations) * self._multipliers[index]
        if self.decoupled_weight_decay and self._decayed[index]:
            self.assign_sub(variable, variable * tf.cast(rate * self.decoupled_weight_decay, variable.dtype))
        super().update_step(gradient, variable, rate)

    def get_config(self) -> dict:
        return {**super().get_config(), "weight_decay": self.decoupled_weight_decay,
                "head_lr_multiplier": self.head_lr_multiplier}


def unwrapped_optimizer(model: keras.Model) -> keras.optimizers.Optimizer:
    """The model's optimiser (a run's `PartwiseAdamW`), inside the loss-scale wrapper mixed precision adds."""
    return getattr(model.optimizer, "inner_optimizer", model.optimizer)
