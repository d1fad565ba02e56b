"""What every benchmark records next to its figures: git SHA, package
versions, device and date, plus peak RSS and JSON output in one place;
and a photo-like JPEG folder for the input benchmarks to read.

Benchmarks import this as `import common` (they run as scripts from any
directory; each puts `benchmarks/` and the repository root on sys.path).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))


def _use_simclr_tfs_cpu_kernels() -> None:
    """Benchmarks time simclr_tf as it runs: with the TensorFlow CPU
    kernels that importing simclr_tf picks (hardware.onednn_switch: oneDNN
    on AVX2 CPUs where TensorFlow would run Eigen). Set here, before any
    process of the benchmark loads TensorFlow, so that every worker
    inherits it and `cpu_isa` records it; hardware.py is read on its own
    (importing the package would load TensorFlow)."""
    path = os.path.join(
        os.path.dirname(BENCHMARKS_DIR), "simclr_tf", "hardware.py"
    )
    spec = importlib.util.spec_from_file_location("_simclr_tf_hardware", path)
    hardware = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = hardware  # its dataclasses look it up
    spec.loader.exec_module(hardware)
    if switch := hardware.onednn_switch():
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = switch


_use_simclr_tfs_cpu_kernels()

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

# What simclr_tf adds to MODELS: its defaults proj_out_dim=128 and the online
# linear head of lineareval_while_pretraining=True over 10 classes.
PROJ_OUT_DIM = 128
NUM_CLASSES = 10


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


CLOCKS = ("wall", "cpu")


def clock(name: str) -> Callable[[], float]:
    """A seconds counter: "wall" (time.perf_counter) or "cpu" (this
    process's CPU time, all threads, over the cores it may use: on a
    machine shared with other processes it stays near the unloaded wall
    time, which the others' load inflates; idle threads that spin count as
    busy)."""
    if name == "wall":
        return time.perf_counter
    cores = len(os.sched_getaffinity(0))
    return lambda: time.process_time() / cores


def matmul_flops_per_second(
    size: int,
    repeats: int,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    clock_name: str = "wall",
) -> dict[str, float]:
    """FLOP/s of a size x size tf.matmul, median of `repeats`, per dtype.

    Args:
      size: matrix side n.
      repeats: timed products per dtype.
      dtypes: which dtypes to time. (With ONEDNN_MAX_CPU_ISA below
        AVX512_CORE on a CPU that has AVX-512, TensorFlow still sends
        bfloat16 matmuls to oneDNN, which aborts the process: time float32
        only there.)
      clock_name: "wall" or "cpu" (`clock`).

    Returns:
      {dtype name: FLOP/s}; the machine's practical peak that step rates
      are compared with.
    """
    import numpy as np
    import tensorflow as tf

    rates = {}
    for dtype in (tf.as_dtype(name) for name in dtypes):
        a = tf.cast(tf.random.uniform((size, size), seed=1), dtype)
        b = tf.cast(tf.random.uniform((size, size), seed=2), dtype)
        product = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)))
        float(product(a, b))  # Trace and warm up.
        now, times = clock(clock_name), []
        for _ in range(repeats):
            started = now()
            float(product(a, b))
            times.append(now() - started)
        rates[dtype.name] = 2 * size**3 / float(np.median(times))
    return rates


class SimclrStep(NamedTuple):
    """One compiled simclr_tf train step on a fixed in-memory batch."""

    loop: Callable[..., dict]
    iterator: Iterator
    parameters: int

    def run(self) -> float:
        """Runs one step; returns its contrastive loss (waits for it)."""
        import tensorflow as tf

        return float(self.loop(self.iterator, tf.constant(1))["contrast_loss"])


def build_train_loop(
    config: object, strategy: object, size: int, channels: int
) -> tuple[Callable[..., dict], object]:
    """simclr_tf's train loop (one step per call) and its model, built as
    train_state.build_state builds them, under `strategy`.

    Returns:
      (loop, model); the loop is not yet traced.
    """
    import tensorflow as tf

    from simclr_tf.training import builders, train_step
    from simclr_tf.training import schedule as schedule_lib

    schedule = schedule_lib.Schedule(
        steps_per_epoch=100,
        total_steps=10_000,
        warmup_steps=10,
        checkpoint_every=0,
        steps_per_loop=1,
    )
    with strategy.scope():
        model = builders.build_model(config, NUM_CLASSES, channels)
        model(tf.zeros((1, size, size, channels)))
        optimizer = builders.build_optimizer(config, schedule)
        optimizer.build(model.trainable_variables)
    replicas = strategy.num_replicas_in_sync
    loop = train_step.make_train_loop(
        strategy, train_step.make_train_step(config, model, optimizer, replicas)
    )
    return loop, model


def build_simclr_step(spec: dict[str, object]) -> SimclrStep:
    """simclr_tf's own train loop (one step per call) for a benchmark spec.

    Args:
      spec: "model" (a MODELS key), "precision" (a Keras dtype policy),
        "batch" (global batch) and "jit_compile".

    Returns:
      The step, not yet run (its first run traces and compiles).
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from simclr_tf.config import schema as config_lib

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
    strategy = tf.distribute.get_strategy()
    loop, model = build_train_loop(config, strategy, size, channels)
    shape = (spec["batch"], size, size, channels)
    batch = {
        "view1": tf.random.uniform(shape, seed=1),
        "view2": tf.random.uniform(shape, seed=2),
        "label": tf.zeros([spec["batch"]], tf.int64),
    }
    iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
    parameters = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    return SimclrStep(loop, iterator, parameters)


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


def cpu_isa() -> dict[str, object]:
    """The vector ISA oneDNN can use: the CPU's SIMD flags, the cap, and
    whether TensorFlow's oneDNN ops are on.

    Returns:
      {"flags": sorted avx/fma/amx flags of /proc/cpuinfo, e.g. ["avx2",
      "avx512f", "fma"], "onednn_max_cpu_isa": $ONEDNN_MAX_CPU_ISA or
      None (no cap), "tf_enable_onednn_opts": $TF_ENABLE_ONEDNN_OPTS
      (as the user set it or, unset, as simclr_tf sets it) or None
      (TensorFlow's default: on with VNNI, BF16 or AMX)}.
    """
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    prefixes = ("avx", "fma", "amx")
    return {
        "flags": sorted(f for f in flags if f.startswith(prefixes)),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
    }


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def metadata(flag_values: dict[str, object]) -> dict[str, object]:
    """The provenance block of a benchmark JSON.

    Args:
      flag_values: the benchmark's own flags, recorded as given.

    Returns:
      git_sha, versions (python, tensorflow, keras, numpy), device,
      cpu_isa (`cpu_isa`), date (UTC, ISO 8601) and flags.
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
        "cpu_isa": cpu_isa(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
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
