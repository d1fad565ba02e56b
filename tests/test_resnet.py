"""Tests for simclr_tf.models.resnet against closed forms and properties."""

from __future__ import annotations

import functools
import math

import keras
import numpy as np
import pytest

from simclr_tf.models import blocks, resnet

# He et al. 2016, Table 1: blocks per stage; True = bottleneck (1x1,3x3,1x1).
PAPER_STAGES = {
    18: ([2, 2, 2, 2], False),
    34: ([3, 4, 6, 3], False),
    50: ([3, 4, 6, 3], True),
    101: ([3, 4, 23, 3], True),
    152: ([3, 8, 36, 3], True),
    200: ([3, 24, 36, 3], True),
}


def closed_form_parameter_count(depth, width, cifar_stem, channels):
    """Trainable parameters summed from the architecture description.

    Convs have no bias (k*k*c_in*c_out); each BN has gamma and beta (2*c);
    the first block of each stage has a 1x1 projection conv + BN.
    """
    stages, bottleneck = PAPER_STAGES[depth]
    stem_channels = round(64 * width)
    kernel = 3 if cifar_stem else 7
    total = kernel * kernel * channels * stem_channels + 2 * stem_channels
    in_channels = stem_channels
    for stage, num_blocks in enumerate(stages):
        mid = round(64 * 2**stage * width)
        out = 4 * mid if bottleneck else mid
        total += in_channels * out + 2 * out  # projection shortcut
        for block in range(num_blocks):
            block_in = in_channels if block == 0 else out
            if bottleneck:
                total += block_in * mid + 2 * mid
                total += 9 * mid * mid + 2 * mid
                total += mid * out + 2 * out
            else:
                total += 9 * block_in * mid + 2 * mid
                total += 9 * mid * out + 2 * out
        in_channels = out
    return total


@functools.cache
def _model_parameter_count(depth, width, cifar_stem, channels):
    """Trainable parameters of a built (never called) encoder, cached."""
    model = resnet.ResNet(
        depth, width, cifar_stem, input_shape=(None, None, channels)
    )
    count = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    keras.utils.clear_session()
    return count


@pytest.fixture(scope="module")
def resnet50_quarter():
    """A ResNet-50 at width 0.25 and BN decay 0.8, shared by read-only tests."""
    return resnet.ResNet(50, 0.25, batch_norm_decay=0.8)


@pytest.fixture(scope="module")
def resnet18_quarter_cifar():
    """A ResNet-18 at width 0.25 with the CIFAR stem, for read-only tests."""
    return resnet.ResNet(18, 0.25, cifar_stem=True)


def _layer_outputs(model, names):
    """A model returning the outputs of the named layers of `model`."""
    outputs = [model.get_layer(name).output for name in names]
    return keras.Model(model.input, outputs)


@pytest.mark.parametrize(
    "depth, width, cifar_stem, channels",
    [
        (50, 1, False, 3),
        (50, 2, False, 3),
        (18, 1, True, 3),
        (34, 0.25, False, 1),
    ],
)
def test_resnet_parameter_count_matches_closed_form(
    depth, width, cifar_stem, channels
):
    expected = closed_form_parameter_count(depth, width, cifar_stem, channels)
    assert _model_parameter_count(depth, width, cifar_stem, channels) == (
        expected
    )


@pytest.mark.parametrize(
    "depth, width, cifar_stem, published",
    [
        (50, 1, False, 23.5e6),  # torchvision R50 without fc: 23.51M
        (50, 2, False, 94e6),  # SimCLR v1 Table B.1 / REFERENCE.md
        (18, 1, True, 11.2e6),  # R18 without fc, CIFAR stem
    ],
)
def test_resnet_parameter_count_matches_published(
    depth, width, cifar_stem, published
):
    count = _model_parameter_count(depth, width, cifar_stem, 3)
    # Published counts are rounded to 3 significant figures (<= 0.5%).
    assert abs(count - published) / published < 0.005


@pytest.mark.parametrize(
    "depth, cifar_stem, size",
    [(50, False, 224), (50, False, 65), (18, True, 32), (18, True, 31)],
)
def test_resnet_endpoints_have_expected_strides(
    depth, cifar_stem, size, request
):
    fixture = "resnet50_quarter" if depth == 50 else "resnet18_quarter_cifar"
    model = request.getfixturevalue(fixture)
    outputs = resnet.endpoints_model(model)(np.zeros([1, size, size, 3]))
    strides = [1, 1, 1, 2, 4, 8] if cifar_stem else [2, 4, 4, 8, 16, 32]
    expansion = 4 if depth >= 50 else 1
    channels = [16, 16] + [16 * 2**g * expansion for g in range(4)]
    for name, stride, channel in zip(
        resnet.ENDPOINT_NAMES[:-1], strides, channels, strict=True
    ):
        side = math.ceil(size / stride)  # fixed / SAME padding: ceil(n / s)
        assert tuple(outputs[name].shape) == (1, side, side, channel), name
    assert tuple(outputs["final_avg_pool"].shape) == (1, channels[-1])


def test_resnet_final_avg_pool_is_spatial_mean_of_block_group4(
    resnet18_quarter_cifar,
):
    model = resnet18_quarter_cifar
    images = np.random.default_rng(0).random([2, 16, 16, 3], "float32")
    outputs = resnet.endpoints_model(model)(images, training=False)
    expected = np.asarray(outputs["block_group4"]).mean(axis=(1, 2))
    # float32 mean over 4 values: reduction-order error only.
    np.testing.assert_allclose(
        outputs["final_avg_pool"], expected, rtol=1e-6, atol=1e-6
    )


def _randomise_batch_norms(model, rng):
    """Random statistics and affine params, except zero-init gammas."""
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        channels = layer.gamma.shape[0]
        if np.any(np.asarray(layer.gamma) != 0):
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
            layer.beta.assign(rng.normal(0, 0.5, channels))
        layer.moving_mean.assign(rng.normal(0, 0.5, channels))
        layer.moving_variance.assign(rng.uniform(0.5, 2, channels))


def _numpy_projection_shortcut(model, prefix, inputs, stride):
    """relu(BN_inference(1x1 conv with stride)) written out in numpy."""
    kernel = np.asarray(model.get_layer(prefix + "projection_conv2d").kernel)
    bn = model.get_layer(prefix + "projection_batch_normalization")
    conv = inputs[:, ::stride, ::stride, :] @ kernel[0, 0]
    normalised = (conv - np.asarray(bn.moving_mean)) / np.sqrt(
        np.asarray(bn.moving_variance) + 1e-5
    )
    return np.maximum(
        normalised * np.asarray(bn.gamma) + np.asarray(bn.beta), 0
    )


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_blocks_reduce_to_shortcut_at_init(depth):
    model = resnet.ResNet(depth, 0.25, cifar_stem=True)
    _randomise_batch_norms(model, np.random.default_rng(1))
    blocks = resnet.BLOCKS_PER_GROUP[depth][0]
    names, inputs_of = ["initial_max_pool"], {}
    for group, num_blocks in enumerate(blocks, start=1):
        for block in range(num_blocks):
            inputs_of[(group, block)] = names[-1]
            names.append(f"block_group{group}_block{block}_output")
    images = np.random.default_rng(2).random([2, 8, 8, 3], "float32")
    values = _layer_outputs(model, names)(images, training=False)
    values = dict(zip(names, [np.asarray(v) for v in values], strict=True))
    for (group, block), input_name in inputs_of.items():
        prefix = f"block_group{group}_block{block}_"
        if block > 0:  # identity shortcut: relu(x + 0) = x, as x >= 0
            np.testing.assert_array_equal(
                values[prefix + "output"], values[input_name]
            )
            continue
        stride = 1 if group == 1 else 2
        expected = _numpy_projection_shortcut(
            model, prefix, values[input_name], stride
        )
        # float32 matmul vs conv kernel: summation-order error only.
        np.testing.assert_allclose(
            values[prefix + "output"], expected, rtol=1e-4, atol=1e-5
        )


def _numpy_conv_fixed_padding(images, kernel, stride):
    """Zero-pad (k-1)//2 before and the rest after, then a VALID conv."""
    size = kernel.shape[0]
    before = (size - 1) // 2
    after = size - 1 - before
    padded = np.pad(images, ((0, 0), (before, after), (before, after), (0, 0)))
    out_side = (padded.shape[1] - size) // stride + 1
    output = np.zeros([images.shape[0], out_side, out_side, kernel.shape[-1]])
    for row in range(out_side):
        for col in range(out_side):
            patch = padded[
                :,
                row * stride : row * stride + size,
                col * stride : col * stride + size,
                :,
            ]
            output[:, row, col] = np.einsum("bhwc,hwcf->bf", patch, kernel)
    return output


@pytest.mark.parametrize("kernel_size", [1, 3, 4, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("side", [7, 8])
def test_conv2d_fixed_padding_matches_numpy(kernel_size, stride, side):
    inputs = keras.Input((side, side, 2))
    outputs = blocks.conv2d_fixed_padding(inputs, 3, kernel_size, stride, "c")
    model = keras.Model(inputs, outputs)
    images = np.random.default_rng(0).random([1, side, side, 2], "float32")
    expected = _numpy_conv_fixed_padding(
        images, np.asarray(model.get_layer("c").kernel), stride
    )
    assert expected.shape[1] == math.ceil(side / stride)
    # float32 conv vs float64 numpy over <= 98 products.
    np.testing.assert_allclose(model(images), expected, rtol=1e-5, atol=1e-5)


def test_resnet_conv_kernels_follow_fan_in_variance_scaling(
    resnet18_quarter_cifar,
):
    model = resnet18_quarter_cifar
    kernel = np.asarray(model.get_layer("block_group4_block1_conv2d_0").kernel)
    fan_in = np.prod(kernel.shape[:-1])  # 3 * 3 * 128
    # VarianceScaling(1, fan_in, truncated_normal): std sqrt(1 / fan_in),
    # truncated at 2 std of the untruncated normal (std / 0.8796).
    assert abs(kernel.std() / np.sqrt(1 / fan_in) - 1) < 0.02  # 147k draws
    assert np.abs(kernel).max() <= 2 * np.sqrt(1 / fan_in) / 0.87962 + 1e-7


def test_resnet_convs_have_no_bias(resnet18_quarter_cifar):
    model = resnet18_quarter_cifar
    convs = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D)
    ]
    assert len(convs) == 1 + 2 * 8 + 4  # stem, 8 basic blocks, 4 shortcuts
    assert all(not conv.use_bias for conv in convs)


def test_resnet_batch_norm_paths_are_matched_by_lars_exclusion(
    resnet50_quarter,
):
    model = resnet50_quarter
    norms = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert len(norms) == 1 + 3 * 16 + 4  # stem, 16 blocks, 4 shortcuts
    bn_paths = {v.path for norm in norms for v in norm.weights}
    for variable in model.weights:
        is_bn = "batch_normalization" in variable.path
        assert is_bn == (variable.path in bn_paths), variable.path
    assert all(norm.momentum == 0.8 and norm.epsilon == 1e-5 for norm in norms)
    assert all(norm.synchronized for norm in norms)


def test_resnet_zero_gamma_only_on_last_branch_batch_norm(resnet50_quarter):
    for layer in resnet50_quarter.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            is_last_in_branch = layer.name.endswith("batch_normalization_2")
            expected = 0.0 if is_last_in_branch else 1.0
            np.testing.assert_array_equal(layer.gamma, expected, layer.name)


def test_resnet_rejects_unknown_depth():
    with pytest.raises(ValueError, match=r"depth=42.*\[18, 34, 50, 101"):
        resnet.ResNet(42)


def test_endpoints_model_rejects_foreign_model():
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Flatten()(inputs))
    with pytest.raises(ValueError, match="initial_conv"):
        resnet.endpoints_model(model)
