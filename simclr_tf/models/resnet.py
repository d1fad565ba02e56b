"""ResNet v1 encoders (depths 18-200) as Keras functional models for SimCLR.

Follows google-research/simclr (GR): stride on the 3x3 conv ("v1.5"), fixed
padding for strided convs, zero-initialised last BN gamma in every residual
branch, optional CIFAR stem and fractional width multipliers. Selective
kernels (SK) and squeeze-excitation (SE) of SimCLRv2 are not implemented yet.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from simclr_tf.models import batch_norm

BATCH_NORM_EPSILON = 1e-5
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
    return keras.layers.Conv2D(
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


def _residual_block(
    inputs: keras.KerasTensor,
    filters: int,
    strides: int,
    use_projection: bool,
    bottleneck: bool,
    prefix: str,
    bn_kwargs: dict,
) -> keras.KerasTensor:
    """One basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1) block, v1.5.

    The stride sits on the (first) 3x3 conv; the branch's last BN has gamma
    initialised to 0, so at init the block returns relu(shortcut).
    """
    out_filters = filters * BOTTLENECK_EXPANSION if bottleneck else filters
    shortcut = inputs
    if use_projection:
        shortcut = conv2d_fixed_padding(
            inputs, out_filters, 1, strides, prefix + "projection_conv2d"
        )
        shortcut = _batch_norm(
            shortcut,
            prefix + "projection_batch_normalization",
            relu=False,
            zero_init=False,
            **bn_kwargs,
        )
    if bottleneck:
        convs = ((filters, 1, 1), (filters, 3, strides), (out_filters, 1, 1))
    else:
        convs = ((filters, 3, strides), (out_filters, 3, 1))
    outputs = inputs
    for index, (conv_filters, kernel_size, conv_strides) in enumerate(convs):
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
    outputs = keras.layers.Add(name=prefix + "add")([outputs, shortcut])
    return keras.layers.ReLU(name=prefix + "output")(outputs)


def _stem(
    images: keras.KerasTensor,
    filters: int,
    cifar_stem: bool,
    bn_kwargs: dict,
) -> keras.KerasTensor:
    """7x7/2 conv, BN-ReLU, 3x3/2 max-pool; or 3x3/1 conv, BN-ReLU (CIFAR)."""
    kernel_size, strides = (3, 1) if cifar_stem else (7, 2)
    outputs = conv2d_fixed_padding(
        images, filters, kernel_size, strides, "initial_conv2d"
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
    """Raises ValueError for an unknown depth, bad width, or SK / SE use."""
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
    for argument, value, feature in (
        ("sk_ratio", sk_ratio, "selective kernels (SK)"),
        ("se_ratio", se_ratio, "squeeze-excitation (SE)"),
    ):
        if value > 0:
            raise ValueError(
                f"{argument}={value}: {feature} of the SimCLRv2 encoders are "
                f"not implemented yet (planned); use {argument}=0.0."
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

    Args:
        depth: one of 18, 34 (basic blocks), 50, 101, 152, 200 (bottleneck).
        width_multiplier: channel multiplier > 0; fractions (0.25, 0.5) give
            CPU-sized models.
        cifar_stem: use a 3x3/1 stem conv without max-pool (images <= 32 px).
        sk_ratio: selective-kernel ratio; must be 0 (not implemented yet).
        se_ratio: squeeze-excitation ratio; must be 0 (not implemented yet).
        input_shape: (H, W, C) of the images; None for any size.
        batch_norm_decay: BN moving-average momentum in [0, 1).
        global_bn: synchronise BN statistics across replicas.
        name: model name.

    Returns:
        A keras.Model mapping [B, H, W, C] float images in [0, 1] to
        [B, F] features, F = 512 * width (x4 for bottleneck depths).

    Raises:
        ValueError: unknown depth, width giving no channels, or SK / SE used.
    """
    _check_arguments(depth, width_multiplier, sk_ratio, se_ratio)
    blocks_per_group, bottleneck = BLOCKS_PER_GROUP[depth]
    bn_kwargs = {"batch_norm_decay": batch_norm_decay, "global_bn": global_bn}
    images = keras.Input(shape=tuple(input_shape), name="images")
    outputs = _stem(images, round(64 * width_multiplier), cifar_stem, bn_kwargs)
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
