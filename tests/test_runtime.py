"""Tests for simclr_tf.runtime: strategy and precision resolution."""

from __future__ import annotations

import json

import pytest
import tensorflow as tf

from simclr_tf import runtime
from simclr_tf.config import schema as config_lib


def _runtime(**values) -> config_lib.Runtime:
    return config_lib.from_dict(values).runtime


def test_auto_strategy_is_default_on_a_plain_cpu(monkeypatch):
    monkeypatch.setattr(runtime, "tpu_present", lambda _: False)
    assert runtime.resolve_strategy_name(_runtime()) == "default"


def test_auto_strategy_is_mirrored_over_virtual_cpus(monkeypatch):
    monkeypatch.setattr(runtime, "tpu_present", lambda _: False)
    runtime_config = _runtime(num_virtual_cpus=4)
    assert runtime.resolve_strategy_name(runtime_config) == "mirrored"
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


def test_auto_strategy_is_multi_worker_when_tf_config_names_two(monkeypatch):
    monkeypatch.setattr(runtime, "tpu_present", lambda _: False)
    cluster = {"worker": ["127.0.0.1:2000", "127.0.0.1:2001"]}
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": cluster, "task": {"index": 1}})
    )
    assert runtime.cluster_size() == 2
    assert runtime.resolve_strategy_name(_runtime()) == "multi_worker"
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": {"worker": cluster["worker"][:1]}})
    )
    assert runtime.resolve_strategy_name(_runtime()) == "default"


def test_malformed_tf_config_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{worker: 127.0.0.1}")
    with pytest.raises(ValueError, match="TF_CONFIG=.*unset it"):
        runtime.cluster_size()


def test_chief_writes_to_model_dir_and_scratch_is_kept_out(tmp_path):
    strategy = tf.distribute.get_strategy()
    assert runtime.write_dir(strategy, str(tmp_path)) == str(tmp_path)
    runtime.discard_scratch(strategy, str(tmp_path))  # chief: a no-op
    assert tmp_path.exists()


def test_tpu_address_is_local_on_a_tpu_vm_without_a_name(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.setattr(runtime.glob, "glob", lambda _: ["/dev/accel0"])
    assert runtime._tpu_address(_runtime()) == "local"
    assert runtime._tpu_address(_runtime(tpu_name="pod")) == "pod"
    monkeypatch.setattr(runtime.glob, "glob", lambda _: [])
    assert runtime._tpu_address(_runtime()) == ""
