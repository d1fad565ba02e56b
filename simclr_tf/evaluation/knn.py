"""Weighted kNN evaluation on frozen features (Wu et al. 2018, InstDisc).

The protocol of lightly, solo-learn and InstDisc: cosine similarity between
L2-normalised features, the k nearest training features vote for their class
with weight exp(similarity / temperature). Feature extraction reuses
simclr_tf.evaluate; the linear protocol lives there too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from simclr_tf.evaluation import extract, linear

# exp(1 / temperature) must stay finite in float32 (max ~3.4e38 = e^88.7)
# after summing up to ~1e9 votes: 1 / 0.02 = 50 leaves a wide margin. Peers
# use 0.07 (solo-learn) and 0.1 (lightly, InstDisc).
_MIN_TEMPERATURE = 0.02


def _check_features(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    num_classes: int,
) -> None:
    """Raises ValueError on bad shapes, empty sets or labels out of range."""
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(
            f"train_features has shape {train_features.shape} and "
            f"test_features {test_features.shape}; both must be 2-D [n, d] "
            "and [m, d]. Flatten feature maps first (reshape(n, -1))."
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features has d={train_features.shape[1]} but "
            f"test_features d={test_features.shape[1]}; extract both with "
            "the same encoder output."
        )
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(
            f"train_labels has shape {train_labels.shape}; it must be "
            f"[{train_features.shape[0]}], one label per train_features row."
        )
    if not len(train_labels) or not len(test_features):
        raise ValueError(
            f"train_features has {len(train_labels)} rows and test_features "
            f"{len(test_features)}; both must be non-empty."
        )
    if num_classes < 1 or not (
        0 <= train_labels.min() and train_labels.max() < num_classes
    ):
        raise ValueError(
            f"train_labels span [{train_labels.min()}, {train_labels.max()}] "
            f"with num_classes={num_classes}; labels must lie in "
            "[0, num_classes). Pass the dataset's class count."
        )


def _check_hyperparameters(k: int, temperature: float, batch_size: int) -> None:
    """Raises ValueError unless k >= 1, temperature is safe, batch_size >= 1."""
    if k < 1:
        raise ValueError(f"k={k} must be >= 1; peers use k=200.")
    if not temperature >= _MIN_TEMPERATURE:
        raise ValueError(
            f"temperature={temperature} must be >= {_MIN_TEMPERATURE} (and "
            "> 0): exp(1 / temperature) overflows float32 below that. "
            "Peers use 0.1."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1, e.g. 1024.")


def _vote(
    similarities: tf.Tensor,
    train_labels: tf.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
) -> tf.Tensor:
    """Weighted votes [b, C] of the k most similar training rows."""
    top_similarities, top_indices = tf.math.top_k(similarities, k=k)  # [b, k]
    neighbour_labels = tf.gather(train_labels, top_indices)  # [b, k]
    weights = tf.exp(top_similarities / temperature)
    # Sum weights per (row, class) with a segment sum: a one-hot [b, k, C]
    # tensor would be 800 MB for b=1024, k=200, C=1000 (ImageNet).
    rows = tf.range(tf.shape(similarities)[0], dtype=tf.int64)[:, None]
    segments = rows * num_classes + neighbour_labels  # [b, k]
    num_segments = tf.shape(similarities, out_type=tf.int64)[0] * num_classes
    scores = tf.math.unsorted_segment_sum(weights, segments, num_segments)
    return tf.reshape(scores, [-1, num_classes])  # [b, C]


def knn_scores(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    batch_size: int = 1024,
) -> np.ndarray:
    """Temperature-weighted kNN class scores (Wu et al. 2018, Eq. 7).

    Each feature is L2-normalised (a zero vector stays zero, similarity 0).
    For each test row the k training rows of highest cosine similarity s_i
    vote for their labels with weight exp(s_i / temperature); a class's score
    is the sum of its votes (0 if no neighbour has that class). If k exceeds
    the number of training rows n, all n rows vote. Ties in similarity are
    broken as tf.math.top_k does: the lower training index comes first.
    Test rows are processed batch_size at a time, so memory is
    O(batch_size * n), not O(m * n).

    Args:
        train_features: [n, d] float training features.
        train_labels: [n] int labels in [0, num_classes).
        test_features: [m, d] float test features.
        num_classes: number of classes C >= 1.
        k: neighbours per test row, >= 1 (peers: 200).
        temperature: vote temperature tau >= 0.02 (peers: 0.1, 0.07).
        batch_size: test rows per similarity matmul, >= 1.

    Returns:
        [m, C] float32 class scores, all >= 0.

    Raises:
        ValueError: on mismatched shapes, empty sets, labels out of range,
            k < 1, temperature < 0.02 or batch_size < 1.
    """
    train_features = np.asarray(train_features, np.float32)
    test_features = np.asarray(test_features, np.float32)
    labels = np.asarray(train_labels, np.int64)
    _check_features(train_features, labels, test_features, num_classes)
    _check_hyperparameters(k, temperature, batch_size)
    train_unit = tf.math.l2_normalize(tf.constant(train_features), axis=1)
    labels_tensor = tf.constant(labels)
    used_k = min(k, len(labels))
    parts = []
    for start in range(0, len(test_features), batch_size):
        test_chunk = tf.constant(test_features[start : start + batch_size])
        test_unit = tf.math.l2_normalize(test_chunk, axis=1)
        similarities = tf.matmul(test_unit, train_unit, transpose_b=True)
        parts.append(
            _vote(similarities, labels_tensor, num_classes, used_k, temperature)
        )
    return tf.concat(parts, axis=0).numpy()


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    batch_size: int = 1024,
) -> dict[str, float | int]:
    """Top-1 and top-5 accuracy of the weighted kNN classifier.

    The prediction is the class of highest score. Unlike an argmax, a tie
    between the label's score and another class counts as a miss (as in
    linear.top_k_accuracy); this matters only for classes without votes
    (score 0) in top-5, where peers' argsort picks arbitrary zero classes.

    Args:
        train_features, train_labels, test_features, num_classes, k,
            temperature, batch_size: as for knn_scores.
        test_labels: [m] int labels of the test rows.

    Returns:
        {"top_1", "top_5" (over min(5, C) classes, so 1.0 when C <= 5),
        "k" (neighbours used: min(k, n)), "temperature", "num_train",
        "num_test"}.

    Raises:
        ValueError: as knn_scores, or if test_labels is not [m].
    """
    scores = knn_scores(
        train_features,
        train_labels,
        test_features,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        batch_size=batch_size,
    )
    test_labels = np.asarray(test_labels, np.int64)
    if test_labels.shape != (scores.shape[0],):
        raise ValueError(
            f"test_labels has shape {test_labels.shape}; it must be "
            f"[{scores.shape[0]}], one label per test_features row."
        )
    if test_labels.min() < 0 or test_labels.max() >= num_classes:
        raise ValueError(
            f"test_labels span [{test_labels.min()}, {test_labels.max()}] "
            f"with num_classes={num_classes}; labels must lie in "
            "[0, num_classes)."
        )
    num_train = int(np.asarray(train_labels).shape[0])
    return {
        "top_1": linear.top_k_accuracy(scores, test_labels, 1),
        "top_5": linear.top_k_accuracy(
            scores, test_labels, min(5, num_classes)
        ),
        "k": min(k, num_train),
        "temperature": float(temperature),
        "num_train": num_train,
        "num_test": int(test_labels.shape[0]),
    }


def _first_examples(
    dataset: Iterable[Mapping[str, Any]], max_examples: int
) -> Iterator[dict[str, Any]]:
    """Yields batches until max_examples rows, slicing the last batch."""
    remaining = max_examples
    for batch in dataset:
        if not isinstance(batch, Mapping) or "image" not in batch:
            yield batch  # extract_features reports the bad layout.
            return
        yield {key: value[:remaining] for key, value in batch.items()}
        remaining -= int(batch["image"].shape[0])
        if remaining <= 0:
            return  # Do not pull (and decode) another batch.


def encoder_features(
    model: keras.Model,
    dataset: Iterable[Mapping[str, Any]],
    *,
    max_examples: int = 0,
    feature_key: str = "final_avg_pool",
) -> tuple[np.ndarray, np.ndarray]:
    """Encoder features of a batched eval dataset, BN in inference mode.

    A thin wrapper over extract.extract_features, which calls the model
    with training=False inside a tf.function.

    Args:
        model: a keras model returning a dict with feature_key (SimCLRModel).
        dataset: yields {"image": [b, H, W, C] float32 in [0, 1], "label":
            [b] int} (eval preprocessing, no augmentation).
        max_examples: keep only the first max_examples rows in dataset order
            (0 = all); pass a shuffled dataset for a random subset.
        feature_key: model output to use; final_avg_pool is the encoder's
            pooled output (proj_head_input is the same tensor).

    Returns:
        (features [n, F] float32, labels [n] int64).

    Raises:
        ValueError: if max_examples < 0, the dataset is empty or not batched
            dicts, or feature_key is not an output name.
    """
    if max_examples < 0:
        raise ValueError(
            f"max_examples={max_examples} must be >= 0 (0 means all)."
        )
    if max_examples:
        dataset = _first_examples(dataset, max_examples)
    return extract.extract_features(model, dataset, feature_key=feature_key)


def knn_eval(
    model: keras.Model,
    train_dataset: Iterable[Mapping[str, Any]],
    test_dataset: Iterable[Mapping[str, Any]],
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    max_train_examples: int = 0,
    batch_size: int = 1024,
    feature_key: str = "final_avg_pool",
) -> dict[str, float | int]:
    """kNN accuracy of a model's frozen features: train set votes for test.

    Args:
        model: as for encoder_features.
        train_dataset: batched eval dataset of the training split (the
            memory bank).
        test_dataset: batched eval dataset of the test split.
        num_classes: number of classes C.
        k: neighbours per test example (peers: 200).
        temperature: vote temperature (peers: 0.1).
        max_train_examples: cap on training examples (0 = all), e.g. for a
            cheap monitor during training.
        batch_size: test rows per similarity matmul.
        feature_key: model output to use.

    Returns:
        The knn_accuracy dict (top_1, top_5, k, temperature, num_train,
        num_test).

    Raises:
        ValueError: as encoder_features and knn_accuracy.
    """
    _check_hyperparameters(k, temperature, batch_size)
    train_features, train_labels = encoder_features(
        model,
        train_dataset,
        max_examples=max_train_examples,
        feature_key=feature_key,
    )
    test_features, test_labels = encoder_features(
        model, test_dataset, feature_key=feature_key
    )
    return knn_accuracy(
        train_features,
        train_labels,
        test_features,
        test_labels,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        batch_size=batch_size,
    )
