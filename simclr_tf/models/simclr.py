"""SimCLRModel: ResNet encoder + projection head + optional linear head.

Both augmented views pass through the encoder as one batch (the caller
concatenates them along the batch axis), so BN statistics cover both views
and cannot leak the positive pair (GR issue #114). The loss, the optimizer
and the training loop live elsewhere; this module only maps images to the
named outputs.
"""

from __future__ import annotations

from typing import Literal

import keras
import tensorflow as tf

from simclr_tf.models import heads, resnet

TRAIN_MODES = ("pretrain", "finetune")


@keras.saving.register_keras_serializable(package="simclr_tf")
class SimCLRModel(keras.Model):
    """SimCLR network returning a dict of named outputs.

    `call(images, training=False)` maps [B, H, W, image_channels] float
    images in [0, 1] to a dict: "final_avg_pool" and "proj_head_input"
    ([B, F] encoder features), "proj_head_output" ([B, proj_out_dim] z,
    float32) and, with a supervised head, "logits_sup" ([B, num_classes],
    float32). The supervised head reads hiddens[ft_proj_selector] of the
    projection head (0 = encoder output, j = output of head layer j, -1 =
    last); in "pretrain" mode through stop_gradient, so the linear eval run
    alongside pretraining does not train the encoder or the head; in
    "finetune" mode gradients flow into both.

    Args:
        resnet_depth: 18, 34, 50, 101, 152 or 200.
        width_multiplier: encoder channel multiplier > 0 (fractions allowed).
        cifar_stem: 3x3/1 stem without max-pool (images <= 32 px).
        image_channels: C of the input images (3 RGB, 1 grayscale).
        sk_ratio: selective-kernel ratio (0 = off; SimCLRv2 uses 0.0625),
            with the ResNet-D stem and average-pool shortcuts.
        se_ratio: squeeze-excitation ratio (0 = off).
        proj_head_mode: "nonlinear", "linear" or "none".
        proj_out_dim: width of z.
        num_proj_layers: projection layers in "nonlinear" mode.
        ft_proj_selector: index into the projection head's hiddens feeding
            the supervised head, in [-(L + 1), L] for L head layers.
        num_classes: classes of the supervised head; None or 0 for none.
        train_mode: "pretrain" or "finetune".
        zero_init_logits_layer: zero-initialise the supervised kernel.
        batch_norm_decay: BN moving-average momentum in [0, 1).
        global_bn: synchronise BN statistics across replicas.
        **kwargs: keras.Model arguments (name, ...).

    Raises:
        ValueError: an invalid depth, mode, selector, or SK / SE requested.
    """

    def __init__(
        self,
        resnet_depth: int = 50,
        width_multiplier: float = 1.0,
        cifar_stem: bool = False,
        image_channels: int = 3,
        sk_ratio: float = 0.0,
        se_ratio: float = 0.0,
        proj_head_mode: Literal["nonlinear", "linear", "none"] = "nonlinear",
        proj_out_dim: int = 128,
        num_proj_layers: int = 2,
        ft_proj_selector: int = 0,
        num_classes: int | None = None,
        train_mode: Literal["pretrain", "finetune"] = "pretrain",
        zero_init_logits_layer: bool = False,
        batch_norm_decay: float = 0.9,
        global_bn: bool = True,
        **kwargs: object,
    ) -> None:
        kwargs.setdefault("name", "simclr_model")
        super().__init__(**kwargs)
        self._simclr_config = {
            "resnet_depth": resnet_depth,
            "width_multiplier": width_multiplier,
            "cifar_stem": cifar_stem,
            "image_channels": image_channels,
            "sk_ratio": sk_ratio,
            "se_ratio": se_ratio,
            "proj_head_mode": proj_head_mode,
            "proj_out_dim": proj_out_dim,
            "num_proj_layers": num_proj_layers,
            "ft_proj_selector": ft_proj_selector,
            "num_classes": num_classes,
            "train_mode": train_mode,
            "zero_init_logits_layer": zero_init_logits_layer,
            "batch_norm_decay": batch_norm_decay,
            "global_bn": global_bn,
        }
        if train_mode not in TRAIN_MODES:
            raise ValueError(
                f"train_mode={train_mode!r} is not one of {TRAIN_MODES}; "
                "use 'pretrain' or 'finetune'."
            )
        self.train_mode = train_mode
        self.ft_proj_selector = ft_proj_selector
        projection_head = heads.ProjectionHead(
            proj_head_mode,
            proj_out_dim,
            num_proj_layers,
            batch_norm_decay=batch_norm_decay,
            global_bn=global_bn,
        )
        # Checked before the (slow) encoder build; assigned after it so the
        # encoder's weights come first in `weights`.
        _check_selector(ft_proj_selector, projection_head.num_layers)
        self.encoder = resnet.ResNet(
            resnet_depth,
            width_multiplier,
            cifar_stem,
            sk_ratio,
            se_ratio,
            input_shape=(None, None, image_channels),
            batch_norm_decay=batch_norm_decay,
            global_bn=global_bn,
        )
        self.projection_head = projection_head
        self.supervised_head = None
        if num_classes:
            self.supervised_head = heads.LinearHead(
                num_classes, zero_init=zero_init_logits_layer
            )

    def call(
        self, images: tf.Tensor, training: bool | None = False
    ) -> dict[str, tf.Tensor]:
        features = self.encoder(images, training=training)
        return self._apply_heads(features, training)

    def endpoints(
        self, images: tf.Tensor, training: bool | None = False
    ) -> dict[str, tf.Tensor]:
        """Runs the model and also returns the encoder's intermediate outputs.

        Args:
            images: [B, H, W, image_channels] float images in [0, 1].
            training: run BN in training mode (batch statistics).

        Returns:
            The `call` outputs plus initial_conv, initial_max_pool and
            block_group1..4 ([B, h, w, c] feature maps).
        """
        encoder_endpoints = resnet.endpoints_model(self.encoder)
        outputs = dict(encoder_endpoints(images, training=training))
        outputs.update(self._apply_heads(outputs["final_avg_pool"], training))
        return outputs

    def _apply_heads(
        self, features: tf.Tensor, training: bool | None
    ) -> dict[str, tf.Tensor]:
        """Maps [B, F] encoder features to the heads' named outputs."""
        hiddens = self.projection_head(features, training=training)
        outputs = {
            "final_avg_pool": features,
            "proj_head_input": hiddens[0],
            "proj_head_output": keras.ops.cast(hiddens[-1], "float32"),
        }
        if self.supervised_head is not None:
            supervised_inputs = hiddens[self.ft_proj_selector]
            if self.train_mode == "pretrain":
                # Linear eval during pretraining must not train the network.
                supervised_inputs = keras.ops.stop_gradient(supervised_inputs)
            logits = self.supervised_head(supervised_inputs)
            outputs["logits_sup"] = keras.ops.cast(logits, "float32")
        return outputs

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            **self._simclr_config,
        }

    @classmethod
    def from_config(cls, config: dict) -> SimCLRModel:
        return cls(**config)


def _check_selector(ft_proj_selector: int, num_head_layers: int) -> None:
    """Raises ValueError unless ft_proj_selector indexes the head's hiddens."""
    if not -(num_head_layers + 1) <= ft_proj_selector <= num_head_layers:
        raise ValueError(
            f"ft_proj_selector={ft_proj_selector} does not index the "
            f"{num_head_layers + 1} projection-head hiddens (encoder output "
            f"+ {num_head_layers} layers); use a value in "
            f"[{-(num_head_layers + 1)}, {num_head_layers}], e.g. 0."
        )
