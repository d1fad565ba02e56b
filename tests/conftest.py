"""Shared pytest set-up: virtual CPU devices, quiet TensorFlow, fixed seeds.

The CPU is split into four logical devices before TensorFlow initialises, so
any test can build a MirroredStrategy over 2 or 4 replicas; code that does not
ask for a strategy runs on the first device as usual.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


_CACHE_FLAG = "--tf_xla_persistent_cache_directory"


def xla_flags_caching_in(directory: str) -> str:
    """TF_XLA_FLAGS as this process has them, with XLA's persistent cache
    in `directory` instead of any other."""
    kept = [
        flag
        for flag in os.environ.get("TF_XLA_FLAGS", "").split()
        if not flag.startswith(f"{_CACHE_FLAG}=")
    ]
    return " ".join([*kept, f"{_CACHE_FLAG}={directory}"])


def _persist_xla_executables() -> str:
    """XLA executables are kept on disk for this run's later processes.

    Every new process compiles the augmentation (and, with jit_compile, the
    step) again: ~2.5 s a process here. TensorFlow's persistent cache keys
    an executable by its whole HLO and reads it back only if the HLO is
    equal, so a hit runs what a compile would have produced. One directory
    per pytest run and xdist worker (the processes one worker starts run
    one after another; tests that start processes side by side give each
    its own), set before TensorFlow reads TF_XLA_FLAGS; subprocesses
    inherit it.
    """
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    directory = os.path.join(
        tempfile.gettempdir(), f"simclr_tf_tests_xla_{run}", worker
    )
    # xdist's controller loads this file too and its workers inherit its
    # environment: each process replaces the directory, never adds one.
    os.environ["TF_XLA_FLAGS"] = xla_flags_caching_in(directory)
    return directory


_XLA_CACHE = _persist_xla_executables()


# Last: after `-m` and `-k` have deselected (pytest runs conftest hooks
# before its own), so that only the tests that run weigh.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """The longest test files first, by the seconds their selected tests
    took (tests/file_seconds.py), each file's tests in their own order; a
    file not measured yet counts as longest. With xdist's reordering off
    (pyproject), `--dist loadfile` then ends on short files on both
    workers."""
    seconds = json.loads(file_seconds.OUTPUT.read_text())
    weights = file_seconds.file_weights(
        ((item.path.name, item.name) for item in items), seconds
    )
    items.sort(key=lambda item: -weights[item.path.name])


def pytest_unconfigure(config):
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)
    with contextlib.suppress(OSError):  # another worker's is still there
        os.rmdir(os.path.dirname(_XLA_CACHE))


# simclr_tf before TensorFlow: it picks TensorFlow's CPU kernels as in a
# user's process (hardware.onednn_switch: oneDNN on AVX2 CPUs without VNNI).
importlib.import_module("simclr_tf")

import file_seconds  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

NUM_VIRTUAL_CPUS = 4

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_VIRTUAL_CPUS
)
# Initialised now, so the split is final: a test whose run applies
# --num_virtual_cpus=2 before any op would otherwise leave 2 devices to the
# worker's later tests (test_runtime's 4-replica strategy then failed).
_logical = tf.config.list_logical_devices("CPU")
if len(_logical) != NUM_VIRTUAL_CPUS:
    raise RuntimeError(
        f"conftest: {len(_logical)} logical CPUs, not {NUM_VIRTUAL_CPUS}"
    )


_GC_EVERY = 25
_tests_started = [0]


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts with float32, a cleared Keras session, seed 0 and
    fresh collective keys.

    Every MirroredStrategy numbers its collective groups from the class
    attribute _collective_key_base (TF's own tests raise it the same way);
    two strategies over the same devices built from one base share group
    and instance keys, and a later one fails with "Shape mismatch in the
    collective instance 100" or "joining a group with size 4, but that
    group has size 2". A new base per test keeps tests independent of
    their order.
    """
    tf.distribute.MirroredStrategy._collective_key_base += 100_000
    keras.mixed_precision.set_global_policy("float32")
    # clear_session's own gc.collect() takes ~0.4 s: once per test it was
    # a third of the suite's time. Collect every _GC_EVERY tests instead.
    keras.utils.clear_session(free_memory=False)
    _tests_started[0] += 1
    if _tests_started[0] % _GC_EVERY == 0:
        gc.collect()
    keras.utils.set_random_seed(0)
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(autouse=True)
def _absl_logs_reach_caplog():
    """Each test starts with absl's logger passing INFO on to pytest.

    flags.FLAGS.unparse_flags() (the flag-parsing tests) resets --verbosity
    to its default, -1, and absl then sets its logger to WARNING for the
    rest of the process: a later test in the same xdist worker that reads
    an INFO line through caplog saw nothing (CI, test_runtime after
    test_gr_flags).
    """
    absl_logging.get_absl_logger().setLevel(logging.NOTSET)
    yield


def virtual_devices(count: int) -> list[str]:
    """Names of the first `count` logical CPU devices."""
    return [f"/cpu:{index}" for index in range(count)]
