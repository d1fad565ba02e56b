"""ResNet v1 encoders (depths 18-200) as Keras functional models for SimCLR.

Follows google-research/simclr (GR): stride on the 3x3 conv ("v1.5"), fixed
padding for strided convs, zero-initialised last BN gamma in every residual
branch, optional CIFAR stem and fractional width multipliers, and SimCLRv2's
selective kernels (SK, with the ResNet-D stem and shortcuts) and
squeeze-excitation (SE). With sk_ratio = se_ratio = 0 the layers, names and
weights are those of the plain ResNet. Convolutions are conv.Conv2D
(keras.layers.Conv2D whose gradients on CPUs come from conv.conv2d).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from simclr_tf.models import batch_norm, conv

BATCH_NORM_EPSILON = 1e-5
# Smallest hidden width of the SK gate (GR's SK_Conv2D min_dim).
SK_MIN_HIDDEN = 32
# Blocks per group and whether the block is a bottleneck (GR tf2/resnet.py).
BLOCKS_PER_GROUP = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
    200: ((3, 24, 36, 3), True),
}
GROUP_BASE_WIDTHS = (64, 128, 256, 512)
GROUP_STRIDES = (1, 2, 2, 2)
BOTTLENECK_EXPANSION = 4
ENDPOINT_NAMES = (
    "initial_conv",
    "initial_max_pool",
    "block_group1",
    "block_group2",
    "block_group3",
    "block_group4",
    "final_avg_pool",
)


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


def _batch_norm(
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
    streams = _batch_norm(
        streams,
        prefix + "sk_batch_normalization",
        relu=True,
        zero_init=False,
        **bn_kwargs,
    )
    gate = SelectiveKernelSqueeze(name=prefix + "sk_squeeze")(streams)
    hidden = max(int(filters * sk_ratio), SK_MIN_HIDDEN)
    gate = conv2d_fixed_padding(gate, hidden, 1, 1, prefix + "sk_gate_conv2d_0")
    gate = _batch_norm(
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
    return _batch_norm(
        shortcut,
        prefix + "projection_batch_normalization",
        relu=False,
        zero_init=False,
        **bn_kwargs,
    )


def _residual_block(
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
        outputs = _batch_norm(
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


def _stem(
    images: keras.KerasTensor,
    filters: int,
    cifar_stem: bool,
    bn_kwargs: dict,
    *,
    resnet_d: bool = False,
) -> keras.KerasTensor:
    """7x7/2 conv, BN-ReLU, 3x3/2 max-pool; or 3x3/1 conv, BN-ReLU (CIFAR).

    resnet_d (GR with sk_ratio > 0, non-CIFAR stem) replaces the 7x7/2 conv
    by three 3x3 convs of filters // 2 (stride 2), filters // 2 and filters
    channels, with BN-ReLU between them.
    """
    kernel_size, strides = (3, 1) if cifar_stem else (7, 2)
    outputs = images
    if resnet_d and not cifar_stem:
        kernel_size, strides = 3, 1
        for index, conv_strides in enumerate((2, 1)):
            outputs = conv2d_fixed_padding(
                outputs,
                filters // 2,
                3,
                conv_strides,
                f"initial_conv2d_{index}",
            )
            outputs = _batch_norm(
                outputs,
                f"initial_batch_normalization_{index}",
                relu=True,
                zero_init=False,
                **bn_kwargs,
            )
    outputs = conv2d_fixed_padding(
        outputs, filters, kernel_size, strides, "initial_conv2d"
    )
    outputs = _batch_norm(
        outputs,
        "initial_batch_normalization",
        relu=True,
        zero_init=False,
        **bn_kwargs,
    )
    outputs = keras.layers.Identity(name="initial_conv")(outputs)
    if not cifar_stem:
        outputs = keras.layers.MaxPooling2D(
            pool_size=3, strides=2, padding="same", name="initial_pool"
        )(outputs)
    return keras.layers.Identity(name="initial_max_pool")(outputs)


def _check_arguments(
    depth: int, width_multiplier: float, sk_ratio: float, se_ratio: float
) -> None:
    """Raises ValueError for an unknown depth, bad width or a negative ratio."""
    if depth not in BLOCKS_PER_GROUP:
        raise ValueError(
            f"depth={depth} is not a ResNet depth; use one of "
            f"{sorted(BLOCKS_PER_GROUP)}."
        )
    if round(64 * width_multiplier) < 1:
        raise ValueError(
            f"width_multiplier={width_multiplier} gives no stem channels "
            "(round(64 * width_multiplier) must be >= 1); use e.g. 0.25."
        )
    for argument, value in (("sk_ratio", sk_ratio), ("se_ratio", se_ratio)):
        if not value >= 0:
            raise ValueError(
                f"{argument}={value} must be >= 0 (0 = off); use e.g. "
                f"{argument}=0.0625 or {argument}=0."
            )
    if sk_ratio > 0 and round(64 * width_multiplier) < 2:
        raise ValueError(
            f"width_multiplier={width_multiplier} with sk_ratio={sk_ratio}: "
            "the ResNet-D stem needs round(64 * width_multiplier) >= 2; use "
            "e.g. width_multiplier=0.25."
        )


def ResNet(  # noqa: N802 - a model factory named like the class it builds.
    depth: int,
    width_multiplier: float = 1,
    cifar_stem: bool = False,
    sk_ratio: float = 0.0,
    se_ratio: float = 0.0,
    *,
    input_shape: Sequence[int | None] = (None, None, 3),
    batch_norm_decay: float = 0.9,
    global_bn: bool = True,
    name: str = "resnet",
) -> keras.Model:
    """Builds a ResNet v1.5 encoder mapping images to pooled features.

    Group g (1..4) has round(base_g * width_multiplier) channels, base =
    64/128/256/512, x4 at the output of bottleneck blocks; the first block of
    every group has a projection shortcut (as in GR, also in group 1 of
    ResNet-18/34). Named layers give the intermediate outputs listed in
    ENDPOINT_NAMES (see `endpoints_model`). Unlike GR, whose `initial_conv`
    is the raw conv output, ours is taken after the stem's BN-ReLU.
    SimCLRv2 (GR's checkpoints) uses sk_ratio=0.0625, se_ratio=0.

    Args:
        depth: one of 18, 34 (basic blocks), 50, 101, 152, 200 (bottleneck).
        width_multiplier: channel multiplier > 0; fractions (0.25, 0.5) give
            CPU-sized models.
        cifar_stem: use a 3x3/1 stem conv without max-pool (images <= 32 px).
        sk_ratio: selective kernels if > 0 (0 = off): ResNet-D stem (unless
            cifar_stem) and average-pool shortcuts, and in bottleneck blocks
            SK convs whose gate is max(int(filters * sk_ratio), 32) wide.
        se_ratio: squeeze-excitation if > 0 (0 = off), hidden width
            max(1, int(filters * se_ratio)) for a group of `filters` base
            channels.
        input_shape: (H, W, C) of the images; None for any size.
        batch_norm_decay: BN moving-average momentum in [0, 1).
        global_bn: synchronise BN statistics across replicas.
        name: model name.

    Returns:
        A keras.Model mapping [B, H, W, C] float images in [0, 1] to
        [B, F] features, F = 512 * width (x4 for bottleneck depths).

    Raises:
        ValueError: unknown depth, width giving no channels (or fewer than
            2 stem channels with SK), or a negative sk_ratio / se_ratio.
    """
    _check_arguments(depth, width_multiplier, sk_ratio, se_ratio)
    blocks_per_group, bottleneck = BLOCKS_PER_GROUP[depth]
    bn_kwargs = {"batch_norm_decay": batch_norm_decay, "global_bn": global_bn}
    images = keras.Input(shape=tuple(input_shape), name="images")
    outputs = _stem(
        images,
        round(64 * width_multiplier),
        cifar_stem,
        bn_kwargs,
        resnet_d=sk_ratio > 0,
    )
    for group, num_blocks in enumerate(blocks_per_group, start=1):
        filters = round(GROUP_BASE_WIDTHS[group - 1] * width_multiplier)
        for block in range(num_blocks):
            outputs = _residual_block(
                outputs,
                filters,
                strides=GROUP_STRIDES[group - 1] if block == 0 else 1,
                use_projection=block == 0,
                bottleneck=bottleneck,
                prefix=f"block_group{group}_block{block}_",
                bn_kwargs=bn_kwargs,
                sk_ratio=sk_ratio,
                se_ratio=se_ratio,
            )
        outputs = keras.layers.Identity(name=f"block_group{group}")(outputs)
    features = keras.layers.GlobalAveragePooling2D(name="final_avg_pool")(
        outputs
    )
    return keras.Model(images, features, name=name)


def endpoints_model(resnet: keras.Model) -> keras.Model:
    """Wraps a `ResNet` so it returns its named intermediate outputs.

    The new model shares the layers (and weights) of `resnet`.

    Args:
        resnet: a model built by `ResNet`.

    Returns:
        A keras.Model mapping the same images to a dict keyed by
        ENDPOINT_NAMES: [B, h, w, c] feature maps and [B, F] final_avg_pool.

    Raises:
        ValueError: `resnet` lacks one of the named layers.
    """
    layer_names = {layer.name for layer in resnet.layers}
    missing = [name for name in ENDPOINT_NAMES if name not in layer_names]
    if missing:
        raise ValueError(
            f"resnet={resnet.name!r} has no layers named {missing}; build it "
            "with simclr_tf.models.resnet.ResNet."
        )
    outputs = {name: resnet.get_layer(name).output for name in ENDPOINT_NAMES}
    return keras.Model(resnet.input, outputs, name=resnet.name + "_endpoints")
