"""SavedModel export of a trained model, and a thin loader for our own tests.

Writes `<model_dir>/saved_model/<step>/` with two inference-mode signatures,
a training-mode function for fine-tuning, and optionally `model.keras` and
`model.tflite` beside them. The SavedModel loads without simclr_tf.
Training and checkpoints live in training/; this module writes and prunes.
Every path goes through file_io, so model_dir may be on gs:// (or ram://).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import keras
import tensorflow as tf

from simclr_tf import file_io

EXPORT_SUBDIR = "saved_model"
FLOAT_ENDPOINT = "serving_default"
UINT8_ENDPOINT = "serving_uint8"
TRAINABLE_ENDPOINT = "trainable_call"
KERAS_FILENAME = "model.keras"
TFLITE_FILENAME = "model.tflite"
# Written last into a step directory: only a directory holding it is an
# export (object stores and ram:// have no atomic directory rename).
COMPLETE_FILENAME = "export_complete.json"
_TEMP_PREFIX = "_tmp_export_"


def export_saved_model(
    model: keras.Model,
    model_dir: str,
    step: int,
    *,
    image_shape: tuple[int, int, int],
    keep_max: int = 1,
    keras_file: bool = False,
    tflite: bool = False,
) -> str:
    """Exports `model` as a SavedModel to `<model_dir>/saved_model/<step>/`.

    The export is written to a temporary sibling directory first, so a
    failure while writing or converting leaves every previous export as it
    was. Then its files are moved into `<step>/` (replacing an export of the
    same step) and `export_complete.json` is written last: a directory
    without it is a crashed export, which loaders skip and the next export
    deletes. This works where directories cannot be renamed atomically
    (gs://) or at all (ram://). Then only the newest `keep_max` exports are
    kept (GR's `keep_hub_module_max`), always including the one just
    written.

    Signatures (both also callable as attributes of the loaded object):
      * `serving_default(images)`: images [B, H, W, C] float32 in [0, 1].
      * `serving_uint8(images)`: images [B, H, W, C] uint8 in [0, 255];
        returns exactly what `serving_default(images / 255)` returns.
    Both return `model(images, training=False)`: a dict of named outputs
    (e.g. final_avg_pool, proj_head_output, logits_sup), floating outputs
    cast to float32 so consumers see one dtype under mixed precision.

    For fine-tuning (GR issues #108, #193), the loaded object also has
    `trainable_call(images)`, float images as above, returning the same
    dict from `model(images, training=True)`: BN normalises with batch
    statistics and updates its moving statistics on every call. It is
    differentiable w.r.t. `loaded.trainable_variables`, which can be
    updated in place (e.g. `variable.assign_sub(lr * gradient)`). It is
    deliberately not a signature, so TF-Serving never runs training mode.

    With `keras_file`, the step directory also holds `model.keras`
    (`export_keras`; loading it needs simclr_tf imported). With `tflite`,
    it holds `model.tflite`, the float32 `serving_default` converted by
    `export_tflite`. Both are written before the move and pruned with it.

    Args:
      model: a Keras model whose call(images, training=False) returns a dict
        of tensors.
      model_dir: the run directory; created if missing, but its parent must
        exist.
      step: global step (>= 0), the export's directory name.
      image_shape: (H, W, C) of one training image; C fixes the signatures'
        channel count, and an unbuilt model is built on this shape. H and W
        stay free in the signatures.
      keep_max: how many exports to keep; 0 keeps all (as in GR).
      keras_file: also write `<step>/model.keras`.
      tflite: also write `<step>/model.tflite`.

    Returns:
      The path of the export directory.

    Raises:
      ValueError: bad `step`, `keep_max` or `image_shape`.
      TypeError: the model does not return a dict of tensors.
      FileNotFoundError: the parent of `model_dir` does not exist.
      PermissionError: the export directory cannot be written.
    """
    _check_arguments(step, image_shape, keep_max)
    export_root = _make_export_root(model_dir)
    _build_if_needed(model, image_shape)
    archive = _make_archive(model, channels=image_shape[-1])
    final_path = file_io.join(export_root, str(step))
    temp_path = file_io.join(export_root, f"{_TEMP_PREFIX}{uuid.uuid4().hex}")
    try:
        archive.write_out(temp_path, verbose=False)
        if keras_file:
            export_keras(model, file_io.join(temp_path, KERAS_FILENAME))
        if tflite:
            export_tflite(temp_path, file_io.join(temp_path, TFLITE_FILENAME))
        _publish(temp_path, final_path, step)
    finally:
        file_io.rmtree(temp_path)
    _prune_exports(export_root, keep_max, keep_step=step)
    return final_path


def export_all(
    model: keras.Model,
    model_dir: str,
    step: int,
    *,
    image_shape: tuple[int, int, int],
    keep_max: int = 1,
    keras_file: bool = True,
    tflite: bool = False,
) -> dict[str, str]:
    """Exports the SavedModel and, as asked, `.keras` and `.tflite` files.

    Args:
      model, model_dir, step, image_shape, keep_max, keras_file, tflite:
        as in `export_saved_model` (here `keras_file` defaults to True).

    Returns:
      {"saved_model": <step dir>} plus "keras" and "tflite" file paths for
      the files written, all under `<model_dir>/saved_model/<step>/`.

    Raises:
      As `export_saved_model`.
    """
    path = export_saved_model(
        model,
        model_dir,
        step,
        image_shape=image_shape,
        keep_max=keep_max,
        keras_file=keras_file,
        tflite=tflite,
    )
    paths = {"saved_model": path}
    if keras_file:
        paths["keras"] = file_io.join(path, KERAS_FILENAME)
    if tflite:
        paths["tflite"] = file_io.join(path, TFLITE_FILENAME)
    return paths


def export_keras(model: keras.Model, path: str) -> str:
    """Saves `model` (config + weights) as a `.keras` file.

    `keras.saving.load_model(path)` rebuilds it; our layers are registered
    Keras-serializable, so `import simclr_tf.models` must run first.

    Args:
      model: a built Keras model whose layers implement get_config.
      path: the file to write; must end in ".keras".

    Returns:
      `path`.

    Raises:
      ValueError: `path` does not end in ".keras".
    """
    if not str(path).endswith(".keras"):
        raise ValueError(
            f"path={path!r} must end in '.keras' (Keras's zip format), "
            f"e.g. <dir>/{KERAS_FILENAME}."
        )
    keras.saving.save_model(model, path)
    return path


def export_tflite(saved_model_dir: str, path: str) -> str:
    """Converts an export's float `serving_default` signature to TFLite.

    Float32, no quantisation, builtin ops only (inference-mode BN folds
    into the convolutions). H and W stay dynamic (-1): resize the input
    with `Interpreter.resize_tensor_input` before `allocate_tensors`.

    Args:
      saved_model_dir: a directory written by `export_saved_model`.
      path: the `.tflite` file to write.

    Returns:
      `path`.

    Raises:
      FileNotFoundError: `saved_model_dir` holds no saved_model.pb.
    """
    if not file_io.exists(file_io.join(saved_model_dir, "saved_model.pb")):
        raise FileNotFoundError(
            f"saved_model_dir={saved_model_dir!r} holds no saved_model.pb; "
            "pass a directory written by export_saved_model."
        )
    converter = tf.lite.TFLiteConverter.from_saved_model(
        saved_model_dir, signature_keys=[FLOAT_ENDPOINT]
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return file_io.write_bytes(path, converter.convert())


def load_saved_model(path: str) -> object:
    """Loads an export written by `export_saved_model`.

    Args:
      path: an export directory, `<model_dir>/saved_model/<step>`.

    Returns:
      The object from `tf.saved_model.load`, with `.signatures` and the
      `serving_default` / `serving_uint8` functions.

    Raises:
      FileNotFoundError: `path` holds no saved_model.pb, or no
        export_complete.json (an export that crashed while being moved).
    """
    if not file_io.exists(file_io.join(path, "saved_model.pb")):
        raise FileNotFoundError(
            f"path={path!r} holds no saved_model.pb; pass a directory "
            f"written by export_saved_model, e.g. <model_dir>/"
            f"{EXPORT_SUBDIR}/<step>."
        )
    if not is_complete(path):
        raise FileNotFoundError(
            f"path={path!r} holds no {COMPLETE_FILENAME}: its export did "
            f"not finish; run --mode=export again, or pass another step."
        )
    return tf.saved_model.load(path)


def is_complete(path: str) -> bool:
    """Whether an export directory was completely written."""
    return file_io.exists(file_io.join(path, COMPLETE_FILENAME))


def list_exported_steps(export_root: str) -> list[int]:
    """Steps of the complete exports under `export_root`, ascending.

    Args:
      export_root: the `<model_dir>/saved_model` directory.

    Returns:
      Sorted steps; temporary and incomplete directories are not listed.
    """
    return [
        int(name)
        for name in _step_names(export_root)
        if is_complete(file_io.join(export_root, name))
    ]


def _step_names(export_root: str) -> list[str]:
    """Names of the step directories (complete or not), by step."""
    if not file_io.isdir(export_root):
        return []
    names = [name for name in file_io.listdir(export_root) if name.isdigit()]
    return sorted(names, key=int)


def _check_arguments(
    step: int, image_shape: tuple[int, int, int], keep_max: int
) -> None:
    """Raises ValueError for arguments that cannot give a valid export."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(
            f"step={step!r} must be an int >= 0 (the export's directory "
            "name); pass the optimizer's iteration count."
        )
    if (
        len(image_shape) != 3
        or not all(isinstance(size, int) for size in image_shape)
        or min(image_shape) < 1
    ):
        raise ValueError(
            f"image_shape={image_shape!r} must be (height, width, channels) "
            "of positive ints, e.g. (32, 32, 3)."
        )
    if isinstance(keep_max, bool) or not isinstance(keep_max, int):
        raise ValueError(f"keep_max={keep_max!r} must be an int >= 0.")
    if keep_max < 0:
        raise ValueError(
            f"keep_max={keep_max} must be >= 0; use 0 to keep every export."
        )


def _make_export_root(model_dir: str) -> str:
    """Creates `<model_dir>/saved_model` and returns it; checks the parent.

    The parent is checked on local disks only (a typo there would create
    a new tree); gs:// and ram:// have no directories to check.
    """
    model_dir = str(model_dir)
    parent = file_io.dirname(model_dir)
    if (
        not file_io.is_remote(model_dir)
        and parent
        and not file_io.isdir(parent)
    ):
        raise FileNotFoundError(
            f"model_dir={model_dir!r}: its parent directory {parent!r} does "
            "not exist; create it first or fix the path."
        )
    export_root = file_io.join(model_dir, EXPORT_SUBDIR)
    try:
        file_io.makedirs(export_root)
    except (tf.errors.OpError, OSError) as error:
        raise PermissionError(
            f"model_dir={model_dir!r}: cannot create {export_root!r} "
            f"({error}); choose a writable directory."
        ) from error
    if not file_io.isdir(export_root):
        raise PermissionError(
            f"model_dir={model_dir!r}: {export_root!r} is not a directory; "
            "remove it or choose another model_dir."
        )
    return export_root


def _build_if_needed(model: keras.Model, image_shape: tuple) -> None:
    """Creates an unbuilt model's variables, without touching BN statistics."""
    if not model.built:
        model(tf.zeros((1, *image_shape), tf.float32), training=False)


def _serving_outputs(
    model: keras.Model, images: tf.Tensor, training: bool = False
) -> dict:
    """Runs the model (by default in inference mode); floats become float32."""
    outputs = model(images, training=training)
    if not isinstance(outputs, Mapping):
        raise TypeError(
            f"model returned {type(outputs).__name__}; export needs a model "
            "whose call returns a dict of named tensors "
            "(e.g. {'proj_head_output': ...})."
        )
    return {
        name: tf.cast(value, tf.float32) if value.dtype.is_floating else value
        for name, value in outputs.items()
    }


def _images_spec(channels: int, dtype: tf.DType) -> tf.TensorSpec:
    """The exported functions' argument: images [B, H, W, channels], any
    batch and side."""
    return tf.TensorSpec([None, None, None, channels], dtype, "images")


def _make_archive(
    model: keras.Model, channels: int
) -> keras.export.ExportArchive:
    """An ExportArchive tracking `model`, with the float and uint8 endpoints."""
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve_float(images: tf.Tensor) -> dict:
        return _serving_outputs(model, images)

    float_function = archive.add_endpoint(
        FLOAT_ENDPOINT,
        serve_float,
        input_signature=[_images_spec(channels, tf.float32)],
    )

    # The uint8 endpoint calls the float one: the model's inference graph
    # is traced for the float endpoint only, and serving_uint8(x) is that
    # graph on x / 255.
    def serve_uint8(images: tf.Tensor) -> dict:
        return float_function(tf.cast(images, tf.float32) / 255.0)

    archive.add_endpoint(
        UINT8_ENDPOINT,
        serve_uint8,
        input_signature=[_images_spec(channels, tf.uint8)],
    )
    _add_trainable_function(archive, model, channels)
    return archive


def _add_trainable_function(
    archive: keras.export.ExportArchive, model: keras.Model, channels: int
) -> None:
    """Saves `trainable_call` (training=True) as a function, not a signature.

    `add_endpoint` would make it a serving signature (Keras exports every
    endpoint as one), and a server must never update BN statistics. So the
    function goes on the archive's saved root object directly; its variables
    are the model's, already tracked by `archive.track(model)`.
    """

    def trainable_call(images: tf.Tensor) -> dict:
        return _serving_outputs(model, images, training=True)

    function = tf.function(
        trainable_call,
        input_signature=[_images_spec(channels, tf.float32)],
        autograph=False,
    )
    # Keras 3.15 saves `archive._tf_trackable` as the SavedModel root.
    setattr(archive._tf_trackable, TRAINABLE_ENDPOINT, function)


def _publish(source: str, destination: str, step: int) -> None:
    """Moves a written export into `destination`, then marks it complete.

    File by file (gs:// copies each object; ram:// renames no directories);
    an export of the same step already there is deleted first.
    """
    file_io.rmtree(destination)
    moved = file_io.move_tree(source, destination)
    file_io.write_json(
        file_io.join(destination, COMPLETE_FILENAME),
        {"step": step, "files": moved},
    )


def _prune_exports(export_root: str, keep_max: int, keep_step: int) -> None:
    """Deletes all but the newest `keep_max` exports, keeping `keep_step`,
    and every leftover of a crashed export (temporary or incomplete)."""
    for name in file_io.listdir(export_root):
        path = file_io.join(export_root, name)
        if name.startswith(_TEMP_PREFIX) or (
            name.isdigit() and not is_complete(path)
        ):
            file_io.rmtree(path)
    if keep_max == 0:
        return
    others = list_exported_steps(export_root)
    others.remove(keep_step)
    for step in others[: max(0, len(others) - (keep_max - 1))]:
        file_io.rmtree(file_io.join(export_root, str(step)))
