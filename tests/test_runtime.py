"""Tests for simclr_tf.runtime: strategy and precision resolution."""

from __future__ import annotations

import pytest
import tensorflow as tf

from simclr_tf import config as config_lib
from simclr_tf import runtime


def _runtime(**values) -> config_lib.Runtime:
    return config_lib.from_dict(values).runtime


def test_auto_strategy_is_default_on_a_plain_cpu(monkeypatch):
    monkeypatch.setattr(runtime, "tpu_present", lambda _: False)
    assert runtime.resolve_strategy_name(_runtime()) == "default"


def test_auto_strategy_is_mirrored_over_virtual_cpus(monkeypatch):
    monkeypatch.setattr(runtime, "tpu_present", lambda _: False)
    runtime_config = _runtime(num_virtual_cpus=4)
    assert runtime.resolve_strategy_name(runtime_config) == "mirrored"
    tf.distribute.MirroredStrategy._collective_key_base += 100_000
    strategy = runtime.make_strategy(runtime_config)
    assert strategy.num_replicas_in_sync == 4


def test_auto_strategy_is_tpu_when_one_is_named():
    assert runtime.resolve_strategy_name(_runtime(tpu_name="v3")) == "tpu"
    assert runtime.resolve_strategy_name(_runtime(use_tpu=True)) == "tpu"


def test_explicit_strategy_is_kept():
    assert runtime.resolve_strategy_name(_runtime(strategy="default")) == (
        "default"
    )


def test_virtual_cpus_after_start_up_is_a_clear_error():
    # conftest split the CPU into 4 before TensorFlow started; 3 cannot be.
    with pytest.raises(RuntimeError, match="--num_virtual_cpus=3"):
        runtime.configure_virtual_cpus(3)


@pytest.mark.parametrize(
    ("strategy_name", "has_bf16", "expected"),
    [
        ("tpu", False, "mixed_bfloat16"),
        ("default", True, "mixed_bfloat16"),
        ("default", False, "float32"),
    ],
)
def test_auto_precision(monkeypatch, strategy_name, has_bf16, expected):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: has_bf16)
    assert runtime.resolve_precision("auto", strategy_name) == expected
    assert runtime.resolve_precision("float32", strategy_name) == "float32"


def test_cpu_has_bf16_reads_cpuinfo():
    with open("/proc/cpuinfo") as cpuinfo:
        expected = "avx512_bf16" in cpuinfo.read()
    assert runtime.cpu_has_bf16() is expected


def test_default_strategy_is_the_chief():
    assert runtime.is_chief(tf.distribute.get_strategy())
    assert runtime.describe(tf.distribute.get_strategy())["replicas"] == 1
