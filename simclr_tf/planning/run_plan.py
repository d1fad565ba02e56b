"""The plan a run announces before it builds anything, and --mode=plan.

Puts memory.py (the train step, the input pipeline) and eval_memory.py
(what train_then_eval's evaluation adds) together for a run's strategy,
logs them, and refuses a run that cannot fit (memory.check).
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf
from absl import logging

from simclr_tf import runtime
from simclr_tf.config import schema as config_lib
from simclr_tf.data.sources import base as source_lib
from simclr_tf.planning import devices as devices_lib
from simclr_tf.planning import eval_memory
from simclr_tf.planning import memory as memory_lib


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A run's memory plan, its evaluation's (or None) and the log lines."""

    memory: memory_lib.MemoryPlan
    evaluation: eval_memory.EvalPlan | None
    lines: tuple[str, ...]

    def summary(self) -> dict[str, int]:
        """result.json entries: the planned bytes per replica and host."""
        return {
            "plan/replica_bytes": self.memory.replica_total,
            "plan/host_bytes": self.memory.host_total,
        }


def make_plan(
    config: config_lib.Config,
    strategy: tf.distribute.Strategy,
    train_source: source_lib.Source,
    eval_source: source_lib.Source | None = None,
) -> RunPlan:
    """The RunPlan of `config` on `strategy`'s devices.

    Args:
      config: the run's Config.
      strategy: its strategy.
      train_source: the (labelled, for supervised modes) training split.
      eval_source: the eval split when the run evaluates afterwards.
    """
    devices = devices_lib.for_run(
        strategy,
        config.runtime.device_memory_gb,
        config.runtime.host_memory_gb,
    )
    precision = runtime.resolve_precision(
        config.runtime.precision, runtime.resolve_strategy_name(config.runtime)
    )
    data = memory_lib.data_facts(
        train_source.num_examples,
        eval_source.num_examples if eval_source else 0,
        train_source.num_classes,
        train_source.image_shape,
    )
    facts = memory_lib.network_of(config, data.num_classes, data.image_channels)
    evaluation = None
    if eval_source is not None and data.num_classes:
        trained = 4 * (
            facts.parameters
            + facts.trainable_parameters
            * memory_lib.OPTIMIZER_SLOTS[config.optim.optimizer]
        )
        evaluation = eval_memory.plan_evaluation(
            config, devices, data, facts, training_bytes=trained
        )
    plan = memory_lib.plan_run(
        config,
        devices,
        data,
        precision,
        evaluation_host_bytes=evaluation.host_total if evaluation else 0,
        evaluation_replica_bytes=evaluation.replica_bytes if evaluation else 0,
    )
    lines = memory_lib.describe(plan)
    if evaluation is not None:
        lines += eval_memory.describe(evaluation, devices)
    return RunPlan(memory=plan, evaluation=evaluation, lines=tuple(lines))


def announce(
    config: config_lib.Config,
    strategy: tf.distribute.Strategy,
    train_source: source_lib.Source,
    eval_source: source_lib.Source | None = None,
) -> RunPlan:
    """Logs the run's plan and refuses one that cannot fit.

    Raises:
      ValueError: naming the flag to change (memory.check).
    """
    plan = make_plan(config, strategy, train_source, eval_source)
    for line in plan.lines:
        logging.info("%s", line)
    memory_lib.check(plan.memory, config)
    return plan
