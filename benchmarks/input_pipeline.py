"""Throughput of simclr_tf's pretraining input pipeline alone: two-view
examples/s of pipeline.pretrain_input_fn on Fashion-MNIST, in-memory random
RGB, a JPEG image folder, its TFRecord shards and tfds mock data, at 32 px
(CIFAR settings) and 224 px (ImageNet settings), each with the augmentation
on the host or left to the device (--augment).

  python benchmarks/input_pipeline.py --batch=256 --batches=20 --repeats=3 \
      --compare_step_json=benchmarks/results/throughput_demo.json

JSON (benchmarks/results/input_pipeline.json or --output): "results" maps
"<source>/<host|device>" to a row: source, augment, kind, the source's facts
(num_examples, image_shape, setup timings such as verify_seconds for a
folder), view_shape, images_per_second_median and _runs; device rows add
device_distort_images_per_second. "compare_step" (--compare_step_json) has
pipeline img/s / train-step img/s per row (target >= 4x); the matching row
is the first whose source has the step model's image size and channels.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator

from absl import app, flags

_BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _BENCHMARKS_DIR)
sys.path.insert(0, os.path.dirname(_BENCHMARKS_DIR))

import common  # noqa: E402


def _settings(kind: str, size: int, channels: int = 3, **extra) -> dict:
    """A source's settings; augmentation as the paper's recipes
    (REFERENCE.md): s=0.5 without blur at <= 32 px (CIFAR, App. B.9; the
    Fashion-MNIST demo as flags/demo.cfg), s=1.0 with blur at 224 px."""
    strength, blur = (0.5, False) if size <= 32 else (1.0, True)
    settings = {"kind": kind, "image_size": size, "channels": channels}
    return {**settings, "strength": strength, "blur": blur, **extra}


SOURCES = {
    "fashion_mnist": _settings("fashion_mnist", 28, 1),
    "rgb32": _settings("memory", 32),
    "rgb224": _settings("memory", 224),
    "folder32": _settings("folder", 32),
    "folder224": _settings("folder", 224),
    "tfrecord32": _settings("tfrecord", 32),
    "tfrecord224": _settings("tfrecord", 224),
    "tfds_mock32": _settings("tfds_mock", 32, dataset="cifar10"),
    "tfds_mock224": _settings("tfds_mock", 224, dataset="imagenet2012"),
}
AUGMENT_MODES = ("host", "device")
# The target: the pipeline makes >= 4x the images the step uses.
TARGET_MIN_RATIO = 4.0
NOTES = {
    "folder": "JPEGs (quality 90, smooth random colour fields + noise) of "
    "the view's side, decoded per image; files come from the OS page cache. "
    "Real ImageNet JPEGs are larger (~400x350 on average) and cost more.",
    "tfrecord": "The folder's JPEG bytes in TFRecord shards.",
    "tfds_mock": "tfds.testing.mock_data random examples made in Python: "
    "decode-free random images, no JPEG decoding; imagenet2012's mock "
    "images are small and of random sizes, so the crop runs per image.",
    "device": "The pipeline only crops and flips; the train step runs "
    "distort_views. device_distort_images_per_second times it on one batch "
    "(tf.function jit_compile=True) on this benchmark's device (a CPU "
    "shared with the pipeline here; an accelerator is far faster).",
}

_SOURCES = flags.DEFINE_list("sources", list(SOURCES), "Sources to time.")
_AUGMENT = flags.DEFINE_list(
    "augment",
    list(AUGMENT_MODES),
    "host: pipeline augments; device: "
    "pipeline crops + flips, distort_views timed apart.",
)
_COUNT_FLAGS = {  # integer flags: name -> (default, help)
    "batch": (256, "Global batch (images)."),
    "batches": (20, "Timed batches per repeat."),
    "warmup": (5, "Untimed batches first."),
    "repeats": (3, "Timings per row."),
    "distort_calls": (5, "Timed distort_views calls per repeat (device)."),
    "num_images_32": (10_000, "rgb32 images."),
    "num_images_224": (1024, "rgb224 images."),
    "folder_images_32": (5000, "folder32 / tfrecord32 JPEGs."),
    "folder_images_224": (512, "folder224 / tfrecord224 JPEGs."),
    "tfds_mock_images": (1024, "tfds mock examples (both sizes)."),
    "tfrecord_shards": (8, "TFRecord shards; 0: make_tfrecords' 128 MiB."),
    "seed": (0, "Pipeline seed as --seed in training; < 0 = unseeded."),
}
_COUNTS = {
    name: flags.DEFINE_integer(name, default, text)
    for name, (default, text) in _COUNT_FLAGS.items()
}
_WORK_DIR = flags.DEFINE_string(
    "work_dir",
    os.path.join(tempfile.gettempdir(), "simclr_tf_input_pipeline"),
    "Where image folders and shards are written once and reused.",
)
_FASHION_SPLIT = flags.DEFINE_string(
    "fashion_mnist_split", "train", "Fashion-MNIST split (IDX files)."
)
_BATCHED = flags.DEFINE_bool(
    "batched_augment", True, "Augment whole batches (the default path)."
)
_STEP_JSON = flags.DEFINE_string(
    "compare_step_json", None, "A throughput.py JSON to compare with."
)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the JSON.")
_FLAGS = (_SOURCES, _AUGMENT, *_COUNTS.values(), _WORK_DIR, _FASHION_SPLIT)
_FLAGS += (_BATCHED, _STEP_JSON, _OUTPUT)


def _count(name: str) -> int:
    """The value of integer flag --name."""
    return _COUNTS[name].value


def _sized(prefix: str, side: int) -> int:
    """--<prefix>_32 or --<prefix>_224, the count for `side`."""
    return _count(f"{prefix}_{32 if side <= 32 else 224}")


def _folder(side: int) -> tuple[str, dict]:
    """The image folder for `side`, written if absent, and its facts."""
    count = _sized("folder_images", side)
    path = os.path.join(_WORK_DIR.value, f"folder{side}_{count}")
    return path, {
        "data_dir": path,
        **common.write_image_folder(path, count, side),
    }


def _tfrecords(side: int) -> tuple[str, dict]:
    """The folder's TFRecord shards, converted once, and their facts."""
    from simclr_tf.tools import make_tfrecords

    folder_dir, _ = _folder(side)
    shards = _count("tfrecord_shards")
    path = f"{folder_dir}_tfrecord{shards}"
    facts = {"folder": folder_dir, "data_dir": path, "reused": True}
    if not os.path.isdir(path):
        shutil.rmtree(path + ".partial", ignore_errors=True)
        started = time.perf_counter()
        make_tfrecords.make_tfrecords(
            folder_dir, path + ".partial", "train", num_shards=shards
        )
        facts.update(convert_seconds=time.perf_counter() - started)
        os.rename(path + ".partial", path)
        facts["reused"] = False
    return path, facts


def _verify_seconds(data_dir: str) -> float:
    """Seconds of the decode-every-image pass of verify_images=True."""
    from simclr_tf.data.sources import decode, folder

    paths = folder.list_folder(data_dir, "train", verify=False).paths
    started = time.perf_counter()
    decode.check_decodable(list(paths))
    return time.perf_counter() - started


def _random_rgb(name: str, side: int) -> object:
    import numpy as np

    from simclr_tf.data.sources import base as source_lib

    count = _sized("num_images", side)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, side, side, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, count, dtype=np.int64)
    return source_lib.from_arrays(name, "train", images, labels, 10, "random")


@contextlib.contextmanager
def open_benchmark_source(name: str) -> Iterator[tuple[object, dict]]:
    """Yields (the Source called `name`, its setup facts), see SOURCES.

    A context manager: tfds mock data only exists inside mock_data.
    """
    from simclr_tf.data.sources import registry

    settings, side = SOURCES[name], SOURCES[name]["image_size"]
    kind, facts = settings["kind"], {}
    if kind == "tfds_mock":
        import tensorflow_datasets as tfds

        policy = tfds.testing.MockPolicy.USE_CODE
        count = _count("tfds_mock_images")
        with tfds.testing.mock_data(policy=policy, num_examples=count):
            source = registry.open_source(settings["dataset"], "train")
            yield source, {"dataset": settings["dataset"]}
        return
    if kind == "fashion_mnist":
        source = registry.open_source("fashion_mnist", _FASHION_SPLIT.value)
    elif kind == "memory":
        source = _random_rgb(name, side)
    elif kind == "folder":
        data_dir, facts = _folder(side)
        facts["verify_seconds"] = _verify_seconds(data_dir)
        source = registry.open_source(
            "folder", "train", data_dir=data_dir, verify_images=False
        )
    else:
        data_dir, facts = _tfrecords(side)
        source = registry.open_source("tfrecord", "train", data_dir=data_dir)
    yield source, facts


def _time_calls(call: object, count: int) -> list[float]:
    """Calls per second of `call()`, `count` calls per repeat."""
    rates = []
    for _ in range(_count("repeats")):
        started = time.perf_counter()
        for _ in range(count):
            call()
        rates.append(count / (time.perf_counter() - started))
    return rates


def time_device_distort(batch: dict, settings: dict) -> dict[str, object]:
    """Times distort_views on one cropped batch under XLA.

    Returns:
      device_distort_images_per_second (two-view examples/s, median over
      repeats), its runs and device_distort_compile_seconds.
    """
    import numpy as np
    import tensorflow as tf

    from simclr_tf.data.augment import views as augment_views

    distort = tf.function(
        functools.partial(
            augment_views.distort_views,
            color_jitter_strength=settings["strength"],
            blur=settings["blur"],
        ),
        jit_compile=True,
    )
    views, seed = (batch["view1"], batch["view2"]), batch["distort_seed"]
    started = time.perf_counter()
    distort(views, seed)[0].numpy()  # first call traces and compiles
    compile_seconds = time.perf_counter() - started
    calls = _time_calls(lambda: distort(views, seed), _count("distort_calls"))
    rates = [rate * int(views[0].shape[0]) for rate in calls]
    return {
        "device_distort_images_per_second": float(np.median(rates)),
        "device_distort_images_per_second_runs": rates,
        "device_distort_compile_seconds": compile_seconds,
    }


def time_pipeline(source: object, settings: dict, mode: str) -> dict:
    """Times pretrain_input_fn on `source` with augment `mode`.

    Returns:
      view_shape, images_per_second_median (two-view examples/s; views/s is
      twice that) and _runs; for "device", time_device_distort's figures.
    """
    import numpy as np
    import tensorflow as tf

    from simclr_tf.data import pipeline

    input_fn = pipeline.pretrain_input_fn(
        source,
        global_batch_size=_count("batch"),
        image_size=settings["image_size"],
        color_jitter_strength=settings["strength"],
        blur=settings["blur"],
        seed=_count("seed") if _count("seed") >= 0 else None,
        batched_augment=_BATCHED.value,
        augment_on_device=mode == "device",
    )
    next_batch = functools.partial(
        next, iter(input_fn(tf.distribute.InputContext()))
    )
    for _ in range(_count("warmup")):
        next_batch()
    calls = _time_calls(next_batch, _count("batches"))
    rates = [rate * _count("batch") for rate in calls]
    batch = next_batch()
    del next_batch  # ends the iterator's prefetching before distort_views
    row = {
        "view_shape": list(batch["view1"].shape),
        "images_per_second_median": float(np.median(rates)),
        "images_per_second_runs": rates,
    }
    if mode == "device":
        row.update(time_device_distort(batch, settings))
    return row


def time_source(name: str, modes: list[str]) -> dict[str, dict]:
    """Rows "<name>/<mode>" for each augment mode; see the module doc."""
    settings = SOURCES[name]
    with open_benchmark_source(name) as (source, facts):
        common_facts = {
            "source": name,
            "kind": settings["kind"],
            "num_examples": source.num_examples,
            "image_shape": list(source.image_shape),
            "color_jitter_strength": settings["strength"],
            "blur": settings["blur"],
            **facts,
        }
        rows = {}
        for mode in modes:
            row = {**common_facts, "augment": mode}
            row.update(time_pipeline(source, settings, mode))
            notes = [NOTES.get(settings["kind"]), NOTES.get(mode)]
            if any(notes):
                row["note"] = " ".join(note for note in notes if note)
            rows[f"{name}/{mode}"] = row
    return rows


def _size_and_channels(name: str) -> tuple[int, int]:
    return SOURCES[name]["image_size"], SOURCES[name]["channels"]


def compare(results: dict[str, dict], step_json: str) -> dict[str, object]:
    """Pipeline img/s over the train step's img/s from a throughput JSON.

    Uses the fastest precision of that JSON. Rows whose source has its
    model's image size and channels are "matching_rows"; the first of them
    (host before device) is "matching_source" and decides meets_target.

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
    wanted = (model["image_size"], model["channels"])
    matching = [
        row_name
        for row_name, row in results.items()
        if _size_and_channels(row["source"]) == wanted
    ]
    ratios = {
        row_name: row["images_per_second_median"] / step_rate
        for row_name, row in results.items()
    }
    match = matching[0] if matching else None
    meets = None if match is None else ratios[match] >= TARGET_MIN_RATIO
    return {
        "step_json": os.path.abspath(step_json),
        "step_model": step["model"],
        "step_precision": step["fastest"],
        "step_images_per_second": step_rate,
        "ratios": ratios,
        "matching_rows": matching,
        "matching_source": match,
        "target_min_ratio": TARGET_MIN_RATIO,
        "meets_target": meets,
    }


def _check_choices(flag: object, valid: tuple[str, ...]) -> None:
    unknown = sorted(set(flag.value) - set(valid))
    if unknown or not flag.value:
        raise ValueError(
            f"--{flag.name}={','.join(flag.value)} names {unknown or 'none'};"
            f" use some of {','.join(valid)}."
        )


def main(argv: list[str]) -> None:
    del argv
    _check_choices(_SOURCES, tuple(SOURCES))
    _check_choices(_AUGMENT, AUGMENT_MODES)
    modes = [mode for mode in AUGMENT_MODES if mode in _AUGMENT.value]
    os.makedirs(_WORK_DIR.value, exist_ok=True)
    # Sources are timed one after another; each alone keeps its memory
    # (1024 224px images are 150 MB) from overlapping the next.
    results = {}
    for name in _SOURCES.value:
        results.update(time_source(name, modes))
    report = {
        "benchmark": "input_pipeline",
        "batch": _count("batch"),
        **common.metadata({holder.name: holder.value for holder in _FLAGS}),
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
