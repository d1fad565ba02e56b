"""Two-worker MultiWorkerMirroredStrategy run on 127.0.0.1.

Two processes, each with its own TF_CONFIG, run the real `cli.run` (train
then evaluate and export) on the synthetic dataset; each host reads its own
input shard. Both must end at the same step with equal weights, and only the
chief may leave files behind.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import xla_flags_caching_in

# Two TensorFlow processes a run, ~1 min of both cores in all: .ci/run's
# slow stage runs them, beside the recipe chains.
# One xdist group: the module-scoped `two_workers` fixture runs once when
# .ci/run spreads the slow tests test by test (--dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("two_workers")]

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DRIVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from absl import logging
    from simclr_tf import cli
    from simclr_tf.config import schema as config_lib
    from simclr_tf.config import validation
    from simclr_tf.training import loop as training_loop

    model_dir, output = sys.argv[1], sys.argv[2]
    train_steps, mode = int(sys.argv[3]), sys.argv[4]
    captured = {}
    run_training = training_loop.run_training

    def recording_run_training(config, source=None, hooks=None, strategy=None):
        summary = run_training(config, source, hooks, strategy)
        captured["state"] = summary["state"]
        return summary

    training_loop.run_training = recording_run_training
    logging.set_verbosity(logging.INFO)
    config = validation.validate(config_lib.from_dict({
        "dataset": "synthetic", "train_split": "train", "eval_split": "test",
        "image_size": 16, "resnet_depth": 18, "width_multiplier": 0.125,
        "proj_out_dim": 16, "train_batch_size": 16, "temperature": 0.5,
        "color_jitter_strength": 0.5, "use_blur": False, "warmup_epochs": 0,
        "precision": "float32", "seed": 0, "strategy": "multi_worker",
        "train_steps": train_steps, "steps_per_loop": 2,
        "checkpoint_steps": 2, "mode": mode, "linear_eval_epochs": 2,
        "max_eval_examples": 64, "eval_baselines": False,
        "model_dir": model_dir,
    }))
    result = cli.run(config)
    state = captured["state"]
    np.savez(
        output,
        step=int(state.optimizer.iterations.numpy()),
        replicas=state.strategy.num_replicas_in_sync,
        chief_result="wall_seconds" in result and "export_path" in result,
        **{f"w{i}": v.numpy() for i, v in enumerate(state.model.weights)},
    )
    """
)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _run_workers(
    root: pathlib.Path,
    model_dir: str,
    train_steps: int,
    mode: str,
    sigterm_worker_1_at: str | None = None,
):
    """Runs both workers to the end; returns their outputs and logs.

    With `sigterm_worker_1_at` (a checkpoint prefix), worker 1 alone gets
    SIGTERM as soon as that checkpoint exists.
    """
    driver = root / "driver.py"
    driver.write_text(_DRIVER)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    processes, outputs, log_paths = [], [], []
    for index in range(2):
        name = f"{mode}_{train_steps}_worker{index}"
        outputs.append(str(root / f"{name}.npz"))
        log_paths.append(root / f"{name}.log")
        environment = {
            **os.environ,
            "PYTHONPATH": REPOSITORY,
            "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
            # The two workers compile the same programs at the same moment:
            # each keeps its XLA executables in its own directory (conftest).
            "TF_XLA_FLAGS": xla_flags_caching_in(f"{root}/xla{index}"),
        }
        command = [sys.executable, str(driver), model_dir, outputs[-1]]
        with open(log_paths[-1], "w") as log:
            processes.append(
                subprocess.Popen(
                    [*command, str(train_steps), mode],
                    env=environment,
                    cwd=REPOSITORY,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    # A worker whose peer never comes blocks forever: bound everything.
    deadline = time.time() + 420
    try:
        if sigterm_worker_1_at:
            while not os.path.exists(sigterm_worker_1_at + ".index"):
                assert time.time() < deadline, "no checkpoint in 420 s"
                assert processes[1].poll() is None, "worker 1 ended early"
                time.sleep(0.1)
            processes[1].send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for process in processes:
            process.kill()
    logs = [path.read_text() for path in log_paths]
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, log[-3000:]
    return [dict(np.load(path)) for path in outputs], logs


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """Trains 4 steps, evaluates and exports: (model_dir, outputs, logs)."""
    root = tmp_path_factory.mktemp("multi_worker")
    model_dir = str(root / "run")
    outputs, logs = _run_workers(root, model_dir, 4, "train_then_eval")
    return model_dir, outputs, logs


def test_workers_end_at_the_same_step_with_equal_weights(two_workers):
    _, (chief, worker), _ = two_workers
    assert int(chief["step"]) == int(worker["step"]) == 4
    # One CPU replica per worker process: 2 replicas in sync in all.
    assert int(chief["replicas"]) == int(worker["replicas"]) == 2
    names = [key for key in chief if key.startswith("w")]
    assert len(names) > 40  # every ResNet, head and BN variable
    for name in names:
        # All-reduced gradients and synchronised BN: bit-for-bit the same
        # update on both hosts (same op order on both).
        np.testing.assert_array_equal(chief[name], worker[name])


def test_sigterm_to_one_worker_stops_both_at_one_step_then_resume(
    two_workers,
):
    """Both resume from the chief's ckpt-4; SIGTERM to worker 1 only, once
    ckpt-6 is written, stops both workers at the same later step with equal
    weights and that step's checkpoint."""
    model_dir, _, _ = two_workers
    (chief, worker), logs = _run_workers(
        pathlib.Path(os.path.dirname(model_dir)),
        model_dir,
        400,
        "train",
        sigterm_worker_1_at=f"{model_dir}/ckpt-6",
    )
    for log in logs:
        assert f"resumed from {model_dir}/ckpt-4" in log
    stopped_at = int(chief["step"])
    assert 6 <= stopped_at < 400
    assert int(worker["step"]) == stopped_at
    for name in (key for key in chief if key.startswith("w")):
        np.testing.assert_array_equal(chief[name], worker[name])
    assert tf.train.latest_checkpoint(model_dir).endswith(f"ckpt-{stopped_at}")
    assert "preempted: saved" in logs[0]  # the chief saw worker 1's signal


def test_only_the_chief_writes_files(two_workers):
    model_dir, (chief, worker), _ = two_workers
    assert bool(chief["chief_result"]) and not bool(worker["chief_result"])
    leftovers = sorted(
        name for name in os.listdir(model_dir) if "scratch" in name
    )
    assert leftovers == []
    assert os.path.exists(os.path.join(model_dir, "result.json"))
    assert os.path.exists(os.path.join(model_dir, "config.json"))
    exports = os.listdir(os.path.join(model_dir, "saved_model"))
    assert exports == ["4"]


def test_start_up_log_names_two_hosts(two_workers):
    _, _, logs = two_workers
    for log in logs:
        assert "2 replica(s) on 2 host(s), global batch 16" in log
        assert "per-replica batch 8" in log
