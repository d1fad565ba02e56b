"""ResNet v1 encoders (depths 18-200) as Keras functional models for SimCLR.

Follows google-research/simclr (GR): stride on the 3x3 conv ("v1.5"), fixed
padding for strided convs, zero-initialised last BN gamma in every residual
branch, optional CIFAR stem and fractional width multipliers, and SimCLRv2's
selective kernels (SK, with the ResNet-D stem and shortcuts) and
squeeze-excitation (SE). With sk_ratio = se_ratio = 0 the layers, names and
weights are those of the plain ResNet.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from simclr_tf.models import blocks

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
BOTTLENECK_EXPANSION = blocks.BOTTLENECK_EXPANSION
ENDPOINT_NAMES = (
    "initial_conv",
    "initial_max_pool",
    "block_group1",
    "block_group2",
    "block_group3",
    "block_group4",
    "final_avg_pool",
)


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
            outputs = blocks.conv2d_fixed_padding(
                outputs,
                filters // 2,
                3,
                conv_strides,
                f"initial_conv2d_{index}",
            )
            outputs = blocks.batch_norm_relu(
                outputs,
                f"initial_batch_normalization_{index}",
                relu=True,
                zero_init=False,
                **bn_kwargs,
            )
    outputs = blocks.conv2d_fixed_padding(
        outputs, filters, kernel_size, strides, "initial_conv2d"
    )
    # GR's initial_conv is the last stem conv's output, before its BN-ReLU.
    outputs = keras.layers.Identity(name="initial_conv")(outputs)
    outputs = blocks.batch_norm_relu(
        outputs,
        "initial_batch_normalization",
        relu=True,
        zero_init=False,
        **bn_kwargs,
    )
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
    ENDPOINT_NAMES (see `endpoints_model`); as in GR, `initial_conv` is the
    (last) stem conv's output before its BN-ReLU.
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
            outputs = blocks.residual_block(
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
