"""The run-level evaluation: the SimCLR encoder against two baselines.

On the same train/eval splits and by the same protocols (a linear
classifier on frozen features, kNN), three representations: the
pretrained encoder, the same architecture at random initialisation, and
raw pixels; plus the online linear head trained during pretraining (GR's
reported number). All of it runs under the run's strategy in bounded
memory (scoring.py, banks.py), as the EvalPlan (planning/eval_memory.py)
says, which also cuts the baselines to a logged subset at scale.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf import file_io, runtime
from simclr_tf.config import schema as config_lib
from simclr_tf.data import run_data
from simclr_tf.data.sources import base as source_lib
from simclr_tf.evaluation import banks, extract, scoring
from simclr_tf.planning import devices as devices_lib
from simclr_tf.planning import eval_memory
from simclr_tf.planning import memory as memory_lib
from simclr_tf.reports import evaluation as eval_reports
from simclr_tf.training import builders, train_state

_NAMES = {"": "simclr", "random_init/": "random init", "pixels/": "raw pixels"}


def plan_for(
    config: config_lib.Config,
    state: train_state.TrainState,
    train_source: source_lib.Source,
    test_source: source_lib.Source,
) -> tuple[eval_memory.EvalPlan, devices_lib.Devices]:
    """The EvalPlan of this run's evaluation on its strategy's devices."""
    devices = devices_lib.for_run(
        state.strategy,
        config.runtime.device_memory_gb,
        config.runtime.host_memory_gb,
    )
    data = memory_lib.data_facts(
        train_source.num_examples,
        test_source.num_examples,
        state.num_classes,
        train_source.image_shape,
    )
    facts = memory_lib.network_of(
        config, state.num_classes, data.image_channels
    )
    training = 4 * (
        facts.parameters
        + facts.trainable_parameters
        * memory_lib.OPTIMIZER_SLOTS[config.optim.optimizer]
    )
    plan = eval_memory.plan_evaluation(
        config, devices, data, facts, training_bytes=training
    )
    for line in eval_memory.describe(plan, devices):
        logging.info(line)
    return plan, devices


def _options(
    config: config_lib.Config, plan: eval_memory.EvalPlan, num_classes: int
) -> scoring.Options:
    return scoring.Options(
        num_classes=num_classes,
        image_size=config.data.image_size,
        batch=plan.per_replica_batch,
        chunk=plan.knn_chunk,
        linear_epochs=config.eval.linear_eval_epochs,
        linear_batch=plan.linear_batch,
        seed=config.train.seed or 0,
        knn=config.eval.eval_knn,
        knn_k=config.eval.knn_k,
        knn_temperature=config.eval.knn_temperature,
        knn_queries=plan.knn_queries,
    )


def run_linear_eval(
    config: config_lib.Config,
    state: train_state.TrainState,
    train_source: source_lib.Source | None = None,
) -> dict[str, object]:
    """Scores the trained encoder, its online head and the two baselines.

    Args:
      config: the run's Config (dataset, splits, image size, eval settings).
      state: the TrainState holding the trained model.
      train_source: the --train_split source if already open (an image
        folder is then not listed and verified twice).

    Returns:
      Metrics named as in TensorBoard: eval/top_1, eval/top_5 (linear
      classifier on frozen features), eval/online/top_1 (the head trained
      during pretraining), eval/knn/top_1, eval/random_init/top_1,
      eval/pixels/top_1, ..., example counts, the plan's memory and, for a
      baseline cut or refused, eval/<baseline>/train_subset or /skipped.
      --linear_eval_epochs=0 trains no linear classifier (kNN only, if
      on); with --noeval_knn too, nothing is read and {} returned.
    """
    if not (config.eval.linear_eval_epochs or config.eval.eval_knn):
        return {}
    started = time.time()
    if train_source is None:
        train_source = run_data.open_train_source(config)
    test_source = run_data.open_split(config, config.data.eval_split)
    plan, devices = plan_for(config, state, train_source, test_source)
    strategy = state.strategy
    options = _options(config, plan, state.num_classes)
    test = banks.distribute_split(
        strategy,
        test_source,
        batch=plan.per_replica_batch,
        image_size=config.data.image_size,
        limit=plan.test_rows,
    )
    result: dict[str, object] = {
        "eval/split": test_source.split,
        "eval/plan/replica_bytes": plan.replica_bytes,
        "eval/plan/host_bytes": plan.peak_host_bytes(devices),
    }
    for entry in plan.representations:
        prefix = entry.prefix
        if entry.skipped:
            logging.warning("%s", entry.skipped)
            result[f"eval/{prefix}skipped"] = entry.skipped
            continue
        if entry.note:
            result[f"eval/{prefix}train_subset"] = entry.note
        keep = (
            not prefix
            and config.eval.eval_reports
            and config.eval.linear_eval_epochs > 0
        )
        metrics, rows = scoring.score_representation(
            strategy,
            _featurizer(config, state, prefix, train_source),
            train_source,
            test,
            scoring.dataclasses.replace(options, keep_features=keep),
            train_rows=entry.train_rows,
            feature_dim=entry.feature_dim,
            name=_NAMES[prefix],
        )
        for name, value in metrics.items():
            result[f"eval/{prefix}{name}"] = value
        if keep:
            write_run_reports(
                config,
                state,
                test_source,
                rows["label"],
                rows["prediction"],
                rows["features"],
                class_names=test_source.class_names,
            )
    result["eval/seconds"] = time.time() - started
    write_scalars(config, state, result)
    return result


def _featurizer(
    config: config_lib.Config,
    state: train_state.TrainState,
    prefix: str,
    train_source: source_lib.Source,
) -> scoring.Featurize:
    """images -> {"features"[, "logits_sup"]} of a representation."""
    if prefix == "pixels/":
        return lambda images: {
            "features": tf.reshape(images, [tf.shape(images)[0], -1])
        }
    model = state.model
    if prefix == "random_init/":
        model = _random_init_model(config, state, train_source)

    def featurize(images: tf.Tensor) -> dict[str, tf.Tensor]:
        outputs = model(images, training=False)
        found = {"features": tf.cast(outputs["final_avg_pool"], tf.float32)}
        if not prefix and "logits_sup" in outputs:
            found["logits_sup"] = outputs["logits_sup"]
        return found

    return featurize


# Images kept in memory for the retrieval grid and projector sprite (bytes).
_MAX_REPORT_IMAGE_BYTES = eval_memory.REPORT_IMAGE_BYTES


def write_run_reports(
    config: config_lib.Config,
    state: train_state.TrainState,
    test_source: source_lib.Source,
    labels: np.ndarray,
    predictions: np.ndarray,
    features: np.ndarray,
    class_names: Sequence[str] = (),
) -> dict[str, str]:
    """The eval reports of a run into model_dir/reports and TensorBoard.

    Per-class precision / recall / F1, the confusion matrix, a t-SNE map
    and the projector of the eval split's features; the retrieval grid and
    projector sprite when its images fit in memory and one host read them
    (then the rows are the split's first rows, in order). Chief only, and
    only with --eval_reports.

    Args:
      config: the run's Config.
      state: the TrainState evaluated (its step labels the summaries).
      test_source: the eval split the rows came from.
      labels: [n] eval labels; predictions: [n] the classifier's classes;
      features: [n, F] encoder features.
      class_names: the eval split's class names (Source.class_names),
        shown in the reports beside the indices; () shows indices only.

    Returns:
      {report name: path}; {} when not written.
    """
    if not config.eval.eval_reports or not runtime.is_chief(state.strategy):
        return {}
    image_bytes = len(labels) * int(np.prod(state.image_shape))
    images = None
    one_host = devices_lib.hosts_of(state.strategy) == 1
    if image_bytes <= _MAX_REPORT_IMAGE_BYTES and one_host:
        test_data = run_data.eval_input(config, test_source, limit=len(labels))
        images = np.concatenate(
            [
                np.round(np.asarray(batch["image"]) * 255).astype(np.uint8)
                for batch in test_data
            ]
        )
    step = int(state.step.numpy())
    writer = tf.summary.create_file_writer(
        file_io.join(config.model_dir, "eval")
    )
    paths = eval_reports.write_reports(
        file_io.join(config.model_dir, "reports"),
        labels=labels,
        predictions=predictions,
        num_classes=state.num_classes,
        features=features,
        images=images,
        writer=writer,
        step=step,
        seed=config.train.seed or 0,
        class_names=class_names or None,
    )
    writer.flush()
    logging.info("wrote reports to %s", file_io.dirname(paths["per_class_txt"]))
    return paths


# Training images the random-init baseline's BN statistics are computed on.
RANDOM_INIT_CALIBRATION_IMAGES = 10_000


def _random_init_model(
    config: config_lib.Config,
    state: train_state.TrainState,
    train_source: source_lib.Source,
) -> keras.Model:
    """The same architecture, freshly initialised (seeded when --seed is),
    its BN statistics recalibrated on training images."""
    if config.train.seed is not None:
        keras.utils.set_random_seed(config.train.seed + 1)
    with state.strategy.scope():
        model = builders.build_model(
            config, state.num_classes, state.image_shape[-1]
        )
        model(tf.zeros((1, *state.image_shape)))
    train_data = run_data.eval_input(
        config, train_source, limit=RANDOM_INIT_CALIBRATION_IMAGES
    )
    count = extract.recalibrate_batch_norm(
        model, train_data, RANDOM_INIT_CALIBRATION_IMAGES
    )
    logging.info(
        "random-init baseline: BN statistics recalibrated on %d training "
        "images",
        count,
    )
    return model


def write_scalars(
    config: config_lib.Config,
    state: train_state.TrainState,
    result: dict[str, object],
) -> None:
    """Writes result's numbers to model_dir/eval at the state's step."""
    if not runtime.is_chief(state.strategy):
        return
    step = int(state.step.numpy())
    writer = tf.summary.create_file_writer(
        file_io.join(config.model_dir, "eval")
    )
    with writer.as_default(step=step):
        for name, value in result.items():
            if isinstance(value, (int, float)):  # not eval/split
                tf.summary.scalar(name, value)
    writer.flush()


def evaluate_classifier(
    config: config_lib.Config,
    state: train_state.TrainState,
    test_source: source_lib.Source,
) -> dict[str, object]:
    """Scores the model's supervised head on the eval split, under the
    run's strategy (BN in inference mode).

    Args:
      config: the run's Config (eval batch size, limits, image size).
      state: the TrainState whose model has a supervised head.
      test_source: the eval split.

    Returns:
      {"top_1", "top_5", "num_test"} plus numpy "predictions" [n],
      "labels" [n] and, with --eval_reports, "features" [n, F]
      (final_avg_pool).

    Raises:
      ValueError: the eval split gives no rows.
    """
    replicas = state.strategy.num_replicas_in_sync
    limit = config.eval.max_eval_examples
    if config.eval.eval_steps > 0:
        steps_rows = config.eval.eval_steps * config.eval.eval_batch_size
        limit = min(limit, steps_rows) if limit > 0 else steps_rows
    test = banks.distribute_split(
        state.strategy,
        test_source,
        batch=-(-config.eval.eval_batch_size // replicas),
        image_size=config.data.image_size,
        limit=limit,
    )
    rows = scoring.score_head(
        state.strategy,
        state.model,
        test,
        keep_features=config.eval.eval_reports,
    )
    metrics = scoring.metrics_of(rows, state.num_classes)
    return {
        "top_1": metrics["top_1"],
        "top_5": metrics["top_5"],
        "num_test": metrics["num_test"],
        "predictions": rows["prediction"],
        "labels": rows["label"],
        "features": rows.get("features"),
    }
