"""Runs google-research/simclr's (GR) own training step as a test reference.

`run_steps` starts a subprocess (TF_USE_LEGACY_KERAS=1: tf.keras is Keras 2
from the `tf_keras` package, as tests/gr_reference.py explains) that
defines run.py's flags, parses the given ones, builds GR's `model.Model`
under a MirroredStrategy (run.py's strategy without a TPU) over 1 or more
logical CPUs, gives every BN gamma/beta, bias and BN moving statistic a
seeded random value, and writes the model (`tf.train.Checkpoint(model=)`,
the layout run.py's checkpoints use). It then sets the optimizer's
iteration count (so that the warm-up schedule gives a non-zero learning
rate), runs run.py's `single_step` (model, objective.add_contrastive_loss,
add_supervised_loss, model.add_weight_decay, loss / replicas,
model.build_optimizer: LARS, or SGD(nesterov=True) for --optimizer=
momentum) `steps` times inside `strategy.run`, and writes the model again.
Both checkpoints are read with simclr_tf's GR reader (models/
gr_checkpoint.py), so the comparison needs no GR variable names.

This module is a test helper, not a test; GR's code stays in its folder.
Run as a script it is the subprocess' side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import gr_reference
import numpy as np

# GR flags set unless the caller sets them: no TPU, no blur (its random
# kernel would make the step depend on the seed).
DEFAULT_GR_FLAGS = {"use_tpu": False, "use_blur": False}


@dataclasses.dataclass(frozen=True)
class StepReference:
    """GR's model before and after its training steps.

    Attributes:
      before_prefix: checkpoint of the model the steps started from.
      after_prefix: checkpoint of the model after the steps.
      metrics: per step, GR's losses (total_loss is what it differentiates
        before dividing by the replica count; contrast_loss is GR's
        reduce_mean(loss_a + loss_b)) and learning_rate, each the mean over
        replicas.
      info: timings reported by the subprocess.
    """

    before_prefix: str
    after_prefix: str
    metrics: list[dict[str, float]]
    info: dict


def run_steps(
    work_dir: str,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    num_examples: int,
    start_iteration: int,
    steps: int = 1,
    replicas: int = 1,
    seed: int = 0,
    timeout: float = 1200,
    **gr_flags: object,
) -> StepReference:
    """Runs GR's training step in a subprocess; see the module docstring.

    Args:
      work_dir: an empty directory for the inputs, checkpoints and info.
      features: [B, H, W, 3 k] float32 in [0, 1], B = --train_batch_size:
        GR's input, the k views of each image on the channel axis (k = 2 in
        pretraining, 1 in fine-tuning). Replica r gets rows r B/R ...
      labels: [B] int class indices (one-hot encoded as GR's input does).
      num_classes: classes of GR's supervised head.
      num_examples: training-set size GR's learning-rate schedule assumes
        (warm-up and total steps from it, --train_epochs and the batch).
      start_iteration: the optimizer's iteration count before the first
        step (the schedule's step).
      steps: training steps to run.
      replicas: logical CPUs of GR's MirroredStrategy.
      seed: seeds GR's kernel initialisers and the random BN, bias and
        moving-statistic values.
      timeout: seconds before the subprocess is killed.
      **gr_flags: run.py flags, e.g. resnet_depth=18, image_size=32,
        train_batch_size=8, optimizer="lars", train_mode="finetune".

    Returns:
      The StepReference.

    Raises:
      RuntimeError: GR's process failed (its stderr's tail is included).
    """
    np.save(os.path.join(work_dir, "features.npy"), features.astype(np.float32))
    np.save(os.path.join(work_dir, "labels.npy"), labels.astype(np.int64))
    flags = {**DEFAULT_GR_FLAGS, **gr_flags}
    command = [
        sys.executable,
        os.path.abspath(__file__),
        f"--work_dir={work_dir}",
        f"--num_classes={num_classes}",
        f"--num_examples={num_examples}",
        f"--start_iteration={start_iteration}",
        f"--steps={steps}",
        f"--replicas={replicas}",
        f"--seed={seed}",
        "--",
        f"--model_dir={os.path.join(work_dir, 'gr_model_dir')}",
        *(f"--{name}={value}" for name, value in flags.items()),
    ]
    info = gr_reference.run_tf_keras(command, work_dir, timeout, "GR step run")
    return StepReference(
        before_prefix=info.pop("before_prefix"),
        after_prefix=info.pop("after_prefix"),
        metrics=info.pop("metrics"),
        info=info,
    )


# --------------------------------------------------------------------------
# The subprocess' side: GR's code, Keras 2.


def _randomize_moving_statistics(model: object, seed: int) -> None:
    """Seeded moving means N(0, 0.2) and variances U(0.5, 1.5) (GR starts
    them at 0 and 1, which would hide a swapped statistic)."""
    rng = np.random.default_rng(seed + 2)
    for variable in model.variables:
        shape = tuple(variable.shape)
        if variable.name.endswith("moving_mean:0"):
            value = rng.normal(0.0, 0.2, shape)
        elif variable.name.endswith("moving_variance:0"):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            continue
        variable.assign(value.astype(np.float32))


def _make_step(model, optimizer, strategy, flags_values):
    """run.py's single_step without its summaries; returns its losses."""
    import model as model_lib
    import objective as obj_lib
    import tensorflow as tf

    def single_step(features, labels):
        with tf.GradientTape() as tape:
            projection_outputs, supervised_outputs = model(
                features, training=True
            )
            loss = None
            metrics = {}
            if projection_outputs is not None:
                contrast_loss, _, _ = obj_lib.add_contrastive_loss(
                    projection_outputs,
                    hidden_norm=flags_values.hidden_norm,
                    temperature=flags_values.temperature,
                    strategy=strategy,
                )
                loss = contrast_loss
                metrics["contrast_loss"] = contrast_loss
            if supervised_outputs is not None:
                target = labels
                if (
                    flags_values.train_mode == "pretrain"
                    and flags_values.lineareval_while_pretraining
                ):
                    target = tf.concat([target, target], 0)
                supervised_loss = obj_lib.add_supervised_loss(
                    labels=target, logits=supervised_outputs
                )
                loss = (
                    supervised_loss if loss is None else loss + supervised_loss
                )
                metrics["supervised_loss"] = supervised_loss
            weight_decay = model_lib.add_weight_decay(
                model, adjust_per_optimizer=True
            )
            loss += weight_decay
            metrics["weight_decay"] = tf.convert_to_tensor(weight_decay)
            metrics["total_loss"] = loss
            loss = loss / strategy.num_replicas_in_sync
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(
                zip(grads, model.trainable_variables, strict=True)
            )
        return metrics

    @tf.function
    def train_step(iterator):
        per_replica = strategy.run(single_step, next(iterator))
        return {
            key: strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
            for key, value in per_replica.items()
        }

    return train_step


def _distributed_batches(strategy, features, labels, num_classes):
    """Replica r gets rows r B/R ... of the one global batch, every step."""
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    local = len(features) // replicas
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]

    def input_fn(context):
        del context
        shards = (
            np.stack(np.split(features, replicas)),
            np.stack(np.split(one_hot, replicas)),
        )
        # Elements go to the replicas in turn, one local batch each.
        return tf.data.Dataset.from_tensor_slices(shards).repeat()

    assert local * replicas == len(features)
    return iter(strategy.distribute_datasets_from_function(input_fn))


def _main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("num_classes", "num_examples", "start_iteration", "steps"):
        parser.add_argument(f"--{name}", type=int, required=True)
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    arguments, gr_argv = parser.parse_known_args()
    gr_argv = [argument for argument in gr_argv if argument != "--"]
    assert os.environ.get("TF_USE_LEGACY_KERAS") == "1"
    sys.path.insert(0, gr_reference.GR_REFERENCE_DIR)
    start = time.perf_counter()

    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * arguments.replicas
    )

    import model as model_lib
    import run  # noqa: F401  (defines run.py's flags; app.run not called)
    from absl import flags

    flags_values = flags.FLAGS
    flags_values(["gr_run"] + gr_argv)
    work_dir = arguments.work_dir
    features = np.load(os.path.join(work_dir, "features.npy"))
    labels = np.load(os.path.join(work_dir, "labels.npy"))
    strategy = tf.distribute.MirroredStrategy(
        [f"/cpu:{index}" for index in range(arguments.replicas)]
    )
    tf.keras.utils.set_random_seed(arguments.seed)  # GR's kernel inits
    with strategy.scope():
        model = model_lib.Model(arguments.num_classes)
        model(tf.constant(features[:2]), training=False)  # creates variables
        gr_reference._randomize(model, arguments.seed)
        _randomize_moving_statistics(model, arguments.seed)
        learning_rate = model_lib.WarmUpAndCosineDecay(
            flags_values.learning_rate, arguments.num_examples
        )
        optimizer = model_lib.build_optimizer(learning_rate)
        optimizer.iterations.assign(arguments.start_iteration)
    before = tf.train.Checkpoint(model=model).write(
        os.path.join(work_dir, "before", "ckpt")
    )
    train_step = _make_step(model, optimizer, strategy, flags_values)
    iterator = _distributed_batches(
        strategy, features, labels, arguments.num_classes
    )
    metrics = []
    for _ in range(arguments.steps):
        rate = float(learning_rate(float(optimizer.iterations.numpy())))
        values = {k: float(v) for k, v in train_step(iterator).items()}
        metrics.append({**values, "learning_rate": rate})
    after = tf.train.Checkpoint(model=model).write(
        os.path.join(work_dir, "after", "ckpt")
    )
    info = {
        "before_prefix": before,
        "after_prefix": after,
        "metrics": metrics,
        "iterations": int(optimizer.iterations.numpy()),
        "seconds": time.perf_counter() - start,
    }
    with open(os.path.join(work_dir, "info.json"), "w") as file:
        json.dump(info, file)


if __name__ == "__main__":
    _main()
