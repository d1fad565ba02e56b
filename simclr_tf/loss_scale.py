"""Dynamic loss scaling (mixed_float16) that agrees across replicas.

Keras's LossScaleOptimizer checks the gradients it is handed, and under a
multi-replica strategy those are each replica's own, before the optimizer
sums them. With merge_call (MirroredStrategy, MultiWorkerMirroredStrategy)
it keeps replica 0's verdict, so an overflow on another replica is summed
into every replica's weights and the loss scale is not lowered; without
merge_call (XLA on GPUs) each replica decides alone. `share_non_finite`
makes all replicas see any replica's overflow. Loss scaling itself (the
scale, its growth and halving) stays Keras's.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf


def share_non_finite(
    gradients: Sequence[tf.Tensor | tf.IndexedSlices | None],
    replica_context: tf.distribute.ReplicaContext | None = None,
) -> list[tf.Tensor | tf.IndexedSlices | None]:
    """Makes every replica's gradients non-finite when any replica's are.

    Call in the replica context between tape.gradient and a
    LossScaleOptimizer's apply_gradients. One all-reduce of a scalar counts
    the replicas with a NaN or Inf gradient; if any did, NaN is added to
    every gradient of every replica, so the optimizer on each replica skips
    the update and halves the loss scale, as Keras does on one device.
    Otherwise 0.0 is added, which leaves every gradient unchanged (bit for
    bit, except -0.0 becoming +0.0).

    Args:
        gradients: this replica's (unreduced) gradients, float tensors,
            IndexedSlices or None (a variable the loss does not reach).
        replica_context: the replica context; default the current one.
            Without one, or with a single replica, the gradients are
            returned as they are.

    Returns:
        The gradients in the same order, None kept.
    """
    context = replica_context or tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return list(gradients)
    values = [
        g.values if isinstance(g, tf.IndexedSlices) else g
        for g in gradients
        if g is not None
    ]
    finite = tf.reduce_all(
        tf.stack([tf.reduce_all(tf.math.is_finite(v)) for v in values])
    )
    overflowed = context.all_reduce(
        tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32)
    )  # number of replicas with a non-finite gradient
    poison = tf.where(overflowed > 0.0, float("nan"), 0.0)
    return [_add(g, poison) for g in gradients]


def _add(
    gradient: tf.Tensor | tf.IndexedSlices | None, poison: tf.Tensor
) -> tf.Tensor | tf.IndexedSlices | None:
    if gradient is None:
        return None
    if isinstance(gradient, tf.IndexedSlices):
        values = gradient.values + tf.cast(poison, gradient.values.dtype)
        return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
    return gradient + tf.cast(poison, gradient.dtype)
