"""The run-level linear evaluation: SimCLR encoder against two baselines.

Evaluates, on the same train/eval splits and with the same linear protocol
(linear.py), three representations: the pretrained encoder, the same
encoder architecture at random initialisation, and raw pixels. The numeric
work is in linear.py; this module only wires a Config to it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf import runtime
from simclr_tf.config import schema as config_lib
from simclr_tf.data import run_data
from simclr_tf.data.sources import base as source_lib
from simclr_tf.evaluation import extract, knn, linear
from simclr_tf.reports import evaluation as eval_reports
from simclr_tf.training import builders, train_state

# The kNN scores reported, as eval/knn/<name>.
KNN_METRICS = ("top_1", "top_5")


def run_linear_eval(
    config: config_lib.Config,
    state: train_state.TrainState,
    train_source: source_lib.Source | None = None,
) -> dict[str, object]:
    """Linear-evaluates the trained encoder and the two baselines.

    Args:
      config: the run's Config (dataset, splits, image size, eval settings).
      state: the TrainState holding the trained model.
      train_source: the --train_split source if already open (an image
        folder is then not listed and verified twice).

    Returns:
      Metrics named as in TensorBoard: eval/top_1, eval/top_5,
      eval/random_init/top_1, eval/pixels/top_1, ... and example counts.
      --linear_eval_epochs=0 trains no linear classifier (kNN only, if
      on); with --noeval_knn too, nothing is read and {} returned.
    """
    if not (config.eval.linear_eval_epochs or config.eval.eval_knn):
        return {}
    started = time.time()
    if train_source is None:
        train_source = run_data.open_train_source(config)
    test_source = run_data.open_split(config, config.data.eval_split)
    train_data = run_data.eval_input(config, train_source)
    test_data = run_data.eval_input(config, test_source, eval_split=True)
    result: dict[str, object] = {"eval/split": test_source.split}
    for prefix, featurize in _representations(config, state).items():
        train_features, train_labels = featurize(train_data)
        test_features, test_labels = featurize(test_data)
        features = (train_features, train_labels, test_features, test_labels)
        metrics = _linear_metrics(config, state.num_classes, *features)
        if config.eval.eval_knn:
            neighbours = knn.knn_accuracy(
                *features,
                num_classes=state.num_classes,
                k=config.eval.knn_k,
                temperature=config.eval.knn_temperature,
            )
            metrics.update({f"knn/{k}": neighbours[k] for k in KNN_METRICS})
        if not prefix and "logits" in metrics:
            write_run_reports(
                config,
                state,
                test_data,
                test_labels,
                metrics["logits"],
                test_features,
                class_names=test_source.class_names,
            )
        metrics.pop("logits", None)
        result.update({f"eval/{prefix}{k}": v for k, v in metrics.items()})
        logging.info(
            "eval %s: %s (%d train, %d test)",
            prefix.rstrip("/") or "simclr",
            ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "top" in k),
            len(train_labels),
            len(test_labels),
        )
    result["eval/seconds"] = time.time() - started
    write_scalars(config, state, result)
    return result


def _linear_metrics(
    config: config_lib.Config,
    num_classes: int,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
) -> dict[str, object]:
    """The offline linear classifier's top-1/top-5 (and its test logits),
    plus the example counts; only the counts at --linear_eval_epochs=0."""
    metrics: dict[str, object] = {
        "num_train": len(train_labels),
        "num_test": len(test_labels),
    }
    if not config.eval.linear_eval_epochs:
        return metrics
    classifier = linear.train_linear_classifier(
        train_features,
        train_labels,
        num_classes,
        epochs=config.eval.linear_eval_epochs,
        seed=config.train.seed or 0,
    )
    metrics.update(
        linear.evaluate_linear(classifier, test_features, test_labels)
    )
    metrics["logits"] = classifier.predict_logits(test_features)
    return metrics


def _representations(
    config: config_lib.Config, state: train_state.TrainState
) -> dict[str, Callable[[tf.data.Dataset], tuple]]:
    """Featurizers by metric prefix: the encoder, then the baselines."""
    representations: dict[str, Callable[[tf.data.Dataset], tuple]] = {
        "": lambda data: extract.extract_features(state.model, data),
    }
    if config.eval.eval_baselines:
        random_model = _random_init_model(config, state)
        representations["random_init/"] = lambda data: extract.extract_features(
            random_model, data
        )
        representations["pixels/"] = extract.pixel_features
    return representations


# Images kept in memory for the retrieval grid and projector sprite (bytes).
_MAX_REPORT_IMAGE_BYTES = 256 * 2**20


def write_run_reports(
    config: config_lib.Config,
    state: train_state.TrainState,
    test_data: tf.data.Dataset,
    labels: np.ndarray,
    logits: np.ndarray,
    features: np.ndarray,
    class_names: Sequence[str] = (),
) -> dict[str, str]:
    """The eval reports of a run into model_dir/reports and TensorBoard.

    Per-class precision / recall / F1, the confusion matrix, a t-SNE map
    and the projector of the eval split's features; the retrieval grid and
    projector sprite when its images fit in memory. Chief only, and only
    with --eval_reports.

    Args:
      config: the run's Config.
      state: the TrainState evaluated (its step labels the summaries).
      test_data: the eval batches the features came from, same order.
      labels: [n] eval labels; logits: [n, C] the classifier's scores;
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
    if image_bytes <= _MAX_REPORT_IMAGE_BYTES:
        images = np.concatenate(
            [
                np.round(np.asarray(batch["image"]) * 255).astype(np.uint8)
                for batch in test_data
            ]
        )
    step = int(state.step.numpy())
    writer = tf.summary.create_file_writer(
        os.path.join(config.model_dir, "eval")
    )
    paths = eval_reports.write_reports(
        os.path.join(config.model_dir, "reports"),
        labels=labels,
        predictions=np.argmax(logits, axis=-1),
        num_classes=state.num_classes,
        features=features,
        images=images,
        writer=writer,
        step=step,
        seed=config.train.seed or 0,
        class_names=class_names or None,
    )
    writer.flush()
    logging.info("wrote reports to %s", os.path.dirname(paths["per_class_txt"]))
    return paths


def _random_init_model(
    config: config_lib.Config, state: train_state.TrainState
) -> keras.Model:
    """The same architecture, freshly initialised (seeded when --seed is)."""
    if config.train.seed is not None:
        keras.utils.set_random_seed(config.train.seed + 1)
    with state.strategy.scope():
        model = builders.build_model(
            config, state.num_classes, state.image_shape[-1]
        )
        model(tf.zeros((1, *state.image_shape)))
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
        os.path.join(config.model_dir, "eval")
    )
    with writer.as_default(step=step):
        for name, value in result.items():
            if isinstance(value, (int, float)):  # not eval/split
                tf.summary.scalar(name, value)
    writer.flush()


def evaluate_classifier(
    model: keras.Model, dataset: Iterable[Mapping[str, tf.Tensor]]
) -> dict[str, object]:
    """Scores the supervised head (BN in inference mode) on a dataset.

    Args:
      model: a SimCLRModel with a supervised head.
      dataset: batches {"image": [b, H, W, C] float32, "label": [b]}.

    Returns:
      {"top_1", "top_5", "num_test"} plus numpy "logits" [n, C], "labels"
      [n] and "features" [n, F] (final_avg_pool) for reports.
    """
    forward = tf.function(
        lambda images: model(images, training=False), reduce_retracing=True
    )
    logits, labels, features = [], [], []
    for batch in dataset:
        outputs = forward(batch["image"])
        logits.append(outputs["logits_sup"].numpy())
        features.append(outputs["final_avg_pool"].numpy().astype(np.float32))
        labels.append(np.asarray(batch["label"], np.int64))
    if not logits:
        raise ValueError("the eval split is empty; pass another --eval_split.")
    logits_array, labels_array = np.concatenate(logits), np.concatenate(labels)
    return {
        "top_1": linear.top_k_accuracy(logits_array, labels_array, 1),
        "top_5": linear.top_k_accuracy(logits_array, labels_array, 5),
        "num_test": int(labels_array.shape[0]),
        "logits": logits_array,
        "labels": labels_array,
        "features": np.concatenate(features),
    }
