"""Tests for simclr_tf.export: SavedModel signatures, loading, pruning.

The reference is always the live Keras model in inference mode,
`model(x, training=False)`, after a few training-mode calls so the BN moving
statistics differ from their initial values (a signature that ran BN in
training mode, or with fresh statistics, would then disagree).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import export
from simclr_tf.models import simclr

IMAGE_SHAPE = (16, 16, 1)
NUM_CLASSES = 10
OUTPUT_KEYS = {
    "final_avg_pool",
    "proj_head_input",
    "proj_head_output",
    "logits_sup",
}
# The loaded signature runs the same float32 ops as eager Keras, but as a
# graph: grappler / oneDNN may fuse conv + BN or reorder sums, which changes
# float32 rounding (~1e-7 relative per op) but nothing more.
ATOL = 1e-5
RTOL = 1e-5


class _DictModel(keras.Model):
    """A tiny conv-BN-pool-dense model returning a dict, for cheap exports."""

    def __init__(self, return_dict: bool = True) -> None:
        super().__init__(name="tiny_dict_model")
        self.return_dict = return_dict
        self.conv = keras.layers.Conv2D(2, 3)
        self.norm = keras.layers.BatchNormalization()
        self.pool = keras.layers.GlobalAveragePooling2D()

    def call(self, images, training=False):
        features = self.pool(self.norm(self.conv(images), training=training))
        return {"final_avg_pool": features} if self.return_dict else features


def _images(seed: int, batch: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, *IMAGE_SHAPE), "f4")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny SimCLRModel with moved BN statistics, exported once."""
    keras.utils.set_random_seed(1)
    model = simclr.SimCLRModel(
        resnet_depth=18,
        width_multiplier=0.125,
        cifar_stem=True,
        image_channels=IMAGE_SHAPE[-1],
        num_classes=NUM_CLASSES,
    )
    for seed in range(2):  # one call already moves the moving statistics
        model(_images(seed), training=True)
    model_dir = str(tmp_path_factory.mktemp("export") / "run")
    path = export.export_saved_model(
        model, model_dir, 7, image_shape=IMAGE_SHAPE
    )
    return model, path, export.load_saved_model(path)


def _expected(model, images: np.ndarray) -> dict[str, np.ndarray]:
    return {
        name: keras.ops.convert_to_numpy(value)
        for name, value in model(images, training=False).items()
    }


def _assert_outputs_close(actual, expected) -> None:
    assert set(actual) == set(expected) == OUTPUT_KEYS
    for name in expected:
        np.testing.assert_allclose(
            np.asarray(actual[name]),
            expected[name],
            atol=ATOL,
            rtol=RTOL,
            err_msg=name,
        )


_SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys
    import numpy as np

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "simclr_tf":
                raise ImportError("the export must load without simclr_tf")

    assert "simclr_tf" not in sys.modules
    sys.meta_path.insert(0, Block())
    import tensorflow as tf

    path, images_file, out_file = sys.argv[1:4]
    loaded = tf.saved_model.load(path)
    images = tf.constant(np.load(images_file))
    outputs = loaded.signatures["serving_default"](images=images)
    assert "simclr_tf" not in sys.modules
    np.savez(
        out_file,
        signatures=np.array(sorted(loaded.signatures)),
        **{"out_" + name: value.numpy() for name, value in outputs.items()},
    )
    """
)


@pytest.mark.compat
def test_export_loads_without_simclr_tf_and_matches_model(exported, tmp_path):
    model, path, _ = exported
    images = _images(seed=10)
    np.save(tmp_path / "images.npy", images)
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_SCRIPT, path]
        + [str(tmp_path / "images.npy"), str(tmp_path / "out.npz")],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = np.load(tmp_path / "out.npz")
    outputs = {
        key[len("out_") :]: saved[key] for key in saved if key[:4] == "out_"
    }
    _assert_outputs_close(outputs, _expected(model, images))
    assert set(saved["signatures"]) == {"serving_default", "serving_uint8"}


def test_export_uint8_signature_equals_float_signature_of_image_over_255(
    exported,
):
    _, _, loaded = exported
    images_uint8 = np.random.default_rng(11).integers(
        0, 256, (3, *IMAGE_SHAPE), dtype=np.uint8
    )
    from_uint8 = loaded.signatures["serving_uint8"](
        images=tf.constant(images_uint8)
    )
    from_float = loaded.signatures["serving_default"](
        images=tf.constant(images_uint8.astype(np.float32) / np.float32(255))
    )
    assert set(from_uint8) == OUTPUT_KEYS
    for name in OUTPUT_KEYS:
        # Grappler may rewrite the in-graph x / 255 (e.g. as x * (1 / 255)),
        # a 1-ulp input change that moves outputs by float32 rounding only.
        np.testing.assert_allclose(
            from_uint8[name], from_float[name], atol=ATOL, rtol=RTOL
        )


def test_export_tfsm_layer_matches_model(exported):
    model, path, _ = exported
    images = _images(seed=12)
    layer = keras.layers.TFSMLayer(path, call_endpoint="serving_default")
    outputs = {name: value.numpy() for name, value in layer(images).items()}
    _assert_outputs_close(outputs, _expected(model, images))
    assert len(layer.trainable_weights) == len(model.trainable_weights)


def test_export_serving_default_is_deterministic_and_size_free(exported):
    model, _, loaded = exported
    images = _images(seed=13)
    first = loaded.serving_default(tf.constant(images))
    second = loaded.serving_default(tf.constant(images))
    for name in OUTPUT_KEYS:
        np.testing.assert_array_equal(first[name], second[name])
    # H and W are free in the signature: a 20x20 batch runs like the model.
    larger = np.random.default_rng(14).random((2, 20, 20, 1), "f4")
    outputs = loaded.serving_default(tf.constant(larger))
    _assert_outputs_close(outputs, _expected(model, larger))


def test_export_signature_is_differentiable(tmp_path):
    model = _DictModel()
    model(_images(seed=0), training=True)
    path = export.export_saved_model(
        model, str(tmp_path / "run"), 1, image_shape=IMAGE_SHAPE
    )
    loaded = export.load_saved_model(path)
    images = tf.constant(_images(seed=3))
    with tf.GradientTape() as tape:
        tape.watch(images)
        features = loaded.serving_default(images)["final_avg_pool"]
        total = tf.reduce_sum(features**2)
    gradient = tape.gradient(total, images)
    # Reference: the same gradient through the live Keras model.
    with tf.GradientTape() as tape:
        tape.watch(images)
        features = model(images, training=False)["final_avg_pool"]
        total = tf.reduce_sum(features**2)
    expected = tape.gradient(total, images)
    np.testing.assert_allclose(gradient, expected, atol=ATOL, rtol=RTOL)
    assert np.linalg.norm(expected) > 0  # else the comparison proves nothing


def test_export_model_built_under_mirrored_strategy(tmp_path):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = _DictModel()
        model(_images(seed=0), training=True)
    path = export.export_saved_model(
        model, str(tmp_path / "run"), 1, image_shape=IMAGE_SHAPE
    )
    loaded = export.load_saved_model(path)
    images = _images(seed=4)
    np.testing.assert_allclose(
        loaded.serving_default(images)["final_avg_pool"],
        model(images, training=False)["final_avg_pool"],
        atol=ATOL,  # graph vs eager float32 rounding, as above
        rtol=RTOL,
    )


def test_export_keep_max_prunes_old_exports_and_temp_dirs(tmp_path):
    model = _DictModel()
    model(_images(seed=0), training=True)
    model_dir = str(tmp_path / "run")
    export_root = tmp_path / "run" / "saved_model"
    # Leftovers of a crashed export: a temporary directory and a step
    # directory whose files were being moved when it stopped.
    (export_root / "_tmp_export_crashed").mkdir(parents=True)
    (export_root / "99").mkdir()
    (export_root / "99" / "saved_model.pb").write_bytes(b"half")
    for step in (10, 30, 20):
        path = export.export_saved_model(
            model, model_dir, step, image_shape=IMAGE_SHAPE, keep_max=2
        )
        assert os.path.isfile(os.path.join(path, "saved_model.pb"))
        assert os.path.isfile(os.path.join(path, export.COMPLETE_FILENAME))
    # Newest by step plus the one just written (20) survive; the crashed
    # step 99 was never an export, so it neither counts nor stays.
    assert sorted(os.listdir(export_root)) == ["20", "30"]
    export.export_saved_model(
        model, model_dir, 40, image_shape=IMAGE_SHAPE, keep_max=1
    )
    assert os.listdir(export_root) == ["40"]


def test_export_same_step_replaces_previous_export(tmp_path):
    model = _DictModel()
    model(_images(seed=0), training=True)
    model_dir = str(tmp_path / "run")
    path = export.export_saved_model(
        model, model_dir, 5, image_shape=IMAGE_SHAPE
    )
    model(_images(seed=1) + 1.0, training=True)  # moves the BN statistics
    export.export_saved_model(model, model_dir, 5, image_shape=IMAGE_SHAPE)
    assert os.listdir(tmp_path / "run" / "saved_model") == ["5"]
    images = _images(seed=2)
    loaded = export.load_saved_model(path)  # keep it: it owns the variables
    outputs = loaded.serving_default(images)
    np.testing.assert_allclose(
        outputs["final_avg_pool"],
        model(images, training=False)["final_avg_pool"],
        atol=ATOL,  # graph vs eager float32 rounding, as above
    )


def test_export_missing_model_dir_parent_raises(tmp_path):
    model_dir = str(tmp_path / "no_such_parent" / "run")
    with pytest.raises(FileNotFoundError, match="no_such_parent"):
        export.export_saved_model(
            _DictModel(), model_dir, 1, image_shape=IMAGE_SHAPE
        )


def test_export_unwritable_model_dir_raises(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run directory should be")
    with pytest.raises(PermissionError, match="model_dir"):
        export.export_saved_model(
            _DictModel(), str(blocker), 1, image_shape=IMAGE_SHAPE
        )


def test_export_model_without_dict_output_raises(tmp_path):
    with pytest.raises(TypeError, match="dict"):
        export.export_saved_model(
            _DictModel(return_dict=False),
            str(tmp_path / "run"),
            1,
            image_shape=IMAGE_SHAPE,
        )


def test_export_failure_keeps_the_previous_export_of_the_step(
    tmp_path, monkeypatch
):
    model = _DictModel()
    model(_images(seed=0), training=True)
    model_dir = str(tmp_path / "run")
    path = export.export_saved_model(
        model, model_dir, 3, image_shape=IMAGE_SHAPE
    )
    expected = model(_images(seed=2), training=False)["final_avg_pool"]
    model(_images(seed=1) + 1.0, training=True)  # new weights, new export
    written = []

    def fail_after_write(saved_model_dir, destination):
        written.append(
            os.path.isfile(os.path.join(saved_model_dir, "saved_model.pb"))
        )
        raise RuntimeError("simulated conversion failure")

    monkeypatch.setattr(export, "export_tflite", fail_after_write)
    with pytest.raises(RuntimeError, match="simulated"):
        export.export_saved_model(
            model, model_dir, 3, image_shape=IMAGE_SHAPE, tflite=True
        )
    assert written == [True]  # it failed after the new SavedModel was written
    # The earlier export of step 3 is untouched, and no temporary remains.
    assert os.listdir(tmp_path / "run" / "saved_model") == ["3"]
    loaded = export.load_saved_model(path)
    np.testing.assert_allclose(
        loaded.serving_default(_images(seed=2))["final_avg_pool"],
        expected,
        atol=ATOL,  # graph vs eager float32 rounding, as above
    )


def test_export_crash_while_moving_leaves_no_loadable_export(
    tmp_path, monkeypatch
):
    model = _DictModel()
    model(_images(seed=0), training=True)
    model_dir = str(tmp_path / "run")
    export.export_saved_model(model, model_dir, 1, image_shape=IMAGE_SHAPE)
    real_rename = export.file_io.rename
    renamed = []

    def crash_after_two_files(source, destination):
        if len(renamed) == 2:
            raise KeyboardInterrupt("simulated crash while moving files")
        renamed.append(destination)
        real_rename(source, destination)

    monkeypatch.setattr(export.file_io, "rename", crash_after_two_files)
    with pytest.raises(KeyboardInterrupt):
        export.export_saved_model(model, model_dir, 2, image_shape=IMAGE_SHAPE)
    monkeypatch.undo()
    step_dir = tmp_path / "run" / "saved_model" / "2"
    assert len(renamed) == 2 and step_dir.is_dir()  # half moved
    # Step 2 is no export: listings skip it, loading it names the cause,
    # and step 1 (the previous export) is still the latest.
    root = str(tmp_path / "run" / "saved_model")
    assert export.list_exported_steps(root) == [1]
    with pytest.raises(FileNotFoundError, match=export.COMPLETE_FILENAME):
        export.load_saved_model(str(step_dir))
    export.load_saved_model(os.path.join(root, "1"))


@pytest.mark.parametrize(
    "arguments, match",
    [
        ({"step": -1}, "step"),
        ({"keep_max": -1}, "keep_max"),
        ({"image_shape": (16, 16)}, "image_shape"),
    ],
)
def test_export_bad_arguments_raise(tmp_path, arguments, match):
    kwargs = {"step": 1, "image_shape": IMAGE_SHAPE, "keep_max": 1}
    kwargs.update(arguments)
    with pytest.raises(ValueError, match=match):
        export.export_saved_model(_DictModel(), str(tmp_path / "run"), **kwargs)


def test_load_saved_model_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="saved_model.pb"):
        export.load_saved_model(str(tmp_path))
