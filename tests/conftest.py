"""Shared pytest set-up: virtual CPU devices, quiet TensorFlow, fixed seeds.

The CPU is split into four logical devices before TensorFlow initialises, so
any test can build a MirroredStrategy over 2 or 4 replicas; code that does not
ask for a strategy runs on the first device as usual.
"""

from __future__ import annotations

import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

NUM_VIRTUAL_CPUS = 4

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_VIRTUAL_CPUS
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


def virtual_devices(count: int) -> list[str]:
    """Names of the first `count` logical CPU devices."""
    return [f"/cpu:{index}" for index in range(count)]
