"""Features of a batched dataset for the evaluations: a frozen encoder's
outputs (BN in inference mode), or the raw pixels of the baseline; and the
BN recalibration that makes a randomly initialised encoder a fair baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf


def _as_encode_fn(encode_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Forces inference mode when encode_fn is a Keras layer or model."""
    if isinstance(encode_fn, keras.Layer):
        model = encode_fn
        return lambda images: model(images, training=False)
    return encode_fn


def _select_features(outputs: object, feature_key: str) -> tf.Tensor:
    """Picks feature_key from a dict output and flattens to [b, -1] float32."""
    if isinstance(outputs, Mapping):
        if feature_key not in outputs:
            raise ValueError(
                f"feature_key={feature_key!r} is not among the encoder "
                f"outputs {sorted(outputs)}; pass one of those names."
            )
        outputs = outputs[feature_key]
    outputs = tf.convert_to_tensor(outputs)
    return tf.cast(tf.reshape(outputs, [tf.shape(outputs)[0], -1]), tf.float32)


def _check_batch(batch: object) -> tuple[Any, Any]:
    """Returns (images, labels) of one batch dict, validating the layout."""
    if not isinstance(batch, Mapping) or "image" not in batch:
        raise ValueError(
            "dataset must yield dicts with 'image' [b, H, W, C] and 'label' "
            f"[b]; got {type(batch).__name__}. Batch the dataset first."
        )
    images, labels = batch["image"], batch.get("label")
    if len(images.shape) != 4 or labels is None or len(labels.shape) != 1:
        raise ValueError(
            f"batch 'image' has shape {tuple(images.shape)} and 'label' "
            f"{None if labels is None else tuple(labels.shape)}; expected "
            "[b, H, W, C] and [b]. Batch the dataset (e.g. .batch(256))."
        )
    return images, labels


def _collect(
    dataset: Iterable[Mapping[str, Any]], to_features: Callable[..., Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Maps every batch through to_features and concatenates the rows."""
    feature_parts, label_parts = [], []
    for batch in dataset:
        images, labels = _check_batch(batch)
        feature_parts.append(np.asarray(to_features(images), np.float32))
        label_parts.append(np.asarray(labels, np.int64))
    if not feature_parts:
        raise ValueError("dataset is empty; it must yield at least one batch.")
    return np.concatenate(feature_parts), np.concatenate(label_parts)


def extract_features(
    encode_fn: Callable[..., Any],
    dataset: Iterable[Mapping[str, Any]],
    *,
    feature_key: str = "final_avg_pool",
) -> tuple[np.ndarray, np.ndarray]:
    """Runs a frozen encoder over a batched dataset once.

    Args:
        encode_fn: maps [b, H, W, C] float32 images in [0, 1] to a dict of
            tensors or to one tensor. A keras.Layer / keras.Model is called
            with training=False (BN uses its moving statistics and is not
            updated); a plain callable must do so itself.
        dataset: yields dicts {"image": [b, H, W, C] float32 in [0, 1],
            "label": [b] int}; the last batch may be shorter.
        feature_key: which output to use when encode_fn returns a dict.
            Outputs of rank > 2 are flattened to [b, -1].

    Returns:
        (features [n, F] float32, labels [n] int64), n = examples in dataset.

    Raises:
        ValueError: if the dataset is empty or not batched dicts, or
            feature_key is not an output name.
    """
    encode = tf.function(
        _as_encode_fn(encode_fn), reduce_retracing=True, autograph=False
    )

    def to_features(images: tf.Tensor) -> tf.Tensor:
        return _select_features(encode(images), feature_key)

    return _collect(dataset, to_features)


def pixel_features(
    dataset: Iterable[Mapping[str, Any]],
) -> tuple[np.ndarray, np.ndarray]:
    """Raw-pixel baseline: each image flattened in row-major (H, W, C) order.

    Args:
        dataset: as for extract_features.

    Returns:
        (features [n, H*W*C] float32, labels [n] int64).

    Raises:
        ValueError: if the dataset is empty or not batched dicts.
    """

    def to_features(images: tf.Tensor | np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        return images.reshape(images.shape[0], -1)

    return _collect(dataset, to_features)


def recalibrate_batch_norm(
    model: keras.Model,
    dataset: Iterable[Mapping[str, Any]],
    max_examples: int,
) -> int:
    """Sets every BN layer's moving statistics to its inputs' population ones.

    Runs the model in training mode (each BN normalises with its batch's
    statistics, as during pretraining) over the first `max_examples` images
    of `dataset`, and sets each layer's moving mean and variance to the
    mean and (biased) variance of everything the layer saw: the per-batch
    means and variances pooled exactly, weighted by batch size. Only the
    moving statistics change; no other weight is touched. A model fresh
    from its initialiser otherwise evaluates with moving statistics of 0
    and 1, which says nothing about its architecture.

    Args:
      model: a Keras model whose BatchNormalization layers are recalibrated.
      dataset: batches {"image": [b, H, W, C] float32 in [0, 1], ...}.
      max_examples: images used (the last batch is cut to fit).

    Returns:
      The number of images the statistics were computed on.

    Raises:
      ValueError: if the dataset yields no image.
    """
    layers = [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    momenta = [layer.momentum for layer in layers]
    # Momentum 0: after a batch each moving statistic is that batch's own.
    for layer in layers:
        layer.momentum = 0.0
    forward = tf.function(
        lambda images: model(images, training=True),
        reduce_retracing=True,
        autograph=False,
    )
    sums = [(0.0, 0.0) for _ in layers]
    seen = 0
    try:
        for batch in dataset:
            images, _ = _check_batch(batch)
            images = images[: max_examples - seen]
            count = int(images.shape[0])
            forward(images)
            for index, layer in enumerate(layers):
                mean = np.asarray(layer.moving_mean, np.float64)
                variance = np.asarray(layer.moving_variance, np.float64)
                total_mean, total_square = sums[index]
                sums[index] = (
                    total_mean + count * mean,
                    total_square + count * (variance + mean**2),
                )
            seen += count
            if seen >= max_examples:
                break
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    if not seen:
        raise ValueError("dataset is empty; it must yield at least one batch.")
    for layer, (total_mean, total_square) in zip(layers, sums, strict=True):
        mean = total_mean / seen
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(
            np.maximum(total_square / seen - mean**2, 0.0).astype(np.float32)
        )
    return seen
