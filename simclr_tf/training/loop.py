"""The training loop of every train mode: set up, then run, log, save.

`run_training` reads top to bottom: strategy and precision, data, the
memory plan (logged; a run that cannot fit stops there), the TrainState
(model and optimizer restored from model_dir or initialised), the input
iterator positioned at the restored step, then loops of
`steps_per_loop` steps, each followed by a console line, TensorBoard
scalars, a finiteness check, the hooks that are due (the caller's: a kNN
monitor, a preview) and a checkpoint when due. Training knows nothing of
evaluation or reports; cli.py passes them in as hooks.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence

import keras
import tensorflow as tf
from absl import logging

from simclr_tf import runtime
from simclr_tf.config import schema as config_lib
from simclr_tf.data import run_data
from simclr_tf.data.sources import base as source_lib
from simclr_tf.planning import run_plan
from simclr_tf.training import budget as budget_lib
from simclr_tf.training import modes, progress, train_state, train_step
from simclr_tf.training import schedule as schedule_lib


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or Inf loss; nothing was saved after it."""


@dataclasses.dataclass(frozen=True)
class Hook:
    """Something the loop runs between loops, given the step and writer.

    Attributes:
      run: run(step, writer) -> anything; writer is the chief's TensorBoard
        writer (None on other workers).
      every: run after every `every` steps and at the last step (loops are
        cut so that they end there); 0: never periodically.
      at_start: also run once before the first loop.
    """

    run: Callable[[int, tf.summary.SummaryWriter | None], object]
    every: int = 0
    at_start: bool = False


# hooks(state, source) -> the Hooks of a run, made once its state exists.
HookFactory = Callable[
    [train_state.TrainState, source_lib.Source], Sequence[Hook]
]


def run_training(
    config: config_lib.Config,
    source: source_lib.Source | None = None,
    hooks: HookFactory | None = None,
    strategy: tf.distribute.Strategy | None = None,
) -> dict[str, object]:
    """Trains per `config`, resuming from model_dir when it has a checkpoint.

    Args:
      config: a validated Config (any train mode).
      source: the --train_split source if already open; None opens it.
      hooks: makes the run's hooks from its TrainState and train source.
      strategy: the strategy train_state.setup_run made, if already made.

    Returns:
      A summary: final step, the last loop's metrics, images/s, wall time,
      the TrainState under "state" and the run_plan.RunPlan under "plan".

    Raises:
      ValueError: the memory plan does not fit (the message names the flag
        to change), or bad data.
      NonFiniteLossError: a loop produced a NaN/Inf loss; the last good
        checkpoint is left as it was.
    """
    started = time.time()
    strategy = strategy or train_state.setup_run(config)
    source = source or run_data.open_train_source(config)
    pretrain = config.train.train_mode == "pretrain"
    train_source = source
    if not pretrain:
        train_state.check_labelled(config, source)
        train_source = run_data.labelled_train_source(config, source)
    if config.train.time_budget_minutes > 0 and isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ):
        raise ValueError(
            "--time_budget_minutes times one host's steps; with several "
            "workers set the length with --train_steps or --train_epochs "
            "instead."
        )
    eval_source = None
    if config.train.mode == "train_then_eval" and train_source.num_classes:
        eval_source = run_data.open_split(config, config.data.eval_split)
    # Before anything is built: a run that cannot fit stops here.
    plan = run_plan.announce(config, strategy, train_source, eval_source)
    state = train_state.build_state(config, strategy, train_source)
    chief = runtime.is_chief(strategy)
    if chief:
        progress.write_config(config)
    progress.log_plan(config, state, train_source)
    # The input continues where the restored step left it (exact resume).
    start_step = int(state.step.numpy())
    input_fn = (
        run_data.pretrain_input_fn(config, source, start_step)
        if pretrain
        else run_data.finetune_input_fn(config, train_source, start_step)
    )
    iterator = iter(strategy.distribute_datasets_from_function(input_fn))
    train_loop = train_step.make_train_loop(
        strategy, _make_step(config, state, strategy)
    )
    writer = progress.summary_writer(config.model_dir, chief)
    run_hooks = tuple(hooks(state, source)) if hooks else ()
    with runtime.PreemptionWatcher() as preemption:
        last = _loop(
            config, state, iterator, train_loop, writer, preemption, run_hooks
        )
    return {
        "preempted": last["preempted"],
        "step": int(state.step.numpy()),
        "metrics": last.get("metrics", {}),
        "images_per_second": last.get("images_per_second", 0.0),
        "train_seconds": time.time() - started,
        "state": state,
        "source": source,
        "plan": plan,
    }


def _make_step(
    config: config_lib.Config,
    state: train_state.TrainState,
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
        teacher = modes.load_teacher(
            config.train.teacher,
            state.num_classes,
            state.image_shape[-1],
            strategy,
        )
    return train_step.make_supervised_step(
        config, state.model, state.optimizer, replicas, teacher
    )


def _loop(
    config: config_lib.Config,
    state: train_state.TrainState,
    iterator: object,
    train_loop: Callable[[object, tf.Tensor], dict[str, tf.Tensor]],
    writer: tf.summary.SummaryWriter | None,
    preemption: runtime.PreemptionWatcher,
    hooks: Sequence[Hook] = (),
) -> dict[str, object]:
    """Runs loops until total_steps, or until SIGTERM asks to stop.

    Loops also end at each periodic hook's steps, where it runs.

    Returns:
      {"metrics": the last loop's mean metrics, "images_per_second": the
      mean over all loops but the first (which includes compiling),
      "preempted": whether SIGTERM stopped the run (after a checkpoint)}.
    """
    batch = config.train.train_batch_size
    step = int(state.step.numpy())
    metrics: dict[str, float] = {}
    timed_images, timed_seconds, first = 0, 0.0, True
    preempted = False
    budget_seconds = config.train.time_budget_minutes * 60.0
    decision = budget_lib.load(
        config.model_dir, config.train.time_budget_minutes
    )
    if decision is not None:
        _apply_budget(state, decision, "decided when this run started")
    schedule = state.schedule
    if budget_seconds and decision is None:
        logging.info(
            "time budget %.1f min: after its first step (tracing and "
            "compiling), the run times the next loop and cuts its %d steps "
            "to the ones that fit",
            budget_seconds / 60,
            schedule.total_steps,
        )
    loop_started = time.time()
    for hook in hooks:
        if hook.at_start:
            hook.run(step, writer)
    while step < schedule.total_steps:
        steps = schedule_lib.steps_until_boundary(
            step, schedule, *(hook.every for hook in hooks)
        )
        measuring = budget_seconds > 0 and decision is None
        if measuring and first:
            steps = 1  # tracing and compiling, timed apart from the steps
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
        if measuring and not first:
            decision = budget_lib.decide(
                step=step,
                elapsed_seconds=time.time() - loop_started,
                step_seconds=seconds / steps,
                budget_seconds=budget_seconds,
                configured_steps=schedule.total_steps,
                warmup_steps=schedule.warmup_steps,
            )
            if runtime.is_chief(state.strategy):
                budget_lib.save(config.model_dir, decision)
            _apply_budget(state, decision, f"measured over {steps} steps")
            schedule = state.schedule
        first = False
        for hook in hooks:
            if hook.every > 0 and schedule_lib.is_due(
                step, hook.every, schedule.total_steps
            ):
                hook.run(step, writer)
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
        if schedule_lib.is_due(
            step, schedule.checkpoint_every, schedule.total_steps
        ):
            _save(config, state, step)
    if timed_seconds == 0.0 and metrics:
        timed_images, timed_seconds = steps * batch, seconds
    return {
        "metrics": metrics,
        "images_per_second": timed_images / max(timed_seconds, 1e-9),
        "preempted": preempted,
    }


def _apply_budget(
    state: train_state.TrainState, decision: budget_lib.Decision, why: str
) -> None:
    """Ends the schedule and the learning-rate decay at the decided step."""
    state.schedule = dataclasses.replace(
        state.schedule, total_steps=decision.total_steps
    )
    if state.learning_rate is not None:
        state.learning_rate.set_total_steps(decision.total_steps)
    logging.info(
        "%s (%s)", decision.describe(state.schedule.steps_per_epoch), why
    )


def _report(
    state: train_state.TrainState,
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
    progress.log_progress(
        step,
        state.schedule.total_steps,
        metrics,
        learning_rate,
        images_per_second,
        seconds / steps,
        compile_loop=first,
    )
    progress.write_scalars(
        writer, step, metrics, learning_rate, images_per_second
    )


def _save(
    config: config_lib.Config, state: train_state.TrainState, step: int
) -> None:
    """Saves a checkpoint; non-chief workers save to scratch and drop it."""
    state.step.assign(step)
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
