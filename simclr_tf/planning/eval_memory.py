"""The evaluation's plan: which representations run on how many training
images, what their feature banks take per replica, and the host's peak.

The evaluation (evaluation/protocol.py) keeps each representation's
training features in a bank on the replicas (rows / replicas each), trains
the linear classifier there and streams the eval split past it and the kNN
bank. The baselines (random init, raw pixels) use the first
--baseline_max_train_examples training images; raw pixels also only as
many as fit the replicas' memory, and are refused (with the reason in
result.json) when not even one image per class fits.
"""

from __future__ import annotations

import dataclasses

from simclr_tf.config import schema as config_lib
from simclr_tf.planning import devices as devices_lib
from simclr_tf.planning import memory, network

# Share of a replica's memory the banks may fill; the rest is the model,
# its optimizer (train_then_eval keeps it) and XLA's buffers.
BANK_SHARE = 0.6
# The linear classifier's global batch before rounding up to the
# replicas (linear.py's default).
LINEAR_BATCH = 256
# Report images kept on the host (evaluation/protocol.py's cap).
REPORT_IMAGE_BYTES = 256 * 2**20
# kNN: bytes of the candidate block [replicas, queries, k] gathered per
# round, and train rows compared per matmul.
KNN_GATHER_BYTES = 64 * 2**20
KNN_TRAIN_CHUNK = 4096


@dataclasses.dataclass(frozen=True, kw_only=True)
class Representation:
    """One representation the evaluation compares.

    Attributes:
      prefix: metric prefix: "" (the encoder), "random_init/", "pixels/".
      feature_dim: F.
      train_rows: training images in its bank (all hosts).
      skipped: why it does not run ("" when it does).
      note: how train_rows was cut ("" when all training images are used).
    """

    prefix: str
    feature_dim: int
    train_rows: int
    skipped: str = ""
    note: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalPlan:
    """What the evaluation does, and its memory.

    Attributes:
      representations: in evaluation order.
      test_rows: eval-split images scored.
      per_replica_batch: eval images per replica and step.
      linear_batch: the linear classifier's global batch.
      knn_queries: eval rows per replica per kNN round.
      knn_chunk: bank rows per similarity matmul.
      replica_bytes: peak bytes of one replica (largest bank).
      host: item -> bytes on the host.
    """

    representations: tuple[Representation, ...]
    test_rows: int
    per_replica_batch: int
    linear_batch: int
    knn_queries: int
    knn_chunk: int
    replica_bytes: int
    host: dict[str, int]

    @property
    def host_total(self) -> int:
        """The host's part (without replicas that are CPU devices)."""
        return sum(self.host.values())

    def peak_host_bytes(self, devices: devices_lib.Devices) -> int:
        """Host peak of an evaluation alone: its part, the runtime and,
        on CPU devices, the replicas' banks."""
        replicas = self.replica_bytes * devices.local_replicas
        return (
            self.host_total
            + memory.RUNTIME_BYTES
            + (replicas if devices.on_host else 0)
        )


def bank_bytes(rows: int, feature_dim: int, replicas: int, batch: int) -> int:
    """Bytes per replica of a bank of `rows` float32 features + labels,
    padded to whole steps of `batch` rows per replica."""
    steps = -(-rows // (replicas * batch))
    return steps * batch * (4 * feature_dim + 4)


def _limit(total: int, cap: int) -> int:
    return min(total, cap) if cap > 0 else total


def _classifier_bytes(feature_dim: int, num_classes: int) -> int:
    """Kernel, its gradient and velocity, bias, mean and std (float32)."""
    return 4 * (3 * feature_dim * num_classes + 2 * feature_dim + num_classes)


def _baselines(
    config: config_lib.Config,
    train_rows: int,
    pixels_dim: int,
    feature_dim: int,
    budget: int | None,
    replicas: int,
    batch: int,
    num_classes: int,
) -> list[Representation]:
    """The random-init and raw-pixel Representations."""
    cap = config.eval.baseline_max_train_examples
    rows = _limit(train_rows, cap)
    note = ""
    if rows < train_rows:
        note = (
            f"first {rows:,} of {train_rows:,} training images "
            f"(--baseline_max_train_examples)"
        )
    found = [
        Representation(
            prefix="random_init/",
            feature_dim=feature_dim,
            train_rows=rows,
            note=note,
        )
    ]
    pixel_rows, pixel_note, skipped = rows, note, ""
    if budget is not None:
        per_row = 4 * pixels_dim + 4
        room = budget - _classifier_bytes(pixels_dim, num_classes)
        fits = max(0, (room // per_row - batch) * replicas)
        if fits < pixel_rows:
            pixel_rows = fits
            pixel_note = (
                f"first {fits:,} of {train_rows:,} training images (as many "
                f"{pixels_dim:,}-dim rows as fit {memory.size(budget)} per "
                f"replica)"
            )
        if fits < max(1, num_classes):
            skipped = (
                f"raw pixels: {pixels_dim:,}-dim features of even "
                f"{max(1, num_classes)} training images do not fit the "
                f"{memory.size(budget)} per replica left for banks; pass "
                f"--eval_baselines=false or a smaller --image_size"
            )
    found.append(
        Representation(
            prefix="pixels/",
            feature_dim=pixels_dim,
            train_rows=pixel_rows,
            note=pixel_note,
            skipped=skipped,
        )
    )
    return found


def plan_evaluation(
    config: config_lib.Config,
    devices: devices_lib.Devices,
    data: memory.DataFacts,
    facts: network.NetworkFacts,
    training_bytes: int = 0,
) -> EvalPlan:
    """The plan of a pretraining run's evaluation (or a supervised one's:
    its model only, no banks).

    Args:
      config: the run's Config.
      devices: the strategy's devices.
      data: facts of the data (num_train after --label_fraction).
      facts: the model's NetworkFacts.
      training_bytes: bytes per replica the trained model and optimizer
        still hold (train_then_eval).

    Returns:
      The EvalPlan.
    """
    replicas, side = devices.replicas, config.data.image_size
    channels = data.image_channels
    batch = -(-config.eval.eval_batch_size // replicas)
    test_rows = _limit(data.num_eval, config.eval.max_eval_examples)
    if config.eval.eval_steps > 0:
        steps_rows = config.eval.eval_steps * config.eval.eval_batch_size
        test_rows = min(test_rows, steps_rows)
    model_bytes = 4 * facts.parameters + 2 * 4 * facts.largest_tensor * batch
    model_bytes += batch * side * side * channels * 4 * 2
    budget = None
    if devices.replica_memory:
        budget = int(
            devices.replica_memory * BANK_SHARE - model_bytes - training_bytes
        )
    representations: list[Representation] = []
    pretrain = config.train.train_mode == "pretrain"
    train_rows = _limit(data.num_train, config.eval.max_eval_examples)
    if pretrain:
        representations.append(
            Representation(
                prefix="",
                feature_dim=facts.feature_dim,
                train_rows=train_rows,
            )
        )
        if config.eval.eval_baselines:
            representations += _baselines(
                config,
                train_rows,
                side * side * channels,
                facts.feature_dim,
                budget,
                replicas,
                batch,
                data.num_classes,
            )
    k = max(1, config.eval.knn_k)
    queries = max(
        1, min(batch, KNN_GATHER_BYTES // (8 * k * replicas * replicas))
    )
    running = [r for r in representations if not r.skipped]
    bank = max(
        (
            bank_bytes(r.train_rows, r.feature_dim, replicas, batch)
            + _classifier_bytes(r.feature_dim, data.num_classes)
            for r in running
        ),
        default=0,
    )
    knn = 8 * queries * replicas * (KNN_TRAIN_CHUNK + 2 * k * replicas)
    replica_bytes = model_bytes + bank + (knn if config.eval.eval_knn else 0)
    host = _host_items(config, devices, data, facts, test_rows, batch)
    return EvalPlan(
        representations=tuple(representations),
        test_rows=test_rows,
        per_replica_batch=batch,
        linear_batch=-(-LINEAR_BATCH // replicas) * replicas,
        knn_queries=queries,
        knn_chunk=KNN_TRAIN_CHUNK,
        replica_bytes=replica_bytes,
        host=host,
    )


def _host_items(
    config: config_lib.Config,
    devices: devices_lib.Devices,
    data: memory.DataFacts,
    facts: network.NetworkFacts,
    test_rows: int,
    batch: int,
) -> dict[str, int]:
    """The evaluation's host memory: results, reports, its pipeline."""
    side, channels = config.data.image_size, data.image_channels
    host_batch = batch * devices.local_replicas
    items = {
        # labels, predictions and the three scores' ranks, int32 per row
        "results": 5 * 4 * test_rows,
        "eval pipeline": memory.PIPELINE_BATCHES
        * host_batch
        * side
        * side
        * channels
        * 4
        + 2 * host_batch * data.stored_image_bytes,
    }
    if config.eval.eval_reports:
        # float32 features, and the float64 copies the reports make
        items["reports"] = test_rows * facts.feature_dim * (4 + 8 + 8)
        items["reports"] += min(
            REPORT_IMAGE_BYTES, test_rows * side * side * channels
        )
    return items


def describe(plan: EvalPlan, devices: devices_lib.Devices) -> list[str]:
    """Log lines: each representation, the replicas' and host's peak."""
    names = {
        "": "encoder",
        "random_init/": "random init",
        "pixels/": "raw pixels",
    }
    lines = []
    for entry in plan.representations:
        name = names[entry.prefix]
        if entry.skipped:
            lines.append(f"evaluation plan: {name} refused: {entry.skipped}")
            continue
        per_replica = bank_bytes(
            entry.train_rows,
            entry.feature_dim,
            devices.replicas,
            plan.per_replica_batch,
        )
        lines.append(
            f"evaluation plan: {name} bank {entry.train_rows:,} x "
            f"{entry.feature_dim:,} float32 ({memory.size(per_replica)} per "
            f"replica)" + (f"; {entry.note}" if entry.note else "")
        )
    items = dict(plan.host, runtime=memory.RUNTIME_BYTES)
    if devices.on_host:
        items["replicas (CPU devices)"] = (
            plan.replica_bytes * devices.local_replicas
        )
    listed = ", ".join(f"{k} {memory.size(v)}" for k, v in items.items())
    lines.append(
        f"evaluation plan: {plan.test_rows:,} eval images, "
        f"{plan.per_replica_batch} per replica and step; peak per replica "
        f"{memory.size(plan.replica_bytes)}; peak host memory "
        f"{memory.size(plan.peak_host_bytes(devices))} ({listed})"
    )
    return lines
