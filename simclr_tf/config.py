"""Command-line flags, the frozen Config they resolve to, and its validation.

Flag names and defaults follow google-research/simclr's tf2/run.py so that
its users' command lines carry over; the extensions are listed in README.md.
This is the only module that reads absl FLAGS: everything downstream takes a
Config (or one of its sub-configs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from absl import flags

from simclr_tf import flag_defs

FLAGS = flags.FLAGS
MODES = flag_defs.MODES
TRAIN_MODES = flag_defs.TRAIN_MODES
STRATEGIES = flag_defs.STRATEGIES
PRECISIONS = flag_defs.PRECISIONS
OPTIMIZERS = flag_defs.OPTIMIZERS
RESNET_DEPTHS = flag_defs.RESNET_DEPTHS

# The supervised train modes' protocol values (REFERENCE.md, "Protocols"),
# used for the flags a command line leaves unset: linear eval is v1 App.
# B.6, fine-tuning v2's 1% / 10% recipe. Distillation keeps the pretraining
# defaults. The resolved values are in the logged config.json; README.md
# lists them.
TRAIN_MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "lineareval": {
        "optimizer": "momentum",
        "learning_rate": 0.1,
        "learning_rate_scaling": "linear",
        "weight_decay": 0.0,
        "warmup_epochs": 0.0,
        "train_epochs": 90,
        "zero_init_logits_layer": True,
    },
    "finetune": {
        "learning_rate": 0.005,
        "learning_rate_scaling": "sqrt",
        "weight_decay": 0.0,
        "warmup_epochs": 0.0,
        "zero_init_logits_layer": True,
    },
    "distill": {},
}


def define_flags() -> None:
    """Defines every simclr_tf flag on absl's global FLAGS (idempotent)."""
    if "train_batch_size" in FLAGS:
        return
    flag_defs.define_gr_flags()
    flag_defs.define_extension_flags()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Data:
    """Where images come from and how views are made."""

    dataset: str = "imagenet2012"
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "auto"
    image_size: int = 224
    color_jitter_strength: float = 1.0
    use_blur: bool = True
    crop_min_area: float = 0.08
    brightness_impl: str = "v2"
    cache_dataset: bool = False
    label_fraction: float = 1.0
    augment_on_device: bool = False
    verify_images: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class Model:
    """Encoder and heads."""

    resnet_depth: int = 50
    width_multiplier: float = 1.0
    cifar_stem: bool = False
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    proj_head_mode: str = "nonlinear"
    proj_out_dim: int = 128
    num_proj_layers: int = 3
    ft_proj_selector: int = 0
    batch_norm_decay: float = 0.9
    global_bn: bool = True
    zero_init_logits_layer: bool = False
    lineareval_while_pretraining: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class Loss:
    """NT-Xent settings."""

    temperature: float = 0.1
    hidden_norm: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class Optim:
    """Optimizer and learning-rate schedule."""

    optimizer: str = "lars"
    learning_rate: float = 0.3
    learning_rate_scaling: str = "linear"
    warmup_epochs: float = 10
    weight_decay: float = 1e-6
    momentum: float = 0.9


@dataclasses.dataclass(frozen=True, kw_only=True)
class Train:
    """How long, in what batches, and how often to save."""

    mode: str = "train"
    train_mode: str = "pretrain"
    train_batch_size: int = 512
    train_epochs: int = 100
    train_steps: int = 0
    steps_per_loop: int = 100
    checkpoint_epochs: int = 1
    checkpoint_steps: int = 0
    keep_checkpoint_max: int = 5
    checkpoint: str | None = None
    fine_tune_after_block: int = -1
    seed: int | None = None
    teacher: str | None = None
    distill_temperature: float = 1.0
    distill_label_weight: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Eval:
    """Offline evaluation after training."""

    eval_batch_size: int = 256
    eval_steps: int = 0
    linear_eval_epochs: int = 30
    eval_baselines: bool = True
    max_eval_examples: int = 0
    eval_knn: bool = True
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_every_steps: int = 0
    knn_max_train_examples: int = 10_000
    eval_reports: bool = True
    eval_timeout_secs: int = 3600


@dataclasses.dataclass(frozen=True, kw_only=True)
class Export:
    """SavedModel export."""

    keep_hub_module_max: int = 1
    export_keras: bool = True
    export_tflite: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class Runtime:
    """Devices, distribution and numerics."""

    strategy: str = "auto"
    num_virtual_cpus: int = 0
    precision: str = "auto"
    jit_compile: bool = False
    use_tpu: bool = False
    tpu_name: str | None = None
    tpu_zone: str | None = None
    gcp_project: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a run needs, resolved from flags and validated once."""

    model_dir: str
    data: Data = dataclasses.field(default_factory=Data)
    model: Model = dataclasses.field(default_factory=Model)
    loss: Loss = dataclasses.field(default_factory=Loss)
    optim: Optim = dataclasses.field(default_factory=Optim)
    train: Train = dataclasses.field(default_factory=Train)
    eval: Eval = dataclasses.field(default_factory=Eval)
    export: Export = dataclasses.field(default_factory=Export)
    runtime: Runtime = dataclasses.field(default_factory=Runtime)

    @classmethod
    def from_flags(cls) -> Config:
        """Builds a Config from the parsed absl FLAGS (not validated)."""
        values = {name: FLAGS[name].value for name in FLAGS}
        explicit = {name for name in FLAGS if FLAGS[name].present}
        saved = saved_run_config(values) if values["mode"] == "eval" else None
        if saved is not None:
            return over_saved_run(saved, {n: values[n] for n in explicit})
        return from_dict(values, explicit=explicit)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable nested dict of every setting."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The config as indented JSON, for logs and model_dir/config.json."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_SECTIONS = {
    "data": Data,
    "model": Model,
    "loss": Loss,
    "optim": Optim,
    "train": Train,
    "eval": Eval,
    "export": Export,
    "runtime": Runtime,
}


def from_dict(
    values: Mapping[str, Any], explicit: set[str] | None = None
) -> Config:
    """Builds a Config from flat `{flag_name: value}`; unknown keys ignored.

    Args:
      values: flag values by flag name, e.g. {"train_batch_size": 256}.
        Missing names take the dataclass defaults (GR's defaults).
      explicit: the names the user set (command line or flagfile); with it,
        the others take TRAIN_MODE_DEFAULTS of values["train_mode"].

    Returns:
      The Config. `cifar_stem=None` resolves to image_size <= 32 (as GR).
    """
    values = dict(values)
    if explicit is not None:
        values.update(mode_defaults(values.get("train_mode"), explicit))
    if values.get("cifar_stem") is None:
        values["cifar_stem"] = values.get("image_size", 224) <= 32
    sections = {}
    for section, cls in _SECTIONS.items():
        names = {field.name for field in dataclasses.fields(cls)}
        sections[section] = cls(
            **{k: v for k, v in values.items() if k in names and v is not None}
        )
    model_dir = values.get("model_dir") or ""
    return Config(model_dir=model_dir, **sections)


def _flatten(nested: Mapping[str, Any]) -> dict[str, Any]:
    """Config.to_dict's nested form as flat {flag_name: value}."""
    flat: dict[str, Any] = {"model_dir": nested.get("model_dir", "")}
    for section in _SECTIONS:
        flat.update(nested.get(section, {}))
    return flat


def from_nested_dict(nested: Mapping[str, Any]) -> Config:
    """The Config of a run from its config.json (Config.to_dict's form)."""
    return from_dict(_flatten(nested))


def saved_run_config(values: Mapping[str, Any]) -> dict[str, Any] | None:
    """The config.json of the run in values["model_dir"], if it has one."""
    path = os.path.join(values.get("model_dir") or "", "config.json")
    if not values.get("model_dir") or not os.path.exists(path):
        return None
    with open(path) as file:
        return json.load(file)


def over_saved_run(
    saved: Mapping[str, Any], given: Mapping[str, Any]
) -> Config:
    """--mode=eval: a run's config.json with the flags given on top.

    The run's own settings (architecture, dataset, train mode, ...) need not
    be repeated to evaluate it; every flag the command line or a flagfile
    sets still wins, and no train-mode default replaces a saved value.

    Args:
      saved: the run's config.json (Config.to_dict's form).
      given: {flag_name: value} of the flags set explicitly.
    """
    flat = {**_flatten(saved), **given}
    return from_dict(flat, explicit=set(flat))


def mode_defaults(train_mode: str | None, explicit: set[str]) -> dict:
    """TRAIN_MODE_DEFAULTS of train_mode for the flags not in explicit."""
    defaults = TRAIN_MODE_DEFAULTS.get(train_mode or "pretrain", {})
    return {k: v for k, v in defaults.items() if k not in explicit}


def replace(config: Config, **changes: Any) -> Config:
    """A copy of config with flat flag-name changes applied."""
    flat = {}
    for section in _SECTIONS:
        flat.update(dataclasses.asdict(getattr(config, section)))
    flat["model_dir"] = config.model_dir
    flat.update(changes)
    flat.setdefault("cifar_stem", config.model.cifar_stem)
    return from_dict(flat)


def validate(config: Config) -> Config:
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


def _check_run(config: Config) -> list[str]:
    problems = []
    train = config.train
    if not config.model_dir:
        problems.append(
            "--model_dir is not set; it is where checkpoints, logs and "
            "exports go. Use e.g. --model_dir=/tmp/simclr_run."
        )
    for flag, value, allowed in (
        ("mode", train.mode, MODES),
        ("train_mode", train.train_mode, TRAIN_MODES),
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


def _check_train_mode(config: Config) -> list[str]:
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


def _check_model(model: Model) -> list[str]:
    problems = []
    if model.resnet_depth not in RESNET_DEPTHS:
        problems.append(
            f"--resnet_depth={model.resnet_depth} must be one of "
            f"{list(RESNET_DEPTHS)}; use e.g. --resnet_depth=50."
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


def _num_head_layers(model: Model) -> int:
    if model.proj_head_mode == "nonlinear":
        return model.num_proj_layers
    return 1 if model.proj_head_mode == "linear" else 0


def _check_counts(config: Config) -> list[str]:
    problems = []
    train = config.train
    positive = {
        "train_batch_size": train.train_batch_size,
        "eval_batch_size": config.eval.eval_batch_size,
        "image_size": config.data.image_size,
        "steps_per_loop": train.steps_per_loop,
        "keep_checkpoint_max": train.keep_checkpoint_max,
        "keep_hub_module_max": config.export.keep_hub_module_max,
        "linear_eval_epochs": config.eval.linear_eval_epochs,
        "knn_k": config.eval.knn_k,
    }
    for name, value in positive.items():
        if value < 1:
            problems.append(f"--{name}={value} must be >= 1.")
    if train.train_steps < 0 or train.train_epochs < 0:
        problems.append("--train_steps and --train_epochs must be >= 0.")
    if train.train_steps == 0 and train.train_epochs == 0:
        problems.append(
            "--train_steps=0 and --train_epochs=0 give no training; set "
            "one of them, e.g. --train_epochs=100."
        )
    if train.train_batch_size == 1:
        problems.append(
            "--train_batch_size=1 leaves no negatives for NT-Xent; use at "
            "least 2 (the paper uses 256 to 8192)."
        )
    if config.runtime.num_virtual_cpus < 0:
        problems.append("--num_virtual_cpus must be >= 0.")
    if (
        config.eval.knn_every_steps < 0
        or config.eval.knn_max_train_examples < 0
    ):
        problems.append(
            "--knn_every_steps and --knn_max_train_examples must be >= 0 "
            "(0 = off / all)."
        )
    return problems


def _check_ranges(config: Config) -> list[str]:
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
