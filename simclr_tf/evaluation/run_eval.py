"""Evaluation of a run: what --mode=eval and train_then_eval report.

`evaluate_state` scores the model a TrainState holds: a pretrained encoder
by the linear protocol (and kNN) against its baselines, a supervised model
by its own head. `run_eval_loop` is --mode=eval: it watches model_dir and
evaluates each new checkpoint once, writing result_<step>.json, until the
checkpoint of the last step (or --eval_timeout_secs without a new one);
the last step is the one a --time_budget_minutes run decided, once it has.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator

import tensorflow as tf
from absl import logging

from simclr_tf import file_io, runtime
from simclr_tf.config import schema as config_lib
from simclr_tf.data import run_data
from simclr_tf.data.sources import base as source_lib
from simclr_tf.evaluation import protocol
from simclr_tf.training import budget, train_state
from simclr_tf.training import schedule as schedule_lib


def evaluate_state(
    config: config_lib.Config,
    state: train_state.TrainState,
    source: source_lib.Source | None = None,
) -> dict[str, object]:
    """Metrics of the model in `state` on --eval_split, named as in TB.

    Args:
      config: the run's Config.
      state: the TrainState (restored or just trained).
      source: the --train_split source if already open.

    Returns:
      eval/split, eval/top_1, eval/top_5, ... A pretrained encoder gets
      the linear protocol, kNN and the baselines (protocol.run_linear_eval)
      and, when it has a supervised head (--lineareval_while_pretraining),
      that head's scores as eval/online/top_1 and eval/online/top_5: GR's
      own evaluation, what its published linear-eval figures are.
    """
    if config.train.train_mode != "pretrain":
        return _evaluate_head(config, state, "eval/", reports=True)
    result = protocol.run_linear_eval(config, state, source)
    # The protocol's pass scores the head too (eval/online/); without the
    # protocol (--linear_eval_epochs=0 --noeval_knn) the head is scored alone.
    if (
        state.model.supervised_head is not None
        and "eval/online/top_1" not in result
    ):
        result.update(
            _evaluate_head(config, state, "eval/online/", reports=True)
        )
    return result


def _evaluate_head(
    config: config_lib.Config,
    state: train_state.TrainState,
    prefix: str,
    reports: bool,
) -> dict[str, object]:
    """The model's own supervised head on --eval_split (BN in inference
    mode), as <prefix>top_1, top_5 and num_test; with `reports`, the
    per-class reports from its predictions."""
    started = time.time()
    test_source = run_data.open_split(config, config.data.eval_split)
    scores = protocol.evaluate_classifier(config, state, test_source)
    if reports and scores["features"] is not None:
        protocol.write_run_reports(
            config,
            state,
            test_source,
            scores["labels"],
            scores["predictions"],
            scores["features"],
            class_names=test_source.class_names,
        )
    result: dict[str, object] = {"eval/split": test_source.split}
    for name in ("top_1", "top_5", "num_test"):
        result[f"{prefix}{name}"] = scores[name]
    result[f"{prefix}seconds"] = time.time() - started
    logging.info(
        "%s eval (supervised head): top-1 %.4f top-5 %.4f (%d images of %s)",
        config.train.train_mode,
        scores["top_1"],
        scores["top_5"],
        scores["num_test"],
        test_source.split,
    )
    protocol.write_scalars(config, state, result)
    return result


def step_of(checkpoint_prefix: str) -> int:
    """The step number N of a checkpoint prefix ".../ckpt-N"."""
    match = re.search(r"-(\d+)$", checkpoint_prefix)
    if match is None:
        raise ValueError(
            f"{checkpoint_prefix} is not a checkpoint prefix ending in -N."
        )
    return int(match.group(1))


def watch_checkpoints(
    model_dir: str,
    *,
    last_step: Callable[[], int],
    timeout_secs: float,
    poll_secs: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[tuple[str, int]]:
    """Yields (prefix, step) of model_dir's latest checkpoint, then of each
    newer one as it appears, each once.

    Stops after yielding a checkpoint at step >= last_step() (asked again
    at every checkpoint: a budgeted run decides its end after its first
    loop), or when no new checkpoint appears for timeout_secs after the
    previous one was handled (0 = do not wait: only what is there now).
    """
    seen = -1
    deadline = time.monotonic() + timeout_secs
    while True:
        prefix = tf.train.latest_checkpoint(model_dir)
        step = step_of(prefix) if prefix else -1
        if step > seen:
            yield prefix, step
            if step >= last_step():
                return
            seen = step
            deadline = time.monotonic() + timeout_secs
        elif time.monotonic() >= deadline:
            logging.warning(
                "no checkpoint after step %d appeared in %s within %d s "
                "(--eval_timeout_secs); stopping.",
                max(seen, 0),
                model_dir,
                timeout_secs,
            )
            return
        else:
            if seen < 0 and step < 0:
                logging.log_first_n(
                    logging.INFO, "waiting for a checkpoint in %s", 1, model_dir
                )
            sleep(poll_secs)


def run_eval_loop(
    config: config_lib.Config,
    source: source_lib.Source,
    base_result: dict[str, object],
    strategy: tf.distribute.Strategy | None = None,
) -> dict[str, object]:
    """--mode=eval: evaluates each new checkpoint of model_dir once.

    Args:
      config: the run's Config.
      source: the --train_split source.
      base_result: entries every result holds (config, versions).
      strategy: the strategy train_state.setup_run made, if already made.

    Returns:
      The last checkpoint's result (also model_dir/result.json); each
      checkpoint's is in model_dir/result_<step>.json.

    Raises:
      FileNotFoundError: no checkpoint appeared within the timeout.
    """
    _check_something_to_watch(config.model_dir)
    strategy = strategy or train_state.setup_run(config)
    if config.train.train_mode != "pretrain":
        train_state.check_labelled(config, source)
        source = run_data.labelled_train_source(config, source)
    state = None
    result: dict[str, object] = {}
    for prefix, step in watch_checkpoints(
        config.model_dir,
        last_step=lambda: final_step(config, source),
        timeout_secs=config.eval.eval_timeout_secs,
    ):
        started = time.time()
        if state is None:
            state = train_state.build_state(config, strategy, source)
        train_state.restore_weights(state, prefix)
        logging.info("evaluating %s (step %d)", prefix, step)
        result = {**base_result, "step": step, "checkpoint": prefix}
        result.update(evaluate_state(config, state, source))
        result["wall_seconds"] = time.time() - started
        if runtime.is_chief(strategy):
            path = file_io.write_result(
                config.model_dir, result, f"result_{step}.json"
            )
            file_io.write_result(config.model_dir, result)
            logging.info("wrote %s", path)
    if not result:
        raise FileNotFoundError(
            f"--model_dir={config.model_dir} holds no checkpoint to evaluate "
            f"and none appeared within --eval_timeout_secs="
            f"{config.eval.eval_timeout_secs}; train first (--mode=train) "
            f"or point --model_dir at a run."
        )
    result["state"] = state
    return result


def _check_something_to_watch(model_dir: str) -> None:
    """Fails at once on a model_dir no training run has started in.

    A run writes config.json before its first step; only then is waiting
    for checkpoints (up to --eval_timeout_secs) worth it.
    """
    if tf.train.latest_checkpoint(model_dir) or file_io.exists(
        file_io.join(model_dir, "config.json")
    ):
        return
    raise FileNotFoundError(
        f"--model_dir={model_dir} holds no checkpoint and no training run "
        f"(config.json) to wait for; train first (--mode=train, or "
        f"train_then_eval) or point --model_dir at a run."
    )


def final_step(config: config_lib.Config, source: source_lib.Source) -> int:
    """The run's final step.

    Args:
      config: the run's Config.
      source: the --train_split source (its size sets the schedule).

    Returns:
      With --time_budget_minutes, the step its decision (model_dir/
      time_budget.json, as training reads it) gives once made; otherwise,
      or before it, the training schedule's last step.
    """
    decision = budget.load(config.model_dir, config.train.time_budget_minutes)
    if decision is not None:
        return decision.total_steps
    schedule = schedule_lib.resolve_schedule(
        config.train, config.optim, source.num_examples
    )
    return schedule.total_steps
