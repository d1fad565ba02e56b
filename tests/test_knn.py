"""Tests for simclr_tf.knn: weighted kNN votes, accuracy, encoder features."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.evaluation import knn
from simclr_tf.models import simclr


def _random_set(seed, num_train=50, num_test=20, dim=8, num_classes=4):
    rng = np.random.default_rng(seed)
    train = rng.normal(size=(num_train, dim)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=num_train)
    test = rng.normal(size=(num_test, dim)).astype(np.float32)
    return train, labels, test


def _numpy_knn_scores(train, labels, test, num_classes, k, temperature):
    """Wu et al. 2018 Eq. 7 as plain loops, in float64."""
    scores = np.zeros((len(test), num_classes))
    for row, query in enumerate(test):
        similarities = []
        for example in train:
            similarities.append(
                np.dot(query, example)
                / (np.linalg.norm(query) * np.linalg.norm(example))
            )
        # Stable sort: among equal similarities the lower index comes first.
        nearest = np.argsort(-np.array(similarities), kind="stable")[:k]
        for index in nearest:
            scores[row, labels[index]] += math.exp(
                similarities[index] / temperature
            )
    return scores


def test_knn_scores_match_numpy_double_loop():
    train, labels, test = _random_set(0)
    scores = knn.knn_scores(
        train, labels, test, num_classes=4, k=7, temperature=0.1
    )
    expected = _numpy_knn_scores(train, labels, test, 4, 7, 0.1)
    assert scores.shape == (20, 4) and scores.dtype == np.float32
    # float32 cosines are off by ~1e-7; exp(s / 0.1) amplifies that 10x, so
    # a relative error of ~1e-6 per vote; 1e-5 leaves room for the sums.
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def _circle_points(degrees):
    radians = np.deg2rad(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


@pytest.mark.parametrize(
    ("temperature", "winner"),
    [(0.1, 0), (1.0, 1)],
)
def test_knn_scores_hand_computed_unit_circle(temperature, winner):
    # Train points at 0, 60, -60 and 180 degrees with labels 0, 1, 1, 0; the
    # radii differ to check normalisation. The query at 0 degrees has
    # similarities 1, 0.5, 0.5, -1, so k=3 takes the first three.
    train = _circle_points([0, 60, -60, 180]) * np.array([[2], [1], [3], [1]])
    labels = np.array([0, 1, 1, 0])
    query = _circle_points([0]) * 5
    scores = knn.knn_scores(
        train, labels, query, num_classes=2, k=3, temperature=temperature
    )
    expected = [math.exp(1 / temperature), 2 * math.exp(0.5 / temperature)]
    # One vote at similarity 1 against two at 0.5: at tau=0.1 e^10 beats
    # 2 e^5 (the weighting overrules the majority), at tau=1 e < 2 e^0.5.
    # float32 cosines of exact angles: ~1e-7 relative, amplified by 1 / tau.
    np.testing.assert_allclose(scores[0], expected, rtol=1e-5)
    assert scores[0].argmax() == winner


def test_knn_scores_k_above_train_size_uses_every_train_row():
    train, labels, test = _random_set(1, num_train=10)
    scores = knn.knn_scores(
        train, labels, test, num_classes=4, k=1000, temperature=0.5
    )
    expected = _numpy_knn_scores(train, labels, test, 4, 10, 0.5)
    # Same float32 argument as the double-loop test, with a smaller 1 / tau.
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    result = knn.knn_accuracy(
        train, labels, test, np.zeros(20, np.int64), num_classes=4, k=1000
    )
    assert result["k"] == 10 and result["num_train"] == 10


def test_knn_scores_chunking_matches_one_chunk():
    train, labels, test = _random_set(2)
    kwargs = {"num_classes": 4, "k": 7, "temperature": 0.1}
    chunked = knn.knn_scores(train, labels, test, batch_size=3, **kwargs)
    whole = knn.knn_scores(train, labels, test, batch_size=1024, **kwargs)
    # Each row's dot products are the same math; a different matmul blocking
    # may round differently (~1e-7), amplified 10x by 1 / tau.
    np.testing.assert_allclose(chunked, whole, rtol=1e-5)


def test_knn_scores_invariant_to_feature_scale():
    train, labels, test = _random_set(3)
    kwargs = {"num_classes": 4, "k": 7, "temperature": 0.1}
    plain = knn.knn_scores(train, labels, test, **kwargs)
    scaled_train = train.copy()
    scaled_train[5] *= 10.0
    scaled_test = test * 0.01
    scaled = knn.knn_scores(scaled_train, labels, scaled_test, **kwargs)
    # Normalisation of a scaled row rounds differently by ~1e-7 relative.
    np.testing.assert_allclose(scaled, plain, rtol=1e-5)


def test_knn_accuracy_perfectly_separated_classes_score_one():
    rng = np.random.default_rng(4)
    num_classes, dim = 4, 6

    def blobs(per_class):
        labels = np.repeat(np.arange(num_classes), per_class)
        # Directions e_c plus noise of norm ~0.1 * sqrt(6) = 0.25: every
        # point is within ~15 degrees of its axis and 90 from the others'.
        features = np.eye(num_classes, dim)[labels]
        return features + 0.1 * rng.normal(size=features.shape), labels

    train_x, train_y = blobs(30)
    test_x, test_y = blobs(10)
    result = knn.knn_accuracy(
        train_x, train_y, test_x, test_y, num_classes=num_classes, k=20
    )
    assert result["top_1"] == 1.0 and result["top_5"] == 1.0
    assert result["num_test"] == 40 and result["temperature"] == 0.1


def test_knn_accuracy_top_5_matches_numpy_with_ten_classes():
    train, labels, test = _random_set(
        5, num_train=200, num_test=60, dim=4, num_classes=10
    )
    test_labels = np.random.default_rng(6).integers(0, 10, size=60)
    result = knn.knn_accuracy(
        train, labels, test, test_labels, num_classes=10, k=200
    )
    # k = n: every class gets votes, so scores have no ties (continuous
    # features) and argsort of the reference scores ranks them exactly.
    expected_scores = _numpy_knn_scores(train, labels, test, 10, 200, 0.1)
    ranked = np.argsort(-expected_scores, axis=1)
    top_1 = np.mean(ranked[:, 0] == test_labels)
    top_5 = np.mean(
        [y in row[:5] for y, row in zip(test_labels, ranked, strict=True)]
    )
    assert result["top_1"] == top_1 and result["top_5"] == top_5
    assert result["top_5"] < 1.0


def test_knn_accuracy_top_5_with_three_classes_is_one():
    train, labels, test = _random_set(7, num_classes=3)
    test_labels = np.random.default_rng(8).integers(0, 3, size=20)
    result = knn.knn_accuracy(
        train, labels, test, test_labels, num_classes=3, k=5
    )
    # Random features: top-1 is near chance, but with 3 classes the top
    # min(5, 3) classes are all of them.
    assert result["top_1"] < 1.0 and result["top_5"] == 1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"test": np.zeros((3, 5), np.float32)}, "test_features d=5"),
        ({"labels": np.zeros(4, np.int64)}, "train_labels has shape"),
        ({"labels": np.full(6, 4)}, "num_classes=4"),
        ({"labels": np.full(6, -1)}, "num_classes=4"),
        ({"train": np.zeros((6, 8, 1), np.float32)}, "reshape"),
        ({"k": 0}, "k=0"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"temperature": -0.1}, "temperature=-0.1"),
        ({"batch_size": 0}, "batch_size=0"),
    ],
)
def test_knn_scores_rejects_bad_inputs(change, message):
    arguments = {
        "train": np.ones((6, 8), np.float32),
        "labels": np.zeros(6, np.int64),
        "test": np.ones((3, 8), np.float32),
        "k": 3,
        "temperature": 0.1,
        "batch_size": 2,
    }
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        knn.knn_scores(
            arguments["train"],
            arguments["labels"],
            arguments["test"],
            num_classes=4,
            k=arguments["k"],
            temperature=arguments["temperature"],
            batch_size=arguments["batch_size"],
        )


def test_knn_accuracy_rejects_test_labels_out_of_range():
    train, labels, test = _random_set(9)
    with pytest.raises(ValueError, match="test_labels span"):
        knn.knn_accuracy(
            train, labels, test, np.full(20, 4), num_classes=4, k=3
        )


def _image_dataset(images, labels, batch_size):
    return tf.data.Dataset.from_tensor_slices(
        {"image": images, "label": labels}
    ).batch(batch_size)


def test_encoder_features_equal_simclr_model_inference_outputs():
    model = simclr.SimCLRModel(
        resnet_depth=18, width_multiplier=0.125, cifar_stem=True
    )
    rng = np.random.default_rng(10)
    images = rng.uniform(size=(6, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=6)
    features, got_labels = knn.encoder_features(
        model, _image_dataset(images, labels, 4)
    )
    expected = model(images, training=False)["final_avg_pool"]
    # Same float32 network, batched 4 + 2 instead of 6: rounding only.
    np.testing.assert_allclose(features, np.asarray(expected), atol=1e-5)
    np.testing.assert_array_equal(got_labels, labels)


def _pixel_model(side):
    """A model whose 'final_avg_pool' is the flattened image."""
    images = keras.Input((side, side, 1))
    return keras.Model(
        images, {"final_avg_pool": keras.layers.Flatten()(images)}
    )


def test_encoder_features_max_examples_keeps_first_rows():
    images = np.random.default_rng(11).uniform(size=(10, 3, 3, 1))
    images = images.astype(np.float32)
    features, labels = knn.encoder_features(
        _pixel_model(3),
        _image_dataset(images, np.arange(10), 4).repeat(),
        max_examples=5,
    )
    # Batches of 4 from an endless dataset: the cap must slice the second
    # batch and stop pulling batches.
    np.testing.assert_array_equal(labels, np.arange(5))
    np.testing.assert_array_equal(features, images[:5].reshape(5, -1))


def test_knn_eval_train_set_as_test_set_with_k_one_scores_one():
    rng = np.random.default_rng(12)
    images = rng.uniform(size=(12, 3, 3, 1)).astype(np.float32)
    labels = rng.integers(0, 3, size=12)
    dataset = _image_dataset(images, labels, 5)
    # Distinct random images: each image's nearest neighbour is itself
    # (cosine 1, others well below), so the vote is its own label.
    result = knn.knn_eval(_pixel_model(3), dataset, dataset, num_classes=3, k=1)
    assert result["top_1"] == 1.0
    assert result["num_train"] == 12 and result["num_test"] == 12
    capped = knn.knn_eval(
        _pixel_model(3),
        dataset,
        dataset,
        num_classes=3,
        k=1,
        max_train_examples=7,
    )
    assert capped["num_train"] == 7 and capped["num_test"] == 12
