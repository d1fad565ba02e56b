"""The benchmark CLIs run end to end on tiny settings and report consistently.

Each test runs a script as a subprocess (as users do) and checks its JSON:
rows present, timings positive and finite, and derived figures (ratios,
medians, img/s) recomputed here from the rows. Timings are never asserted.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
# Subprocess limit: each run below takes 5-60 s on the 2-core VM.
TIMEOUT_SECONDS = 300


def _run_script(script: str, output: str, *args: str) -> dict:
    """Runs benchmarks/<script> with args and returns its JSON report."""
    command = [sys.executable, os.path.join(BENCHMARKS, script)]
    command += [*args, f"--output={output}"]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(output) as file:
        return json.load(file)


def _positive_finite(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def _check_metadata(report: dict) -> None:
    for key in ("git_sha", "versions", "device", "date", "flags"):
        assert key in report, key


def test_scaling_overhead_is_ratio_of_row_step_times(tmp_path):
    report = _run_script(
        "scaling.py",
        str(tmp_path / "scaling.json"),
        "--batch=8",
        "--steps=2",
        "--warmup=0",
        "--replicas=1,2",
        "--global_bn=true",
        "--jit_compile=false",
        "--noinclude_default",
    )
    _check_metadata(report)
    rows = {row["replicas"]: row for row in report["rows"]}
    assert sorted(rows) == [1, 2]
    for replicas, row in rows.items():
        assert row["strategy"] == "mirrored" and row["global_bn"] is True
        assert row["runs"][0]["replicas_in_sync"] == replicas
        for key in ("step_seconds_p50", "step_seconds_p90", "compile_seconds"):
            assert _positive_finite(row[key]), (key, row[key])
        assert row["step_seconds_p90"] >= row["step_seconds_p50"]
        # One repeat: img/s is exactly batch / p50 (1e-9: float division).
        assert row["images_per_second"] == pytest.approx(
            8 / row["step_seconds_p50"], rel=1e-9
        )
    overheads = {e["replicas"]: e for e in report["overhead_vs_1_replica"]}
    expected = rows[2]["step_seconds_p50"] / rows[1]["step_seconds_p50"]
    # rel 1e-9: the same float division done here and in the script.
    assert overheads[2]["overhead"] == pytest.approx(expected, rel=1e-9)
    assert overheads[1]["overhead"] == 1.0
    assert overheads[2]["meets_target"] == (expected <= 1.10)
    assert overheads[2]["overhead_vs_default_strategy"] is None


def test_scaling_records_jit_with_several_replicas_as_skipped(tmp_path):
    report = _run_script(
        "scaling.py",
        str(tmp_path / "scaling.json"),
        "--batch=8",
        "--replicas=2",
        "--global_bn=false",
        "--jit_compile=true",
        "--noinclude_default",
    )
    (row,) = report["rows"]
    assert row["replicas"] == 2 and row["jit_compile"] is True
    assert "setup_run refuses" in row["skipped"]
    assert "step_seconds_p50" not in row
    (entry,) = report["overhead_vs_1_replica"]
    assert entry["overhead"] is None


# input_pipeline.py: every source's name, as the brief and docs name them.
INPUT_SOURCES = (
    "fashion_mnist", "rgb32", "rgb224", "folder32", "folder224",
    "tfrecord32", "tfrecord224", "tfds_mock32", "tfds_mock224",
)  # fmt: skip
MEDIAN, RUNS = "images_per_second_median", "images_per_second_runs"
DISTORT = "device_distort_images_per_second"
TINY_PIPELINE = ("--batch=8", "--batches=2", "--warmup=1", "--distort_calls=1")


def _check_rates(row: dict, key: str, runs_key: str, repeats: int) -> None:
    """row[runs_key] has `repeats` positive rates, row[key] their median."""
    runs = row[runs_key]
    assert len(runs) == repeats and all(_positive_finite(r) for r in runs)
    # rel 1e-12: the same median of the same floats.
    assert row[key] == pytest.approx(float(np.median(runs)), rel=1e-12)


def _load_benchmarks_common():
    """benchmarks/common.py as a module, without touching sys.path."""
    spec = importlib.util.spec_from_file_location(
        "benchmarks_common", os.path.join(BENCHMARKS, "common.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_input_pipeline_rows_and_step_ratios(tmp_path):
    step_json = tmp_path / "throughput_demo.json"
    step_rate = 100.0
    step_json.write_text(
        json.dumps(
            {
                "benchmark": "throughput",
                "model": "demo",
                "model_flags": {"image_size": 28, "channels": 1},
                "results": {"float32": {"images_per_second_median": step_rate}},
                "fastest": "float32",
            }
        )
    )
    report = _run_script(
        "input_pipeline.py",
        str(tmp_path / "input_pipeline.json"),
        *TINY_PIPELINE,
        "--repeats=3",
        "--sources=fashion_mnist,rgb32,rgb224",
        "--augment=host",
        "--num_images_32=16",
        "--num_images_224=16",
        f"--compare_step_json={step_json}",
    )
    _check_metadata(report)
    results = report["results"]
    names = ["fashion_mnist/host", "rgb224/host", "rgb32/host"]
    assert sorted(results) == names
    assert results["fashion_mnist/host"]["num_examples"] == 60_000
    sides = {"fashion_mnist": (28, 1), "rgb32": (32, 3), "rgb224": (224, 3)}
    for name, (side, channels) in sides.items():
        result = results[name + "/host"]
        assert result["source"] == name and result["augment"] == "host"
        assert result["view_shape"] == [8, side, side, channels]
        _check_rates(result, MEDIAN, RUNS, 3)
        assert DISTORT not in result
    assert results["rgb224/host"]["blur"] and not results["rgb32/host"]["blur"]
    comparison = report["compare_step"]
    for name, ratio in comparison["ratios"].items():
        expected = results[name]["images_per_second_median"] / step_rate
        assert ratio == pytest.approx(expected, rel=1e-12)  # same division
    assert comparison["matching_rows"] == ["fashion_mnist/host"]
    assert comparison["matching_source"] == "fashion_mnist/host"
    matching_ratio = comparison["ratios"]["fashion_mnist/host"]
    assert comparison["meets_target"] == (matching_ratio >= 4.0)


@pytest.mark.slow  # ~45 s: writes a folder and shards, six timed rows
def test_input_pipeline_file_sources_report_host_and_device_rows(tmp_path):
    work_dir = tmp_path / "work"
    report = _run_script(
        "input_pipeline.py",
        str(tmp_path / "input_pipeline.json"),
        *TINY_PIPELINE,
        "--repeats=1",
        "--sources=folder32,tfrecord32,tfds_mock32",
        "--folder_images_32=40",
        "--tfds_mock_images=16",
        "--tfrecord_shards=2",
        f"--work_dir={work_dir}",
    )
    results = report["results"]
    sources = ("folder32", "tfrecord32", "tfds_mock32")
    expected = {f"{s}/{mode}" for s in sources for mode in ("host", "device")}
    assert set(results) == expected
    for name, row in results.items():
        source, mode = name.split("/")
        assert (row["source"], row["augment"]) == (source, mode)
        assert row["view_shape"] == [8, 32, 32, 3]
        _check_rates(row, MEDIAN, RUNS, 1)
        if mode == "device":
            _check_rates(row, DISTORT, DISTORT + "_runs", 1)
            assert "accelerator" in row["note"]
        else:
            assert DISTORT not in row
    folder = results["folder32/host"]
    assert folder["num_examples"] == 40 and _positive_finite(
        folder["verify_seconds"]
    )
    # The reported mean JPEG size is that of the files on disk (exact).
    files = list((work_dir / "folder32_40").glob("class_*/*.jpg"))
    assert len(files) == 40
    assert folder["mean_jpeg_bytes"] == np.mean(
        [f.stat().st_size for f in files]
    )
    tfrecord = results["tfrecord32/host"]
    assert tfrecord["num_examples"] == 40 and tfrecord["folder"].endswith(
        "folder32_40"
    )
    info = json.loads(
        (work_dir / "folder32_40_tfrecord2/dataset_info.json").read_text()
    )
    assert info["splits"]["train"]["num_shards"] == 2
    mock = results["tfds_mock32/host"]
    assert mock["num_examples"] == 16 and mock["dataset"] == "cifar10"
    assert "decode-free" in mock["note"]


@pytest.mark.parametrize(
    "flag, valid",
    [
        ("--sources=folder32,nope", INPUT_SOURCES),
        ("--augment=tpu", ("host", "device")),
    ],
)
def test_input_pipeline_unknown_choice_lists_the_valid_ones(flag, valid):
    # -X importtime: every module the refusal imported, one line each on
    # stderr. Flags are checked before TensorFlow is imported (~3 s here).
    script = os.path.join(BENCHMARKS, "input_pipeline.py")
    command = [sys.executable, "-X", "importtime", script]
    done = subprocess.run(
        [*command, flag], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    imported = [line.split("|")[-1].strip() for line in lines]
    assert "absl.flags" in imported and "tensorflow" not in imported
    message = lines[-1]
    assert flag.split("=")[1].split(",")[-1] in message
    assert f"use some of {','.join(valid)}" in message


@pytest.mark.parametrize("given", [None, "0"])
def test_benchmarks_time_simclr_tfs_cpu_kernels(given):
    """common.py sets TF_ENABLE_ONEDNN_OPTS as importing simclr_tf does
    (hardware.onednn_switch: "1" on AVX2 CPUs where TensorFlow would run
    Eigen), without loading TensorFlow, so that every worker it starts and
    the JSON's cpu_isa agree; a value the user set stands."""
    from simclr_tf import hardware

    environ = {
        k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"
    }
    expected = given or hardware.onednn_switch(environ=environ) or "None"
    if given is not None:
        environ["TF_ENABLE_ONEDNN_OPTS"] = given
    script = (
        "import os, sys\n"
        "import common\n"
        "print(common.cpu_isa()['tf_enable_onednn_opts'],"
        " 'tensorflow' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**environ, "PYTHONPATH": BENCHMARKS},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [expected, "False"]


def test_write_image_folder_is_photo_like_and_reused(tmp_path):
    import tensorflow as tf

    common = _load_benchmarks_common()
    path = str(tmp_path / "folder")
    first = common.write_image_folder(path, 10, 224)
    again = common.write_image_folder(path, 10, 224)
    assert not first["reused"] and again["reused"]
    assert again["mean_jpeg_bytes"] == first["mean_jpeg_bytes"]
    classes = sorted(os.listdir(path))
    assert classes == [".benchmark.json"] + [f"class_{k}" for k in range(10)]
    image = tf.io.decode_jpeg(tf.io.read_file(f"{path}/class_3/000003.jpg"))
    assert image.shape == (224, 224, 3)
    # Photo-like: JPEGs far larger than a flat grey image's, and under half
    # of uniform noise's at the same quality (noise barely compresses; the
    # smooth fields + mild noise come out near 0.4x of it at 224 px).
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    flat = np.full((224, 224, 3), 128, np.uint8)
    sizes = [
        len(tf.io.encode_jpeg(x, quality=90).numpy()) for x in (flat, noise)
    ]
    assert 4 * sizes[0] < first["mean_jpeg_bytes"] < sizes[1] / 2


def _summed_rate(rows: list[dict], method: str, skip_stem: bool) -> float:
    """FLOPs / seconds over every layer of `rows` for one method."""
    kept = [row for row in rows if not (skip_stem and row["stem"])]
    flops = sum(len(row["layers"]) * row["flops"] for row in kept)
    seconds = sum(len(row["layers"]) * row["seconds"][method] for row in kept)
    return flops / seconds


def test_conv_gradients_rows_flops_and_totals(tmp_path):
    report = _run_script(
        "conv_gradients.py",
        str(tmp_path / "conv_gradients.json"),
        "--models=demo",
        "--precisions=float32",
        "--batch=2",
        "--repeats=1",
        "--matmul_size=64",
        "--clock=cpu",
    )
    _check_metadata(report)
    assert set(report["cpu_isa"]) == {
        "flags",
        "onednn_max_cpu_isa",
        "tf_enable_onednn_opts",
    }
    (result,) = report["results"]
    rows = result["rows"]
    # Every conv layer of ResNet-18 x0.25 (CIFAR stem) once: 1 stem, 16 in
    # blocks, 4 projection shortcuts.
    assert sum(len(row["layers"]) for row in rows) == 21
    common = _load_benchmarks_common()
    conv_only = common.forward_flops_per_image(
        28, 1, 18, 0.25, 1, proj_out_dim=0, num_classes=0
    )
    flops = sum(len(row["layers"]) * row["flops"] for row in rows)
    assert flops == 2 * conv_only
    for row in rows:
        seconds = row["seconds"]
        assert seconds == row["cpu_seconds"]
        assert all(_positive_finite(value) for value in seconds.values())
        for method, value in seconds.items():
            # rel 1e-12: the same float division as the script.
            assert row["fraction_of_forward"][method] == pytest.approx(
                seconds["forward"] / value, rel=1e-12
            )
        # The timed code computes the gradient (float32 summation order).
        assert max(row["max_relative_error"].values()) < 1e-5
    forward = _summed_rate(rows, "forward", skip_stem=False)
    totals = result["totals"]
    for kind, skip_stem in (("input", True), ("filter", False)):
        rate = _summed_rate(rows, f"{kind}_tensorflow", skip_stem)
        assert totals[f"{kind}_tensorflow"]["fraction_of_forward"] == (
            pytest.approx(rate / forward, rel=1e-9)
        )
        matmul = result["matmul_flops_per_second"]
        assert totals[f"{kind}_tensorflow"]["fraction_of_matmul"] == (
            pytest.approx(rate / matmul, rel=1e-9)
        )
        # The best method per shape is at least as fast as any one method.
        best = totals[f"{kind}_best"]["fraction_of_forward"]
        assert best >= totals[f"{kind}_chosen"]["fraction_of_forward"]
        assert best >= totals[f"{kind}_tensorflow"]["fraction_of_forward"]
