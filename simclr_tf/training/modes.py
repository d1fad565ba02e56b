"""What the supervised train modes add to pretraining's model and loop.

`--train_mode=finetune | lineareval | distill` train one SimCLRModel in
"finetune" mode (a supervised head on hiddens[ft_proj_selector]) on
crop + flip views with labels. They differ in what learns (`freeze`), where
the weights start (`initialize_from`: a pretraining checkpoint, model_dir
or SavedModel) and the loss (distillation from `load_teacher`'s logits).
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf
from absl import logging

from simclr_tf import file_io
from simclr_tf.config import schema as config_lib
from simclr_tf.models import gr_checkpoint, gr_import, simclr
from simclr_tf.training import builders

ENCODER_BLOCK_GROUPS = 4


def freeze(
    model: simclr.SimCLRModel, train_mode: str, fine_tune_after_block: int
) -> list[str]:
    """Keeps the weights that must not learn away from the optimizer.

    lineareval (v1 App. B.6): the encoder and the projection head are
    frozen as layers: no gradient, and their BN runs in inference mode
    (moving statistics used, never updated), so every encoder weight and
    statistic stays as loaded.

    finetune and distill, as google-research/simclr's run.py: with
    fine_tune_after_block = k >= 0 the weights of the stem and of block
    groups 1..k (-1: none; 4: the whole encoder) are not trainable (no
    gradient, no weight decay), but their layers still run in training
    mode: BN normalises with the batch's statistics and updates its moving
    averages. GR builds those blocks with trainable=False, which Keras 2
    does not pass down to the BN layers inside them, so its frozen BN
    trains this way (checked against GR's step in tests/test_gr_step.py).
    The projection-head layers past ft_proj_selector stay trainable, as in
    GR: the loss does not reach them, so only an L2 term (momentum, Adam)
    moves their kernels, and their BN statistics follow the batches.

    Args:
      model: a built SimCLRModel with a supervised head.
      train_mode: "finetune", "lineareval" or "distill".
      fine_tune_after_block: -1..4.

    Returns:
      Names of the layers frozen here.
    """
    if train_mode == "lineareval":
        model.encoder.trainable = False
        model.projection_head.trainable = False
        return [model.encoder.name, model.projection_head.name]
    prefixes = ["initial_"] if fine_tune_after_block >= 0 else []
    prefixes += [
        f"block_group{group}_"
        for group in range(
            1, min(fine_tune_after_block, ENCODER_BLOCK_GROUPS) + 1
        )
    ]
    frozen = []
    for layer in model.encoder.layers:
        if layer.weights and layer.name.startswith(tuple(prefixes)):
            # The variables, not the layer: a non-trainable layer's BN
            # would switch to inference mode.
            for variable in layer.trainable_weights:
                variable.trainable = False
            frozen.append(layer.name)
    return frozen


def initialize_from(model: simclr.SimCLRModel, path: str) -> str:
    """Loads a pretrained encoder and projection head (GR's --checkpoint).

    The supervised head keeps its fresh initialisation (zeros with
    --zero_init_logits_layer), as the linear and fine-tuning protocols ask.

    Args:
      model: a built SimCLRModel.
      path: a SavedModel export (a directory with saved_model.pb), a
        model_dir (its latest checkpoint) or a checkpoint prefix, of
        simclr_tf or of google-research/simclr (its released SavedModels,
        run.py's model_dir or checkpoints: imported on the fly).

    Returns:
      The checkpoint or export actually read, for the log.

    Raises:
      FileNotFoundError: nothing to read at path.
      ValueError: what path holds does not fit the model's architecture.
    """
    if gr_checkpoint.is_gr_model(path):
        try:
            return gr_import.load_into(model, path)
        except ValueError as error:
            raise ValueError(
                f"--checkpoint={path}: {error}. Leave the encoder flags "
                f"unset (they are read from it) or set them to its values."
            ) from error
    if file_io.exists(file_io.join(path, "saved_model.pb")):
        _copy_from_saved_model(model, path)
        return path
    prefix = _checkpoint_prefix(path, "--checkpoint")
    parts = tf.train.Checkpoint(
        encoder=model.encoder, projection_head=model.projection_head
    )
    try:
        status = tf.train.Checkpoint(model=parts).read(prefix)
        status.assert_existing_objects_matched().expect_partial()
    except (AssertionError, ValueError) as error:
        raise ValueError(
            f"--checkpoint={path} ({prefix}) does not fit this model: "
            f"{str(error)[:300]}. Pass the encoder flags of the pretraining "
            f"run (--resnet_depth, --width_multiplier, --sk_ratio, "
            f"--num_proj_layers, ...; see its config.json)."
        ) from error
    return prefix


def _checkpoint_prefix(path: str, flag: str) -> str:
    """A checkpoint prefix from a prefix or a directory of checkpoints."""
    if file_io.isdir(path):
        prefix = tf.train.latest_checkpoint(path)
        if prefix is None:
            raise FileNotFoundError(
                f"{flag}={path} is a directory without checkpoints or "
                f"saved_model.pb; pass a pretraining model_dir, a "
                f"checkpoint prefix (model_dir/ckpt-N) or a SavedModel "
                f"export (model_dir/saved_model/N)."
            )
        return prefix
    if not file_io.exists(path + ".index"):
        raise FileNotFoundError(
            f"{flag}={path}: no such checkpoint ({path}.index is missing); "
            f"pass a model_dir, a checkpoint prefix or a SavedModel export."
        )
    return path


def _copy_from_saved_model(model: simclr.SimCLRModel, path: str) -> None:
    """Copies an exported SimCLRModel's encoder and head weights.

    An export tracks the model's variables in the model's own order:
    encoder, projection head, then the supervised head (if any).
    """
    loaded = tf.saved_model.load(path)
    targets = model.encoder.variables + model.projection_head.variables
    exported = list(loaded.variables)[: len(targets)]
    for target, source in zip(targets, exported, strict=False):
        source_name = source.name.split(":")[0].rsplit("/", 1)[-1]
        if len(exported) < len(targets) or (
            tuple(target.shape) != tuple(source.shape)
            or not target.path.endswith(source_name)
        ):
            raise ValueError(
                f"--checkpoint={path}: the exported model does not fit "
                f"this one ({source.name} {tuple(source.shape)} vs "
                f"{target.path} {tuple(target.shape)}). Pass the encoder "
                f"flags of the run that exported it."
            )
        target.assign(source)


def load_teacher(
    path: str,
    num_classes: int,
    image_channels: int,
    strategy: tf.distribute.Strategy,
) -> Callable[[tf.Tensor], tf.Tensor]:
    """The distillation teacher as images -> logits, BN in inference mode.

    Args:
      path: a SavedModel export with a "logits_sup" output, the model_dir
        (or a checkpoint in it) of a fine-tuned run, whose config.json
        gives the architecture, or a google-research/simclr model with a
        supervised head (imported).
      num_classes: classes of the student's head; the teacher must match.
      image_channels: C of the images.
      strategy: the run's strategy (the teacher's variables live in it).

    Returns:
      teacher(images [b, H, W, C] float32 in [0, 1]) -> [b, C] float32.

    Raises:
      FileNotFoundError, ValueError: no usable teacher at path.
    """
    with strategy.scope():
        if gr_checkpoint.is_gr_model(path):
            teacher = gr_import.import_model(path).model
            outputs = teacher(tf.zeros((1, 8, 8, image_channels)))
            _check_teacher_classes(path, outputs.get("logits_sup"), num_classes)
            return lambda images: teacher(images, training=False)["logits_sup"]
        if file_io.exists(file_io.join(path, "saved_model.pb")):
            loaded = tf.saved_model.load(path)
            logits = loaded.serving_default(
                tf.zeros((1, 8, 8, image_channels), tf.float32)
            ).get("logits_sup")
            _check_teacher_classes(path, logits, num_classes)
            return lambda images: loaded.serving_default(images)["logits_sup"]
        teacher = _teacher_from_checkpoint(path, num_classes, image_channels)
    return lambda images: teacher(images, training=False)["logits_sup"]


def _teacher_from_checkpoint(
    path: str, num_classes: int, image_channels: int
) -> simclr.SimCLRModel:
    prefix = _checkpoint_prefix(path, "--teacher")
    config_path = file_io.join(file_io.dirname(prefix), "config.json")
    if not file_io.exists(config_path):
        raise FileNotFoundError(
            f"--teacher={path}: {config_path} is missing, so the teacher's "
            f"architecture is unknown; pass its SavedModel export "
            f"(model_dir/saved_model/N) instead."
        )
    teacher_config = config_lib.from_nested_dict(file_io.read_json(config_path))
    teacher = builders.build_model(teacher_config, num_classes, image_channels)
    teacher(tf.zeros((1, 8, 8, image_channels)))
    try:
        tf.train.Checkpoint(model=teacher).read(
            prefix
        ).assert_existing_objects_matched()
    except (AssertionError, ValueError) as error:
        raise ValueError(
            f"--teacher={path} ({prefix}) is not a fine-tuned model with a "
            f"{num_classes}-class head: {str(error)[:300]}."
        ) from error
    logging.info("teacher: %s", prefix)
    return teacher


def _check_teacher_classes(
    path: str, logits: tf.Tensor | None, num_classes: int
) -> None:
    if logits is None or int(logits.shape[-1]) != num_classes:
        found = "no logits_sup" if logits is None else logits.shape[-1]
        raise ValueError(
            f"--teacher={path} has {found} output classes; the student's "
            f"dataset has {num_classes}. Use a teacher fine-tuned on the "
            f"same dataset."
        )
