"""End-to-end tests of the command line: bad flags, train_then_eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import cli
from simclr_tf.config import schema as config_lib
from simclr_tf.config import validation
from simclr_tf.data import run_data
from simclr_tf.data.sources import fashion_mnist, synthetic

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simclr_tf", *arguments],
        env={**os.environ, "PYTHONPATH": REPOSITORY},
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_rejects_bad_flags_with_every_message(tmp_path):
    finished = _run_cli(
        f"--model_dir={tmp_path}",
        "--resnet_depth=42",
        "--temperature=-1",
    )
    assert finished.returncode != 0
    assert "2 invalid flag value(s)" in finished.stderr
    assert "--resnet_depth=42 must be one of" in finished.stderr
    assert "--temperature=-1.0 must be > 0" in finished.stderr
    # Rejected before anything is built: model_dir stays empty.
    assert os.listdir(tmp_path) == []


def test_cli_rejects_unknown_flag():
    finished = _run_cli("--model_dir=/tmp/x", "--learnig_rate=0.1")
    assert finished.returncode != 0
    assert "learnig_rate" in finished.stderr


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ("mirrored", "simclr_tf: --strategy=mirrored needs GPUs"),
        ("tpu", "simclr_tf: --strategy=tpu but no TPU was found"),
    ],
)
def test_explicit_strategy_without_its_devices_is_one_line(
    tmp_path, strategy, message
):
    """This machine has neither a GPU TensorFlow can use nor a TPU."""
    run = tmp_path / "run"
    finished = _run_cli(
        f"--model_dir={run}", f"--strategy={strategy}", "--dataset=synthetic"
    )
    assert finished.returncode == 1
    (line,) = [
        line for line in finished.stderr.splitlines() if "simclr_tf:" in line
    ]
    assert line.startswith(message), finished.stderr
    assert "--strategy=auto" in line
    assert "Traceback" not in finished.stderr
    # The strategy is made before anything is written.
    assert not run.exists()


@pytest.mark.compat
def test_train_then_eval_writes_result_export_and_table(tmp_path, capsys):
    config = validation.validate(
        config_lib.from_dict(
            {
                "model_dir": str(tmp_path),
                "mode": "train_then_eval",
                "dataset": "synthetic",
                "train_split": "train",
                "eval_split": "test",
                "image_size": 16,
                "resnet_depth": 18,
                "width_multiplier": 0.125,
                "num_proj_layers": 2,
                "proj_out_dim": 16,
                "train_batch_size": 32,
                "train_steps": 4,
                "steps_per_loop": 2,
                "warmup_epochs": 0,
                "temperature": 0.5,
                "use_blur": False,
                "linear_eval_epochs": 2,
                "max_eval_examples": 64,
                "precision": "float32",
                "seed": 0,
            }
        )
    )
    result = cli.run(config)
    with open(tmp_path / "result.json") as file:
        written = json.load(file)
    assert written["step"] == 4
    # img/s leaves the first loop (tracing, compiling) out: at least the
    # run's average over all of its time.
    assert (
        written["train/images_per_second"] >= 4 * 32 / written["train/seconds"]
    )
    for prefix in ("eval/", "eval/random_init/", "eval/pixels/"):
        assert written[f"{prefix}top_1"] <= written[f"{prefix}top_5"]
    assert written["eval/num_test"] == 64
    # kNN top-1 recomputed with numpy from the same 64 train and 64 eval
    # images: raw pixels exactly; the exported encoder's features within
    # one image (float rounding of the SavedModel may flip a near tie).
    train_images, train_labels = _eval_images(config, "train", 64)
    test_images, test_labels = _eval_images(config, "test", 64)
    assert written["eval/pixels/knn/top_1"] == _numpy_knn_top_1(
        train_images, train_labels, test_images, test_labels
    )
    encoder = tf.saved_model.load(str(tmp_path / "saved_model" / "4"))

    def features(images):
        outputs = encoder.signatures["serving_default"](tf.constant(images))
        return outputs["final_avg_pool"].numpy()

    expected = _numpy_knn_top_1(
        features(train_images), train_labels, features(test_images), test_labels
    )
    assert abs(written["eval/knn/top_1"] - expected) <= 1 / 64 + 1e-9
    assert written["eval/split"] == "test"
    assert written["config"]["model"]["width_multiplier"] == 0.125
    assert written["versions"]["tensorflow"] == tf.__version__
    assert result["export_path"] == str(tmp_path / "saved_model" / "4")
    # --export_keras defaults on: the Keras file sits in the export.
    assert result["export_keras_path"] == os.path.join(
        result["export_path"], "model.keras"
    )
    assert os.path.isfile(result["export_keras_path"])
    loaded = tf.saved_model.load(result["export_path"])
    images = np.random.default_rng(0).random((2, 16, 16, 3), np.float32)
    outputs = loaded.signatures["serving_default"](tf.constant(images))
    assert outputs["proj_head_output"].shape == (2, 16)
    # The table: one row per representation, the online head's (scored in
    # the protocol's pass) first, with result.json's figures.
    lines = capsys.readouterr().out.splitlines()
    header = next(
        i for i, line in enumerate(lines) if line.startswith("representation")
    )
    assert "kNN top-1" in lines[header]
    rows = lines[header + 1 : header + 5]
    assert [row[:28].strip() for row in rows] == [
        "online linear head",
        "SimCLR encoder (this run)",
        "same encoder, random init",
        "raw pixels",
    ]
    prefixes = ("eval/online/", "eval/", "eval/random_init/", "eval/pixels/")
    for row, prefix in zip(rows, prefixes, strict=True):
        assert f"{100 * written[f'{prefix}top_1']:.2f}%" in row
    # TensorBoard event files for train and eval scalars, and the preview
    # grid of augmented views written once at the start of training.
    assert os.listdir(tmp_path / "eval")
    assert "augmentations" in _summary_tags(tmp_path / "train")
    # --eval_reports (default on): files and TensorBoard images of the
    # encoder's linear classifier on the 64 eval images.
    for name in ("confusion_matrix", "embedding_map", "retrieval"):
        assert os.path.getsize(tmp_path / "reports" / f"{name}.png") > 0
        assert f"reports/{name}" in _summary_tags(tmp_path / "eval")
    with open(tmp_path / "reports" / "per_class.json") as file:
        report = json.load(file)
    assert sum(row["support"] for row in report["per_class"]) == 64
    # The source's class names reach the text report, beside the indices.
    text = (tmp_path / "reports" / "per_class.txt").read_text()
    for row in report["per_class"]:
        name = synthetic.SYNTHETIC_CLASSES[row["class"]]
        assert f"{row['class']} {name}" in text
    assert report["accuracy"] == written["eval/top_1"]
    assert os.path.isfile(
        tmp_path / "reports" / "projector" / "projector_config.pbtxt"
    )


@pytest.mark.skipif(
    not os.path.isdir(fashion_mnist.FASHION_MNIST_SYSTEM_DIR),
    reason="Fashion-MNIST files absent: `make data` installs them",
)
def test_short_pretraining_beats_the_random_init_encoder(tmp_path):
    # 30 steps of 64 Fashion-MNIST images against the same architecture
    # at random initialisation (BN statistics recalibrated on training
    # images), both linear-evaluated on the same 1000 + 1000 images. One
    # standard error of an accuracy difference at n = 1000 is ~2 points:
    # 10 points of linear top-1 and 5 of kNN top-1 are not chance.
    config = validation.validate(
        config_lib.from_dict(
            {
                "model_dir": str(tmp_path),
                "mode": "train_then_eval",
                "dataset": "fashion_mnist",
                "train_split": "train",
                "eval_split": "test",
                "image_size": 28,
                "resnet_depth": 18,
                "width_multiplier": 0.125,
                "proj_out_dim": 32,
                "train_batch_size": 64,
                "train_steps": 30,
                "steps_per_loop": 10,
                "warmup_epochs": 0,
                "learning_rate": 1.0,
                "temperature": 0.2,
                "color_jitter_strength": 0.5,
                "use_blur": False,
                "linear_eval_epochs": 20,
                "max_eval_examples": 1000,
                "eval_reports": False,
                "precision": "float32",
                "seed": 0,
            }
        )
    )
    result = cli.run(config)
    assert result["eval/num_test"] == 1000
    assert result["eval/top_1"] >= result["eval/random_init/top_1"] + 0.10
    assert (
        result["eval/knn/top_1"] >= result["eval/random_init/knn/top_1"] + 0.05
    )


def _eval_images(config, split, count):
    """The first `count` images of a split with eval preprocessing."""
    source = run_data.open_split(config, split)
    batches = list(run_data.eval_input(config, source, limit=count))
    images = np.concatenate([batch["image"] for batch in batches])
    labels = np.concatenate([batch["label"] for batch in batches])
    return images, labels


def _numpy_knn_top_1(train, train_labels, test, test_labels, k=200, tau=0.1):
    """kNN top-1 as lightly / solo-learn compute it (Wu et al. 2018, Eq. 7):
    cosine similarity, the k nearest vote with weight exp(s / tau)."""
    train = train.reshape(len(train), -1).astype(np.float64)
    test = test.reshape(len(test), -1).astype(np.float64)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    similarities = test @ train.T
    k = min(k, len(train))
    correct = 0
    for row, label in zip(similarities, test_labels, strict=True):
        nearest = np.argsort(-row, kind="stable")[:k]
        scores = np.zeros(int(train_labels.max()) + 1)
        np.add.at(scores, train_labels[nearest], np.exp(row[nearest] / tau))
        correct += int(np.argmax(scores) == label)
    return correct / len(test)


def _summary_tags(directory) -> set[str]:
    tags = set()
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    return tags


def test_failed_evaluation_keeps_the_export_and_the_trained_result(
    tmp_path, monkeypatch
):
    """train_then_eval exports before it evaluates: an evaluation that
    fails (here: raises) leaves the SavedModel of the trained step and a
    result.json of the training behind."""
    from simclr_tf.evaluation import run_eval

    def failing_evaluation(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(run_eval, "evaluate_state", failing_evaluation)
    config = validation.validate(
        config_lib.from_dict(
            {
                "model_dir": str(tmp_path),
                "mode": "train_then_eval",
                "dataset": "synthetic",
                "train_split": "train",
                "eval_split": "test",
                "image_size": 16,
                "resnet_depth": 18,
                "width_multiplier": 0.125,
                "proj_out_dim": 16,
                "train_batch_size": 16,
                "train_steps": 2,
                "steps_per_loop": 2,
                "warmup_epochs": 0,
                "export_keras": False,
                "precision": "float32",
                "seed": 0,
            }
        )
    )
    with pytest.raises(RuntimeError, match="evaluation failed"):
        cli.run(config)
    with open(tmp_path / "result.json") as file:
        written = json.load(file)
    assert written["step"] == 2
    assert written["export_path"] == str(tmp_path / "saved_model" / "2")
    assert not [name for name in written if name.startswith("eval/")]
    loaded = tf.saved_model.load(written["export_path"])
    images = np.random.default_rng(0).random((2, 16, 16, 3), np.float32)
    outputs = loaded.signatures["serving_default"](tf.constant(images))
    assert outputs["proj_head_output"].shape == (2, 16)


def test_plan_mode_prints_the_plan_and_refuses_what_cannot_fit(tmp_path):
    """--mode=plan on the CPU: the plan's lines and nothing trained; with
    a replica of 0.05 GB the same flags are refused in one line that
    names a per-replica batch that fits."""
    flags = (
        f"--model_dir={tmp_path}",
        "--mode=plan",
        "--dataset=synthetic",
        "--image_size=32",
        "--resnet_depth=18",
        "--width_multiplier=0.25",
        "--train_batch_size=256",
        "--train_steps=1",
    )
    finished = _run_cli(*flags)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "memory plan per replica (CPU" in finished.stdout
    assert "memory plan per host" in finished.stdout
    assert not [name for name in os.listdir(tmp_path) if "ckpt" in name]
    refused = _run_cli(*flags, "--device_memory_gb=0.05")
    assert refused.returncode != 0
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("simclr_tf: --train_batch_size=256 on 1 x CPU")
    assert "use --train_batch_size=" in last
    assert "Traceback" not in refused.stderr


def test_preview_mode_writes_the_grid_and_trains_nothing(tmp_path):
    finished = _run_cli(
        f"--model_dir={tmp_path}",
        "--mode=preview",
        "--dataset=synthetic",
        "--train_split=train",
        "--image_size=32",
        "--seed=3",
    )
    assert finished.returncode == 0, finished.stderr
    path = tmp_path / "augmentations.png"
    image = tf.io.decode_png(path.read_bytes()).numpy()
    # 8 rows of a source and 4 views, 32 px with 2 px gaps, upscaled x2
    # for the caption (preview.caption_scale: width 172 px < 256).
    assert image.shape[1] == 2 * (5 * 32 + 6 * 2)
    assert image.shape[0] > 2 * (8 * 32 + 9 * 2)  # plus the caption
    assert sorted(os.listdir(tmp_path)) == ["augmentations.png"]


def test_folder_dataset_trains_and_reports_skipped_files(tmp_path):
    """--dataset=folder end to end: broken files are counted, not fatal."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        directory = tmp_path / "data" / label
        directory.mkdir(parents=True)
        for index in range(8):
            side = int(rng.integers(12, 30))  # any size: crops are resized
            pixels = rng.integers(0, 256, (side, side + 3, 3), np.uint8)
            Image.fromarray(pixels).save(directory / f"{index}.png")
    (tmp_path / "data" / "cats" / "empty.jpg").write_bytes(b"")
    (tmp_path / "data" / "dogs" / "notes.png").write_text("not an image")
    config = validation.validate(
        config_lib.from_dict(
            {
                "model_dir": str(tmp_path / "run"),
                "mode": "train",
                "dataset": "folder",
                "data_dir": str(tmp_path / "data"),
                "image_size": 16,
                "resnet_depth": 18,
                "width_multiplier": 0.125,
                "num_proj_layers": 2,
                "proj_out_dim": 16,
                "train_batch_size": 8,
                "train_steps": 2,
                "warmup_epochs": 0,
                "precision": "float32",
                "seed": 0,
            }
        )
    )
    result = cli.run(config)
    assert result["step"] == 2
    with open(tmp_path / "run" / "result.json") as file:
        written = json.load(file)
    assert written["data/skipped_files"] == 2
    assert written["data/skipped_by_reason"] == {"empty": 1, "undecodable": 1}
    assert written["data/skipped_examples"]["undecodable"] == [
        str(tmp_path / "data" / "dogs" / "notes.png")
    ]


def test_cli_data_errors_are_one_line(tmp_path):
    """Bad data found after validation: one line naming cause and fix.

    The first case through a new process (exit status 1, the line, no
    traceback); the others through cli.run in this one, whose ValueError
    or FileNotFoundError main() prints as that line (a process each would
    only repeat TensorFlow's start-up).
    """
    from PIL import Image

    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    finished = _run_cli(
        f"--model_dir={tmp_path / 'run'}",
        "--dataset=folder",
        f"--data_dir={tmp_path / 'flat'}",
        "--mode=train_then_eval",
    )
    assert finished.returncode == 1
    (line,) = [
        line for line in finished.stderr.splitlines() if "simclr_tf:" in line
    ]
    assert "has no labels (a flat image folder)" in line, finished.stderr
    assert "Traceback" not in finished.stderr
    cases = [
        ({"dataset": "folder"}, "--dataset=folder reads --data_dir"),
        (
            {"dataset": "folder", "data_dir": str(tmp_path / "empty")},
            "no readable",
        ),
        ({"dataset": "cifar100x"}, "did you mean cifar100"),
        ({"dataset": "synthetic", "train_split": "tran"}, "has splits"),
    ]
    for flags, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            config = config_lib.from_dict(
                {"model_dir": str(tmp_path / "run"), **flags}
            )
            cli.run(validation.validate(config))


def test_folder_on_virtual_cpus_then_nan_stop_is_one_line(tmp_path):
    """A folder source with --num_virtual_cpus (the CPU must be split before
    opening the folder starts TensorFlow; conftest's split cannot hide it
    in a new process), then a NaN loss: one line naming the steps and the
    last good checkpoint, no traceback."""
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for index in range(4):
            pixels = np.full((12, 12, 3), 40 * index, np.uint8)
            Image.fromarray(pixels).save(
                tmp_path / "data" / label / f"{index}.png"
            )
    finished = _run_cli(
        f"--model_dir={tmp_path / 'run'}",
        "--dataset=folder",
        f"--data_dir={tmp_path / 'data'}",
        "--num_virtual_cpus=2",
        "--image_size=16",
        "--resnet_depth=18",
        "--width_multiplier=0.125",
        "--train_batch_size=8",
        "--train_steps=4",
        "--steps_per_loop=2",
        "--warmup_epochs=0",
        "--precision=float32",
        # Momentum SGD at lr 1e30 overflows float32 weights in one step.
        "--optimizer=momentum",
        "--learning_rate=1e30",
    )
    assert finished.returncode == 1, finished.stderr[-3000:]
    assert "2 replica(s) on 1 host(s)" in finished.stderr
    last = finished.stderr.strip().splitlines()[-1]
    assert last.startswith("simclr_tf: non-finite"), last
    # 8 images at batch 8: an epoch a step, a checkpoint a step. Step 1's
    # loss uses the initial weights; its update overflows them.
    good = str(tmp_path / "run" / "ckpt-1")
    assert "in steps 2..2;" in last and f"checkpoint is {good}." in last
    assert tf.train.latest_checkpoint(str(tmp_path / "run")) == good
    assert "Traceback" not in finished.stderr
