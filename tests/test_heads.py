"""Tests for simclr_tf.models.heads against numpy references and properties."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from simclr_tf.models import heads


def _features(batch=8, width=16, seed=0):
    return (
        np.random.default_rng(seed)
        .normal(size=[batch, width])
        .astype("float32")
    )


@pytest.mark.parametrize("num_proj_layers", [1, 2, 3])
def test_projection_head_hidden_widths(num_proj_layers):
    head = heads.ProjectionHead(
        "nonlinear", proj_out_dim=5, num_proj_layers=num_proj_layers
    )
    hiddens = head(_features(width=16), training=False)
    widths = [int(h.shape[-1]) for h in hiddens]
    assert widths == [16] * num_proj_layers + [5]


def test_projection_head_has_no_dense_bias_and_no_last_beta():
    head = heads.ProjectionHead(num_proj_layers=3)
    head(_features(), training=False)
    paths = [v.path for v in head.weights]
    assert not any(path.endswith("/bias") for path in paths)
    betas = [path for path in paths if path.endswith("/beta")]
    assert betas == [
        "projection_head/batch_normalization_0/beta",
        "projection_head/batch_normalization_1/beta",
    ]
    assert [norm.center for norm in head.batch_norm_layers] == [
        True,
        True,
        False,
    ]


def _numpy_projection_head(head, features):
    """Dense -> BN (inference) -> ReLU except last, from the raw weights."""
    hiddens = [features.astype("float64")]
    for index, (dense, norm) in enumerate(
        zip(head.dense_layers, head.batch_norm_layers, strict=True)
    ):
        outputs = hiddens[-1] @ np.asarray(dense.kernel)
        outputs = (outputs - np.asarray(norm.moving_mean)) / np.sqrt(
            np.asarray(norm.moving_variance) + 1e-5
        )
        outputs = outputs * np.asarray(norm.gamma)
        if norm.center:
            outputs = outputs + np.asarray(norm.beta)
        if index < len(head.dense_layers) - 1:
            outputs = np.maximum(outputs, 0)
        hiddens.append(outputs)
    return hiddens


@pytest.mark.parametrize(
    "mode, expected_layers", [("nonlinear", 3), ("linear", 1)]
)
def test_projection_head_matches_numpy_reference(mode, expected_layers):
    head = heads.ProjectionHead(mode, proj_out_dim=4, num_proj_layers=3)
    features = _features()
    head(features, training=False)
    rng = np.random.default_rng(1)
    for norm in head.batch_norm_layers:  # non-trivial inference statistics
        size = norm.gamma.shape[0]
        norm.gamma.assign(rng.uniform(0.5, 1.5, size))
        if norm.center:
            norm.beta.assign(rng.normal(0, 0.1, size))
        norm.moving_mean.assign(rng.normal(0, 0.01, size))
        norm.moving_variance.assign(rng.uniform(0.5, 2, size) * 1e-3)
    hiddens = head(features, training=False)
    expected = _numpy_projection_head(head, features)
    assert len(hiddens) == expected_layers + 1
    for actual, reference in zip(hiddens, expected, strict=True):
        # float32 vs float64 over 16-term dot products.
        np.testing.assert_allclose(actual, reference, rtol=1e-4, atol=1e-5)


def test_projection_head_relu_on_all_but_last_layer():
    head = heads.ProjectionHead(num_proj_layers=3, proj_out_dim=8)
    hiddens = head(_features(batch=32), training=True)
    for hidden in hiddens[1:-1]:
        assert np.min(hidden) >= 0
    # Batch-normalised without ReLU: about half the entries are negative.
    assert np.mean(np.asarray(hiddens[-1]) < 0) > 0.3


def test_projection_head_none_returns_input_only():
    features = _features()
    hiddens = heads.ProjectionHead("none")(features, training=True)
    assert len(hiddens) == 1
    np.testing.assert_array_equal(hiddens[0], features)


def test_projection_head_kernel_initialiser_stddev():
    head = heads.ProjectionHead(num_proj_layers=2, proj_out_dim=256)
    head(_features(width=256), training=False)
    kernel = np.asarray(head.dense_layers[0].kernel)
    # N(0, 0.01) over 65536 draws: the std estimate is within ~0.3%.
    assert abs(kernel.std() / 0.01 - 1) < 0.02
    assert abs(kernel.mean()) < 1e-4


def test_projection_head_rejects_unknown_mode():
    with pytest.raises(ValueError, match="proj_head_mode='mlp'"):
        heads.ProjectionHead("mlp")


def test_projection_head_config_round_trip_gives_identical_outputs():
    head = heads.ProjectionHead(
        "nonlinear", 6, 3, batch_norm_decay=0.8, global_bn=False, name="ph"
    )
    features = _features()
    head(features, training=False)
    clone = heads.ProjectionHead.from_config(head.get_config())
    clone(features, training=False)
    clone.set_weights(head.get_weights())
    assert clone.get_config() == head.get_config()
    for original, copied in zip(
        head(features, training=True),
        clone(features, training=True),
        strict=True,
    ):
        np.testing.assert_array_equal(original, copied)


def test_linear_head_variable_paths_contain_head_supervised():
    head = heads.LinearHead(3, name="probe")
    head(_features())
    paths = [v.path for v in head.weights]
    assert len(paths) == 2
    assert all("head_supervised" in path for path in paths)


def test_linear_head_matches_numpy_reference():
    head = heads.LinearHead(3)
    features = _features()
    head(features)
    head.dense.bias.assign([0.5, -1.0, 2.0])
    expected = features @ np.asarray(head.dense.kernel) + [0.5, -1.0, 2.0]
    # float32 16-term dot products.
    np.testing.assert_allclose(head(features), expected, rtol=1e-5, atol=1e-6)


def test_linear_head_zero_init_gives_zero_logits():
    head = heads.LinearHead(4, zero_init=True)
    np.testing.assert_array_equal(head(_features()), np.zeros([8, 4]))


def test_linear_head_default_kernel_stddev():
    head = heads.LinearHead(256)
    head(_features(width=256))
    # N(0, 0.01) over 65536 draws: the std estimate is within ~0.3%.
    assert abs(np.asarray(head.dense.kernel).std() / 0.01 - 1) < 0.02


def test_linear_head_config_round_trip_gives_identical_outputs():
    head = heads.LinearHead(5, zero_init=False, name="probe")
    features = _features()
    head(features)
    clone = heads.LinearHead.from_config(head.get_config())
    clone(features)
    clone.set_weights(head.get_weights())
    assert clone.get_config() == head.get_config()
    np.testing.assert_array_equal(head(features), clone(features))


def test_linear_head_rejects_zero_classes():
    with pytest.raises(ValueError, match="num_classes=0"):
        heads.LinearHead(0)


def test_heads_compute_in_bfloat16_under_mixed_policy():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    hiddens = heads.ProjectionHead()(_features(), training=True)
    logits = heads.LinearHead(3)(hiddens[-1])
    dtypes = [keras.backend.standardize_dtype(h.dtype) for h in hiddens]
    assert dtypes == ["bfloat16"] * 3  # inputs are autocast too
    assert keras.backend.standardize_dtype(logits.dtype) == "bfloat16"
