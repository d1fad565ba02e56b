"""Tests for simclr_tf.evaluate: top-k, the linear protocol, frozen features."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.evaluation import extract, linear


def _blobs(rng, num_per_class, num_classes, dim, separation):
    """Gaussian blobs (unit std) centred at separation * e_class."""
    labels = np.repeat(np.arange(num_classes), num_per_class)
    centres = separation * np.eye(num_classes, dim)
    features = centres[labels] + rng.normal(size=(labels.size, dim))
    return features.astype(np.float32), labels


def _image_dataset(images, labels, batch_size):
    return tf.data.Dataset.from_tensor_slices(
        {"image": images, "label": labels}
    ).batch(batch_size)


def test_top_k_accuracy_hand_computed_with_ties():
    logits = np.array(
        [
            [0.1, 0.7, 0.2],  # label 1 is the best: top-1 hit.
            [0.5, 0.5, 0.0],  # label 0 tied with class 1: top-1 miss.
            [0.3, 0.3, 0.3],  # all tied: miss for k=1 and k=2.
            [0.9, 0.0, 0.4],  # label 2 is second: top-1 miss, top-2 hit.
        ]
    )
    labels = np.array([1, 0, 2, 2])
    # Ties count against: rivals with logit >= the label's are 0, 1, 2, 1.
    assert linear.top_k_accuracy(logits, labels, 1) == pytest.approx(1 / 4)
    assert linear.top_k_accuracy(logits, labels, 2) == pytest.approx(3 / 4)
    assert linear.top_k_accuracy(logits, labels, 3) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_accuracy_matches_numpy_argsort(k):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(500, 10))  # continuous: no ties.
    labels = rng.integers(0, 10, size=500)
    top_classes = np.argsort(-logits, axis=1)[:, :k]
    expected = np.mean(
        [label in row for label, row in zip(labels, top_classes, strict=True)]
    )
    assert linear.top_k_accuracy(logits, labels, k) == expected


def test_top_k_accuracy_counts_nan_logits_as_misses():
    logits = np.array([[np.nan, 0.0, 1.0], [0.0, np.nan, 1.0]])
    # Row 0: the label's logit is NaN; row 1: a NaN rival cannot be ranked
    # below the label, so it counts against it: both rows miss at k=1.
    assert linear.top_k_accuracy(logits, np.array([0, 2]), 1) == 0.0


def test_top_k_accuracy_rejects_k_below_one():
    with pytest.raises(ValueError, match="k=0"):
        linear.top_k_accuracy(np.zeros((2, 3)), np.zeros(2, np.int64), 0)


def test_train_linear_classifier_matches_numpy_nesterov_reference():
    # Full batch makes the order irrelevant, so a plain numpy loop of the
    # App. B.6 recipe (softmax CE, Nesterov, lr 0.1 B/256, cosine) is exact.
    rng = np.random.default_rng(2)
    features, labels = _blobs(rng, 16, 3, 5, separation=1.0)
    num_examples, epochs, momentum = len(labels), 6, 0.9
    base_rate = 0.1 * num_examples / 256
    kernel, bias = np.zeros((5, 3)), np.zeros(3)
    kernel_velocity, bias_velocity = np.zeros_like(kernel), np.zeros_like(bias)
    one_hot = np.eye(3)[labels]
    for step in range(epochs):
        rate = base_rate * 0.5 * (1 + math.cos(math.pi * step / epochs))
        logits = features @ kernel + bias
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        kernel_grad = features.T @ (probs - one_hot) / num_examples
        bias_grad = (probs - one_hot).mean(axis=0)
        kernel_velocity = momentum * kernel_velocity - rate * kernel_grad
        bias_velocity = momentum * bias_velocity - rate * bias_grad
        kernel += momentum * kernel_velocity - rate * kernel_grad
        bias += momentum * bias_velocity - rate * bias_grad
    classifier = linear.train_linear_classifier(
        features,
        labels,
        3,
        epochs=epochs,
        batch_size=num_examples,
        standardize=False,
    )
    # float32 vs float64 over 6 small steps: rounding stays far below 1e-5.
    np.testing.assert_allclose(classifier.kernel, kernel, atol=1e-5)
    np.testing.assert_allclose(classifier.bias, bias, atol=1e-5)


def test_train_linear_classifier_separable_blobs_reach_full_accuracy():
    rng = np.random.default_rng(3)
    # Centres 12 apart in 16 dims with unit noise: the margin is ~8 sigma, so
    # every test point is separable and top-1 must be exactly 1.
    train_x, train_y = _blobs(rng, 100, 4, 16, separation=12.0)
    test_x, test_y = _blobs(rng, 100, 4, 16, separation=12.0)
    result = linear.linear_eval(train_x, train_y, test_x, test_y, 4, epochs=5)
    assert result["top_1"] == 1.0
    assert result["num_train"] == 400 and result["num_test"] == 400


def _noisy_sign_set(rng, num_examples, dim, flip_fraction):
    """Label = [x_0 > 0] with exactly flip_fraction of labels flipped."""
    features = rng.normal(size=(num_examples, dim)).astype(np.float32)
    labels = (features[:, 0] > 0).astype(np.int64)
    flipped = rng.permutation(num_examples)[: int(flip_fraction * num_examples)]
    labels[flipped] = 1 - labels[flipped]
    return features, labels


def test_train_linear_classifier_reaches_bayes_accuracy_with_label_noise():
    rng = np.random.default_rng(4)
    flip_fraction = 0.2
    train_x, train_y = _noisy_sign_set(rng, 4000, 8, flip_fraction)
    test_x, test_y = _noisy_sign_set(rng, 4000, 8, flip_fraction)
    result = linear.linear_eval(
        train_x, train_y, test_x, test_y, 2, epochs=10, batch_size=128
    )
    # Flips are independent of x, so the best classifier (sign of x_0) scores
    # exactly 1 - 0.2 = 0.8 on this test set. A boundary tilted by angle t
    # loses (1 - 2*0.2) * t / pi; 4000 samples fit t to ~0.05 rad (~0.6%
    # loss), and chance on 4000 test points is ~0.6% std: allow 0.03.
    assert abs(result["top_1"] - (1 - flip_fraction)) < 0.03


def test_train_linear_classifier_standardize_invariant_to_affine_rescale():
    rng = np.random.default_rng(5)
    train_x, train_y = _blobs(rng, 50, 3, 8, separation=2.0)
    test_x, _ = _blobs(rng, 20, 3, 8, separation=2.0)
    scale = rng.uniform(0.2, 5.0, size=8).astype(np.float32)
    shift = rng.uniform(-3.0, 3.0, size=8).astype(np.float32)
    kwargs = {"epochs": 5, "batch_size": 32, "standardize": True}
    plain = linear.train_linear_classifier(train_x, train_y, 3, **kwargs)
    rescaled = linear.train_linear_classifier(
        train_x * scale + shift, train_y, 3, **kwargs
    )
    plain_logits = plain.predict_logits(test_x)
    rescaled_logits = rescaled.predict_logits(test_x * scale + shift)
    # Standardised inputs agree to float32 rounding (~1e-6 relative), which
    # a convex SGD run of ~50 steps keeps far below 1e-3 in the logits.
    np.testing.assert_allclose(rescaled_logits, plain_logits, atol=1e-3)
    np.testing.assert_array_equal(
        rescaled_logits.argmax(axis=1), plain_logits.argmax(axis=1)
    )


def _encoder_with_batch_norm():
    images = keras.Input((6, 6, 1))
    hidden = keras.layers.Conv2D(4, 3, padding="same")(images)
    hidden = keras.layers.BatchNormalization(momentum=0.5)(hidden)
    hidden = keras.layers.ReLU()(hidden)
    pooled = keras.layers.GlobalAveragePooling2D()(hidden)
    return keras.Model(
        images, {"final_avg_pool": pooled, "block_group1": hidden}
    )


def test_extract_features_leaves_encoder_and_batch_norm_statistics_frozen():
    model = _encoder_with_batch_norm()
    rng = np.random.default_rng(6)
    images = rng.uniform(size=(10, 6, 6, 1)).astype(np.float32)
    before = [weight.numpy() for weight in model.weights]
    extract.extract_features(
        lambda batch: model(batch, training=False),
        _image_dataset(images, np.arange(10), 4),
    )
    extract.extract_features(model, _image_dataset(images, np.arange(10), 4))
    # weights include the BN moving mean and variance; inputs far from the
    # initial (0, 1) statistics would move them under momentum 0.5.
    assert len(before) == len(model.weights) and len(before) >= 6
    for old, new in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(new.numpy(), old)


def test_extract_features_keeps_every_row_including_short_last_batch():
    model = _encoder_with_batch_norm()
    rng = np.random.default_rng(7)
    images = rng.uniform(size=(10, 6, 6, 1)).astype(np.float32)
    labels = rng.integers(0, 3, size=10)
    # Batches of 4, 4, 2: the short batch must not be dropped or padded.
    features, got_labels = extract.extract_features(
        model, _image_dataset(images, labels, 4)
    )
    expected = model(images, training=False)["final_avg_pool"]
    assert features.shape == (10, 4) and features.dtype == np.float32
    # Same float32 math, batched differently: rounding only.
    np.testing.assert_allclose(features, np.array(expected), atol=1e-6)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_labels.dtype == np.int64


def test_extract_features_rejects_unknown_feature_key():
    model = _encoder_with_batch_norm()
    dataset = _image_dataset(np.zeros((2, 6, 6, 1), np.float32), [0, 1], 2)
    with pytest.raises(ValueError, match="proj_head_output"):
        extract.extract_features(model, dataset, feature_key="proj_head_output")


def test_pixel_features_flattens_images_row_major():
    rng = np.random.default_rng(8)
    images = rng.uniform(size=(7, 3, 4, 2)).astype(np.float32)
    labels = np.arange(7)
    features, got_labels = extract.pixel_features(
        _image_dataset(images, labels, 3)
    )
    assert features.shape == (7, 3 * 4 * 2)
    np.testing.assert_array_equal(features[2], images[2].ravel())
    np.testing.assert_array_equal(features, images.reshape(7, -1))
    np.testing.assert_array_equal(got_labels, labels)


def test_recalibrate_batch_norm_sets_population_statistics_of_each_input():
    from simclr_tf.models import batch_norm

    images_in = keras.Input((6, 6, 1))
    conv1 = keras.layers.Conv2D(4, 3, padding="same")
    bn1 = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3)
    conv2 = keras.layers.Conv2D(3, 3, padding="same")
    bn2 = batch_norm.FusedBatchNormalization(momentum=0.8, epsilon=1e-3)
    hidden = bn2(conv2(keras.layers.ReLU()(bn1(conv1(images_in)))))
    model = keras.Model(images_in, hidden)
    rng = np.random.default_rng(11)
    # Inputs far from the initial (0, 1) statistics.
    images = (5.0 + 3.0 * rng.normal(size=(10, 6, 6, 1))).astype(np.float32)
    kernels = [conv1.kernel.numpy(), conv2.kernel.numpy()]
    count = extract.recalibrate_batch_norm(
        model, _image_dataset(images, np.arange(10), 4), max_examples=9
    )
    assert count == 9
    # numpy reference: batches of 4, 4 and the first image of the third;
    # BN1 normalises each batch with that batch's own statistics.
    first, second = [], []
    for start, stop in ((0, 4), (4, 8), (8, 9)):
        x1 = conv1(images[start:stop]).numpy().astype(np.float64)
        first.append(x1)
        mean, var = x1.mean(axis=(0, 1, 2)), x1.var(axis=(0, 1, 2))
        normalised = (x1 - mean) / np.sqrt(var + 1e-3)
        normalised = normalised * bn1.gamma.numpy() + bn1.beta.numpy()
        second.append(
            conv2(np.maximum(normalised, 0).astype(np.float32)).numpy()
        )
    for layer, inputs in ((bn1, first), (bn2, second)):
        pooled = np.concatenate(inputs).astype(np.float64)
        np.testing.assert_allclose(
            layer.moving_mean.numpy(),
            pooled.mean(axis=(0, 1, 2)),
            rtol=1e-4,
            atol=1e-5,
        )
        np.testing.assert_allclose(
            layer.moving_variance.numpy(),
            pooled.var(axis=(0, 1, 2)),
            rtol=1e-4,
            atol=1e-5,
        )
    # Nothing else moves, and the layers keep their momentum.
    np.testing.assert_array_equal(conv1.kernel.numpy(), kernels[0])
    np.testing.assert_array_equal(conv2.kernel.numpy(), kernels[1])
    assert (bn1.momentum, bn2.momentum) == (0.9, 0.8)
