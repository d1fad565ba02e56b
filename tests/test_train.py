"""Tests for simclr_tf.train: schedule, the step, overfit, resume, NaN stop."""

from __future__ import annotations

import gc
import math
import os
import signal
import subprocess
import sys
import time
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.config import schema as config_lib
from simclr_tf.config import validation
from simclr_tf.data import run_data
from simclr_tf.data.augment import views as augment
from simclr_tf.data.sources import synthetic
from simclr_tf.evaluation import knn, monitor
from simclr_tf.training import builders, train_state, train_step
from simclr_tf.training import loop as training_loop
from simclr_tf.training import schedule as schedule_lib

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "dataset": "synthetic",
    "train_split": "train",
    "eval_split": "test",
    "image_size": 16,
    "resnet_depth": 18,
    "width_multiplier": 0.125,
    "num_proj_layers": 2,
    "proj_out_dim": 16,
    "train_batch_size": 16,
    "temperature": 0.5,
    "color_jitter_strength": 0.5,
    "use_blur": False,
    "warmup_epochs": 0,
    "precision": "float32",
    "seed": 0,
}


_ENVIRONMENT = {**os.environ, "PYTHONPATH": REPOSITORY}


def _train_command(
    model_dir: str, *, train_steps: int, checkpoint_steps: int
) -> list[str]:
    """`python -m simclr_tf` training the TINY config in 5-step loops."""
    return [
        sys.executable,
        "-m",
        "simclr_tf",
        f"--model_dir={model_dir}",
        "--mode=train",
        f"--train_steps={train_steps}",
        f"--checkpoint_steps={checkpoint_steps}",
        "--steps_per_loop=5",
        "--strategy=default",
        *[f"--{k}={v}" for k, v in TINY.items()],
    ]


def _resume(
    command: list[str], model_dir: str, checkpoint: str, total: int
) -> str:
    """Reruns `command`; asserts it resumed from `checkpoint` and finished.

    Returns:
      The rerun's stderr (its log).
    """
    resumed = subprocess.run(
        command,
        env=_ENVIRONMENT,
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {checkpoint}" in resumed.stderr
    assert tf.train.latest_checkpoint(model_dir).endswith(f"ckpt-{total}")
    return resumed.stderr


def _tiny_config(model_dir: str, **changes) -> config_lib.Config:
    return validation.validate(
        config_lib.from_dict({**TINY, "model_dir": model_dir, **changes})
    )


def test_is_due_every_multiple_and_at_the_end():
    due = [step for step in range(1, 11) if schedule_lib.is_due(step, 3, 10)]
    assert due == [3, 6, 9, 10]
    assert [s for s in range(1, 6) if schedule_lib.is_due(s, 0, 5)] == [5]


def test_resolve_schedule_matches_google_research_formulas():
    config = config_lib.from_dict(
        {
            "train_batch_size": 256,
            "train_epochs": 3,
            "warmup_epochs": 0.3,
            "checkpoint_epochs": 1,
        }
    )
    schedule = schedule_lib.resolve_schedule(config.train, config.optim, 60000)
    # GR: total = N*epochs//B + 1, warm-up = round(epochs_w*N//B).
    assert schedule.steps_per_epoch == 60000 // 256 == 234
    assert schedule.total_steps == 60000 * 3 // 256 + 1 == 704
    assert schedule.warmup_steps == round(0.3 * 60000 // 256) == 70
    assert schedule.checkpoint_every == 234


def test_resolve_schedule_train_steps_override_epochs():
    config = config_lib.from_dict(
        {"train_batch_size": 32, "train_steps": 7, "checkpoint_steps": 3}
    )
    schedule = schedule_lib.resolve_schedule(config.train, config.optim, 512)
    assert schedule.total_steps == 7
    assert schedule.checkpoint_every == 3


def test_resolve_schedule_rejects_batch_larger_than_split():
    config = config_lib.from_dict({"train_batch_size": 1024})
    with pytest.raises(ValueError, match="--train_batch_size=1024"):
        schedule_lib.resolve_schedule(config.train, config.optim, 512)


def test_loop_lengths_stop_at_checkpoints_and_the_end():
    schedule = schedule_lib.Schedule(
        steps_per_epoch=10,
        total_steps=25,
        warmup_steps=0,
        checkpoint_every=10,
        steps_per_loop=4,
    )
    step, lengths = 0, []
    while step < schedule.total_steps:
        length = schedule_lib.steps_until_boundary(step, schedule)
        lengths.append(length)
        step += length
    assert lengths == [4, 4, 2, 4, 4, 2, 4, 1]
    # A monitor every 6 steps also ends loops at 6, 12, 18, 24.
    step, ends = 0, []
    while step < schedule.total_steps:
        step += schedule_lib.steps_until_boundary(step, schedule, 6)
        ends.append(step)
    assert ends == [4, 6, 10, 12, 16, 18, 20, 24, 25]


@pytest.mark.parametrize(("batch", "replicas"), [(30, 4), (4, 4)])
def test_check_batch_rejects_bad_per_replica_batch(batch, replicas):
    with pytest.raises(ValueError, match=f"--train_batch_size={batch}"):
        train_state.check_batch_divides(batch, replicas)


def test_tiny_overfit_contrast_accuracy_rises(tmp_path):
    """16 images, a narrow ResNet, 100 steps: the loss starts near ln(2N-1)."""
    config = _tiny_config(
        str(tmp_path),
        optimizer="adam",
        learning_rate=0.003,
        learning_rate_scaling="sqrt",
        train_steps=100,
        lineareval_while_pretraining=False,
    )
    source = synthetic.synthetic(16, image_size=16, channels=3, seed=3)
    strategy = tf.distribute.get_strategy()
    state = train_state.build_state(config, strategy, source)
    images = np.stack(
        [image for image, _ in source.dataset().as_numpy_iterator()]
    )

    def views(index):
        # Both views of the 16 images in one batched call (per-image
        # draws); 32 eager per-image calls take ~50 s on 2 cores.
        pairs = augment.simclr_augment_batch(
            np.concatenate([images, images]),
            16,
            color_jitter_strength=0.5,
            blur=False,
            seed=tf.constant([7, index], tf.int32),
        )
        return {
            "view1": pairs[:16],
            "view2": pairs[16:],
            "label": tf.zeros([16], tf.int64),
        }

    batches = [views(index) for index in range(10)]
    iterator = iter(
        tf.data.Dataset.from_tensor_slices(
            {k: tf.stack([b[k] for b in batches]) for k in batches[0]}
        ).repeat()
    )
    step = train_step.make_train_step(config, state.model, state.optimizer, 1)
    loop = train_step.make_train_loop(strategy, step)
    first = loop(iterator, tf.constant(1))
    for _ in range(9):
        last = loop(iterator, tf.constant(11))
    # At initialisation z is nearly uninformative: loss ~ ln(2N-1) = ln(31);
    # the margin allows the random-init similarity spread at tau = 0.5.
    assert abs(float(first["contrast_loss"]) - math.log(31)) < 0.35
    # Chance is 1/16 = 0.06; measured about 0.9 after 100 steps: require 0.5.
    assert float(last["contrast_acc"]) > 0.5
    assert float(last["contrast_loss"]) < float(first["contrast_loss"]) - 1.0


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model_dir = str(tmp_path)
    good = _tiny_config(
        model_dir, train_steps=4, checkpoint_steps=2, steps_per_loop=2
    )
    summary = training_loop.run_training(good)
    assert summary["step"] == 4
    saved = [v.numpy() for v in summary["state"].model.weights]
    # Momentum SGD with lr 1e30 overflows float32 weights in one step.
    bad = config_lib.replace(
        good, optimizer="momentum", learning_rate=1e30, train_steps=8
    )
    with pytest.raises(training_loop.NonFiniteLossError) as error:
        training_loop.run_training(bad)
    message = str(error.value)
    assert "steps 5..6" in message and "ckpt-4" in message
    assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-4")
    restored = train_state.restore_for_eval(good)["state"].model.weights
    for before, after in zip(saved, restored, strict=True):
        np.testing.assert_array_equal(before, after.numpy())


# Training in a subprocess, killed, then resumed (25-31 s each, as the SIGTERM
# test below): .ci/run's slow stage runs them, beside the recipe chains.
@pytest.mark.slow
@pytest.mark.compat
def test_killed_run_resumes_at_saved_step(tmp_path):
    """SIGKILL mid-run, then the same command continues from its checkpoint."""
    model_dir = str(tmp_path / "run")
    # After ckpt-5 the run has 95 steps left (3.4 s on 2 Zen 4 cores); the
    # kill follows the checkpoint within 0.2 s.
    command = _train_command(model_dir, train_steps=100, checkpoint_steps=5)
    process = subprocess.Popen(
        command,
        env=_ENVIRONMENT,
        cwd=REPOSITORY,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while tf.train.latest_checkpoint(model_dir) is None:
        assert process.poll() is None, "training exited before a checkpoint"
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = int(tf.train.latest_checkpoint(model_dir).split("-")[-1])
    assert 5 <= killed_at < 100
    log = _resume(command, model_dir, f"{model_dir}/ckpt-{killed_at}", 100)
    first_line = next(line for line in log.splitlines() if "] step " in line)
    assert f"step {killed_at + 5}/100" in first_line


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    training_loop.run_training(_tiny_config(str(tmp_path), train_steps=2))
    other = _tiny_config(str(tmp_path), train_steps=4, width_multiplier=0.25)
    with pytest.raises(ValueError, match="does not match this model"):
        training_loop.run_training(other)
    # The good checkpoint is still the latest one.
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-2")


def _two_step_losses(config, make_iterator, graphs=None) -> list[float]:
    """Contrast losses of two single-step loops from seeded weights.

    make_iterator(config) gives the batches; it is called after the model
    is built, with the global seed reset first (tf.data mixes it in). A
    weak reference to the loop's traced graph goes into `graphs` if given.
    """
    keras.utils.set_random_seed(0)
    model = builders.build_model(config, 10, 3)
    model(tf.zeros((1, 16, 16, 3)))
    schedule = schedule_lib.Schedule(
        steps_per_epoch=10,
        total_steps=100,
        warmup_steps=0,
        checkpoint_every=0,
        steps_per_loop=1,
    )
    optimizer = builders.build_optimizer(config, schedule)
    loop = train_step.make_train_loop(
        tf.distribute.get_strategy(),
        train_step.make_train_step(config, model, optimizer, 1),
    )
    iterator = make_iterator(config)
    # Two steps: the second also checks the (XLA-compiled) update.
    losses = [
        float(loop(iterator, tf.constant(1))["contrast_loss"]) for _ in range(2)
    ]
    if graphs is not None:
        traced = loop.get_concrete_function(iterator, tf.constant(1))
        graphs.append(weakref.ref(traced.graph))
    return losses


@pytest.mark.compat
def test_jit_compiled_step_matches_plain_step():
    """XLA (what TPUs run) computes the same loss as the plain graph; and
    neither loop's graph outlives it (nothing in the step registers a
    gradient that holds it: optim.py, models/conv.py)."""
    batch = {
        "view1": tf.random.uniform((16, 16, 16, 3), seed=1),
        "view2": tf.random.uniform((16, 16, 16, 3), seed=2),
        "label": tf.zeros([16], tf.int64),
    }
    graphs = []
    losses = {
        jit_compile: _two_step_losses(
            _tiny_config("/tmp/unused", jit_compile=jit_compile),
            lambda _: iter(tf.data.Dataset.from_tensors(batch).repeat()),
            graphs,
        )
        for jit_compile in (False, True)
    }
    # XLA fuses and reorders float32 sums: agreement to ~1e-6 relative was
    # measured; 1e-5 leaves room without hiding a real difference (the loss
    # changes by ~3e-2 between the two steps).
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    gc.collect()
    assert len(graphs) == 2 and [graph() for graph in graphs] == [None, None]


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_the_same_command_resumes(tmp_path):
    model_dir = str(tmp_path / "run")
    command = _train_command(model_dir, train_steps=200, checkpoint_steps=1000)
    process = subprocess.Popen(
        command,
        env=_ENVIRONMENT,
        cwd=REPOSITORY,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stderr:  # wait until training is under way
        if "] step " in line:
            break
    process.send_signal(signal.SIGTERM)
    rest = process.communicate(timeout=120)[1]
    assert process.returncode == 0, rest[-2000:]
    assert "preempted: saved" in rest
    saved = tf.train.latest_checkpoint(model_dir)
    saved_step = int(saved.split("-")[-1])
    # No regular checkpoint is due before step 200: this one is SIGTERM's,
    # written at a loop boundary.
    assert 5 <= saved_step < 200 and saved_step % 5 == 0
    _resume(command, model_dir, saved, 200)


def test_augment_on_device_step_matches_host_augmentation():
    """--augment_on_device gives the loss of host-side augmentation.

    Same seed, same initial weights: the step distorts the crops itself
    (compiled with XLA, as on a TPU) and must see the same views.
    """
    source = synthetic.synthetic(num_examples=16, image_size=16, seed=0)
    losses = {}
    for on_device in (False, True):
        config = _tiny_config(
            "/tmp/unused",
            augment_on_device=on_device,
            jit_compile=on_device,
            use_blur=True,
        )
        losses[on_device] = _two_step_losses(
            config,
            lambda config: iter(
                run_data.pretrain_input_fn(config, source)(
                    tf.distribute.InputContext()
                )
            ),
        )
    # Views agree to ~1e-6 (XLA vs tf.data summation order); the loss then
    # to ~1e-6 relative, as in test_jit_compiled_step_matches_plain_step.
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def test_knn_monitor_writes_tensorboard_at_its_steps(tmp_path):
    """--knn_every_steps=2 over 4 steps: kNN at steps 2 and 4.

    The step-4 value must equal knn_eval of the final model on the same
    bank and queries (the monitor is that computation, logged).
    """
    config = _tiny_config(
        str(tmp_path),
        train_steps=4,
        steps_per_loop=4,
        knn_every_steps=2,
        knn_k=5,
        knn_max_train_examples=64,
        max_eval_examples=32,
    )
    summary = training_loop.run_training(
        config, hooks=monitor.training_hooks(config)
    )
    values = {}
    for name in os.listdir(tmp_path / "train"):
        path = str(tmp_path / "train" / name)
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "knn/top_1":
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    assert sorted(values) == [2, 4]
    source = summary["source"]
    expected = knn.knn_eval(
        summary["state"].model,
        run_data.eval_input(config, source, limit=64),
        run_data.eval_input(config, run_data.open_split(config, "test")),
        num_classes=10,
        k=5,
    )
    assert values[4] == pytest.approx(expected["top_1"], abs=1e-6)
