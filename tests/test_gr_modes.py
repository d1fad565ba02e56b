"""Every mode on a google-research/simclr (GR) model, without encoder flags.

GR's own code (tests/gr_reference.py: a subprocess with Keras 2) builds a
ResNet-18 with the CIFAR stem, a 3-layer projection head and a 10-class
supervised head, random BN and bias values, and saves it as run.py does.
tools/import_checkpoint turns it into a model_dir; the command lines below
then name only the mode, the data (cifar10 from tfds.testing.mock_data,
never the network) and sizes that keep the runs small, and run in-process
(cli.run). The architecture comes from the imported config.json or, for
--checkpoint / --teacher naming GR's own SavedModel, from its variables.

References are GR's: its SavedModel's outputs (module(images,
trainable=False)) and its variables. Tolerances as tests/test_gr_import.py
states them: 1e-5 of the largest value for encoder features, 1e-4 for
outputs behind the projection head's batch-mean subtraction.
"""

from __future__ import annotations

import os
import socket

import gr_reference
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags

from simclr_tf import cli
from simclr_tf.config import flag_defs, validation
from simclr_tf.config import loading as config_loading
from simclr_tf.data import run_data
from simclr_tf.data.sources import registry
from simclr_tf.models import gr_import
from simclr_tf.tools import import_checkpoint
from simclr_tf.training import modes

flag_defs.define_flags()
NUM_CLASSES = 10
# Mock cifar10 split size: >= 512, GR's default --train_batch_size, which
# an imported model_dir's config.json keeps (eval and export resolve the
# run's schedule from it).
NUM_EXAMPLES = 520
# Appended to every command line: small and quick, no architecture flag.
SMALL = (
    "--dataset=cifar10",
    "--eval_split=test",
    "--train_steps=2",
    "--train_batch_size=8",
    "--steps_per_loop=1",
    "--eval_batch_size=8",
    "--max_eval_examples=32",
    "--linear_eval_epochs=2",
    "--noeval_baselines",
    "--noeval_reports",
    "--strategy=default",
    "--precision=float32",
)
FEATURES_TOLERANCE = 1e-5
HEAD_TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt raises at once (urllib3 would retry minutes)."""

    def refuse(*args, **kwargs):
        raise RuntimeError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def gr_model(tmp_path_factory):
    """(GR's Reference, the imported model_dir), built once."""
    gr_reference.require()
    work_dir = tmp_path_factory.mktemp("gr")
    images = np.random.default_rng(0).uniform(0, 1, (8, 32, 32, 3))
    reference = gr_reference.build_reference(
        str(work_dir),
        images.astype(np.float32),
        num_classes=NUM_CLASSES,
        train_steps=0,
        resnet_depth=18,
        image_size=32,
    )
    model_dir = str(tmp_path_factory.mktemp("imported"))
    import_checkpoint.import_checkpoint(reference.saved_model_dir, model_dir)
    return reference, model_dir


def _run(*arguments: str) -> tuple[object, dict[str, object]]:
    """Parses a command line as `python -m simclr_tf` does (`arguments`
    after SMALL, so they win) and runs it on mock cifar10; returns (the
    Config, cli.run's result)."""
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["simclr_tf", *SMALL, *arguments])
        config = validation.validate(config_loading.from_flags())
    finally:
        flags.FLAGS.unparse_flags()
    with _mock_cifar10():
        return config, cli.run(config)


def _mock_cifar10():
    return tfds.testing.mock_data(
        num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE
    )


def _test_images(config) -> tuple[np.ndarray, np.ndarray]:
    """The eval split's first 32 images and labels, as our eval reads them."""
    with _mock_cifar10():
        source = registry.open_source("cifar10", "test")
        batches = list(run_data.eval_input(config, source, eval_split=True))
    images = np.concatenate([np.asarray(b["image"]) for b in batches])
    labels = np.concatenate([np.asarray(b["label"]) for b in batches])
    return images, labels


def _gr_outputs(reference, images) -> dict[str, np.ndarray]:
    return gr_import.saved_model_outputs(reference.saved_model_dir, images)


def _relative(ours, reference) -> float:
    reference = np.asarray(reference)
    scale = max(1.0, float(np.max(np.abs(reference))))
    return float(np.max(np.abs(np.asarray(ours) - reference)) / scale)


def test_eval_reports_linear_knn_and_grs_own_head(gr_model):
    reference, model_dir = gr_model
    config, result = _run(
        "--mode=eval", f"--model_dir={model_dir}", "--eval_timeout_secs=0"
    )
    assert config.model.resnet_depth == 18 and config.model.cifar_stem
    # The linear protocol and kNN ran (their figures are tested in
    # tests/test_linear.py and tests/test_knn.py); the head is GR's.
    assert {"eval/top_1", "eval/knn/top_1", "eval/online/top_1"} <= set(result)
    assert result["eval/num_test"] == 32
    # GR's evaluation: its SavedModel's logits_sup on the same images.
    images, labels = _test_images(config)
    logits = _gr_outputs(reference, images)["logits_sup"]
    expected = float(np.mean(np.argmax(logits, axis=-1) == labels))
    assert result["eval/online/top_1"] == expected


def test_readme_reproduction_command_evaluates_only_grs_head(gr_model):
    """README's command for GR's published top-1: no linear classifier,
    kNN or baselines (they would read the training split), only the
    imported head, whose top-1 is that of GR's logits_sup."""
    reference, model_dir = gr_model
    config, result = _run(
        "--mode=eval",
        f"--model_dir={model_dir}",
        "--eval_timeout_secs=0",
        "--linear_eval_epochs=0",
        "--noeval_knn",
    )
    assert not [name for name in result if name.startswith("eval/top_")]
    assert not [name for name in result if "knn" in name]
    images, labels = _test_images(config)
    logits = _gr_outputs(reference, images)["logits_sup"]
    expected = float(np.mean(np.argmax(logits, axis=-1) == labels))
    assert result["eval/online/top_1"] == expected
    assert result["eval/online/num_test"] == len(labels) == 32


def test_export_writes_every_format_with_grs_outputs(gr_model):
    reference, model_dir = gr_model
    _, result = _run(
        "--mode=export", f"--model_dir={model_dir}", "--export_tflite"
    )
    export = result["export_path"]
    assert os.path.isfile(result["export_keras_path"])
    assert os.path.isfile(result["export_tflite_path"])
    images = np.random.default_rng(1).uniform(0, 1, (4, 32, 32, 3))
    images = images.astype(np.float32)
    loaded = tf.saved_model.load(export)
    ours = loaded.signatures["serving_default"](images=tf.constant(images))
    expected = _gr_outputs(reference, images)
    features = _relative(ours["final_avg_pool"], expected["final_avg_pool"])
    assert features <= FEATURES_TOLERANCE
    assert _relative(ours["logits_sup"], expected["logits_sup"]) <= (
        FEATURES_TOLERANCE
    )
    assert _relative(
        ours["proj_head_output"], expected["proj_head_output"]
    ) <= (HEAD_TOLERANCE)


def _encoder_weights(model) -> dict[str, np.ndarray]:
    return {
        v.path: v.numpy()
        for v in model.encoder.weights
        if "moving_" not in v.path
    }


def test_lineareval_from_imported_model_dir_keeps_the_encoder(
    gr_model, tmp_path
):
    reference, model_dir = gr_model
    imported = gr_import.import_model(reference.saved_model_dir)
    config, result = _run(
        "--train_mode=lineareval",
        f"--checkpoint={model_dir}",
        f"--model_dir={tmp_path}",
        "--image_size=32",
    )
    assert config.model.num_proj_layers == 3 and config.model.cifar_stem
    assert result["step"] == 2
    restored = _restore(config, tmp_path)
    for path, value in _encoder_weights(imported.model).items():
        np.testing.assert_array_equal(restored[path], value, err_msg=path)


def _restore(config, model_dir) -> dict[str, np.ndarray]:
    """The encoder weights of model_dir's latest checkpoint."""
    from simclr_tf.config import schema as config_lib
    from simclr_tf.training import train_state

    with _mock_cifar10():
        state = train_state.restore_for_eval(
            config_lib.replace(config, model_dir=str(model_dir), mode="export")
        )["state"]
    return _encoder_weights(state.model)


def test_finetune_from_grs_saved_model_imports_on_the_fly(gr_model, tmp_path):
    """--checkpoint=<GR's own SavedModel>, SimCLRv2's --ft_proj_selector=1
    and the whole encoder frozen: the encoder weights after training are
    GR's, the head reads projection layer 1."""
    reference, _ = gr_model
    imported = gr_import.import_model(reference.saved_model_dir)
    config, result = _run(
        "--train_mode=finetune",
        f"--checkpoint={reference.saved_model_dir}",
        f"--model_dir={tmp_path}",
        "--image_size=32",
        "--ft_proj_selector=1",
        "--fine_tune_after_block=4",
    )
    assert config.model.ft_proj_selector == 1
    assert result["step"] == 2
    restored = _restore(config, tmp_path)
    for path, value in _encoder_weights(imported.model).items():
        np.testing.assert_array_equal(restored[path], value, err_msg=path)


@pytest.mark.parametrize("form", ["model_dir", "saved_model"])
def test_teacher_logits_are_grs(gr_model, form):
    reference, model_dir = gr_model
    path = model_dir if form == "model_dir" else reference.saved_model_dir
    teacher = modes.load_teacher(
        path, NUM_CLASSES, 3, tf.distribute.get_strategy()
    )
    images = np.random.default_rng(2).uniform(0, 1, (4, 32, 32, 3))
    images = images.astype(np.float32)
    expected = _gr_outputs(reference, images)["logits_sup"]
    assert _relative(teacher(tf.constant(images)), expected) <= (
        FEATURES_TOLERANCE
    )


def test_distill_student_from_imported_model_dir(gr_model, tmp_path):
    _, model_dir = gr_model
    config, result = _run(
        "--train_mode=distill",
        f"--teacher={model_dir}",
        f"--checkpoint={model_dir}",
        f"--model_dir={tmp_path}",
        "--image_size=32",
    )
    assert config.model.resnet_depth == 18 and config.model.cifar_stem
    assert result["step"] == 2
    assert np.isfinite(result["train/distill_loss"])


def test_checkpoint_flags_given_win_over_the_checkpoint(gr_model, tmp_path):
    """An explicit architecture flag is kept, and a mismatch is an error
    that names GR's architecture and the fix."""
    reference, _ = gr_model
    with pytest.raises(ValueError, match=r"GR ResNet-18 1x.*encoder flags"):
        _run(
            "--train_mode=finetune",
            f"--checkpoint={reference.saved_model_dir}",
            f"--model_dir={tmp_path}",
            "--image_size=32",
            "--resnet_depth=34",
        )
