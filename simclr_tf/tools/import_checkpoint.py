"""Imports a google-research/simclr (GR) TF2 model as a simclr_tf model_dir.

`python -m simclr_tf.tools.import_checkpoint --source=SRC --model_dir=OUT`
reads a GR SavedModel (e.g. gs://simclr-checkpoints-tf2/simclrv2/pretrained/
r50_1x_sk0/saved_model), a run.py model_dir or a checkpoint prefix, infers
the architecture, copies every variable into a SimCLRModel (models/
gr_import.py) and writes OUT/ckpt-0 (model and a fresh optimizer, as
train.py's build_state restores them) and OUT/config.json. Then e.g.
`python -m simclr_tf --mode=eval --model_dir=OUT --dataset=...` evaluates it,
and `--checkpoint=OUT` starts fine-tuning or linear evaluation from it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import keras
import tensorflow as tf
from absl import app, flags, logging

from simclr_tf import file_io, optim
from simclr_tf.config import schema as config_lib
from simclr_tf.config import validation
from simclr_tf.models import gr_import


def run_config(
    imported: gr_import.Imported, model_dir: str
) -> config_lib.Config:
    """GR's flag defaults with the imported architecture, validated."""
    architecture = imported.architecture
    config = config_lib.from_dict(
        {
            "model_dir": model_dir,
            "resnet_depth": architecture.resnet_depth,
            "width_multiplier": float(architecture.width_multiplier),
            "cifar_stem": architecture.cifar_stem,
            "image_size": 32 if architecture.cifar_stem else 224,
            "sk_ratio": architecture.sk_ratio,
            "se_ratio": architecture.se_ratio,
            "proj_head_mode": architecture.proj_head_mode,
            "proj_out_dim": architecture.proj_out_dim,
            "num_proj_layers": architecture.num_proj_layers,
            "ft_proj_selector": imported.ft_proj_selector,
            "lineareval_while_pretraining": architecture.num_classes > 0,
            "train_mode": "pretrain",
        }
    )
    return validation.validate(config)


def _optimizer(config: config_lib.Config) -> keras.optimizers.Optimizer:
    """A fresh optimizer of the config's kind (train.py restores one).

    Its learning rate is a schedule, as in training, so the checkpoint has
    the same optimizer variables; the values are never used.
    """
    return optim.build_optimizer(
        config.optim.optimizer,
        optim.WarmUpAndCosineDecay(config.optim.learning_rate, 0, 1),
        momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay,
    )


def _check_empty(model_dir: str) -> None:
    for name in ("checkpoint", "config.json"):
        if file_io.exists(file_io.join(model_dir, name)):
            raise ValueError(
                f"--model_dir={model_dir} already holds a run ({name}); "
                "pass a new directory."
            )


def import_checkpoint(
    source: str,
    model_dir: str,
    ft_proj_selector: int | None = None,
    verify: bool = True,
) -> dict[str, object]:
    """Writes a GR model as a simclr_tf checkpoint and config.json.

    Args:
      source: GR SavedModel dir, run.py model_dir or checkpoint prefix.
      model_dir: a new directory (any tf.io.gfile path).
      ft_proj_selector: the projection-head hidden the supervised head
        reads; None: inferred (gr_import.import_model).
      verify: for a SavedModel, check our outputs against its own.

    Returns:
      {"checkpoint", "architecture", "ft_proj_selector", "variables",
      "differences"} for the log.

    Raises:
      FileNotFoundError: nothing to read at source.
      ValueError: not a GR model, outputs that differ, or model_dir in use.
    """
    _check_empty(model_dir)
    imported = gr_import.import_model(source, ft_proj_selector, verify)
    config = run_config(imported, model_dir)
    optimizer = _optimizer(config)
    optimizer.build(imported.model.trainable_variables)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=imported.model, optimizer=optimizer),
        directory=model_dir,
        max_to_keep=1,
        step_counter=optimizer.iterations,
    )
    prefix = manager.save(checkpoint_number=0)
    file_io.write_text(file_io.join(model_dir, "config.json"), config.to_json())
    return {
        "checkpoint": prefix,
        "architecture": imported.architecture.describe(),
        "ft_proj_selector": imported.ft_proj_selector,
        "variables": len(imported.copied),
        "differences": imported.differences,
    }


def _define_flags() -> None:
    flags.DEFINE_string(
        "source",
        None,
        "GR SavedModel directory, run.py model_dir or checkpoint prefix "
        "(any tf.io.gfile path).",
    )
    flags.DEFINE_string("model_dir", None, "New simclr_tf model_dir.")
    flags.DEFINE_integer(
        "ft_proj_selector",
        None,
        "Projection-head hidden the supervised head reads (GR's flag); "
        "default: inferred from widths, the SavedModel's outputs or "
        "flags.json, else 0.",
    )
    flags.DEFINE_bool(
        "verify",
        True,
        "For a SavedModel, compare the imported model's outputs with its own.",
    )


def main(argv: Sequence[str]) -> None:
    """Entry point: flags -> import_checkpoint; user errors exit with a line."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}.")
    values = flags.FLAGS
    try:
        if not values.source or not values.model_dir:
            raise ValueError(
                "--source and --model_dir are required, e.g. --source="
                "gs://simclr-checkpoints-tf2/simclrv2/pretrained/r50_1x_sk0/"
                "saved_model --model_dir=runs/r50_1x_sk0"
            )
        summary = import_checkpoint(
            values.source,
            values.model_dir,
            values.ft_proj_selector,
            values.verify,
        )
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"import_checkpoint: {error}")
    for name, value in summary.items():
        logging.info("%s: %s", name, value)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
