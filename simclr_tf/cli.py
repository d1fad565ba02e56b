"""The absl application: flags → Config → the chosen --mode.

train: --train_mode (pretrain, finetune, lineareval, distill), resuming
from --model_dir. eval: evaluates model_dir's latest checkpoint and each new
one as it appears (result_<step>.json). train_then_eval: train, export,
evaluate, result.json and a summary table. export: a SavedModel of the
latest checkpoint. preview: <model_dir>/augmentations.png of the training
views. plan: the memory plan of the run, refused when it cannot fit.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from absl import app, logging

from simclr_tf.config import flag_defs, validation
from simclr_tf.config import loading as config_loading
from simclr_tf.config import schema as config_lib

if TYPE_CHECKING:
    import tensorflow as tf

    from simclr_tf.data.sources import base as source_lib
    from simclr_tf.training import train_state

flag_defs.define_flags()


def main(argv: Sequence[str]) -> None:
    """Entry point for `python -m simclr_tf`."""
    if len(argv) > 1:
        raise app.UsageError(
            f"unexpected arguments {list(argv[1:])}; flags take the form "
            f"--name=value (python -m simclr_tf --helpfull lists them)."
        )
    try:
        config = validation.validate(config_loading.from_flags())
    except ValueError as error:
        sys.exit(f"simclr_tf: {error}")
    for note in config_loading.no_effect_notes():
        logging.warning(note)
    if config.train.mode in config_loading.SAVED_RUN_MODES and (
        config_loading.saved_run_config({"model_dir": config.model_dir})
    ):
        logging.info(
            "--mode=%s: settings from %s/config.json; flags given override "
            "them.",
            config.train.mode,
            config.model_dir,
        )
    from simclr_tf.training import loop

    try:
        run(config)
    except (ValueError, FileNotFoundError, loop.NonFiniteLossError) as error:
        # Bad input found once data or checkpoints are opened (an unknown
        # dataset or split, an empty folder, a missing checkpoint), or a
        # NaN loss: one line naming cause and fix (and the last good
        # checkpoint); the traceback only with --verbosity=1.
        logging.debug("traceback:", exc_info=True)
        sys.exit(f"simclr_tf: {error}")


def run(config: config_lib.Config) -> dict[str, object]:
    """Runs config.train.mode and returns the result written to result.json.

    Args:
      config: a validated Config.

    Returns:
      The result dict (also written to <model_dir>/result.json for
      train_then_eval and eval).
    """
    # Imported here so that `--helpfull` and flag errors stay fast.
    from simclr_tf import file_io, runtime
    from simclr_tf.data import run_data
    from simclr_tf.evaluation import monitor, run_eval
    from simclr_tf.training import loop, train_state

    mode = config.train.mode
    started = time.time()
    # The strategy comes before anything starts TensorFlow (opening a folder
    # source decodes its images): the CPU can only be split into virtual
    # devices, and a multi-worker cluster only configured, before that.
    strategy = None if mode == "preview" else train_state.setup_run(config)
    file_io.makedirs(config.model_dir)
    source = run_data.open_train_source(config)
    if mode == "preview":
        from simclr_tf.reports import preview

        return {"preview_path": preview.run_preview(config, source)}
    if mode in ("eval", "train_then_eval") and source.num_classes == 0:
        raise ValueError(
            f"--mode={mode}: {source.name} {source.split} at {source.origin} "
            f"has no labels (a flat image folder), so there is nothing to "
            f"evaluate; use --mode=train, or put the images in class "
            f"sub-folders."
        )
    if mode == "plan":
        return _plan(config, source, strategy)
    base = {"config": config.to_dict(), "versions": _versions()}
    if mode == "eval":
        result = run_eval.run_eval_loop(config, source, base, strategy)
        result.pop("state")
        _print_table(result)
        return result
    if mode in ("train", "train_then_eval"):
        summary = loop.run_training(
            config, source, monitor.training_hooks(config), strategy
        )
    else:
        summary = train_state.restore_for_eval(config, source, strategy)
    state = summary["state"]
    if summary.get("preempted"):
        return {
            "step": int(state.step.numpy()),
            "preempted": True,
        }
    result: dict[str, object] = {
        "step": int(state.step.numpy()),
        **base,
    }
    if "metrics" in summary:
        result.update({f"train/{k}": v for k, v in summary["metrics"].items()})
        result["train/images_per_second"] = summary["images_per_second"]
        result["train/seconds"] = summary["train_seconds"]
    if "plan" in summary:
        result.update(summary["plan"].summary())
    chief = runtime.is_chief(state.strategy)
    result.update(run_data.skipped_files(summary["source"]))
    if mode in ("export", "train_then_eval"):
        # Before the evaluation: a failed evaluation never loses the model.
        result.update(_export(config, state, result["step"], chief))
    if mode == "train_then_eval":
        if chief:  # the trained run's result, if the evaluation fails
            file_io.write_result(config.model_dir, result)
        result.update(run_eval.evaluate_state(config, state, source))
    result["wall_seconds"] = time.time() - started
    result["host/peak_rss_bytes"] = _peak_rss_bytes()
    if chief and mode != "export":
        path = file_io.write_result(config.model_dir, result)
        logging.info("wrote %s", path)
        _print_table(result)
    return result


def _plan(
    config: config_lib.Config,
    source: source_lib.Source,
    strategy: tf.distribute.Strategy,
) -> dict[str, object]:
    """--mode=plan: prints the memory plan of the run these flags describe
    on this machine's strategy, and refuses one that cannot fit."""
    from simclr_tf.data import run_data
    from simclr_tf.planning import memory, run_plan
    from simclr_tf.training import train_state

    train_source = source
    if config.train.train_mode != "pretrain":
        train_state.check_labelled(config, source)
        train_source = run_data.labelled_train_source(config, source)
    eval_source = None
    if train_source.num_classes:
        eval_source = run_data.open_split(config, config.data.eval_split)
    plan = run_plan.make_plan(config, strategy, train_source, eval_source)
    print("\n".join(plan.lines), flush=True)
    memory.check(plan.memory, config)
    return {"plan_lines": list(plan.lines), **plan.summary()}


def _peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux: KiB in ru_maxrss)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _export(
    config: config_lib.Config,
    state: train_state.TrainState,
    step: int,
    chief: bool,
) -> dict[str, str]:
    """Exports the model; the export paths for result.json (chief only)."""
    from simclr_tf import export, runtime

    # Every worker exports (saving may run collectives); only the chief's
    # copy is kept.
    paths = export.export_all(
        state.model,
        runtime.write_dir(state.strategy, config.model_dir),
        step,
        image_shape=state.image_shape,
        keep_max=config.export.keep_hub_module_max,
        keras_file=config.export.export_keras,
        tflite=config.export.export_tflite,
    )
    runtime.discard_scratch(state.strategy, config.model_dir)
    if not chief:
        return {}
    result = {"export_path": paths.pop("saved_model")}
    result.update({f"export_{k}_path": v for k, v in paths.items()})
    logging.info("exported SavedModel to %s", result["export_path"])
    return result


def _print_table(result: Mapping[str, object]) -> None:
    if any(k in result for k in TABLE_KEYS):
        print(format_table(result), flush=True)


TABLE_KEYS = ("eval/top_1", "eval/online/top_1", "eval/knn/top_1")
_MODEL_ROWS = {
    "pretrain": "SimCLR encoder (this run)",
    "lineareval": "linear eval (frozen)",
    "finetune": "fine-tuned",
    "distill": "distilled student",
}


def format_table(result: Mapping[str, object]) -> str:
    """The evaluation table printed at the end of train_then_eval and eval.

    Top-1/top-5 (for a pretrained encoder: its online head, GR's reported
    number, and the linear protocol on frozen features; the supervised
    head otherwise), and
    kNN top-1 where it was computed; then how the baselines were cut or
    why they were refused.
    """
    train_mode = result["config"]["train"]["train_mode"]
    rows = [
        ("online linear head", "eval/online/"),
        (_MODEL_ROWS[train_mode], "eval/"),
        ("same encoder, random init", "eval/random_init/"),
        ("raw pixels", "eval/pixels/"),
    ]
    lines = [
        f"evaluation on {result['config']['data']['dataset']}/"
        f"{result['eval/split']} (step {result['step']}, "
        f"{result['wall_seconds'] / 60:.1f} min)",
        f"{'representation':<28}{'top-1':>13}{'top-5':>8}{'kNN top-1':>11}",
    ]
    for label, prefix in rows:
        line = f"{label:<28}"
        for name, width in (("top_1", 12), ("top_5", 7), ("knn/top_1", 10)):
            value = result.get(f"{prefix}{name}")
            line += (
                " " * (width + 1)
                if value is None
                else (f"{100 * value:>{width}.2f}%")
            )
        if line.strip() != label:
            lines.append(line.rstrip())
    for label, prefix in rows:
        for key in ("train_subset", "skipped"):
            if f"{prefix}{key}" in result:
                lines.append(f"{label}: {result[f'{prefix}{key}']}")
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    import simclr_tf

    return {
        "simclr_tf": simclr_tf.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
    }


def run_main() -> None:
    """Console-script entry point."""
    app.run(main)
