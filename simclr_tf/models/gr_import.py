"""Loads google-research/simclr (GR) TF2 checkpoints into a SimCLRModel.

Reads a GR SavedModel (the released gs://simclr-checkpoints-tf2/ models, or
run.py's exports) or a run.py checkpoint through tf.io.gfile, walks the
checkpoint's object graph to name each variable by its GR attribute path
(gr_checkpoint.py), infers the architecture (gr_architecture.py) and copies
every variable (gr_layout.py's map), BN moving
statistics included. No GR code is needed. For a SavedModel, its own
serving function can be run to check the copy and to find which projection
-head layer the supervised head reads when widths leave that open.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf import file_io
from simclr_tf.models import gr_architecture as gr_arch
from simclr_tf.models import gr_checkpoint, gr_layout, simclr

# Largest |ours - SavedModel| allowed when verifying, relative to the
# largest |output| (or 1). Float32 rounding differs between the two (GR's
# BN is composite ops, ours the fused kernel); tests measured <= 3e-5 on
# random ResNet-50s (the projection head amplifies it most). 1e-3 leaves
# room for deeper models and other kernels; a wrong weight shows as > 1e-2.
VERIFY_TOLERANCE = 1e-3


def build_model(
    architecture: gr_arch.Architecture, ft_proj_selector: int = 0
) -> simclr.SimCLRModel:
    """A built SimCLRModel of a GR architecture (variables created)."""
    model = simclr.SimCLRModel(
        **model_arguments(architecture, ft_proj_selector)
    )
    size = 32 if architecture.cifar_stem else 64
    model(tf.zeros((1, size, size, 3)), training=False)
    return model


def model_arguments(
    architecture: gr_arch.Architecture, ft_proj_selector: int = 0
) -> dict[str, object]:
    """SimCLRModel's keyword arguments for a GR architecture."""
    return {
        "resnet_depth": architecture.resnet_depth,
        "width_multiplier": architecture.width_multiplier,
        "cifar_stem": architecture.cifar_stem,
        "sk_ratio": architecture.sk_ratio,
        "se_ratio": architecture.se_ratio,
        "proj_head_mode": architecture.proj_head_mode,
        "proj_out_dim": architecture.proj_out_dim,
        "num_proj_layers": architecture.num_proj_layers,
        "ft_proj_selector": ft_proj_selector,
        "num_classes": architecture.num_classes or None,
    }


def architecture_of(model: simclr.SimCLRModel) -> gr_arch.Architecture:
    """The Architecture a SimCLRModel was built with."""
    config = model.get_config()
    fields = {f.name for f in dataclasses.fields(gr_arch.Architecture)}
    values = {k: v for k, v in config.items() if k in fields}
    values["num_classes"] = config["num_classes"] or 0
    return gr_arch.Architecture(**values)


def target_variable(
    model: simclr.SimCLRModel, target: gr_layout.Target
) -> tf.Variable:
    """The simclr_tf variable a layout target names."""
    component, layer_name, attribute = target
    if component == "encoder":
        layer = model.encoder.get_layer(layer_name)
    else:
        layer = getattr(getattr(model, component), layer_name)
    return getattr(layer, attribute)


def _check_layout(
    found: Mapping[str, gr_checkpoint.SourceVariable],
    expected: Mapping[str, gr_layout.Target],
    model: simclr.SimCLRModel,
    described: str,
) -> None:
    """Raises ValueError unless paths and shapes match one to one."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"the GR variables do not fit a {described}: {len(missing)} "
            f"missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]})"
        )
    for path, target in expected.items():
        shape = tuple(target_variable(model, target).shape)
        if shape != found[path].shape:
            raise ValueError(
                f"GR variable {path} has shape {found[path].shape}; a "
                f"{described} needs {shape} ({'/'.join(target)})"
            )


def copy_variables(
    model: simclr.SimCLRModel,
    reader: tf.train.CheckpointReader,
    found: Mapping[str, gr_checkpoint.SourceVariable],
    include_supervised_head: bool = True,
) -> dict[str, str]:
    """Assigns every GR variable to the model's matching variable.

    Args:
      model: a built SimCLRModel of the GR architecture.
      reader, found: from `read_variables`.
      include_supervised_head: also copy the supervised head (the model
        must then have one of the same size).

    Returns:
      {GR path: simclr_tf variable path} of every copied variable.

    Raises:
      ValueError: a GR variable is missing, extra, or of another shape
        than the model's.
    """
    architecture = architecture_of(model)
    expected = gr_layout.layout(architecture)
    if not include_supervised_head:
        architecture = dataclasses.replace(architecture, num_classes=0)
        expected = gr_layout.layout(architecture)
        found = {
            p: v for p, v in found.items() if not p.startswith("supervised_")
        }
    _check_layout(found, expected, model, architecture.describe())
    copied = {}
    for path, target in expected.items():
        variable = target_variable(model, target)
        variable.assign(reader.get_tensor(found[path].key))
        copied[path] = variable.path
    return copied


def saved_model_outputs(
    saved_model_dir: str, images: np.ndarray
) -> dict[str, np.ndarray]:
    """A GR SavedModel's own outputs, `module(images, trainable=False)`."""
    # Loading warns once per Keras 2 layer function about custom gradients
    # (not used here); keep the log readable.
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        module = tf.saved_model.load(saved_model_dir)
    finally:
        logging.set_verbosity(verbosity)
    outputs = module(tf.constant(images, tf.float32), trainable=False)
    return {name: value.numpy() for name, value in outputs.items()}


def compare(
    model: simclr.SimCLRModel,
    reference: Mapping[str, np.ndarray],
    images: np.ndarray,
) -> dict[str, float]:
    """max |ours - reference| per output both have (inference mode)."""
    ours = model.endpoints(tf.constant(images, tf.float32), training=False)
    return {
        name: float(np.max(np.abs(np.asarray(ours[name]) - value)))
        for name, value in reference.items()
        if name in ours
    }


def selector_from_outputs(
    model: simclr.SimCLRModel,
    reference: Mapping[str, np.ndarray],
    images: np.ndarray,
    candidates: tuple[int, ...],
) -> int:
    """The candidate ft_proj_selector that reproduces reference logits_sup.

    Raises:
      ValueError: none does within VERIFY_TOLERANCE.
    """
    features = model.encoder(tf.constant(images, tf.float32), training=False)
    hiddens = model.projection_head(features, training=False)
    expected = reference["logits_sup"]
    scale = max(1.0, float(np.max(np.abs(expected))))
    differences = {
        j: float(np.max(np.abs(model.supervised_head(hiddens[j]) - expected)))
        for j in candidates
    }
    best = min(differences, key=differences.get)
    if differences[best] > VERIFY_TOLERANCE * scale:
        raise ValueError(
            "no ft_proj_selector reproduces the SavedModel's logits_sup "
            f"(max differences {differences}); the copy is wrong"
        )
    return best


def _selector_from_flags(source: gr_checkpoint.Source) -> int | None:
    """ft_proj_selector from the flags.json GR's run.py writes in model_dir.

    Looked for beside the checkpoint, and two levels above a SavedModel
    (model_dir/saved_model/<step>).
    """
    directories = [file_io.dirname(source.prefix), source.path]
    if source.saved_model_dir:
        directories.append(file_io.dirname(file_io.dirname(source.path)))
    for directory in directories:
        path = file_io.join(directory, "flags.json")
        if file_io.exists(path):
            return file_io.read_json(path).get("ft_proj_selector")
    return None


@dataclasses.dataclass(frozen=True)
class Imported:
    """An imported model and what was learnt on the way."""

    model: simclr.SimCLRModel
    architecture: gr_arch.Architecture
    ft_proj_selector: int
    source: gr_checkpoint.Source
    copied: dict[str, str]
    differences: dict[str, float]


def probe_images(architecture: gr_arch.Architecture) -> np.ndarray:
    """Two seeded random [0, 1] images (32 px, or 64 px for ImageNet stems)."""
    size = 32 if architecture.cifar_stem else 64
    rng = np.random.default_rng(0)
    return rng.uniform(0.0, 1.0, (2, size, size, 3)).astype(np.float32)


def _resolve_selector(
    architecture: gr_arch.Architecture,
    source: gr_checkpoint.Source,
    ft_proj_selector: int | None,
    model: simclr.SimCLRModel,
    reference: Mapping[str, np.ndarray] | None,
    images: np.ndarray,
) -> int:
    """ft_proj_selector: given, else the only fit, else found out."""
    candidates = architecture.ft_proj_selectors or (0,)
    if ft_proj_selector is not None:
        hiddens = model.projection_head.num_layers + 1
        if architecture.num_classes and ft_proj_selector % hiddens not in {
            c % hiddens for c in candidates
        }:
            raise ValueError(
                f"--ft_proj_selector={ft_proj_selector} names a projection-"
                "head hidden whose width the supervised head does not read; "
                f"use one of {list(candidates)}"
            )
        return ft_proj_selector
    if len(candidates) == 1:
        return candidates[0]
    if reference is not None and "logits_sup" in reference:
        return selector_from_outputs(model, reference, images, candidates)
    saved = _selector_from_flags(source)
    if saved is not None and saved in candidates:
        return saved
    logging.warning(
        "the supervised head could read projection-head hiddens %s; using "
        "0 (GR's default). Pass --ft_proj_selector if it was fine-tuned "
        "from another layer.",
        candidates,
    )
    return 0


def import_model(
    path: str, ft_proj_selector: int | None = None, verify: bool = True
) -> Imported:
    """Builds a SimCLRModel holding a GR model's weights.

    Args:
      path: see `resolve_source`.
      ft_proj_selector: the projection-head hidden the supervised head
        reads; None: inferred (kernel width, else the SavedModel's own
        logits, else GR's flags.json, else 0).
      verify: for a SavedModel, compare our outputs with its own on
        `probe_images` and fail beyond VERIFY_TOLERANCE.

    Returns:
      The Imported model (inference mode is the caller's choice).

    Raises:
      FileNotFoundError: nothing to read at path.
      ValueError: not GR's layout, or (verify) outputs that differ.
    """
    source = gr_checkpoint.resolve_source(path)
    reader, found = gr_checkpoint.read_variables(source)
    try:
        architecture = gr_arch.infer_architecture(
            {p: v.shape for p, v in found.items()}
        )
        model = build_model(architecture, 0)
        copied = copy_variables(model, reader, found)
    except ValueError as error:
        raise ValueError(f"{path} is no GR model we know: {error}") from error
    reference, images = None, probe_images(architecture)
    if source.saved_model_dir and verify:
        reference = saved_model_outputs(source.saved_model_dir, images)
    selector = _resolve_selector(
        architecture, source, ft_proj_selector, model, reference, images
    )
    if selector != 0:
        model = build_model(architecture, selector)
        copied = copy_variables(model, reader, found)
    differences = {}
    if reference is not None:
        differences = compare(model, reference, images)
        _check_differences(differences, reference)
    return Imported(model, architecture, selector, source, copied, differences)


def _check_differences(
    differences: Mapping[str, float], reference: Mapping[str, np.ndarray]
) -> None:
    for name, difference in differences.items():
        scale = max(1.0, float(np.max(np.abs(reference[name]))))
        if difference > VERIFY_TOLERANCE * scale:
            raise ValueError(
                f"the imported model's {name} differs from the SavedModel's "
                f"own by {difference:.3g} (allowed "
                f"{VERIFY_TOLERANCE * scale:.3g})"
            )


def load_into(
    model: simclr.SimCLRModel,
    path: str,
    include_supervised_head: bool | None = False,
) -> str:
    """Copies a GR checkpoint into an existing SimCLRModel (--checkpoint).

    Args:
      model: a built SimCLRModel with the GR model's architecture.
      path: see `resolve_source`.
      include_supervised_head: also copy GR's supervised head; None: when
        both have one of the same size (GR's run.py restores all it can).

    Returns:
      The checkpoint prefix read.

    Raises:
      FileNotFoundError: nothing to read at path.
      ValueError: the GR model's architecture is not the model's; the
        message names both.
    """
    source = gr_checkpoint.resolve_source(path)
    reader, found = gr_checkpoint.read_variables(source)
    inferred = gr_arch.infer_architecture(
        {p: v.shape for p, v in found.items()}
    )
    if include_supervised_head is None:
        head = model.supervised_head
        include_supervised_head = bool(
            head is not None and head.num_classes == inferred.num_classes
        )
    try:
        copy_variables(model, reader, found, include_supervised_head)
    except ValueError as error:
        raise ValueError(
            f"{path} holds a GR {inferred.describe()}; it does not fit this "
            f"model ({error})"
        ) from error
    return source.prefix
