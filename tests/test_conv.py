"""Tests for simclr_tf.models.conv: the custom-gradient conv2d against
TensorFlow's autodiff (float32, bfloat16, XLA, replicas), the choice of
gradient path, and the Keras layer inside the ResNets (same variables,
checkpoints and results as keras.layers.Conv2D).
"""

from __future__ import annotations

import gc
import itertools
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import virtual_devices

from simclr_tf import hardware
from simclr_tf.models import conv, conv_gradients, resnet

# Float32: the same products summed in another order (eps 6e-8, sums of at
# most ~1000 terms here), relative to the largest entry.
RELATIVE_TOLERANCE = 1e-5


def _assert_close(actual, expected, tolerance=RELATIVE_TOLERANCE):
    actual = np.asarray(tf.cast(actual, tf.float32))
    expected = np.asarray(tf.cast(expected, tf.float32))
    assert actual.shape == expected.shape
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= tolerance * scale


def _tensors(shape, dtype=tf.float32, seed=0):
    """x [2, H, W, 3], kernel [k, k, 3, 5], dy for the conv's output."""
    height, width, kernel_size, stride, padding = shape
    rng = np.random.default_rng(seed)
    x = tf.cast(rng.normal(size=(2, height, width, 3)), dtype)
    kernel = tf.cast(rng.normal(size=(kernel_size, kernel_size, 3, 5)), dtype)
    y = tf.nn.conv2d(x, kernel, stride, padding)
    dy = tf.cast(rng.normal(size=y.shape), dtype)
    return x, kernel, dy


def _gradients(function, x, kernel, dy):
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = function(x, kernel)
    return [y, *tape.gradient(y, [x, kernel], output_gradients=dy)]


def _reference(shape, x, kernel, dy):
    """TensorFlow's own conv2d, its output and autodiff gradients. float32
    goes through float64 and back: Eigen's kernels, which oneDNN never
    replaces (its AVX2 filter gradient of 1x1 stride-2 convs with few input
    channels was wrong on a Zen 3, benchmarks/RESULTS.md)."""

    def conv2d(x, k):
        return tf.nn.conv2d(x, k, shape[3], shape[4])

    if x.dtype != tf.float32:
        return _gradients(conv2d, x, kernel, dy)
    wide = [tf.cast(t, tf.float64) for t in (x, kernel, dy)]
    return [tf.cast(t, tf.float32) for t in _gradients(conv2d, *wide)]


def _custom(shape, methods=None):
    return lambda x, k: conv.conv2d(
        x, k, shape[3], shape[4], gradient="custom", methods=methods
    )


RESNET_SHAPES = [
    (28, 28, 3, 1, "SAME"),
    (30, 30, 3, 2, "VALID"),
    (28, 28, 1, 2, "VALID"),
    (14, 14, 3, 1, "SAME"),
    (9, 9, 3, 2, "VALID"),
    (7, 7, 1, 2, "VALID"),
    (7, 7, 1, 1, "SAME"),
    (19, 19, 7, 2, "VALID"),
    (8, 8, 5, 2, "SAME"),
]


@pytest.mark.parametrize("shape", RESNET_SHAPES, ids=str)
def test_conv2d_output_and_gradients_equal_autodiff(shape):
    x, kernel, dy = _tensors(shape)
    expected = _reference(shape, x, kernel, dy)
    # Every (input, filter) pairing, through the custom gradient.
    pairs = itertools.product(
        conv_gradients.INPUT_METHODS, conv_gradients.FILTER_METHODS
    )
    forward = tf.nn.conv2d(x, kernel, shape[3], shape[4])
    for methods in [None, *pairs]:
        if (
            methods
            and methods[1] == "tensorflow"
            and conv.tensorflow_filter_gradient_is_wrong(shape[2], shape[3], 3)
        ):
            continue  # TensorFlow's kernel is wrong here (conv.py)
        actual = _gradients(_custom(shape, methods), x, kernel, dy)
        np.testing.assert_array_equal(actual[0], forward)
        for got, want in zip(actual[1:], expected[1:], strict=True):
            _assert_close(got, want)


@pytest.mark.parametrize(
    "methods", [None, ("phases", "patches"), ("dilated", "swapped")]
)
@pytest.mark.parametrize(
    "shape", [(28, 28, 3, 1, "SAME"), (9, 9, 3, 2, "VALID")], ids=str
)
def test_bfloat16_gradients_are_within_bfloat16_rounding(shape, methods):
    x, kernel, dy = _tensors(shape, tf.bfloat16)
    up = [tf.cast(t, tf.float32) for t in (x, kernel, dy)]
    expected = _reference(shape, *up)
    actual = _gradients(_custom(shape, methods), x, kernel, dy)
    tensorflow = _reference(shape, x, kernel, dy)
    # TensorFlow's own bfloat16 filter gradient meets the bound only
    # through oneDNN: Eigen's sums in bfloat16 (2^-4.7 off here).
    checked = 3 if hardware.tensorflow_bf16_on_onednn() else 2
    for index, (got, want, theirs) in enumerate(
        zip(actual, expected, tensorflow, strict=True)
    ):
        assert got.dtype == tf.bfloat16
        # bfloat16 keeps 8 significant bits: rounding a float32-accumulated
        # result once costs up to 2^-8 of the entry, and oneDNN's bfloat16
        # kernels (TensorFlow's forward and gradients too) reach 0.8 x 2^-8
        # of the largest entry here; 2^-7 = 2 x 2^-8. Ours meets it on every
        # CPU, as do TensorFlow's output and input gradient.
        _assert_close(got, want, tolerance=2**-7)
        if index < checked:
            _assert_close(theirs, want, tolerance=2**-7)


@pytest.mark.parametrize("shape", RESNET_SHAPES, ids=str)
def test_float16_gradients_are_within_float16_rounding(shape):
    """float16 on a CPU: the default methods (neither gradient TensorFlow's
    kernel) against the float32 autodiff of the same values."""
    x, kernel, dy = _tensors(shape, tf.float16)
    up = [tf.cast(t, tf.float32) for t in (x, kernel, dy)]
    expected = _reference(shape, *up)
    actual = _gradients(_custom(shape), x, kernel, dy)
    tensorflow = _reference(shape, x, kernel, dy)
    for got, want, theirs in zip(actual, expected, tensorflow, strict=True):
        assert got.dtype == tf.float16
        # float16 keeps 11 significant bits: one rounding of a float32-
        # accumulated result costs up to 2^-11 of the entry (~1 x 2^-11 of
        # the largest entry measured here); ours must stay within 2^-10.
        # TensorFlow's own float16 kernels meet that with oneDNN's float16
        # (AVX512-FP16) and err by up to ~2^-8 without it (Eigen's, on
        # other CPUs): they are held to 2^-7 only, as a sanity check.
        _assert_close(got, want, tolerance=2**-10)
        _assert_close(theirs, want, tolerance=2**-7)


def test_gradients_under_jit_compile_equal_autodiff():
    shape = (9, 9, 3, 2, "VALID")
    x, kernel, dy = _tensors(shape)
    expected = _reference(shape, x, kernel, dy)
    for methods in [("conv", "patches"), ("phases", "swapped")]:
        compiled = tf.function(
            lambda x, k, m=methods: _gradients(_custom(shape, m), x, k, dy),
            jit_compile=True,
        )
        actual = compiled(x, kernel)
        for got, want in zip(actual, expected, strict=True):
            _assert_close(got, want)


def test_traced_gradient_leaves_no_graph_behind():
    """A traced function's graph is freed with the function.

    tf.custom_gradient registers each traced call's gradient function in
    TensorFlow's global gradient registry, closed over the forward tensors,
    so every graph traced with it stayed in memory for the process's life.
    The gradient lives on the tape only: no op's gradient is overridden
    (`_gradient_op_type`), the graph goes with its function, and the tape
    still takes the custom gradient (its name scope, its values)."""
    shape = (9, 9, 3, 2, "VALID")
    x, kernel, dy = _tensors(shape)
    expected = _reference(shape, x, kernel, dy)
    function = tf.function(
        lambda x, k: _gradients(_custom(shape, ("conv", "patches")), x, k, dy)
    )
    concrete = function.get_concrete_function(x, kernel)
    operations = concrete.graph.get_operations()
    assert any(f"{conv.FILTER_GRADIENT_SCOPE}/" in op.name for op in operations)
    assert not [
        op.name for op in operations if "_gradient_op_type" in op.node_def.attr
    ]
    for got, want in zip(function(x, kernel), expected, strict=True):
        _assert_close(got, want)
    graph = weakref.ref(concrete.graph)
    del function, concrete, operations
    gc.collect()
    assert graph() is None


def _conv_model(inputs_shape):
    """Two custom convs (3x3/1, 3x3/2 VALID) and a sum, for replicas."""
    inputs = keras.Input(inputs_shape)
    hidden = conv.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    outputs = conv.Conv2D(6, 3, strides=2, use_bias=False)(hidden)
    return keras.Model(inputs, outputs)


def test_replica_gradients_sum_to_the_single_device_gradient():
    images = np.random.default_rng(3).normal(size=(8, 9, 9, 2))
    images = images.astype("float32")
    reference_model = _conv_model((9, 9, 2))

    def loss_fn(model, batch):
        # Squared, so each replica's kernel gradient depends on its data.
        return tf.reduce_sum(tf.square(model(batch))) / 8.0

    with tf.GradientTape() as tape:
        loss = loss_fn(reference_model, images)
    expected = tape.gradient(loss, reference_model.trainable_variables)
    strategy = tf.distribute.MirroredStrategy(virtual_devices(2))
    with strategy.scope():
        model = _conv_model((9, 9, 2))
        model.set_weights(reference_model.get_weights())
    paths = []

    def replica_step(batch):
        paths.append(conv.gradient_path())
        with tf.GradientTape() as tape:
            loss = loss_fn(model, batch)
        return tape.gradient(loss, model.trainable_variables)

    dataset = tf.data.Dataset.from_tensor_slices(images).batch(8)
    batch = next(iter(strategy.experimental_distribute_dataset(dataset)))
    per_replica = tf.function(lambda b: strategy.run(replica_step, (b,)))(batch)
    summed = [
        strategy.reduce("SUM", gradient, axis=None) for gradient in per_replica
    ]
    assert paths == ["custom", "custom"]
    for got, want in zip(summed, expected, strict=True):
        _assert_close(got, want)


def test_gradient_path_is_custom_on_cpus_and_tensorflow_elsewhere():
    assert conv.gradient_path() == "custom"
    assert conv.gradient_path("/cpu:0") == "custom"
    assert conv.gradient_path("/gpu:0") == "tensorflow"
    assert (
        conv.gradient_path("/job:worker/replica:0/task:1/device:TPU:3")
        == "tensorflow"
    )
    seen = {}

    @tf.function
    def on_second_cpu():
        with tf.device("/cpu:1"):
            seen["cpu:1"] = conv.gradient_path()
        with tf.device("/gpu:0"):
            seen["gpu:0"] = conv.gradient_path()
        return tf.constant(0)

    @tf.function(jit_compile=True)
    def compiled():
        seen["xla"] = conv.gradient_path()
        seen["xla, cpu"] = conv.gradient_path("/cpu:0")
        return tf.constant(0)

    on_second_cpu()
    compiled()
    assert seen == {
        "cpu:1": "custom",
        "gpu:0": "tensorflow",
        "xla": "tensorflow",
        "xla, cpu": "tensorflow",
    }


def _gradient_op_types(jit_compile):
    """Op types in the traced gradient of a stride-1 3x3 layer."""
    layer = conv.Conv2D(4, 3, padding="same", use_bias=False)
    layer.build((2, 7, 7, 3))

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        return tape.gradient(y, [x, layer.kernel])

    function = tf.function(step, jit_compile=jit_compile)
    graph = function.get_concrete_function(tf.TensorSpec((2, 7, 7, 3))).graph
    return {op.type for op in graph.get_operations()}


def test_layer_traces_the_path_gradient_path_chooses():
    # CPU: the stride-1 input gradient is a forward conv (METHODS), the
    # filter gradient TensorFlow's kernel; under XLA both are TensorFlow's.
    assert conv.methods_for(3, 1) == ("conv", "tensorflow")
    custom = _gradient_op_types(jit_compile=False)
    assert "Conv2DBackpropInput" not in custom
    assert "Conv2DBackpropFilter" in custom
    compiled = _gradient_op_types(jit_compile=True)
    assert {"Conv2DBackpropInput", "Conv2DBackpropFilter"} <= compiled


@pytest.mark.parametrize("bf16_on_onednn", [True, False])
@pytest.mark.parametrize("shape", RESNET_SHAPES, ids=str)
def test_half_precision_gradients_are_never_tensorflows_kernels(
    shape, bf16_on_onednn, monkeypatch
):
    """TensorFlow's float16 gradient kernels run at 0.2-10% of the forward's
    rate on CPUs: in float16 every ResNet conv's gradients are matmuls or
    forward convs; a method the float32 path already chose stays. bfloat16
    does the same where TensorFlow runs it on Eigen, and keeps the float32
    choice where oneDNN runs it."""
    monkeypatch.setattr(conv, "_bf16_on_onednn", lambda: bf16_on_onednn)
    _, _, kernel_size, stride, _ = shape
    float32 = conv.methods_for(kernel_size, stride)
    float16 = conv.methods_for(kernel_size, stride, tf.float16)
    assert float16[0] in conv_gradients.INPUT_METHODS
    assert float16[1] in conv_gradients.FILTER_METHODS
    assert "tensorflow" not in float16
    for ours, theirs in zip(float16, float32, strict=True):
        assert theirs == "tensorflow" or ours == theirs
    bfloat16 = conv.methods_for(kernel_size, stride, tf.bfloat16)
    assert bfloat16 == (float32 if bf16_on_onednn else float16)


@pytest.mark.parametrize("avx2", [True, False])
def test_strided_1x1_with_few_channels_avoids_onednns_avx2_filter_gradient(
    avx2, monkeypatch
):
    """oneDNN's AVX2 filter gradient was wrong for strided 1x1 convs with
    1-5 input channels: there those get "patches", elsewhere the float32
    choice stands."""
    monkeypatch.setattr(conv, "_float32_on_onednn_avx2", lambda: avx2)
    tensorflow = conv.methods_for(1, 2)
    assert tensorflow[1] == "tensorflow"
    for channels in (1, 3, conv.ONEDNN_AVX2_FILTER_MIN_CHANNELS - 1):
        expected = (tensorflow[0], "patches") if avx2 else tensorflow
        assert conv.methods_for(1, 2, tf.float32, channels) == expected
    minimum = conv.ONEDNN_AVX2_FILTER_MIN_CHANNELS
    assert conv.methods_for(1, 2, tf.float32, minimum) == tensorflow
    assert conv.methods_for(3, 2, tf.float32, 3) == conv.methods_for(3, 2)
    assert conv.methods_for(1, 1, tf.float32, 3) == conv.methods_for(1, 1)


def _avoided(kernel_size, stride, in_channels):
    """Whether `conv2d` keeps this float32 conv's filter gradient off
    TensorFlow's kernel on this machine (methods_for)."""
    methods = conv.methods_for(kernel_size, stride, tf.float32, in_channels)
    return methods[1] != "tensorflow"


def test_tensorflows_filter_gradient_is_wrong_only_where_conv2d_avoids_it():
    """TensorFlow's raw float32 Conv2DBackpropFilter against its float64
    one (Eigen: oneDNN has no float64 kernels) over kernels 1, 3 and 7,
    strides 1 and 2, both paddings, even and odd sides and 1-16 input
    channels: every case off by more than float32 rounding is one that
    `conv.methods_for` sends elsewhere here. On a CPU where oneDNN runs
    float32 with AVX2 kernels that is the strided 1x1 convs with few input
    channels (a Zen 3: 110 of 1512 such cases wrong, all of them there);
    elsewhere no case may be wrong."""
    rng = np.random.default_rng(0)
    wrong = []
    cases = itertools.product(
        (7, 8, 14, 28), (1, 3, 7), (1, 2), conv.PADDINGS, (1, 2, 3, 5, 7, 8, 16)
    )
    for side, kernel_size, stride, padding, in_channels in cases:
        x = rng.normal(size=(2, side, side, in_channels)).astype(np.float32)
        sizes = (kernel_size, kernel_size, in_channels, 8)
        out = conv_gradients.axis(side, kernel_size, stride, padding).output
        dy = rng.normal(size=(2, out, out, 8)).astype(np.float32)

        def filter_gradient(x, dy, sizes=sizes, stride=stride, padding=padding):
            return tf.raw_ops.Conv2DBackpropFilter(
                input=x,
                filter_sizes=sizes,
                out_backprop=dy,
                strides=[1, stride, stride, 1],
                padding=padding,
            ).numpy()

        got = filter_gradient(x, dy)
        want = filter_gradient(x.astype(np.float64), dy.astype(np.float64))
        if np.abs(got - want).max() > RELATIVE_TOLERANCE * np.abs(want).max():
            wrong.append((side, kernel_size, stride, padding, in_channels))
    assert [
        case for case in wrong if not _avoided(case[1], case[2], case[4])
    ] == []


def test_mixed_float16_layer_traces_no_backprop_kernel_on_cpu():
    # conftest restores float32. On a CPU the filter gradient is a forward
    # conv or a matmul too; a GPU or XLA keeps its own kernels.
    keras.mixed_precision.set_global_policy("mixed_float16")
    custom = _gradient_op_types(jit_compile=False)
    assert not {"Conv2DBackpropInput", "Conv2DBackpropFilter"} & custom
    compiled = _gradient_op_types(jit_compile=True)
    assert {"Conv2DBackpropInput", "Conv2DBackpropFilter"} <= compiled


def test_conv2d_rejects_unknown_padding_and_unknown_sizes():
    x, kernel, _ = _tensors((7, 7, 3, 1, "SAME"))
    with pytest.raises(ValueError, match="padding='FULL'.*'SAME' or 'VALID'"):
        conv.conv2d(x, kernel, 1, "full")
    function = tf.function(
        lambda x: conv.conv2d(x, kernel, 1, "SAME", gradient="custom")
    )
    with pytest.raises(ValueError, match="needs static H, W, C"):
        function.get_concrete_function(tf.TensorSpec((None, None, 7, 3)))


def test_layer_falls_back_to_keras_for_dilation():
    x = np.random.default_rng(5).normal(size=(1, 9, 9, 2))
    layer = conv.Conv2D(3, 3, dilation_rate=2, padding="same")
    reference = keras.layers.Conv2D(3, 3, dilation_rate=2, padding="same")
    layer.build(x.shape)
    reference.build(x.shape)
    reference.set_weights(layer.get_weights())
    np.testing.assert_array_equal(layer(x), reference(x))


def test_layer_config_round_trips():
    layer = conv.Conv2D(7, 3, strides=2, padding="valid", use_bias=False)
    config = keras.saving.serialize_keras_object(layer)
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is conv.Conv2D
    assert restored.get_config() == layer.get_config()


def _build_resnet(monkeypatch, layer_class, **kwargs):
    """resnet.ResNet with its Conv2D layers of `layer_class`."""
    with monkeypatch.context() as patch:
        patch.setattr(conv, "Conv2D", layer_class)
        return resnet.ResNet(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"depth": 18, "width_multiplier": 0.25, "cifar_stem": True},
        {"depth": 50, "width_multiplier": 0.25, "sk_ratio": 0.0625}
        | {"se_ratio": 0.25},
    ],
    ids=["r18", "r50_sk_se"],
)
def test_resnet_variables_and_checkpoint_keys_match_keras_conv2d(
    monkeypatch, tmp_path, kwargs
):
    ours = resnet.ResNet(**kwargs)
    keras_model = _build_resnet(monkeypatch, keras.layers.Conv2D, **kwargs)
    convs = [
        layer for layer in ours.layers if isinstance(layer, keras.layers.Conv2D)
    ]
    assert convs and all(type(layer) is conv.Conv2D for layer in convs)
    for attribute in ("path", "shape"):
        assert [getattr(v, attribute) for v in ours.weights] == [
            getattr(v, attribute) for v in keras_model.weights
        ]
    assert ours.count_params() == keras_model.count_params()
    keys = []
    for name, model in (("ours", ours), ("keras", keras_model)):
        path = tf.train.Checkpoint(model=model).write(str(tmp_path / name))
        keys.append([key for key, _ in tf.train.list_variables(path)])
    assert keys[0] == keys[1]


@pytest.mark.parametrize(
    "methods",
    [None, ("phases", "patches"), ("dilated", "swapped")],
    ids=["default", "phases_patches", "dilated_swapped"],
)
def test_resnet_step_equals_keras_conv2d_resnet(monkeypatch, methods):
    if methods is not None:  # Every conv of the model by these methods.
        monkeypatch.setattr(conv, "DEFAULT_METHODS", {1: methods, 2: methods})
    kwargs = {"depth": 18, "width_multiplier": 0.25, "cifar_stem": True}
    kwargs["input_shape"] = (28, 28, 1)
    ours = resnet.ResNet(**kwargs)
    reference = _build_resnet(monkeypatch, keras.layers.Conv2D, **kwargs)
    rng = np.random.default_rng(6)
    # The initial conv kernels; random BN gammas (zero-initialised ones
    # included, so that every conv gets a gradient) and betas.
    for variable in ours.weights:
        if variable.path.endswith("gamma"):
            variable.assign(rng.uniform(0.5, 1.5, variable.shape))
        elif variable.path.endswith("beta"):
            variable.assign(rng.normal(0, 0.3, variable.shape))
    reference.set_weights(ours.get_weights())
    images = rng.random((4, 28, 28, 1)).astype("float32")
    targets = rng.normal(size=(4, 128)).astype("float32")

    def step(model):
        with tf.GradientTape() as tape:
            features = model(images, training=True)
            loss = tf.reduce_mean(tf.square(features - targets))
        return features, tape.gradient(loss, model.trainable_variables)

    traced = tf.function(step).get_concrete_function(ours)
    features, gradients = traced()
    expected_features, expected = tf.function(step)(reference)
    # The forward passes run the same ops: equal bits.
    np.testing.assert_array_equal(features, expected_features)
    # Gradients: float32 summation order in the convs' gradients, carried
    # back through 8 blocks (up to 2.5e-6 of a variable's largest entry
    # measured).
    for got, want in zip(gradients, expected, strict=True):
        _assert_close(got, want)
    # TensorFlow's input-gradient kernel only where METHODS keep it.
    strided = sum(
        layer.strides == (2, 2)
        for layer in ours.layers
        if isinstance(layer, keras.layers.Conv2D)
    )
    backprop_inputs = sum(
        op.type == "Conv2DBackpropInput" for op in traced.graph.get_operations()
    )
    assert backprop_inputs == (strided if methods is None else 0)
