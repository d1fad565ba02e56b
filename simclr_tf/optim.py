"""Optimisation for SimCLR: LARS, learning-rate scaling, warm-up + cosine.

Follows google-research/simclr (GR) tf2/lars_optimizer.py and model.py in
behaviour. Takes plain numbers, never a Config; the loss terms (including
weight decay for momentum and Adam) live in losses.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Literal

import keras
import tensorflow as tf
from keras import ops

# Variables that LARS neither decays nor adapts (matched on variable.path):
# batch-norm gamma/beta, biases, and the supervised head (which gets its
# weight decay as a loss term instead, see losses.l2_weight_decay).
DEFAULT_EXCLUDE = ("batch_normalization", "bias", "head_supervised")


class _ReplicaGradientSum:
    """The gradient sum over replicas, skipped when one is in sync.

    Keras's TensorFlow optimizers sum the gradients over the replicas with
    ReplicaContext.all_reduce before every update, on the default strategy
    too, and that all-reduce is a tf.custom_gradient: in a traced function
    it registers a gradient function in TensorFlow's global registry,
    closed over the summed gradients, so each traced train step's graph
    stayed in memory for the life of the process (benchmarks/RESULTS.md).
    With one replica the sum is the gradients themselves and is skipped;
    with several, Keras's sum runs, and the graph stays.
    """

    def _all_reduce_sum_gradients(
        self, grads_and_vars: Sequence[tuple[tf.Tensor, tf.Variable]]
    ) -> list[tuple[tf.Tensor, tf.Variable]]:
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync == 1:
            return list(grads_and_vars)
        return super()._all_reduce_sum_gradients(grads_and_vars)


@keras.saving.register_keras_serializable(package="simclr_tf")
class SGD(_ReplicaGradientSum, keras.optimizers.SGD):
    """keras.optimizers.SGD, without the one-replica gradient sum that kept
    every traced step's graph in memory (_ReplicaGradientSum)."""


@keras.saving.register_keras_serializable(package="simclr_tf")
class Adam(_ReplicaGradientSum, keras.optimizers.Adam):
    """keras.optimizers.Adam, without the one-replica gradient sum that kept
    every traced step's graph in memory (_ReplicaGradientSum)."""


@keras.saving.register_keras_serializable(package="simclr_tf")
class LARS(_ReplicaGradientSum, keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017), as in GR.

    For a variable w with gradient g:
        g <- g + wd * w                      (if w is decayed)
        trust = eta * ||w|| / ||g||          (if w is adapted and both
                                              norms > 0, else 1)
        v <- m * v + lr * trust * g
        w <- w - v                           (Nesterov: w - (m*v + lr*trust*g))

    Weight decay is coupled (added to the gradient before the trust ratio),
    so it is not passed to the Keras base class, whose decoupled decay would
    apply it a second time; `self.weight_decay` stays None for that reason
    and the rate is `self.weight_decay_rate`.

    Exclusions are regular expressions searched in each variable's Keras 3
    path ("model/batch_normalization/gamma"); variable.name is only "gamma".
    The flags are resolved once in build() from model.trainable_variables, as
    update_step only receives the backend tf.Variable.

    Args:
        learning_rate: float or keras LearningRateSchedule, > 0.
        momentum: momentum m in [0, 1).
        weight_decay: coupled L2 decay wd >= 0 (GR default 1e-6).
        trust_coefficient: eta > 0 (0.001 as in GR).
        exclude_from_weight_decay: regex patterns of variables not decayed.
        exclude_from_layer_adaptation: regex patterns of variables whose
            trust ratio is 1; None means the same as exclude_from_weight_decay.
        nesterov: use Nesterov momentum.
        name: optimizer name.
        **kwargs: passed to keras.optimizers.Optimizer (e.g. clipnorm).

    Raises:
        ValueError: for out-of-range momentum, weight_decay or
            trust_coefficient.
    """

    def __init__(
        self,
        learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        exclude_from_weight_decay: Sequence[str] | None = DEFAULT_EXCLUDE,
        exclude_from_layer_adaptation: Sequence[str] | None = None,
        nesterov: bool = False,
        name: str = "LARS",
        **kwargs: object,
    ) -> None:
        if isinstance(learning_rate, int):
            learning_rate = float(learning_rate)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        _check_range("momentum", momentum, 0.0, 1.0, "use e.g. 0.9")
        _check_range("weight_decay", weight_decay, 0.0, None, "use e.g. 1e-6")
        if not trust_coefficient > 0:
            raise ValueError(
                f"trust_coefficient={trust_coefficient!r} must be > 0; use "
                "0.001 as in the LARS paper and GR."
            )
        self.momentum = float(momentum)
        self.weight_decay_rate = float(weight_decay)
        self.trust_coefficient = float(trust_coefficient)
        self.exclude_from_weight_decay = tuple(exclude_from_weight_decay or ())
        if exclude_from_layer_adaptation is None:
            exclude_from_layer_adaptation = self.exclude_from_weight_decay
        self.exclude_from_layer_adaptation = tuple(
            exclude_from_layer_adaptation
        )
        self.nesterov = bool(nesterov)

    def build(self, variables: Sequence[keras.Variable]) -> None:
        """Creates one momentum slot per variable and resolves exclusions."""
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")
        paths = [_variable_path(variable) for variable in variables]
        self._decayed = [
            not _matches(path, self.exclude_from_weight_decay) for path in paths
        ]
        self._adapted = [
            not _matches(path, self.exclude_from_layer_adaptation)
            for path in paths
        ]

    def update_step(
        self,
        gradient: tf.Tensor,
        variable: tf.Variable,
        learning_rate: tf.Tensor,
    ) -> None:
        """Applies one LARS update to a single variable."""
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        learning_rate = ops.cast(learning_rate, dtype)
        gradient = ops.cast(ops.convert_to_tensor(gradient), dtype)
        if self._decayed[index] and self.weight_decay_rate > 0:
            weight_decay = ops.cast(self.weight_decay_rate, dtype)
            gradient = gradient + weight_decay * variable
        scaled_learning_rate = learning_rate
        if self._adapted[index]:
            weight_norm = ops.norm(ops.reshape(variable, [-1]))
            gradient_norm = ops.norm(ops.reshape(gradient, [-1]))
            trust = ops.where(
                ops.logical_and(weight_norm > 0, gradient_norm > 0),
                self.trust_coefficient
                * weight_norm
                / ops.maximum(gradient_norm, 1e-30),
                ops.ones_like(weight_norm),
            )
            scaled_learning_rate = learning_rate * trust
        step = scaled_learning_rate * gradient
        velocity = self.momentums[index]
        new_velocity = ops.cast(self.momentum, dtype) * velocity + step
        self.assign(velocity, new_velocity)
        if self.nesterov:
            self.assign_sub(
                variable, ops.cast(self.momentum, dtype) * new_velocity + step
            )
        else:
            self.assign_sub(variable, new_velocity)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "weight_decay": self.weight_decay_rate,
                "trust_coefficient": self.trust_coefficient,
                "exclude_from_weight_decay": list(
                    self.exclude_from_weight_decay
                ),
                "exclude_from_layer_adaptation": list(
                    self.exclude_from_layer_adaptation
                ),
                "nesterov": self.nesterov,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="simclr_tf")
class WarmUpAndCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0, then cosine decay to 0 (GR's schedule).

    lr(step) = base * step / W                       for step < W,
             = base * 0.5 * (1 + cos(pi * p))        otherwise,
    with p = min(step - W, T - W) / (T - W), so lr stays 0 after T.

    Args:
        base_learning_rate: peak rate after scaling (scaled_learning_rate).
        warmup_steps: W >= 0 (0 starts directly at the peak).
        total_steps: T > W.

    Raises:
        ValueError: if the step counts are out of range.
    """

    def __init__(
        self, base_learning_rate: float, warmup_steps: int, total_steps: int
    ) -> None:
        if warmup_steps < 0 or total_steps <= warmup_steps:
            raise ValueError(
                f"warmup_steps={warmup_steps!r} and total_steps="
                f"{total_steps!r} must satisfy 0 <= warmup_steps < "
                "total_steps; lower --warmup_epochs or train longer."
            )
        self.base_learning_rate = float(base_learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        # A variable, so that a traced step sees set_total_steps's change.
        self._decay_steps = tf.Variable(
            float(self.total_steps - self.warmup_steps),
            trainable=False,
            dtype=tf.float32,
            name="cosine_decay_steps",
        )

    def set_total_steps(self, total_steps: int) -> None:
        """Moves the end of the cosine decay to `total_steps` (> warm-up).

        Steps already taken keep the rates they had as long as they were
        in the warm-up, which does not depend on the total.
        """
        if total_steps <= self.warmup_steps:
            raise ValueError(
                f"total_steps={total_steps!r} must exceed the "
                f"{self.warmup_steps} warm-up steps."
            )
        self.total_steps = int(total_steps)
        self._decay_steps.assign(float(total_steps - self.warmup_steps))

    def __call__(self, step: int | tf.Tensor) -> tf.Tensor:
        step = ops.cast(step, "float32")
        base = self.base_learning_rate
        warmup = float(self.warmup_steps)
        decay_steps = ops.cast(self._decay_steps, "float32")
        warmup_rate = base * step / max(warmup, 1.0)
        progress = ops.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine_rate = base * 0.5 * (1.0 + ops.cos(math.pi * progress))
        return ops.where(step < warmup, warmup_rate, cosine_rate)

    def get_config(self) -> dict[str, Any]:
        return {
            "base_learning_rate": self.base_learning_rate,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
        }


def scaled_learning_rate(
    learning_rate: float,
    batch_size: int,
    scaling: Literal["linear", "sqrt"] = "linear",
) -> float:
    """The peak learning rate for a global batch (GR learning_rate_scaling).

    Args:
        learning_rate: base rate (--learning_rate, e.g. 0.3).
        batch_size: global batch size B > 0 (images, not views).
        scaling: "linear" gives lr * B / 256 (v1); "sqrt" gives lr * sqrt(B)
            with no /256 (v2).

    Returns:
        The scaled learning rate.

    Raises:
        ValueError: for a non-positive batch size or an unknown scaling.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} must be > 0.")
    if scaling == "linear":
        return learning_rate * batch_size / 256.0
    if scaling == "sqrt":
        return learning_rate * math.sqrt(batch_size)
    raise ValueError(
        f"--learning_rate_scaling={scaling!r} is not supported; use "
        "'linear' or 'sqrt'."
    )


def warmup_steps(
    warmup_epochs: float, num_examples: int, batch_size: int
) -> int:
    """Warm-up length in steps: round(warmup_epochs * N_train // B), as GR.

    Args:
        warmup_epochs: epochs of linear warm-up >= 0 (may be fractional).
        num_examples: training examples per epoch N_train > 0.
        batch_size: global batch size B > 0.

    Returns:
        Number of warm-up steps.

    Raises:
        ValueError: for a negative warm-up or a non-positive batch size.
    """
    if warmup_epochs < 0 or batch_size <= 0:
        raise ValueError(
            f"warmup_epochs={warmup_epochs!r} must be >= 0 and batch_size="
            f"{batch_size!r} must be > 0."
        )
    return int(round(warmup_epochs * num_examples // batch_size))


def total_steps(
    train_steps: int, train_epochs: float, num_examples: int, batch_size: int
) -> int:
    """Training length in steps: train_steps, or N_train * epochs // B + 1.

    Args:
        train_steps: explicit step count; 0 means derive it from epochs.
        train_epochs: epochs to train when train_steps is 0.
        num_examples: training examples per epoch N_train.
        batch_size: global batch size B > 0.

    Returns:
        Number of training steps.

    Raises:
        ValueError: for a negative train_steps or a non-positive batch size.
    """
    if train_steps < 0 or batch_size <= 0:
        raise ValueError(
            f"train_steps={train_steps!r} must be >= 0 and batch_size="
            f"{batch_size!r} must be > 0."
        )
    return int(train_steps or num_examples * train_epochs // batch_size + 1)


def build_optimizer(
    name: Literal["lars", "momentum", "adam"],
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = True,
) -> keras.optimizers.Optimizer:
    """The optimizer named by --optimizer, as in GR.

    Only LARS applies weight_decay itself (coupled, with its exclusions).
    For "momentum" (SGD) and "adam", weight_decay is ignored
    here: the train step adds losses.l2_weight_decay to the loss instead.

    Args:
        name: "lars", "momentum" or "adam".
        learning_rate: float or keras LearningRateSchedule.
        momentum: momentum in [0, 1) for LARS and SGD (unused by Adam).
        weight_decay: LARS weight decay >= 0.
        nesterov: Nesterov momentum for "momentum": GR's build_optimizer
            always uses it (SGD(lr, momentum, nesterov=True)), and so
            does every train mode here; ignored by the others.

    Returns:
        A keras.optimizers.Optimizer.

    Raises:
        ValueError: for an unknown name or out-of-range values.
    """
    if isinstance(learning_rate, int):
        learning_rate = float(learning_rate)
    if name == "lars":
        return LARS(learning_rate, momentum=momentum, weight_decay=weight_decay)
    if name == "momentum":
        _check_range("momentum", momentum, 0.0, 1.0, "use e.g. 0.9")
        return SGD(learning_rate, momentum=float(momentum), nesterov=nesterov)
    if name == "adam":
        return Adam(learning_rate)
    raise ValueError(
        f"--optimizer={name!r} is not supported; use 'lars', 'momentum' or "
        "'adam'."
    )


def _check_range(
    name: str, value: float, low: float, high: float | None, fix: str
) -> None:
    """Raises ValueError unless low <= value (< high when high is given)."""
    in_range = value >= low and (high is None or value < high)
    if not in_range:
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name}={value!r} must be {bound}; {fix}.")


def _matches(path: str, patterns: Sequence[str]) -> bool:
    """True if any regex pattern is found in the variable path."""
    return any(re.search(pattern, path) for pattern in patterns)


def _variable_path(variable: keras.Variable | tf.Variable) -> str:
    """The Keras 3 path of a variable, or its tf name for plain tf.Variable."""
    return getattr(variable, "path", None) or variable.name
