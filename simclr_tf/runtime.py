"""Strategy resolution, virtual CPU devices and the precision policy.

The only module that knows which hardware a run is on: everything else runs
the same code under whatever tf.distribute.Strategy this returns.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import threading

import keras
import tensorflow as tf
from absl import logging

from simclr_tf.config import schema as config_lib


def configure_virtual_cpus(count: int) -> None:
    """Splits the first physical CPU into `count` logical devices.

    Must run before TensorFlow initialises its devices (before any op).

    Args:
      count: number of logical CPU devices; 0 or 1 leaves the CPU as is.

    Raises:
      RuntimeError: when TensorFlow has already initialised its devices.
    """
    if count <= 1:
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * count
        )
    except RuntimeError as error:
        logical = len(tf.config.list_logical_devices("CPU"))
        if logical == count:
            return  # Already split the same way (e.g. by a test harness).
        raise RuntimeError(
            f"--num_virtual_cpus={count} must be applied before TensorFlow "
            f"starts; {logical} CPU devices already exist. Set it at "
            f"start-up (python -m simclr_tf --num_virtual_cpus={count})."
        ) from error


def tpu_present(runtime: config_lib.Runtime) -> bool:
    """Whether a TPU was named or this machine is a TPU VM."""
    if runtime.use_tpu or runtime.tpu_name:
        return True
    return bool(glob.glob("/dev/accel*")) or "TPU_NAME" in os.environ


def resolve_strategy_name(runtime: config_lib.Runtime) -> str:
    """Resolves --strategy=auto to default, mirrored, multi_worker or tpu.

    auto: TPU when --use_tpu/--tpu_name or a TPU VM is present, multi_worker
    when TF_CONFIG names more than one task, mirrored over all GPUs (or
    virtual CPUs) when there are any, else the default strategy.
    """
    if runtime.strategy != "auto":
        return runtime.strategy
    if tpu_present(runtime):
        return "tpu"
    if cluster_size() > 1:
        return "multi_worker"
    if tf.config.list_physical_devices("GPU") or runtime.num_virtual_cpus > 1:
        return "mirrored"
    return "default"


def make_strategy(runtime: config_lib.Runtime) -> tf.distribute.Strategy:
    """Builds the tf.distribute.Strategy a run uses.

    Args:
      runtime: the Runtime config (strategy, num_virtual_cpus, TPU names).

    Returns:
      A Default, Mirrored, MultiWorkerMirrored or TPU strategy.
    """
    configure_virtual_cpus(runtime.num_virtual_cpus)
    name = resolve_strategy_name(runtime)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            return tf.distribute.MirroredStrategy()
        cpus = tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in cpus])
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=_tpu_address(runtime),
        zone=runtime.tpu_zone,
        project=runtime.gcp_project,
    )
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def _tpu_address(runtime: config_lib.Runtime) -> str:
    """--tpu_name, else "local" on a TPU VM, else "" (TPU_NAME decides)."""
    if runtime.tpu_name:
        return runtime.tpu_name
    if glob.glob("/dev/accel*") and "TPU_NAME" not in os.environ:
        return "local"
    return ""


def cluster_size() -> int:
    """Number of tasks (chief and workers) TF_CONFIG names; 0 without it.

    Raises:
      ValueError: TF_CONFIG is set but is not JSON with a "cluster" dict.
    """
    text = os.environ.get("TF_CONFIG", "")
    if not text:
        return 0
    try:
        cluster = json.loads(text)["cluster"]
        return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"TF_CONFIG={text[:200]!r} is not valid: it must be JSON like "
            '{"cluster": {"worker": ["host0:port", "host1:port"]}, '
            '"task": {"type": "worker", "index": 0}}; unset it to train on '
            "one machine."
        ) from error


def resolve_precision(precision: str, strategy_name: str) -> str:
    """Resolves --precision=auto to a Keras mixed-precision policy name.

    auto: mixed_bfloat16 on TPU (what TPUs are built for) and on CPUs with
    AVX-512 BF16 (measured faster here, benchmarks/RESULTS.md); float32 on
    GPUs and older CPUs, where bfloat16 is emulated or unsupported.
    """
    if precision != "auto":
        return precision
    if strategy_name == "tpu":
        return "mixed_bfloat16"
    if tf.config.list_physical_devices("GPU"):
        return "float32"
    return "mixed_bfloat16" if cpu_has_bf16() else "float32"


def cpu_has_bf16() -> bool:
    """Whether the CPU advertises AVX-512 BF16 instructions (Linux only)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return "avx512_bf16" in cpuinfo.read()
    except OSError:
        return False


def set_precision(policy_name: str) -> None:
    """Sets the global Keras dtype policy (variables stay float32)."""
    keras.mixed_precision.set_global_policy(policy_name)


def describe(strategy: tf.distribute.Strategy) -> dict[str, object]:
    """Strategy name, replica count and host count, for the start-up log."""
    resolver = getattr(strategy, "cluster_resolver", None)
    hosts = 1
    if resolver is not None and resolver.cluster_spec().as_dict():
        hosts = max(1, len(resolver.cluster_spec().as_dict().get("worker", [])))
    return {
        "strategy": type(strategy).__name__,
        "replicas": strategy.num_replicas_in_sync,
        "hosts": hosts,
    }


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes summaries, result.json and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (
        task_type == "worker"
        and task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


def write_dir(strategy: tf.distribute.Strategy, model_dir: str) -> str:
    """Where this process writes checkpoints and exports.

    Under MultiWorkerMirroredStrategy every worker must take part in saving
    (saving may run collectives), but only the chief's files are kept:
    the chief writes to `model_dir`, the others to a scratch directory
    inside it which the caller removes after each save (`discard_scratch`).
    """
    if is_chief(strategy):
        return model_dir
    task_id = strategy.cluster_resolver.task_id
    return os.path.join(model_dir, f"worker_scratch_{task_id}")


def discard_scratch(strategy: tf.distribute.Strategy, model_dir: str) -> None:
    """Deletes a non-chief worker's scratch directory (no-op on the chief)."""
    if not is_chief(strategy):
        path = write_dir(strategy, model_dir)
        if tf.io.gfile.exists(path):
            tf.io.gfile.rmtree(path)


def log_start(strategy: tf.distribute.Strategy, global_batch: int) -> None:
    """Logs strategy, replicas, hosts, global and per-replica batch."""
    info = describe(strategy)
    logging.info(
        "strategy %s, %d replica(s) on %d host(s), global batch %d, "
        "per-replica batch %d",
        info["strategy"],
        info["replicas"],
        info["hosts"],
        global_batch,
        global_batch // info["replicas"],
    )


class PreemptionWatcher:
    """Records SIGTERM (what TPU VMs and spot machines send) instead of dying.

    Used as a context manager around the training loop, which checks
    `requested` at every loop boundary, saves a checkpoint and returns; the
    same command then resumes from it. Python runs signal handlers only
    between bytecodes, so the request is seen when the current loop of
    --steps_per_loop steps returns.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: object = None

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        del signum, frame
        logging.warning(
            "SIGTERM received: saving a checkpoint at the end of this loop"
        )
        self.requested = True
