"""Tests for simclr_tf.models.batch_norm against the BN formulas in numpy."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.models import batch_norm

EPSILON = 1e-5
MOMENTUM = 0.9


def _layer(**kwargs) -> batch_norm.FusedBatchNormalization:
    return batch_norm.FusedBatchNormalization(
        momentum=MOMENTUM, epsilon=EPSILON, **kwargs
    )


def _reference(x, gamma, beta, dy):
    """Training-mode BN over all axes but the last, and its gradients."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    variance = x.var(axes)  # biased, as Keras keeps it
    inv = 1.0 / np.sqrt(variance + EPSILON)
    xhat = (x - mean) * inv
    y = gamma * xhat + beta
    dbeta = dy.sum(axes)
    dgamma = (dy * xhat).sum(axes)
    dxhat = dy * gamma
    dx = inv * (dxhat - dxhat.mean(axes) - xhat * (dxhat * xhat).mean(axes))
    return y, mean, variance, dx, dgamma, dbeta


@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (16, 7)])
def test_training_outputs_gradients_and_moving_stats_match_formulas(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32)
    beta = rng.normal(size=shape[-1]).astype(np.float32)
    layer = _layer()
    layer.build(shape)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    inputs = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        y = layer(inputs, training=True)
        objective = tf.reduce_sum(y * dy)
    dx, dgamma, dbeta = tape.gradient(
        objective, [inputs, layer.gamma, layer.beta]
    )
    ref_y, mean, variance, ref_dx, ref_dgamma, ref_dbeta = _reference(
        x, gamma, beta, dy
    )
    # float32 sums over <= 120 values: a few ulps of values of size ~10.
    np.testing.assert_allclose(y.numpy(), ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx.numpy(), ref_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dgamma.numpy(), ref_dgamma, rtol=1e-4)
    np.testing.assert_allclose(dbeta.numpy(), ref_dbeta, rtol=1e-5)
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), (1 - MOMENTUM) * mean, rtol=1e-5
    )
    np.testing.assert_allclose(
        layer.moving_variance.numpy(),
        MOMENTUM + (1 - MOMENTUM) * variance,
        rtol=1e-5,
    )


def test_inference_uses_moving_statistics():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
    layer = _layer(center=False)
    layer.build(x.shape)
    layer.moving_mean.assign([1.0, -2.0])
    layer.moving_variance.assign([4.0, 0.25])
    layer.gamma.assign([2.0, 3.0])
    y = layer(x, training=False).numpy()
    expected = (
        np.array([2.0, 3.0])
        * (x - np.array([1.0, -2.0]))
        / np.sqrt(np.array([4.0, 0.25]) + EPSILON)
    )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), [1.0, -2.0])


def test_bfloat16_policy_keeps_bfloat16_activations_close_to_float32():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 4, 4, 6)).astype(np.float32)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    layer = _layer()
    y = layer(tf.cast(x, tf.bfloat16), training=True)
    assert y.dtype == tf.bfloat16
    assert layer.moving_mean.dtype == "float32"
    expected = _reference(x, np.ones(6), np.zeros(6), np.zeros_like(x))[0]
    # bfloat16 has 8 significant bits: |xhat| <= ~4, error <= 2^-8 * 4.
    np.testing.assert_allclose(
        y.numpy().astype(np.float32), expected, atol=4 * 2.0**-8
    )


def test_synchronised_layer_on_several_replicas_uses_global_statistics():
    """With 2 replicas and synchronized=True the layer must not use the
    (local) fused kernel: outputs equal BN over the whole global batch."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(3)
    # Replicas get batches with very different statistics.
    x = np.concatenate(
        [rng.normal(0, 1, (4, 2, 2, 3)), rng.normal(5, 2, (4, 2, 2, 3))]
    ).astype(np.float32)
    with strategy.scope():
        layer = _layer(synchronized=True)
        layer.build(x.shape)
    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(x).batch(8)
    )

    @tf.function
    def run(batch):
        return strategy.run(lambda b: layer(b, training=True), (batch,))

    outputs = strategy.experimental_local_results(run(next(iter(data))))
    y = np.concatenate([o.numpy() for o in outputs])
    expected = _reference(x, np.ones(3), np.zeros(3), np.zeros_like(x))[0]
    # Global statistics from all-reduced sums: float32 rounding only.
    np.testing.assert_allclose(y, expected, atol=1e-4)


def test_synchronised_gradients_equal_the_global_batch_formulas():
    """On 2 replicas, dx of each replica's rows and the replica-summed
    dgamma, dbeta equal BN's gradients over the whole global batch; the
    moving statistics are the global ones."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(4)
    x = np.concatenate(
        [rng.normal(0, 1, (4, 3, 3, 2)), rng.normal(4, 3, (4, 3, 3, 2))]
    ).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    gamma = np.array([0.7, 1.3], np.float32)
    beta = np.array([0.1, -0.2], np.float32)
    with strategy.scope():
        layer = _layer(synchronized=True)
        layer.build(x.shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, dy)).batch(8)
    )

    def replica_step(batch):
        inputs, upstream = batch
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            objective = tf.reduce_sum(layer(inputs, training=True) * upstream)
        return tape.gradient(objective, [inputs, layer.gamma, layer.beta])

    @tf.function
    def run(batch):
        return strategy.run(replica_step, (batch,))

    dx, dgamma, dbeta = run(next(iter(data)))
    local = strategy.experimental_local_results
    _, mean, variance, ref_dx, ref_dgamma, ref_dbeta = _reference(
        x, gamma, beta, dy
    )
    # float32 sums over 72 values of size <= ~20: a few ulps.
    np.testing.assert_allclose(
        np.concatenate([d.numpy() for d in local(dx)]), ref_dx, atol=2e-5
    )
    np.testing.assert_allclose(
        sum(d.numpy() for d in local(dgamma)), ref_dgamma, rtol=1e-4
    )
    np.testing.assert_allclose(
        sum(d.numpy() for d in local(dbeta)), ref_dbeta, rtol=1e-5
    )
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), (1 - MOMENTUM) * mean, rtol=1e-5
    )
    np.testing.assert_allclose(
        layer.moving_variance.numpy(),
        MOMENTUM + (1 - MOMENTUM) * variance,
        rtol=1e-5,
    )


# 100 x the standard deviation: bfloat16 keeps x to 2^-8 relative, i.e. to
# 0.4 (about half a std) of 100, so any bfloat16 arithmetic on x before the
# mean is subtracted costs about half a std in the output.
_MEANS = np.array([100.0, -200.0, 50.0])
_STDS = np.array([1.0, 2.0, 0.5])


def test_synchronised_bfloat16_large_mean_matches_float32_formulas():
    """mixed_bfloat16 on 2 replicas, |mean| = 100 std: outputs equal the
    global-batch BN of the (bfloat16) inputs to bfloat16 rounding."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(5)
    shape = (8, 3, 3, 3)
    # Replica 1's half is shifted by one std: local statistics are wrong.
    x = (
        rng.normal(_MEANS, _STDS, shape)
        + _STDS * (np.arange(8) >= 4)[:, None, None, None]
    )
    x = tf.cast(tf.constant(x, tf.float32), tf.bfloat16)
    gamma = np.array([0.7, 1.3, 2.0], np.float32)
    beta = np.array([0.1, -0.2, 0.5], np.float32)
    with strategy.scope():
        layer = _layer(synchronized=True)
        layer.build(shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(x).batch(8)
    )

    @tf.function
    def run(batch):
        return strategy.run(lambda b: layer(b, training=True), (batch,))

    outputs = strategy.experimental_local_results(run(next(iter(data))))
    assert outputs[0].dtype == tf.bfloat16
    y = np.concatenate([o.numpy().astype(np.float64) for o in outputs])
    x64 = x.numpy().astype(np.float64)
    mean, variance = x64.mean((0, 1, 2)), x64.var((0, 1, 2))
    xhat = (x64 - mean) / np.sqrt(variance + EPSILON)
    expected = gamma * xhat + beta
    # Rounding the true value to bfloat16 errs by at most half its spacing,
    # 2^-8 relative. The float32 statistics add a variance error of about
    # 1e-7 (mean / std)^2 = 1e-3 relative (9e-4 measured), which moves y by
    # gamma |xhat| 5e-4: bounded here by gamma |xhat| 1e-3.
    tolerance = 2.0**-8 * np.abs(expected) + 1e-3 * gamma * np.abs(xhat)
    np.testing.assert_array_less(np.abs(y - expected), tolerance)
    # The bfloat16 affine form x scale + (beta - mean scale) misses by far.
    scale = gamma / np.sqrt(variance + EPSILON)
    naive = x * tf.cast(scale, tf.bfloat16) + tf.cast(
        beta - mean * scale, tf.bfloat16
    )
    assert np.max(np.abs(naive.numpy().astype(np.float64) - expected)) > 0.1
    # Moving statistics: the mean from float32 sums to ~1e-7 relative; the
    # variance to the 1e-3 above, within bfloat16's 2^-8.
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), (1 - MOMENTUM) * mean, rtol=1e-6
    )
    np.testing.assert_allclose(
        (layer.moving_variance.numpy() - MOMENTUM) / (1 - MOMENTUM),
        variance,
        rtol=2.0**-8,
    )
