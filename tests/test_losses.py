"""Tests for simclr_tf.losses against numpy loops written from the paper."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import losses

# float32 log-sum-exp over <= 32 logits of magnitude <= 20 keeps about 6
# significant digits; the numpy references run in float64.
RTOL = 1e-5
ATOL = 1e-6


def _reference_nt_xent(z1, z2, temperature, normalize=True):
    """SimCLR Algorithm 1, literally: interleaved pairs (2k-1, 2k), 1-based."""
    z = np.empty((2 * len(z1), z1.shape[1]), np.float64)
    z[0::2], z[1::2] = z1, z2

    def similarity(i, j):
        dot = float(np.dot(z[i], z[j]))
        if normalize:
            dot /= np.linalg.norm(z[i]) * np.linalg.norm(z[j])
        return dot

    def pair_loss(i, j):
        numerator = math.exp(similarity(i, j) / temperature)
        denominator = sum(
            math.exp(similarity(i, k) / temperature)
            for k in range(len(z))
            if k != i
        )
        return -math.log(numerator / denominator)

    total = sum(
        pair_loss(2 * k, 2 * k + 1) + pair_loss(2 * k + 1, 2 * k)
        for k in range(len(z1))
    )
    return total / len(z)


def _random_views(n, d, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(n, d)).astype(np.float32) * scale
    z2 = rng.normal(size=(n, d)).astype(np.float32) * scale
    return z1, z2


@pytest.mark.parametrize(
    "n, d, temperature, normalize",
    [
        (1, 3, 0.5, True),
        (4, 8, 0.1, True),
        (7, 5, 0.05, True),
        (5, 16, 1.0, True),
        (4, 8, 0.5, False),
        (6, 3, 0.2, False),
    ],
)
def test_nt_xent_matches_algorithm_1(n, d, temperature, normalize):
    # Unnormalised dot products of scale-0.3 vectors keep logits below ~20.
    z1, z2 = _random_views(n, d, seed=n + d, scale=1.0 if normalize else 0.3)
    loss, _, _ = losses.nt_xent(z1, z2, temperature, normalize=normalize)
    expected = _reference_nt_xent(z1, z2, temperature, normalize)
    np.testing.assert_allclose(float(loss), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("global_batch", [1, 2, 5, 16])
def test_nt_xent_identical_embeddings_give_log_2n_minus_1(global_batch):
    z = np.tile(np.array([[0.3, -1.2, 2.0]], np.float32), (global_batch, 1))
    loss, _, _ = losses.nt_xent(z, z, 0.1)
    # All 2N-1 unmasked logits are equal, so the softmax is uniform.
    np.testing.assert_allclose(
        float(loss), math.log(2 * global_batch - 1), atol=ATOL
    )


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_one_hot_views_closed_form(temperature):
    global_batch = 4
    z = np.eye(global_batch, 6, dtype=np.float32)
    loss, _, _ = losses.nt_xent(z, z, temperature)
    # Positive similarity 1, the 2N-2 negatives 0:
    # -log(e^(1/t) / (e^(1/t) + 2N - 2)) = log(1 + (2N-2) e^(-1/t)).
    expected = math.log(1 + (2 * global_batch - 2) * math.exp(-1 / temperature))
    # The loss is 1e-4 at t=0.1 but comes from logits of 10, so float32
    # round-off is absolute (~1 ulp of 10), hence atol.
    np.testing.assert_allclose(float(loss), expected, rtol=RTOL, atol=ATOL)


def test_nt_xent_symmetric_in_views():
    z1, z2 = _random_views(6, 4, seed=1)
    forward, _, _ = losses.nt_xent(z1, z2, 0.2)
    swapped, _, _ = losses.nt_xent(z2, z1, 0.2)
    np.testing.assert_allclose(float(forward), float(swapped), rtol=RTOL)


def test_nt_xent_invariant_to_rescaling_when_normalized():
    z1, z2 = _random_views(5, 4, seed=2)
    row_scales = np.array([[0.01], [3.0], [250.0], [1.0], [7.5]], np.float32)
    base, _, _ = losses.nt_xent(z1, z2, 0.1)
    scaled, _, _ = losses.nt_xent(z1 * row_scales, 40.0 * z2, 0.1)
    np.testing.assert_allclose(float(base), float(scaled), rtol=RTOL)


def test_nt_xent_invariant_to_permuting_the_batch():
    z1, z2 = _random_views(6, 4, seed=3)
    order = np.array([4, 0, 5, 2, 1, 3])
    base, _, _ = losses.nt_xent(z1, z2, 0.1)
    permuted, _, _ = losses.nt_xent(z1[order], z2[order], 0.1)
    np.testing.assert_allclose(float(base), float(permuted), rtol=RTOL)


def test_nt_xent_labels_and_masked_self_column():
    n = 3
    z1, z2 = _random_views(n, 4, seed=4)
    _, logits, labels = losses.nt_xent(z1, z2, 0.1)
    logits = logits.numpy()
    assert logits.shape == (2 * n, 2 * n)
    assert labels.dtype == tf.int32
    # Layout [z1; z2]: row i pairs with column i + n and vice versa.
    np.testing.assert_array_equal(labels.numpy(), [3, 4, 5, 0, 1, 2])
    self_logits = logits[np.arange(2 * n), np.arange(2 * n)]
    assert np.all(np.isfinite(logits))
    assert np.all(self_logits < -1e8)
    # Unmasked entries are cosine / temperature, so within [-10, 10].
    off_diagonal = logits[~np.eye(2 * n, dtype=bool)]
    assert np.all(np.abs(off_diagonal) <= 10.0 + 1e-5)


def test_nt_xent_casts_bfloat16_to_float32():
    z1, z2 = _random_views(4, 8, seed=5)
    z1_bf16 = tf.cast(z1, tf.bfloat16)
    z2_bf16 = tf.cast(z2, tf.bfloat16)
    loss, logits, _ = losses.nt_xent(z1_bf16, z2_bf16, 0.1)
    assert loss.dtype == tf.float32 and logits.dtype == tf.float32
    # The reference sees the same bfloat16-rounded values, so only float32
    # round-off remains.
    expected = _reference_nt_xent(
        tf.cast(z1_bf16, tf.float32).numpy(),
        tf.cast(z2_bf16, tf.float32).numpy(),
        0.1,
    )
    np.testing.assert_allclose(float(loss), expected, rtol=RTOL)


@pytest.mark.parametrize("identical", [False, True])
def test_nt_xent_gradient_finite(identical):
    z1, z2 = _random_views(4, 3, seed=6)
    if identical:
        z2 = z1 = np.ones_like(z1)
    z1, z2 = tf.constant(z1), tf.constant(z2)
    with tf.GradientTape() as tape:
        tape.watch([z1, z2])
        loss, _, _ = losses.nt_xent(z1, z2, 0.1)
    gradients = tape.gradient(loss, [z1, z2])
    for gradient in gradients:
        assert np.all(np.isfinite(gradient.numpy()))
    if not identical:
        assert np.any(gradients[0].numpy() != 0)


def test_nt_xent_rejects_non_positive_temperature():
    z1, z2 = _random_views(2, 3)
    with pytest.raises(ValueError, match="temperature"):
        losses.nt_xent(z1, z2, 0.0)


def test_contrast_metrics_match_numpy():
    n, temperature = 6, 0.5
    z1, z2 = _random_views(n, 3, seed=7)
    # Make two anchors certainly right so accuracy is neither 0 nor 1.
    z2[:2] = z1[:2]
    _, logits, labels = losses.nt_xent(z1, z2, temperature)
    metrics = losses.contrast_metrics(logits, labels)

    unit1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
    unit2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
    correct, entropies = [], []
    for anchors, others in ((unit1, unit2), (unit2, unit1)):
        for i in range(n):
            scores = [
                np.dot(anchors[i], others[j]) / temperature for j in range(n)
            ]
            probabilities = np.exp(scores) / np.sum(np.exp(scores))
            correct.append(int(np.argmax(scores)) == i)
            entropies.append(-np.sum(probabilities * np.log(probabilities)))
    np.testing.assert_allclose(
        float(metrics["contrast_acc"]), np.mean(correct), atol=1e-7
    )
    np.testing.assert_allclose(
        float(metrics["contrast_entropy"]), np.mean(entropies), rtol=RTOL
    )


def test_supervised_loss_matches_numpy():
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(5, 4)).astype(np.float32)
    labels = np.array([0, 3, 1, 1, 2])
    expected = np.mean(
        [
            -logits[i, labels[i]] + np.log(np.sum(np.exp(logits[i])))
            for i in range(5)
        ]
    )
    result = losses.supervised_loss(labels, tf.cast(logits, tf.bfloat16))
    assert result.dtype == tf.float32
    # bfloat16 logits carry ~3 significant digits.
    np.testing.assert_allclose(float(result), expected, rtol=1e-2)


def test_l2_weight_decay_skips_excluded_paths():
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(2),
            keras.layers.BatchNormalization(),
        ]
    )
    kernel = model.layers[0].kernel.numpy()
    result = losses.l2_weight_decay(
        model.trainable_variables, 1e-2, ("batch_normalization", "bias")
    )
    # Only the Dense kernel remains: 1e-2 * 0.5 * ||W||^2.
    expected = 1e-2 * 0.5 * np.sum(kernel.astype(np.float64) ** 2)
    np.testing.assert_allclose(float(result), expected, rtol=RTOL)


# --------------------------- multi-replica -------------------------------


def _mirrored_strategy(replicas):
    """A MirroredStrategy over the first `replicas` virtual CPUs, with
    fresh collective keys (a test may build several; see conftest)."""
    tf.distribute.MirroredStrategy._collective_key_base += 100_000
    devices = [f"/cpu:{index}" for index in range(replicas)]
    return tf.distribute.MirroredStrategy(devices)


class _GatherWithoutGradient:
    """A replica context whose all-reduce blocks the gradient (the bug)."""

    def __init__(self, context):
        self._context = context
        self.replica_id_in_sync_group = context.replica_id_in_sync_group
        self.num_replicas_in_sync = context.num_replicas_in_sync

    def all_reduce(self, reduce_op, value):
        return tf.stop_gradient(self._context.all_reduce(reduce_op, value))


def _replicated_loss_and_gradients(replicas, z1, z2, temperature, broken):
    """Per-replica losses and the concatenated input gradients."""
    strategy = _mirrored_strategy(replicas)
    local_batch = len(z1) // replicas

    def shard(values):
        def value_fn(context):
            start = context.replica_id_in_sync_group * local_batch
            return tf.constant(values[start : start + local_batch])

        return strategy.experimental_distribute_values_from_function(value_fn)

    def replica_step(local_z1, local_z2):
        context = tf.distribute.get_replica_context()
        if broken:
            context = _GatherWithoutGradient(context)
        with tf.GradientTape() as tape:
            tape.watch([local_z1, local_z2])
            loss, _, _ = losses.nt_xent(
                local_z1, local_z2, temperature, replica_context=context
            )
            # The train step's scaling: summed over replicas = global mean.
            scaled = loss / context.num_replicas_in_sync
        gradient1, gradient2 = tape.gradient(scaled, [local_z1, local_z2])
        return loss, gradient1, gradient2

    step = tf.function(lambda a, b: strategy.run(replica_step, args=(a, b)))
    loss, gradient1, gradient2 = step(shard(z1), shard(z2))

    def local(value):
        return [t.numpy() for t in strategy.experimental_local_results(value)]

    return (
        local(loss),
        np.concatenate(local(gradient1)),
        np.concatenate(local(gradient2)),
    )


def _single_device_loss_and_gradients(z1, z2, temperature):
    z1, z2 = tf.constant(z1), tf.constant(z2)
    with tf.GradientTape() as tape:
        tape.watch([z1, z2])
        loss, _, _ = losses.nt_xent(z1, z2, temperature)
    gradient1, gradient2 = tape.gradient(loss, [z1, z2])
    return float(loss), gradient1.numpy(), gradient2.numpy()


def _asymmetric_views(replicas, local_batch=3, d=5):
    """Each replica's rows differ in distribution (scale and offset)."""
    z1, z2 = _random_views(replicas * local_batch, d, seed=replicas)
    shift = np.repeat(np.arange(replicas), local_batch)[:, None]
    return (z1 + shift).astype(np.float32), (z2 * (1 + shift)).astype(
        np.float32
    )


@pytest.fixture(scope="module", params=[2, 4])
def replicated_run(request):
    """One replicated run per replica count, shared by the checks below."""
    replicas = request.param
    z1, z2 = _asymmetric_views(replicas)
    replica_losses, gradient1, gradient2 = _replicated_loss_and_gradients(
        replicas, z1, z2, 0.2, broken=False
    )
    expected = _single_device_loss_and_gradients(z1, z2, 0.2)
    return replica_losses, gradient1, gradient2, expected


def test_nt_xent_replica_mean_equals_global_loss(replicated_run):
    replica_losses, _, _, (expected, _, _) = replicated_run
    # Replicas hold different data, so their losses differ.
    assert len(set(np.round(replica_losses, 6))) == len(replica_losses)
    # Same float32 math, only the order of the final mean differs.
    np.testing.assert_allclose(np.mean(replica_losses), expected, rtol=1e-5)


def test_nt_xent_replica_gradient_equals_global_gradient(replicated_run):
    _, gradient1, gradient2, (_, expected1, expected2) = replicated_run
    # Gradients are O(0.1); float32 sums in a different order differ ~1e-8.
    np.testing.assert_allclose(gradient1, expected1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gradient2, expected2, rtol=1e-4, atol=1e-6)


def test_nt_xent_gather_without_gradient_is_detected():
    replicas = 2
    z1, z2 = _asymmetric_views(replicas)
    replica_losses, gradient1, _ = _replicated_loss_and_gradients(
        replicas, z1, z2, 0.2, broken=True
    )
    expected_loss, expected1, _ = _single_device_loss_and_gradients(z1, z2, 0.2)
    # The forward pass is unchanged; only the gradient loses the column path.
    np.testing.assert_allclose(
        np.mean(replica_losses), expected_loss, rtol=1e-5
    )
    assert not np.allclose(gradient1, expected1, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("replicas", [2, 4])
def test_cross_replica_concat_equals_all_gather_values_and_gradient(replicas):
    strategy = _mirrored_strategy(replicas)
    local_batch, d = 3, 4
    rng = np.random.default_rng(7)
    values = rng.normal(size=(replicas * local_batch, d)).astype(np.float32)
    # Each replica sends its own upstream gradient into the concatenation;
    # small integers, so their sum over replicas is exact in any order.
    upstream = rng.integers(-8, 9, (replicas, replicas * local_batch, d))
    upstream = tf.constant(upstream.astype(np.float32))

    def shard(context):
        start = context.replica_id_in_sync_group * local_batch
        return tf.constant(values[start : start + local_batch])

    def replica_fn(local):
        context = tf.distribute.get_replica_context()
        dy = tf.gather(upstream, context.replica_id_in_sync_group)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(local)
            concatenated = losses.cross_replica_concat(local, context)
            gathered = context.all_gather(local, axis=0)
            objective = tf.reduce_sum(concatenated * dy)
            gathered_objective = tf.reduce_sum(gathered * dy)
        return (
            concatenated,
            gathered,
            tape.gradient(objective, local),
            tape.gradient(gathered_objective, local),
        )

    outputs = tf.function(lambda x: strategy.run(replica_fn, (x,)))(
        strategy.experimental_distribute_values_from_function(shard)
    )
    concatenated, gathered, gradient, gathered_gradient = (
        [t.numpy() for t in strategy.experimental_local_results(output)]
        for output in outputs
    )
    summed = upstream.numpy().sum(axis=0)  # [N, d]
    for replica in range(replicas):
        rows = slice(replica * local_batch, (replica + 1) * local_batch)
        # Adding zeros is exact: the rows themselves, in replica order.
        np.testing.assert_array_equal(concatenated[replica], values)
        np.testing.assert_array_equal(concatenated[replica], gathered[replica])
        # This replica's rows of the summed upstream gradient, as all_gather.
        np.testing.assert_array_equal(gradient[replica], summed[rows])
        np.testing.assert_array_equal(
            gradient[replica], gathered_gradient[replica]
        )
