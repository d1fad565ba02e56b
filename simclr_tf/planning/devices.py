"""The devices a plan is made for: replicas, hosts and their memory.

`from_strategy` reads them off the run's strategy (TPU generation from
hardware.py, a GPU's memory from its name, the CPU's from the host);
`NAMED` holds the devices of docs/memory.md. --device_memory_gb and
--host_memory_gb override what is found.
"""

from __future__ import annotations

import dataclasses
import os
import re

import tensorflow as tf

GIB = 2**30

# High-bandwidth memory of one TensorFlow TPU device: a core on v2 / v3,
# a chip on v4 and later (one device per chip). Cloud TPU documentation.
TPU_DEVICE_MEMORY = {
    "v2": 8 * GIB,
    "v3": 16 * GIB,
    "v4": 32 * GIB,
    "v5e": 16 * GIB,
    "v5p": 95 * GIB,
    "v6e": 32 * GIB,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Devices:
    """Where a run's replicas live.

    Attributes:
      name: e.g. "TPU v3", "GPU NVIDIA A100-SXM4-40GB", "CPU".
      replicas: replicas in sync (all hosts).
      hosts: input pipelines (processes or TPU hosts).
      replica_memory: bytes one replica may use; None when unknown.
      host_memory: bytes of one host's RAM; None when unknown.
      on_host: the replicas are CPU devices, so their memory is the host's
        (shared by the host's replicas).
    """

    name: str
    replicas: int
    hosts: int = 1
    replica_memory: int | None = None
    host_memory: int | None = None
    on_host: bool = False

    @property
    def local_replicas(self) -> int:
        return max(1, self.replicas // self.hosts)


def named(kind: str, replicas: int, hosts: int | None = None) -> Devices:
    """A device of docs/memory.md: "v3", "v4", "v5e" (TPU) or "40", "80"
    (GB GPUs), `replicas` of them."""
    if kind in TPU_DEVICE_MEMORY:
        per_host = 4 if kind in ("v4", "v5p") else 8
        return Devices(
            name=f"TPU {kind}",
            replicas=replicas,
            hosts=hosts or max(1, replicas // per_host),
            replica_memory=TPU_DEVICE_MEMORY[kind],
        )
    return Devices(
        name=f"GPU {kind} GB",
        replicas=replicas,
        hosts=hosts or max(1, replicas // 8),
        replica_memory=int(kind) * 10**9,
    )


def host_memory_bytes() -> int | None:
    """This machine's RAM (sysconf), None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gpu_memory_from_name(name: str) -> int | None:
    """Bytes from a name such as "NVIDIA A100-SXM4-80GB" or "H100 80GB"."""
    found = re.search(r"(\d+)\s*GB", name, re.IGNORECASE)
    return int(found.group(1)) * 10**9 if found else None


def hosts_of(strategy: tf.distribute.Strategy) -> int:
    """Input pipelines of a strategy: TPU hosts or workers (else 1)."""
    extended = strategy.extended
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return max(1, int(getattr(extended, "num_hosts", 1)))
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is not None and resolver.cluster_spec().as_dict():
        return max(1, len(resolver.cluster_spec().as_dict().get("worker", [])))
    return 1


def _device_type(strategy: tf.distribute.Strategy) -> str:
    """ "TPU", "GPU" or "CPU": where the replicas run."""
    try:
        device = strategy.extended.worker_devices[0]
    except RuntimeError:  # the default strategy: the first GPU, or the CPU
        return "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
    return tf.DeviceSpec.from_string(device).device_type or "CPU"


def from_strategy(
    strategy: tf.distribute.Strategy,
    *,
    tpu_generation: str | None = None,
    device_memory_gb: float = 0.0,
    host_memory_gb: float = 0.0,
) -> Devices:
    """The Devices of a strategy.

    Args:
      strategy: the run's strategy.
      tpu_generation: "v3", ... when the strategy is a TPUStrategy
        (hardware.detect_tpu); unknown generations give no memory.
      device_memory_gb: > 0 overrides the memory of one replica (GB).
      host_memory_gb: > 0 overrides a host's RAM (GB).

    Returns:
      The Devices; replica_memory None when neither found nor given.
    """
    replicas = strategy.num_replicas_in_sync
    hosts = hosts_of(strategy)
    host_memory = host_memory_bytes()
    if host_memory_gb > 0:
        host_memory = int(host_memory_gb * 10**9)
    kind = _device_type(strategy)
    memory, on_host, name = None, False, kind
    if isinstance(strategy, tf.distribute.TPUStrategy):
        name = f"TPU {tpu_generation or '(generation unknown)'}"
        memory = TPU_DEVICE_MEMORY.get(tpu_generation or "")
    elif kind == "GPU":
        gpus = tf.config.list_physical_devices("GPU")
        details = tf.config.experimental.get_device_details(gpus[0])
        name = f"GPU {details.get('device_name', '')}".strip()
        memory = gpu_memory_from_name(name)
    else:
        on_host = True
        local = max(1, replicas // hosts)
        memory = host_memory // local if host_memory else None
    if device_memory_gb > 0:
        memory = int(device_memory_gb * 10**9)
    return Devices(
        name=name,
        replicas=replicas,
        hosts=hosts,
        replica_memory=memory,
        host_memory=host_memory,
        on_host=on_host,
    )


def for_run(
    strategy: tf.distribute.Strategy,
    device_memory_gb: float = 0.0,
    host_memory_gb: float = 0.0,
) -> Devices:
    """from_strategy with the TPU generation this machine shows."""
    generation = None
    if isinstance(strategy, tf.distribute.TPUStrategy):
        from simclr_tf import hardware

        tpu = hardware.detect_tpu("/", os.environ)
        generation = tpu.generation if tpu else None
    return from_strategy(
        strategy,
        tpu_generation=generation,
        device_memory_gb=device_memory_gb,
        host_memory_gb=host_memory_gb,
    )
