"""Throughput of one SimCLR train step (two views, encoder + heads, NT-Xent,
LARS) on fixed in-memory batches: simclr_tf per model, precision and XLA
setting, against the same step in PyTorch (benchmarks/torch_step.py) and the
machine's large-matmul rate, all in one run. Every configuration runs in its
own subprocess, so peak RSS and compiler state are its own.

  python benchmarks/throughput.py --models=demo,resnet18_cifar --repeats=2

Writes benchmarks/results/throughput.json (or --output): metadata, one row
per configuration (img/s, step p50/p90, compile, peak RSS, FLOPs, fraction of
matmul peak), and ratio_vs_best_torch. Timings are never asserted in tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

from absl import app, flags

_BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _BENCHMARKS_DIR)
sys.path.insert(0, os.path.dirname(_BENCHMARKS_DIR))

import common  # noqa: E402

# The models measured (benchmarks/common.py).
MODELS = common.MODELS
# What simclr_tf adds to MODELS: its defaults proj_out_dim=128 and the online
# linear head of lineareval_while_pretraining=True over 10 classes.
PROJ_OUT_DIM = 128
NUM_CLASSES = 10
# The target: default CPU mode >= 1.5x the best PyTorch mode.
TARGET_MIN_RATIO_VS_TORCH = 1.5
FLOPS_CONVENTION = (
    "analytic conv+dense 2*MACs per view; step = 3 x fwd x 2 views"
)
_RESULT_PREFIX = "THROUGHPUT_RESULT "
_TORCH_FOUND = importlib.util.find_spec("torch") is not None

_MODELS = flags.DEFINE_list("models", list(MODELS), "Models to time.")
_PRECISIONS = flags.DEFINE_list(
    "precisions", ["float32", "mixed_bfloat16"], "simclr_tf Keras policies."
)
_JIT = flags.DEFINE_list("jit", ["false", "true"], "simclr_tf XLA settings.")
_TORCH_MODES = flags.DEFINE_list(
    "torch_modes",
    ["all"],
    "torch_step.MODES to time; 'all' = every mode if torch is installed; "
    "empty (--torch_modes=) skips torch.",
)
_BATCH = flags.DEFINE_integer("batch", 256, "Global batch (images).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per run.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compile.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Runs per configuration.")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 4096, "Matmul side n.")
_MATMUL_REPEATS = flags.DEFINE_integer("matmul_repeats", 5, "Matmuls timed.")
_TIMEOUT = flags.DEFINE_integer(
    "timeout", 3600, "Seconds before one configuration's subprocess is killed."
)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON.")
_WORKER = flags.DEFINE_string(
    "worker_config", None, "Internal: time one configuration (JSON) and exit."
)


def forward_flops_per_image(
    image_size: int,
    channels: int,
    resnet_depth: int,
    width_multiplier: float,
    num_proj_layers: int,
    *,
    cifar_stem: bool | None = None,
    proj_out_dim: int = PROJ_OUT_DIM,
    num_classes: int = NUM_CLASSES,
) -> int:
    """Conv and dense FLOPs (2 x multiply-adds) of one view's forward pass.

    Counted analytically from simclr_tf's architecture (resnet.py, heads.py):
    stem, every conv incl. projection shortcuts, projection head and linear
    head. BN, ReLU, additions and pooling (< 1% here) are not counted, as in
    the usual model-FLOPs convention.

    Args:
      image_size: square input side S >= 1 (pixels).
      channels: input channels C >= 1.
      resnet_depth: a key of simclr_tf.models.resnet.BLOCKS_PER_GROUP.
      width_multiplier: channel multiplier > 0.
      num_proj_layers: dense layers of the nonlinear projection head >= 1.
      cifar_stem: 3x3/1 stem without max-pool; None = image_size <= 32.
      proj_out_dim: width of z.
      num_classes: outputs of the linear head; 0 for none.

    Returns:
      FLOPs per image per view (int).
    """
    from simclr_tf.models import resnet

    if cifar_stem is None:
        cifar_stem = image_size <= 32
    kernel, stride = (3, 1) if cifar_stem else (7, 2)
    width = round(64 * width_multiplier)
    side = -(-image_size // stride)
    macs = side * side * kernel * kernel * channels * width
    if not cifar_stem:
        side = -(-side // 2)  # 3x3/2 max-pool, SAME.
    blocks, bottleneck = resnet.BLOCKS_PER_GROUP[resnet_depth]
    expansion = resnet.BOTTLENECK_EXPANSION if bottleneck else 1
    for group, count in enumerate(blocks):
        filters = round(resnet.GROUP_BASE_WIDTHS[group] * width_multiplier)
        for block in range(count):
            stride = resnet.GROUP_STRIDES[group] if block == 0 else 1
            out_side = -(-side // stride)
            if block == 0:  # 1x1 projection shortcut.
                macs += out_side**2 * width * filters * expansion
            if bottleneck:
                macs += side**2 * width * filters
                macs += out_side**2 * (9 * filters * filters)
                macs += out_side**2 * filters * filters * expansion
            else:
                macs += out_side**2 * 9 * (width * filters + filters * filters)
            side, width = out_side, filters * expansion
    macs += (num_proj_layers - 1) * width * width + width * proj_out_dim
    macs += width * num_classes
    return 2 * macs


def step_flops_per_image(model: str) -> int:
    """Train-step FLOPs per image: 2 views x 3 x forward (the backward pass
    costs about 2 forwards: gradients w.r.t. inputs and weights)."""
    return 2 * 3 * forward_flops_per_image(**MODELS[model])


def _time_simclr_tf(spec: dict[str, object]) -> dict[str, object]:
    """Times simclr_tf's own train loop (one step per call) in this process."""
    import keras
    import numpy as np
    import tensorflow as tf

    from simclr_tf import config as config_lib
    from simclr_tf import train, train_step

    model_spec = MODELS[spec["model"]]
    keras.mixed_precision.set_global_policy(spec["precision"])
    keras.utils.set_random_seed(0)
    config = config_lib.from_dict(
        {
            **{k: v for k, v in model_spec.items() if k != "channels"},
            "model_dir": "/tmp/unused",
            "train_batch_size": spec["batch"],
            "temperature": 0.5,
            "learning_rate": 0.3,
            "optimizer": "lars",
            "jit_compile": spec["jit_compile"],
        }
    )
    size, channels = model_spec["image_size"], model_spec["channels"]
    model = train.build_model(config, NUM_CLASSES, channels)
    model(tf.zeros((1, size, size, channels)))
    schedule = train.Schedule(
        steps_per_epoch=100,
        total_steps=10_000,
        warmup_steps=10,
        checkpoint_every=0,
        steps_per_loop=1,
    )
    optimizer = train.build_optimizer(config, schedule)
    loop = train_step.make_train_loop(
        tf.distribute.get_strategy(),
        train_step.make_train_step(config, model, optimizer, 1),
    )
    shape = (spec["batch"], size, size, channels)
    batch = {
        "view1": tf.random.uniform(shape, seed=1),
        "view2": tf.random.uniform(shape, seed=2),
        "label": tf.zeros([spec["batch"]], tf.int64),
    }
    iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
    times = []
    for _ in range(1 + spec["warmup"] + spec["steps"]):
        started = time.perf_counter()
        float(loop(iterator, tf.constant(1))["contrast_loss"])
        times.append(time.perf_counter() - started)
    p50, p90 = np.percentile(times[1 + spec["warmup"] :], [50, 90])
    return {
        "images_per_second": spec["batch"] / float(p50),
        "step_seconds_p50": float(p50),
        "step_seconds_p90": float(p90),
        "compile_seconds": times[0],
        "parameters": sum(
            int(np.prod(v.shape)) for v in model.trainable_weights
        ),
    }


def _time_matmul(spec: dict[str, object]) -> dict[str, float]:
    """FLOP/s of an n x n tf.matmul in float32 and bfloat16 (median)."""
    import numpy as np
    import tensorflow as tf

    n = spec["size"]
    rates = {}
    for dtype in (tf.float32, tf.bfloat16):
        a = tf.cast(tf.random.uniform((n, n), seed=1), dtype)
        b = tf.cast(tf.random.uniform((n, n), seed=2), dtype)
        product = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)))
        float(product(a, b))  # Trace and warm up.
        times = []
        for _ in range(spec["repeats"]):
            started = time.perf_counter()
            float(product(a, b))
            times.append(time.perf_counter() - started)
        rates[dtype.name] = 2 * n**3 / float(np.median(times))
    return {"flops_per_second": rates}


def run_worker(spec: dict[str, object]) -> dict[str, object]:
    """Runs one configuration (spec["kind"]: simclr_tf, torch or matmul)."""
    if spec["kind"] == "simclr_tf":
        result = _time_simclr_tf(spec)
    elif spec["kind"] == "torch":
        import torch_step

        result = torch_step.time_torch(
            spec["model"],
            spec["mode"],
            spec["batch"],
            spec["steps"],
            spec["warmup"],
        )
    else:
        result = _time_matmul(spec)
    return {**result, "peak_rss_mib": common.peak_rss_mib()}


def _run_subprocess(spec: dict[str, object], timeout: int) -> dict:
    """Runs one configuration in a fresh Python; returns its result dict."""
    return common.run_configuration(__file__, spec, _RESULT_PREFIX, timeout)


def _torch_modes() -> list[str]:
    """--torch_modes resolved: 'all' means every mode when torch exists."""
    modes = [mode for mode in _TORCH_MODES.value if mode]
    if modes == ["all"]:
        if not _TORCH_FOUND:
            return []
        import torch_step

        return list(torch_step.MODES)
    if modes and not _TORCH_FOUND:
        raise ValueError(
            f"--torch_modes={','.join(modes)} needs torch; run `pip install "
            "-r benchmarks/requirements.txt` or pass --torch_modes=."
        )
    if modes:
        import torch_step

        unknown = sorted(set(modes) - set(torch_step.MODES))
        if unknown:
            raise ValueError(
                f"--torch_modes={','.join(modes)}: {unknown} unknown; use "
                f"'all' or some of {list(torch_step.MODES)}."
            )
    return modes


def _configurations() -> list[dict[str, object]]:
    """Every configuration to time, as worker specs without steps."""
    for name in _MODELS.value:
        if name not in MODELS:
            raise ValueError(
                f"--models={','.join(_MODELS.value)}: {name!r} is not one of "
                f"{sorted(MODELS)}; use e.g. --models=demo."
            )
    table = {"true": True, "false": False}
    if any(value.lower() not in table for value in _JIT.value):
        raise ValueError(
            f"--jit={','.join(_JIT.value)} must list true/false; use "
            "e.g. --jit=false,true."
        )
    configurations = []
    for model in _MODELS.value:
        for jit in (table[value.lower()] for value in _JIT.value):
            for precision in _PRECISIONS.value:
                configurations.append(
                    {"kind": "simclr_tf", "model": model}
                    | {"precision": precision, "jit_compile": jit}
                )
        for mode in _torch_modes():
            configurations.append(
                {"kind": "torch", "model": model, "mode": mode}
            )
    return configurations


def _is_bfloat16(configuration: dict[str, object]) -> bool:
    name = configuration.get("mode", configuration.get("precision"))
    return "bf16" in name or "bfloat16" in name


def _row(
    configuration: dict[str, object],
    runs: list[dict],
    matmul: dict[str, float],
) -> dict[str, object]:
    """One configuration's row: medians over its runs, FLOPs and MFU."""
    import numpy as np

    row = {k: v for k, v in configuration.items() if k != "kind"}
    row = {"framework": configuration["kind"], **row}
    errors = [run["error"] for run in runs if "error" in run]
    if errors:
        return {**row, "error": errors[0], "runs": runs}
    for key in (
        "images_per_second",
        "step_seconds_p50",
        "step_seconds_p90",
        "compile_seconds",
        "peak_rss_mib",
    ):
        row[key] = float(np.median([run[key] for run in runs]))
    row["parameters"] = runs[0]["parameters"]
    row["flops_per_image"] = step_flops_per_image(configuration["model"])
    row["achieved_flops_per_second"] = (
        row["flops_per_image"] * row["images_per_second"]
    )
    dtype = "bfloat16" if _is_bfloat16(configuration) else "float32"
    row["matmul_dtype"] = dtype
    peak = matmul.get(dtype)
    row["fraction_of_matmul_peak"] = (
        row["achieved_flops_per_second"] / peak if peak else None
    )
    return {**row, "runs": runs}


def ratios_vs_torch(rows: list[dict]) -> dict[str, dict[str, object]]:
    """Per model: best simclr_tf img/s without XLA (the CPU default,
    --jit_compile=false; any precision) / best torch img/s, any mode."""

    def best(model: str, keep: object) -> dict | None:
        timed = [
            row
            for row in rows
            if row["model"] == model and "error" not in row and keep(row)
        ]
        return max(timed, key=lambda r: r["images_per_second"], default=None)

    result = {}
    for model in dict.fromkeys(row["model"] for row in rows):
        ours = best(
            model,
            lambda r: r["framework"] == "simclr_tf" and not r["jit_compile"],
        )
        torch = best(model, lambda r: r["framework"] == "torch")
        if ours is None or torch is None:
            continue
        ratio = ours["images_per_second"] / torch["images_per_second"]
        result[model] = {
            "ratio": ratio,
            "simclr_tf_precision": ours["precision"],
            "simclr_tf_images_per_second": ours["images_per_second"],
            "torch_mode": torch["mode"],
            "torch_images_per_second": torch["images_per_second"],
            "meets_target": ratio >= TARGET_MIN_RATIO_VS_TORCH,
        }
    return result


def _parameter_counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Trainable parameters per model and framework (torch must match)."""
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        if "parameters" in row:
            by_framework = counts.setdefault(row["model"], {})
            by_framework[row["framework"]] = row["parameters"]
    return counts


def _parameters_equal(counts: dict[str, dict[str, int]]) -> bool:
    return all(len(set(c.values())) == 1 for c in counts.values())


def _flag_values() -> dict[str, object]:
    """This benchmark's flags as given (for the report's metadata)."""
    holders = (_MODELS, _PRECISIONS, _JIT, _TORCH_MODES, _BATCH, _STEPS)
    holders += (_WARMUP, _REPEATS, _MATMUL_SIZE, _MATMUL_REPEATS, _TIMEOUT)
    return {holder.name: holder.value for holder in (*holders, _OUTPUT)}


def _legacy_view(rows: list[dict]) -> dict[str, object]:
    """For one model: the keys input_pipeline.py's --compare_step_json
    reads (model, model_flags, results[precision], fastest; no XLA)."""
    results = {
        row["precision"]: {"images_per_second_median": row["images_per_second"]}
        for row in rows
        if row["framework"] == "simclr_tf"
        and not row["jit_compile"]
        and "error" not in row
    }
    if len(_MODELS.value) != 1 or not results:
        return {}
    fastest = max(results, key=lambda p: results[p]["images_per_second_median"])
    model = _MODELS.value[0]
    return {
        "model": model,
        "model_flags": MODELS[model],
        "results": results,
        "fastest": fastest,
    }


def _measure() -> tuple[list[dict], dict[str, float]]:
    """Times the matmul, then every configuration --repeats times,
    interleaved (A B A B) so drift of this shared machine hits all alike."""
    configurations = _configurations()
    matmul_spec = {"kind": "matmul", "size": _MATMUL_SIZE.value}
    matmul_spec["repeats"] = _MATMUL_REPEATS.value
    matmul = _run_subprocess(matmul_spec, _TIMEOUT.value)
    rates = matmul.get("flops_per_second", {})
    runs: list[list[dict]] = [[] for _ in configurations]
    steps = {"batch": _BATCH.value, "steps": _STEPS.value}
    steps["warmup"] = _WARMUP.value
    for _ in range(_REPEATS.value):
        for index, configuration in enumerate(configurations):
            spec = {**configuration, **steps}
            runs[index].append(_run_subprocess(spec, _TIMEOUT.value))
    rows = [
        _row(configuration, timed, rates)
        for configuration, timed in zip(configurations, runs, strict=True)
    ]
    return rows, {**matmul, "size": _MATMUL_SIZE.value}


def main(argv: list[str]) -> None:
    del argv
    if _WORKER.value:
        result = run_worker(json.loads(_WORKER.value))
        print(_RESULT_PREFIX + json.dumps(result), flush=True)
        return
    rows, matmul = _measure()
    parameters = _parameter_counts(rows)
    report = {
        "benchmark": "throughput",
        **common.metadata(_flag_values()),
        "torch_installed": _TORCH_FOUND,
        "matmul": matmul,
        "flops_convention": FLOPS_CONVENTION,
        "rows": rows,
        "parameters": parameters,
        "parameters_equal": _parameters_equal(parameters),
        "ratio_vs_best_torch": ratios_vs_torch(rows),
        "target_min_ratio_vs_torch": TARGET_MIN_RATIO_VS_TORCH,
        **_legacy_view(rows),
    }
    common.write_report(report, _OUTPUT.value, "throughput.json")
    failed = any("error" in row for row in rows) or "error" in matmul
    if failed or not report["parameters_equal"]:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
