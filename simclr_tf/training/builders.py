"""The model and optimizer a Config describes (call inside the strategy's
scope). Shared by training, the distillation teacher and the evaluation's
random-init baseline.
"""

from __future__ import annotations

import keras

from simclr_tf import optim
from simclr_tf.config import protocols
from simclr_tf.config import schema as config_lib
from simclr_tf.models import simclr
from simclr_tf.training import schedule as schedule_lib


def build_model(
    config: config_lib.Config, num_classes: int, image_channels: int
) -> simclr.SimCLRModel:
    """The SimCLRModel for a Config (call inside the strategy's scope).

    Pretraining: a supervised head (behind stop_gradient) when
    --lineareval_while_pretraining and the data has labels. The supervised
    train modes: a head in "finetune" mode, which gradients pass through
    unless modes.freeze stops them.
    """
    model_config = config.model
    tuning = config.train.train_mode in protocols.SUPERVISED_TRAIN_MODES
    with_head = tuning or (
        model_config.lineareval_while_pretraining and num_classes > 0
    )
    return simclr.SimCLRModel(
        resnet_depth=model_config.resnet_depth,
        width_multiplier=model_config.width_multiplier,
        cifar_stem=model_config.cifar_stem,
        image_channels=image_channels,
        sk_ratio=model_config.sk_ratio,
        se_ratio=model_config.se_ratio,
        proj_head_mode=model_config.proj_head_mode,
        proj_out_dim=model_config.proj_out_dim,
        num_proj_layers=model_config.num_proj_layers,
        ft_proj_selector=model_config.ft_proj_selector,
        num_classes=num_classes if with_head else None,
        train_mode="finetune" if tuning else "pretrain",
        zero_init_logits_layer=model_config.zero_init_logits_layer,
        batch_norm_decay=model_config.batch_norm_decay,
        global_bn=model_config.global_bn,
    )


def build_learning_rate(
    config: config_lib.Config, schedule: schedule_lib.Schedule
) -> optim.WarmUpAndCosineDecay:
    """The scaled, warmed-up cosine learning rate of the schedule."""
    base = optim.scaled_learning_rate(
        config.optim.learning_rate,
        config.train.train_batch_size,
        config.optim.learning_rate_scaling,
    )
    return optim.WarmUpAndCosineDecay(
        base, schedule.warmup_steps, schedule.total_steps
    )


def build_optimizer(
    config: config_lib.Config,
    schedule: schedule_lib.Schedule,
    learning_rate: optim.WarmUpAndCosineDecay | None = None,
) -> keras.optimizers.Optimizer:
    """Optimizer with the scaled, warmed-up cosine learning rate (made from
    the schedule unless given)."""
    if learning_rate is None:
        learning_rate = build_learning_rate(config, schedule)
    optimizer = optim.build_optimizer(
        config.optim.optimizer,
        learning_rate,
        momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay,
    )
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
