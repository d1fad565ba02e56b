"""The architecture a run takes from the model its --checkpoint names.

--checkpoint names a simclr_tf run (a model_dir, a checkpoint in it or a
SavedModel export under it: its config.json says how the model was built)
or a google-research/simclr model (its architecture read from its
variables). The encoder and projection-head flags a command line leaves
unset take that model's values, so that `--train_mode=finetune
--checkpoint=<run>` needs no encoder flags.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import tensorflow as tf
from absl import logging

from simclr_tf import file_io

# The flags that fix the shapes of the encoder and the projection head.
ARCHITECTURE_FLAGS = (
    "resnet_depth",
    "width_multiplier",
    "cifar_stem",
    "sk_ratio",
    "se_ratio",
    "proj_head_mode",
    "proj_out_dim",
    "num_proj_layers",
)


def _run_config(path: str) -> dict[str, Any] | None:
    """The config.json of the simclr_tf run `path` belongs to, if any:
    in a model_dir, beside a checkpoint prefix, or two levels above an
    export (model_dir/saved_model/<step>)."""
    path = path.rstrip("/")
    if file_io.exists(file_io.join(path, "saved_model.pb")):
        directory = os.path.dirname(os.path.dirname(path))
    elif file_io.exists(path + ".index"):
        directory = os.path.dirname(path)
    else:
        directory = path
    candidate = file_io.join(directory, "config.json")
    if file_io.exists(candidate):
        return file_io.read_json(candidate)
    return None


def _gr_architecture(path: str) -> dict[str, Any] | None:
    """A google-research/simclr model's architecture flags, if path holds
    one (its variables' shapes; no weights are read)."""
    from simclr_tf.models import gr_architecture, gr_checkpoint

    if not gr_checkpoint.is_gr_model(path):
        return None
    _, found = gr_checkpoint.read_variables(gr_checkpoint.resolve_source(path))
    architecture = gr_architecture.infer_architecture(
        {name: variable.shape for name, variable in found.items()}
    )
    return {name: getattr(architecture, name) for name in ARCHITECTURE_FLAGS}


def checkpoint_architecture(path: str) -> dict[str, Any]:
    """{flag: value} of the model at path's architecture; {} when unknown
    (nothing there yet, or not a model: loading it reports that)."""
    try:
        saved = _run_config(path)
    except tf.errors.OpError as error:
        # Unreachable storage: the run's loading of --checkpoint reports it.
        logging.warning("--checkpoint=%s not readable yet: %s", path, error)
        return {}
    if saved is not None:
        model = saved.get("model", {})
        return {
            name: model[name] for name in ARCHITECTURE_FLAGS if name in model
        }
    try:
        return _gr_architecture(path) or {}
    except ValueError:
        return {}


def inherited_flags(
    values: Mapping[str, Any], explicit: set[str]
) -> dict[str, Any]:
    """The architecture flags the run takes from its --checkpoint.

    Args:
      values: flag values by name (checkpoint among them).
      explicit: the flags set on the command line or in a flagfile; they
        keep their values.

    Returns:
      {flag: value} for the architecture flags not in explicit; {} without
      --checkpoint.
    """
    path = values.get("checkpoint")
    if not path:
        return {}
    inherited = {
        name: value
        for name, value in checkpoint_architecture(path).items()
        if name not in explicit
    }
    if inherited:
        logging.info(
            "architecture from --checkpoint=%s: %s",
            path,
            ", ".join(f"--{k}={v}" for k, v in sorted(inherited.items())),
        )
    return inherited
