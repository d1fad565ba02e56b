"""Strategy resolution, virtual CPU devices and the precision policy.

With hardware.py (what the machine has), the only module that knows which
hardware a run is on: everything else runs the same code under whatever
tf.distribute.Strategy this returns.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Mapping

import keras
import tensorflow as tf
from absl import logging

from simclr_tf import file_io
from simclr_tf import hardware as hardware_lib
from simclr_tf.config import schema as config_lib


def configure_virtual_cpus(count: int) -> None:
    """Splits the first physical CPU into `count` logical devices.

    Must run before TensorFlow initialises its devices (before any op),
    unless the CPU was already split into at least `count` devices (by a
    test harness or an earlier run in the process): `make_strategy` then
    uses the first `count`.

    Args:
      count: number of logical CPU devices; 0 or 1 leaves the CPU as is.

    Raises:
      RuntimeError: when TensorFlow has already initialised fewer devices.
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
        if logical >= count:
            return  # Already split (e.g. by a test harness).
        raise RuntimeError(
            f"--num_virtual_cpus={count} must be applied before TensorFlow "
            f"starts; {logical} CPU devices already exist. Set it at "
            f"start-up (python -m simclr_tf --num_virtual_cpus={count})."
        ) from error


def tpu_present(
    runtime: config_lib.Runtime, hardware: hardware_lib.Hardware | None = None
) -> bool:
    """Whether a TPU was named (--use_tpu, --tpu_name) or was found."""
    if runtime.use_tpu or runtime.tpu_name:
        return True
    return (hardware or hardware_lib.detect()).tpu is not None


def resolve_strategy(
    runtime: config_lib.Runtime, hardware: hardware_lib.Hardware | None = None
) -> tuple[str, str]:
    """Resolves --strategy=auto, and says why.

    auto: TPU when --use_tpu/--tpu_name or a TPU is found (hardware.py),
    multi_worker when TF_CONFIG names more than one task, mirrored over all
    GPUs (or virtual CPUs) when there are any, else the default strategy.

    Args:
      runtime: the Runtime config.
      hardware: what this machine has; detected when None.

    Returns:
      (one of default, mirrored, multi_worker, tpu; the reason, e.g.
      "found TPU v5e VM (4 PCI device(s) 1ae0:0063, ...; /dev/vfio/0-3)").
    """
    if runtime.strategy != "auto":
        return runtime.strategy, f"--strategy={runtime.strategy}"
    if runtime.tpu_name:
        return "tpu", f"--tpu_name={runtime.tpu_name}"
    if runtime.use_tpu:
        return "tpu", "--use_tpu"
    hardware = hardware or hardware_lib.detect()
    if hardware.tpu is not None:
        return "tpu", f"found {hardware.tpu.describe()}"
    tasks = cluster_size()
    if tasks > 1:
        return "multi_worker", f"TF_CONFIG names {tasks} tasks"
    if hardware.gpus:
        names = ", ".join(gpu.name for gpu in hardware.gpus)
        return "mirrored", f"found {len(hardware.gpus)} GPU(s): {names}"
    if runtime.num_virtual_cpus > 1:
        return "mirrored", f"--num_virtual_cpus={runtime.num_virtual_cpus}"
    return "default", "no TPU, GPU or multi-worker TF_CONFIG found"


def resolve_strategy_name(
    runtime: config_lib.Runtime, hardware: hardware_lib.Hardware | None = None
) -> str:
    """resolve_strategy's name alone: default, mirrored, multi_worker, tpu."""
    return resolve_strategy(runtime, hardware)[0]


def check_devices(
    name: str, runtime: config_lib.Runtime, hardware: hardware_lib.Hardware
) -> None:
    """Raises ValueError when strategy `name` has no devices to run on.

    Args:
      name: the resolved strategy name.
      runtime: the Runtime config.
      hardware: what this machine has.
    """
    if name == "mirrored" and not (
        hardware.gpus or runtime.num_virtual_cpus >= 1
    ):
        raise ValueError(
            "--strategy=mirrored needs GPUs that TensorFlow can use or "
            "--num_virtual_cpus=N (CPU replicas), but TensorFlow sees no GPU "
            "here"
            f"{_hidden_gpu_hint(hardware)}; use --strategy=auto, or "
            "--num_virtual_cpus=2 to try replicas on the CPU."
        )
    if name == "tpu" and not (
        runtime.tpu_name or runtime.master or hardware.tpu
    ):
        raise ValueError(
            f"{'--use_tpu' if runtime.use_tpu else '--strategy=tpu'} but no "
            "TPU was found (no /dev/accel<n>, TPU /dev/vfio/<n> or TPU PCI "
            f"device, no {' / '.join(hardware_lib.TPU_VARIABLES)}); pass "
            "--tpu_name=NAME for a TPU elsewhere, or use --strategy=auto."
        )


def _hidden_gpu_hint(hardware: hardware_lib.Hardware) -> str:
    if not hardware.hidden_gpu:
        return ""
    return (
        f"; an NVIDIA GPU is present ({hardware.nvidia_driver}) but this "
        'TensorFlow cannot use it: pip install "simclr_tf[gpu]" (or '
        '"tensorflow[and-cuda]")'
    )


def make_strategy(
    runtime: config_lib.Runtime, hardware: hardware_lib.Hardware | None = None
) -> tf.distribute.Strategy:
    """Builds the tf.distribute.Strategy a run uses; logs what and why.

    Args:
      runtime: the Runtime config (strategy, num_virtual_cpus, TPU names).
      hardware: what this machine has; detected when None.

    Returns:
      A Default, Mirrored, MultiWorkerMirrored or TPU strategy.

    Raises:
      ValueError: --strategy=mirrored or tpu (or --use_tpu) without such
        devices.
    """
    configure_virtual_cpus(runtime.num_virtual_cpus)
    hardware = hardware or hardware_lib.detect()
    name, reason = resolve_strategy(runtime, hardware)
    check_devices(name, runtime, hardware)
    logging.info("strategy %s: %s", name, reason)
    if hardware.hidden_gpu:
        logging.warning("running without a GPU%s.", _hidden_gpu_hint(hardware))
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            return tf.distribute.MirroredStrategy()
        cpus = tf.config.list_logical_devices("CPU")[: runtime.num_virtual_cpus]
        return tf.distribute.MirroredStrategy([d.name for d in cpus])
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=_tpu_address(runtime, hardware),
        zone=runtime.tpu_zone,
        project=runtime.gcp_project,
    )
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def _tpu_address(
    runtime: config_lib.Runtime,
    hardware: hardware_lib.Hardware,
    environ: Mapping[str, str] | None = None,
) -> str:
    """--tpu_name, else --master (as GR's run.py), else "local" on a TPU
    VM, else "" (TPU_NAME decides)."""
    environ = os.environ if environ is None else environ
    if runtime.tpu_name or runtime.master:
        return runtime.tpu_name or runtime.master
    if hardware.tpu and hardware.tpu.local and "TPU_NAME" not in environ:
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


def resolve_precision(
    precision: str,
    strategy_name: str,
    hardware: hardware_lib.Hardware | None = None,
) -> str:
    """Resolves --precision=auto to a Keras mixed-precision policy name.

    auto: mixed_bfloat16 on TPUs (what they are built for) and on GPUs of
    compute capability 8.0 and up (bfloat16 tensor cores, no loss scaling);
    mixed_float16 on 7.x GPUs (float16 tensor cores only); float32 on older
    GPUs (Keras: no mixed-precision speed-up below 7.0). CPUs: bfloat16
    where the CPU has AVX-512 BF16 or AMX (measured faster,
    benchmarks/RESULTS.md), else float32; float32 too when
    ONEDNN_MAX_CPU_ISA holds oneDNN below bfloat16 on such a CPU (oneDNN
    then cannot build a bfloat16 convolution). Logs the choice and why.

    Args:
      precision: --precision (auto, float32, mixed_bfloat16, mixed_float16).
      strategy_name: the resolved strategy.
      hardware: what this machine has; detected when None.

    Returns:
      The policy name.

    Raises:
      ValueError: explicit mixed_bfloat16 on a bfloat16 CPU whose oneDNN
        is held below bfloat16.
    """
    if precision == "mixed_float16" or precision == "float32":
        return precision
    hardware = hardware or hardware_lib.detect()
    if precision != "auto":
        if _cpu_bfloat16_disabled(strategy_name, hardware):
            raise ValueError(
                "--precision=mixed_bfloat16 on this CPU needs oneDNN's "
                "bfloat16 kernels, which ONEDNN_MAX_CPU_ISA="
                f"{hardware.onednn_limit} turns off; unset it, or use "
                "--precision=float32."
            )
        return precision
    name, reason = _auto_precision(strategy_name, hardware)
    logging.info("precision %s: %s", name, reason)
    return name


def _auto_precision(
    strategy_name: str, hardware: hardware_lib.Hardware
) -> tuple[str, str]:
    if strategy_name == "tpu":
        return "mixed_bfloat16", "TPU"
    if hardware.gpus:
        capabilities = [gpu.compute_capability for gpu in hardware.gpus]
        if None in capabilities:
            return "float32", "GPU of unknown compute capability"
        least = min(capabilities)
        text = f"GPU compute capability {least[0]}.{least[1]}"
        if least >= (8, 0):
            return "mixed_bfloat16", f"{text} (bfloat16 tensor cores)"
        if least >= (7, 0):
            return "mixed_float16", f"{text} (float16 tensor cores)"
        return "float32", f"{text} (no tensor cores)"
    if _cpu_bfloat16_disabled(strategy_name, hardware):
        return "float32", (
            f"CPU with {', '.join(hardware.cpu_bf16)}, but "
            f"ONEDNN_MAX_CPU_ISA={hardware.onednn_limit} keeps oneDNN below "
            "bfloat16"
        )
    if hardware.cpu_bf16:
        return "mixed_bfloat16", f"CPU with {', '.join(hardware.cpu_bf16)}"
    return "float32", "CPU without AVX-512 BF16 or AMX"


def _cpu_bfloat16_disabled(
    strategy_name: str, hardware: hardware_lib.Hardware
) -> bool:
    """The model runs on a bfloat16 CPU whose oneDNN is held below it (a
    CPU without the flags runs bfloat16 on its generic kernels)."""
    return (
        strategy_name != "tpu"
        and not hardware.gpus
        and hardware.cpu_bf16_held_back
    )


def cpu_has_bf16(root: str = "/") -> bool:
    """Whether the CPU has AVX-512 BF16 or AMX bfloat16 (Linux only)."""
    return bool(hardware_lib.cpu_bf16_flags(root))


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
    return file_io.join(model_dir, f"worker_scratch_{task_id}")


def discard_scratch(strategy: tf.distribute.Strategy, model_dir: str) -> None:
    """Deletes a non-chief worker's scratch directory (no-op on the chief)."""
    if not is_chief(strategy):
        file_io.rmtree(write_dir(strategy, model_dir))


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
