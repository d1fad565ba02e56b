"""Tests for the fine-tunable endpoint and the .keras / .tflite exports.

One tiny SimCLRModel (ResNet-18, width 0.125, 16x16x3) is exported once with
every format. References: the live Keras model (its gradients and BN updates
in training mode, its outputs in inference mode) and the SavedModel itself.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import export
from simclr_tf.models import simclr

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
IMAGE_SHAPE = (16, 16, 3)
BATCH = 4


def _images(seed: int, batch: int = BATCH) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, *IMAGE_SHAPE), "f4")


def _loss_weights(model) -> dict[str, np.ndarray]:
    """Random per-sample weights for a loss sum(w * output).

    A batch mean of a training-mode BN output is exactly beta, so a plain
    mean loss would give zero gradients to everything below the last BN;
    random per-sample weights break that invariance.
    """
    rng = np.random.default_rng(99)
    outputs = model(_images(0), training=False)
    return {
        name: rng.standard_normal(outputs[name].shape).astype("f4")
        for name in ("proj_head_output", "logits_sup")
    }


def _reference_step(model, images, weights) -> dict[str, list[np.ndarray]]:
    """Gradients and new BN statistics of one training-mode call.

    Restores every variable afterwards, so the model keeps the exported
    state.
    """
    saved = [variable.numpy() for variable in model.variables]
    with tf.GradientTape() as tape:
        outputs = model(images, training=True)
        loss = sum(tf.reduce_sum(outputs[k] * w) for k, w in weights.items())
    gradients = tape.gradient(loss, model.trainable_variables)
    result = {
        "gradients": [gradient.numpy() for gradient in gradients],
        "moving": [v.numpy() for v in model.non_trainable_variables],
    }
    for variable, value in zip(model.variables, saved, strict=True):
        variable.assign(value)
    return result


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The model (BN statistics moved), its export paths and references."""
    keras.utils.set_random_seed(1)
    model = simclr.SimCLRModel(
        resnet_depth=18,
        width_multiplier=0.125,
        cifar_stem=True,
        image_channels=IMAGE_SHAPE[-1],
        num_classes=10,
    )
    for seed in range(2):
        model(_images(seed), training=True)
    # As after pretraining: no zero gammas. The zero-initialised last BN of
    # each residual block would otherwise block every gradient to its branch.
    rng = np.random.default_rng(5)
    for variable in model.trainable_variables:
        if variable.path.endswith("gamma"):
            variable.assign(rng.uniform(0.5, 1.5, variable.shape))
    model_dir = str(tmp_path_factory.mktemp("formats") / "run")
    paths = export.export_all(
        model, model_dir, 3, image_shape=IMAGE_SHAPE, tflite=True
    )
    weights = _loss_weights(model)
    reference = _reference_step(model, _images(20), weights)
    return model, paths, weights, reference


def test_export_all_writes_every_format_in_the_step_directory(exported):
    _, paths, _, _ = exported
    step_dir = paths["saved_model"]
    assert paths == {
        "saved_model": step_dir,
        "keras": os.path.join(step_dir, export.KERAS_FILENAME),
        "tflite": os.path.join(step_dir, export.TFLITE_FILENAME),
    }
    assert os.path.basename(step_dir) == "3"
    assert os.path.isfile(paths["keras"]) and os.path.isfile(paths["tflite"])
    loaded = export.load_saved_model(step_dir)
    # trainable_call is a function of the loaded object, never a signature.
    assert set(loaded.signatures) == {"serving_default", "serving_uint8"}
    assert callable(loaded.trainable_call)


_FINE_TUNE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, os, sys
    import numpy as np

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "simclr_tf":
                raise ImportError("the export must load without simclr_tf")

    path, repository, inputs_file, out_file = sys.argv[1:5]
    assert not any(
        os.path.realpath(entry or ".") == repository for entry in sys.path
    ), sys.path
    sys.meta_path.insert(0, Block())
    import tensorflow as tf

    inputs = np.load(inputs_file)
    images = tf.constant(inputs["images"])
    weights = {k[2:]: inputs[k] for k in inputs if k.startswith("w_")}
    loaded = tf.saved_model.load(path)
    variables = loaded.trainable_variables
    moving_before = [v.numpy() for v in loaded.non_trainable_variables]

    def loss_of(outputs):
        return sum(tf.reduce_sum(outputs[k] * w) for k, w in weights.items())

    with tf.GradientTape() as tape:
        loss_before = loss_of(loaded.trainable_call(images))
    gradients = tape.gradient(loss_before, variables)
    moving_after = [v.numpy() for v in loaded.non_trainable_variables]
    serving_before = loaded.serving_default(images)["final_avg_pool"]
    # One SGD step sized to cut the loss by ~10% to first order.
    norm = tf.linalg.global_norm(gradients)
    learning_rate = 0.1 * abs(float(loss_before)) / float(norm) ** 2
    for variable, gradient in zip(variables, gradients):
        variable.assign_sub(learning_rate * gradient)
    serving_after = loaded.serving_default(images)["final_avg_pool"]
    loss_after = loss_of(loaded.trainable_call(images))
    assert "simclr_tf" not in sys.modules
    np.savez(
        out_file,
        loss=np.array([float(loss_before), float(loss_after)]),
        serving_change=np.abs(serving_after - serving_before).max()
        / np.abs(serving_before).max(),
        **{f"g_{i}": g.numpy() for i, g in enumerate(gradients)},
        **{f"before_{i}": v for i, v in enumerate(moving_before)},
        **{f"after_{i}": v for i, v in enumerate(moving_after)},
    )
    """
)


@pytest.fixture(scope="module")
def fine_tuned(exported, tmp_path_factory) -> dict:
    """Results of _FINE_TUNE_SCRIPT, run once in a fresh interpreter."""
    _, paths, weights, _ = exported
    tmp_path = tmp_path_factory.mktemp("fine_tune")
    np.savez(
        tmp_path / "inputs.npz",
        images=_images(20),
        **{f"w_{name}": value for name, value in weights.items()},
    )
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", _FINE_TUNE_SCRIPT, paths["saved_model"]]
        + [str(REPOSITORY)]
        + [str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(tmp_path / "out.npz"))


def test_trainable_call_fine_tunes_without_simclr_tf(exported, fine_tuned):
    model, _, _, reference = exported
    saved = fine_tuned
    expected = reference["gradients"]
    assert len(expected) == len(model.trainable_variables)
    for index, gradient in enumerate(expected):
        actual = saved[f"g_{index}"]
        assert np.all(np.isfinite(actual))
        # Same TF kernels in graph and eager (observed: bitwise equal), but
        # grappler may fuse or reorder float32 sums; 1e-5 of the gradient's
        # scale is ~100 ulps, far below a wrong or missing term.
        scale = np.abs(gradient).max()
        np.testing.assert_allclose(
            actual, gradient, atol=1e-5 * scale, rtol=1e-4, err_msg=str(index)
        )
    # Every trainable variable receives a gradient (none is cut off).
    assert all(np.abs(gradient).max() > 0 for gradient in expected)
    # The step was sized for a 10% first-order decrease; at least half of
    # it must show, else the update did not act through the endpoint.
    loss_before, loss_after = saved["loss"]
    assert loss_after < loss_before - 0.05 * abs(loss_before)
    # The SavedModel is deterministic, so any change comes from the update;
    # 1e-5 relative is ~100 float32 ulps (observed ~2e-4).
    assert saved["serving_change"] > 1e-5


def test_trainable_call_updates_bn_moving_statistics(exported, fine_tuned):
    model, _, _, reference = exported
    saved = fine_tuned
    exported_values = [v.numpy() for v in model.non_trainable_variables]
    for index, expected in enumerate(reference["moving"]):
        np.testing.assert_array_equal(
            saved[f"before_{index}"], exported_values[index]
        )
        # The update is momentum * old + (1 - momentum) * batch statistic,
        # computed from graph-mode activations: float32 rounding only.
        np.testing.assert_allclose(
            saved[f"after_{index}"], expected, atol=1e-5, rtol=1e-4
        )
    changed = [
        not np.array_equal(saved[f"after_{i}"], saved[f"before_{i}"])
        for i in range(len(exported_values))
    ]
    assert all(changed)  # every BN moved: mean and variance of each layer


def test_export_keras_file_round_trips(exported):
    model, paths, _, _ = exported
    restored = keras.saving.load_model(paths["keras"])
    assert isinstance(restored, simclr.SimCLRModel)
    for original, loaded in zip(model.weights, restored.weights, strict=True):
        np.testing.assert_array_equal(loaded.numpy(), original.numpy())
    images = _images(30)
    expected = model(images, training=False)
    outputs = restored(images, training=False)
    assert set(outputs) == set(expected)
    for name in expected:
        # Same eager ops on identical weights; 1e-6 allows for oneDNN
        # choosing a different blocked kernel for the fresh layers.
        np.testing.assert_allclose(
            outputs[name], expected[name], atol=1e-6, err_msg=name
        )


def test_export_tflite_matches_saved_model(exported):
    _, paths, _, _ = exported
    loaded = export.load_saved_model(paths["saved_model"])
    images = _images(31)
    expected = loaded.serving_default(tf.constant(images))
    interpreter = tf.lite.Interpreter(model_path=paths["tflite"])
    runner = interpreter.get_signature_runner("serving_default")
    outputs = runner(images=images)
    assert set(outputs) == set(expected)
    for name in expected:
        # TFLite folds inference BN into the conv kernels and runs its own
        # (XNNPACK) float32 kernels: another summation order per layer.
        # Observed max error 2.4e-7 on final_avg_pool (values up to 0.4);
        # 1e-5 leaves 40x headroom for other CPUs' kernels.
        np.testing.assert_allclose(
            outputs[name], expected[name], atol=1e-5, rtol=1e-5, err_msg=name
        )


def test_export_keras_path_without_suffix_raises(exported, tmp_path):
    model, _, _, _ = exported
    with pytest.raises(ValueError, match="keras"):
        export.export_keras(model, str(tmp_path / "model.h5"))


def test_export_tflite_missing_saved_model_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="saved_model.pb"):
        export.export_tflite(str(tmp_path), str(tmp_path / "m.tflite"))
