"""Validation of a Config: every setting checked once, all problems in one
error, each naming the flag, the rule and a fix.
"""

from __future__ import annotations

import math

from simclr_tf.config import schema


def validate(config: schema.Config) -> schema.Config:
    """Checks every setting once and reports all problems in one error.

    Args:
      config: the Config to check.

    Returns:
      config, unchanged, when it is valid.

    Raises:
      ValueError: listing every problem, each naming the flag, the rule and
        a fix.
    """
    problems = (
        _check_run(config)
        + _check_model(config.model)
        + _check_counts(config)
        + _check_ranges(config)
    )
    if problems:
        raise ValueError(
            f"{len(problems)} invalid flag value(s):\n  - "
            + "\n  - ".join(problems)
        )
    return config


def _check_run(config: schema.Config) -> list[str]:
    problems = []
    train = config.train
    if not config.model_dir:
        problems.append(
            "--model_dir is not set; it is where checkpoints, logs and "
            "exports go. Use e.g. --model_dir=/tmp/simclr_run."
        )
    for flag, value, allowed in (
        ("mode", train.mode, schema.MODES),
        ("train_mode", train.train_mode, schema.TRAIN_MODES),
    ):
        if value not in allowed:
            problems.append(
                f"--{flag}={value} is not one of {', '.join(allowed)}."
            )
    problems += _check_train_mode(config)
    if config.runtime.precision == "mixed_float16" and (
        config.runtime.strategy == "tpu" or config.runtime.use_tpu
    ):
        problems.append(
            "--precision=mixed_float16 is not supported on TPU; use "
            "--precision=mixed_bfloat16."
        )
    if config.data.dataset in ("folder", "tfrecord") and not (
        config.data.data_dir
    ):
        problems.append(
            f"--dataset={config.data.dataset} reads --data_dir, which is "
            f"not set; pass --data_dir=PATH (the image folder, or the "
            f"directory make_tfrecords wrote)."
        )
    if config.data.brightness_impl not in ("v1", "v2"):
        problems.append(
            f"--brightness_impl={config.data.brightness_impl} must be v1 or v2."
        )
    return problems


def _check_train_mode(config: schema.Config) -> list[str]:
    """The supervised train modes' requirements (checkpoint, teacher, ...)."""
    problems = []
    train, optim = config.train, config.optim
    mode = train.train_mode
    if mode == "lineareval":
        if not train.checkpoint:
            problems.append(
                "--train_mode=lineareval evaluates a pretrained encoder; "
                "pass --checkpoint=<pretraining model_dir, checkpoint or "
                "SavedModel export>."
            )
        if optim.optimizer != "momentum" or optim.weight_decay != 0:
            problems.append(
                f"--train_mode=lineareval is the paper's protocol (Nesterov "
                f"momentum, no weight decay); got --optimizer="
                f"{optim.optimizer} --weight_decay={optim.weight_decay}. "
                f"Drop those flags, or use --train_mode=finetune "
                f"--fine_tune_after_block=4 for a variant."
            )
    if mode == "distill" and not train.teacher:
        problems.append(
            "--train_mode=distill needs --teacher=<SavedModel export, "
            "model_dir or checkpoint of a fine-tuned model>."
        )
    if not -1 <= train.fine_tune_after_block <= 4:
        problems.append(
            f"--fine_tune_after_block={train.fine_tune_after_block} must be "
            f"in [-1, 4]: -1 fine-tunes everything, 0 freezes the stem, k "
            f"the stem and block groups 1..k, 4 the whole encoder."
        )
    if not 0 < config.data.label_fraction <= 1:
        problems.append(
            f"--label_fraction={config.data.label_fraction} must be in "
            f"(0, 1]; use e.g. 0.01 or 0.1 (1 = all labels)."
        )
    elif config.data.label_fraction < 1 and mode in ("pretrain", "distill"):
        problems.append(
            f"--label_fraction applies to --train_mode=finetune or "
            f"lineareval; --train_mode={mode} trains on every image of "
            f"--train_split."
        )
    if not train.distill_temperature > 0:
        problems.append(
            f"--distill_temperature={train.distill_temperature} must be > "
            f"0; use 1.0."
        )
    if not 0 <= train.distill_label_weight <= 1:
        problems.append(
            f"--distill_label_weight={train.distill_label_weight} must be "
            f"in [0, 1]; 0 = teacher only."
        )
    if config.eval.eval_timeout_secs < 0:
        problems.append("--eval_timeout_secs must be >= 0.")
    return problems


def _check_model(model: schema.Model) -> list[str]:
    problems = []
    if model.resnet_depth not in schema.RESNET_DEPTHS:
        problems.append(
            f"--resnet_depth={model.resnet_depth} must be one of "
            f"{list(schema.RESNET_DEPTHS)}; use e.g. --resnet_depth=50."
        )
    if model.width_multiplier <= 0 or round(64 * model.width_multiplier) < 1:
        problems.append(
            f"--width_multiplier={model.width_multiplier} must give at "
            f"least one channel (64*w >= 1); use e.g. 0.25, 1 or 2."
        )
    if not (0 <= model.sk_ratio < 1 and 0 <= model.se_ratio < 1):
        problems.append(
            f"--sk_ratio={model.sk_ratio} / --se_ratio={model.se_ratio} "
            f"must be in [0, 1): 0 turns them off; SimCLRv2 uses "
            f"--sk_ratio=0.0625."
        )
    if model.proj_out_dim < 1:
        problems.append(
            f"--proj_out_dim={model.proj_out_dim} must be >= 1; use 128."
        )
    if model.proj_head_mode == "nonlinear" and model.num_proj_layers < 1:
        problems.append(
            f"--num_proj_layers={model.num_proj_layers} must be >= 1 with "
            f"--proj_head_mode=nonlinear; use 2 (v1) or 3 (v2)."
        )
    layers = _num_head_layers(model)
    if not -1 <= model.ft_proj_selector <= layers:
        problems.append(
            f"--ft_proj_selector={model.ft_proj_selector} must be in "
            f"[-1, {layers}] for this projection head; use 0 (the encoder "
            f"output) or -1 (the last head layer)."
        )
    if not 0.0 <= model.batch_norm_decay < 1.0:
        problems.append(
            f"--batch_norm_decay={model.batch_norm_decay} must be in "
            f"[0, 1); use 0.9."
        )
    return problems


def _num_head_layers(model: schema.Model) -> int:
    if model.proj_head_mode == "nonlinear":
        return model.num_proj_layers
    return 1 if model.proj_head_mode == "linear" else 0


def _check_counts(config: schema.Config) -> list[str]:
    problems = []
    train = config.train
    positive = {
        "train_batch_size": train.train_batch_size,
        "eval_batch_size": config.eval.eval_batch_size,
        "image_size": config.data.image_size,
        "steps_per_loop": train.steps_per_loop,
        "keep_checkpoint_max": train.keep_checkpoint_max,
        "keep_hub_module_max": config.export.keep_hub_module_max,
        "knn_k": config.eval.knn_k,
    }
    for name, value in positive.items():
        if value < 1:
            problems.append(f"--{name}={value} must be >= 1.")
    if config.eval.linear_eval_epochs < 0:
        problems.append(
            f"--linear_eval_epochs={config.eval.linear_eval_epochs} must be "
            f">= 0 (0: no offline linear classifier)."
        )
    if train.train_steps < 0 or train.train_epochs < 0:
        problems.append("--train_steps and --train_epochs must be >= 0.")
    if train.train_steps == 0 and train.train_epochs == 0:
        problems.append(
            "--train_steps=0 and --train_epochs=0 give no training; set "
            "one of them, e.g. --train_epochs=100."
        )
    if train.time_budget_minutes < 0:
        problems.append(
            f"--time_budget_minutes={train.time_budget_minutes} must be >= 0 "
            "(0: no budget)."
        )
    if train.train_batch_size == 1:
        problems.append(
            "--train_batch_size=1 leaves no negatives for NT-Xent; use at "
            "least 2 (the paper uses 256 to 8192)."
        )
    if config.runtime.num_virtual_cpus < 0:
        problems.append("--num_virtual_cpus must be >= 0.")
    if (
        config.eval.baseline_max_train_examples < 0
        or config.runtime.device_memory_gb < 0
        or config.runtime.host_memory_gb < 0
    ):
        problems.append(
            "--baseline_max_train_examples, --device_memory_gb and "
            "--host_memory_gb must be >= 0 (0 = all / found from the "
            "machine)."
        )
    if (
        config.eval.knn_every_steps < 0
        or config.eval.knn_max_train_examples < 0
    ):
        problems.append(
            "--knn_every_steps and --knn_max_train_examples must be >= 0 "
            "(0 = off / all)."
        )
    return problems


def _check_ranges(config: schema.Config) -> list[str]:
    problems = []
    data, optim = config.data, config.optim
    if config.loss.temperature <= 0:
        problems.append(
            f"--temperature={config.loss.temperature} must be > 0; use 0.1 "
            f"(ImageNet) or 0.5 (CIFAR)."
        )
    if not 0.0 <= data.color_jitter_strength <= 1.25:
        problems.append(
            f"--color_jitter_strength={data.color_jitter_strength} must be "
            f"in [0, 1.25] (above it contrast and saturation factors go "
            f"negative); use 1.0 (ImageNet) or 0.5 (CIFAR)."
        )
    if not 0.0 < data.crop_min_area <= 1.0:
        problems.append(
            f"--crop_min_area={data.crop_min_area} must be in (0, 1] (a "
            f"fraction of the image); use 0.08, the paper's value."
        )
    if optim.learning_rate <= 0 or not math.isfinite(optim.learning_rate):
        problems.append(
            f"--learning_rate={optim.learning_rate} must be a positive "
            f"number; use 0.3 with LARS and linear scaling."
        )
    if optim.weight_decay < 0 or optim.warmup_epochs < 0:
        problems.append("--weight_decay and --warmup_epochs must be >= 0.")
    if not 0.0 <= optim.momentum < 1.0:
        problems.append(f"--momentum={optim.momentum} must be in [0, 1).")
    if not config.eval.knn_temperature >= 0.02:
        problems.append(
            f"--knn_temperature={config.eval.knn_temperature} must be >= "
            f"0.02 (exp(1 / t) overflows float32 below it); use 0.1."
        )
    return problems
