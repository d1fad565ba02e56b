"""FLOP rates of convolution gradients per ResNet conv shape: TensorFlow's
backprop kernels against every formulation of
simclr_tf/models/conv_gradients.py, relative to the forward conv of the same
shape and to a large matmul.

  python benchmarks/conv_gradients.py --models=demo --precisions=float32
  ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/conv_gradients.py ...

The shapes are those of the models' Conv2D layers (read from the built
ResNet; identical shapes timed once and counted), at --batch images per
conv (2 views x 256 images = 512 in a train step). Every method of one
shape is timed in turn, --repeats rounds (A B C A B C, so that the drift of
a shared machine hits all alike), and the best round of each is kept, by
wall time or (--clock=cpu) by this process's CPU time over its cores,
which the load of other processes on a shared machine barely changes.
Writes benchmarks/results/conv_gradients.json (or --output): metadata incl.
the CPU's ISA flags and oneDNN cap, one row per shape and precision, and
per model the totals: each gradient's summed time over all layers, as a
rate against the forward's, for TensorFlow's kernels, the methods
simclr_tf.models.conv picks and the fastest method of each shape. Timings
are never asserted in tests.

With ONEDNN_MAX_CPU_ISA below AVX512_CORE on a CPU with AVX-512,
TensorFlow still hands bfloat16 ops to oneDNN, which aborts: bfloat16 is
skipped then (and says so).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

_BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _BENCHMARKS_DIR)
sys.path.insert(0, os.path.dirname(_BENCHMARKS_DIR))

import common  # noqa: E402

# The target: each gradient at >= 80% of the forward conv's rate.
TARGET_FRACTION_OF_FORWARD = 0.8
_RESULT_PREFIX = "CONV_GRADIENTS_RESULT "
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}

_MODELS = flags.DEFINE_list("models", list(common.MODELS), "Models.")
_PRECISIONS = flags.DEFINE_list(
    "precisions",
    ["float32", "bfloat16"],
    "Conv dtypes: float32, bfloat16, float16.",
)
_BATCH = flags.DEFINE_integer(
    "batch", 512, "Images per conv (a train step: 2 views x its batch)."
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds per method.")
_CLOCK = flags.DEFINE_enum(
    "clock",
    "wall",
    ["wall", "cpu"],
    "What the rates are computed from: wall time, or this process's CPU "
    "time (all threads) divided by the cores TensorFlow uses, which other "
    "processes' load disturbs far less on a shared machine (both are "
    "recorded).",
)
_METHODS = flags.DEFINE_list(
    "methods",
    ["all"],
    "Formulations to time besides TensorFlow's kernels, as input_<method> "
    "or filter_<method> (conv_gradients.INPUT_METHODS / FILTER_METHODS); "
    "'all' = every one.",
)
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 4096, "Matmul side n.")
_TIMEOUT = flags.DEFINE_integer(
    "timeout", 3600, "Seconds before one configuration's subprocess is killed."
)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON.")
_WORKER = flags.DEFINE_string(
    "worker_config", None, "Internal: time one configuration (JSON) and exit."
)


def conv_shapes(model: str) -> list[dict[str, object]]:
    """The distinct Conv2D shapes of a common.MODELS model.

    Returns:
      [{"input": [H, W, ci], "kernel": k, "stride": s, "padding": "SAME" or
      "VALID", "filters": co, "layers": [names]}], in model order; the
      stem's input gradient is never computed in training (the images need
      none), so its row carries "stem": True.
    """
    import keras

    from simclr_tf.models import resnet

    spec = common.MODELS[model]
    size, channels = spec["image_size"], spec["channels"]
    encoder = resnet.ResNet(
        spec["resnet_depth"],
        spec["width_multiplier"],
        cifar_stem=size <= 32,
        input_shape=(size, size, channels),
    )
    shapes: dict[tuple, dict[str, object]] = {}
    for layer in encoder.layers:
        if not isinstance(layer, keras.layers.Conv2D):
            continue
        key = (
            tuple(layer.input.shape[1:]),
            layer.kernel_size[0],
            layer.strides[0],
            layer.padding.upper(),
            layer.filters,
        )
        row = shapes.setdefault(
            key,
            {
                "input": list(key[0]),
                "kernel": key[1],
                "stride": key[2],
                "padding": key[3],
                "filters": key[4],
                "layers": [],
                "stem": layer.input.shape[-1] == channels,
            },
        )
        row["layers"].append(layer.name)
    keras.utils.clear_session()
    return list(shapes.values())


def method_names() -> list[str]:
    """Every method name: input_<method>, then filter_<method>."""
    from simclr_tf.models import conv_gradients

    return [f"input_{m}" for m in conv_gradients.INPUT_METHODS] + [
        f"filter_{m}" for m in conv_gradients.FILTER_METHODS
    ]


def _candidates(
    shape: dict, dtype: object, batch: int, methods: list[str]
) -> tuple[dict, int]:
    """Callables per method name (tf.functions of fixed random tensors; the
    forward, TensorFlow's gradients and `methods`) and the shape's forward
    FLOPs."""
    import tensorflow as tf

    from simclr_tf.models import conv_gradients

    height, width, in_channels = shape["input"]
    k, s, padding = shape["kernel"], shape["stride"], shape["padding"]
    rows = conv_gradients.axis(height, k, s, padding)
    cols = conv_gradients.axis(width, k, s, padding)
    kernel_shape = (k, k, in_channels, shape["filters"])
    random = tf.random.stateless_normal
    x = tf.cast(random((batch, height, width, in_channels), (1, 2)), dtype)
    w = tf.cast(random(kernel_shape, (3, 4)), dtype)
    dy_shape = (batch, rows.output, cols.output, shape["filters"])
    dy = tf.cast(random(dy_shape, (5, 6)), dtype)
    timed = {"forward": tf.function(lambda: tf.nn.conv2d(x, w, s, padding))}
    wanted = {"input_tensorflow", "filter_tensorflow", *methods}
    for name in (name for name in method_names() if name in wanted):
        kind, method = name.split("_", 1)
        if name == "input_dilated" and s == 1:
            continue  # The same computation as input_conv.
        if kind == "input":
            timed[name] = tf.function(
                lambda m=method: conv_gradients.input_gradient(
                    dy, w, rows, cols, m
                )
            )
        else:
            timed[name] = tf.function(
                lambda m=method: conv_gradients.filter_gradient(
                    x, dy, kernel_shape, rows, cols, m
                )
            )
    flops = 2 * batch * rows.output * cols.output * k * k * in_channels
    return timed, flops * shape["filters"]


def _max_relative_errors(methods: dict) -> dict[str, float]:
    """Each method's max |difference| to TensorFlow's gradient, over the
    latter's max |value| (a check that the timed code is right)."""
    import tensorflow as tf

    references = {
        kind: tf.cast(methods[kind + "_tensorflow"](), tf.float32)
        for kind in ("input", "filter")
    }
    errors = {}
    for name, method in methods.items():
        if name == "forward":
            continue
        reference = references[name.split("_")[0]]
        difference = tf.abs(tf.cast(method(), tf.float32) - reference)
        scale = tf.reduce_max(tf.abs(reference))
        errors[name] = float(tf.reduce_max(difference) / scale)
    return errors


def best_seconds(
    methods: dict[str, object], repeats: int
) -> dict[str, dict[str, float]]:
    """Each method's best time of `repeats` interleaved rounds.

    Returns:
      {"wall": {name: s}, "cpu": {name: this process's CPU time / cores}}.
    """
    import numpy as np

    for method in methods.values():
        method()  # Trace and warm up.
    cores = len(os.sched_getaffinity(0))
    times = {"wall": {name: [] for name in methods}}
    times["cpu"] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, method in methods.items():
            wall, cpu = time.perf_counter(), time.process_time()
            np.asarray(method())  # Waits for the result.
            times["cpu"][name].append((time.process_time() - cpu) / cores)
            times["wall"][name].append(time.perf_counter() - wall)
    return {
        clock: {name: min(values) for name, values in by_name.items()}
        for clock, by_name in times.items()
    }


def time_shape(
    shape: dict,
    precision: str,
    batch: int,
    repeats: int,
    clock: str,
    methods: list[str],
) -> dict[str, object]:
    """Best-of-`repeats` seconds of the forward and every gradient method.

    Returns:
      The shape plus "flops" (forward), "seconds" {method: s by `clock`},
      "wall_seconds" and "cpu_seconds" {method: s}, "fraction_of_forward"
      {method: forward s / method s} and "max_relative_error" {method: vs
      TensorFlow's gradient}.
    """
    timed, flops = _candidates(shape, _DTYPES[precision], batch, methods)
    best = best_seconds(timed, repeats)
    seconds = best[clock]
    return {
        **shape,
        "flops": flops,
        "seconds": seconds,
        "wall_seconds": best["wall"],
        "cpu_seconds": best["cpu"],
        "fraction_of_forward": {
            name: seconds["forward"] / value for name, value in seconds.items()
        },
        "max_relative_error": _max_relative_errors(timed),
    }


def run_worker(spec: dict[str, object]) -> dict[str, object]:
    """Times every conv shape of one model in one precision, and an n x n
    matmul the same way (same clock, best of the same rounds)."""
    import tensorflow as tf

    rows = [
        time_shape(
            shape,
            spec["precision"],
            spec["batch"],
            spec["repeats"],
            spec["clock"],
            spec["methods"],
        )
        for shape in conv_shapes(spec["model"])
    ]
    size = spec["matmul_size"]
    dtype = tf.as_dtype(_DTYPES[spec["precision"]])
    a = tf.cast(tf.random.stateless_uniform((size, size), (7, 8)), dtype)
    matmul = tf.function(lambda: tf.matmul(a, a))
    seconds = best_seconds({"matmul": matmul}, spec["repeats"])
    rate = 2 * size**3 / seconds[spec["clock"]]["matmul"]
    return {"rows": rows, "matmul_flops_per_second": rate}


def totals(
    rows: list[dict], matmul: float, precision: str = "float32"
) -> dict[str, dict[str, float]]:
    """Whole-model figures: every conv layer once (a shape counts once per
    layer), each gradient's FLOPs over its summed time, as a fraction of
    the forward's rate and of the matmul's. The stem's input gradient is
    left out (never computed in training).

    Selections: "tensorflow" (TensorFlow's kernels), "chosen" (the methods
    simclr_tf.models.conv.methods_for picks in `precision`) and "best" (the
    fastest method of each shape here).
    """
    from simclr_tf.models import conv

    def summed(kind: str, pick: object) -> tuple[float, float]:
        flops = seconds = 0.0
        for row in rows:
            if kind == "input" and row["stem"]:
                continue
            count = len(row["layers"])
            flops += count * row["flops"]
            seconds += count * row["seconds"][pick(row)]
        return flops, seconds

    forward_flops, forward_seconds = summed("forward", lambda row: "forward")
    forward_rate = forward_flops / forward_seconds
    result = {
        "forward": {
            "fraction_of_forward": 1.0,
            "fraction_of_matmul": forward_rate / matmul,
        }
    }
    for index, kind in enumerate(("input", "filter")):

        def chosen(row: dict, index: int = index, kind: str = kind) -> str:
            methods = conv.methods_for(
                row["kernel"], row["stride"], _DTYPES[precision]
            )
            return f"{kind}_{methods[index]}"

        def best(row: dict, kind: str = kind) -> str:
            own = [n for n in row["seconds"] if n.startswith(kind + "_")]
            return min(own, key=row["seconds"].get)

        selections = {"tensorflow": lambda row, k=kind: f"{k}_tensorflow"}
        for selection, pick in {
            **selections,
            "chosen": chosen,
            "best": best,
        }.items():
            flops, seconds = summed(kind, pick)
            result[f"{kind}_{selection}"] = {
                "fraction_of_forward": flops / seconds / forward_rate,
                "fraction_of_matmul": flops / seconds / matmul,
            }
    return result


def _print_table(model: str, precision: str, result: dict) -> None:
    """One line per shape: each method's rate over the forward's."""
    from simclr_tf.models import conv

    rows = result["rows"]
    timed = {name for row in rows for name in row["seconds"]}
    names = [name for name in method_names() if name in timed]
    print(f"\n{model} {precision}: rate / forward rate (forward: / matmul)")
    print(
        f"{'shape':34s} {'GFLOP':>6s} {'fwd/mm':>6s} "
        + " ".join(
            f"{n.replace('input_', 'in:').replace('filter_', 'f:'):>9s}"
            for n in names
        )
    )
    matmul = result["matmul_flops_per_second"]
    for row in rows:
        height, width, channels = row["input"]
        label = (
            f"{height}x{width}x{channels}->{row['filters']} "
            f"k{row['kernel']}s{row['stride']} {row['padding']} "
            f"x{len(row['layers'])}"
        )
        forward = row["flops"] / row["seconds"]["forward"] / matmul
        cells = [
            f"{row['fraction_of_forward'][n]:9.2f}"
            if n in row["seconds"]
            else " " * 9
            for n in names
        ]
        chosen = "/".join(
            conv.methods_for(row["kernel"], row["stride"], _DTYPES[precision])
        )
        print(
            f"{label:34s} {row['flops'] / 1e9:6.2f} {forward:6.2f} "
            + " ".join(cells)
            + f"  {chosen}"
        )
    for name, figures in result["totals"].items():
        print(
            f"  total {name:20s} {figures['fraction_of_forward']:5.2f} of "
            f"forward, {figures['fraction_of_matmul']:5.2f} of matmul"
        )


def _flag_values() -> dict[str, object]:
    holders = (_MODELS, _PRECISIONS, _BATCH, _REPEATS, _CLOCK, _METHODS)
    holders += (_MATMUL_SIZE,)
    return {holder.name: holder.value for holder in (*holders, _OUTPUT)}


def _methods() -> list[str]:
    """--methods resolved to method names; UsageError for unknown ones."""
    names = method_names()
    for name, values, known in (
        ("models", _MODELS.value, list(common.MODELS)),
        ("precisions", _PRECISIONS.value, list(_DTYPES)),
        ("methods", _METHODS.value, ["all", *names]),
    ):
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise app.UsageError(
                f"--{name}={','.join(values)}: {unknown} unknown; use some "
                f"of {','.join(known)}."
            )
    return names if "all" in _METHODS.value else list(_METHODS.value)


def _bfloat16_aborts() -> bool:
    """Whether a oneDNN cap below AVX-512 makes bfloat16 ops abort."""
    cap = common.cpu_isa()["onednn_max_cpu_isa"]
    return cap is not None and not cap.upper().startswith("AVX512")


def _run(model: str, precision: str, methods: list[str]) -> dict:
    """One model and precision in a subprocess; its result with totals."""
    if precision == "bfloat16" and _bfloat16_aborts():
        return {
            "skipped": "bfloat16 under ONEDNN_MAX_CPU_ISA="
            f"{common.cpu_isa()['onednn_max_cpu_isa']} aborts in oneDNN; "
            "time it without the cap."
        }
    spec = {"model": model, "precision": precision, "methods": methods}
    spec |= {"batch": _BATCH.value, "repeats": _REPEATS.value}
    spec |= {"matmul_size": _MATMUL_SIZE.value, "clock": _CLOCK.value}
    result = common.run_configuration(
        __file__, spec, _RESULT_PREFIX, _TIMEOUT.value
    )
    if "error" not in result:
        matmul = result["matmul_flops_per_second"]
        result["totals"] = totals(result["rows"], matmul, precision)
    return result


def main(argv: list[str]) -> None:
    del argv
    if _WORKER.value:
        result = run_worker(json.loads(_WORKER.value))
        print(_RESULT_PREFIX + json.dumps(result), flush=True)
        return
    methods = _methods()
    results = []
    for model in _MODELS.value:
        for precision in _PRECISIONS.value:
            result = _run(model, precision, methods)
            if "totals" in result:
                _print_table(model, precision, result)
            else:
                print(f"\n{model} {precision}: {result}")
            results.append({"model": model, "precision": precision, **result})
    report = {
        "benchmark": "conv_gradients",
        **common.metadata(_flag_values()),
        "target_fraction_of_forward": TARGET_FRACTION_OF_FORWARD,
        "results": results,
    }
    path = common.write_report(report, _OUTPUT.value, "conv_gradients.json")
    print(f"\nwrote {path}")
    if any("error" in result for result in results):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
