"""A representation scored under the run's strategy: its training features
banked on the replicas, the linear classifier trained there, the eval
split streamed past both and past kNN; and a model's own supervised head
scored the same way. Only per-row ranks and predictions (and, for the
reports, the encoder's eval features) reach the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf.data.sources import base as source_lib
from simclr_tf.evaluation import banks, knn_device, linear_device

# images [b, S, S, C] -> {"features": [b, F] float32, optionally
# "logits_sup": [b, C]}; runs in a replica context.
Featurize = Callable[[tf.Tensor], Mapping[str, tf.Tensor]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """How a representation is scored (from the Config and the EvalPlan).

    Attributes:
      num_classes: C.
      image_size: S.
      batch: eval rows per replica and step.
      chunk: bank rows per matmul (kNN, standardisation).
      linear_epochs, linear_batch: the linear classifier's (0 epochs: no
        linear classifier).
      seed: its permutations' seed.
      knn: also score kNN; knn_k, knn_temperature, knn_queries: its
        neighbours, temperature and eval rows per round.
      keep_features: bring the eval features to the host (reports).
    """

    num_classes: int
    image_size: int
    batch: int
    chunk: int
    linear_epochs: int = 30
    linear_batch: int = 256
    seed: int = 0
    knn: bool = True
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_queries: int = 1
    keep_features: bool = False


def bank_chunk(split: banks.Split, chunk: int) -> int:
    """Rows per matmul: about `chunk`, dividing the bank evenly."""
    rows = split.steps * split.batch
    pieces = -(-rows // max(1, chunk))
    return -(-rows // pieces)


def divisor_at_most(value: int, limit: int) -> int:
    """The largest divisor of value that is <= limit (>= 1)."""
    return max(
        d for d in range(1, min(value, max(1, limit)) + 1) if not value % d
    )


def make_bank(
    strategy: tf.distribute.Strategy,
    featurize: Featurize,
    source: source_lib.Source,
    options: Options,
    *,
    rows: int,
    feature_dim: int,
    name: str,
) -> tuple[banks.Bank, banks.Split, int]:
    """The training features of the first `rows` images, on the replicas.

    Returns:
      (the Bank, the Split it was filled from, its chunk).
    """
    split = banks.distribute_split(
        strategy,
        source,
        batch=options.batch,
        image_size=options.image_size,
        limit=rows,
    )
    chunk = bank_chunk(split, options.chunk)
    bank = banks.Bank(
        strategy,
        banks.capacity_for(split, chunk),
        {"features": ((feature_dim,), tf.float32)},
    )
    banks.fill(
        strategy,
        bank,
        split,
        lambda batch: {"features": featurize(batch["image"])["features"]},
        name=name,
    )
    return bank, split, chunk


def score_representation(
    strategy: tf.distribute.Strategy,
    featurize: Featurize,
    train_source: source_lib.Source,
    test: banks.Split,
    options: Options,
    *,
    train_rows: int,
    feature_dim: int,
    name: str,
) -> tuple[dict[str, float | int], dict[str, np.ndarray]]:
    """Linear classifier and kNN of one representation.

    Args:
      strategy: the run's strategy.
      featurize: the representation.
      train_source: the training split; its first train_rows images.
      test: the eval split's pass.
      options: the Options.
      train_rows: training images banked.
      feature_dim: F of the representation.
      name: for the log.

    Returns:
      (metrics: top_1, top_5, knn/top_1, knn/top_5, num_train, num_test,
      and online/top_1, online/top_5 when featurize gives logits_sup;
      rows: the host's per-row label, prediction, ranks, features).
    """
    bank, split, chunk = make_bank(
        strategy,
        featurize,
        train_source,
        options,
        rows=train_rows,
        feature_dim=feature_dim,
        name=name,
    )
    classifier = None
    if options.linear_epochs > 0:
        classifier = linear_device.train_on_bank(
            strategy,
            bank,
            options.num_classes,
            epochs=options.linear_epochs,
            batch_size=options.linear_batch,
            seed=options.seed,
            chunk=chunk,
        )
    k = min(options.knn_k, split.rows)
    queries = divisor_at_most(options.batch, options.knn_queries)

    def rows_of(batch: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        outputs = featurize(batch["image"])
        features, labels = outputs["features"], batch["label"]
        found: dict[str, tf.Tensor] = {}
        if classifier is not None:
            logits = classifier.logits(features)
            found["linear"] = linear_device.ranks_of(logits, labels)
            found["prediction"] = tf.argmax(logits, -1, output_type=tf.int32)
        if options.knn:
            found["knn"] = knn_device.knn_ranks(
                features,
                labels,
                bank,
                num_classes=options.num_classes,
                k=k,
                temperature=options.knn_temperature,
                chunk=chunk,
                queries=queries,
            )
        if "logits_sup" in outputs:
            found["online"] = linear_device.ranks_of(
                tf.cast(outputs["logits_sup"], tf.float32), labels
            )
        if options.keep_features:
            found["features"] = features
        return found

    rows = banks.stream(strategy, test, rows_of)
    metrics = metrics_of(rows, options.num_classes)
    metrics["num_train"] = split.rows
    logging.info(
        "%s: %s (%d train, %d test)",
        name,
        ", ".join(
            f"{label} {metrics[key]:.4f}"
            for label, key in (
                ("linear top-1", "top_1"),
                ("top-5", "top_5"),
                ("kNN top-1", "knn/top_1"),
            )
            if key in metrics
        ),
        split.rows,
        metrics["num_test"],
    )
    return metrics, rows


def metrics_of(
    rows: Mapping[str, np.ndarray], num_classes: int
) -> dict[str, float | int]:
    """top_1 / top_5 of each rank column ("linear" unprefixed)."""
    top5 = min(5, num_classes)
    metrics: dict[str, float | int] = {"num_test": int(len(rows["label"]))}
    for column, prefix in (
        ("linear", ""),
        ("knn", "knn/"),
        ("online", "online/"),
    ):
        if column in rows:
            ranks = rows[column]
            metrics[f"{prefix}top_1"] = linear_device.top_k_from_ranks(ranks, 1)
            metrics[f"{prefix}top_5"] = linear_device.top_k_from_ranks(
                ranks, top5
            )
    return metrics


def score_head(
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    test: banks.Split,
    *,
    keep_features: bool,
) -> dict[str, np.ndarray]:
    """Ranks and predictions of a model's own supervised head.

    Returns:
      The host's rows: label, linear (ranks of logits_sup), prediction,
      and features (final_avg_pool) with keep_features.
    """

    def rows_of(batch: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        outputs = model(batch["image"], training=False)
        logits = tf.cast(outputs["logits_sup"], tf.float32)
        found = {
            "linear": linear_device.ranks_of(logits, batch["label"]),
            "prediction": tf.argmax(logits, -1, output_type=tf.int32),
        }
        if keep_features:
            found["features"] = tf.cast(outputs["final_avg_pool"], tf.float32)
        return found

    return banks.stream(strategy, test, rows_of)


def score_knn(
    strategy: tf.distribute.Strategy,
    featurize: Featurize,
    train_source: source_lib.Source,
    test: banks.Split,
    options: Options,
    *,
    train_rows: int,
    feature_dim: int,
    name: str = "kNN",
) -> dict[str, float | int]:
    """kNN alone (the monitor during pretraining): bank, then one pass.

    Returns:
      {"top_1", "top_5", "num_train", "num_test", "k"}.
    """
    bank, split, chunk = make_bank(
        strategy,
        featurize,
        train_source,
        options,
        rows=train_rows,
        feature_dim=feature_dim,
        name=name,
    )
    k = min(options.knn_k, split.rows)
    queries = divisor_at_most(options.batch, options.knn_queries)

    def rows_of(batch: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        features = featurize(batch["image"])["features"]
        return {
            "knn": knn_device.knn_ranks(
                features,
                batch["label"],
                bank,
                num_classes=options.num_classes,
                k=k,
                temperature=options.knn_temperature,
                chunk=chunk,
                queries=queries,
            )
        }

    rows = banks.stream(strategy, test, rows_of)
    metrics = metrics_of(rows, options.num_classes)
    return {
        "top_1": metrics["knn/top_1"],
        "top_5": metrics["knn/top_5"],
        "num_train": split.rows,
        "num_test": metrics["num_test"],
        "k": k,
    }
