"""Throughput of one SimCLR train step (two views, encoder + head, NT-Xent,
optimizer update) per precision, on fixed in-memory batches (no input
pipeline), using simclr_tf's own train step.

  python benchmarks/throughput.py --model=demo \
      --precisions=float32,mixed_bfloat16 --repeats=2

Prints one JSON document and writes it to --output (default
benchmarks/results/throughput_<model>.json): img/s, step time p50/p90,
compile time and peak RSS per precision, plus git SHA, versions, device and
date. Timings are never asserted in tests; quote medians (±20% here).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The models measured: flags as in the recipes that use them.
MODELS = {
    "demo": {  # flags/demo.cfg
        "image_size": 28,
        "channels": 1,
        "resnet_depth": 18,
        "width_multiplier": 0.25,
        "num_proj_layers": 2,
    },
    "resnet18_cifar": {  # ResNet-18, CIFAR stem, 32x32x3
        "image_size": 32,
        "channels": 3,
        "resnet_depth": 18,
        "width_multiplier": 1.0,
        "num_proj_layers": 2,
    },
}

_MODEL = flags.DEFINE_enum("model", "demo", list(MODELS), "Model to time.")
_PRECISIONS = flags.DEFINE_list(
    "precisions", ["float32", "mixed_bfloat16"], "Precisions to time."
)
_BATCH = flags.DEFINE_integer("batch", 256, "Global batch (images).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timings per precision.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compile.")
_JIT = flags.DEFINE_bool("jit_compile", False, "Compile the step with XLA.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON.")


def _git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_precision(precision: str) -> dict[str, float]:
    """Times the train step of --model under one Keras precision policy."""
    import keras
    import numpy as np
    import tensorflow as tf

    from simclr_tf import config as config_lib
    from simclr_tf import train

    spec = MODELS[_MODEL.value]
    keras.utils.clear_session()
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    config = config_lib.from_dict(
        {
            **{k: v for k, v in spec.items() if k != "channels"},
            "model_dir": "/tmp/unused",
            "train_batch_size": _BATCH.value,
            "temperature": 0.5,
            "learning_rate": 0.3,
            "optimizer": "lars",
            "jit_compile": _JIT.value,
        }
    )
    size, channels = spec["image_size"], spec["channels"]
    model = train.build_model(config, 10, channels)
    model(tf.zeros((1, size, size, channels)))
    schedule = train.Schedule(
        steps_per_epoch=100,
        total_steps=10_000,
        warmup_steps=10,
        checkpoint_every=0,
        steps_per_loop=1,
    )
    optimizer = train.build_optimizer(config, schedule)
    strategy = tf.distribute.get_strategy()
    loop = train.make_train_loop(
        strategy, train.make_train_step(config, model, optimizer, 1)
    )
    shape = (_BATCH.value, size, size, channels)
    batch = {
        "view1": tf.random.uniform(shape, seed=1),
        "view2": tf.random.uniform(shape, seed=2),
        "label": tf.zeros([_BATCH.value], tf.int64),
    }
    iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
    started = time.perf_counter()
    float(loop(iterator, tf.constant(1))["contrast_loss"])
    compile_seconds = time.perf_counter() - started
    for _ in range(_WARMUP.value):
        float(loop(iterator, tf.constant(1))["contrast_loss"])
    times = []
    for _ in range(_STEPS.value):
        started = time.perf_counter()
        float(loop(iterator, tf.constant(1))["contrast_loss"])
        times.append(time.perf_counter() - started)
    p50, p90 = np.percentile(times, [50, 90])
    return {
        "images_per_second": _BATCH.value / p50,
        "step_seconds_p50": p50,
        "step_seconds_p90": p90,
        "compile_seconds": compile_seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / 1024,
    }


def main(argv: list[str]) -> None:
    del argv
    import keras
    import numpy as np
    import tensorflow as tf

    # Precisions are timed in turn, --repeats times (A B A B ...), so drift
    # of this shared machine hits all of them alike; the median is quoted.
    runs: dict[str, list[dict[str, float]]] = {}
    for _ in range(_REPEATS.value):
        for precision in _PRECISIONS.value:
            runs.setdefault(precision, []).append(time_precision(precision))
    results = {
        precision: {
            "images_per_second_median": float(
                np.median([run["images_per_second"] for run in timed])
            ),
            "runs": timed,
        }
        for precision, timed in runs.items()
    }
    fastest = max(results, key=lambda p: results[p]["images_per_second_median"])
    report = {
        "benchmark": "throughput",
        "model": _MODEL.value,
        "model_flags": MODELS[_MODEL.value],
        "batch": _BATCH.value,
        "jit_compile": _JIT.value,
        "results": results,
        "fastest": fastest,
        "git_sha": _git_sha(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "device": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs",
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    output = _OUTPUT.value or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"throughput_{_MODEL.value}.json",
    )
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as file:
        file.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
