"""Where google-research/simclr (GR) keeps each variable, and what it implies.

GR's TF2 `model.Model` (the released SimCLRv1/v2 SavedModels, and run.py's
checkpoints) stores its variables under attribute paths such as
`resnet_model/block_groups/0/layers/0/conv2d_bn_layers/1/bn/gamma`: attribute
names and list indices of its Keras 2 layers. `infer_architecture` reads the
architecture from these paths and their shapes (gr_arch.py);
`layout` maps every GR path of an architecture to the simclr_tf variable
that holds the same weights. Pure functions on names and shapes: reading
files is gr_checkpoint.py's job.
"""

from __future__ import annotations

from simclr_tf.models import gr_architecture as gr_arch
from simclr_tf.models import resnet

# A simclr_tf variable: (component of SimCLRModel, layer name, attribute).
Target = tuple[str, str, str]

BATCH_NORM_ATTRIBUTES = ("gamma", "beta", "moving_mean", "moving_variance")


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


def _stem_layout(
    architecture: gr_arch.Architecture,
) -> dict[str, Target]:
    """GR's initial_conv_relu_max_pool list: convs, BNs, identities, pool."""
    if architecture.sk_ratio > 0 and not architecture.cifar_stem:
        convs = {0: "initial_conv2d_0", 2: "initial_conv2d_1", 4: None}
        norms = {1: "_0", 3: "_1", 6: ""}
    else:
        convs, norms = {0: None}, {2: ""}
    layout = {}
    for index, name in convs.items():
        layout |= _conv(f"{gr_arch.STEM}/{index}", name or "initial_conv2d")
    for index, suffix in norms.items():
        layout |= _batch_norm(
            f"{gr_arch.STEM}/{index}",
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
    name, convs, norms, sk_index, se_path = gr_arch.BRANCHES[
        gr_arch.branch_kind(bottleneck, sk)
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


def _encoder_layout(
    architecture: gr_arch.Architecture,
) -> dict[str, Target]:
    """Stem and every block of the ResNet."""
    blocks, bottleneck = resnet.BLOCKS_PER_GROUP[architecture.resnet_depth]
    sk, se = architecture.sk_ratio > 0, architecture.se_ratio > 0
    layout = _stem_layout(architecture)
    for group, count in enumerate(blocks):
        for block in range(count):
            gr_block = gr_arch.block_path(group, block)
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


def layout(architecture: gr_arch.Architecture) -> dict[str, Target]:
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
            gr_layer = f"{gr_arch.HEAD}/{j}"
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
            result[f"{gr_arch.SUPERVISED}/{attribute}"] = (
                "supervised_head",
                "dense",
                attribute,
            )
    return result
