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
from simclr_tf import losses, optim, preview, reporting, runtime
from simclr_tf.data import pipeline, sources
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
    """The SimCLRModel for a Config (call inside the strategy's scope)."""
    model_config = config.model
    with_head = model_config.lineareval_while_pretraining and num_classes > 0
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
        train_mode="pretrain",
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
    )
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


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
            views = pipeline.distort_views(
                views,
                batch["view_seeds"],
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
            loss = contrast_loss
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
            # Invariant: each replica's loss is the mean over its own 2n
            # anchors; dividing by the replica count once, here, makes the
            # SUM of replica gradients (what the optimizer applies) equal the
            # gradient of the global-batch loss.
            scaled_loss = loss / num_replicas
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                scaled_loss = optimizer.scale_loss(scaled_loss)
        variables = model.trainable_variables
        gradients = tape.gradient(scaled_loss, variables)
        optimizer.apply_gradients(zip(gradients, variables, strict=True))
        return {k: tf.cast(v, tf.float32) for k, v in metrics.items()}

    names = ["contrast_acc", "contrast_entropy", "contrast_loss"]
    if model.supervised_head is not None:
        names += ["supervised_loss", "supervised_acc"]
    names += ["weight_decay", "total_loss"]
    if config.runtime.jit_compile:
        step = tf.function(step, jit_compile=True)
    # The loop needs the names up front to start its sums at zero (tracing
    # the step once more to learn them would double the compile time).
    step.metric_names = tuple(names)
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

    @tf.function
    def train_loop(iterator: object, steps: tf.Tensor) -> dict:
        totals = {name: tf.constant(0.0) for name in step.metric_names}
        for _ in tf.range(steps):
            per_replica = strategy.run(step, (next(iterator),))
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
    source = source or open_train_source(config)
    state = build_state(config, strategy, source)
    chief = runtime.is_chief(strategy)
    if chief:
        reporting.write_config(config)
    reporting.log_plan(config, state, source)
    iterator = iter(
        strategy.distribute_datasets_from_function(
            _pretrain_input_fn(config, source)
        )
    )
    train_loop = make_train_loop(
        strategy,
        make_train_step(
            config,
            state.model,
            state.optimizer,
            strategy.num_replicas_in_sync,
        ),
    )
    writer = reporting.summary_writer(config.model_dir, chief)
    if writer is not None:
        _write_preview_summary(config, source, writer, state)
    with runtime.PreemptionWatcher() as preemption:
        last = _loop(config, state, iterator, train_loop, writer, preemption)
    return {
        "preempted": last["preempted"],
        "step": int(state.optimizer.iterations.numpy()),
        "metrics": last.get("metrics", {}),
        "images_per_second": last.get("images_per_second", 0.0),
        "train_seconds": time.time() - started,
        "state": state,
        "source": source,
    }


def _write_preview_summary(
    config: config_lib.Config,
    source: sources.Source,
    writer: tf.summary.SummaryWriter,
    state: TrainState,
) -> None:
    """The --mode=preview grid of augmented views, to TensorBoard."""
    grid = preview.preview_grid(config, source)
    with writer.as_default():
        tf.summary.image(
            "augmentations",
            preview.summary_image(grid),
            step=int(state.optimizer.iterations.numpy()),
            description="Each row: a train image, then training views made "
            "with this run's flags (--mode=preview writes the same PNG).",
        )


def open_split(config: config_lib.Config, split: str) -> sources.Source:
    """One split of --dataset, opened with the run's data flags."""
    return sources.open_source(
        config.data.dataset,
        split,
        data_dir=config.data.data_dir,
        seed=config.train.seed,
        verify_images=config.data.verify_images,
    )


def open_train_source(config: config_lib.Config) -> sources.Source:
    """The --train_split of --dataset."""
    return open_split(config, config.data.train_split)


def restore_for_eval(
    config: config_lib.Config, source: sources.Source | None = None
) -> dict[str, object]:
    """Builds the model and restores the latest checkpoint of model_dir.

    Raises:
      FileNotFoundError: model_dir holds no checkpoint.
    """
    strategy = setup_run(config)
    source = source or open_train_source(config)
    if tf.train.latest_checkpoint(config.model_dir) is None:
        raise FileNotFoundError(
            f"--model_dir={config.model_dir} holds no checkpoint to "
            f"evaluate or export; train first (--mode=train) or point "
            f"--model_dir at a finished run."
        )
    return {"state": build_state(config, strategy, source), "source": source}


def _pretrain_input_fn(
    config: config_lib.Config, source: sources.Source
) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    data = config.data
    return pipeline.pretrain_input_fn(
        source,
        global_batch_size=config.train.train_batch_size,
        image_size=data.image_size,
        color_jitter_strength=data.color_jitter_strength,
        blur=data.use_blur,
        brightness_impl=data.brightness_impl,
        seed=config.train.seed,
        cache=data.cache_dataset,
        augment_on_device=data.augment_on_device,
    )


def _loop(
    config: config_lib.Config,
    state: TrainState,
    iterator: object,
    train_loop: Callable[[object, tf.Tensor], dict[str, tf.Tensor]],
    writer: tf.summary.SummaryWriter | None,
    preemption: runtime.PreemptionWatcher,
) -> dict[str, object]:
    """Runs loops until total_steps, or until SIGTERM asks to stop.

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
        steps = _steps_until_boundary(step, schedule)
        started = time.time()
        metrics = train_loop(iterator, tf.constant(steps))
        metrics = {k: float(v) for k, v in metrics.items()}
        seconds = time.time() - started
        _check_finite(metrics, step, steps, state.manager)
        step += steps
        if first:
            logging.info(
                "first loop (includes tracing and compiling) took %.1f s",
                seconds,
            )
        else:
            timed_images, timed_seconds = (
                timed_images + steps * batch,
                timed_seconds + seconds,
            )
        images_per_second = steps * batch / max(seconds, 1e-9)
        learning_rate = float(
            keras.ops.convert_to_numpy(state.optimizer.learning_rate)
        )
        reporting.log_progress(
            step,
            schedule.total_steps,
            metrics,
            learning_rate,
            images_per_second,
            seconds / steps,
            compile_loop=first,
        )
        reporting.write_scalars(
            writer, step, metrics, learning_rate, images_per_second
        )
        first = False
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


def _steps_until_boundary(step: int, schedule: Schedule) -> int:
    """Loop length: steps_per_loop, cut at the next checkpoint and the end."""
    end = min(step + schedule.steps_per_loop, schedule.total_steps)
    every = schedule.checkpoint_every
    next_checkpoint = (step // every + 1) * every
    return max(1, min(end, next_checkpoint) - step)


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
