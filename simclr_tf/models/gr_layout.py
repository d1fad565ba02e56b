"""Where google-research/simclr (GR) keeps each variable, and what it implies.

GR's TF2 `model.Model` (the released SimCLRv1/v2 SavedModels, and run.py's
checkpoints) stores its variables under attribute paths such as
`resnet_model/block_groups/0/layers/0/conv2d_bn_layers/1/bn/gamma`: attribute
names and list indices of its Keras 2 layers. `infer_architecture` reads the
architecture from these paths and their shapes; `layout` maps every GR path
of an architecture to the simclr_tf variable that holds the same weights.
Pure functions on names and shapes: reading files is gr_import.py's job.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from simclr_tf.models import resnet

# A simclr_tf variable: (component of SimCLRModel, layer name, attribute).
Target = tuple[str, str, str]
Shapes = Mapping[str, tuple[int, ...]]

BATCH_NORM_ATTRIBUTES = ("gamma", "beta", "moving_mean", "moving_variance")
# SimCLRv2's ratio; any ratio <= 1/16 gives R50 1x the same (clamped) gates.
DEFAULT_SK_RATIO = 0.0625
_STEM = "resnet_model/initial_conv_relu_max_pool"
_GROUPS = "resnet_model/block_groups"
_HEAD = "_projection_head/linear_layers"
_SUPERVISED = "supervised_head/linear_layer/dense"
_BLOCK = re.compile(rf"^{_GROUPS}/(\d+)/layers/(\d+)/")
_STEM_CONV = re.compile(rf"^{_STEM}/(\d+)/conv2d/kernel$")
_HEAD_KERNEL = re.compile(rf"^{_HEAD}/(\d+)/dense/kernel$")
# The residual branch's GR list, by block kind: list attribute, then GR
# index -> our conv index, GR index -> our BN index, the SK_Conv2D's index
# and the SE layer's path under the block.
_BRANCHES = {
    "basic": (
        "conv2d_bn_layers",
        {0: 0, 2: 1},
        {1: 0, 3: 1},
        None,
        "se_layer",
    ),
    "bottleneck": (
        "conv_relu_dropblock_layers",
        {0: 0, 3: 1, 6: 2},
        {1: 0, 4: 1, 7: 2},
        None,
        "conv_relu_dropblock_layers/9",
    ),
    # DropBlock layers (no variables) sit after each conv-BN and the SK.
    "bottleneck_sk": (
        "conv_relu_dropblock_layers",
        {0: 0, 5: 2},
        {1: 0, 6: 2},
        3,
        "conv_relu_dropblock_layers/8",
    ),
}


def _branch_kind(bottleneck: bool, sk: bool) -> str:
    """The _BRANCHES key of a block."""
    if not bottleneck:
        return "basic"
    return "bottleneck_sk" if sk else "bottleneck"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Architecture:
    """A GR model's architecture, in simclr_tf's (= GR's) flag names.

    Attributes:
      ft_proj_selectors: the projection-head hiddens whose width fits the
        supervised head's kernel (several when widths agree); () without a
        supervised head.
    """

    resnet_depth: int
    width_multiplier: float
    cifar_stem: bool
    sk_ratio: float
    se_ratio: float
    proj_head_mode: str
    num_proj_layers: int
    proj_out_dim: int
    num_classes: int
    ft_proj_selectors: tuple[int, ...] = ()

    def describe(self) -> str:
        """One line, e.g. 'ResNet-50 1x, sk_ratio=0.0625, 3-layer head'."""
        parts = [f"ResNet-{self.resnet_depth} {self.width_multiplier:g}x"]
        if self.cifar_stem:
            parts.append("CIFAR stem")
        if self.sk_ratio:
            parts.append(f"sk_ratio={self.sk_ratio:g}")
        if self.se_ratio:
            parts.append(f"se_ratio={self.se_ratio:g}")
        if self.proj_head_mode == "none":
            parts.append("no projection head")
        else:
            parts.append(
                f"{self.num_proj_layers}-layer projection head to "
                f"{self.proj_out_dim}"
            )
        if self.num_classes:
            parts.append(f"{self.num_classes}-class supervised head")
        return ", ".join(parts)


def _shape(shapes: Shapes, path: str, what: str) -> tuple[int, ...]:
    """shapes[path], or a ValueError naming what is missing."""
    if path not in shapes:
        raise ValueError(f"no {what} ({path}) in the GR variables")
    return tuple(shapes[path])


def _blocks(shapes: Shapes) -> tuple[int, ...]:
    """Blocks per block group, from the `block_groups/g/layers/b` paths."""
    blocks: dict[int, set[int]] = {}
    for path in shapes:
        match = _BLOCK.match(path)
        if match:
            group, block = int(match.group(1)), int(match.group(2))
            blocks.setdefault(group, set()).add(block)
    return tuple(len(blocks.get(group, ())) for group in range(4))


def _depth(shapes: Shapes) -> tuple[int, bool]:
    """(depth, bottleneck) from the block counts and the block type."""
    counts = _blocks(shapes)
    bottleneck = any("/conv_relu_dropblock_layers/" in p for p in shapes)
    for depth, (blocks, is_bottleneck) in resnet.BLOCKS_PER_GROUP.items():
        if blocks == counts and is_bottleneck == bottleneck:
            return depth, bottleneck
    kind = "bottleneck" if bottleneck else "basic"
    raise ValueError(
        f"{counts} {kind} blocks per group is no GR ResNet depth "
        f"({sorted(resnet.BLOCKS_PER_GROUP)})"
    )


def _block(group: int, block: int) -> str:
    """GR's path of a block (group and block from 0)."""
    return f"{_GROUPS}/{group}/layers/{block}"


def _filters(shapes: Shapes, group: int, bottleneck: bool) -> int:
    """Base width of a group: its first block's first conv's outputs."""
    branch = "conv_relu_dropblock_layers" if bottleneck else "conv2d_bn_layers"
    path = f"{_block(group, 0)}/{branch}/0/conv2d/kernel"
    return _shape(shapes, path, f"block group {group + 1} conv")[-1]


def _ratio(widths: dict[int, int], minimum: int, default: float) -> float:
    """The ratio r with max(int(f * r), minimum) == widths[f] for every f.

    The widest unclamped group gives r; when every width is clamped to the
    minimum, `default` if it fits, else the largest ratio that does.
    """
    unclamped = {f: w for f, w in widths.items() if w > minimum}
    if unclamped:
        filters = max(unclamped)
        ratio = unclamped[filters] / filters
    elif all(max(int(f * default), minimum) == w for f, w in widths.items()):
        ratio = default
    else:
        ratio = minimum / max(widths)
    if any(max(int(f * ratio), minimum) != w for f, w in widths.items()):
        raise ValueError(
            f"gate widths {sorted(widths.values())} for group widths "
            f"{sorted(widths)} follow no single ratio"
        )
    return ratio


def _resnet_d(shapes: Shapes, bottleneck: bool) -> bool:
    """Whether shortcuts average-pool first (GR's sk_ratio > 0)."""
    shortcut = "projection_layers" if bottleneck else "shortcut_layers"
    for index in (0, 1):
        path = f"{_block(0, 0)}/{shortcut}/{index}/conv2d/kernel"
        if path in shapes:
            return index == 1
    raise ValueError("no projection shortcut conv in block group 1")


def _gate_ratio(
    shapes: Shapes, bottleneck: bool, sk: bool, filters: list[int]
) -> float:
    """sk_ratio from the SK gates' widths (basic blocks have no gates)."""
    if not sk:
        return 0.0
    if not bottleneck:
        return DEFAULT_SK_RATIO  # only the shortcuts show SK; any ratio.
    widths = {}
    for group, width in enumerate(filters):
        path = (
            f"{_block(group, 0)}/conv_relu_dropblock_layers/3/conv2d_0/kernel"
        )
        widths[width] = _shape(shapes, path, "SK gate")[-1]
    return _ratio(widths, resnet.SK_MIN_HIDDEN, DEFAULT_SK_RATIO)


def _se_ratio(
    shapes: Shapes, bottleneck: bool, sk: bool, filters: list[int]
) -> float:
    """se_ratio from the SE reduce widths; 0 without SE layers."""
    if not any("/se_reduce/" in path for path in shapes):
        return 0.0
    se_path = _BRANCHES[_branch_kind(bottleneck, sk)][4]
    widths = {}
    for group, width in enumerate(filters):
        path = f"{_block(group, 0)}/{se_path}/se_reduce/kernel"
        widths[width] = _shape(shapes, path, "SE layer")[-1]
    return _ratio(widths, 1, 0.25)


def _stem(shapes: Shapes, sk: bool) -> bool:
    """Whether the stem is GR's CIFAR stem (one 3x3 conv, no max-pool)."""
    kernels = sorted(
        (int(m.group(1)), tuple(shapes[p]))
        for p in shapes
        if (m := _STEM_CONV.match(p))
    )
    sizes = [kernel[0] for _, kernel in kernels]
    if sizes == [3, 3, 3] and sk:
        return False
    if sizes == [7] and not sk:
        return False
    if sizes == [3]:
        return True
    raise ValueError(
        f"stem convs of sizes {sizes} fit no GR stem "
        "(7x7; 3x3 CIFAR; three 3x3 with SK)"
    )


def _heads(shapes: Shapes, features: int) -> dict:
    """Projection and supervised head settings from their kernels."""
    kernels = {
        int(m.group(1)): tuple(shapes[p])
        for p in shapes
        if (m := _HEAD_KERNEL.match(p))
    }
    layers = len(kernels)
    if sorted(kernels) != list(range(layers)):
        raise ValueError(f"projection head layers {sorted(kernels)} have gaps")
    out_dim = kernels[layers - 1][-1] if layers else 128
    widths = [features] * layers + [out_dim if layers else features]
    settings = {
        "proj_head_mode": "nonlinear" if layers else "none",
        "num_proj_layers": max(layers, 1),
        "proj_out_dim": out_dim,
        "num_classes": 0,
    }
    kernel = shapes.get(f"{_SUPERVISED}/kernel")
    if kernel is not None:
        settings["num_classes"] = kernel[-1]
        settings["ft_proj_selectors"] = tuple(
            j for j, width in enumerate(widths) if width == kernel[0]
        )
        if not settings["ft_proj_selectors"]:
            raise ValueError(
                f"the supervised head reads {kernel[0]} features; no "
                f"projection-head layer has that width ({widths})"
            )
    return settings


def infer_architecture(shapes: Shapes) -> Architecture:
    """Reads a GR model's architecture from its variables' paths and shapes.

    Args:
      shapes: {GR path under the model: shape}, e.g.
        {"resnet_model/initial_conv_relu_max_pool/0/conv2d/kernel":
        (3, 3, 3, 64), ...}.

    Returns:
      The Architecture. A sk_ratio that only clamped gate widths show is
      reported as 0.0625 (SimCLRv2's, same weights and outputs).

    Raises:
      ValueError: the paths are not GR's layout; the message says what was
        found instead.
    """
    if not any(path.startswith("resnet_model/") for path in shapes):
        raise ValueError(
            "no GR ResNet (resnet_model/...) among the model's variables; "
            f"found e.g. {sorted(shapes)[:3]}"
        )
    depth, bottleneck = _depth(shapes)
    sk = _resnet_d(shapes, bottleneck)
    filters = [_filters(shapes, group, bottleneck) for group in range(4)]
    width = filters[0] / resnet.GROUP_BASE_WIDTHS[0]
    features = filters[3] * (resnet.BOTTLENECK_EXPANSION if bottleneck else 1)
    return Architecture(
        resnet_depth=depth,
        width_multiplier=int(width) if width == int(width) else width,
        cifar_stem=_stem(shapes, sk),
        sk_ratio=_gate_ratio(shapes, bottleneck, sk, filters),
        se_ratio=_se_ratio(shapes, bottleneck, sk, filters),
        **_heads(shapes, features),
    )


def _kernel(gr_path: str, layer: str) -> dict[str, Target]:
    """A GR Keras Conv2D's kernel at gr_path/kernel."""
    return {f"{gr_path}/kernel": ("encoder", layer, "kernel")}


def _conv(gr_path: str, layer: str) -> dict[str, Target]:
    """A GR Conv2dFixedPadding (its Conv2D is `conv2d`)."""
    return _kernel(f"{gr_path}/conv2d", layer)


def _batch_norm(
    gr_path: str, component: str, layer: str, center: bool = True
) -> dict[str, Target]:
    """A GR BatchNormRelu (its BatchNormalization is `bn`)."""
    attributes = [a for a in BATCH_NORM_ATTRIBUTES if center or a != "beta"]
    return {f"{gr_path}/bn/{a}": (component, layer, a) for a in attributes}


def _stem_layout(architecture: Architecture) -> dict[str, Target]:
    """GR's initial_conv_relu_max_pool list: convs, BNs, identities, pool."""
    if architecture.sk_ratio > 0 and not architecture.cifar_stem:
        convs = {0: "initial_conv2d_0", 2: "initial_conv2d_1", 4: None}
        norms = {1: "_0", 3: "_1", 6: ""}
    else:
        convs, norms = {0: None}, {2: ""}
    layout = {}
    for index, name in convs.items():
        layout |= _conv(f"{_STEM}/{index}", name or "initial_conv2d")
    for index, suffix in norms.items():
        layout |= _batch_norm(
            f"{_STEM}/{index}",
            "encoder",
            "initial_batch_normalization" + suffix,
        )
    return layout


def _shortcut_layout(
    gr_block: str, prefix: str, bottleneck: bool, sk: bool, strides: int
) -> dict[str, Target]:
    """The projection shortcut: [pad, avg-pool,] conv, BN."""
    name = "projection_layers" if bottleneck else "shortcut_layers"
    index = (2 if strides > 1 else 1) if sk else 0
    return _conv(
        f"{gr_block}/{name}/{index}", prefix + "projection_conv2d"
    ) | _batch_norm(
        f"{gr_block}/{name}/{index + 1}",
        "encoder",
        prefix + "projection_batch_normalization",
    )


def _sk_layout(gr_sk: str, prefix: str) -> dict[str, Target]:
    """GR's SK_Conv2D: stream conv-BN, gate conv-BN-conv."""
    return (
        _conv(f"{gr_sk}/conv2d_fixed_padding", prefix + "sk_conv2d")
        | _batch_norm(
            f"{gr_sk}/batch_norm_relu",
            "encoder",
            prefix + "sk_batch_normalization",
        )
        | _kernel(f"{gr_sk}/conv2d_0", prefix + "sk_gate_conv2d_0")
        | _batch_norm(
            f"{gr_sk}/batch_norm_relu_1",
            "encoder",
            prefix + "sk_gate_batch_normalization",
        )
        | _kernel(f"{gr_sk}/conv2d_1", prefix + "sk_gate_conv2d_1")
    )


def _se_layout(gr_se: str, prefix: str) -> dict[str, Target]:
    """GR's SE_Layer: se_reduce and se_expand convs with biases."""
    return {
        f"{gr_se}/{name}/{attribute}": ("encoder", prefix + name, attribute)
        for name in ("se_reduce", "se_expand")
        for attribute in ("kernel", "bias")
    }


def _branch_layout(
    gr_block: str, prefix: str, bottleneck: bool, sk: bool, se: bool
) -> dict[str, Target]:
    """The residual branch: GR list index -> our conv / BN / SK / SE."""
    name, convs, norms, sk_index, se_path = _BRANCHES[
        _branch_kind(bottleneck, sk)
    ]
    branch = f"{gr_block}/{name}"
    layout = {}
    for index, ours in convs.items():
        layout |= _conv(f"{branch}/{index}", f"{prefix}conv2d_{ours}")
    for index, ours in norms.items():
        layout |= _batch_norm(
            f"{branch}/{index}",
            "encoder",
            f"{prefix}batch_normalization_{ours}",
        )
    if sk_index is not None:
        layout |= _sk_layout(f"{branch}/{sk_index}", prefix)
    if se:
        layout |= _se_layout(f"{gr_block}/{se_path}", prefix)
    return layout


def _encoder_layout(architecture: Architecture) -> dict[str, Target]:
    """Stem and every block of the ResNet."""
    blocks, bottleneck = resnet.BLOCKS_PER_GROUP[architecture.resnet_depth]
    sk, se = architecture.sk_ratio > 0, architecture.se_ratio > 0
    layout = _stem_layout(architecture)
    for group, count in enumerate(blocks):
        for block in range(count):
            gr_block = _block(group, block)
            prefix = f"block_group{group + 1}_block{block}_"
            if block == 0:
                layout |= _shortcut_layout(
                    gr_block,
                    prefix,
                    bottleneck,
                    sk,
                    resnet.GROUP_STRIDES[group],
                )
            layout |= _branch_layout(gr_block, prefix, bottleneck, sk, se)
    return layout


def layout(architecture: Architecture) -> dict[str, Target]:
    """Every GR variable path of an architecture -> the simclr_tf variable.

    Args:
      architecture: from `infer_architecture` or `architecture_of`.

    Returns:
      {GR path: (component, layer name, attribute)}; component is
      "encoder" (a layer of SimCLRModel.encoder, by name),
      "projection_head" (an attribute of it, e.g. "dense_0") or
      "supervised_head" (its "dense").
    """
    result = _encoder_layout(architecture)
    if architecture.proj_head_mode != "none":
        layers = architecture.num_proj_layers
        for j in range(layers):
            gr_layer = f"{_HEAD}/{j}"
            result[f"{gr_layer}/dense/kernel"] = (
                "projection_head",
                f"dense_{j}",
                "kernel",
            )
            result |= _batch_norm(
                f"{gr_layer}/bn_relu",
                "projection_head",
                f"batch_normalization_{j}",
                center=j != layers - 1,
            )
    if architecture.num_classes:
        for attribute in ("kernel", "bias"):
            result[f"{_SUPERVISED}/{attribute}"] = (
                "supervised_head",
                "dense",
                attribute,
            )
    return result
