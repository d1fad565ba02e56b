"""Tests for simclr_tf.models.simclr: outputs, gradient flow, dtypes, config."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.models import resnet, simclr

SMALL = {"resnet_depth": 18, "width_multiplier": 0.25, "cifar_stem": True}


def _images(batch=4, side=16, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random([batch, side, side, channels]).astype("float32")


@pytest.fixture(scope="module")
def pretrain_model():
    """Pretraining model with a 3-class head on head layer 1 (shared)."""
    return simclr.SimCLRModel(**SMALL, num_classes=3, ft_proj_selector=1)


@pytest.fixture(scope="module")
def finetune_model():
    """Fine-tuning model with a 3-class head on the last layer (shared)."""
    return simclr.SimCLRModel(
        **SMALL, num_classes=3, ft_proj_selector=-1, train_mode="finetune"
    )


def _gradients(model, images):
    """Gradients of a supervised loss on logits_sup, None made zero."""
    labels = np.arange(images.shape[0]) % 3
    with tf.GradientTape() as tape:
        logits = model(images, training=True)["logits_sup"]
        loss = keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True
            )
        )
    variables = model.encoder.trainable_variables
    variables += model.projection_head.trainable_variables
    gradients = tape.gradient(loss, variables)
    return {
        v.path: np.zeros(v.shape) if g is None else np.asarray(g)
        for v, g in zip(variables, gradients, strict=True)
    }


def test_simclr_model_output_names_and_shapes(pretrain_model):
    outputs = pretrain_model(_images(), training=True)
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {
        "final_avg_pool": (4, 128),
        "proj_head_input": (4, 128),
        "proj_head_output": (4, 128),
        "logits_sup": (4, 3),
    }


def test_simclr_model_without_classes_has_no_logits():
    model = simclr.SimCLRModel(**SMALL, image_channels=1, proj_out_dim=7)
    outputs = model(_images(channels=1), training=True)
    assert model.supervised_head is None
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {
        "final_avg_pool": (4, 128),
        "proj_head_input": (4, 128),
        "proj_head_output": (4, 7),
    }


def test_simclr_model_zero_classes_means_no_supervised_head():
    model = simclr.SimCLRModel(**SMALL, num_classes=0)
    assert model.supervised_head is None


def test_simclr_model_proj_head_input_is_encoder_output(pretrain_model):
    images = _images()
    outputs = pretrain_model(images, training=False)
    features = pretrain_model.encoder(images, training=False)
    np.testing.assert_array_equal(outputs["proj_head_input"], features)
    np.testing.assert_array_equal(outputs["final_avg_pool"], features)


@pytest.mark.parametrize(
    "fixture, selector",
    [("pretrain_model", 1), ("finetune_model", 2)],  # 2 = -1 of 3 hiddens
)
def test_simclr_model_supervised_head_reads_selected_hidden(
    fixture, selector, request
):
    model = request.getfixturevalue(fixture)
    images = _images()
    logits = model(images, training=False)["logits_sup"]
    features = model.encoder(images, training=False)
    hiddens = model.projection_head(features, training=False)
    dense = model.supervised_head.dense
    expected = np.asarray(hiddens[selector]) @ np.asarray(dense.kernel)
    expected += np.asarray(dense.bias)
    # float32 dot products over <= 128 terms.
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-6)


def test_simclr_model_pretrain_stops_supervised_gradient(pretrain_model):
    gradients = _gradients(pretrain_model, _images())
    for path, gradient in gradients.items():
        assert not np.any(gradient), path


def test_simclr_model_finetune_passes_supervised_gradient(finetune_model):
    gradients = _gradients(finetune_model, _images())
    # The stem reaches the logits through every shortcut even while the
    # zero-init residual branches pass no gradient.
    assert np.any(gradients["initial_conv2d/kernel"])
    first_head_kernel = finetune_model.projection_head.dense_layers[0].kernel
    assert np.any(gradients[first_head_kernel.path])


def test_simclr_model_mixed_bfloat16_outputs_are_float32():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = simclr.SimCLRModel(**SMALL, num_classes=3)
    outputs = model(_images(), training=True)
    dtypes = {
        k: keras.backend.standardize_dtype(v.dtype) for k, v in outputs.items()
    }
    assert dtypes == {
        "final_avg_pool": "bfloat16",  # the encoder does run in bfloat16
        "proj_head_input": "bfloat16",
        "proj_head_output": "float32",
        "logits_sup": "float32",
    }
    assert all(np.all(np.isfinite(v)) for v in outputs.values())


def test_simclr_model_config_round_trip_gives_identical_outputs():
    model = simclr.SimCLRModel(
        **SMALL,
        proj_head_mode="linear",
        proj_out_dim=9,
        num_classes=5,
        ft_proj_selector=1,
        train_mode="finetune",
        batch_norm_decay=0.8,
        global_bn=False,
        name="probe",
    )
    images = _images()
    model(images)
    clone = simclr.SimCLRModel.from_config(model.get_config())
    clone(images)
    clone.set_weights(model.get_weights())
    assert clone.get_config() == model.get_config()
    original, copied = model(images), clone(images)
    for name in original:
        np.testing.assert_array_equal(original[name], copied[name], name)


def test_simclr_model_endpoints_extend_call_outputs(pretrain_model):
    model = pretrain_model
    images = _images()
    endpoints = model.endpoints(images)
    outputs = model(images)
    assert set(endpoints) == set(resnet.ENDPOINT_NAMES) | set(outputs)
    for name, value in outputs.items():
        # Same weights, same ops, inference mode: only threading may differ.
        np.testing.assert_allclose(endpoints[name], value, rtol=1e-6, atol=1e-6)
    assert tuple(endpoints["block_group4"].shape) == (4, 2, 2, 128)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"train_mode": "distill"}, "train_mode='distill'"),
        ({"ft_proj_selector": 3}, "ft_proj_selector=3"),
        ({"proj_head_mode": "none", "ft_proj_selector": 1}, "selector=1"),
        ({"sk_ratio": -0.5}, r"sk_ratio=-0.5 must be >= 0"),
        ({"resnet_depth": 42}, "depth=42"),
    ],
)
def test_simclr_model_rejects_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        simclr.SimCLRModel(**{**SMALL, **kwargs})


@pytest.mark.parametrize("global_bn", [True, False])
def test_simclr_model_global_bn_matches_single_device_batch(global_bn):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = simclr.SimCLRModel(**SMALL, global_bn=global_bn)
    images = _images(batch=8)
    # Cross-replica call: plain BN over the whole batch of 8.
    single = np.asarray(model(images, training=True)["proj_head_output"])
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(8)
    batch = next(iter(strategy.experimental_distribute_dataset(dataset)))
    per_replica = strategy.run(
        lambda x: model(x, training=True)["proj_head_output"], args=(batch,)
    )
    split = np.concatenate(
        [
            np.asarray(t)
            for t in strategy.experimental_local_results(per_replica)
        ]
    )
    # Sync BN's E[x^2] - E[x]^2 from two partial sums vs tf.nn.moments:
    # float32 rounding through 17 BN layers (observed ~1e-5 on outputs ~1).
    matches = np.allclose(split, single, rtol=1e-4, atol=1e-4)
    assert matches == global_bn  # local BN on 4 of 8 rows must differ


def test_simclr_model_checkpoint_round_trips_every_variable(tmp_path):
    """tf.train.Checkpoint must see every weight, heads' BN statistics too."""
    kwargs = dict(
        resnet_depth=18,
        width_multiplier=0.125,
        cifar_stem=True,
        num_classes=10,
        num_proj_layers=3,
    )
    source = simclr.SimCLRModel(**kwargs)
    source(_images(), training=True)  # moves BN statistics off their init
    for variable in source.weights:
        variable.assign(variable + 0.5)
    path = tf.train.Checkpoint(model=source).save(str(tmp_path / "ckpt"))
    keras.utils.set_random_seed(1)
    target = simclr.SimCLRModel(**kwargs)
    target(_images())
    tf.train.Checkpoint(model=target).restore(path).assert_consumed()
    for saved, restored in zip(source.weights, target.weights, strict=True):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy())
