"""Replica scaling of simclr_tf's train step on virtual CPU devices: img/s
and step time p50/p90 for the default strategy and MirroredStrategy over 1,
2 and 4 logical CPUs, on the same global batch, with global_bn and
jit_compile on and off. Each configuration runs in its own subprocess
(logical devices are fixed once TensorFlow starts).

  python benchmarks/scaling.py --model=demo --batch=256 --repeats=1

Writes benchmarks/results/scaling_<model>.json (or --output): metadata,
one row per configuration, and overhead_vs_1_replica (step time of R
replicas / 1 replica, same global_bn and jit_compile). Target: 2 replicas
on 2 cores cost at most 10% more than 1. Timings are never asserted.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import app, flags

_BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _BENCHMARKS_DIR)
sys.path.insert(0, os.path.dirname(_BENCHMARKS_DIR))

import common  # noqa: E402

MODELS = common.MODELS
# The target: R=2 on 2 cores costs at most 10% more than R=1.
TARGET_MAX_OVERHEAD_2_REPLICAS = 1.10
# Marks the worker's result line among whatever else reaches stdout.
_RESULT_PREFIX = "SCALING_RESULT "
_JIT_SKIP_REASON = (
    "jit_compile with >1 MirroredStrategy replicas on CPU: XLA cannot read "
    "variables placed on another logical device (tensorflow.org/xla/"
    "known_issues); simclr_tf.train.setup_run refuses it"
)

_MODEL = flags.DEFINE_enum("model", "demo", list(MODELS), "Model to time.")
_BATCH = flags.DEFINE_integer("batch", 256, "Global batch (images).")
_REPLICAS = flags.DEFINE_list("replicas", ["1", "2", "4"], "Mirrored replicas.")
_GLOBAL_BN = flags.DEFINE_list("global_bn", ["true", "false"], "BN modes.")
_JIT = flags.DEFINE_list("jit_compile", ["false", "true"], "XLA modes.")
_DEFAULT_ROW = flags.DEFINE_bool(
    "include_default", True, "Also time the default strategy (reference)."
)
_PRECISION = flags.DEFINE_enum(
    "precision", "float32", ["float32", "mixed_bfloat16"], "Keras policy."
)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per run.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compile.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Runs per configuration.")
_TIMEOUT = flags.DEFINE_integer(
    "timeout", 1800, "Seconds before one configuration's subprocess is killed."
)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON.")
_WORKER = flags.DEFINE_string(
    "worker_config", None, "Internal: time one configuration (JSON) and exit."
)


def _parse_bools(name: str, values: list[str]) -> list[bool]:
    table = {"true": True, "1": True, "false": False, "0": False}
    try:
        return [table[value.lower()] for value in values]
    except KeyError:
        raise ValueError(
            f"--{name}={','.join(values)} must list true/false values; use "
            f"e.g. --{name}=true,false."
        ) from None


def _parse_replicas(values: list[str], batch: int) -> list[int]:
    replicas = [int(value) for value in values]
    for count in replicas:
        if count < 1 or batch % count or batch // count < 2:
            raise ValueError(
                f"--replicas={','.join(values)} with --batch={batch}: every "
                f"replica count must be >= 1, divide the batch and leave >= 2 "
                f"images per replica; use e.g. --batch={4 * max(replicas)}."
            )
    return replicas


def _worker_config(spec: dict[str, object]) -> object:
    """The simclr_tf Config of one configuration (as throughput.py's)."""
    from simclr_tf.config import schema as config_lib

    model = MODELS[spec["model"]]
    return config_lib.from_dict(
        {
            **{k: v for k, v in model.items() if k != "channels"},
            "model_dir": "/tmp/unused",
            "train_batch_size": spec["batch"],
            "temperature": 0.5,
            "learning_rate": 0.3,
            "optimizer": "lars",
            "global_bn": spec["global_bn"],
            "jit_compile": spec["jit_compile"],
            "precision": spec["precision"],
            "strategy": spec["strategy"],
            "num_virtual_cpus": spec["replicas"],
            "seed": 0,
        }
    )


def _fixed_batches(batch: int, size: int, channels: int) -> object:
    """An input_fn giving each replica its own fixed slice, forever."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    shape = (batch, size, size, channels)
    views = [rng.random(shape, np.float32) for _ in range(2)]

    def input_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        local = context.get_per_replica_batch_size(batch)
        replicas = context.num_replicas_in_sync
        # [R, n, S, S, C]: element r is replica r's slice of the batch.
        data = {
            "view1": views[0].reshape((replicas, local) + shape[1:]),
            "view2": views[1].reshape((replicas, local) + shape[1:]),
            "label": np.zeros((replicas, local), np.int64),
        }
        return tf.data.Dataset.from_tensor_slices(data).repeat()

    return input_fn


def run_worker(spec: dict[str, object]) -> dict[str, float]:
    """Times the train step of one configuration in this process.

    Args:
      spec: model, batch, strategy ("default" | "mirrored"), replicas,
        global_bn, jit_compile, precision, steps, warmup.

    Returns:
      images_per_second (global and per replica), step_seconds_p50/p90,
      compile_seconds, replicas_in_sync and peak_rss_mib.
    """
    import numpy as np
    import tensorflow as tf

    from simclr_tf.training import train_state

    config = _worker_config(spec)
    strategy = train_state.setup_run(config)  # devices, strategy, policy, seed
    model_spec = MODELS[spec["model"]]
    size, channels = model_spec["image_size"], model_spec["channels"]
    replicas = strategy.num_replicas_in_sync
    loop, _ = common.build_train_loop(config, strategy, size, channels)
    iterator = iter(
        strategy.distribute_datasets_from_function(
            _fixed_batches(spec["batch"], size, channels)
        )
    )
    times = []
    for _ in range(1 + spec["warmup"] + spec["steps"]):
        started = time.perf_counter()
        float(loop(iterator, tf.constant(1))["contrast_loss"])
        times.append(time.perf_counter() - started)
    timed = times[1 + spec["warmup"] :]
    p50, p90 = np.percentile(timed, [50, 90])
    return {
        "replicas_in_sync": replicas,
        "images_per_second": spec["batch"] / p50,
        "images_per_second_per_replica": spec["batch"] / p50 / replicas,
        "step_seconds_p50": float(p50),
        "step_seconds_p90": float(p90),
        "compile_seconds": times[0],
        "peak_rss_mib": common.peak_rss_mib(),
    }


def _run_subprocess(spec: dict[str, object], timeout: int) -> dict:
    """Runs one configuration in a fresh Python; returns its result dict."""
    return common.run_configuration(__file__, spec, _RESULT_PREFIX, timeout)


def _configurations() -> list[dict[str, object]]:
    """Every (global_bn, jit_compile, strategy, replicas) to time."""
    placements = [("default", 1)] if _DEFAULT_ROW.value else []
    replicas = _parse_replicas(_REPLICAS.value, _BATCH.value)
    placements += [("mirrored", count) for count in replicas]
    return [
        {"strategy": strategy, "replicas": count, "global_bn": bn, "jit": jit}
        for bn in _parse_bools("global_bn", _GLOBAL_BN.value)
        for jit in _parse_bools("jit_compile", _JIT.value)
        for strategy, count in placements
    ]


def _measure(configurations: list[dict[str, object]]) -> list[dict]:
    """Runs each configuration --repeats times (interleaved) into rows."""
    runs: list[list[dict]] = [[] for _ in configurations]
    for _ in range(_REPEATS.value):
        for index, configuration in enumerate(configurations):
            if configuration["jit"] and configuration["replicas"] > 1:
                continue
            spec = {
                "model": _MODEL.value,
                "batch": _BATCH.value,
                "strategy": configuration["strategy"],
                "replicas": configuration["replicas"],
                "global_bn": configuration["global_bn"],
                "jit_compile": configuration["jit"],
                "precision": _PRECISION.value,
                "steps": _STEPS.value,
                "warmup": _WARMUP.value,
            }
            runs[index].append(_run_subprocess(spec, _TIMEOUT.value))
    return [
        _row(configuration, timed)
        for configuration, timed in zip(configurations, runs, strict=True)
    ]


def _row(configuration: dict[str, object], runs: list[dict]) -> dict:
    """One configuration's row: medians over its runs, or why none."""
    import numpy as np

    row = {
        "strategy": configuration["strategy"],
        "replicas": configuration["replicas"],
        "global_bn": configuration["global_bn"],
        "jit_compile": configuration["jit"],
    }
    if not runs:
        return {**row, "skipped": _JIT_SKIP_REASON}
    errors = [run["error"] for run in runs if "error" in run]
    if errors:
        return {**row, "error": errors[0], "runs": runs}
    for key in ("images_per_second", "step_seconds_p50", "step_seconds_p90"):
        row[key] = float(np.median([run[key] for run in runs]))
    row["images_per_second_per_replica"] = (
        row["images_per_second"] / configuration["replicas"]
    )
    row["compile_seconds"] = float(
        np.median([run["compile_seconds"] for run in runs])
    )
    return {**row, "runs": runs}


def overheads(rows: list[dict]) -> list[dict[str, object]]:
    """Step time p50 of R mirrored replicas / 1 mirrored replica.

    Also against the default strategy (no MirroredStrategy at all), for the
    same global_bn and jit_compile. A ratio is None when either row was
    skipped or failed. 2-replica entries say whether they meet the target.
    """

    def step(strategy: str, replicas: int, bn: bool, jit: bool) -> float:
        for row in rows:
            if (row["strategy"], row["replicas"]) == (strategy, replicas) and (
                row["global_bn"],
                row["jit_compile"],
            ) == (bn, jit):
                return row.get("step_seconds_p50", math.nan)
        return math.nan

    def ratio(numerator: float, denominator: float) -> float | None:
        value = numerator / denominator
        return None if math.isnan(value) else value

    result = []
    for row in rows:
        if row["strategy"] != "mirrored":
            continue
        bn, jit, count = row["global_bn"], row["jit_compile"], row["replicas"]
        mine = row.get("step_seconds_p50", math.nan)
        entry = {
            "replicas": count,
            "global_bn": bn,
            "jit_compile": jit,
            "overhead": ratio(mine, step("mirrored", 1, bn, jit)),
            "overhead_vs_default_strategy": ratio(
                mine, step("default", 1, bn, jit)
            ),
        }
        if count == 2 and entry["overhead"] is not None:
            limit = TARGET_MAX_OVERHEAD_2_REPLICAS
            entry["meets_target"] = entry["overhead"] <= limit
        result.append(entry)
    return result


def _flag_values() -> dict[str, object]:
    """This benchmark's flags as given (for the report's metadata)."""
    holders = (_MODEL, _BATCH, _REPLICAS, _GLOBAL_BN, _JIT, _DEFAULT_ROW)
    holders += (_PRECISION, _STEPS, _WARMUP, _REPEATS, _TIMEOUT, _OUTPUT)
    return {holder.name: holder.value for holder in holders}


def main(argv: list[str]) -> None:
    del argv
    if _WORKER.value:
        result = run_worker(json.loads(_WORKER.value))
        print(_RESULT_PREFIX + json.dumps(result), flush=True)
        return
    rows = _measure(_configurations())
    report = {
        "benchmark": "scaling",
        "model": _MODEL.value,
        "model_flags": MODELS[_MODEL.value],
        "batch": _BATCH.value,
        "precision": _PRECISION.value,
        **common.metadata(_flag_values()),
        "rows": rows,
        "overhead_vs_1_replica": overheads(rows),
        "target_max_overhead_2_replicas": TARGET_MAX_OVERHEAD_2_REPLICAS,
    }
    common.write_report(report, _OUTPUT.value, f"scaling_{_MODEL.value}.json")
    if any("error" in row for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
