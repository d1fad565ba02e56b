"""What a run builds once: its schedule, strategy, model, optimizer and
checkpoint manager, restored from model_dir or initialised.

`setup_run` picks the strategy and precision; `build_state` builds the
model and optimizer under the strategy's scope and restores the latest
checkpoint of model_dir (or initialises from --checkpoint). The loop that
trains a TrainState is loop.py.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf
from absl import logging

from simclr_tf import optim, runtime
from simclr_tf.config import protocols
from simclr_tf.config import schema as config_lib
from simclr_tf.data import run_data
from simclr_tf.data.sources import base as source_lib
from simclr_tf.models import gr_checkpoint, gr_import, simclr
from simclr_tf.training import builders, modes
from simclr_tf.training import schedule as schedule_lib

# Modes that read a checkpoint's weights and never train on: its optimizer
# (which depends on --precision) is not restored.
WEIGHTS_ONLY_MODES = ("eval", "export")


@dataclasses.dataclass(kw_only=True)
class TrainState:
    """What the loop builds once and then uses: model, optimizer, saving."""

    strategy: tf.distribute.Strategy
    model: simclr.SimCLRModel
    optimizer: keras.optimizers.Optimizer
    step: tf.Variable
    manager: tf.train.CheckpointManager
    schedule: schedule_lib.Schedule
    num_classes: int
    image_shape: tuple[int, int, int]
    # The optimizer's schedule: --time_budget_minutes moves its end.
    learning_rate: optim.WarmUpAndCosineDecay | None = None


def setup_run(config: config_lib.Config) -> tf.distribute.Strategy:
    """Strategy, precision and seeds; logs what the run is on."""
    strategy = runtime.make_strategy(config.runtime)
    precision = runtime.resolve_precision(
        config.runtime.precision, runtime.resolve_strategy_name(config.runtime)
    )
    runtime.set_precision(precision)
    if config.train.seed is not None:
        keras.utils.set_random_seed(config.train.seed)
    check_batch_divides(
        config.train.train_batch_size, strategy.num_replicas_in_sync
    )
    if (
        config.runtime.jit_compile
        and strategy.num_replicas_in_sync > 1
        and not tf.config.list_physical_devices("GPU")
        and runtime.resolve_strategy_name(config.runtime) != "tpu"
    ):
        raise ValueError(
            "--jit_compile with several CPU replicas fails in TensorFlow "
            "(each replica's variables live on another device); use one "
            "replica (--strategy=default) to test XLA on a CPU. TPUStrategy "
            "compiles with XLA by itself."
        )
    runtime.log_start(strategy, config.train.train_batch_size)
    logging.info(
        "precision %s, jit_compile %s", precision, config.runtime.jit_compile
    )
    return strategy


def check_labelled(
    config: config_lib.Config, source: source_lib.Source
) -> None:
    """Raises ValueError when a run needs labels that `source` lacks."""
    if source.num_classes == 0:
        raise ValueError(
            f"--train_mode={config.train.train_mode} needs labels, but "
            f"{source.name} {source.split} at {source.origin} has none (a "
            f"flat image folder); put the images in class sub-folders."
        )


def check_batch_divides(batch: int, replicas: int) -> None:
    """Raises ValueError unless every replica gets the same batch of >= 2.

    Args:
      batch: --train_batch_size, the global batch N.
      replicas: replicas in sync.
    """
    if batch % replicas:
        suggestion = max(replicas, round(batch / replicas) * replicas)
        raise ValueError(
            f"--train_batch_size={batch} must be divisible by the {replicas} "
            f"replicas; use e.g. --train_batch_size={suggestion}."
        )
    if batch // replicas < 2:
        raise ValueError(
            f"--train_batch_size={batch} gives {batch // replicas} image(s) "
            f"per replica; NT-Xent needs at least 2; use "
            f"--train_batch_size={2 * replicas}."
        )


def build_state(
    config: config_lib.Config,
    strategy: tf.distribute.Strategy,
    source: source_lib.Source,
) -> TrainState:
    """Model, optimizer and checkpoint manager, restored from model_dir."""
    schedule = schedule_lib.resolve_schedule(
        config.train, config.optim, source.num_examples
    )
    with strategy.scope():
        model = builders.build_model(
            config, source.num_classes, source.image_shape[-1]
        )
        size = config.data.image_size
        # One call creates every variable (both heads) before restoring.
        model(tf.zeros((1, size, size, source.image_shape[-1])))
        if config.train.train_mode in protocols.SUPERVISED_TRAIN_MODES:
            frozen = modes.freeze(
                model,
                config.train.train_mode,
                config.train.fine_tune_after_block,
            )
            logging.info(
                "frozen (%s): %s",
                "inference-mode BN"
                if config.train.train_mode == "lineareval"
                else "weights only; BN statistics follow the batches, as GR",
                frozen or "none",
            )
        learning_rate = builders.build_learning_rate(config, schedule)
        optimizer = builders.build_optimizer(config, schedule, learning_rate)
        optimizer.build(model.trainable_variables)
        # Steps taken, which is what the input's position follows; the
        # optimizer's iterations lag it when mixed_float16 skips updates.
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, step=step
        )
        manager = tf.train.CheckpointManager(
            checkpoint,
            directory=runtime.write_dir(strategy, config.model_dir),
            max_to_keep=config.train.keep_checkpoint_max,
            step_counter=step,
        )
        _restore_or_initialize(config, manager, model)
        if int(step.numpy()) < int(optimizer.iterations.numpy()):
            step.assign(optimizer.iterations)  # a checkpoint without "step"
    return TrainState(
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        step=step,
        manager=manager,
        schedule=schedule,
        learning_rate=learning_rate,
        num_classes=source.num_classes,
        image_shape=(size, size, source.image_shape[-1]),
    )


def _restore_or_initialize(
    config: config_lib.Config,
    manager: tf.train.CheckpointManager,
    model: keras.Model,
) -> None:
    # Every worker restores the chief's latest checkpoint.
    latest = tf.train.latest_checkpoint(config.model_dir)
    if latest:
        checkpoint = manager.checkpoint
        parts = {"model": checkpoint.model}
        if config.train.mode not in WEIGHTS_ONLY_MODES:
            parts["optimizer"] = checkpoint.optimizer
        try:
            tf.train.Checkpoint(**parts).restore(
                latest
            ).assert_existing_objects_matched()
            # Checkpoints from before the step variable (and imported ones)
            # lack it; build_state then takes the optimizer's iterations.
            tf.train.Checkpoint(step=checkpoint.step).restore(
                latest
            ).expect_partial()
        except (
            AssertionError,
            ValueError,
            tf.errors.InvalidArgumentError,
        ) as error:
            raise ValueError(
                f"--model_dir={config.model_dir} holds a checkpoint "
                f"({latest}) that does not match this "
                f"model: {str(error)[:300]}. Use a new --model_dir, or the "
                f"flags in {config.model_dir}/config.json (--precision too: "
                f"mixed_float16 adds loss-scale state) to resume it."
            ) from error
        logging.info("resumed from %s", latest)
    elif (
        config.train.checkpoint
        and config.train.train_mode in protocols.SUPERVISED_TRAIN_MODES
    ):
        # Encoder and projection head only: the supervised head starts
        # fresh, as the linear and fine-tuning protocols ask.
        read = modes.initialize_from(model, config.train.checkpoint)
        logging.info("initialised encoder and projection head from %s", read)
    elif config.train.checkpoint and gr_checkpoint.is_gr_model(
        config.train.checkpoint
    ):
        # A google-research/simclr model, imported: every variable, the
        # supervised head too when its size fits (as GR's restore).
        read = gr_import.load_into(model, config.train.checkpoint, None)
        logging.info("initialised weights from GR's %s", read)
    elif config.train.checkpoint:
        # GR's --checkpoint: initialise weights only, step count from 0.
        tf.train.Checkpoint(model=model).read(
            config.train.checkpoint
        ).expect_partial()
        logging.info("initialised weights from %s", config.train.checkpoint)
    else:
        logging.info(
            "no checkpoint in %s; starting from step 0", config.model_dir
        )


def restore_weights(state: TrainState, prefix: str) -> None:
    """Restores a checkpoint's model weights and step, not its optimizer.

    What evaluation and export need; the optimizer may differ from the
    one that wrote it (mixed_float16 wraps it in a LossScaleOptimizer), so
    a float16 run can be evaluated or exported in float32 or bfloat16.
    """
    tf.train.Checkpoint(model=state.model, step=state.step).restore(
        prefix
    ).expect_partial()


def restore_for_eval(
    config: config_lib.Config,
    source: source_lib.Source | None = None,
    strategy: tf.distribute.Strategy | None = None,
) -> dict[str, object]:
    """Builds the model and restores the latest checkpoint of model_dir
    (under `strategy` when setup_run already made it).

    Raises:
      FileNotFoundError: model_dir holds no checkpoint.
    """
    strategy = strategy or setup_run(config)
    source = source or run_data.open_train_source(config)
    if tf.train.latest_checkpoint(config.model_dir) is None:
        raise FileNotFoundError(
            f"--model_dir={config.model_dir} holds no checkpoint to "
            f"evaluate or export; train first (--mode=train) or point "
            f"--model_dir at a finished run."
        )
    return {"state": build_state(config, strategy, source), "source": source}
