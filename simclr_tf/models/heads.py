"""SimCLR heads: the projection head g(.) and the linear (supervised) head.

The projection head follows SimCLR v1 Sec. 2.1 / v2 Sec. 2 and GR's
`ProjectionHead`; the linear head is GR's `head_supervised`. Neither decides
where gradients stop: that is `simclr.SimCLRModel`'s job.
"""

from __future__ import annotations

from typing import Literal

import keras
import tensorflow as tf

from simclr_tf.models import batch_norm as batch_norm_lib

BATCH_NORM_EPSILON = 1e-5
PROJ_HEAD_MODES = ("nonlinear", "linear", "none")


@keras.saving.register_keras_serializable(package="simclr_tf")
class ProjectionHead(keras.layers.Layer):
    """Projection head returning every hidden layer's output.

    "nonlinear": num_proj_layers Dense layers without bias, each followed by
    BN; hidden width = input width, ReLU after all but the last; the last
    maps to proj_out_dim and its BN learns gamma only (center=False), as in
    GR. "linear": a single Dense(proj_out_dim) + BN(center=False). "none":
    the input itself. Kernels start from N(0, 0.01). Unlike GR, "linear" and
    "none" work here.

    `call(inputs, training)` takes [B, F] float features and returns the
    list of hiddens [inputs, out_1, ..., out_L]; hiddens[-1] is z.

    Args:
        proj_head_mode: "nonlinear", "linear" or "none".
        proj_out_dim: output width of the last layer, >= 1.
        num_proj_layers: layers in "nonlinear" mode, >= 1 (2 = SimCLR v1,
            3 = v2).
        batch_norm_decay: BN moving-average momentum in [0, 1).
        global_bn: synchronise BN statistics across replicas.
        **kwargs: keras.layers.Layer arguments (name, dtype, ...).

    Raises:
        ValueError: unknown mode or a count below 1.
    """

    def __init__(
        self,
        proj_head_mode: Literal["nonlinear", "linear", "none"] = "nonlinear",
        proj_out_dim: int = 128,
        num_proj_layers: int = 2,
        batch_norm_decay: float = 0.9,
        global_bn: bool = True,
        **kwargs: object,
    ) -> None:
        kwargs.setdefault("name", "projection_head")
        super().__init__(**kwargs)
        if proj_head_mode not in PROJ_HEAD_MODES:
            raise ValueError(
                f"proj_head_mode={proj_head_mode!r} is not one of "
                f"{PROJ_HEAD_MODES}; use e.g. 'nonlinear'."
            )
        for argument, value in (
            ("proj_out_dim", proj_out_dim),
            ("num_proj_layers", num_proj_layers),
        ):
            if value < 1:
                raise ValueError(
                    f"{argument}={value} must be >= 1; use e.g. 2."
                )
        self.proj_head_mode = proj_head_mode
        self.proj_out_dim = proj_out_dim
        self.num_proj_layers = num_proj_layers
        self.batch_norm_decay = batch_norm_decay
        self.global_bn = global_bn

    @property
    def num_layers(self) -> int:
        """Number of Dense+BN layers, i.e. len(hiddens) - 1."""
        return {"nonlinear": self.num_proj_layers, "linear": 1, "none": 0}[
            self.proj_head_mode
        ]

    def build(self, input_shape: tuple) -> None:
        input_width = int(input_shape[-1])
        shape = tuple(input_shape)
        for index in range(self.num_layers):
            is_last = index == self.num_layers - 1
            dense = keras.layers.Dense(
                self.proj_out_dim if is_last else input_width,
                use_bias=False,
                kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                name=f"dense_{index}",
            )
            batch_norm = batch_norm_lib.FusedBatchNormalization(
                momentum=self.batch_norm_decay,
                epsilon=BATCH_NORM_EPSILON,
                # The last layer's BN has gamma only (GR: center=use_bias).
                center=not is_last,
                synchronized=self.global_bn,
                name=f"batch_normalization_{index}",
            )
            dense.build(shape)
            shape = shape[:-1] + (dense.units,)
            batch_norm.build(shape)
            # Plain attributes, not list items: tf.train.Checkpoint does not
            # see into Keras-tracked lists, so listed layers would be lost.
            setattr(self, f"dense_{index}", dense)
            setattr(self, f"batch_normalization_{index}", batch_norm)

    @property
    def dense_layers(self) -> list[keras.layers.Dense]:
        """The Dense layers, first to last (after build)."""
        return [getattr(self, f"dense_{i}") for i in range(self.num_layers)]

    @property
    def batch_norm_layers(self) -> list[keras.layers.BatchNormalization]:
        """The BatchNormalization layers, first to last (after build)."""
        return [
            getattr(self, f"batch_normalization_{i}")
            for i in range(self.num_layers)
        ]

    def call(
        self, inputs: tf.Tensor, training: bool | None = None
    ) -> list[tf.Tensor]:
        hiddens = [inputs]
        for index, (dense, batch_norm) in enumerate(
            zip(self.dense_layers, self.batch_norm_layers, strict=True)
        ):
            outputs = batch_norm(dense(hiddens[-1]), training=training)
            if index != self.num_layers - 1:
                outputs = keras.ops.relu(outputs)
            hiddens.append(outputs)
        return hiddens

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            proj_head_mode=self.proj_head_mode,
            proj_out_dim=self.proj_out_dim,
            num_proj_layers=self.num_proj_layers,
            batch_norm_decay=self.batch_norm_decay,
            global_bn=self.global_bn,
        )
        return config


@keras.saving.register_keras_serializable(package="simclr_tf")
class LinearHead(keras.layers.Layer):
    """Linear classifier (GR's `head_supervised`): Dense with bias.

    The inner Dense is always named "head_supervised", so its variable paths
    contain that string whatever this layer is called; LARS uses it to skip
    the head (it gets 1/2 * wd * ||w||^2 in the loss instead).

    `call(inputs)` maps [B, F] float features to [B, num_classes] logits.

    Args:
        num_classes: number of classes, >= 1.
        zero_init: start the kernel at 0 instead of N(0, 0.01)
            (--zero_init_logits_layer). The bias always starts at 0.
        **kwargs: keras.layers.Layer arguments (name, dtype, ...).

    Raises:
        ValueError: num_classes < 1.
    """

    def __init__(
        self, num_classes: int, zero_init: bool = False, **kwargs: object
    ) -> None:
        kwargs.setdefault("name", "head_supervised")
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(
                f"num_classes={num_classes} must be >= 1 for a linear head; "
                "pass the dataset's number of classes."
            )
        self.num_classes = num_classes
        self.zero_init = zero_init
        self.dense = keras.layers.Dense(
            num_classes,
            use_bias=True,
            kernel_initializer=(
                "zeros"
                if zero_init
                else keras.initializers.RandomNormal(stddev=0.01)
            ),
            name="head_supervised",
        )

    def build(self, input_shape: tuple) -> None:
        self.dense.build(tuple(input_shape))

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return self.dense(inputs)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(num_classes=self.num_classes, zero_init=self.zero_init)
        return config
