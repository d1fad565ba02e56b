"""google-research/simclr's (GR) architecture, read from its variables.

GR's TF2 `model.Model` stores its variables under attribute paths such as
`resnet_model/block_groups/0/layers/0/conv2d_bn_layers/1/bn/gamma`.
`infer_architecture` reads depth, width, stem, SK and SE ratios, the
projection head and the supervised head from these paths and their shapes.
Pure functions on names and shapes; gr_layout.py maps the variables.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from simclr_tf.models import blocks as blocks_lib
from simclr_tf.models import resnet

Shapes = Mapping[str, tuple[int, ...]]

# SimCLRv2's ratio; any ratio <= 1/16 gives R50 1x the same (clamped) gates.
DEFAULT_SK_RATIO = 0.0625
STEM = "resnet_model/initial_conv_relu_max_pool"
GROUPS = "resnet_model/block_groups"
HEAD = "_projection_head/linear_layers"
SUPERVISED = "supervised_head/linear_layer/dense"
_BLOCK = re.compile(rf"^{GROUPS}/(\d+)/layers/(\d+)/")
STEM_CONV = re.compile(rf"^{STEM}/(\d+)/conv2d/kernel$")
HEAD_KERNEL = re.compile(rf"^{HEAD}/(\d+)/dense/kernel$")
# The residual branch's GR list, by block kind: list attribute, then GR
# index -> our conv index, GR index -> our BN index, the SK_Conv2D's index
# and the SE layer's path under the block.
BRANCHES = {
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


def branch_kind(bottleneck: bool, sk: bool) -> str:
    """The BRANCHES key of a block."""
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


def block_path(group: int, block: int) -> str:
    """GR's path of a block (group and block from 0)."""
    return f"{GROUPS}/{group}/layers/{block}"


def _filters(shapes: Shapes, group: int, bottleneck: bool) -> int:
    """Base width of a group: its first block's first conv's outputs."""
    branch = "conv_relu_dropblock_layers" if bottleneck else "conv2d_bn_layers"
    path = f"{block_path(group, 0)}/{branch}/0/conv2d/kernel"
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
        path = f"{block_path(0, 0)}/{shortcut}/{index}/conv2d/kernel"
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
        gate = "conv_relu_dropblock_layers/3/conv2d_0/kernel"
        path = f"{block_path(group, 0)}/{gate}"
        widths[width] = _shape(shapes, path, "SK gate")[-1]
    return _ratio(widths, blocks_lib.SK_MIN_HIDDEN, DEFAULT_SK_RATIO)


def _se_ratio(
    shapes: Shapes, bottleneck: bool, sk: bool, filters: list[int]
) -> float:
    """se_ratio from the SE reduce widths; 0 without SE layers."""
    if not any("/se_reduce/" in path for path in shapes):
        return 0.0
    se_path = BRANCHES[branch_kind(bottleneck, sk)][4]
    widths = {}
    for group, width in enumerate(filters):
        path = f"{block_path(group, 0)}/{se_path}/se_reduce/kernel"
        widths[width] = _shape(shapes, path, "SE layer")[-1]
    return _ratio(widths, 1, 0.25)


def _stem(shapes: Shapes, sk: bool) -> bool:
    """Whether the stem is GR's CIFAR stem (one 3x3 conv, no max-pool)."""
    kernels = sorted(
        (int(m.group(1)), tuple(shapes[p]))
        for p in shapes
        if (m := STEM_CONV.match(p))
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
        if (m := HEAD_KERNEL.match(p))
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
    kernel = shapes.get(f"{SUPERVISED}/kernel")
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
