"""What every benchmark records next to its figures: git SHA, package
versions, device and date, plus peak RSS and JSON output in one place.

Benchmarks import this as `import common` (they run as scripts from any
directory; each puts `benchmarks/` and the repository root on sys.path).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))

# The models every benchmark times: simclr_tf flags as in the recipes
# that use them, plus the input channels.
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


def git_sha() -> str:
    """The checked-out commit, or "unknown" outside a git clone."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=BENCHMARKS_DIR,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or platform's best guess."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def metadata(flag_values: dict[str, object]) -> dict[str, object]:
    """The provenance block of a benchmark JSON.

    Args:
      flag_values: the benchmark's own flags, recorded as given.

    Returns:
      git_sha, versions (python, tensorflow, keras, numpy), device, date
      (UTC, ISO 8601) and flags.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    return {
        "git_sha": git_sha(),
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
        },
        "device": f"{cpu_model()}, {os.cpu_count()} CPUs",
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "flags": flag_values,
    }


def write_report(
    report: dict[str, object], output: str | None, default_name: str
) -> str:
    """Prints `report` as JSON and writes it to `output`.

    Args:
      report: the JSON-serialisable result.
      output: destination path; None writes benchmarks/results/<default_name>.
      default_name: file name used when `output` is None.

    Returns:
      The path written.
    """
    text = json.dumps(report, indent=2)
    print(text)
    path = output or os.path.join(BENCHMARKS_DIR, "results", default_name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as file:
        file.write(text + "\n")
    return path


def run_configuration(
    script: str, spec: dict[str, object], prefix: str, timeout: int
) -> dict:
    """Runs `script --worker_config=<spec>` in a fresh Python.

    Each benchmark configuration gets its own process, so that logical
    devices, XLA caches and peak RSS are its own.

    Args:
      script: path of the benchmark script, which prints `prefix` + JSON.
      spec: the configuration, passed as JSON.
      prefix: marks the result line among whatever else reaches stdout.
      timeout: seconds before the process is killed.

    Returns:
      The script's result dict, or {"error": why} when it timed out or
      printed no result.
    """
    command = [sys.executable, os.path.abspath(script)]
    command.append(f"--worker_config={json.dumps(spec)}")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after --timeout={timeout} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(prefix):
            return json.loads(line[len(prefix) :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
    return {"error": f"exit code {done.returncode}: " + " | ".join(tail)}
