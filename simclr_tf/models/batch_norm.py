"""BatchNormalization that runs TensorFlow's fused kernel where it can.

Keras 3 computes BN from separate ops (moments, then normalise) in float32,
casting bfloat16 activations up and back down around every layer. The fused
kernel (FusedBatchNormV3, oneDNN on CPUs, supported by XLA) does the same
maths in one pass on bfloat16 inputs; on this project's CPU it made the demo
step 1.5x (float32) to 2.1x (mixed_bfloat16) faster (benchmarks/RESULTS.md).
Synchronised BN across several replicas keeps Keras's path: its statistics
need an all-reduce between the two passes, which the fused kernel lacks.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def _replicas_in_sync() -> int:
    context = tf.distribute.get_replica_context()
    if context is not None:
        return context.num_replicas_in_sync
    return tf.distribute.get_strategy().num_replicas_in_sync


@keras.saving.register_keras_serializable(package="simclr_tf")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization computed by the fused kernel.

    Same variables, arguments, outputs and moving statistics as the Keras
    layer (the moving variance is the biased batch variance, as Keras keeps
    it); only the kernel differs. Falls back to the Keras computation for
    what the kernel cannot do: synchronised statistics over several
    replicas, an axis other than the last, masks, renorm, and inputs of
    rank other than 2 or 4.
    """

    def _fusable(self, inputs: tf.Tensor, mask: object) -> bool:
        axis = self.axis if isinstance(self.axis, int) else None
        return (
            keras.backend.backend() == "tensorflow"
            and mask is None
            and not self.renorm
            and axis in (-1, len(inputs.shape) - 1)
            and len(inputs.shape) in (2, 4)
            and not (self.synchronized and _replicas_in_sync() > 1)
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        shape = tf.shape(inputs)
        images = inputs
        if len(inputs.shape) == 2:  # [N, C] -> [N, 1, 1, C]
            images = inputs[:, None, None, :]
        channels = inputs.shape[-1]
        gamma = (
            tf.cast(self.gamma, tf.float32)
            if self.scale
            else tf.ones([channels], tf.float32)
        )
        beta = (
            tf.cast(self.beta, tf.float32)
            if self.center
            else tf.zeros([channels], tf.float32)
        )
        images = tf.cast(images, self.compute_dtype)
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                images, gamma, beta, epsilon=self.epsilon, is_training=True
            )
            # The kernel returns the unbiased (n - 1) variance; Keras keeps
            # the biased one in its moving average.
            count = tf.cast(tf.size(images) // channels, tf.float32)
            variance = variance * (count - 1.0) / count
            self._update_moving(self.moving_mean, mean)
            self._update_moving(self.moving_variance, variance)
        else:
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                images,
                gamma,
                beta,
                mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32),
                epsilon=self.epsilon,
                is_training=False,
            )
        return tf.reshape(outputs, shape)

    def _update_moving(
        self, variable: keras.Variable, value: tf.Tensor
    ) -> None:
        value = tf.cast(value, variable.dtype)
        variable.assign(
            variable * self.momentum + value * (1.0 - self.momentum)
        )
