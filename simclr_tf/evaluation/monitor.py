"""What a training run reports besides its loss, as hooks for its loop:
the kNN monitor and the augmentation preview in TensorBoard.

`training_hooks(config)` is what cli.py hands to loop.run_training; the loop
itself imports nothing from here.
"""

from __future__ import annotations

import dataclasses
import time

import tensorflow as tf
from absl import logging

from simclr_tf.config import schema as config_lib
from simclr_tf.data import run_data
from simclr_tf.data.sources import base as source_lib
from simclr_tf.evaluation import banks, scoring
from simclr_tf.planning import eval_memory
from simclr_tf.reports import preview
from simclr_tf.training import loop, train_state


@dataclasses.dataclass(frozen=True)
class KnnMonitor:
    """kNN accuracy of the encoder during pretraining (--knn_every_steps).

    The memory bank is the first --knn_max_train_examples images of the
    train split, queried by the eval split (capped at --max_eval_examples),
    both with eval preprocessing, on the replicas under the run's strategy
    (scoring.score_knn); results go to the log and to TensorBoard as
    knn/top_1 and knn/top_5.
    """

    every: int
    state: train_state.TrainState
    source: source_lib.Source
    test: banks.Split
    options: scoring.Options
    train_rows: int

    @classmethod
    def create(
        cls,
        config: config_lib.Config,
        state: train_state.TrainState,
        source: source_lib.Source,
    ) -> KnnMonitor | None:
        """The monitor, or None when off or the data has no labels."""
        every = config.eval.knn_every_steps
        if every <= 0 or source.num_classes == 0:
            return None
        strategy = state.strategy
        batch = -(-config.eval.eval_batch_size // strategy.num_replicas_in_sync)
        test = banks.distribute_split(
            strategy,
            run_data.open_split(config, config.data.eval_split),
            batch=batch,
            image_size=config.data.image_size,
            limit=config.eval.max_eval_examples,
        )
        return cls(
            every=every,
            state=state,
            source=source,
            test=test,
            options=scoring.Options(
                num_classes=source.num_classes,
                image_size=config.data.image_size,
                batch=batch,
                chunk=eval_memory.KNN_TRAIN_CHUNK,
                knn_k=config.eval.knn_k,
                knn_temperature=config.eval.knn_temperature,
                knn_queries=batch,
            ),
            train_rows=config.eval.knn_max_train_examples,
        )

    def __call__(
        self, step: int, writer: tf.summary.SummaryWriter | None
    ) -> dict[str, float]:
        started = time.time()
        model = self.state.model

        def featurize(images: tf.Tensor) -> dict[str, tf.Tensor]:
            features = model(images, training=False)["final_avg_pool"]
            return {"features": tf.cast(features, tf.float32)}

        result = scoring.score_knn(
            self.state.strategy,
            featurize,
            self.source,
            self.test,
            self.options,
            train_rows=self.train_rows,
            feature_dim=int(model.encoder.output.shape[-1]),
        )
        logging.info(
            "kNN monitor at step %d: top-1 %.4f top-5 %.4f (%d train, %d "
            "test, %.1f s)",
            step,
            result["top_1"],
            result["top_5"],
            result["num_train"],
            result["num_test"],
            time.time() - started,
        )
        if writer is not None:
            with writer.as_default(step=step):
                tf.summary.scalar("knn/top_1", result["top_1"])
                tf.summary.scalar("knn/top_5", result["top_5"])
            writer.flush()
        return result


def training_hooks(config: config_lib.Config) -> loop.HookFactory:
    """The hooks of a training run: at its start, the preview of its views
    (pretraining); every --knn_every_steps, the kNN monitor."""

    def make(
        state: train_state.TrainState, source: source_lib.Source
    ) -> list[loop.Hook]:
        hooks = []
        if config.train.train_mode == "pretrain":

            def preview_hook(step: int, writer: object) -> None:
                if writer is not None:
                    write_preview_summary(config, source, writer, step)

            hooks.append(loop.Hook(run=preview_hook, at_start=True))
        knn_monitor = KnnMonitor.create(config, state, source)
        if knn_monitor is not None:
            hooks.append(loop.Hook(run=knn_monitor, every=knn_monitor.every))
        return hooks

    return make


def write_preview_summary(
    config: config_lib.Config,
    source: source_lib.Source,
    writer: tf.summary.SummaryWriter,
    step: int,
) -> None:
    """The --mode=preview grid of augmented views, to TensorBoard."""
    grid = preview.preview_grid(config, source)
    with writer.as_default():
        tf.summary.image(
            "augmentations",
            preview.summary_image(grid),
            step=step,
            description="Each row: a train image, then training views made "
            "with this run's flags (--mode=preview writes the same PNG).",
        )
