"""The train steps and the loop that runs one steps_per_loop times.

`make_train_step` is one replica's pretraining step: (optionally) finish
the views on the device, encode both, NT-Xent over the all-gathered batch,
supervised head, weight decay, one optimizer update. `make_supervised_step`
is the step of finetune / lineareval / distill. `make_train_loop` wraps a
step in one tf.function under the strategy; the same code runs on every
strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import keras
import tensorflow as tf

from simclr_tf import loss_scale, losses
from simclr_tf.config import schema as config_lib
from simclr_tf.data.augment import views as augment_views
from simclr_tf.models import simclr

# The weight of NT-Xent in the objective the pretraining step
# differentiates. losses.nt_xent is the paper's mean over the 2n anchors
# (logged as train/contrast_loss); google-research/simclr differentiates
# reduce_mean(loss_a + loss_b), the sum of the two views' means: twice
# that. The factor is not a free scale: the BN and bias variables, which
# LARS does not adapt, move by lr * gradient; LARS's coupled weight decay
# and the supervised head's loss and decay are added to that gradient; and
# momentum and Adam take every gradient as it is. With 2x the objective,
# lr and --weight_decay mean what they mean in GR and the update is GR's
# (tests/test_gr_step.py runs GR's own step to check).
CONTRAST_LOSS_WEIGHT = 2.0


def _weight_decay_loss(
    config: config_lib.Config, model: keras.Model
) -> tf.Tensor:
    """The weight decay that goes into the loss (GR's add_weight_decay).

    LARS decays inside its update, except for the supervised head, which
    gets 0.5*wd*||w||^2 here. Momentum and Adam get it here for every
    non-BN variable.
    """
    weight_decay = config.optim.weight_decay
    variables = model.trainable_variables
    if config.optim.optimizer == "lars":
        head = [v for v in variables if "head_supervised" in v.path]
        return losses.l2_weight_decay(head, weight_decay, ("bias",))
    return losses.l2_weight_decay(
        variables, weight_decay, ("batch_normalization",)
    )


def make_train_step(
    config: config_lib.Config,
    model: simclr.SimCLRModel,
    optimizer: keras.optimizers.Optimizer,
    num_replicas: int,
) -> Callable[[Mapping[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """The per-replica SimCLR step: both views → loss → one update.

    The objective is google-research/simclr's: CONTRAST_LOSS_WEIGHT (2) x
    the paper's NT-Xent + the supervised head's cross-entropy (mean over
    the 2n views, behind stop_gradient) + weight decay; its value is
    logged as total_loss, NT-Xent itself as contrast_loss.

    Args:
      config: the run's Config.
      model: the SimCLRModel (built in the strategy's scope).
      optimizer: its optimizer.
      num_replicas: replicas in sync.

    Returns:
      step(batch) -> metrics dict of float32 scalars, where batch is
      {"view1": [n,S,S,C], "view2": [n,S,S,C], "label": [n]} for this
      replica.
    """
    temperature = config.loss.temperature
    hidden_norm = config.loss.hidden_norm

    data = config.data

    def step(batch: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        views = (batch["view1"], batch["view2"])
        if data.augment_on_device:
            views = augment_views.distort_views(
                views,
                batch["distort_seed"],
                color_jitter_strength=data.color_jitter_strength,
                blur=data.use_blur,
                brightness_impl=data.brightness_impl,
            )
        images = tf.concat(views, axis=0)
        context = tf.distribute.get_replica_context()
        gather = context if num_replicas > 1 else None
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            z1, z2 = tf.split(outputs["proj_head_output"], 2, axis=0)
            contrast_loss, logits, labels = losses.nt_xent(
                z1,
                z2,
                temperature,
                normalize=hidden_norm,
                replica_context=gather,
            )
            metrics = losses.contrast_metrics(logits, labels)
            metrics["contrast_loss"] = contrast_loss
            loss = CONTRAST_LOSS_WEIGHT * contrast_loss
            if "logits_sup" in outputs:
                supervised_labels = tf.concat([batch["label"]] * 2, axis=0)
                supervised = losses.supervised_loss(
                    supervised_labels, outputs["logits_sup"]
                )
                loss += supervised
                metrics["supervised_loss"] = supervised
                metrics["supervised_acc"] = _accuracy(
                    supervised_labels, outputs["logits_sup"]
                )
            decay = _weight_decay_loss(config, model)
            loss += decay
            metrics["weight_decay"] = decay
            metrics["total_loss"] = loss
            scaled_loss = _replica_loss(loss, num_replicas, optimizer)
        return _update(tape, scaled_loss, model, optimizer, metrics)

    names = ["contrast_acc", "contrast_entropy", "contrast_loss"]
    if model.supervised_head is not None:
        names += ["supervised_loss", "supervised_acc"]
    return _finish(config, step, names)


def make_supervised_step(
    config: config_lib.Config,
    model: simclr.SimCLRModel,
    optimizer: keras.optimizers.Optimizer,
    num_replicas: int,
    teacher: Callable[[tf.Tensor], tf.Tensor] | None = None,
) -> Callable[[Mapping[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """The per-replica step of finetune, lineareval and distill.

    Cross-entropy of the supervised head on labelled crop + flip views;
    with a teacher (distill), (1 - w) * the distillation loss + w * the
    cross-entropy, w = --distill_label_weight. Only the trainable variables
    (see modes.freeze) are updated.

    Args:
      config: the run's Config.
      model: a SimCLRModel with a supervised head.
      optimizer: its optimizer.
      num_replicas: replicas in sync.
      teacher: images -> teacher logits, for distillation.

    Returns:
      step(batch) -> metrics dict of float32 scalars; batch is {"image":
      [n, S, S, C], "label": [n]} for this replica.
    """
    label_weight = 1.0
    if teacher is not None:
        label_weight = config.train.distill_label_weight
    temperature = config.train.distill_temperature

    def step(batch: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        images, labels = batch["image"], batch["label"]
        with tf.GradientTape() as tape:
            logits = model(images, training=True)["logits_sup"]
            supervised = losses.supervised_loss(labels, logits)
            metrics = {
                "supervised_loss": supervised,
                "supervised_acc": _accuracy(labels, logits),
            }
            loss = label_weight * supervised
            if teacher is not None:
                teacher_logits = teacher(images)
                distill = losses.distillation_loss(
                    teacher_logits, logits, temperature
                )
                loss += (1.0 - label_weight) * distill
                metrics["distill_loss"] = distill
                metrics["teacher_agreement"] = _accuracy(
                    tf.argmax(teacher_logits, -1, output_type=tf.int32), logits
                )
            decay = _weight_decay_loss(config, model)
            metrics["weight_decay"] = decay
            metrics["total_loss"] = loss + decay
            scaled_loss = _replica_loss(loss + decay, num_replicas, optimizer)
        return _update(tape, scaled_loss, model, optimizer, metrics)

    names = ["supervised_loss", "supervised_acc"]
    if teacher is not None:
        names += ["distill_loss", "teacher_agreement"]
    return _finish(config, step, names)


def _replica_loss(
    loss: tf.Tensor,
    num_replicas: int,
    optimizer: keras.optimizers.Optimizer,
) -> tf.Tensor:
    """The loss this replica differentiates (call inside the tape).

    Invariant: each replica's loss is the mean over its own examples;
    dividing by the replica count once, here, makes the SUM of replica
    gradients (what the optimizer applies) equal the gradient of the
    global-batch loss. Scaled again under mixed_float16's loss scaling.
    """
    scaled_loss = loss / num_replicas
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        scaled_loss = optimizer.scale_loss(scaled_loss)
    return scaled_loss


def _update(
    tape: tf.GradientTape,
    scaled_loss: tf.Tensor,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    metrics: Mapping[str, tf.Tensor],
) -> dict[str, tf.Tensor]:
    """One optimizer update of the trainable variables; float32 metrics."""
    variables = model.trainable_variables
    gradients = tape.gradient(scaled_loss, variables)
    # Trainable variables the loss does not reach (fine-tuning's projection
    # head layers past --ft_proj_selector, without an L2 term) get None;
    # the optimizer leaves them alone, as GR's does, without a warning.
    pairs = [
        (g, v)
        for g, v in zip(gradients, variables, strict=True)
        if g is not None
    ]
    gradients = [gradient for gradient, _ in pairs]
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        # Keras judges each replica's own gradients: agree on overflow first.
        gradients = loss_scale.share_non_finite(gradients)
    optimizer.apply_gradients(
        zip(gradients, [variable for _, variable in pairs], strict=True)
    )
    return {k: tf.cast(v, tf.float32) for k, v in metrics.items()}


def _finish(
    config: config_lib.Config,
    step: Callable[[Mapping[str, tf.Tensor]], dict[str, tf.Tensor]],
    names: list[str],
) -> Callable[[Mapping[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """XLA-compiles the step under --jit_compile and attaches its metric
    names (+ weight_decay, total_loss): the loop needs them up front to
    start its sums at zero (tracing the step once more to learn them would
    double the compile time)."""
    if config.runtime.jit_compile:
        step = tf.function(step, jit_compile=True, autograph=False)
    step.metric_names = (*names, "weight_decay", "total_loss")
    return step


def _accuracy(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    predictions = tf.argmax(logits, axis=-1, output_type=labels.dtype)
    return tf.reduce_mean(tf.cast(tf.equal(predictions, labels), tf.float32))


def make_train_loop(
    strategy: tf.distribute.Strategy,
    step: Callable[[Mapping[str, tf.Tensor]], dict[str, tf.Tensor]],
) -> Callable[[object, tf.Tensor], dict[str, tf.Tensor]]:
    """One tf.function running `steps` replica steps; returns mean metrics.

    `step` is what make_train_step returns (it carries `metric_names`).
    """

    # The loop needs autograph (its `for` over tf.range); the step is plain
    # graph code. Left to autograph, every Python function the step calls
    # (model, loss, optimizer) was rewritten in each new process before
    # the first step: with the augmentation's, 139 functions and 2-3 s of
    # a small run's start on 2 cores (15 functions now).
    unconverted_step = tf.autograph.experimental.do_not_convert(step)

    @tf.function
    def train_loop(iterator: object, steps: tf.Tensor) -> dict:
        totals = {name: tf.constant(0.0) for name in step.metric_names}
        for _ in tf.range(steps):
            per_replica = strategy.run(unconverted_step, (next(iterator),))
            metrics = _reduce_mean(strategy, per_replica)
            totals = {k: totals[k] + metrics[k] for k in totals}
        count = tf.cast(steps, tf.float32)
        return {k: v / count for k, v in totals.items()}

    return train_loop


def _reduce_mean(
    strategy: tf.distribute.Strategy, per_replica: Mapping[str, object]
) -> dict[str, tf.Tensor]:
    return {
        key: strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
        for key, value in per_replica.items()
    }
