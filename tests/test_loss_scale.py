"""Tests for simclr_tf.loss_scale: one replica's overflow skips every update.

mixed_float16 on 2 virtual CPUs, a Dense layer and Keras's
LossScaleOptimizer around SGD, stepped as train_step does (scale the loss,
take the gradients, apply). Replica 1's inputs are so large that its float16
kernel gradient overflows to Inf while replica 0's stays finite.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import loss_scale
from simclr_tf.config import schema as config_lib
from simclr_tf.training import builders, train_step
from simclr_tf.training import schedule as schedule_lib

REPLICAS = 2
LOCAL_BATCH = 2
LEARNING_RATE = 0.5
# Small enough that the finite step's float16 gradients (at most
# LOCAL_BATCH * 1 * SCALE / REPLICAS) stay far below float16's 65504.
INITIAL_SCALE = 1024.0
# x dy = 1e4 * SCALE / REPLICAS summed over the rows: 1e7 > 65504 -> Inf.
OVERFLOWING_INPUT = 1e4


def _setup(share: bool):
    """Strategy, layer, optimizer and a step function; mixed_float16."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    tf.distribute.MirroredStrategy._collective_key_base += 100_000
    strategy = tf.distribute.MirroredStrategy(
        [f"/cpu:{index}" for index in range(REPLICAS)]
    )
    with strategy.scope():
        layer = keras.layers.Dense(3)
        layer.build((None, 4))
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(LEARNING_RATE), initial_scale=INITIAL_SCALE
        )
        optimizer.build(layer.trainable_variables)

    def replica_step(x):
        variables = layer.trainable_variables
        with tf.GradientTape() as tape:
            # train_step's scaling: the replica mean / replicas, then scaled.
            loss = tf.reduce_sum(tf.cast(layer(x), tf.float32)) / REPLICAS
            scaled_loss = optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, variables)
        raw_finite = tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(g)) for g in gradients]
        )
        if share:
            gradients = loss_scale.share_non_finite(gradients)
        optimizer.apply_gradients(zip(gradients, variables, strict=True))
        return raw_finite

    step = tf.function(lambda x: strategy.run(replica_step, (x,)))
    return strategy, layer, optimizer, step


def _inputs(strategy, replica_values):
    """Replica r's rows all equal replica_values[r] (float16-exact)."""
    return strategy.experimental_distribute_values_from_function(
        lambda context: tf.fill(
            [LOCAL_BATCH, 4],
            replica_values[context.replica_id_in_sync_group],
        )
    )


def _copies(strategy, variable):
    """Every replica's copy of a (mirrored) variable."""
    return [v.numpy() for v in strategy.experimental_local_results(variable)]


def test_overflow_on_one_replica_skips_every_replica_and_halves_scale():
    strategy, layer, optimizer, step = _setup(share=True)
    initial = [v.numpy() for v in layer.trainable_variables]
    raw_finite = step(_inputs(strategy, [0.25, OVERFLOWING_INPUT]))
    # The overflow is on replica 1 only.
    assert [
        bool(f) for f in strategy.experimental_local_results(raw_finite)
    ] == [
        True,
        False,
    ]
    for variable, before in zip(
        layer.trainable_variables, initial, strict=True
    ):
        for copy in _copies(strategy, variable.value):
            np.testing.assert_array_equal(copy, before)
    for copy in _copies(strategy, optimizer.dynamic_scale.value):
        assert copy == INITIAL_SCALE / 2
    # Keras: "the train step is skipped": no iteration is counted.
    assert int(optimizer.iterations.numpy()) == 0


def test_finite_step_updates_every_replica_identically():
    strategy, layer, optimizer, step = _setup(share=True)
    kernel, bias = (v.numpy() for v in layer.trainable_variables)
    values = [0.25, 0.75]
    step(_inputs(strategy, values))
    # d(sum(x W + b) / R)/dW[i, j] summed over replicas and rows: sum x / R.
    rows = np.repeat(values, LOCAL_BATCH)
    kernel_gradient = np.full((4, 3), rows.sum() / REPLICAS)
    bias_gradient = np.full(3, len(rows) / REPLICAS)
    # The float16 gradients of float16-exact inputs times a power-of-two
    # scale are exact; only the float32 update rounds (1 ulp).
    expected = [
        kernel - LEARNING_RATE * kernel_gradient,
        bias - LEARNING_RATE * bias_gradient,
    ]
    for variable, value in zip(
        layer.trainable_variables, expected, strict=True
    ):
        copies = _copies(strategy, variable.value)
        np.testing.assert_array_equal(copies[0], copies[1])
        np.testing.assert_allclose(copies[0], value, rtol=1e-6)
    for copy in _copies(strategy, optimizer.dynamic_scale.value):
        assert copy == INITIAL_SCALE
    assert int(optimizer.iterations.numpy()) == 1


def test_keras_alone_lets_replica_1_overflow_into_the_weights():
    # Control: without share_non_finite, Keras decides from replica 0's
    # (finite) gradients, applies the summed Inf and keeps the scale.
    strategy, layer, optimizer, step = _setup(share=False)
    step(_inputs(strategy, [0.25, OVERFLOWING_INPUT]))
    kernel = _copies(strategy, layer.kernel.value)
    assert not np.all(np.isfinite(kernel[0]))
    assert not np.all(np.isfinite(kernel[1]))
    for copy in _copies(strategy, optimizer.dynamic_scale.value):
        assert copy == INITIAL_SCALE


def test_single_replica_gradients_pass_through():
    gradients = [tf.constant([1.0, -0.0]), None]
    assert loss_scale.share_non_finite(gradients) == gradients


@pytest.mark.parametrize("overflow", [False, True])
def test_indexed_slices_and_none_are_kept(overflow):
    strategy = tf.distribute.MirroredStrategy(
        [f"/cpu:{index}" for index in range(REPLICAS)]
    )
    bad = float("inf") if overflow else 2.0

    def replica_fn():
        context = tf.distribute.get_replica_context()
        value = tf.where(context.replica_id_in_sync_group == 1, bad, 2.0)
        slices = tf.IndexedSlices(
            tf.reshape(value, [1, 1]), tf.constant([0]), tf.constant([3, 1])
        )
        shared = loss_scale.share_non_finite([slices, None])
        assert shared[1] is None
        return shared[0].values, shared[0].indices

    values, indices = tf.function(lambda: strategy.run(replica_fn))()
    for replica_values in strategy.experimental_local_results(values):
        assert np.isnan(replica_values.numpy()[0, 0]) == overflow
        if not overflow:
            assert replica_values.numpy()[0, 0] == 2.0
    for replica_indices in strategy.experimental_local_results(indices):
        np.testing.assert_array_equal(replica_indices.numpy(), [0])


def test_train_step_under_mixed_float16_on_two_replicas(tmp_path):
    """The real pretraining step with its LossScaleOptimizer. At Keras's
    initial scale 2^15 the float16 gradients overflow on some replica: every
    replica skips and halves until a step is applied, which leaves the
    replicas' weights identical; NaN views on replica 1 then skip the
    update on both replicas. (NaN views reach every replica through the
    gathered batch and synchronised BN, so this checks the wired step, not
    share_non_finite alone; the tests above isolate it.)"""
    keras.mixed_precision.set_global_policy("mixed_float16")
    config = config_lib.from_dict(
        {
            "model_dir": str(tmp_path),
            "resnet_depth": 18,
            "width_multiplier": 0.125,
            "image_size": 8,
            "cifar_stem": True,
            "proj_out_dim": 8,
            "train_batch_size": REPLICAS * LOCAL_BATCH,
            "precision": "mixed_float16",
            "lineareval_while_pretraining": False,
            "warmup_epochs": 0,
        }
    )
    tf.distribute.MirroredStrategy._collective_key_base += 100_000
    strategy = tf.distribute.MirroredStrategy(
        [f"/cpu:{index}" for index in range(REPLICAS)]
    )
    schedule = schedule_lib.Schedule(
        steps_per_epoch=10,
        total_steps=10,
        warmup_steps=0,
        checkpoint_every=0,
        steps_per_loop=1,
    )
    with strategy.scope():
        model = builders.build_model(config, 10, 3)
        model(tf.zeros((1, 8, 8, 3)))
        optimizer = builders.build_optimizer(config, schedule)
        optimizer.build(model.trainable_variables)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    step = train_step.make_train_step(config, model, optimizer, REPLICAS)
    run = tf.function(lambda batch: strategy.run(step, (batch,)))
    rng = np.random.default_rng(0)

    def batch(poison: float):
        views = rng.uniform(size=(2, REPLICAS * LOCAL_BATCH, 8, 8, 3))
        views[:, LOCAL_BATCH:] += poison  # replica 1's rows
        data = {
            "view1": views[0].astype(np.float32),
            "view2": views[1].astype(np.float32),
            "label": np.zeros(REPLICAS * LOCAL_BATCH, np.int64),
        }
        dataset = tf.data.Dataset.from_tensor_slices(data).batch(
            REPLICAS * LOCAL_BATCH
        )
        return next(iter(strategy.experimental_distribute_dataset(dataset)))

    initial = [v.numpy() for v in model.trainable_variables]
    scale = 2.0**15
    for _ in range(10):
        run(batch(0.0))
        if int(optimizer.iterations.numpy()) == 1:
            break
        scale /= 2
        for copy in _copies(strategy, optimizer.dynamic_scale.value):
            assert copy == scale
    assert int(optimizer.iterations.numpy()) == 1
    moved = 0.0
    for variable, before in zip(
        model.trainable_variables, initial, strict=True
    ):
        copies = _copies(strategy, variable.value)
        np.testing.assert_array_equal(copies[0], copies[1])
        moved = max(moved, float(np.max(np.abs(copies[0] - before))))
    assert moved > 1e-4
    for copy in _copies(strategy, optimizer.dynamic_scale.value):
        assert copy == scale  # an applied step keeps it (growth: 2000)
    after_first = [v.numpy() for v in model.trainable_variables]
    run(batch(float("nan")))
    assert int(optimizer.iterations.numpy()) == 1
    for variable, before in zip(
        model.trainable_variables, after_first, strict=True
    ):
        for copy in _copies(strategy, variable.value):
            np.testing.assert_array_equal(copy, before)
    for copy in _copies(strategy, optimizer.dynamic_scale.value):
        assert copy == scale / 2
