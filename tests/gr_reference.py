"""Runs google-research/simclr's own TF2 code (GR) as a reference for tests.

`build_reference` starts a subprocess (TF_USE_LEGACY_KERAS=1, so tf.keras is
Keras 2 from the `tf_keras` package) that defines run.py's flags, parses the
given ones, builds GR's `model.Model`, gives every BN gamma/beta and bias a
seeded random value, optionally runs GR training steps (run.py's loss and
LARS, so the optimizer has its slots), sets the BN moving statistics from
one training-mode pass and saves the model as run.py does: the
`tf.train.Checkpoint(model, global_step, optimizer)` its CheckpointManager
writes (model_dir/ckpt-<step>), `run.save` (a SavedModel of
`build_saved_model` in model_dir/saved_model/<step>) and flags.json. It then
dumps the outputs of GR's exported module, `module(images,
trainable=False)`, and every model variable (by GR's variable name) to .npz.

This module is a test helper, not a test; GR's code stays in its folder
(GR_REFERENCE_DIR, default below) and never enters simclr_tf. Run as a
script it is the subprocess' side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping

import numpy as np

# GR's tf2/ folder: $GR_REFERENCE_DIR, else ../shared/reference beside the
# checkout, else the same folder where the project's own checkout lives
# (/work/main beside /work/shared: CI's clean clones sit elsewhere).
_GR_FOLDER = os.path.join("shared", "reference", "google-research-simclr-tf2")
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GR_CANDIDATES = [
    os.path.join(os.path.dirname(_CHECKOUT), _GR_FOLDER),
    os.path.join(os.sep, "work", _GR_FOLDER),
]
GR_REFERENCE_DIR = os.environ.get("GR_REFERENCE_DIR") or next(
    (
        folder
        for folder in _GR_CANDIDATES
        if os.path.isfile(os.path.join(folder, "model.py"))
    ),
    _GR_CANDIDATES[0],
)
# GR flags the harness sets unless the caller does: no TPU, no blur (its
# random kernel would make the training step depend on the seed), and BN
# decay 0 so that one training-mode pass sets every moving mean and
# variance to the batch's own (realistic, data-dependent) statistics.
DEFAULT_GR_FLAGS = {
    "use_tpu": False,
    "use_blur": False,
    "batch_norm_decay": 0.0,
    "train_batch_size": 4,
}
OUTPUT_NAMES = (
    "initial_conv",
    "initial_max_pool",
    "block_group1",
    "block_group2",
    "block_group3",
    "block_group4",
    "final_avg_pool",
    "proj_head_input",
    "proj_head_output",
    "logits_sup",
)


@dataclasses.dataclass(frozen=True)
class Reference:
    """What one GR run left on disk, and its outputs.

    Attributes:
      model_dir: GR's --model_dir (holds ckpt-<step> and saved_model/<step>).
      saved_model_dir: the SavedModel that run.py's `save` wrote.
      checkpoint_prefix: the checkpoint run.py's CheckpointManager wrote.
      outputs: GR's outputs on the images in inference mode, by name.
      variables: every variable of GR's model, by GR's variable name.
      info: counts and timings reported by the subprocess.
    """

    model_dir: str
    saved_model_dir: str
    checkpoint_prefix: str
    outputs: dict[str, np.ndarray]
    variables: dict[str, np.ndarray]
    info: dict


def run_tf_keras(
    command: list[str], work_dir: str, timeout: float, what: str
) -> dict:
    """Runs `command` with Keras 2 (TF_USE_LEGACY_KERAS=1) and returns the
    info.json it wrote to work_dir.

    Raises:
      RuntimeError: the process failed (its stderr's tail is included).
    """
    environment = {
        **os.environ,
        "TF_USE_LEGACY_KERAS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    done = subprocess.run(
        command,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{what} failed ({done.returncode}):\n" + done.stderr[-4000:]
        )
    with open(os.path.join(work_dir, "info.json")) as file:
        return json.load(file)


def skip_reason() -> str | None:
    """Why GR's code cannot run here, or None when it can."""
    if not os.path.isfile(os.path.join(GR_REFERENCE_DIR, "model.py")):
        return (
            f"GR's TF2 code is not in {GR_REFERENCE_DIR} (set "
            "GR_REFERENCE_DIR to a copy of google-research/simclr's tf2/)"
        )
    try:
        import tf_keras  # noqa: F401
    except ImportError:
        return "tf_keras is not installed: pip install tf_keras==2.21.0"
    return None


def require() -> None:
    """Skips the calling test when GR's code cannot run here."""
    import pytest

    reason = skip_reason()
    if reason:
        pytest.skip(reason)


def build_reference(
    work_dir: str,
    images: np.ndarray,
    *,
    num_classes: int = 10,
    seed: int = 0,
    train_steps: int = 1,
    timeout: float = 1200,
    **gr_flags: object,
) -> Reference:
    """Builds, trains one step, saves and runs GR's model in a subprocess.

    Args:
      work_dir: an empty directory for GR's model_dir and the dumps.
      images: [B, H, W, 3] float32 in [0, 1]; also the training batch.
      num_classes: classes of GR's supervised head (`model.Model`'s
        argument; the head exists in finetune mode or with
        --lineareval_while_pretraining, GR's default).
      seed: seeds the random BN and bias values and the labels.
      train_steps: GR training steps before saving (0: none, no slots).
      timeout: seconds before the subprocess is killed.
      **gr_flags: run.py flags, e.g. resnet_depth=18, image_size=32
        (<= 32 gives GR's CIFAR stem), sk_ratio=0.0625, se_ratio=0.25,
        width_multiplier=2, proj_head_mode, proj_out_dim, num_proj_layers,
        ft_proj_selector, train_mode, global_bn, lineareval_while_pretraining.

    Returns:
      The Reference.

    Raises:
      RuntimeError: GR's process failed (its stderr's tail is included).
    """
    images_path = os.path.join(work_dir, "images.npy")
    np.save(images_path, np.asarray(images, np.float32))
    flags = {**DEFAULT_GR_FLAGS, **gr_flags}
    model_dir = os.path.join(work_dir, "gr_model_dir")
    command = [
        sys.executable,
        os.path.abspath(__file__),
        f"--images={images_path}",
        f"--out_dir={work_dir}",
        f"--num_classes={num_classes}",
        f"--seed={seed}",
        f"--train_steps={train_steps}",
        "--",
        f"--model_dir={model_dir}",
        *(f"--{name}={value}" for name, value in flags.items()),
    ]
    info = run_tf_keras(command, work_dir, timeout, "GR reference run")
    return Reference(
        model_dir=model_dir,
        saved_model_dir=info["saved_model_dir"],
        checkpoint_prefix=info["checkpoint_prefix"],
        outputs=dict(np.load(os.path.join(work_dir, "outputs.npz"))),
        variables=dict(np.load(os.path.join(work_dir, "variables.npz"))),
        info=info,
    )


def max_differences(
    ours: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """max |ours - reference| for every name in reference that ours has."""
    return {
        name: float(np.max(np.abs(np.asarray(ours[name]) - value)))
        for name, value in reference.items()
        if name in ours
    }


# --------------------------------------------------------------------------
# The subprocess' side: GR's code, Keras 2.


def _randomize(model: object, seed: int) -> None:
    """Seeded random BN gamma/beta and biases (GR starts them at 1 or 0).

    GR's 0s (the last BN gamma of every residual branch, all biases) and
    1s would hide a wrongly mapped variable; kernels keep GR's (already
    random) initialisation. The residual branches' last gammas get
    U(0.1, 0.3), small as in trained ResNets: with gammas near 1 a random
    ResNet-50 is chaotic (each layer amplifies perturbations by ~1.08), so
    float32 rounding alone, GR's as much as ours, reaches 1e-4 of the
    outputs against a float64 evaluation; with them it stays near 1e-6.
    """
    rng = np.random.default_rng(seed)
    for variable in model.variables:
        name = variable.name
        shape = tuple(variable.shape)
        if name.endswith("gamma:0") and not np.any(variable.numpy()):
            value = rng.uniform(0.1, 0.3, shape)
        elif name.endswith("gamma:0"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(("beta:0", "bias:0")):
            value = rng.normal(0.0, 0.2, shape)
        else:
            continue
        variable.assign(value.astype(np.float32))


def _set_moving_statistics(model, images) -> None:
    """BN moving statistics from one training-mode pass over the images.

    With --batch_norm_decay=0 the pass sets each moving mean and variance
    to the batch's own.
    """
    import tensorflow as tf

    model(tf.concat([images, images], axis=-1), training=True)


def _train(model, images, num_classes, seed, steps, flags_values) -> object:
    """GR's run.py training step (loss, weight decay, LARS), `steps` times."""
    import model as model_lib
    import objective as obj_lib
    import tensorflow as tf

    learning_rate = model_lib.WarmUpAndCosineDecay(
        flags_values.learning_rate, len(images)
    )
    optimizer = model_lib.build_optimizer(learning_rate)
    rng = np.random.default_rng(seed + 1)
    labels = tf.one_hot(rng.integers(0, num_classes, len(images)), num_classes)
    # Two identical views, concatenated on channels as GR's input pipeline.
    features = tf.concat([images, images], axis=-1)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            projections, logits = model(features, training=True)
            loss = model_lib.add_weight_decay(model, adjust_per_optimizer=True)
            if projections is not None:
                loss += obj_lib.add_contrastive_loss(
                    projections,
                    hidden_norm=flags_values.hidden_norm,
                    temperature=flags_values.temperature,
                    strategy=None,
                )[0]
            if logits is not None:
                target = labels
                if flags_values.train_mode == "pretrain":
                    target = tf.concat([labels, labels], 0)
                loss += obj_lib.add_supervised_loss(target, logits)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(
            zip(grads, model.trainable_variables, strict=True)
        )
        return loss

    for _ in range(steps):
        step()
    return optimizer


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", required=True)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--num_classes", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_steps", type=int, default=1)
    arguments, gr_argv = parser.parse_known_args()
    gr_argv = [argument for argument in gr_argv if argument != "--"]
    assert os.environ.get("TF_USE_LEGACY_KERAS") == "1"
    sys.path.insert(0, GR_REFERENCE_DIR)
    start = time.perf_counter()
    seconds = {}

    import model as model_lib
    import run  # defines run.py's flags; app.run is not called.
    import tensorflow as tf
    from absl import flags

    flags_values = flags.FLAGS
    flags_values(["gr_run"] + gr_argv)
    images = tf.constant(np.load(arguments.images))
    model = model_lib.Model(arguments.num_classes)
    model(images, training=False)  # creates every variable
    _randomize(model, arguments.seed)
    seconds["build"] = time.perf_counter() - start
    optimizer = _train(
        model,
        images,
        arguments.num_classes,
        arguments.seed,
        arguments.train_steps,
        flags_values,
    )
    step = int(optimizer.iterations.numpy())
    seconds["train"] = time.perf_counter() - start
    _set_moving_statistics(model, images)
    # run.py: try_restore_from_checkpoint builds the manager; the loop saves.
    manager = run.try_restore_from_checkpoint(
        model, optimizer.iterations, optimizer
    )
    checkpoint_prefix = manager.save(step)
    seconds["checkpoint"] = time.perf_counter() - start
    run.save(model, global_step=step)
    seconds["saved_model"] = time.perf_counter() - start
    # run.py's perform_evaluation writes the run's flags beside them.
    with open(os.path.join(flags_values.model_dir, "flags.json"), "w") as f:
        json.dump(
            {
                key: value
                for key, value in flags_values.flag_values_dict().items()
                if run.json_serializable(value)
            },
            f,
        )
    module = run.build_saved_model(model)
    outputs = module(images, trainable=False)
    np.savez(
        os.path.join(arguments.out_dir, "outputs.npz"),
        **{name: value.numpy() for name, value in outputs.items()},
    )
    np.savez(
        os.path.join(arguments.out_dir, "variables.npz"),
        **{v.name: v.numpy() for v in model.variables},
    )
    info = {
        "checkpoint_prefix": checkpoint_prefix,
        "saved_model_dir": os.path.join(
            flags_values.model_dir, "saved_model", str(step)
        ),
        "num_variables": len(model.variables),
        "num_trainable_elements": int(
            sum(np.prod(v.shape) for v in model.trainable_variables)
        ),
        "seconds": {**seconds, "total": time.perf_counter() - start},
    }
    with open(os.path.join(arguments.out_dir, "info.json"), "w") as file:
        json.dump(info, file)


if __name__ == "__main__":
    _main()
