"""The frozen Config a run resolves its flags to, and its dict forms.

Sections (Data, Model, Loss, Optim, Train, Eval, Export, Runtime) are
frozen, kw_only dataclasses; builders take their own section. Flag names
and defaults follow google-research/simclr's tf2/run.py (flag_defs.py).
Validation lives in validation.py, reading flags and files in loading.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from simclr_tf.config import protocols

# The values the enumerated flags accept (flag_defs.py defines the flags).
MODES = ("train", "eval", "train_then_eval", "export", "preview", "plan")
TRAIN_MODES = ("pretrain", "finetune", "lineareval", "distill")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
OPTIMIZERS = ("lars", "momentum", "adam")
RESNET_DEPTHS = (18, 34, 50, 101, 152, 200)


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
    time_budget_minutes: float = 0.0
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
    baseline_max_train_examples: int = 100_000
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
    master: str | None = None
    tpu_zone: str | None = None
    gcp_project: str | None = None
    device_memory_gb: float = 0.0
    host_memory_gb: float = 0.0


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
        the others take protocols.TRAIN_MODE_DEFAULTS of values["train_mode"].

    Returns:
      The Config. `cifar_stem=None` resolves to image_size <= 32 (as GR).
    """
    values = dict(values)
    if explicit is not None:
        values.update(
            protocols.mode_defaults(values.get("train_mode"), explicit)
        )
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


def flatten(nested: Mapping[str, Any]) -> dict[str, Any]:
    """Config.to_dict's nested form as flat {flag_name: value}."""
    flat: dict[str, Any] = {"model_dir": nested.get("model_dir", "")}
    for section in _SECTIONS:
        flat.update(nested.get(section, {}))
    return flat


def from_nested_dict(nested: Mapping[str, Any]) -> Config:
    """The Config of a run from its config.json (Config.to_dict's form)."""
    return from_dict(flatten(nested))


def replace(config: Config, **changes: Any) -> Config:
    """A copy of config with flat flag-name changes applied."""
    flat = {}
    for section in _SECTIONS:
        flat.update(dataclasses.asdict(getattr(config, section)))
    flat["model_dir"] = config.model_dir
    flat.update(changes)
    flat.setdefault("cifar_stem", config.model.cifar_stem)
    return from_dict(flat)
