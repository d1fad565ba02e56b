"""BatchNormalization that runs TensorFlow's fused kernel where it can.

Keras 3 computes BN from separate ops (moments, then normalise) in float32,
casting bfloat16 activations up and back down around every layer. The fused
kernel (FusedBatchNormV3, oneDNN on CPUs, supported by XLA) does the same
maths in one pass on bfloat16 inputs; on this project's CPU it made the demo
step 1.5x (float32) to 2.1x (mixed_bfloat16) faster (benchmarks/RESULTS.md).
Synchronised BN across several replicas cannot use the kernel (its
statistics need an all-reduce between the passes); it uses
`synchronized_batch_norm`, two all-reduces and a hand-written gradient.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def synchronized_batch_norm(
    inputs: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, epsilon: float
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Training-mode BN with statistics over every replica's batch.

    Must run in a replica context. Forward: one all-reduce of the per-
    channel sums of x and x^2 (float32), then y = x scale + shift with
    shift = beta - mean scale, computed in float32 and rounded once to the
    input's dtype. In bfloat16 that sum would lose y when |mean| >> std
    (x scale and shift are large and nearly cancel, each rounded to 8
    bits: 0.57 off at mean = 100 std); in float32 the cancellation costs
    ~6e-8 |mean| / std relative, far below bfloat16's 2^-8. For float32
    inputs the casts are no-ops, so that path is unchanged.
    Backward, with a hand-written gradient: the fused gradient kernel, one
    all-reduce of the sums of dy and dy xhat, and one element-wise
    correction, so that dx is the gradient of BN over the global batch (as
    autodiff through Keras's synchronised BN gives) in far fewer passes over
    the activations. Both all-reduces go through ReplicaContext.all_reduce,
    which needs no merge_call inside XLA-compiled replica functions.

    The variance is E[x^2] - E[x]^2 in float32, whose round-off relative to
    the variance is about 1e-7 (mean / std)^2: 1e-3 at mean = 100 std, below
    bfloat16's 4e-3 resolution.

    Args:
      inputs: [..., C] float (float32 or bfloat16/float16 activations).
      gamma, beta: [C] float32.
      epsilon: variance epsilon.

    Returns:
      (outputs like inputs, global mean [C], global biased variance [C]).
    """
    context = tf.distribute.get_replica_context()
    axes = list(range(len(inputs.shape) - 1))
    channels = inputs.shape[-1]
    x32 = tf.cast(inputs, tf.float32)
    count = tf.cast(tf.size(inputs) // channels, tf.float32)
    sums = context.all_reduce(
        tf.distribute.ReduceOp.SUM,
        tf.stack(
            [
                tf.reduce_sum(x32, axes),
                tf.reduce_sum(tf.square(x32), axes),
                tf.fill([channels], count),
            ]
        ),
    )
    total = sums[2]
    mean = sums[0] / total
    variance = tf.maximum(sums[1] / total - tf.square(mean), 0.0)
    inverse = tf.math.rsqrt(variance + epsilon)

    def scale_of(gamma: tf.Tensor) -> tf.Tensor:
        return gamma * inverse

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        scale = scale_of(gamma)
        shift = beta - mean * scale
        y = tf.cast(tf.cast(x, tf.float32) * scale + shift, x.dtype)

        def gradient(dy):
            # One fused kernel gives gamma inverse dy and this replica's
            # sums of dy and dy xhat (xhat from the global statistics).
            dx_plain, dgamma, dbeta, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=_as_images(dy),
                x=_as_images(x),
                scale=gamma,
                reserve_space_1=mean,
                reserve_space_2=variance,
                reserve_space_3=tf.zeros([0], tf.float32),
                epsilon=epsilon,
                data_format="NHWC",
                is_training=False,
            )
            summed = context.all_reduce(
                tf.distribute.ReduceOp.SUM, tf.stack([dbeta, dgamma])
            )
            # dx = scale (dy - sum(dy) / n - xhat sum(dy xhat) / n) over the
            # global batch = dx_plain + x a + b, per channel a and b.
            a = -scale_of(gamma) * inverse * summed[1] / total
            b = -scale_of(gamma) * summed[0] / total - a * mean
            dx = tf.reshape(dx_plain, tf.shape(x))
            dx = tf.cast(dx, tf.float32) + tf.cast(x, tf.float32) * a + b
            # gamma and beta get this replica's share; the optimizer sums
            # the replicas' gradients.
            return tf.cast(dx, x.dtype), dgamma, dbeta

        return y, gradient

    return normalize(inputs, gamma, beta), mean, variance


def _as_images(values: tf.Tensor) -> tf.Tensor:
    """[N, C] -> [N, 1, 1, C] for the NHWC kernels; rank 4 unchanged."""
    return values[:, None, None, :] if len(values.shape) == 2 else values


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
    it); only the computation differs. synchronized=True over several
    replicas uses `synchronized_batch_norm`. Falls back to Keras's code for
    an axis other than the last, masks, renorm, and inputs of rank other
    than 2 or 4.
    """

    def _supported(self, inputs: tf.Tensor, mask: object) -> bool:
        axis = self.axis if isinstance(self.axis, int) else None
        return (
            keras.backend.backend() == "tensorflow"
            and mask is None
            # renorm exists from Keras 3.15 on; older layers have none.
            and not getattr(self, "renorm", False)
            and axis in (-1, len(inputs.shape) - 1)
            and len(inputs.shape) in (2, 4)
        )

    def call(self, inputs, training=None, mask=None):
        if not self._supported(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
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
        inputs = tf.cast(inputs, self.compute_dtype)
        training = bool(training) and self.trainable
        if training and self.synchronized and _replicas_in_sync() > 1:
            outputs, mean, variance = synchronized_batch_norm(
                inputs, gamma, beta, self.epsilon
            )
        else:
            outputs, mean, variance = self._fused(inputs, gamma, beta, training)
        if training:
            self._update_moving(self.moving_mean, mean)
            self._update_moving(self.moving_variance, variance)
        return outputs

    def _fused(
        self, inputs: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, training
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """FusedBatchNormV3 on [N, H, W, C] (rank 2 as [N, 1, 1, C])."""
        shape = tf.shape(inputs)
        images = inputs
        if len(inputs.shape) == 2:
            images = inputs[:, None, None, :]
        if training:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                images, gamma, beta, epsilon=self.epsilon, is_training=True
            )
            # The kernel returns the unbiased (n - 1) variance; Keras keeps
            # the biased one in its moving average.
            count = tf.cast(tf.size(images) // images.shape[-1], tf.float32)
            variance = variance * (count - 1.0) / count
        else:
            mean = tf.cast(self.moving_mean, tf.float32)
            variance = tf.cast(self.moving_variance, tf.float32)
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                images,
                gamma,
                beta,
                mean=mean,
                variance=variance,
                epsilon=self.epsilon,
                is_training=False,
            )
        return tf.reshape(outputs, shape), mean, variance

    def _update_moving(
        self, variable: keras.Variable, value: tf.Tensor
    ) -> None:
        value = tf.cast(value, variable.dtype)
        variable.assign(
            variable * self.momentum + value * (1.0 - self.momentum)
        )
