"""A SimCLR network's sizes without building it: parameters, features and
the activations a training step keeps for its backward pass.

Walks the layers models/resnet.py, blocks.py and heads.py build (the same
constants), counting per example the elements of every tensor a gradient
needs: each conv's input (the zero-padded copy for strided k > 1 convs),
each BN's input, each ReLU's output, the max-pool's input and output, the
selective-kernel streams, the squeeze-excitation input and the heads'
inputs. Tensors no gradient reads (a BN output feeding a ReLU, sums,
pooled means) are not counted. Checked against TensorFlow's allocator on
the CPU (tests/test_planning.py, docs/memory.md): within 11% of the peak of a
compiled forward + backward pass at batch 64, gradients excluded.
"""

from __future__ import annotations

import dataclasses

from simclr_tf.models import blocks, resnet


@dataclasses.dataclass(frozen=True, kw_only=True)
class NetworkFacts:
    """Sizes of one SimCLR network (encoder, projection and linear heads).

    Attributes:
      trainable_parameters: elements of the trainable variables.
      non_trainable_parameters: BN moving means and variances.
      kernel_parameters: conv and dense kernel elements (cast to the
        compute dtype in every step under mixed precision).
      saved_per_example: elements kept for the backward pass per input
        image, by stage: (stem, block_group1..4, heads).
      largest_tensor: elements of the largest activation per image.
      feature_dim: F, the width of final_avg_pool.
    """

    trainable_parameters: int
    non_trainable_parameters: int
    kernel_parameters: int
    saved_per_example: tuple[int, ...]
    largest_tensor: int
    feature_dim: int

    @property
    def parameters(self) -> int:
        return self.trainable_parameters + self.non_trainable_parameters


class _Walker:
    """Accumulates parameters and saved activations layer by layer."""

    def __init__(self) -> None:
        self.trainable = 0
        self.non_trainable = 0
        self.kernels = 0
        self.saved = 0
        self.largest = 0

    def keep(self, elements: int) -> None:
        """A tensor of `elements` per example that a gradient reads."""
        self.saved += elements
        self.largest = max(self.largest, elements)

    def conv(self, side: int, cin: int, cout: int, kernel: int, stride: int):
        """conv2d_fixed_padding + its BN; returns the output side.

        Keeps the padded input (strided k > 1 convs pad first; a k = 1
        pad of zeros is forwarded, not copied) and the conv's output (the
        BN's input); the caller keeps the conv's own input.
        """
        weights = kernel * kernel * cin * cout
        self.trainable += weights
        self.kernels += weights
        if stride > 1 and kernel > 1:
            self.keep((side + kernel - 1) ** 2 * cin)
        out_side = -(-side // stride)
        self.batch_norm(cout)
        self.keep(out_side * out_side * cout)
        return out_side

    def batch_norm(self, channels: int, center: bool = True) -> None:
        self.trainable += channels * (2 if center else 1)
        self.non_trainable += 2 * channels

    def dense(self, cin: int, cout: int, bias: bool = False) -> None:
        self.trainable += cin * cout + (cout if bias else 0)
        self.kernels += cin * cout


def _stem(
    walk: _Walker, size: int, channels: int, width: int, cifar: bool, sk: bool
) -> int:
    """The stem; returns the side of its output (after the max-pool)."""
    side = size
    if sk and not cifar:
        side = walk.conv(side, channels, width // 2, 3, 2)
        walk.keep(side * side * (width // 2))  # ReLU
        walk.conv(side, width // 2, width // 2, 3, 1)
        walk.keep(side * side * (width // 2))
        walk.conv(side, width // 2, width, 3, 1)
    else:
        side = walk.conv(side, channels, width, *((3, 1) if cifar else (7, 2)))
    walk.keep(side * side * width)  # ReLU output = max-pool input
    if not cifar:
        side = -(-side // 2)
        walk.keep(side * side * width)  # max-pool output
    return side


def _selective_kernel(
    walk: _Walker, side: int, filters: int, stride: int, sk_ratio: float
) -> int:
    """SK conv: 2 streams, BN-ReLU, gate, softmax mix (blocks.py)."""
    side = walk.conv(side, filters, 2 * filters, 3, stride)
    walk.keep(side * side * 2 * filters)  # ReLU output (the streams)
    hidden = max(int(filters * sk_ratio), blocks.SK_MIN_HIDDEN)
    walk.conv(1, filters, hidden, 1, 1)
    walk.keep(hidden)
    walk.dense(hidden, 2 * filters)  # 1x1 conv to the logits, no BN
    walk.keep(side * side * 2 * filters)  # stacked streams (multiply)
    walk.keep(side * side * filters)  # mixed output = next conv's input
    return side


def _block(
    walk: _Walker,
    side: int,
    cin: int,
    filters: int,
    stride: int,
    projection: bool,
    bottleneck: bool,
    sk_ratio: float,
    se_ratio: float,
) -> tuple[int, int]:
    """One residual block; returns (side, channels) of its output."""
    out = filters * blocks.BOTTLENECK_EXPANSION if bottleneck else filters
    out_side = -(-side // stride)
    if projection:
        if sk_ratio > 0:  # ResNet-D: average-pool, then a 1x1/1 conv
            walk.keep(out_side * out_side * cin)
            walk.conv(out_side, cin, out, 1, 1)
        else:
            walk.conv(side, cin, out, 1, stride)
    if bottleneck:
        walk.conv(side, cin, filters, 1, 1)
        walk.keep(side * side * filters)
        if sk_ratio > 0:
            _selective_kernel(walk, side, filters, stride, sk_ratio)
        else:
            walk.conv(side, filters, filters, 3, stride)
            walk.keep(out_side * out_side * filters)
        walk.conv(out_side, filters, out, 1, 1)
    else:
        walk.conv(side, cin, filters, 3, stride)
        walk.keep(out_side * out_side * filters)
        walk.conv(out_side, filters, out, 3, 1)
    if se_ratio > 0:
        hidden = max(1, int(filters * se_ratio))
        walk.dense(out, hidden, bias=True)
        walk.dense(hidden, out, bias=True)
        walk.keep(out_side * out_side * out)  # BN output, multiplied
    walk.keep(out_side * out_side * out)  # the block's ReLU output
    return out_side, out


def _heads(
    walk: _Walker,
    features: int,
    proj_head_mode: str,
    proj_out_dim: int,
    num_proj_layers: int,
    ft_proj_selector: int,
    num_classes: int,
) -> None:
    """Projection head (heads.ProjectionHead) and supervised head."""
    layers = {"nonlinear": num_proj_layers, "linear": 1}.get(proj_head_mode, 0)
    widths = [features]
    for index in range(layers):
        last = index == layers - 1
        width = proj_out_dim if last else features
        walk.keep(widths[-1])  # the Dense input
        walk.dense(widths[-1], width)
        walk.batch_norm(width, center=not last)
        walk.keep(2 * width)  # BN input, ReLU output
        widths.append(width)
    if num_classes:
        walk.dense(widths[ft_proj_selector], num_classes, bias=True)
        walk.keep(widths[ft_proj_selector])


def network_facts(
    *,
    resnet_depth: int,
    width_multiplier: float,
    image_size: int,
    image_channels: int = 3,
    cifar_stem: bool = False,
    sk_ratio: float = 0.0,
    se_ratio: float = 0.0,
    proj_head_mode: str = "nonlinear",
    proj_out_dim: int = 128,
    num_proj_layers: int = 2,
    ft_proj_selector: int = 0,
    num_classes: int = 0,
) -> NetworkFacts:
    """Sizes of the SimCLRModel these arguments build (models/simclr.py).

    Args:
      resnet_depth, width_multiplier, cifar_stem, sk_ratio, se_ratio:
        the encoder, as resnet.ResNet takes them.
      image_size, image_channels: S and C of the [S, S, C] input images.
      proj_head_mode, proj_out_dim, num_proj_layers, ft_proj_selector:
        the heads, as SimCLRModel takes them.
      num_classes: classes of the supervised head (0: none).

    Returns:
      The NetworkFacts (element counts; multiply by dtype sizes).
    """
    walk = _Walker()
    stages = []
    side = _stem(
        walk,
        image_size,
        image_channels,
        round(64 * width_multiplier),
        cifar_stem,
        sk_ratio > 0,
    )
    stages.append(walk.saved)
    channels = round(64 * width_multiplier)
    group_blocks, bottleneck = resnet.BLOCKS_PER_GROUP[resnet_depth]
    for group, count in enumerate(group_blocks):
        filters = round(resnet.GROUP_BASE_WIDTHS[group] * width_multiplier)
        for index in range(count):
            side, channels = _block(
                walk,
                side,
                channels,
                filters,
                resnet.GROUP_STRIDES[group] if index == 0 else 1,
                index == 0,
                bottleneck,
                sk_ratio,
                se_ratio,
            )
        stages.append(walk.saved - sum(stages))
    _heads(
        walk,
        channels,
        proj_head_mode,
        proj_out_dim,
        num_proj_layers,
        ft_proj_selector,
        num_classes,
    )
    stages.append(walk.saved - sum(stages))
    return NetworkFacts(
        trainable_parameters=walk.trainable,
        non_trainable_parameters=walk.non_trainable,
        kernel_parameters=walk.kernels,
        saved_per_example=tuple(stages),
        largest_tensor=walk.largest,
        feature_dim=channels,
    )
