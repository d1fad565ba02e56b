"""The pretraining loop: build, restore or initialise, then run, log, save.

`run_training` reads top to bottom: strategy and precision, data, model and
optimizer under the strategy's scope, restore-or-init from model_dir, then
loops of `steps_per_loop` steps, each followed by a console line, TensorBoard
scalars, a finiteness check and (when due) a checkpoint. Offline evaluation
and export live in evaluate.py and export.py; cli.py chains them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping

import keras
import tensorflow as tf
from absl import logging

from simclr_tf import config as config_lib
from simclr_tf import (
    monitors,
    optim,
    reporting,
    run_data,
    runtime,
    supervised,
    train_step,
)
from simclr_tf.data import sources
from simclr_tf.models import simclr


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or Inf loss; nothing was saved after it."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
    """Step counts of a run, resolved from epochs or steps."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    checkpoint_every: int
    steps_per_loop: int


@dataclasses.dataclass(kw_only=True)
class TrainState:
    """What the loop builds once and then uses: model, optimizer, saving."""

    strategy: tf.distribute.Strategy
    model: simclr.SimCLRModel
    optimizer: keras.optimizers.Optimizer
    manager: tf.train.CheckpointManager
    schedule: Schedule
    num_classes: int
    image_shape: tuple[int, int, int]


def is_due(step: int, every: int, total: int) -> bool:
    """Whether a periodic action (checkpoint, eval) is due after `step`.

    Due every `every` steps and always at the last step; never when
    every <= 0 except at the last step.
    """
    return step >= total or (every > 0 and step % every == 0)


def resolve_schedule(
    train: config_lib.Train, optimizer: config_lib.Optim, num_examples: int
) -> Schedule:
    """Resolves epochs to steps (GR's formulas, REFERENCE.md).

    Args:
      train: the Train config (batch, epochs or steps, checkpoint cadence).
      optimizer: the Optim config (warm-up epochs).
      num_examples: images in the training split.

    Returns:
      The Schedule; downstream code sees only steps.

    Raises:
      ValueError: when the split holds fewer images than one global batch.
    """
    batch = train.train_batch_size
    if num_examples < batch:
        raise ValueError(
            f"--train_batch_size={batch} is larger than the {num_examples} "
            f"images of --train_split; use --train_batch_size<="
            f"{max(2, num_examples)}."
        )
    steps_per_epoch = num_examples // batch
    total = optim.total_steps(
        train.train_steps, train.train_epochs, num_examples, batch
    )
    if train.checkpoint_steps > 0:
        every = train.checkpoint_steps
    else:
        every = max(1, train.checkpoint_epochs * steps_per_epoch)
    warmup = optim.warmup_steps(optimizer.warmup_epochs, num_examples, batch)
    if warmup >= total:
        logging.warning(
            "--warmup_epochs=%s is %d steps, not shorter than the %d training "
            "steps; warm-up is cut to %d steps.",
            optimizer.warmup_epochs,
            warmup,
            total,
            total - 1,
        )
        warmup = total - 1
    return Schedule(
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=warmup,
        checkpoint_every=every,
        steps_per_loop=min(train.steps_per_loop, total),
    )


def build_model(
    config: config_lib.Config, num_classes: int, image_channels: int
) -> simclr.SimCLRModel:
    """The SimCLRModel for a Config (call inside the strategy's scope).

    Pretraining: a supervised head (behind stop_gradient) when
    --lineareval_while_pretraining and the data has labels. The supervised
    train modes: a head in "finetune" mode, which gradients pass through
    unless supervised.freeze stops them.
    """
    model_config = config.model
    tuning = config.train.train_mode in supervised.SUPERVISED_TRAIN_MODES
    with_head = tuning or (
        model_config.lineareval_while_pretraining and num_classes > 0
    )
    return simclr.SimCLRModel(
        resnet_depth=model_config.resnet_depth,
        width_multiplier=model_config.width_multiplier,
        cifar_stem=model_config.cifar_stem,
        image_channels=image_channels,
        sk_ratio=model_config.sk_ratio,
        se_ratio=model_config.se_ratio,
        proj_head_mode=model_config.proj_head_mode,
        proj_out_dim=model_config.proj_out_dim,
        num_proj_layers=model_config.num_proj_layers,
        ft_proj_selector=model_config.ft_proj_selector,
        num_classes=num_classes if with_head else None,
        train_mode="finetune" if tuning else "pretrain",
        zero_init_logits_layer=model_config.zero_init_logits_layer,
        batch_norm_decay=model_config.batch_norm_decay,
        global_bn=model_config.global_bn,
    )


def build_optimizer(
    config: config_lib.Config, schedule: Schedule
) -> keras.optimizers.Optimizer:
    """Optimizer with the scaled, warmed-up cosine learning rate."""
    base = optim.scaled_learning_rate(
        config.optim.learning_rate,
        config.train.train_batch_size,
        config.optim.learning_rate_scaling,
    )
    learning_rate = optim.WarmUpAndCosineDecay(
        base, schedule.warmup_steps, schedule.total_steps
    )
    optimizer = optim.build_optimizer(
        config.optim.optimizer,
        learning_rate,
        momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay,
        nesterov=config.train.train_mode == "lineareval",
    )
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


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


def check_labelled(config: config_lib.Config, source: sources.Source) -> None:
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
    source: sources.Source,
) -> TrainState:
    """Model, optimizer and checkpoint manager, restored from model_dir."""
    schedule = resolve_schedule(config.train, config.optim, source.num_examples)
    with strategy.scope():
        model = build_model(config, source.num_classes, source.image_shape[-1])
        size = config.data.image_size
        # One call creates every variable (both heads) before restoring.
        model(tf.zeros((1, size, size, source.image_shape[-1])))
        if config.train.train_mode in supervised.SUPERVISED_TRAIN_MODES:
            frozen = supervised.freeze(
                model,
                config.train.train_mode,
                config.train.fine_tune_after_block,
            )
            logging.info("frozen (inference-mode BN): %s", frozen or "none")
        optimizer = build_optimizer(config, schedule)
        optimizer.build(model.trainable_variables)
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        manager = tf.train.CheckpointManager(
            checkpoint,
            directory=runtime.write_dir(strategy, config.model_dir),
            max_to_keep=config.train.keep_checkpoint_max,
            step_counter=optimizer.iterations,
        )
        _restore_or_initialize(config, manager, model)
    return TrainState(
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        manager=manager,
        schedule=schedule,
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
        try:
            manager.checkpoint.restore(latest).assert_existing_objects_matched()
        except (AssertionError, ValueError) as error:
            raise ValueError(
                f"--model_dir={config.model_dir} holds a checkpoint "
                f"({latest}) that does not match this "
                f"model: {str(error)[:300]}. Use a new --model_dir, or the "
                f"flags in {config.model_dir}/config.json to resume it."
            ) from error
        logging.info("resumed from %s", latest)
    elif (
        config.train.checkpoint
        and config.train.train_mode in supervised.SUPERVISED_TRAIN_MODES
    ):
        # Encoder and projection head only: the supervised head starts
        # fresh, as the linear and fine-tuning protocols ask.
        read = supervised.initialize_from(model, config.train.checkpoint)
        logging.info("initialised encoder and projection head from %s", read)
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


def run_training(
    config: config_lib.Config, source: sources.Source | None = None
) -> dict[str, object]:
    """Pretrains per `config`, resuming from model_dir when it has a checkpoint.

    Args:
      config: a validated Config with train_mode=pretrain.
      source: the --train_split source if already open; None opens it.

    Returns:
      A summary: final step, the last loop's metrics, images/s, wall time,
      and the TrainState under "state".

    Raises:
      NonFiniteLossError: a loop produced a NaN/Inf loss; the last good
        checkpoint is left as it was.
    """
    started = time.time()
    strategy = setup_run(config)
    source = source or run_data.open_train_source(config)
    pretrain = config.train.train_mode == "pretrain"
    train_source = source
    if not pretrain:
        check_labelled(config, source)
        train_source = run_data.labelled_train_source(config, source)
    state = build_state(config, strategy, train_source)
    chief = runtime.is_chief(strategy)
    if chief:
        reporting.write_config(config)
    reporting.log_plan(config, state, train_source)
    input_fn = (
        run_data.pretrain_input_fn(config, source)
        if pretrain
        else run_data.finetune_input_fn(config, train_source)
    )
    iterator = iter(strategy.distribute_datasets_from_function(input_fn))
    train_loop = train_step.make_train_loop(
        strategy, _make_step(config, state, strategy)
    )
    writer = reporting.summary_writer(config.model_dir, chief)
    if writer is not None and pretrain:
        monitors.write_preview_summary(config, source, writer, state)
    monitor = monitors.KnnMonitor.create(config, state, source)
    with runtime.PreemptionWatcher() as preemption:
        last = _loop(
            config, state, iterator, train_loop, writer, preemption, monitor
        )
    return {
        "preempted": last["preempted"],
        "step": int(state.optimizer.iterations.numpy()),
        "metrics": last.get("metrics", {}),
        "images_per_second": last.get("images_per_second", 0.0),
        "train_seconds": time.time() - started,
        "state": state,
        "source": source,
    }


def _make_step(
    config: config_lib.Config,
    state: TrainState,
    strategy: tf.distribute.Strategy,
) -> Callable[[Mapping[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """The replica step of config's train mode."""
    replicas = strategy.num_replicas_in_sync
    mode = config.train.train_mode
    if mode == "pretrain":
        return train_step.make_train_step(
            config, state.model, state.optimizer, replicas
        )
    teacher = None
    if mode == "distill":
        teacher = supervised.load_teacher(
            config.train.teacher,
            state.num_classes,
            state.image_shape[-1],
            strategy,
        )
    return train_step.make_supervised_step(
        config, state.model, state.optimizer, replicas, teacher
    )


def restore_for_eval(
    config: config_lib.Config, source: sources.Source | None = None
) -> dict[str, object]:
    """Builds the model and restores the latest checkpoint of model_dir.

    Raises:
      FileNotFoundError: model_dir holds no checkpoint.
    """
    strategy = setup_run(config)
    source = source or run_data.open_train_source(config)
    if tf.train.latest_checkpoint(config.model_dir) is None:
        raise FileNotFoundError(
            f"--model_dir={config.model_dir} holds no checkpoint to "
            f"evaluate or export; train first (--mode=train) or point "
            f"--model_dir at a finished run."
        )
    return {"state": build_state(config, strategy, source), "source": source}


def _loop(
    config: config_lib.Config,
    state: TrainState,
    iterator: object,
    train_loop: Callable[[object, tf.Tensor], dict[str, tf.Tensor]],
    writer: tf.summary.SummaryWriter | None,
    preemption: runtime.PreemptionWatcher,
    monitor: monitors.KnnMonitor | None = None,
) -> dict[str, object]:
    """Runs loops until total_steps, or until SIGTERM asks to stop.

    With a monitor, loops also end at its steps, where it runs.

    Returns:
      {"metrics": the last loop's mean metrics, "images_per_second": the
      mean over all loops but the first (which includes compiling),
      "preempted": whether SIGTERM stopped the run (after a checkpoint)}.
    """
    schedule = state.schedule
    batch = config.train.train_batch_size
    step = int(state.optimizer.iterations.numpy())
    metrics: dict[str, float] = {}
    timed_images, timed_seconds, first = 0, 0.0, True
    preempted = False
    while step < schedule.total_steps:
        steps = _steps_until_boundary(
            step, schedule, monitor.every if monitor else 0
        )
        started = time.time()
        metrics = train_loop(iterator, tf.constant(steps))
        metrics = {k: float(v) for k, v in metrics.items()}
        seconds = time.time() - started
        _check_finite(metrics, step, steps, state.manager)
        step += steps
        if not first:
            timed_images += steps * batch
            timed_seconds += seconds
        _report(
            state,
            writer,
            metrics,
            step=step,
            steps=steps,
            images=steps * batch,
            seconds=seconds,
            first=first,
        )
        first = False
        if monitor and is_due(step, monitor.every, schedule.total_steps):
            monitor(step, writer)
        preempted = _stop_requested(state.strategy, preemption)
        if preempted:
            _save(config, state, step)
            logging.warning(
                "preempted: saved %s at step %d/%d; run the same command to "
                "resume",
                state.manager.latest_checkpoint,
                step,
                schedule.total_steps,
            )
            break
        if is_due(step, schedule.checkpoint_every, schedule.total_steps):
            _save(config, state, step)
    if timed_seconds == 0.0 and metrics:
        timed_images, timed_seconds = steps * batch, seconds
    return {
        "metrics": metrics,
        "images_per_second": timed_images / max(timed_seconds, 1e-9),
        "preempted": preempted,
    }


def _report(
    state: TrainState,
    writer: tf.summary.SummaryWriter | None,
    metrics: dict[str, float],
    *,
    step: int,
    steps: int,
    images: int,
    seconds: float,
    first: bool,
) -> None:
    """Logs the progress line of a loop ending at `step`; writes its scalars."""
    if first:
        logging.info(
            "first loop (includes tracing and compiling) took %.1f s", seconds
        )
    images_per_second = images / max(seconds, 1e-9)
    learning_rate = float(
        keras.ops.convert_to_numpy(state.optimizer.learning_rate)
    )
    reporting.log_progress(
        step,
        state.schedule.total_steps,
        metrics,
        learning_rate,
        images_per_second,
        seconds / steps,
        compile_loop=first,
    )
    reporting.write_scalars(
        writer, step, metrics, learning_rate, images_per_second
    )


def _save(config: config_lib.Config, state: TrainState, step: int) -> None:
    """Saves a checkpoint; non-chief workers save to scratch and drop it."""
    state.manager.save(checkpoint_number=step)
    runtime.discard_scratch(state.strategy, config.model_dir)


def _stop_requested(
    strategy: tf.distribute.Strategy, preemption: runtime.PreemptionWatcher
) -> bool:
    """Whether any worker got SIGTERM; all workers must stop together.

    With several workers the flag is summed across them (one scalar
    all-reduce per loop), so that every worker saves at the same step
    rather than one waiting forever in a collective the others skip.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return preemption.requested
    flag = tf.constant(float(preemption.requested))
    total = strategy.reduce(
        tf.distribute.ReduceOp.SUM,
        strategy.run(lambda: tf.identity(flag)),
        axis=None,
    )
    return bool(total.numpy() > 0)


def _steps_until_boundary(
    step: int, schedule: Schedule, monitor_every: int = 0
) -> int:
    """Loop length: steps_per_loop, cut at the next checkpoint, the next
    monitor step (monitor_every > 0) and the end."""
    end = min(step + schedule.steps_per_loop, schedule.total_steps)
    for every in (schedule.checkpoint_every, monitor_every):
        if every > 0:
            end = min(end, (step // every + 1) * every)
    return max(1, end - step)


def _check_finite(
    metrics: Mapping[str, float],
    step: int,
    steps: int,
    manager: tf.train.CheckpointManager,
) -> None:
    if all(math.isfinite(v) for v in metrics.values()):
        return
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    raise NonFiniteLossError(
        f"non-finite {', '.join(bad)} in steps {step + 1}..{step + steps}; "
        f"nothing was saved after it. The last good checkpoint is "
        f"{manager.latest_checkpoint or '(none)'}. Lower --learning_rate, "
        f"check the input data, or use --precision=float32, then rerun the "
        f"same command to resume from that checkpoint."
    )
