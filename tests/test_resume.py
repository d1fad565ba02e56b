"""Exact resume: a run stopped at any step and restarted with the same
command trains on the batches, and ends with the weights, of a run that was
never stopped.

The input stream is a function of (seed, host, example index): started at
a step, it must equal the uninterrupted stream from that step on, for every
source kind and host count. Whole runs are then stopped (SIGTERM through
the real preemption path, and SIGKILL in a subprocess) in the middle of an
epoch, several times, and compared weight by weight with one that was not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simclr_tf.config import schema as config_lib
from simclr_tf.data import order, pipeline
from simclr_tf.data.sources import base as source_lib
from simclr_tf.data.sources import folder, synthetic, tfrecord
from simclr_tf.tools import make_tfrecords
from simclr_tf.training import loop as training_loop

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 8


def _synthetic_source() -> source_lib.Source:
    return synthetic.synthetic(
        num_examples=22, image_size=SIZE, channels=3, seed=0
    )


def _image_folder(root: str, count: int = 22) -> str:
    """count PNGs in 2 class folders, pixel value = the image's number."""
    for index in range(count):
        directory = os.path.join(root, f"class{index % 2}")
        os.makedirs(directory, exist_ok=True)
        pixels = np.full((SIZE + index % 3, SIZE, 3), 10 * index, np.uint8)
        Image.fromarray(pixels).save(os.path.join(directory, f"{index}.png"))
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, source_lib.Source]:
    root = str(tmp_path_factory.mktemp("resume_data"))
    images = _image_folder(os.path.join(root, "images"))
    listing = folder.list_folder(images, "train")
    shards = os.path.join(root, "shards")
    entry = make_tfrecords.write_split(listing, shards, 4)
    make_tfrecords.update_info(shards, {"train": entry})
    return {
        "in_memory": _synthetic_source(),
        "folder": folder.open_folder(images, "train"),
        "tfrecord": tfrecord.open_tfrecord(shards, "train"),
    }


def _context(host: int, hosts: int, replicas: int):
    return tf.distribute.InputContext(
        num_input_pipelines=hosts,
        input_pipeline_id=host,
        num_replicas_in_sync=replicas,
    )


def _batches(source, start_step, context, count, mode, seed=3):
    if mode == "pretrain":
        input_fn = pipeline.pretrain_input_fn(
            source,
            global_batch_size=4,
            image_size=SIZE,
            color_jitter_strength=0.5,
            blur=True,
            seed=seed,
            start_step=start_step,
        )
    else:
        input_fn = pipeline.finetune_input_fn(
            source,
            global_batch_size=4,
            image_size=SIZE,
            seed=seed,
            start_step=start_step,
        )
    return list(input_fn(context).take(count).as_numpy_iterator())


def _assert_same_batches(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _examples(source, context, start, count, seed=3):
    data = order.training_examples(
        source, context, 2, SIZE, seed, cache=False, start=start
    )
    return list(data.take(count).as_numpy_iterator())


@pytest.mark.parametrize("kind", ["in_memory", "folder", "tfrecord"])
@pytest.mark.parametrize("hosts", [1, 2])
def test_examples_started_at_k_are_the_uninterrupted_stream_from_k(
    sources, kind, hosts
):
    # 22 examples: a host reads 22 or 11 a pass. Offsets fall inside the
    # first pass, on a pass boundary, and several passes on.
    source = sources[kind]
    for host in range(hosts):
        context = _context(host, hosts, hosts)
        count = source.host_count(context)
        full = _examples(source, context, 0, 4 * count)
        ids = [int(image[0, 0, 0]) for image, _ in full]
        # Each pass is the host's whole share, each example once.
        assert sorted(ids[:count]) == sorted(ids[count : 2 * count])
        for start in (5, count, 2 * count + 3):
            resumed = _examples(source, context, start, 6)
            for (image, label), (want_image, want_label) in zip(
                resumed, full[start : start + 6], strict=True
            ):
                np.testing.assert_array_equal(image, want_image)
                assert label == want_label


@pytest.mark.parametrize(
    ("kind", "mode"),
    [("in_memory", "pretrain"), ("folder", "finetune")],
)
def test_input_started_at_a_step_is_the_uninterrupted_stream_from_it(
    sources, kind, mode
):
    # The whole input_fn: examples and their augmentation seeds. 2 replicas
    # on one host: 2 per-replica batches a step. The folder's images have 3
    # sizes, so its crops are made one image at a time.
    context = _context(0, 1, 2)
    full = _batches(sources[kind], 0, context, 2 * 9, mode)
    for step in (3, 7):  # inside the first epoch (5.5 steps), inside the 2nd
        resumed = _batches(sources[kind], step, context, 2 * 2, mode)
        _assert_same_batches(resumed, full[2 * step :][:4])


def test_input_order_depends_on_the_seed_and_is_new_every_epoch(sources):
    source = sources["in_memory"]
    context = _context(0, 1, 1)
    first = _batches(source, 0, context, 10, "finetune", seed=3)
    labels = [tuple(batch["label"]) for batch in first]
    again = _batches(source, 0, context, 10, "finetune", seed=3)
    other = _batches(source, 0, context, 10, "finetune", seed=4)
    assert labels == [tuple(batch["label"]) for batch in again]
    assert labels != [tuple(batch["label"]) for batch in other]
    # 22 examples at 4 a step: epoch 2 starts within step 6, epoch 3 at 11.
    images = np.concatenate([batch["image"] for batch in first])
    epoch_1, epoch_2 = images[:20], images[22:42]
    assert not np.array_equal(epoch_1, epoch_2)


def test_seed_streams_started_at_k_continue_the_full_streams():
    for stream in (order.element_seeds, order.batch_seeds):
        full = list(stream(3, 1).take(12).as_numpy_iterator())
        later = list(stream(3, 1, 7).take(5).as_numpy_iterator())
        np.testing.assert_array_equal(np.stack(later), np.stack(full[7:]))


def test_host_position_counts_local_replicas():
    context = _context(1, 2, 8)  # 2 hosts, 4 replicas each
    assert order.host_position(5, 64, context) == (5 * 8 * 4, 5 * 4)


TINY = {
    "dataset": "synthetic",
    "train_split": "train",
    "eval_split": "test",
    "image_size": 16,
    "resnet_depth": 18,
    "width_multiplier": 0.125,
    "num_proj_layers": 2,
    "proj_out_dim": 16,
    "train_batch_size": 48,  # 512 / 48: 10 steps an epoch, 32 left over
    "temperature": 0.5,
    "color_jitter_strength": 0.5,
    "warmup_epochs": 0,
    "precision": "float32",
    "seed": 1,
    "train_steps": 14,
    "steps_per_loop": 1,
    "checkpoint_steps": 100,  # only preemption and the end save
    "optimizer": "lars",
    "learning_rate": 1.0,
}


def _variables(model_dir: str) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(model_dir))
    return {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if name != "_CHECKPOINTABLE_OBJECT_GRAPH" and "save_counter" not in name
    }


def _assert_same_variables(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        # Same inputs, same ops on the same CPU: bit-identical.
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


def _preempt_at(steps: set[int]) -> training_loop.HookFactory:
    """Hooks sending this process SIGTERM after each of `steps`."""

    def send(step: int, writer: object) -> None:
        if step in steps:
            os.kill(os.getpid(), signal.SIGTERM)

    return lambda state, source: [training_loop.Hook(run=send, every=1)]


def test_preempted_run_ends_with_the_weights_of_an_uninterrupted_run(
    tmp_path,
):
    config = config_lib.from_dict(
        {**TINY, "model_dir": str(tmp_path / "whole")}
    )
    whole = training_loop.run_training(config)
    assert not whole["preempted"] and whole["step"] == 14
    stopped_dir = str(tmp_path / "stopped")
    stopped = config_lib.from_dict({**TINY, "model_dir": stopped_dir})
    # Mid-epoch stops (10 steps an epoch), one in the second epoch.
    stops = [4, 12]
    for stop in stops:
        summary = training_loop.run_training(stopped, hooks=_preempt_at({stop}))
        assert summary["preempted"] and summary["step"] == stop
    summary = training_loop.run_training(stopped)
    assert not summary["preempted"] and summary["step"] == 14
    _assert_same_variables(
        _variables(stopped_dir), _variables(config.model_dir)
    )


def _command(model_dir: str) -> list[str]:
    flags = {**TINY, "checkpoint_steps": 2}
    return [
        sys.executable,
        "-m",
        "simclr_tf",
        "--mode=train",
        f"--model_dir={model_dir}",
        *(f"--{name}={value}" for name, value in flags.items()),
    ]


def _run(command: list[str]) -> None:
    done = subprocess.run(
        command,
        env={**os.environ, "PYTHONPATH": REPOSITORY},
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_killed_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    """SIGKILL twice mid-epoch (no chance to save): each restart of the same
    command resumes at its last checkpoint and the run ends bit-identical
    to one that ran through."""
    whole_dir, killed_dir = str(tmp_path / "whole"), str(tmp_path / "killed")
    _run(_command(whole_dir))
    for kill_after in (4, 8):
        process = subprocess.Popen(
            _command(killed_dir),
            env={**os.environ, "PYTHONPATH": REPOSITORY},
            cwd=REPOSITORY,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 300
        while True:
            latest = tf.train.latest_checkpoint(killed_dir)
            if latest and int(latest.split("-")[-1]) >= kill_after:
                break
            assert process.poll() is None, "training ended before the kill"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    _run(_command(killed_dir))
    with open(os.path.join(killed_dir, "config.json")) as file:
        assert json.load(file)["train"]["seed"] == 1
    _assert_same_variables(_variables(killed_dir), _variables(whole_dir))
