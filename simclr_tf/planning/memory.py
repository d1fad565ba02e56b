"""The memory plan of a run: bytes per replica and per host, before it
starts, and a refusal naming the flag to change when they cannot fit.

Per replica: parameters, gradients and optimizer slots (float32), the
compute-dtype copies of the kernels (mixed precision), the activations the
backward pass keeps (network.py) for the per-replica batch (2n views when
pretraining), the input batch and NT-Xent over the gathered batch. Per
host: the input pipeline's buffers, the evaluation's results and reports
(eval_memory.py), and the TensorFlow runtime itself. Also the bytes the
gather of the projections moves per replica and step. Estimates: see
docs/memory.md for how they compare with TensorFlow's allocator.
"""

from __future__ import annotations

import dataclasses

from simclr_tf.config import schema as config_lib
from simclr_tf.data import order
from simclr_tf.planning import devices as devices_lib
from simclr_tf.planning import network

GIB = devices_lib.GIB
# Resident memory of a process that has imported TensorFlow, Keras and
# tfds and run a small model (measured on the CPU: docs/memory.md).
RUNTIME_BYTES = 3 * GIB // 2
# Stored bytes of an image whose size varies (ImageNet's mean JPEG is
# about 400 x 350 px once decoded).
UNKNOWN_IMAGE_BYTES = 400 * 350 * 3
# Batches a tf.data pipeline holds at once: prefetch, the one being built,
# the one being copied to the devices.
PIPELINE_BATCHES = 4
# Optimizer slots per trainable variable.
OPTIMIZER_SLOTS = {"lars": 1, "momentum": 1, "adam": 2}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataFacts:
    """What the plan needs to know of the data.

    Attributes:
      num_train: examples of --train_split (after --label_fraction).
      num_eval: examples of --eval_split (0: not evaluated).
      num_classes: classes (0: unlabelled).
      image_channels: C.
      stored_image_bytes: bytes of one decoded stored image (H W C), or
        UNKNOWN_IMAGE_BYTES for images of varying size.
    """

    num_train: int
    num_eval: int
    num_classes: int
    image_channels: int
    stored_image_bytes: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """Bytes by item, per replica and per host.

    Attributes:
      devices: what the plan is for.
      precision: the resolved precision policy.
      per_replica_batch: images per replica and step.
      replica: item -> bytes on one replica during a train step.
      host: item -> bytes on one host.
      gather_bytes: bytes the all-reduce of the projections (forward and
        backward) moves per replica and step.
      gradient_bytes: bytes the gradient all-reduce moves per replica.
      per_image_bytes: replica bytes that grow with each image of the
        per-replica batch (for suggesting a batch that fits).
    """

    devices: devices_lib.Devices
    precision: str
    per_replica_batch: int
    replica: dict[str, int]
    host: dict[str, int]
    gather_bytes: int
    gradient_bytes: int
    per_image_bytes: int

    @property
    def replica_total(self) -> int:
        return sum(self.replica.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())


def size(value: float) -> str:
    """Bytes as "512 MiB" or "3.25 GiB"."""
    if abs(value) >= GIB:
        return f"{value / GIB:.2f} GiB"
    return f"{value / 2**20:.0f} MiB"


def _dtype_bytes(precision: str) -> int:
    return 2 if precision in ("mixed_bfloat16", "mixed_float16") else 4


def network_of(
    config: config_lib.Config, num_classes: int, image_channels: int
) -> network.NetworkFacts:
    """NetworkFacts of the model training.builders.build_model makes."""
    model = config.model
    tuning = config.train.train_mode != "pretrain"
    head = tuning or (model.lineareval_while_pretraining and num_classes > 0)
    return network.network_facts(
        resnet_depth=model.resnet_depth,
        width_multiplier=model.width_multiplier,
        image_size=config.data.image_size,
        image_channels=image_channels,
        cifar_stem=model.cifar_stem,
        sk_ratio=model.sk_ratio,
        se_ratio=model.se_ratio,
        proj_head_mode=model.proj_head_mode,
        proj_out_dim=model.proj_out_dim,
        num_proj_layers=model.num_proj_layers,
        ft_proj_selector=model.ft_proj_selector,
        num_classes=num_classes if head else 0,
    )


def _trained_stages(config: config_lib.Config) -> slice:
    """The stages (stem, groups 1-4, heads) whose activations are kept."""
    mode = config.train.train_mode
    if mode == "lineareval":
        return slice(5, 6)
    if mode == "finetune" and config.train.fine_tune_after_block >= 0:
        return slice(config.train.fine_tune_after_block + 1, 6)
    return slice(0, 6)


def activation_bytes(
    facts: network.NetworkFacts, views: int, precision: str, stages=slice(0, 6)
) -> int:
    """Bytes the backward pass keeps for `views` images (network.py)."""
    kept = sum(facts.saved_per_example[stages])
    return views * _dtype_bytes(precision) * kept


def _replica_items(
    config: config_lib.Config,
    facts: network.NetworkFacts,
    replicas: int,
    channels: int,
    precision: str,
) -> tuple[dict[str, int], int]:
    """Per-replica bytes of a train step, and the part added per image."""
    pretrain = config.train.train_mode == "pretrain"
    batch = config.train.train_batch_size // replicas
    views_per_image = 2 if pretrain else 1
    dtype = _dtype_bytes(precision)
    side = config.data.image_size
    slots = OPTIMIZER_SLOTS[config.optim.optimizer]
    items = {
        "parameters": 4 * facts.parameters,
        "gradients": 4 * facts.trainable_parameters,
        "optimizer": 4 * slots * facts.trainable_parameters,
    }
    if dtype == 2:
        items["weight copies"] = 2 * facts.kernel_parameters
    kept = activation_bytes(facts, 1, precision, _trained_stages(config))
    working = dtype * 2 * facts.largest_tensor  # the backward's temporaries
    # The batch in float32, its compute-dtype copy, and the next batch.
    copy = 2 if dtype == 2 else 0
    input_bytes = 2 * side * side * channels * (4 + copy)
    views = batch * views_per_image
    items["activations"] = views * kept
    items["working set"] = views * working
    items["input batches"] = views * input_bytes
    per_image = views_per_image * (kept + working + input_bytes)
    if pretrain:
        global_views = 2 * config.train.train_batch_size
        # [2n, 2N] float32: logits, scaled, mask, masked, softmax gradient.
        per_image += 5 * 2 * global_views * 4
        items["contrastive loss"] = batch * 5 * 2 * global_views * 4
        items["contrastive loss"] += (
            4 * global_views * (config.model.proj_out_dim * 4)
        )  # the gathered [2N, d] blocks, forward and backward
    return items, per_image


def _pipeline_bytes(
    config: config_lib.Config,
    devices: devices_lib.Devices,
    data: DataFacts,
) -> int:
    """One host's input pipeline: shuffle buffer, cache, batches."""
    local = devices.local_replicas
    batch = config.train.train_batch_size // devices.replicas
    side = config.data.image_size
    host_examples = -(-data.num_train // devices.hosts)
    buffer = order.shuffle_buffer_size(batch, side, host_examples)
    views = 2 if config.train.train_mode == "pretrain" else 1
    batches = PIPELINE_BATCHES * views * batch * local
    total = buffer * data.stored_image_bytes
    total += 2 * batch * local * data.stored_image_bytes  # being decoded
    total += batches * side * side * data.image_channels * 4
    if config.data.cache_dataset:
        total += host_examples * data.stored_image_bytes
    return total


def plan_run(
    config: config_lib.Config,
    devices: devices_lib.Devices,
    data: DataFacts,
    precision: str,
    evaluation_host_bytes: int = 0,
    evaluation_replica_bytes: int = 0,
) -> MemoryPlan:
    """The memory plan of a training run (and its evaluation's host part).

    Args:
      config: the run's Config.
      devices: the strategy's devices.
      data: facts of the data.
      precision: the resolved precision ("float32", "mixed_bfloat16", ...).
      evaluation_host_bytes: host bytes of the evaluation that follows
        (eval_memory.py), 0 for none.
      evaluation_replica_bytes: its peak per replica (CPU devices: host).

    Returns:
      The MemoryPlan.
    """
    facts = network_of(config, data.num_classes, data.image_channels)
    replicas = devices.replicas
    replica, per_image = _replica_items(
        config, facts, replicas, data.image_channels, precision
    )
    ring = 2 * (replicas - 1) / replicas  # bytes a ring all-reduce moves
    gathered = config.train.train_batch_size * 2 * config.model.proj_out_dim
    pretrain = config.train.train_mode == "pretrain"
    host = {"input pipeline": _pipeline_bytes(config, devices, data)}
    if evaluation_host_bytes:
        host["evaluation"] = evaluation_host_bytes
    if devices.on_host:
        host["replicas (CPU devices)"] = devices.local_replicas * max(
            sum(replica.values()), evaluation_replica_bytes
        )
    host["runtime"] = RUNTIME_BYTES
    return MemoryPlan(
        devices=devices,
        precision=precision,
        per_replica_batch=config.train.train_batch_size // replicas,
        replica=replica,
        host=host,
        gather_bytes=int(2 * ring * gathered * 4) if pretrain else 0,
        gradient_bytes=int(ring * 4 * facts.trainable_parameters),
        per_image_bytes=per_image,
    )


def describe(plan: MemoryPlan) -> list[str]:
    """The plan as log lines (also what --mode=plan prints)."""
    devices = plan.devices
    capacity = (
        f"{size(devices.replica_memory)} each"
        if devices.replica_memory
        else "memory unknown (--device_memory_gb)"
    )
    items = ", ".join(f"{k} {size(v)}" for k, v in plan.replica.items())
    lines = [
        f"memory plan per replica ({devices.name}, {devices.replicas} "
        f"replica(s) on {devices.hosts} host(s), {capacity}; "
        f"{plan.per_replica_batch} images per replica, {plan.precision}): "
        f"{items}; total {size(plan.replica_total)}"
        + _share(plan.replica_total, devices.replica_memory)
    ]
    items = ", ".join(f"{k} {size(v)}" for k, v in plan.host.items())
    lines.append(
        f"memory plan per host: {items}; total {size(plan.host_total)}"
        + _share(plan.host_total, devices.host_memory)
    )
    lines.append(
        f"per step and replica the gather of the projections moves "
        f"{size(plan.gather_bytes)}, the gradient all-reduce "
        f"{size(plan.gradient_bytes)}"
    )
    return lines


def _share(used: int, capacity: int | None) -> str:
    return (
        f" ({100 * used / capacity:.0f}% of {size(capacity)})"
        if (capacity)
        else ""
    )


def check(plan: MemoryPlan, config: config_lib.Config) -> None:
    """Refuses a plan that cannot fit, naming the flag to change.

    Raises:
      ValueError: the per-replica total exceeds a replica's memory, or the
        host total the host's RAM.
    """
    devices = plan.devices
    capacity = devices.replica_memory
    if capacity and plan.replica_total > capacity:
        fixed = plan.replica_total - plan.per_image_bytes * (
            plan.per_replica_batch
        )
        fits = max(0, (capacity - fixed) // max(1, plan.per_image_bytes))
        batch = config.train.train_batch_size
        fixes = [
            f"--train_batch_size={fits * devices.replicas} ({fits} per replica)"
            if fits >= 2
            else "a smaller model"
        ]
        if plan.precision == "float32" and not devices.on_host:
            fixes.append("--precision=mixed_bfloat16")
        fixes.append(f"a smaller --image_size (now {config.data.image_size})")
        raise ValueError(
            f"--train_batch_size={batch} on {devices.replicas} x "
            f"{devices.name} needs {size(plan.replica_total)} per replica "
            f"({plan.per_replica_batch} images each), more than its "
            f"{size(capacity)}; use {' or '.join(fixes)}, or more replicas."
            f" (--device_memory_gb overrides the capacity.)"
        )
    if devices.host_memory and plan.host_total > devices.host_memory:
        biggest = max(plan.host, key=plan.host.get)
        hint = {
            "input pipeline": "drop --cache_dataset"
            if config.data.cache_dataset
            else "lower --train_batch_size",
            "evaluation": "lower --max_eval_examples or --eval_batch_size",
        }.get(biggest, "use fewer or smaller replicas per host")
        raise ValueError(
            f"the run needs {size(plan.host_total)} of host memory "
            f"({biggest} {size(plan.host[biggest])}), more than the host's "
            f"{size(devices.host_memory)}; {hint}. (--host_memory_gb "
            f"overrides the capacity.)"
        )


def data_facts(
    train_examples: int,
    eval_examples: int,
    num_classes: int,
    image_shape: tuple[int | None, int | None, int],
) -> DataFacts:
    """DataFacts from a Source's facts (its image_shape may hold None)."""
    height, width, channels = image_shape
    stored = UNKNOWN_IMAGE_BYTES
    if height and width:
        stored = height * width * channels
    return DataFacts(
        num_train=train_examples,
        num_eval=eval_examples,
        num_classes=num_classes,
        image_channels=channels,
        stored_image_bytes=stored,
    )
