"""A run's step counts: epochs resolved to steps (GR's formulas), and when
each periodic action (checkpoint, hook, end of a loop) is due.
"""

from __future__ import annotations

import dataclasses

from absl import logging

from simclr_tf import optim
from simclr_tf.config import schema as config_lib


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
    """Step counts of a run, resolved from epochs or steps."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    checkpoint_every: int
    steps_per_loop: int


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


def steps_until_boundary(step: int, schedule: Schedule, *every: int) -> int:
    """Loop length: steps_per_loop, cut at the end, the next checkpoint and
    the next multiple of each of `every` (those > 0: periodic hooks)."""
    end = min(step + schedule.steps_per_loop, schedule.total_steps)
    for period in (schedule.checkpoint_every, *every):
        if period > 0:
            end = min(end, (step // period + 1) * period)
    return max(1, end - step)
