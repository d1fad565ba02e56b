"""The layers of a ResNet encoder: fixed-padding convs, BN-ReLU, residual
blocks (basic and bottleneck) with SimCLRv2's selective kernels (SK) and
squeeze-excitation (SE), as google-research/simclr's tf2/resnet.py builds
them. resnet.py assembles them into a model. Convolutions are conv.Conv2D
(keras.layers.Conv2D whose gradients on CPUs come from conv.conv2d).
"""

from __future__ import annotations

import keras

from simclr_tf.models import batch_norm, conv

BATCH_NORM_EPSILON = 1e-5


# Smallest hidden width of the SK gate (GR's SK_Conv2D min_dim).
SK_MIN_HIDDEN = 32
# Output channels of a bottleneck block per unit of its width.
BOTTLENECK_EXPANSION = 4


def conv2d_fixed_padding(
    inputs: keras.KerasTensor,
    filters: int,
    kernel_size: int,
    strides: int,
    name: str,
) -> keras.KerasTensor:
    """Applies a bias-free conv whose padding does not depend on input size.

    Strided convs pad (k-1)//2 before and the rest after, then run VALID, so
    the output is ceil(n / stride) with the same alignment for any n (TF's
    SAME would shift the padding to the end for even inputs). Stride-1 convs
    use SAME, which pads identically for odd kernels.

    Args:
        inputs: [B, H, W, C] float KerasTensor.
        filters: output channels, >= 1.
        kernel_size: square kernel side, >= 1.
        strides: square stride, >= 1.
        name: layer name; the padding layer is named `name + "_pad"`.

    Returns:
        [B, ceil(H / strides), ceil(W / strides), filters] KerasTensor.
    """
    padding = "same"
    if strides > 1:
        pad_before = (kernel_size - 1) // 2
        pad_after = kernel_size - 1 - pad_before
        inputs = keras.layers.ZeroPadding2D(
            ((pad_before, pad_after), (pad_before, pad_after)),
            name=name + "_pad",
        )(inputs)
        padding = "valid"
    return conv.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=False,
        kernel_initializer=keras.initializers.VarianceScaling(
            scale=1.0, mode="fan_in", distribution="truncated_normal"
        ),
        name=name,
    )(inputs)


def batch_norm_relu(
    inputs: keras.KerasTensor,
    name: str,
    *,
    relu: bool,
    zero_init: bool,
    batch_norm_decay: float,
    global_bn: bool,
) -> keras.KerasTensor:
    """Applies BN (gamma 0 if zero_init) and an optional ReLU.

    `name` must contain "batch_normalization": LARS excludes BN variables by
    matching that substring in their paths.
    """
    outputs = batch_norm.FusedBatchNormalization(
        momentum=batch_norm_decay,
        epsilon=BATCH_NORM_EPSILON,
        gamma_initializer="zeros" if zero_init else "ones",
        synchronized=global_bn,
        name=name,
    )(inputs)
    if relu:
        outputs = keras.layers.ReLU(
            name=name.replace("batch_normalization", "relu")
        )(outputs)
    return outputs


@keras.saving.register_keras_serializable(package="simclr_tf")
class SelectiveKernelSqueeze(keras.layers.Layer):
    """Sums the two SK streams and averages over space (the gate's input).

    Input [B, H, W, 2C] (stream 0 = first C channels); output [B, 1, 1, C].
    """

    def call(self, streams):
        first, second = keras.ops.split(streams, 2, axis=-1)
        return keras.ops.mean(first + second, axis=(1, 2), keepdims=True)


@keras.saving.register_keras_serializable(package="simclr_tf")
class SelectiveKernelSelect(keras.layers.Layer):
    """Mixes the two SK streams with a softmax over per-channel logits.

    Inputs: streams [B, H, W, 2C] and logits [B, 1, 1, 2C], both split into
    stream 0 (first C channels) and stream 1; output [B, H, W, C] =
    sum_s softmax_s(logits)[s] * stream[s].
    """

    def call(self, inputs):
        streams, logits = inputs
        streams = keras.ops.stack(keras.ops.split(streams, 2, axis=-1))
        logits = keras.ops.stack(keras.ops.split(logits, 2, axis=-1))
        weights = keras.ops.softmax(logits, axis=0)
        return keras.ops.sum(streams * weights, axis=0)


def _selective_kernel_conv(
    inputs: keras.KerasTensor,
    filters: int,
    strides: int,
    sk_ratio: float,
    prefix: str,
    bn_kwargs: dict,
) -> keras.KerasTensor:
    """SK conv (Li et al. 2019) as in GR: replaces a bottleneck's 3x3 conv-BN.

    One 3x3 conv with 2 * filters channels (two streams of `filters`), BN-
    ReLU; the gate: streams summed, spatial mean, 1x1 conv to
    max(int(filters * sk_ratio), 32), BN-ReLU, 1x1 conv to 2 * filters
    logits (no biases); the output is the softmax-weighted sum of streams.
    """
    streams = conv2d_fixed_padding(
        inputs, 2 * filters, 3, strides, prefix + "sk_conv2d"
    )
    streams = batch_norm_relu(
        streams,
        prefix + "sk_batch_normalization",
        relu=True,
        zero_init=False,
        **bn_kwargs,
    )
    gate = SelectiveKernelSqueeze(name=prefix + "sk_squeeze")(streams)
    hidden = max(int(filters * sk_ratio), SK_MIN_HIDDEN)
    gate = conv2d_fixed_padding(gate, hidden, 1, 1, prefix + "sk_gate_conv2d_0")
    gate = batch_norm_relu(
        gate,
        prefix + "sk_gate_batch_normalization",
        relu=True,
        zero_init=False,
        **bn_kwargs,
    )
    logits = conv2d_fixed_padding(
        gate, 2 * filters, 1, 1, prefix + "sk_gate_conv2d_1"
    )
    return SelectiveKernelSelect(name=prefix + "sk_select")([streams, logits])


def _squeeze_excitation(
    inputs: keras.KerasTensor, filters: int, se_ratio: float, prefix: str
) -> keras.KerasTensor:
    """SE (Hu et al. 2018) as in GR: x * sigmoid(W2 relu(W1 mean_hw(x))).

    W1, W2 are 1x1 convs with biases; W1 has max(1, int(filters *
    se_ratio)) outputs, where `filters` is the block's base width (not x4
    for bottlenecks), and W2 restores the input's channels.
    """
    initializer = keras.initializers.VarianceScaling(
        scale=1.0, mode="fan_in", distribution="truncated_normal"
    )
    gate = keras.layers.GlobalAveragePooling2D(
        keepdims=True, name=prefix + "se_pool"
    )(inputs)
    for suffix, channels, activation in (
        ("se_reduce", max(1, int(filters * se_ratio)), "relu"),
        ("se_expand", inputs.shape[-1], "sigmoid"),
    ):
        gate = conv.Conv2D(
            channels,
            1,
            activation=activation,
            kernel_initializer=initializer,
            name=prefix + suffix,
        )(gate)
    return keras.layers.Multiply(name=prefix + "se_multiply")([inputs, gate])


def _shortcut(
    inputs: keras.KerasTensor,
    filters: int,
    strides: int,
    resnet_d: bool,
    prefix: str,
    bn_kwargs: dict,
) -> keras.KerasTensor:
    """Projection shortcut: 1x1/strides conv-BN, or ResNet-D's pool first.

    ResNet-D (He et al. 2019, used by GR when sk_ratio > 0) average-pools
    2x2 before a 1x1/1 conv: stride 1 pools with SAME (padding excluded
    from the mean); stride s > 1 pads one zero row/column after, then pools
    2x2/s VALID (an odd side's last window averages one zero in), as GR.
    """
    conv_strides = strides
    if resnet_d:
        pool_padding = "same"
        if strides > 1:
            inputs = keras.layers.ZeroPadding2D(
                ((0, 1), (0, 1)), name=prefix + "projection_pool_pad"
            )(inputs)
            pool_padding = "valid"
        inputs = keras.layers.AveragePooling2D(
            pool_size=2,
            strides=strides,
            padding=pool_padding,
            name=prefix + "projection_pool",
        )(inputs)
        conv_strides = 1
    shortcut = conv2d_fixed_padding(
        inputs, filters, 1, conv_strides, prefix + "projection_conv2d"
    )
    return batch_norm_relu(
        shortcut,
        prefix + "projection_batch_normalization",
        relu=False,
        zero_init=False,
        **bn_kwargs,
    )


def residual_block(
    inputs: keras.KerasTensor,
    filters: int,
    strides: int,
    use_projection: bool,
    bottleneck: bool,
    prefix: str,
    bn_kwargs: dict,
    *,
    sk_ratio: float = 0.0,
    se_ratio: float = 0.0,
) -> keras.KerasTensor:
    """One basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1) block, v1.5.

    The stride sits on the (first) 3x3 conv; the branch's last BN has gamma
    initialised to 0, so at init the block returns relu(shortcut). As in GR,
    sk_ratio > 0 gives the projection shortcut ResNet-D's average pool and
    turns a bottleneck's 3x3 conv-BN-ReLU into an SK conv (basic blocks
    keep plain convs); se_ratio > 0 applies SE after the branch's last BN.
    """
    out_filters = filters * BOTTLENECK_EXPANSION if bottleneck else filters
    shortcut = inputs
    if use_projection:
        shortcut = _shortcut(
            inputs, out_filters, strides, sk_ratio > 0, prefix, bn_kwargs
        )
    if bottleneck:
        convs = ((filters, 1, 1), (filters, 3, strides), (out_filters, 1, 1))
    else:
        convs = ((filters, 3, strides), (out_filters, 3, 1))
    outputs = inputs
    for index, (conv_filters, kernel_size, conv_strides) in enumerate(convs):
        if bottleneck and index == 1 and sk_ratio > 0:
            outputs = _selective_kernel_conv(
                outputs, conv_filters, conv_strides, sk_ratio, prefix, bn_kwargs
            )
            continue
        is_last = index == len(convs) - 1
        outputs = conv2d_fixed_padding(
            outputs,
            conv_filters,
            kernel_size,
            conv_strides,
            f"{prefix}conv2d_{index}",
        )
        outputs = batch_norm_relu(
            outputs,
            f"{prefix}batch_normalization_{index}",
            relu=not is_last,
            zero_init=is_last,
            **bn_kwargs,
        )
    if se_ratio > 0:
        outputs = _squeeze_excitation(outputs, filters, se_ratio, prefix)
    outputs = keras.layers.Add(name=prefix + "add")([outputs, shortcut])
    return keras.layers.ReLU(name=prefix + "output")(outputs)
