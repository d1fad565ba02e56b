"""benchmarks/throughput.py and its PyTorch yardstick benchmarks/torch_step.py.

The analytic FLOP counter is checked against TensorFlow's own profiler on
the real Keras model; the torch twin against simclr_tf's parameter shapes,
a numpy NT-Xent and a numpy LARS step; and the CLI by one tiny subprocess
run whose derived figures are recomputed here. Timings are never asserted.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.models import simclr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
# The smoke run takes about 30 s on the 2-core VM; the limit leaves room.
TIMEOUT_SECONDS = 300


@pytest.fixture(scope="module")
def throughput():
    sys.path.insert(0, BENCHMARKS)
    return importlib.import_module("throughput")


@pytest.fixture(scope="module")
def torch_step():
    pytest.importorskip("torch")
    sys.path.insert(0, BENCHMARKS)
    return importlib.import_module("torch_step")


def _profiled_flops(model: simclr.SimCLRModel, shape: tuple) -> int:
    """Conv2D + MatMul float ops of one forward pass, by tf.profiler."""
    forward = tf.function(lambda images: model(images, training=False))
    graph = forward.get_concrete_function(tf.TensorSpec(shape)).graph
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    options["account_type_regexes"] = ["Conv2D", "MatMul"]
    return tf.compat.v1.profiler.profile(graph, options=options).total_float_ops


@pytest.mark.parametrize(
    "depth, width, cifar_stem, size, channels",
    [(18, 0.125, True, 12, 1), (50, 0.0625, False, 36, 3)],
)
def test_forward_flops_per_image_matches_tf_profiler(
    throughput, depth, width, cifar_stem, size, channels
):
    model = simclr.SimCLRModel(
        resnet_depth=depth,
        width_multiplier=width,
        cifar_stem=cifar_stem,
        image_channels=channels,
        proj_out_dim=8,
        num_proj_layers=3,
        num_classes=5,
    )
    profiled = _profiled_flops(model, (1, size, size, channels))
    counted = throughput.forward_flops_per_image(
        size,
        channels,
        depth,
        width,
        3,
        cifar_stem=cifar_stem,
        proj_out_dim=8,
        num_classes=5,
    )
    assert counted == profiled  # Both are exact integer counts.


@pytest.mark.parametrize("name", ["demo", "resnet18_cifar"])
def test_torch_model_parameters_equal_simclr_tf(throughput, torch_step, name):
    spec = throughput.MODELS[name]
    model = simclr.SimCLRModel(
        resnet_depth=spec["resnet_depth"],
        width_multiplier=spec["width_multiplier"],
        cifar_stem=spec["image_size"] <= 32,
        image_channels=spec["channels"],
        num_proj_layers=spec["num_proj_layers"],
        num_classes=throughput.NUM_CLASSES,
    )
    side = spec["image_size"]
    model(tf.zeros((1, side, side, spec["channels"])))
    tf_sizes = sorted(int(np.prod(v.shape)) for v in model.trainable_weights)
    torch_model = torch_step.build_model(name)
    torch_sizes = sorted(p.numel() for p in torch_model.parameters())
    print(f"{name}: simclr_tf {sum(tf_sizes)}, torch {sum(torch_sizes)}")
    assert torch_sizes == tf_sizes  # Same tensors, hence the same count.


def _numpy_nt_xent(z1: np.ndarray, z2: np.ndarray, tau: float) -> float:
    """SimCLR Algorithm 1 as a loop: mean of l(i, j) over all 2N anchors."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    losses = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = [k for k in range(2 * n) if k != i]
        denominator = sum(np.exp(z[i] @ z[k] / tau) for k in others)
        losses.append(-np.log(np.exp(z[i] @ z[positive] / tau) / denominator))
    return float(np.mean(losses))


def test_torch_nt_xent_matches_numpy_reference(torch_step):
    import torch

    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(2, 5, 3)).astype(np.float32)
    loss = torch_step.nt_xent(torch.tensor(z1), torch.tensor(z2), 0.5)
    # 1e-5: float32 softmax against the float64 loop.
    assert float(loss) == pytest.approx(_numpy_nt_xent(z1, z2, 0.5), rel=1e-5)


def test_torch_lars_update_matches_numpy_formula(torch_step):
    import torch

    weight = torch.nn.Parameter(torch.tensor([[3.0, -4.0]]))
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    weight.grad, bias.grad = torch.tensor([[0.5, 0.5]]), torch.tensor([2.0])
    velocities = {id(weight): torch.zeros(1, 2), id(bias): torch.ones(1)}
    torch_step.lars_update([weight], [bias], velocities)
    # LARS (You et al. 2017) with coupled decay, written from the formula.
    w, g = np.array([3.0, -4.0]), np.array([0.5, 0.5])
    g = g + torch_step.WEIGHT_DECAY * w
    trust = torch_step.TRUST_COEFFICIENT * np.linalg.norm(w) / np.linalg.norm(g)
    expected_w = w - torch_step.LEARNING_RATE * trust * g
    velocity_b = torch_step.MOMENTUM * 1.0 + torch_step.LEARNING_RATE * 2.0
    expected_b = 1.0 - velocity_b
    # 1e-6: float32 arithmetic on values of order 1.
    np.testing.assert_allclose(weight.detach()[0], expected_w, rtol=1e-6)
    assert float(bias.detach()) == pytest.approx(expected_b, rel=1e-6)


def test_throughput_cli_rows_and_derived_figures(tmp_path, throughput):
    torch_modes = "float32" if throughput._TORCH_FOUND else ""
    output = tmp_path / "throughput.json"
    command = [sys.executable, os.path.join(BENCHMARKS, "throughput.py")]
    command += ["--models=demo", "--precisions=float32", "--jit=false"]
    command += [f"--torch_modes={torch_modes}", "--batch=4", "--steps=2"]
    command += ["--warmup=0", "--repeats=1", "--matmul_size=64"]
    command += ["--matmul_repeats=1", f"--output={output}"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=TIMEOUT_SECONDS
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    for key in ("git_sha", "versions", "device", "date", "flags", "matmul"):
        assert key in report, key
    rates = report["matmul"]["flops_per_second"]
    rows = {row["framework"]: row for row in report["rows"]}
    frameworks = {"simclr_tf", "torch"} if torch_modes else {"simclr_tf"}
    assert set(rows) == frameworks
    flops = throughput.step_flops_per_image("demo")
    for row in rows.values():
        assert row["flops_per_image"] == flops
        assert 0 < row["step_seconds_p50"] <= row["step_seconds_p90"]
        # rel 1e-9 here and below: the same float arithmetic as the script.
        assert row["images_per_second"] == pytest.approx(
            4 / row["step_seconds_p50"], rel=1e-9
        )
        achieved = flops * row["images_per_second"]
        assert row["fraction_of_matmul_peak"] == pytest.approx(
            achieved / rates["float32"], rel=1e-9
        )
    assert report["fastest"] == "float32" and report["model"] == "demo"
    if torch_modes:
        assert report["parameters_equal"] is True
        ratio = report["ratio_vs_best_torch"]["demo"]["ratio"]
        expected = (
            rows["simclr_tf"]["images_per_second"]
            / rows["torch"]["images_per_second"]
        )
        assert ratio == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    "configuration, expected",
    [
        ({"precision": "mixed_bfloat16"}, True),
        ({"precision": "float32"}, False),
        ({"mode": "compile_bf16_channels_last"}, True),
        ({"mode": "float32_channels_last"}, False),
    ],
)
def test_bfloat16_rows_are_compared_with_the_bfloat16_matmul(
    throughput, configuration, expected
):
    assert throughput._is_bfloat16(configuration) is expected


@pytest.mark.parametrize(
    "limit, cpu_bf16, expected",
    [
        ("", ("avx512_bf16",), ["bfloat16", "float32"]),
        ("AVX2", (), ["bfloat16", "float32"]),
        # TensorFlow's bfloat16 matmul aborts there (tests/test_runtime.py).
        ("AVX2", ("avx512_bf16",), ["float32"]),
    ],
)
def test_matmul_dtypes_leave_out_bfloat16_under_an_onednn_cap(
    throughput, monkeypatch, limit, cpu_bf16, expected
):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
    monkeypatch.setattr(
        throughput.hardware, "cpu_bf16_flags", lambda root="/": cpu_bf16
    )
    configurations = [{"precision": "float32"}, {"mode": "bf16_channels_last"}]
    assert throughput._matmul_dtypes(configurations) == expected
