"""What every benchmark records next to its figures: git SHA, package
versions, device and date, plus peak RSS and JSON output in one place;
and a photo-like JPEG folder for the input benchmarks to read.

Benchmarks import this as `import common` (they run as scripts from any
directory; each puts `benchmarks/` and the repository root on sys.path).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

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


def photo_like(rng: object, count: int, side: int) -> object:
    """Smooth random colour fields plus mid-scale blobs and pixel noise.

    JPEG sizes come out near real photos' (~1.2 KB at 32 px, ~18 KB at
    224 px, quality 90), unlike pure noise (incompressible) or flat colour.

    Returns:
      uint8 [count, side, side, 3].
    """
    import numpy as np
    import tensorflow as tf

    def smooth(grid: int, scale: float, centre: float) -> np.ndarray:
        values = rng.normal(centre, scale, (count, grid, grid, 3))
        return tf.image.resize(values, (side, side), "bicubic").numpy()

    noise = rng.normal(0, 10, (count, side, side, 3))
    images = smooth(3, 60, 128) + smooth(12, 35, 0) + noise
    return np.clip(images, 0, 255).astype(np.uint8)


def write_image_folder(path: str, count: int, side: int) -> dict:
    """Writes `count` photo_like JPEGs in 10 class folders, unless present.

    For benchmarks of image-folder and TFRecord reading: image i is
    `path/class_{i % 10}/{i:06d}.jpg`, side x side pixels, quality 90.

    Written under a temporary name and renamed, so a present folder is
    complete; its facts are kept in `.benchmark.json` (hidden files are not
    listed as images).

    Returns:
      write_seconds, mean_jpeg_bytes, and reused (True if it was present).
    """
    import numpy as np
    import tensorflow as tf

    facts_path = os.path.join(path, ".benchmark.json")
    if os.path.isfile(facts_path):
        with open(facts_path) as file:
            return {**json.load(file), "reused": True}
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    rng, total_bytes, started = np.random.default_rng(0), 0, time.perf_counter()
    for first in range(0, count, 64):
        images = photo_like(rng, min(64, count - first), side)
        for index, image in enumerate(images, first):
            data = tf.io.encode_jpeg(image, quality=90).numpy()
            folder = os.path.join(partial, f"class_{index % 10}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"{index:06d}.jpg"), "wb") as file:
                file.write(data)
            total_bytes += len(data)
    facts = {
        "write_seconds": time.perf_counter() - started,
        "mean_jpeg_bytes": total_bytes / count,
    }
    with open(os.path.join(partial, ".benchmark.json"), "w") as file:
        json.dump(facts, file)
    os.rename(partial, path)
    return {**facts, "reused": False}
