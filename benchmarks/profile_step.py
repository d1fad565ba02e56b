"""Where the time of one SimCLR train step goes, by the TensorFlow profiler.

Profiles a few steps of simclr_tf's own train loop (the step throughput.py
times) per model and precision, then sums the executed ops' durations by
category: convolution forward / input-gradient / filter-gradient,
BatchNormalization forward / backward, dense matmuls, the optimizer update
(ops under the optimizer's name scope), casts, and the remaining element-wise
ops (ReLU, residual adds, padding, the loss). It also reports how much of
the wall time no op was running (executor and Python overhead) and, for
convolutions, the FLOP/s each category reaches against a large matmul.

  python benchmarks/profile_step.py --models=demo,resnet18_cifar

Writes benchmarks/results/profile_step.json (or --output). Every
configuration runs in its own subprocess; the raw profiles stay in --logdir
for TensorBoard's profile plugin.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import sys
import tempfile
import time

from absl import app, flags

_BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _BENCHMARKS_DIR)
sys.path.insert(0, os.path.dirname(_BENCHMARKS_DIR))

import common  # noqa: E402

_MODELS = flags.DEFINE_list("models", list(common.MODELS), "Models.")
_PRECISIONS = flags.DEFINE_list(
    "precisions", ["float32", "mixed_bfloat16"], "Keras dtype policies."
)
_BATCH = flags.DEFINE_integer("batch", 256, "Global batch (images).")
_STEPS = flags.DEFINE_integer("steps", 3, "Profiled steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Steps run before profiling.")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 4096, "Matmul side n.")
_INTER_OP = flags.DEFINE_integer(
    "inter_op_threads",
    1,
    "TensorFlow inter-op threads while profiling. 1 runs one op at a time "
    "(each on all cores), so op durations add up to the busy time and the "
    "FLOP/s per category are the op's own; 0 keeps TensorFlow's default, "
    "where independent ops (e.g. a layer's two gradients) overlap and share "
    "the cores.",
)
_LOGDIR = flags.DEFINE_string(
    "logdir", None, "Where the raw profiles go; default a temporary folder."
)
_TIMEOUT = flags.DEFINE_integer(
    "timeout", 3600, "Seconds before one configuration's subprocess is killed."
)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON.")
_WORKER = flags.DEFINE_string(
    "worker_config", None, "Internal: profile one configuration and exit."
)

_RESULT_PREFIX = "PROFILE_RESULT "
# The optimizer's name scope in simclr_tf's step (optim.build_optimizer).
OPTIMIZER_SCOPE = "LARS"
# Op types (as executed, oneDNN variants included) -> category. Checked in
# this order; the first substring found wins.
_TYPE_CATEGORIES = (
    ("Conv2DBackpropFilter", "conv_filter_gradient"),
    ("Conv2DBackpropInput", "conv_input_gradient"),
    ("Conv2D", "conv_forward"),
    ("FusedBatchNormGrad", "batch_norm_backward"),
    ("FusedBatchNorm", "batch_norm_forward"),
    ("MatMul", "dense"),
    ("Cast", "cast"),
)
CATEGORIES = (
    *(category for _, category in _TYPE_CATEGORIES),
    "optimizer",
    "elementwise_and_other",
)


def categorize(op_name: str, op_type: str) -> str:
    """The category of one executed op (its name scope, then its type)."""
    if f"/{OPTIMIZER_SCOPE}/" in f"/{op_name}":
        return "optimizer"
    for marker, category in _TYPE_CATEGORIES:
        if marker in op_type:
            return category
    return "elementwise_and_other"


def _union_seconds(intervals: list[tuple[int, int]]) -> float:
    """Length of the union of [start, end) picosecond intervals, in s."""
    covered, end_so_far = 0, None
    for start, end in sorted(intervals):
        if end_so_far is None or start > end_so_far:
            covered += end - start
            end_so_far = end
        elif end > end_so_far:
            covered += end - end_so_far
            end_so_far = end
    return covered / 1e12


def op_breakdown(xspace_path: str) -> dict[str, object]:
    """Sums the host ops of a profile (an .xplane.pb) by category.

    Only the executor's compute threads (lines "tf_Compute...") are read:
    each op event there lasts from the op's start to its end, including
    the intra-op threads it waits for, so concurrent ops can sum to more
    than the wall time; `busy_seconds` is the union of their intervals.

    Returns:
      {"op_seconds": {category: s}, "op_fraction": {category: share of
      the summed op time}, "top_ops": [[type, s, count], ...] (10 largest),
      "busy_seconds": s}.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(xspace_path, "rb") as file:
        space.ParseFromString(file.read())
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    by_type = collections.Counter()
    counts = collections.Counter()
    intervals = []
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                metadata = plane.event_metadata[event.metadata_id]
                if not metadata.display_name:  # Executor bookkeeping.
                    continue
                op_name = metadata.name.split(":")[0]
                op_type = metadata.display_name
                duration = event.duration_ps / 1e12
                seconds[categorize(op_name, op_type)] += duration
                by_type[op_type] += duration
                counts[op_type] += 1
                start = line.timestamp_ns * 1000 + event.offset_ps
                intervals.append((start, start + event.duration_ps))
    total = sum(seconds.values())
    if total <= 0:
        raise ValueError(f"{xspace_path} holds no TensorFlow op events.")
    return {
        "op_seconds": seconds,
        "op_fraction": {name: s / total for name, s in seconds.items()},
        "top_ops": [
            [name, s, counts[name]] for name, s in by_type.most_common(10)
        ],
        "busy_seconds": _union_seconds(intervals),
    }


def conv_rates(
    op_seconds: dict[str, float], forward_flops: float, peak: float
) -> dict[str, dict[str, float]]:
    """FLOP/s of each convolution category, and its fraction of `peak`.

    Each of forward, input gradient and filter gradient does about the
    forward's multiply-adds (the first layer's input gradient is not
    computed, so that rate is a slight overestimate). With concurrent ops
    (--inter_op_threads=0) the rates are those of ops sharing the cores.
    """
    rates = {
        category: forward_flops / op_seconds[category]
        for category in CATEGORIES[:3]
        if op_seconds[category] > 0
    }
    return {
        name: {"flops_per_second": rate, "fraction_of_matmul_peak": rate / peak}
        for name, rate in rates.items()
    }


def run_worker(spec: dict[str, object]) -> dict[str, object]:
    """Profiles one configuration in this process."""
    import tensorflow as tf

    if spec["inter_op_threads"]:
        tf.config.threading.set_inter_op_parallelism_threads(
            spec["inter_op_threads"]
        )
    step = common.build_simclr_step({**spec, "jit_compile": False})
    for _ in range(1 + spec["warmup"]):
        step.run()
    logdir = spec["logdir"]
    tf.profiler.experimental.start(logdir)
    started = time.perf_counter()
    for _ in range(spec["steps"]):
        step.run()
    wall = time.perf_counter() - started
    tf.profiler.experimental.stop()
    path = max(
        glob.glob(os.path.join(logdir, "plugins/profile/*/*.xplane.pb")),
        key=os.path.getmtime,
    )
    breakdown = op_breakdown(path)
    model = common.MODELS[spec["model"]]
    # Conv + dense FLOPs of one forward pass of both views' batches.
    forward = 2 * spec["batch"] * common.forward_flops_per_image(**model)
    forward *= spec["steps"]
    dtype = "bfloat16" if "bfloat16" in spec["precision"] else "float32"
    peak = common.matmul_flops_per_second(spec["matmul_size"], 3)[dtype]
    return {
        **breakdown,
        "wall_seconds": wall,
        "idle_fraction": max(0.0, 1 - breakdown["busy_seconds"] / wall),
        "images_per_second": spec["batch"] * spec["steps"] / wall,
        "matmul_peak_flops_per_second": peak,
        "conv": conv_rates(breakdown["op_seconds"], forward, peak),
        "xspace": path,
    }


def main(argv: list[str]) -> None:
    del argv
    if _WORKER.value:
        result = run_worker(json.loads(_WORKER.value))
        print(_RESULT_PREFIX + json.dumps(result))
        return
    logdir = _LOGDIR.value or tempfile.mkdtemp(prefix="profile_step_")
    rows = []
    for model in _MODELS.value:
        if model not in common.MODELS:
            raise app.UsageError(
                f"--models: unknown {model!r}; choose from "
                f"{', '.join(common.MODELS)}."
            )
        for precision in _PRECISIONS.value:
            spec = {
                "model": model,
                "precision": precision,
                "batch": _BATCH.value,
                "steps": _STEPS.value,
                "warmup": _WARMUP.value,
                "matmul_size": _MATMUL_SIZE.value,
                "inter_op_threads": _INTER_OP.value,
                "logdir": os.path.join(logdir, f"{model}_{precision}"),
            }
            result = common.run_configuration(
                __file__, spec, _RESULT_PREFIX, _TIMEOUT.value
            )
            rows.append({"model": model, "precision": precision, **result})
            print(f"{model} {precision}: {json.dumps(result)[:300]}")
    flag_values = {
        name: flags.FLAGS[name].value
        for name in (
            "models",
            "precisions",
            "batch",
            "steps",
            "warmup",
            "inter_op_threads",
        )
    }
    report = {**common.metadata(flag_values), "rows": rows}
    common.write_report(report, _OUTPUT.value, "profile_step.json")


if __name__ == "__main__":
    app.run(main)
