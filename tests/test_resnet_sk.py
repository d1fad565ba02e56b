"""Tests for SimCLRv2's SK / SE encoders in simclr_tf.models.resnet.

References: a parameter count summed from the architecture description, the
SimCLRv2 README table (google-research/simclr), and numpy re-computations of
the SK gate, the SE gate and the ResNet-D average-pool shortcut.
"""

from __future__ import annotations

import functools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import optim
from simclr_tf.models import resnet

SK_RATIO = 0.0625  # SimCLRv2's sk_ratio (GR flag default for its checkpoints)
EPSILON = 1e-5
# He et al. 2016, Table 1: blocks per stage; True = bottleneck.
PAPER_STAGES = {
    18: ([2, 2, 2, 2], False),
    50: ([3, 4, 6, 3], True),
    101: ([3, 4, 23, 3], True),
    152: ([3, 8, 36, 3], True),
}


def _conv(kernel, c_in, c_out):
    return kernel * kernel * c_in * c_out  # convs have no bias


def _bn(channels):
    return 2 * channels  # gamma and beta (moving stats are not trainable)


def paper_parameter_count(
    depth, width, sk_ratio=0.0, se_ratio=0.0, cifar=False
):
    """Trainable parameters summed from the SimCLRv2 architecture description.

    SK: ResNet-D stem (3x3/2 to c/2, 3x3 to c/2, 3x3 to c, each conv+BN)
    unless CIFAR; bottleneck 3x3 -> one 3x3 conv to 2*mid + BN, gate 1x1
    mid -> max(int(mid*r), 32) + BN, 1x1 -> 2*mid; avg-pool shortcuts add
    nothing. SE: 1x1 out -> max(1, int(mid*r)) and back, both with biases.
    """
    stages, bottleneck = PAPER_STAGES[depth]
    stem = round(64 * width)
    if cifar:
        total = _conv(3, 3, stem) + _bn(stem)
    elif sk_ratio > 0:
        half = stem // 2
        total = _conv(3, 3, half) + _conv(3, half, half) + _bn(half) * 2
        total += _conv(3, half, stem) + _bn(stem)
    else:
        total = _conv(7, 3, stem) + _bn(stem)
    c_in = stem
    for stage, num_blocks in enumerate(stages):
        mid = round(64 * 2**stage * width)
        out = 4 * mid if bottleneck else mid
        total += _conv(1, c_in, out) + _bn(out)  # first block's shortcut
        for block in range(num_blocks):
            block_in = c_in if block == 0 else out
            if not bottleneck:
                total += _conv(3, block_in, mid) + _bn(mid)
                total += _conv(3, mid, out) + _bn(out)
            else:
                total += _conv(1, block_in, mid) + _bn(mid)
                if sk_ratio > 0:
                    hidden = max(int(mid * sk_ratio), 32)
                    total += _conv(3, mid, 2 * mid) + _bn(2 * mid)
                    total += _conv(1, mid, hidden) + _bn(hidden)
                    total += _conv(1, hidden, 2 * mid)
                else:
                    total += _conv(3, mid, mid) + _bn(mid)
                total += _conv(1, mid, out) + _bn(out)
            if se_ratio > 0:
                hidden = max(1, int(mid * se_ratio))
                total += out * hidden + hidden + hidden * out + out
        c_in = out
    return total


@functools.cache
def _model_parameter_count(depth, width, sk_ratio, se_ratio, cifar):
    """Trainable parameters of an encoder built without allocating weights.

    Under StatelessScope(initialize_variables=False) Keras defers every
    variable's initialiser, so even R152 3x+SK (795M) only records shapes.
    """
    with keras.StatelessScope(initialize_variables=False):
        model = resnet.ResNet(
            depth, width, cifar, sk_ratio, se_ratio, input_shape=(32, 32, 3)
        )
        count = sum(math.prod(v.shape) for v in model.trainable_weights)
    keras.utils.clear_session()  # drops the uninitialised variables
    return count


def _randomise(model, rng):
    """Random BN statistics and affine params (all gammas) and SE biases."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
            layer.beta.assign(rng.normal(0, 0.5, channels))
            layer.moving_mean.assign(rng.normal(0, 0.5, channels))
            layer.moving_variance.assign(rng.uniform(0.5, 2, channels))
        elif isinstance(layer, keras.layers.Conv2D) and layer.use_bias:
            layer.bias.assign(rng.normal(0, 0.5, layer.bias.shape))
    return model


def _values(model, names, images):
    """Inference-mode outputs of the named layers, as float64 numpy arrays."""
    outputs = [model.get_layer(name).output for name in names]
    values = keras.Model(model.input, outputs)(images, training=False)
    return [np.asarray(value, np.float64) for value in values]


def _numpy_bn(model, name, values):
    """Inference BN of layer `name` in numpy."""
    bn = model.get_layer(name)
    mean, variance, gamma, beta = (
        np.asarray(v, np.float64)
        for v in (bn.moving_mean, bn.moving_variance, bn.gamma, bn.beta)
    )
    return (values - mean) / np.sqrt(variance + EPSILON) * gamma + beta


def _numpy_conv3x3(images, kernel, stride):
    """3x3 conv, zero-padded 1 before and 1 after, VALID, given stride."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    side = (padded.shape[1] - 3) // stride + 1
    output = np.zeros([images.shape[0], side, side, kernel.shape[-1]])
    for row in range(side):
        for col in range(side):
            r, c = row * stride, col * stride
            patch = padded[:, r : r + 3, c : c + 3, :]
            output[:, row, col] = np.einsum("bhwc,hwcf->bf", patch, kernel)
    return output


def _kernel(model, name):
    return np.asarray(model.get_layer(name).kernel, np.float64)


@pytest.fixture(scope="module")
def sk_se_cifar():
    """R50 x0.25, CIFAR stem, SK and SE; random BN stats and SE biases."""
    model = resnet.ResNet(50, 0.25, True, SK_RATIO, 0.25)
    return _randomise(model, np.random.default_rng(0))


@pytest.fixture(scope="module")
def sk_imagenet():
    """R50 x0.25 with SK and the ResNet-D (ImageNet) stem."""
    return resnet.ResNet(50, 0.25, False, SK_RATIO)


@pytest.mark.parametrize(
    "depth, width, sk_ratio, se_ratio, cifar",
    [
        (50, 1, SK_RATIO, 0.0, False),  # R50 1x+SK
        (152, 3, SK_RATIO, 0.0, False),  # R152 3x+SK
        (50, 0.25, 0.5, 0.25, True),  # SK gate above the 32 minimum, SE
        (18, 0.5, SK_RATIO, 0.0625, False),  # basic: D stem, no SK convs
        (50, 1, 0.0, 0.0625, False),  # SE alone
    ],
)
def test_resnet_sk_se_parameter_count_matches_closed_form(
    depth, width, sk_ratio, se_ratio, cifar
):
    expected = paper_parameter_count(depth, width, sk_ratio, se_ratio, cifar)
    count = _model_parameter_count(depth, width, sk_ratio, se_ratio, cifar)
    assert count == expected


@pytest.mark.parametrize(
    "depth, width, sk_ratio, millions",
    [
        # SimCLRv2 README table "Param (M)" (encoder only, no heads).
        (50, 1, SK_RATIO, 35),
        (101, 1, 0.0, 43),
        (101, 1, SK_RATIO, 65),
        (152, 1, 0.0, 58),
        (152, 1, SK_RATIO, 89),
        (152, 3, SK_RATIO, 795),
    ],
)
def test_resnet_sk_parameter_count_rounds_to_simclrv2_table(
    depth, width, sk_ratio, millions
):
    count = _model_parameter_count(depth, width, sk_ratio, 0.0, False)
    # The table gives whole millions.
    assert round(count / 1e6) == millions


def test_resnet_sk_gate_matches_numpy(sk_se_cifar):
    model, prefix = sk_se_cifar, "block_group2_block0_"  # stride-2 SK conv
    images = np.random.default_rng(1).random([2, 9, 9, 3], "float32")
    inputs, outputs = _values(
        model, [prefix + "relu_0", prefix + "sk_select"], images
    )
    streams = _numpy_conv3x3(inputs, _kernel(model, prefix + "sk_conv2d"), 2)
    streams = np.maximum(
        _numpy_bn(model, prefix + "sk_batch_normalization", streams), 0
    )
    first, second = np.split(streams, 2, axis=-1)
    pooled = (first + second).mean(axis=(1, 2))
    hidden = pooled @ _kernel(model, prefix + "sk_gate_conv2d_0")[0, 0]
    hidden = _numpy_bn(model, prefix + "sk_gate_batch_normalization", hidden)
    logits = (
        np.maximum(hidden, 0)
        @ _kernel(model, prefix + "sk_gate_conv2d_1")[0, 0]
    )
    logit_a, logit_b = np.split(logits, 2, axis=-1)
    weight_a = 1 / (1 + np.exp(logit_b - logit_a))  # 2-way softmax
    expected = (
        weight_a[:, None, None] * first + (1 - weight_a[:, None, None]) * second
    )
    assert expected.shape == (2, 5, 5, 32)
    # float32 conv / BN vs float64 numpy over <= 288 products.
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4)


def test_resnet_se_gate_matches_numpy(sk_se_cifar):
    model, prefix = sk_se_cifar, "block_group1_block1_"
    images = np.random.default_rng(2).random([2, 6, 6, 3], "float32")
    inputs, outputs = _values(
        model,
        [prefix + "batch_normalization_2", prefix + "se_multiply"],
        images,
    )
    reduce_layer = model.get_layer(prefix + "se_reduce")
    expand_layer = model.get_layer(prefix + "se_expand")
    pooled = inputs.mean(axis=(1, 2))
    hidden = pooled @ _kernel(model, prefix + "se_reduce")[0, 0]
    hidden = np.maximum(hidden + np.asarray(reduce_layer.bias), 0)
    logits = hidden @ _kernel(model, prefix + "se_expand")[0, 0]
    gate = 1 / (1 + np.exp(-(logits + np.asarray(expand_layer.bias))))
    expected = inputs * gate[:, None, None, :]
    # float32 reductions over <= 64 terms vs float64 numpy.
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


def test_resnet_sk_se_hidden_widths_follow_gr():
    model = resnet.ResNet(50, 0.25, True, 0.5, 0.25)
    # group 1: base 16 channels (64 out); group 4: base 128 (512 out).
    for group, base, sk_hidden in ((1, 16, 32), (4, 128, 64)):
        prefix = f"block_group{group}_block0_"
        sk_0 = model.get_layer(prefix + "sk_gate_conv2d_0").kernel.shape
        sk_1 = model.get_layer(prefix + "sk_gate_conv2d_1").kernel.shape
        se_reduce = model.get_layer(prefix + "se_reduce").kernel.shape
        assert tuple(sk_0) == (1, 1, base, sk_hidden)
        assert tuple(sk_1) == (1, 1, sk_hidden, 2 * base)
        assert tuple(se_reduce) == (1, 1, 4 * base, int(base * 0.25))


def _numpy_resnet_d_pool(values, stride):
    """GR's ResNet-D pool: 2x2/1 SAME (mean of valid cells) or pad 0|1 zeros
    then 2x2/s VALID (padded zeros counted in the mean)."""
    if stride == 1:
        side = values.shape[1]
        output = np.zeros_like(values)
        for row in range(side):
            for col in range(side):
                window = values[:, row : row + 2, col : col + 2, :]
                output[:, row, col] = window.mean(axis=(1, 2))
        return output
    padded = np.pad(values, ((0, 0), (0, 1), (0, 1), (0, 0)))
    side = (padded.shape[1] - 2) // stride + 1
    output = np.zeros([values.shape[0], side, side, values.shape[-1]])
    for row in range(side):
        for col in range(side):
            r, c = row * stride, col * stride
            window = padded[:, r : r + 2, c : c + 2, :]
            output[:, row, col] = window.mean(axis=(1, 2))
    return output


@pytest.mark.parametrize(
    "group, input_name, stride",
    [(1, "initial_max_pool", 1), (2, "block_group1", 2)],
)
def test_resnet_sk_average_pool_shortcut_matches_numpy(
    sk_se_cifar, group, input_name, stride
):
    model, prefix = sk_se_cifar, f"block_group{group}_block0_"
    images = np.random.default_rng(3).random([2, 9, 9, 3], "float32")
    inputs, outputs = _values(
        model, [input_name, prefix + "projection_batch_normalization"], images
    )
    pooled = _numpy_resnet_d_pool(inputs, stride)
    projected = pooled @ _kernel(model, prefix + "projection_conv2d")[0, 0]
    expected = _numpy_bn(
        model, prefix + "projection_batch_normalization", projected
    )
    assert expected.shape[1] == math.ceil(9 / stride)  # odd side: pad used
    # float32 conv / BN vs float64 numpy over <= 64 products.
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [64, 65])
def test_resnet_sk_resnet_d_stem_shapes_and_strides(sk_imagenet, size):
    model = sk_imagenet
    names = ["initial_conv2d_0", "initial_conv2d_1", "initial_conv2d"]
    kernels = [tuple(model.get_layer(name).kernel.shape) for name in names]
    assert kernels == [(3, 3, 3, 8), (3, 3, 8, 8), (3, 3, 8, 16)]
    images = np.zeros([1, size, size, 3], "float32")
    outputs = _values(model, names + ["initial_max_pool"], images)
    half, quarter = math.ceil(size / 2), math.ceil(size / 4)
    shapes = [tuple(value.shape) for value in outputs]
    # Stride 2 on the first 3x3 conv only, then the 3x3/2 max-pool.
    assert shapes == [
        (1, half, half, 8),
        (1, half, half, 8),
        (1, half, half, 16),
        (1, quarter, quarter, 16),
    ]


@pytest.mark.parametrize("cifar_stem", [True, False])
@pytest.mark.parametrize("size", [32, 64])
def test_resnet_sk_endpoints_have_expected_shapes(
    sk_se_cifar, sk_imagenet, cifar_stem, size
):
    model = sk_se_cifar if cifar_stem else sk_imagenet
    images = np.random.default_rng(4).random([2, size, size, 3], "float32")
    outputs = resnet.endpoints_model(model)(images)
    strides = [1, 1, 1, 2, 4, 8] if cifar_stem else [2, 4, 4, 8, 16, 32]
    channels = [16, 16, 64, 128, 256, 512]
    for name, stride, channel in zip(
        resnet.ENDPOINT_NAMES[:-1], strides, channels, strict=True
    ):
        side = math.ceil(size / stride)
        assert tuple(outputs[name].shape) == (2, side, side, channel), name
    features = np.asarray(outputs["final_avg_pool"])
    assert features.shape == (2, 512)
    assert np.all(np.isfinite(features))


def test_resnet_sk_se_gradients_are_finite_and_reach_gates():
    model = resnet.ResNet(50, 0.125, True, SK_RATIO, 0.25, global_bn=False)
    _randomise(model, np.random.default_rng(5))  # gamma != 0: branches live
    images = tf.constant(
        np.random.default_rng(6).random([4, 16, 16, 3], "float32")
    )
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(model(images, training=True)))
    gradients = tape.gradient(loss, model.trainable_variables)
    for variable, gradient in zip(
        model.trainable_variables, gradients, strict=True
    ):
        assert gradient is not None, variable.path
        assert np.all(np.isfinite(gradient)), variable.path
        if "sk_gate" in variable.path or "se_" in variable.path:
            assert np.any(np.asarray(gradient) != 0), variable.path


def test_resnet_sk_se_variables_follow_lars_exclusions(sk_se_cifar):
    patterns = optim.DEFAULT_EXCLUDE  # ("batch_normalization", "bias", ...)
    bn_paths = {
        v.path
        for layer in sk_se_cifar.layers
        if isinstance(layer, keras.layers.BatchNormalization)
        for v in layer.weights
    }
    for variable in sk_se_cifar.trainable_variables:
        excluded = any(pattern in variable.path for pattern in patterns)
        is_bn_or_bias = variable.path in bn_paths or variable.name == "bias"
        assert excluded == is_bn_or_bias, variable.path


def test_resnet_without_sk_se_builds_no_v2_layers():
    model = resnet.ResNet(50, 0.25)
    new_layers = [
        layer.name
        for layer in model.layers
        if any(tag in layer.name for tag in ("sk_", "se_", "_pool_pad"))
        or layer.name.startswith(("initial_conv2d_0", "initial_conv2d_1"))
        or isinstance(layer, keras.layers.AveragePooling2D)
    ]
    assert new_layers == []


def test_resnet_sk_se_config_round_trip_keeps_outputs(sk_se_cifar):
    clone = keras.Model.from_config(sk_se_cifar.get_config())
    clone.set_weights(sk_se_cifar.get_weights())
    images = np.random.default_rng(7).random([2, 8, 8, 3], "float32")
    np.testing.assert_array_equal(
        clone(images, training=False), sk_se_cifar(images, training=False)
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sk_ratio": -0.1}, r"sk_ratio=-0.1 must be >= 0"),
        ({"se_ratio": float("nan")}, r"se_ratio=nan must be >= 0"),
        ({"sk_ratio": 0.0625, "width_multiplier": 1 / 64}, r"ResNet-D stem"),
    ],
)
def test_resnet_rejects_bad_v2_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resnet.ResNet(50, **kwargs)
