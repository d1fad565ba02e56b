"""A Config from the parsed flags, or from a run's config.json under them.

The only module besides flag_defs that touches absl FLAGS. --mode=eval and
export read the run's config.json (any tf.io.gfile path) and lay the flags
given explicitly on top of it; other runs take the architecture flags they
leave unset from their --checkpoint (transfer.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from absl import flags

from simclr_tf import file_io
from simclr_tf.config import flag_defs, schema, transfer

FLAGS = flags.FLAGS


# Modes that use the model a model_dir already holds, as it was built.
SAVED_RUN_MODES = ("eval", "export")


def from_flags() -> schema.Config:
    """Builds a Config from the parsed absl FLAGS (not validated).

    --mode=eval and export start from the run's config.json where model_dir
    has one; otherwise the architecture flags left unset come from the
    model --checkpoint names (transfer.py).
    """
    values = {name: FLAGS[name].value for name in FLAGS}
    explicit = {name for name in FLAGS if FLAGS[name].present}
    saved = None
    if values["mode"] in SAVED_RUN_MODES:
        saved = saved_run_config(values)
    if saved is not None:
        return over_saved_run(saved, {n: values[n] for n in explicit})
    inherited = transfer.inherited_flags(values, explicit)
    values.update(inherited)
    return schema.from_dict(values, explicit=explicit | set(inherited))


def no_effect_notes() -> list[str]:
    """One note per GR flag set that has no effect here (flag_defs)."""
    return [
        f"--{name} is accepted for google-research/simclr's command lines "
        f"and has no effect: {why}."
        for name, why in flag_defs.NO_EFFECT_FLAGS.items()
        if FLAGS[name].present
    ]


def saved_run_config(values: Mapping[str, Any]) -> dict[str, Any] | None:
    """The config.json of the run in values["model_dir"], if it has one."""
    if not values.get("model_dir"):
        return None
    path = file_io.join(values["model_dir"], "config.json")
    if not file_io.exists(path):
        return None
    return file_io.read_json(path)


def over_saved_run(
    saved: Mapping[str, Any], given: Mapping[str, Any]
) -> schema.Config:
    """--mode=eval: a run's config.json with the flags given on top.

    The run's own settings (architecture, dataset, train mode, ...) need not
    be repeated to evaluate it; every flag the command line or a flagfile
    sets still wins, and no train-mode default replaces a saved value.

    Args:
      saved: the run's config.json (Config.to_dict's form).
      given: {flag_name: value} of the flags set explicitly.
    """
    flat = {**schema.flatten(saved), **given}
    return schema.from_dict(flat, explicit=set(flat))
