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
import op_profile  # noqa: E402

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
    breakdown = op_profile.op_breakdown(path)
    model = common.MODELS[spec["model"]]
    # Conv + dense FLOPs of one forward pass of both views' batches.
    forward = 2 * spec["batch"] * common.forward_flops_per_image(**model)
    forward *= spec["steps"]
    dtype = "bfloat16" if "bfloat16" in spec["precision"] else "float32"
    peak = common.matmul_flops_per_second(spec["matmul_size"], 3, (dtype,))
    peak = peak[dtype]
    return {
        **breakdown,
        "wall_seconds": wall,
        "idle_fraction": max(0.0, 1 - breakdown["busy_seconds"] / wall),
        "images_per_second": spec["batch"] * spec["steps"] / wall,
        "matmul_peak_flops_per_second": peak,
        "conv": op_profile.conv_rates(breakdown["op_seconds"], forward, peak),
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
