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

from absl import app, flags

_BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _BENCHMARKS_DIR)
sys.path.insert(0, os.path.dirname(_BENCHMARKS_DIR))

import common  # noqa: E402

from simclr_tf import hardware  # noqa: E402

# The models measured (benchmarks/common.py).
MODELS = common.MODELS
NUM_CLASSES = common.NUM_CLASSES
# The target: the default CPU mode >= 1.2x the best PyTorch mode (1.5x the
# stretch aim).
TARGET_MIN_RATIO_VS_TORCH = 1.2
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
_CLOCK = flags.DEFINE_enum(
    "clock",
    "wall",
    list(common.CLOCKS),
    "What steps and the matmul are timed by: wall time, or this process's "
    "CPU time over its cores (common.clock; steadier on a shared machine; "
    "simclr_tf only, with --torch_modes=).",
)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON.")
_WORKER = flags.DEFINE_string(
    "worker_config", None, "Internal: time one configuration (JSON) and exit."
)


# Analytic FLOPs live in common.py (the profiler benchmark uses them too).
forward_flops_per_image = common.forward_flops_per_image
step_flops_per_image = common.step_flops_per_image


def _time_simclr_tf(spec: dict[str, object]) -> dict[str, object]:
    """Times simclr_tf's own train loop (one step per call) in this process."""
    import numpy as np

    step = common.build_simclr_step(spec)
    now, times = common.clock(spec.get("clock", "wall")), []
    for _ in range(1 + spec["warmup"] + spec["steps"]):
        started = now()
        step.run()
        times.append(now() - started)
    p50, p90 = np.percentile(times[1 + spec["warmup"] :], [50, 90])
    return {
        "images_per_second": spec["batch"] / float(p50),
        "step_seconds_p50": float(p50),
        "step_seconds_p90": float(p90),
        "compile_seconds": times[0],
        "parameters": step.parameters,
    }


def _time_matmul(spec: dict[str, object]) -> dict[str, dict[str, float]]:
    """FLOP/s of an n x n tf.matmul in float32 and bfloat16 (median)."""
    rates = common.matmul_flops_per_second(
        spec["size"],
        spec["repeats"],
        tuple(spec["dtypes"]),
        spec.get("clock", "wall"),
    )
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
    if _CLOCK.value == "cpu" and _torch_modes():
        raise ValueError(
            "--clock=cpu times simclr_tf and the matmul, not torch_step.py; "
            "pass --torch_modes= with it."
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
    holders += (_CLOCK,)
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


def _matmul_dtypes(configurations: list[dict[str, object]]) -> list[str]:
    """The matmul dtypes to time: those of the configurations, less
    bfloat16 on a bfloat16 CPU whose oneDNN is capped below it
    (ONEDNN_MAX_CPU_ISA=AVX2), where TensorFlow's bfloat16 matmul aborts
    the process; bfloat16 torch rows then get no fraction of the peak."""
    dtypes = {
        "bfloat16" if _is_bfloat16(c) else "float32" for c in configurations
    }
    if hardware.detect(gpus=()).cpu_bf16_held_back:
        dtypes.discard("bfloat16")
    return sorted(dtypes)


def _measure() -> tuple[list[dict], dict[str, float]]:
    """Times the matmul, then every configuration --repeats times,
    interleaved (A B A B) so drift of this shared machine hits all alike."""
    configurations = _configurations()
    matmul_spec = {"kind": "matmul", "size": _MATMUL_SIZE.value}
    matmul_spec["repeats"] = _MATMUL_REPEATS.value
    matmul_spec["clock"] = _CLOCK.value
    matmul_spec["dtypes"] = _matmul_dtypes(configurations)
    matmul = _run_subprocess(matmul_spec, _TIMEOUT.value)
    rates = matmul.get("flops_per_second", {})
    runs: list[list[dict]] = [[] for _ in configurations]
    steps = {"batch": _BATCH.value, "steps": _STEPS.value}
    steps |= {"warmup": _WARMUP.value, "clock": _CLOCK.value}
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
