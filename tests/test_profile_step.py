"""benchmarks/profile_step.py and op_profile.py: the op categories, the
busy-time union, a profile of a function whose ops are known, and one tiny
CLI run whose derived figures are recomputed here. Timings are never
asserted."""

from __future__ import annotations

import glob
import importlib
import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
# The smoke run takes about 30 s on the 2-core VM; the limit leaves room.
TIMEOUT_SECONDS = 300


@pytest.fixture(scope="module")
def op_profile():
    """The analysis module (the script itself defines absl flags, which
    other benchmark modules imported by tests in this process also do)."""
    sys.path.insert(0, BENCHMARKS)
    return importlib.import_module("op_profile")


@pytest.mark.parametrize(
    "name, op_type, expected",
    [
        ("model/conv/Conv2D", "_MklNativeConv2D", "conv_forward"),
        (
            "grad/Conv2DBackpropInput",
            "Conv2DBackpropInput",
            "conv_input_gradient",
        ),
        ("g/c", "_MklNativeConv2DBackpropFilter", "conv_filter_gradient"),
        ("m/bn", "_MklNativeFusedBatchNormV3", "batch_norm_forward"),
        ("g/bn", "FusedBatchNormGradV3", "batch_norm_backward"),
        ("head/MatMul", "_MklMatMul", "dense"),
        ("m/Cast_1", "Cast", "cast"),
        ("while/body/_1/while/LARS/mul_3", "Mul", "optimizer"),
        ("LARS/Square", "Square", "optimizer"),
        ("model/relu", "Relu", "elementwise_and_other"),
        ("model/NOTLARS/mul", "Mul", "elementwise_and_other"),
        # simclr_tf.models.conv's custom gradients, by name scope.
        (
            "conv_input_gradient/Conv2D",
            "_MklNativeConv2D",
            "conv_input_gradient",
        ),
        (
            "while/body/_1/conv_input_gradient_12/Conv2D",
            "_MklNativeConv2D",
            "conv_input_gradient",
        ),
        ("conv_filter_gradient_3/MatMul", "_MklMatMul", "conv_filter_gradient"),
        ("model/my_conv_input_gradient_x/Conv2D", "Conv2D", "conv_forward"),
    ],
)
def test_categorize(op_profile, name, op_type, expected):
    assert op_profile.categorize(name, op_type) == expected


def test_custom_conv_gradient_ops_are_categorized_as_gradients(op_profile):
    from simclr_tf.models import conv

    layers = [
        conv.Conv2D(4, 3, padding="same", use_bias=False),
        conv.Conv2D(4, 3, padding="same", use_bias=False),
    ]

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layers[1](layers[0](x))
        return y, tape.gradient(y, [x, layers[0].kernel, layers[1].kernel])

    graph = step.get_concrete_function(tf.TensorSpec((1, 5, 5, 4))).graph
    categories = [
        op_profile.categorize(op.name, op.type)
        for op in graph.get_operations()
        if op.type == "Conv2D"
    ]
    # Two forward convs; two input gradients as forward convs (stride 1).
    assert sorted(categories) == sorted(
        ["conv_forward"] * 2 + ["conv_input_gradient"] * 2
    )


def test_union_of_intervals_counts_overlaps_once(op_profile):
    # [0, 4) and [2, 6) overlap in [2, 4); [10, 11) is apart; [3, 5) inside.
    intervals = [(10, 11), (0, 4), (2, 6), (3, 5)]
    ps = 10**12
    seconds = op_profile._union_seconds(
        [(a * ps, b * ps) for a, b in intervals]
    )
    assert seconds == pytest.approx(7.0)


def test_breakdown_of_a_profile_with_known_ops(op_profile, tmp_path):
    images = tf.random.uniform((8, 32, 32, 16), seed=1)
    kernel = tf.random.uniform((3, 3, 16, 32), seed=2)
    matrix = tf.random.uniform((256, 256), seed=3)

    @tf.function
    def work(images, kernel, matrix):
        conv = tf.nn.conv2d(images, kernel, 1, "SAME")
        with tf.name_scope(op_profile.OPTIMIZER_SCOPE):
            update = matrix * 0.5
        return tf.reduce_sum(conv) + tf.reduce_sum(tf.matmul(update, matrix))

    work(images, kernel, matrix)  # Trace outside the profile.
    tf.profiler.experimental.start(str(tmp_path))
    for _ in range(3):
        work(images, kernel, matrix).numpy()
    tf.profiler.experimental.stop()
    (path,) = glob.glob(str(tmp_path / "plugins/profile/*/*.xplane.pb"))
    breakdown = op_profile.op_breakdown(path)
    seconds = breakdown["op_seconds"]
    assert set(seconds) == set(op_profile.CATEGORIES)
    for category in ("conv_forward", "dense", "optimizer"):
        assert seconds[category] > 0, category
    for category in ("conv_input_gradient", "batch_norm_forward"):
        assert seconds[category] == 0, category
    assert sum(breakdown["op_fraction"].values()) == pytest.approx(1.0)
    # The union of op intervals never exceeds their sum.
    assert 0 < breakdown["busy_seconds"] <= sum(seconds.values()) + 1e-12
    types = {name for name, _, _ in breakdown["top_ops"]}
    assert any("Conv2D" in name for name in types)


def test_profile_cli_rows_and_derived_figures(tmp_path, op_profile):
    output = tmp_path / "profile.json"
    command = [sys.executable, os.path.join(BENCHMARKS, "profile_step.py")]
    command += ["--models=demo", "--precisions=float32", "--batch=4"]
    command += ["--steps=1", "--warmup=0", "--matmul_size=64"]
    command += [f"--logdir={tmp_path / 'logs'}", f"--output={output}"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=TIMEOUT_SECONDS
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    for key in ("git_sha", "versions", "device", "date", "flags"):
        assert key in report, key
    (row,) = report["rows"]
    assert os.path.exists(row["xspace"])
    seconds = row["op_seconds"]
    for category in ("conv_forward", "conv_input_gradient", "optimizer"):
        assert seconds[category] > 0, category
    assert row["images_per_second"] == pytest.approx(
        4 / row["wall_seconds"], rel=1e-9
    )
    assert 0 <= row["idle_fraction"] < 1
    sys.path.insert(0, BENCHMARKS)
    common = importlib.import_module("common")
    forward = 2 * 4 * common.forward_flops_per_image(**common.MODELS["demo"])
    peak = row["matmul_peak_flops_per_second"]
    for category, rate in row["conv"].items():
        expected = forward / seconds[category]
        assert rate["flops_per_second"] == pytest.approx(expected, rel=1e-9)
        assert rate["fraction_of_matmul_peak"] == pytest.approx(
            expected / peak, rel=1e-9
        )
