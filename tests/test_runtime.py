"""Tests for simclr_tf.runtime: strategy and precision resolution."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from simclr_tf import hardware, runtime
from simclr_tf.config import schema as config_lib

CPU = hardware.Hardware(tpu=None, gpus=(), nvidia_driver="", cpu_bf16=())
V5E = hardware.TPU(generation="v5e", local=True, evidence=("/dev/vfio/0-3",))
A100 = hardware.GPU(name="NVIDIA A100-SXM4-40GB", compute_capability=(8, 0))


def _runtime(**values) -> config_lib.Runtime:
    return config_lib.from_dict(values).runtime


def _hardware(**changes) -> hardware.Hardware:
    return dataclasses.replace(CPU, **changes)


def test_auto_strategy_is_default_on_a_plain_cpu(monkeypatch, caplog):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert runtime.resolve_strategy(_runtime(), CPU) == (
        "default",
        "no TPU, GPU or multi-worker TF_CONFIG found",
    )
    with caplog.at_level(logging.INFO):
        runtime.make_strategy(_runtime(), CPU)
    assert "strategy default: no TPU, GPU" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_auto_strategy_is_mirrored_over_virtual_cpus(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    runtime_config = _runtime(num_virtual_cpus=4)
    assert runtime.resolve_strategy(runtime_config, CPU) == (
        "mirrored",
        "--num_virtual_cpus=4",
    )
    strategy = runtime.make_strategy(runtime_config, CPU)
    assert strategy.num_replicas_in_sync == 4


def test_auto_strategy_is_tpu_on_a_tpu_vm_and_says_why():
    name, reason = runtime.resolve_strategy(_runtime(), _hardware(tpu=V5E))
    assert name == "tpu"
    assert reason == "found TPU v5e VM (/dev/vfio/0-3)"


def test_auto_strategy_is_mirrored_over_gpus(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    gpus = _hardware(gpus=(A100, A100))
    assert runtime.resolve_strategy(_runtime(), gpus) == (
        "mirrored",
        "found 2 GPU(s): NVIDIA A100-SXM4-40GB, NVIDIA A100-SXM4-40GB",
    )


@pytest.mark.parametrize("strategy", ["auto", "default"])
def test_gpu_tensorflow_cannot_see_is_one_warning_naming_the_fix(
    monkeypatch, caplog, strategy
):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    hidden = _hardware(nvidia_driver="/dev/nvidia0")
    with caplog.at_level(logging.INFO):
        made = runtime.make_strategy(_runtime(strategy=strategy), hidden)
    assert made is tf.distribute.get_strategy()  # trains on the CPU
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "\n" not in message
    assert "NVIDIA GPU is present (/dev/nvidia0)" in message
    assert 'pip install "simclr_tf[gpu]"' in message
    assert "tensorflow[and-cuda]" in message


@pytest.mark.parametrize(
    ("machine", "hint"),
    [(CPU, False), (_hardware(nvidia_driver="/dev/nvidia0"), True)],
    ids=["cpu", "gpu-without-cuda"],
)
def test_explicit_mirrored_without_gpus_is_one_line_error(machine, hint):
    with pytest.raises(ValueError, match="--strategy=mirrored") as error:
        runtime.make_strategy(_runtime(strategy="mirrored"), machine)
    assert "\n" not in str(error.value)
    assert ('pip install "simclr_tf[gpu]"' in str(error.value)) == hint
    # Virtual CPUs or GPUs are devices it can run on.
    runtime.check_devices(
        "mirrored", _runtime(strategy="mirrored", num_virtual_cpus=2), machine
    )
    runtime.check_devices(
        "mirrored", _runtime(strategy="mirrored"), _hardware(gpus=(A100,))
    )


@pytest.mark.parametrize(
    ("values", "flag"),
    [({"strategy": "tpu"}, "--strategy=tpu"), ({"use_tpu": True}, "--use_tpu")],
)
def test_explicit_tpu_without_a_tpu_is_one_line_error(values, flag):
    with pytest.raises(ValueError, match=f"^{flag} but no TPU") as error:
        runtime.make_strategy(_runtime(**values), CPU)
    assert "\n" not in str(error.value)
    assert "--tpu_name=NAME" in str(error.value)
    # A TPU named elsewhere, or found here, is enough.
    runtime.check_devices("tpu", _runtime(tpu_name="pod", **values), CPU)
    runtime.check_devices("tpu", _runtime(**values), _hardware(tpu=V5E))


def test_auto_strategy_is_tpu_when_one_is_named():
    assert runtime.resolve_strategy_name(_runtime(tpu_name="v3")) == "tpu"
    assert runtime.resolve_strategy_name(_runtime(use_tpu=True)) == "tpu"


def test_explicit_strategy_is_kept():
    assert runtime.resolve_strategy_name(_runtime(strategy="default")) == (
        "default"
    )


def test_virtual_cpus_after_start_up_is_a_clear_error():
    # conftest split the CPU into 4 before TensorFlow started; 8 cannot be.
    with pytest.raises(RuntimeError, match="--num_virtual_cpus=8"):
        runtime.configure_virtual_cpus(8)


def test_fewer_virtual_cpus_than_exist_use_the_first_ones(monkeypatch):
    # conftest made 4; a run asking for 2 mirrors over cpu:0 and cpu:1.
    monkeypatch.delenv("TF_CONFIG", raising=False)
    strategy = runtime.make_strategy(_runtime(num_virtual_cpus=2), CPU)
    assert strategy.num_replicas_in_sync == 2
    assert [
        name.rsplit("/", 1)[-1] for name in strategy.extended.worker_devices
    ] == [
        "device:CPU:0",
        "device:CPU:1",
    ]


def _gpus(*capabilities):
    return _hardware(
        gpus=tuple(
            hardware.GPU(name=f"gpu{i}", compute_capability=capability)
            for i, capability in enumerate(capabilities)
        )
    )


@pytest.mark.parametrize(
    ("strategy_name", "machine", "expected"),
    [
        ("tpu", _hardware(tpu=V5E), "mixed_bfloat16"),
        ("mirrored", _gpus((8, 0), (9, 0)), "mixed_bfloat16"),  # A100, H100
        ("default", _gpus((8, 9)), "mixed_bfloat16"),  # L4
        ("mirrored", _gpus((7, 0)), "mixed_float16"),  # V100
        ("default", _gpus((7, 5)), "mixed_float16"),  # T4
        ("mirrored", _gpus((8, 0), (7, 5)), "mixed_float16"),  # the least
        ("default", _gpus((6, 0)), "float32"),  # P100: no tensor cores
        ("default", _gpus(None), "float32"),
        ("default", _hardware(cpu_bf16=("avx512_bf16",)), "mixed_bfloat16"),
        ("default", _hardware(cpu_bf16=("amx_bf16",)), "mixed_bfloat16"),
        ("default", CPU, "float32"),
        # A GPU TensorFlow cannot use: the CPU decides.
        ("default", _hardware(nvidia_driver="/dev/nvidia0"), "float32"),
    ],
)
def test_auto_precision(strategy_name, machine, expected):
    assert runtime.resolve_precision("auto", strategy_name, machine) == (
        expected
    )
    for explicit in ("float32", "mixed_bfloat16", "mixed_float16"):
        assert (
            runtime.resolve_precision(explicit, strategy_name, machine)
            == explicit
        )


BF16_CPU_HELD_TO_AVX2 = _hardware(
    cpu_bf16=("avx512_bf16",), onednn_limit="AVX2"
)


def test_onednn_limit_below_bfloat16_gives_float32(caplog):
    with caplog.at_level(logging.INFO):
        assert (
            runtime.resolve_precision("auto", "default", BF16_CPU_HELD_TO_AVX2)
            == "float32"
        )
    assert "ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN below bfloat16" in caplog.text
    with pytest.raises(ValueError, match="ONEDNN_MAX_CPU_ISA=AVX2 turns off"):
        runtime.resolve_precision(
            "mixed_bfloat16", "default", BF16_CPU_HELD_TO_AVX2
        )
    # The limit is oneDNN's: TPUs and GPUs keep their own choice.
    tpu = dataclasses.replace(BF16_CPU_HELD_TO_AVX2, tpu=V5E)
    assert runtime.resolve_precision("auto", "tpu", tpu) == "mixed_bfloat16"
    # A CPU without bfloat16 flags runs bfloat16 on its generic kernels.
    plain = _hardware(onednn_limit="AVX2")
    assert runtime.resolve_precision("mixed_bfloat16", "default", plain) == (
        "mixed_bfloat16"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("AVX2", "AVX2"),
        ("avx512_core", "AVX512_CORE"),
        ("AVX512_CORE_VNNI", "AVX512_CORE_VNNI"),
        ("AVX512_CORE_BF16", ""),
        ("AVX512_CORE_AMX", ""),
        ("ALL", ""),
        (None, ""),
    ],
)
def test_onednn_limit_reads_the_variable(value, expected):
    environ = {} if value is None else {"ONEDNN_MAX_CPU_ISA": value}
    assert hardware.onednn_limit(environ) == expected


@pytest.mark.skipif(
    not (hardware.cpu_bf16_flags() and hardware.tensorflow_bf16_on_onednn()),
    reason="needs a CPU with bfloat16 flags and oneDNN's bfloat16 kernels",
)
def test_bfloat16_convolution_fails_under_an_avx2_onednn_limit():
    """Why the limit decides: on this bfloat16 CPU, TensorFlow's oneDNN
    cannot build a bfloat16 convolution when held to AVX2, and can
    without the limit."""
    script = (
        "import tensorflow as tf\n"
        "x = tf.ones((1, 8, 8, 3), tf.bfloat16)\n"
        "w = tf.ones((3, 3, 3, 4), tf.bfloat16)\n"
        "y = tf.cast(tf.nn.conv2d(x, w, 1, 'SAME'), tf.float32)\n"
        "print(float(tf.reduce_sum(y)))\n"
    )

    def run(limit):
        environ = {
            k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"
        }
        if limit:
            environ["ONEDNN_MAX_CPU_ISA"] = limit
        return subprocess.run(
            [sys.executable, "-c", script],
            env=environ,
            capture_output=True,
            text=True,
            timeout=120,
        )

    held = run("AVX2")
    assert held.returncode != 0
    assert "could not create a primitive descriptor" in held.stderr
    free = run("")
    assert free.returncode == 0, free.stderr[-2000:]
    # 8x8 SAME, 3x3x3 ones: interior 27, edges 18, corners 12, x4 filters.
    assert float(free.stdout.split()[-1]) == 4 * (36 * 27 + 24 * 18 + 4 * 12)


def test_auto_precision_logs_why(caplog):
    with caplog.at_level(logging.INFO):
        runtime.resolve_precision("auto", "default", _gpus((7, 5)))
    assert (
        "precision mixed_float16: GPU compute capability 7.5 (float16 "
        "tensor cores)" in caplog.text
    )


def test_cpu_has_bf16_reads_cpuinfo():
    with open("/proc/cpuinfo") as cpuinfo:
        text = cpuinfo.read()
    expected = "avx512_bf16" in text or "amx_bf16" in text
    assert runtime.cpu_has_bf16() is expected


def test_default_strategy_is_the_chief():
    assert runtime.is_chief(tf.distribute.get_strategy())
    assert runtime.describe(tf.distribute.get_strategy())["replicas"] == 1


def test_auto_strategy_is_multi_worker_when_tf_config_names_two(monkeypatch):
    cluster = {"worker": ["127.0.0.1:2000", "127.0.0.1:2001"]}
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": cluster, "task": {"index": 1}})
    )
    assert runtime.cluster_size() == 2
    assert runtime.resolve_strategy(_runtime(), CPU) == (
        "multi_worker",
        "TF_CONFIG names 2 tasks",
    )
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": {"worker": cluster["worker"][:1]}})
    )
    assert runtime.resolve_strategy_name(_runtime(), CPU) == "default"


def test_malformed_tf_config_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{worker: 127.0.0.1}")
    with pytest.raises(ValueError, match="TF_CONFIG=.*unset it"):
        runtime.cluster_size()


def test_chief_writes_to_model_dir_and_scratch_is_kept_out(tmp_path):
    strategy = tf.distribute.get_strategy()
    assert runtime.write_dir(strategy, str(tmp_path)) == str(tmp_path)
    runtime.discard_scratch(strategy, str(tmp_path))  # chief: a no-op
    assert tmp_path.exists()


def test_tpu_address_is_local_on_a_tpu_vm_without_a_name():
    vm = _hardware(tpu=V5E)
    assert runtime._tpu_address(_runtime(), vm, {}) == "local"
    assert runtime._tpu_address(_runtime(tpu_name="pod"), vm, {}) == "pod"
    # TPU_NAME set: TPUClusterResolver("") reads it.
    assert runtime._tpu_address(_runtime(), vm, {"TPU_NAME": "x"}) == ""
    remote = _hardware(
        tpu=hardware.TPU(generation="v4", local=False, evidence=("TPU_NAME=x",))
    )
    assert runtime._tpu_address(_runtime(), remote, {"TPU_NAME": "x"}) == ""
    assert runtime._tpu_address(_runtime(), CPU, {}) == ""
