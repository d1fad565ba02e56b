"""Every mode with its model_dir, inputs and data on ram://, no local file.

ram:// (TensorFlow's in-memory filesystem) stands in for gs://: only
tf.io.gfile knows it, so any open(), os.makedirs or PIL save of such a path
would create a local folder named "ram:" instead. It lives inside one
process, so cli.run runs in-process, from a temporary working directory
that must stay empty. One trained run is shared by the module; the files
each mode must write are listed with tf.io.gfile.
"""

from __future__ import annotations

import os
import uuid

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import cli, export
from simclr_tf.config import loading as config_loading
from simclr_tf.config import schema as config_lib
from simclr_tf.config import validation
from simclr_tf.data.sources import folder, tfrecord
from simclr_tf.tools import make_tfrecords

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = f"ram://remote_{uuid.uuid4().hex[:8]}"
STEPS = 2
TINY = {
    "dataset": "synthetic",
    "train_split": "train",
    "eval_split": "test",
    "image_size": 16,
    "resnet_depth": 18,
    "width_multiplier": 0.125,
    "num_proj_layers": 2,
    "proj_out_dim": 16,
    "train_batch_size": 32,
    "train_steps": STEPS,
    "steps_per_loop": STEPS,
    "warmup_epochs": 0,
    "use_blur": False,
    "linear_eval_epochs": 1,
    "max_eval_examples": 64,
    "eval_baselines": False,
    "precision": "float32",
    "seed": 0,
}


def _config(model_dir: str, **values) -> config_lib.Config:
    flat = {**TINY, "model_dir": model_dir, **values}
    return validation.validate(config_lib.from_dict(flat, explicit=set(flat)))


def _listing(root: str) -> set[str]:
    """Every file below root (path below it), listed by tf.io.gfile."""
    found = set()
    for directory, _, files in tf.io.gfile.walk(root):
        below = directory.rstrip("/")[len(root) + 1 :]
        found.update(f"{below}/{name}" if below else name for name in files)
    return found


def _read(path: str) -> bytes:
    with tf.io.gfile.GFile(path, "rb") as file:
        return file.read()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A temporary working directory for the module; restored after."""
    path = tmp_path_factory.mktemp("cwd")
    previous = os.getcwd()
    os.chdir(path)
    yield path
    os.chdir(previous)


@pytest.fixture(scope="module")
def trained(workdir):
    """train_then_eval (reports, .keras, .tflite) on ram://; its result."""
    model_dir = f"{ROOT}/pretrain"
    result = cli.run(
        _config(model_dir, mode="train_then_eval", export_tflite=True)
    )
    return model_dir, result


def test_train_then_eval_writes_every_output_to_ram(trained):
    model_dir, result = trained
    files = _listing(model_dir)
    expected = {
        "checkpoint",
        f"ckpt-{STEPS}.index",
        "config.json",
        "result.json",
        "reports/confusion_matrix.png",
        "reports/embedding_map.png",
        "reports/retrieval.png",
        "reports/per_class.json",
        "reports/per_class.txt",
        "reports/projector/projector_config.pbtxt",
        "reports/projector/metadata.tsv",
        "reports/projector/sprite.png",
        *(
            f"saved_model/{STEPS}/{name}"
            for name in (
                "saved_model.pb",
                "variables/variables.index",
                export.COMPLETE_FILENAME,
                export.KERAS_FILENAME,
                export.TFLITE_FILENAME,
            )
        ),
    }
    assert expected <= files, expected - files
    prefixes = ("ckpt-2.data-", "train/events.", "eval/events.")
    for prefix in prefixes:
        assert any(name.startswith(prefix) for name in files), prefix
    # Nothing half-written or temporary is left.
    assert not [name for name in files if "tmp" in name]
    written = config_loading.saved_run_config({"model_dir": model_dir})
    assert written["train"]["train_steps"] == STEPS
    assert result["export_path"] == f"{model_dir}/saved_model/{STEPS}"


def test_exports_on_ram_agree_with_each_other(trained):
    model_dir, result = trained
    loaded = export.load_saved_model(result["export_path"])
    images = np.random.default_rng(0).random((2, 16, 16, 3), np.float32)
    served = loaded.serving_default(tf.constant(images))
    # The .keras file, read back from ram://, is an independent copy.
    model = keras.saving.load_model(result["export_keras_path"])
    expected = model(images, training=False)
    np.testing.assert_allclose(
        served["proj_head_output"],
        expected["proj_head_output"],
        atol=1e-5,  # graph vs eager float32 rounding
    )
    interpreter = tf.lite.Interpreter(
        model_content=_read(result["export_tflite_path"])
    )
    runner = interpreter.get_signature_runner(export.FLOAT_ENDPOINT)
    lite = runner(images=images)["proj_head_output"]
    # TFLite folds BN into the convolutions: another float32 rounding
    # order per layer (test_export_formats: 1e-5 with 40x headroom).
    np.testing.assert_allclose(
        lite, served["proj_head_output"], atol=1e-5, rtol=1e-5
    )


def test_eval_reads_config_json_from_ram(trained):
    model_dir, result = trained
    given = {"model_dir": model_dir, "mode": "eval"}
    saved = config_loading.saved_run_config(given)
    config = validation.validate(config_loading.over_saved_run(saved, given))
    evaluated = cli.run(config)
    written = _listing(model_dir)
    assert f"result_{STEPS}.json" in written
    assert evaluated["checkpoint"] == f"{model_dir}/ckpt-{STEPS}"
    # Same checkpoint, same test images: the kNN score (no training in
    # it) is the one train_then_eval wrote.
    assert evaluated["eval/knn/top_1"] == result["eval/knn/top_1"]


def test_export_mode_replaces_the_step_export_on_ram(trained):
    model_dir, result = trained
    images = tf.constant(
        np.random.default_rng(1).random((2, 16, 16, 3), np.float32)
    )
    first = export.load_saved_model(result["export_path"])
    before = first.serving_default(images)["final_avg_pool"].numpy()
    exported = cli.run(_config(model_dir, mode="export", export_keras=False))
    assert exported["export_path"] == result["export_path"]
    step_dir = exported["export_path"]
    assert tf.io.gfile.listdir(f"{model_dir}/saved_model") == [str(STEPS)]
    # Replaced: the .keras and .tflite files of the first export are gone.
    assert _listing(step_dir) == {
        "saved_model.pb",
        "fingerprint.pb",
        "variables/variables.index",
        "variables/variables.data-00000-of-00001",
        export.COMPLETE_FILENAME,
    }
    # From the same checkpoint, the same graph on the same CPU.
    second = export.load_saved_model(step_dir)  # owns its variables
    again = second.serving_default(images)["final_avg_pool"]
    np.testing.assert_array_equal(again, before)


def test_preview_writes_a_png_to_ram(trained):
    model_dir, _ = trained
    path = cli.run(_config(model_dir, mode="preview"))["preview_path"]
    assert path == f"{model_dir}/augmentations.png"
    picture = tf.io.decode_png(_read(path)).numpy()
    assert picture.shape[-1] == 3 and picture.std() > 0


@pytest.fixture(scope="module")
def supervised(trained):
    """lineareval from the ram:// SavedModel, finetune from the ram://
    model_dir, distill from the fine-tuned ram:// model_dir."""
    model_dir, result = trained
    runs = {}
    for name, values in (
        ("lineareval", {"checkpoint": result["export_path"]}),
        ("finetune", {"checkpoint": model_dir}),
        ("distill", {"teacher": f"{ROOT}/finetune"}),
    ):
        runs[name] = cli.run(
            _config(
                f"{ROOT}/{name}",
                mode="train",
                train_mode=name,
                eval_reports=False,
                **values,
            )
        )
    return runs


@pytest.mark.parametrize("name", ["lineareval", "finetune", "distill"])
def test_supervised_modes_read_and_write_ram(trained, supervised, name):
    files = _listing(f"{ROOT}/{name}")
    assert {"checkpoint", "config.json", f"ckpt-{STEPS}.index"} <= files
    assert supervised[name]["step"] == STEPS


def test_lineareval_starts_from_the_ram_export(trained, supervised):
    """The frozen encoder of the linear run is the pretrained one, read
    from the SavedModel on ram://: its BN statistics, which pretraining
    moved and lineareval never updates, are equal."""
    model_dir, _ = trained
    pretrained = tf.compat.v1.train.NewCheckpointReader(
        f"{model_dir}/ckpt-{STEPS}"
    )
    linear = tf.compat.v1.train.NewCheckpointReader(
        f"{ROOT}/lineareval/ckpt-{STEPS}"
    )
    statistics = [
        name
        for name in pretrained.get_variable_to_shape_map()
        if name.startswith("model/encoder/") and "moving_mean" in name
    ]
    assert statistics
    moved = 0
    for name in statistics:
        value = pretrained.get_tensor(name)
        moved += bool(np.any(value != 0))  # 0 at initialisation
        np.testing.assert_array_equal(linear.get_tensor(name), value, name)
    assert moved == len(statistics)


@pytest.fixture(scope="module")
def image_folder(workdir):
    """Two classes of 6 PNGs on ram://, written with tf.io.gfile, plus a
    text file and an empty PNG that the listing must skip."""
    root = f"{ROOT}/images"
    rng = np.random.default_rng(5)
    images = {}
    for label in ("ant", "bee"):
        tf.io.gfile.makedirs(f"{root}/{label}")
        for index in range(6):
            pixels = rng.integers(0, 256, (12, 10, 3), np.uint8)
            path = f"{root}/{label}/{index}.png"
            with tf.io.gfile.GFile(path, "wb") as file:
                file.write(tf.io.encode_png(pixels).numpy())
            images[f"{label}/{index}.png"] = pixels
    for name, data in (("ant/notes.txt", b"x"), ("bee/empty.png", b"")):
        with tf.io.gfile.GFile(f"{root}/{name}", "wb") as file:
            file.write(data)
    return root, images


def test_folder_source_on_ram_reads_every_image(image_folder):
    root, images = image_folder
    listing = folder.list_folder(root, "train")
    assert listing.class_names == ("ant", "bee")
    assert listing.skipped == {
        "unsupported_extension": (f"{root}/ant/notes.txt",),
        "empty": (f"{root}/bee/empty.png",),
    }
    source = folder.open_folder(root, "train")
    seen = {}
    paths = iter(listing.paths)
    for image, label in source.dataset().as_numpy_iterator():
        below = next(paths)[len(root) + 1 :]
        seen[below] = image
        assert label == ("ant", "bee").index(below.split("/")[0])
    assert seen.keys() == images.keys()
    for name, pixels in images.items():
        np.testing.assert_array_equal(seen[name], pixels, name)


def test_tfrecords_from_ram_to_ram_then_preview(image_folder):
    root, images = image_folder
    shards = f"{ROOT}/shards"
    entries = make_tfrecords.make_tfrecords(root, shards, num_shards=2)
    assert entries["train"]["num_examples"] == len(images)
    assert _listing(shards) == {
        "dataset_info.json",
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
    }
    source = tfrecord.open_tfrecord(shards, "train")
    decoded = sorted(
        image.tobytes() for image, _ in source.dataset().as_numpy_iterator()
    )
    assert decoded == sorted(pixels.tobytes() for pixels in images.values())
    model_dir = f"{ROOT}/shard_preview"
    path = cli.run(
        _config(
            model_dir,
            mode="preview",
            dataset="tfrecord",
            data_dir=shards,
            train_split="train",
        )
    )["preview_path"]
    assert _listing(model_dir) == {"augmentations.png"}
    assert tf.io.decode_png(_read(path)).shape[-1] == 3


def test_nothing_was_written_to_the_local_disk(
    workdir, trained, supervised, image_folder
):
    # Every test above ran from workdir: a path mistaken for a local one
    # ("ram:/..." after normalisation, open("ram://...")) would be here.
    assert os.listdir(workdir) == []
    for place in (REPOSITORY, os.path.join(REPOSITORY, "tests")):
        assert not os.path.exists(os.path.join(place, "ram:")), place
