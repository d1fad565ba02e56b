"""The supervised train modes' protocol values (README "Evaluation and
SimCLRv2 transfer"): what a flag left unset means in lineareval, finetune
and distill. Constants and one pure function; nothing else lives here.
"""

from __future__ import annotations

from typing import Any

# The train modes that train a supervised head on labelled views.
SUPERVISED_TRAIN_MODES = ("finetune", "lineareval", "distill")

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


def mode_defaults(train_mode: str | None, explicit: set[str]) -> dict:
    """TRAIN_MODE_DEFAULTS of train_mode for the flags not in explicit."""
    defaults = TRAIN_MODE_DEFAULTS.get(train_mode or "pretrain", {})
    return {k: v for k, v in defaults.items() if k not in explicit}
