"""What a training run reports as it goes: the plan, console progress
lines, TensorBoard scalars and config.json. Only the chief calls the
writers; nothing here trains.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf import file_io
from simclr_tf.config import schema as config_lib
from simclr_tf.data.sources import base as source_lib
from simclr_tf.training import train_state

# Console names of the loop metrics, in order; a run logs those it has.
_PROGRESS_METRICS = (
    ("contrast_loss", "loss"),
    ("contrast_acc", "contrast_acc"),
    ("supervised_loss", "supervised_loss"),
    ("supervised_acc", "supervised_acc"),
    ("distill_loss", "distill_loss"),
    ("teacher_agreement", "teacher_agreement"),
)


def log_progress(
    step: int,
    total: int,
    metrics: Mapping[str, float],
    learning_rate: float,
    images_per_second: float,
    seconds_per_step: float,
    *,
    compile_loop: bool,
) -> None:
    eta = datetime.timedelta(seconds=round((total - step) * seconds_per_step))
    line = f"step {step}/{total} ({100 * step / total:.0f}%)"
    for name, label in _PROGRESS_METRICS:
        if name in metrics:
            line += f" {label} {metrics[name]:.4g}"
    line += f" lr {learning_rate:.4g} {images_per_second:.0f} img/s"
    line += " (incl. compile)" if compile_loop else f" eta {eta}"
    logging.info(line)


def summary_writer(
    model_dir: str, chief: bool
) -> tf.summary.SummaryWriter | None:
    if not chief:
        return None
    return tf.summary.create_file_writer(file_io.join(model_dir, "train"))


def write_scalars(
    writer: tf.summary.SummaryWriter | None,
    step: int,
    metrics: Mapping[str, float],
    learning_rate: float,
    images_per_second: float,
) -> None:
    if writer is None:
        return
    with writer.as_default(step=step):
        for name, value in metrics.items():
            tf.summary.scalar(f"train/{name}", value)
        tf.summary.scalar("train/learning_rate", learning_rate)
        tf.summary.scalar("train/images_per_second", images_per_second)
    writer.flush()


def write_config(config: config_lib.Config) -> str:
    """Writes model_dir/config.json (the resolved config); returns its path."""
    file_io.makedirs(config.model_dir)
    return file_io.write_text(
        file_io.join(config.model_dir, "config.json"), config.to_json()
    )


def log_plan(
    config: config_lib.Config,
    state: train_state.TrainState,
    source: source_lib.Source,
) -> None:
    schedule = state.schedule
    parameters = int(
        sum(np.prod(v.shape) for v in state.model.trainable_variables)
    )
    logging.info(
        "dataset %s/%s: %d images %s, %d classes; %d steps (%.2f epochs, "
        "%d per epoch), warm-up %d, checkpoint every %d; %s trainable "
        "parameters; model_dir %s",
        source.name,
        source.split,
        source.num_examples,
        source.image_shape,
        source.num_classes,
        schedule.total_steps,
        schedule.total_steps / max(1, schedule.steps_per_epoch),
        schedule.steps_per_epoch,
        schedule.warmup_steps,
        schedule.checkpoint_every,
        f"{parameters:,}",
        config.model_dir,
    )
    logging.info("config:\n%s", config.to_json())
