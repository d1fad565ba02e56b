"""The benchmark CLIs run end to end on tiny settings and report consistently.

Each test runs a script as a subprocess (as users do) and checks its JSON:
rows present, timings positive and finite, and derived figures (ratios,
medians, img/s) recomputed here from the rows. Timings are never asserted.
"""

from __future__ import annotations

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
        "--batch=8",
        "--batches=2",
        "--warmup=1",
        "--repeats=3",
        "--num_images_32=16",
        "--num_images_224=16",
        f"--compare_step_json={step_json}",
    )
    _check_metadata(report)
    results = report["results"]
    assert sorted(results) == ["fashion_mnist", "rgb224", "rgb32"]
    assert results["fashion_mnist"]["num_examples"] == 60_000
    sides = {"fashion_mnist": (28, 1), "rgb32": (32, 3), "rgb224": (224, 3)}
    for name, (side, channels) in sides.items():
        result = results[name]
        assert result["view_shape"] == [8, side, side, channels]
        runs = result["images_per_second_runs"]
        assert len(runs) == 3
        assert all(_positive_finite(rate) for rate in runs)
        # rel 1e-12: the same median of the same floats.
        assert result["images_per_second_median"] == pytest.approx(
            float(np.median(runs)), rel=1e-12
        )
    assert results["rgb224"]["blur"] and not results["rgb32"]["blur"]
    comparison = report["compare_step"]
    for name, ratio in comparison["ratios"].items():
        expected = results[name]["images_per_second_median"] / step_rate
        assert ratio == pytest.approx(expected, rel=1e-12)  # same division
    assert comparison["matching_source"] == "fashion_mnist"
    matching_ratio = comparison["ratios"]["fashion_mnist"]
    assert comparison["meets_target"] == (matching_ratio >= 4.0)
