"""Throughput of simclr_tf's pretraining input pipeline alone: augmented
two-view examples/s of pipeline.pretrain_input_fn (real augmentations,
batched) on Fashion-MNIST (28x28x1) and in-memory random RGB images at
32x32 (CIFAR settings) and 224x224 (ImageNet settings).

  python benchmarks/input_pipeline.py --batch=256 --batches=20 --repeats=3 \
      --compare_step_json=benchmarks/results/throughput_demo.json

Writes benchmarks/results/input_pipeline.json (or --output). With
--compare_step_json, also pipeline img/s / train-step img/s (target >= 4x).
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

# Augmentation per source, as the paper's recipes (REFERENCE.md):
# Fashion-MNIST as flags/demo.cfg, CIFAR s=0.5 without blur (App. B.9),
# ImageNet s=1.0 with blur.
SOURCES = {
    "fashion_mnist": {
        "image_size": 28,
        "channels": 1,
        "strength": 0.5,
        "blur": False,
    },
    "rgb32": {"image_size": 32, "channels": 3, "strength": 0.5, "blur": False},
    "rgb224": {
        "image_size": 224,
        "channels": 3,
        "strength": 1.0,
        "blur": True,
    },
}
# The target: the pipeline makes >= 4x the images the step uses.
TARGET_MIN_RATIO = 4.0

_SOURCES = flags.DEFINE_list("sources", list(SOURCES), "Sources to time.")
_BATCH = flags.DEFINE_integer("batch", 256, "Global batch (images).")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches per repeat.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed batches first.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timings per source.")
_NUM_RGB32 = flags.DEFINE_integer("num_images_32", 10_000, "rgb32 images.")
_NUM_RGB224 = flags.DEFINE_integer("num_images_224", 1024, "rgb224 images.")
_FASHION_SPLIT = flags.DEFINE_string(
    "fashion_mnist_split", "train", "Fashion-MNIST split (IDX files)."
)
_SEED = flags.DEFINE_integer(
    "seed", 0, "Pipeline seed as --seed in training; < 0 = unseeded."
)
_BATCHED = flags.DEFINE_bool(
    "batched_augment", True, "Augment whole batches (the default path)."
)
_STEP_JSON = flags.DEFINE_string(
    "compare_step_json", None, "A throughput.py JSON to compare with."
)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON.")


def _open(name: str) -> object:
    """The Source called `name` (see SOURCES)."""
    import numpy as np

    from simclr_tf.data import sources

    if name == "fashion_mnist":
        return sources.open_source("fashion_mnist", _FASHION_SPLIT.value)
    side = SOURCES[name]["image_size"]
    count = _NUM_RGB32.value if side == 32 else _NUM_RGB224.value
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, side, side, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, count, dtype=np.int64)
    return sources.from_arrays(name, "train", images, labels, 10, "random")


def time_source(name: str) -> dict[str, object]:
    """Times pretrain_input_fn on one source, --repeats times.

    Args:
      name: a key of SOURCES.

    Returns:
      images_per_second_median (two-view examples/s; views/s is twice
      that), the per-repeat figures, and the source's size and settings.
    """
    import numpy as np
    import tensorflow as tf

    from simclr_tf.data import pipeline

    settings = SOURCES[name]
    source = _open(name)
    input_fn = pipeline.pretrain_input_fn(
        source,
        global_batch_size=_BATCH.value,
        image_size=settings["image_size"],
        color_jitter_strength=settings["strength"],
        blur=settings["blur"],
        seed=_SEED.value if _SEED.value >= 0 else None,
        batched_augment=_BATCHED.value,
    )
    iterator = iter(input_fn(tf.distribute.InputContext()))
    for _ in range(_WARMUP.value):
        next(iterator)
    rates = []
    for _ in range(_REPEATS.value):
        started = time.perf_counter()
        for _ in range(_BATCHES.value):
            batch = next(iterator)
        seconds = time.perf_counter() - started
        rates.append(_BATCH.value * _BATCHES.value / seconds)
    shape = list(batch["view1"].shape)
    return {
        "num_examples": source.num_examples,
        "image_shape": list(source.image_shape),
        "view_shape": shape,
        "color_jitter_strength": settings["strength"],
        "blur": settings["blur"],
        "images_per_second_median": float(np.median(rates)),
        "images_per_second_runs": rates,
    }


def compare(results: dict[str, dict], step_json: str) -> dict[str, object]:
    """Pipeline img/s over the train step's img/s from a throughput JSON.

    Uses the fastest precision of that JSON; the source whose image size
    and channels match its model is named "matching_source".

    Raises:
      FileNotFoundError: step_json does not exist.
      ValueError: step_json is not a throughput.py report.
    """
    if not os.path.isfile(step_json):
        raise FileNotFoundError(
            f"--compare_step_json={step_json} does not exist; run "
            f"benchmarks/throughput.py first or fix the path."
        )
    with open(step_json) as file:
        step = json.load(file)
    if step.get("benchmark") != "throughput" or "fastest" not in step:
        raise ValueError(
            f"--compare_step_json={step_json} is not a throughput.py report "
            f"(needs benchmark=throughput and fastest); pass one."
        )
    step_rate = step["results"][step["fastest"]]["images_per_second_median"]
    model = step["model_flags"]
    matching = [
        name
        for name in results
        if SOURCES[name]["image_size"] == model["image_size"]
        and SOURCES[name]["channels"] == model["channels"]
    ]
    ratios = {
        name: result["images_per_second_median"] / step_rate
        for name, result in results.items()
    }
    match = matching[0] if matching else None
    meets = None if match is None else ratios[match] >= TARGET_MIN_RATIO
    return {
        "step_json": os.path.abspath(step_json),
        "step_model": step["model"],
        "step_precision": step["fastest"],
        "step_images_per_second": step_rate,
        "ratios": ratios,
        "matching_source": match,
        "target_min_ratio": TARGET_MIN_RATIO,
        "meets_target": meets,
    }


def _flag_values() -> dict[str, object]:
    """This benchmark's flags as given (for the report's metadata)."""
    holders = (_SOURCES, _BATCH, _BATCHES, _WARMUP, _REPEATS, _NUM_RGB32)
    holders += (_NUM_RGB224, _FASHION_SPLIT, _SEED, _BATCHED, _STEP_JSON)
    return {holder.name: holder.value for holder in holders + (_OUTPUT,)}


def main(argv: list[str]) -> None:
    del argv
    unknown = sorted(set(_SOURCES.value) - set(SOURCES))
    if unknown:
        raise ValueError(
            f"--sources={','.join(_SOURCES.value)} names {unknown}; use "
            f"some of {','.join(SOURCES)}."
        )
    # Sources are timed one after another; each alone keeps its memory
    # (1024 224px images are 150 MB) from overlapping the next.
    results = {name: time_source(name) for name in _SOURCES.value}
    report = {
        "benchmark": "input_pipeline",
        "batch": _BATCH.value,
        **common.metadata(_flag_values()),
        "results": results,
    }
    if _STEP_JSON.value:
        report["compare_step"] = compare(results, _STEP_JSON.value)
    common.write_report(report, _OUTPUT.value, "input_pipeline.json")
    if _STEP_JSON.value:
        comparison = report["compare_step"]
        for name, ratio in comparison["ratios"].items():
            print(
                f"{name}: pipeline / step ({comparison['step_model']}, "
                f"{comparison['step_precision']}) = {ratio:.1f}x "
                f"(target >= {TARGET_MIN_RATIO:g}x)"
            )


if __name__ == "__main__":
    app.run(main)
