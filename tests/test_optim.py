"""Tests for simclr_tf.optim: LARS vs numpy, schedules in closed form, and
the optimizers' gradient sum over replicas (none on one, no graph kept)."""

from __future__ import annotations

import copy
import gc
import math
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import virtual_devices

from simclr_tf import optim
from simclr_tf.config import schema as config_lib
from simclr_tf.training import builders
from simclr_tf.training import schedule as schedule_lib

# Two float32 updates of O(1) values: round-off stays below 1e-6.
RTOL = 1e-5
ATOL = 1e-6


def _reference_lars(
    weights,
    gradients,
    learning_rate,
    momentum,
    weight_decay,
    eta,
    decayed,
    adapted,
    nesterov,
):
    """The LARS update of You et al. (2017) as in GR, in float64 numpy."""
    weights = weights.astype(np.float64)
    velocity = np.zeros_like(weights)
    for gradient in gradients:
        gradient = gradient.astype(np.float64)
        if decayed:
            gradient = gradient + weight_decay * weights
        trust = 1.0
        weight_norm = np.sqrt(np.sum(weights**2))
        gradient_norm = np.sqrt(np.sum(gradient**2))
        if adapted and weight_norm > 0 and gradient_norm > 0:
            trust = eta * weight_norm / gradient_norm
        velocity = momentum * velocity + learning_rate * trust * gradient
        if nesterov:
            weights = weights - (
                momentum * velocity + learning_rate * trust * gradient
            )
        else:
            weights = weights - velocity
    return weights


def _scoped_variable(scopes, name, value):
    """A keras.Variable whose path is "scope1/scope2/.../name"."""
    if not scopes:
        return keras.Variable(value, name=name)
    with keras.name_scope(scopes[0]):
        return _scoped_variable(scopes[1:], name, value)


# (scopes, name, decayed and adapted under DEFAULT_EXCLUDE)
_VARIABLES = [
    (("encoder", "conv"), "kernel", True),
    (("encoder", "batch_normalization"), "gamma", False),
    (("encoder", "dense"), "bias", False),
    (("head_supervised",), "kernel", False),
    (("projection", "dense"), "kernel", True),  # zero: trust ratio 1
]


def _variables_and_gradients():
    rng = np.random.default_rng(0)
    values, gradients = [], []
    for index, (_, name, _) in enumerate(_VARIABLES):
        shape = (3, 2) if name == "kernel" else (2,)
        value = rng.normal(size=shape).astype(np.float32)
        if index == len(_VARIABLES) - 1:
            value = np.zeros(shape, np.float32)
        values.append(value)
        gradients.append(
            [rng.normal(size=shape).astype(np.float32) for _ in range(2)]
        )
    variables = [
        _scoped_variable(scopes, name, value)
        for (scopes, name, _), value in zip(_VARIABLES, values, strict=True)
    ]
    return variables, values, gradients


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_lars_two_steps_match_numpy(nesterov, compiled):
    hyper = dict(learning_rate=0.5, momentum=0.9, weight_decay=0.1)
    eta = 0.01  # non-default, so the coefficient's use is visible
    variables, values, gradients = _variables_and_gradients()
    optimizer = optim.LARS(**hyper, trust_coefficient=eta, nesterov=nesterov)

    def apply(step):
        optimizer.apply([tf.constant(g[step]) for g in gradients], variables)

    if compiled:
        apply = tf.function(apply)
    apply(0)
    apply(1)
    for variable, value, gradient, (_, _, flag) in zip(
        variables, values, gradients, _VARIABLES, strict=True
    ):
        expected = _reference_lars(
            value,
            gradient,
            hyper["learning_rate"],
            hyper["momentum"],
            hyper["weight_decay"],
            eta,
            flag,
            flag,
            nesterov,
        )
        np.testing.assert_allclose(
            variable.numpy(),
            expected,
            rtol=RTOL,
            atol=ATOL,
            err_msg=variable.path,
        )


def test_lars_layer_adaptation_exclusions_separate_from_decay():
    variables, values, gradients = _variables_and_gradients()
    # Decay everything, adapt nothing: plain momentum SGD on g + wd * w.
    optimizer = optim.LARS(
        0.5,
        weight_decay=0.1,
        exclude_from_weight_decay=(),
        exclude_from_layer_adaptation=(".",),
    )
    for step in range(2):
        optimizer.apply([tf.constant(g[step]) for g in gradients], variables)
    for variable, value, gradient in zip(
        variables, values, gradients, strict=True
    ):
        expected = _reference_lars(
            value, gradient, 0.5, 0.9, 0.1, 0.001, True, False, False
        )
        np.testing.assert_allclose(
            variable.numpy(), expected, rtol=RTOL, atol=ATOL
        )


def test_lars_model_variables_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(2, name="head_supervised"),
        ]
    )
    variables = model.trainable_variables
    assert all(v.dtype == "float32" for v in variables)
    before = [v.numpy() for v in variables]
    inputs = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    optimizer = optim.LARS(0.3, weight_decay=0.05, trust_coefficient=0.02)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            outputs = model(inputs, training=True)
            loss = tf.reduce_mean(tf.cast(outputs, tf.float32) ** 2)
        gradients = tape.gradient(loss, variables)
        optimizer.apply(gradients, variables)
        return gradients

    gradients = [g.numpy() for g in train_step()]
    # Only the first Dense kernel is decayed and adapted; bias, BN and the
    # supervised head are excluded by path.
    flags = [
        path == "sequential/dense/kernel"
        for path in (v.path for v in variables)
    ]
    assert sum(flags) == 1
    for variable, value, gradient, flag in zip(
        variables, before, gradients, flags, strict=True
    ):
        expected = _reference_lars(
            value, [gradient], 0.3, 0.9, 0.05, 0.02, flag, flag, False
        )
        assert variable.dtype == "float32"
        np.testing.assert_allclose(
            variable.numpy(),
            expected,
            rtol=RTOL,
            atol=ATOL,
            err_msg=variable.path,
        )


def test_lars_keeps_keras_weight_decay_off():
    optimizer = optim.LARS(0.1, weight_decay=1e-4)
    # Keras' decoupled decay would subtract lr * wd * w a second time.
    assert optimizer.weight_decay is None
    assert optimizer.weight_decay_rate == 1e-4


def test_lars_get_config_round_trip():
    schedule = optim.WarmUpAndCosineDecay(2.0, 10, 100)
    optimizer = optim.LARS(
        schedule,
        momentum=0.8,
        weight_decay=1e-5,
        trust_coefficient=0.002,
        exclude_from_weight_decay=("bias",),
        nesterov=True,
    )
    config = optimizer.get_config()
    # from_config replaces the schedule dict in place, so pass a copy.
    restored = optim.LARS.from_config(copy.deepcopy(config))
    assert restored.get_config() == config
    assert restored.exclude_from_layer_adaptation == ("bias",)
    assert float(restored.learning_rate) == float(schedule(0))


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"trust_coefficient": 0.0}, "trust_coefficient"),
    ],
)
def test_lars_rejects_bad_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        optim.LARS(0.1, **kwargs)


def _closed_form_schedule(step, base, warmup, total):
    if step < warmup:
        return base * step / warmup
    progress = min(step - warmup, total - warmup) / (total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup", [0, 10])
def test_warmup_cosine_matches_closed_form(warmup):
    base, total = 1.2, 50
    schedule = optim.WarmUpAndCosineDecay(base, warmup, total)
    steps = [0, 1, 5, 9, 10, 11, 30, 49, 50, 75]
    for step in steps:
        expected = _closed_form_schedule(step, base, warmup, total)
        actual = float(schedule(tf.constant(step, tf.int64)))
        # float32 cos and division: ~1e-7 relative of base.
        np.testing.assert_allclose(actual, expected, atol=1e-6, err_msg=step)
    if warmup:
        assert float(schedule(0)) == 0.0
        np.testing.assert_allclose(float(schedule(warmup)), base, rtol=1e-6)
    assert float(schedule(total)) == pytest.approx(0.0, abs=1e-6)


def test_warmup_cosine_get_config_round_trip():
    schedule = optim.WarmUpAndCosineDecay(0.6, 5, 20)
    restored = optim.WarmUpAndCosineDecay.from_config(schedule.get_config())
    assert restored.get_config() == schedule.get_config()


def test_warmup_cosine_rejects_warmup_past_total():
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.WarmUpAndCosineDecay(0.1, 100, 100)


def test_scaled_learning_rate_linear_and_sqrt():
    # 0.3 * 4096 / 256 = 4.8 (v1); 0.1 * sqrt(4096) = 0.1 * 64 = 6.4 (v2).
    assert optim.scaled_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)
    assert optim.scaled_learning_rate(0.1, 4096, "sqrt") == pytest.approx(6.4)
    with pytest.raises(ValueError, match="learning_rate_scaling"):
        optim.scaled_learning_rate(0.1, 256, "log")


def test_warmup_steps_formula():
    # 10 epochs * 50000 // 512 = 500000 // 512 = 976 (976.56 floored).
    assert optim.warmup_steps(10, 50_000, 512) == 976
    # 2.5 * 1000 // 64 = 2500 // 64 = 39.
    assert optim.warmup_steps(2.5, 1000, 64) == 39
    assert optim.warmup_steps(0, 1000, 64) == 0


def test_total_steps_formula():
    # 50000 * 100 // 512 + 1 = 9765 + 1.
    assert optim.total_steps(0, 100, 50_000, 512) == 9766
    assert optim.total_steps(1234, 100, 50_000, 512) == 1234


def test_build_optimizer_choices():
    lars = optim.build_optimizer("lars", 0.5, momentum=0.8, weight_decay=1e-6)
    assert isinstance(lars, optim.LARS)
    assert lars.weight_decay_rate == 1e-6 and lars.momentum == 0.8
    sgd = optim.build_optimizer("momentum", 1, weight_decay=1e-6)
    assert isinstance(sgd, optim.SGD)
    assert sgd.momentum == 0.9 and sgd.nesterov  # GR's SGD(..., True)
    assert sgd.weight_decay is None  # decay goes in the loss instead
    adam = optim.build_optimizer("adam", 1e-3)
    assert isinstance(adam, optim.Adam)
    assert adam.weight_decay is None


@pytest.mark.parametrize("train_mode", ["pretrain", "finetune"])
def test_momentum_steps_are_nesterov_in_every_train_mode(train_mode):
    """Two steps of --optimizer=momentum against Nesterov's update written
    out (Sutskever et al. 2013, as GR's Keras SGD(nesterov=True)):
    v <- m v - lr g;  w <- w + m v - lr g."""
    config = config_lib.from_dict(
        {
            "optimizer": "momentum",
            "momentum": 0.9,
            "learning_rate": 0.4,
            "learning_rate_scaling": "linear",
            "train_batch_size": 256,  # lr x 256 / 256: 0.4
            "warmup_epochs": 0,
            "weight_decay": 0,
            "train_mode": train_mode,
        },
        explicit={"optimizer", "learning_rate", "learning_rate_scaling"},
    )
    schedule = schedule_lib.Schedule(
        steps_per_epoch=100,
        total_steps=10**9,  # the cosine stays at 1 over two steps
        warmup_steps=0,
        checkpoint_every=1,
        steps_per_loop=1,
    )
    optimizer = builders.build_optimizer(config, schedule)
    weights = keras.Variable(np.array([1.0, -2.0], np.float32))
    expected, velocity = np.array([1.0, -2.0]), np.zeros(2)
    for gradient in ([0.5, 1.0], [-0.25, 2.0]):
        optimizer.apply_gradients([(tf.constant(gradient), weights)])
        velocity = 0.9 * velocity - 0.4 * np.asarray(gradient)
        expected = expected + 0.9 * velocity - 0.4 * np.asarray(gradient)
    # float32 arithmetic against float64: a few ulps.
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6)


def test_build_optimizer_rejects_unknown_name():
    with pytest.raises(ValueError, match="--optimizer='sgd'"):
        optim.build_optimizer("sgd", 0.1)


def test_lars_under_mirrored_strategy_sums_replica_gradients():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(2)
    initial = rng.normal(size=(3, 2)).astype(np.float32)
    replica_gradients = rng.normal(size=(2, 3, 2)).astype(np.float32)
    with strategy.scope():
        with keras.name_scope("dense"):
            kernel = keras.Variable(initial, name="kernel")
        optimizer = optim.LARS(0.5, weight_decay=0.1, trust_coefficient=0.01)
        optimizer.build([kernel])

    def replica_step():
        context = tf.distribute.get_replica_context()
        gradient = tf.gather(
            tf.constant(replica_gradients), context.replica_id_in_sync_group
        )
        optimizer.apply([gradient], [kernel])

    step = tf.function(lambda: strategy.run(replica_step))
    step()
    step()
    # Keras all-reduces (sums) replica gradients before the update.
    summed = replica_gradients.sum(axis=0)
    expected = _reference_lars(
        initial, [summed, summed], 0.5, 0.9, 0.1, 0.01, True, True, False
    )
    for value in strategy.experimental_local_results(kernel.value):
        np.testing.assert_allclose(
            value.numpy(), expected, rtol=RTOL, atol=ATOL
        )


def _traced_update(optimizer, model, inputs):
    """A tf.function taking one optimizer step on sum(model(inputs)^2),
    and a weak reference to its traced graph."""

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(inputs)))
        variables = model.trainable_variables
        gradients = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(gradients, variables, strict=True))
        return loss

    function = tf.function(step)
    return function, weakref.ref(function.get_concrete_function().graph)


def _dense(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])


FEATURES = np.random.default_rng(5).normal(size=(4, 3)).astype(np.float32)
KERAS_OPTIMIZERS = {
    "momentum": lambda: keras.optimizers.SGD(0.1, 0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(0.1),
}


@pytest.mark.parametrize("name", ["lars", "momentum", "adam"])
def test_optimizer_traced_update_frees_its_graph(name):
    """On one replica an update's graph goes with its tf.function."""
    function, graph = _traced_update(
        optim.build_optimizer(name, 0.1), _dense(0), FEATURES
    )
    for _ in range(2):
        function()
    del function
    gc.collect()
    assert graph() is None


def test_keras_optimizer_traced_update_keeps_its_graph():
    """What optim's optimizers avoid: Keras's sums the gradients over the
    replicas through tf.custom_gradient, whose gradient registry entry
    keeps the traced graph alive. If this fails, Keras or TensorFlow no
    longer leaks, and optim._ReplicaGradientSum can go."""
    function, graph = _traced_update(
        KERAS_OPTIMIZERS["momentum"](), _dense(0), FEATURES
    )
    function()
    del function
    gc.collect()
    assert graph() is not None


@pytest.mark.parametrize("name", sorted(KERAS_OPTIMIZERS))
def test_optimizer_on_one_replica_updates_as_keras_does(name):
    """Skipping the one-replica sum changes no weight (LARS's update is
    checked against numpy above)."""
    ours, stock = _dense(0), _dense(0)
    function, _ = _traced_update(
        optim.build_optimizer(name, 0.1), ours, FEATURES
    )
    reference, _ = _traced_update(KERAS_OPTIMIZERS[name](), stock, FEATURES)
    for _ in range(2):
        function()
        reference()
    weights = zip(ours.get_weights(), stock.get_weights(), strict=True)
    for got, want in weights:
        np.testing.assert_array_equal(got, want)


def test_optimizer_on_two_replicas_sums_their_gradients():
    """Each of 2 replicas, fed half the batch, applies the gradient of the
    whole batch: Keras's SGD on one device is the reference."""
    half = len(FEATURES) // 2
    single = _dense(0)
    reference, _ = _traced_update(
        KERAS_OPTIMIZERS["momentum"](), single, FEATURES
    )
    reference()
    strategy = tf.distribute.MirroredStrategy(virtual_devices(2))
    with strategy.scope():
        model = _dense(0)
        optimizer = optim.build_optimizer("momentum", 0.1)
        optimizer.build(model.trainable_variables)

    def replica_step():
        context = tf.distribute.get_replica_context()
        start = context.replica_id_in_sync_group * half
        with tf.GradientTape() as tape:
            outputs = model(tf.constant(FEATURES)[start : start + half])
            loss = tf.reduce_sum(tf.square(outputs))
        variables = model.trainable_variables
        gradients = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(gradients, variables, strict=True))

    tf.function(lambda: strategy.run(replica_step))()
    for variable, want in zip(
        model.trainable_variables, single.get_weights(), strict=True
    ):
        copies = strategy.experimental_local_results(variable.value)
        assert len(copies) == 2
        for copy_ in copies:
            # The halves' gradients summed in another order than the
            # whole batch's: float32 round-off of O(1) values.
            np.testing.assert_allclose(copy_.numpy(), want, rtol=1e-6)
