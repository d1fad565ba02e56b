"""Writes docs/memory.md's tables from the memory plan (planning/).

    python -m simclr_tf.tools.memory_table > docs/memory_tables.md

For ResNet-50/101/152 at 1x-3x with and without selective kernels,
pretrained as flags/imagenet_v2.cfg does (224 px, mixed_bfloat16, LARS,
3-layer head), at global batch 4096-32768: per device kind (TPU v3 cores,
v4 and v5e chips, 40 and 80 GB GPUs) the fewest replicas (a power of two)
whose per-replica memory fits, and that memory; and the bytes the gather
of the projections and the gradient all-reduce move per replica and step.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app

from simclr_tf.config import schema as config_lib
from simclr_tf.planning import devices, memory

MODELS = [
    (depth, width, sk)
    for depth in (50, 101, 152)
    for width in (1, 2, 3)
    for sk in (0.0, 0.0625)
]
BATCHES = (4096, 8192, 16384, 32768)
DEVICES = ("v3", "v4", "v5e", "40", "80")
DEVICE_NAMES = {
    "v3": "TPU v3 core (16 GiB)",
    "v4": "TPU v4 chip (32 GiB)",
    "v5e": "TPU v5e chip (16 GiB)",
    "40": "GPU 40 GB",
    "80": "GPU 80 GB",
}
IMAGENET = memory.DataFacts(
    num_train=1_281_167,
    num_eval=50_000,
    num_classes=1000,
    image_channels=3,
    stored_image_bytes=memory.UNKNOWN_IMAGE_BYTES,
)
MAX_REPLICAS = 4096


def config_for(depth: int, width: int, sk: float, batch: int):
    """flags/imagenet_v2.cfg's pretraining settings for one model."""
    return config_lib.from_dict(
        {
            "model_dir": "plan",
            "dataset": "imagenet2012",
            "image_size": 224,
            "resnet_depth": depth,
            "width_multiplier": width,
            "sk_ratio": sk,
            "num_proj_layers": 3,
            "train_batch_size": batch,
            "optimizer": "lars",
            "precision": "mixed_bfloat16",
        }
    )


def fewest_replicas(
    depth: int, width: int, sk: float, batch: int, kind: str
) -> tuple[int, memory.MemoryPlan] | None:
    """The fewest power-of-two replicas of `kind` that fit, with the plan."""
    replicas = 1
    while replicas <= min(batch // 2, MAX_REPLICAS):
        config = config_for(depth, width, sk, batch)
        plan = memory.plan_run(
            config, devices.named(kind, replicas), IMAGENET, "mixed_bfloat16"
        )
        if plan.replica_total <= plan.devices.replica_memory:
            return replicas, plan
        replicas *= 2
    return None


def model_name(depth: int, width: int, sk: float) -> str:
    return f"R{depth} {width}x" + ("+SK" if sk else "")


def model_table() -> list[str]:
    """Per model: parameters, fixed bytes, activations per image."""
    lines = [
        "| model | trainable parameters (with heads) | F "
        "| params + grads + LARS + bf16 copies "
        "| activations per image (2 views) | gradient all-reduce per step |",
        "|---|---|---|---|---|---|",
    ]
    for depth, width, sk in MODELS:
        config = config_for(depth, width, sk, 4096)
        plan = memory.plan_run(
            config, devices.named("v3", 128), IMAGENET, "mixed_bfloat16"
        )
        facts = memory.network_of(config, 1000, 3)
        fixed = sum(
            plan.replica[name]
            for name in (
                "parameters",
                "gradients",
                "optimizer",
                "weight copies",
            )
        )
        per_image = (
            plan.replica["activations"] + plan.replica["working set"]
        ) // plan.per_replica_batch
        lines.append(
            f"| {model_name(depth, width, sk)} "
            f"| {facts.trainable_parameters / 1e6:.1f}M | {facts.feature_dim} "
            f"| {memory.size(fixed)} | {memory.size(per_image)} "
            f"| {memory.size(plan.gradient_bytes)} |"
        )
    return lines


def batch_table(batch: int) -> list[str]:
    """Fewest replicas and the memory of each at one global batch."""
    gathered = memory.plan_run(
        config_for(50, 1, 0.0, batch),
        devices.named("v3", 1024),
        IMAGENET,
        "mixed_bfloat16",
    ).gather_bytes
    lines = [
        f"The gather of the projections moves {memory.size(gathered)} per "
        f"replica and step (a ring all-reduce of the [N, 2d] float32 block, "
        f"forward and backward: 4 N 2d 4 (R - 1) / R bytes; shown at R = "
        f"1024). Each cell: the fewest replicas (a power of two) that fit, "
        f"and the memory of one.",
        "",
        "| model | " + " | ".join(DEVICE_NAMES[k] for k in DEVICES) + " |",
        "|---|" + "---|" * len(DEVICES),
    ]
    for depth, width, sk in MODELS:
        cells = []
        for kind in DEVICES:
            found = fewest_replicas(depth, width, sk, batch, kind)
            if found is None:
                cells.append("does not fit")
                continue
            replicas, plan = found
            cells.append(f"{replicas} × {memory.size(plan.replica_total)}")
        lines.append(
            f"| {model_name(depth, width, sk)} | " + " | ".join(cells) + " |"
        )
    return lines


def main(argv: Sequence[str]) -> None:
    del argv
    out = ["### Per model (224 px, mixed_bfloat16, 3-layer head)", ""]
    out += model_table()
    for batch in BATCHES:
        out += ["", f"### Batch {batch}", ""]
        out += batch_table(batch)
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    app.run(main)
