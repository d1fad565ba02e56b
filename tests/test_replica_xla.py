"""What a replica runs, compiled with XLA, on 2 virtual CPUs.

On TPUs and on GPUs with --jit_compile, each replica's function is compiled
by XLA, and MirroredStrategy on GPUs refuses merge_call inside it (it uses
collectives instead). TensorFlow 2.21 cannot reproduce that on CPUs:

* `strategy.run(tf.function(fn, jit_compile=True))` over several CPUs lifts
  the function around all replicas (one XLA program). With the default
  cross-device ops it fails: "Trying to access resource Variable/1 ...
  located in device CPU:1 from device CPU:0" (the collectives' ordering
  token variables); a model's captured variables fail the same way.
* calling a jit-compiled function from a plain replica function fails at
  the first merge_call: "`merge_call` called while defining a new graph or
  a tf.function".
* taking the GPU path on CPUs (collectives inside XLA) fails with
  "Collectives are not yet implemented for CPU devices when compiling with
  XLA" (or "Only compiling NCCL/auto collective is supported, got: ring").

So the tests split the question in two. (1) XLA compiles exactly the
replica functions (nt_xent with a replica context, synchronised BN), their
tensors passed as arguments, in the lifted form that works on CPUs with
ReductionToOneDevice, and gives the plain graph's values and gradients.
(2) With MirroredStrategy forced onto the collective path it takes inside
XLA on GPUs, the same functions run without any merge_call.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import losses
from simclr_tf.config import schema as config_lib
from simclr_tf.models import batch_norm
from simclr_tf.training import builders

REPLICAS = 2
LOCAL_BATCH = 4
TEMPERATURE = 0.2
EPSILON = 1e-5


def _strategy(**kwargs) -> tf.distribute.MirroredStrategy:
    tf.distribute.MirroredStrategy._collective_key_base += 100_000
    devices = [f"/cpu:{index}" for index in range(REPLICAS)]
    return tf.distribute.MirroredStrategy(devices, **kwargs)


def _lifted_strategy() -> tf.distribute.MirroredStrategy:
    """A strategy whose all-reduce is in-graph copies and adds, which XLA
    compiles into one program for all replicas (collective ops carry
    per-device ordering-token variables that it cannot reach)."""
    return _strategy(cross_device_ops=tf.distribute.ReductionToOneDevice())


def _shard(strategy, values: np.ndarray):
    """Rows r n .. r n + n - 1 of `values` on replica r."""

    def value_fn(context):
        start = context.replica_id_in_sync_group * LOCAL_BATCH
        return tf.constant(values[start : start + LOCAL_BATCH])

    return strategy.experimental_distribute_values_from_function(value_fn)


def _run(strategy, replica_fn, args, jit_compile: bool) -> list:
    """strategy.run of replica_fn (XLA-compiled if asked) in a tf.function;
    each output as the list of its per-replica numpy values."""
    if jit_compile:
        replica_fn = tf.function(replica_fn, jit_compile=True)
    outputs = tf.function(lambda *a: strategy.run(replica_fn, args=a))(*args)
    return [
        [v.numpy() for v in strategy.experimental_local_results(output)]
        for output in outputs
    ]


def _nt_xent_replica(z1, z2):
    """Loss, logits and input gradients of one replica, as the step scales
    them (loss / replicas, so the summed gradients are the global ones)."""
    context = tf.distribute.get_replica_context()
    with tf.GradientTape() as tape:
        tape.watch([z1, z2])
        loss, logits, _ = losses.nt_xent(
            z1, z2, TEMPERATURE, replica_context=context
        )
        scaled = loss / context.num_replicas_in_sync
    gradient1, gradient2 = tape.gradient(scaled, [z1, z2])
    return loss, logits, gradient1, gradient2


def _sync_bn_replica(x, dy, gamma, beta):
    """Synchronised BN of one replica and its gradients for upstream dy."""
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        y, mean, variance = batch_norm.synchronized_batch_norm(
            x, gamma, beta, EPSILON
        )
        objective = tf.reduce_sum(y * dy)
    dx, dgamma, dbeta = tape.gradient(objective, [x, gamma, beta])
    return y, mean, variance, dx, dgamma, dbeta


def _views(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Views whose replica halves differ in offset and scale."""
    rng = np.random.default_rng(seed)
    shape = (REPLICAS * LOCAL_BATCH, 6)
    shift = np.repeat(np.arange(REPLICAS), LOCAL_BATCH)[:, None]
    z1 = rng.normal(size=shape) + shift
    z2 = rng.normal(size=shape) * (1 + shift)
    return z1.astype(np.float32), z2.astype(np.float32)


def _bn_inputs(seed: int = 1):
    """x whose replica halves have different statistics, dy, gamma, beta."""
    rng = np.random.default_rng(seed)
    shape = (REPLICAS * LOCAL_BATCH, 3, 3, 2)
    offset = np.repeat([0.0, 4.0], LOCAL_BATCH)[:, None, None, None]
    x = rng.normal(size=shape) * (1 + offset / 2) + offset
    dy = rng.normal(size=shape)
    gamma, beta = np.array([0.7, 1.3]), np.array([0.1, -0.2])
    return [a.astype(np.float32) for a in (x, dy, gamma, beta)]


def _bn_reference(x, dy, gamma, beta):
    """BN over the global batch and its gradients, in float64."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    axes = (0, 1, 2)
    mean, variance = x.mean(axes), x.var(axes)
    inverse = 1.0 / np.sqrt(variance + EPSILON)
    xhat = (x - mean) * inverse
    dxhat = dy * gamma
    dx = inverse * (dxhat - dxhat.mean(axes) - xhat * (dxhat * xhat).mean(axes))
    y = gamma * xhat + beta
    return y, mean, variance, dx, (dy * xhat).sum(axes), dy.sum(axes)


def test_xla_harness_compiles_the_replica_function():
    # Control: the lifted form really compiles with XLA, so an op XLA has
    # no kernel for fails (a harness that silently ran the plain graph
    # would make the comparisons below prove nothing).
    strategy = _lifted_strategy()
    x = _shard(strategy, np.ones((REPLICAS * LOCAL_BATCH, 2), np.float32))

    def replica_fn(value):
        return (tf.numpy_function(lambda a: a, [value], tf.float32),)

    with pytest.raises(tf.errors.InvalidArgumentError, match="XLA_CPU_JIT"):
        _run(strategy, replica_fn, (x,), jit_compile=True)


def test_nt_xent_replica_function_under_xla_equals_plain_graph():
    strategy = _lifted_strategy()
    z1, z2 = _views()
    args = (_shard(strategy, z1), _shard(strategy, z2))
    plain = _run(strategy, _nt_xent_replica, args, jit_compile=False)
    compiled = _run(strategy, _nt_xent_replica, args, jit_compile=True)
    # The replicas' losses differ (their rows differ) and their mean is
    # the single-device loss on the global batch.
    single, _, _ = losses.nt_xent(z1, z2, TEMPERATURE)
    assert abs(plain[0][0] - plain[0][1]) > 1e-2
    np.testing.assert_allclose(np.mean(compiled[0]), float(single), rtol=1e-6)
    # XLA fuses and reorders the float32 reductions (logsumexp over 16
    # logits of size <= 25, l2 norms of 6 values): a few ulps. Measured:
    # loss 0, logits 9.5e-7 (|logit| <= 25, ulp 2e-6), gradients 6e-8
    # (|g| <= 0.45, ulp 3e-8) apart at most.
    for name, xla_values, plain_values, tolerance in zip(
        ("loss", "logits", "gradient1", "gradient2"),
        compiled,
        plain,
        (1e-6, 4e-6, 2e-7, 2e-7),
        strict=True,
    ):
        for replica in range(REPLICAS):
            np.testing.assert_allclose(
                xla_values[replica],
                plain_values[replica],
                rtol=1e-6,
                atol=tolerance,
                err_msg=f"{name} of replica {replica}",
            )


def test_sync_bn_replica_function_under_xla_equals_global_formulas():
    strategy = _lifted_strategy()
    x, dy, gamma, beta = _bn_inputs()
    args = (
        _shard(strategy, x),
        _shard(strategy, dy),
        tf.constant(gamma),
        tf.constant(beta),
    )
    plain = _run(strategy, _sync_bn_replica, args, jit_compile=False)
    compiled = _run(strategy, _sync_bn_replica, args, jit_compile=True)
    y, mean, variance, dx, dgamma, dbeta = _bn_reference(x, dy, gamma, beta)
    for run in (plain, compiled):
        # Per-replica rows of y and dx; statistics identical on every
        # replica; dgamma, dbeta are per-replica shares summed by the
        # optimizer. float32 sums over 72 values of size <= 10: 1e-5.
        np.testing.assert_allclose(np.concatenate(run[0]), y, atol=2e-5)
        np.testing.assert_allclose(np.concatenate(run[3]), dx, atol=2e-5)
        for replica in range(REPLICAS):
            np.testing.assert_allclose(run[1][replica], mean, rtol=1e-6)
            np.testing.assert_allclose(run[2][replica], variance, rtol=1e-5)
        np.testing.assert_allclose(sum(run[4]), dgamma, rtol=1e-5)
        np.testing.assert_allclose(sum(run[5]), dbeta, rtol=1e-5)
    # XLA against the plain graph: float32 re-association only (measured:
    # 1.9e-6 at most, on dbeta ~17, one ulp).
    for xla_values, plain_values in zip(compiled, plain, strict=True):
        np.testing.assert_allclose(
            np.concatenate(xla_values),
            np.concatenate(plain_values),
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.fixture
def collective_path(monkeypatch):
    """MirroredStrategy as inside an XLA-compiled replica function on GPUs:
    all_reduce launches collectives itself, and any merge_call fails."""
    strategy = _strategy()
    monkeypatch.setattr(strategy.extended, "_use_merge_call", lambda: False)

    def refuse(*args, **kwargs):
        raise RuntimeError("merge_call inside an XLA replica function")

    monkeypatch.setattr(tf.distribute.ReplicaContext, "merge_call", refuse)
    return strategy


def test_all_gather_needs_merge_call(collective_path):
    # Control: the forced path does refuse what XLA on GPUs refuses.
    x = _shard(collective_path, np.ones((REPLICAS * LOCAL_BATCH, 2), "f4"))

    def replica_fn(value):
        context = tf.distribute.get_replica_context()
        return (context.all_gather(value, axis=0),)

    with pytest.raises(RuntimeError, match="merge_call inside an XLA"):
        _run(collective_path, replica_fn, (x,), jit_compile=False)


def test_nt_xent_and_sync_bn_need_no_merge_call(collective_path):
    z1, z2 = _views()
    collective = _run(
        collective_path,
        _nt_xent_replica,
        (_shard(collective_path, z1), _shard(collective_path, z2)),
        jit_compile=False,
    )
    bn_inputs = _bn_inputs()
    x, dy, gamma, beta = bn_inputs
    bn = _run(
        collective_path,
        _sync_bn_replica,
        (
            _shard(collective_path, x),
            _shard(collective_path, dy),
            tf.constant(gamma),
            tf.constant(beta),
        ),
        jit_compile=False,
    )
    # Same values as on one device over the global batch.
    single = tf.constant(z1), tf.constant(z2)
    with tf.GradientTape() as tape:
        tape.watch(single)
        loss, _, _ = losses.nt_xent(*single, TEMPERATURE)
    gradient1, gradient2 = tape.gradient(loss, single)
    np.testing.assert_allclose(np.mean(collective[0]), float(loss), rtol=1e-6)
    np.testing.assert_allclose(
        np.concatenate(collective[2]), gradient1.numpy(), rtol=1e-4, atol=1e-7
    )
    np.testing.assert_allclose(
        np.concatenate(collective[3]), gradient2.numpy(), rtol=1e-4, atol=1e-7
    )
    y, _, _, dx, dgamma, dbeta = _bn_reference(*bn_inputs)
    np.testing.assert_allclose(np.concatenate(bn[0]), y, atol=2e-5)
    np.testing.assert_allclose(np.concatenate(bn[3]), dx, atol=2e-5)
    np.testing.assert_allclose(sum(bn[4]), dgamma, rtol=1e-5)
    np.testing.assert_allclose(sum(bn[5]), dbeta, rtol=1e-5)


def _tiny_model(strategy: tf.distribute.Strategy, image_size: int):
    """The test_replicas model: ResNet-18 at 1/8 width, global BN."""
    config = config_lib.from_dict(
        {
            "model_dir": "/tmp/unused",
            "resnet_depth": 18,
            "width_multiplier": 0.125,
            "image_size": image_size,
            "cifar_stem": True,
            "num_proj_layers": 2,
            "proj_out_dim": 16,
            "train_batch_size": REPLICAS * LOCAL_BATCH,
            "precision": "float32",
            "global_bn": True,
            # No supervised head: nt_xent alone reaches every weight.
            "lineareval_while_pretraining": False,
        }
    )
    with strategy.scope():
        model = builders.build_model(config, 10, 3)
        model(tf.zeros((1, image_size, image_size, 3)))
    return model


def _model_gradients(model, view1, view2, trainable, non_trainable, context):
    """The pretraining step's forward and backward with the model's weights
    passed in (stateless_call): loss, replica-summed gradients (what the
    optimizer applies) and the updated BN moving statistics."""
    with tf.GradientTape() as tape:
        tape.watch(trainable)
        outputs, statistics = model.stateless_call(
            trainable,
            non_trainable,
            tf.concat([view1, view2], axis=0),
            training=True,
        )
        z1, z2 = tf.split(outputs["proj_head_output"], 2, axis=0)
        loss, _, _ = losses.nt_xent(
            z1, z2, TEMPERATURE, replica_context=context
        )
        replicas = context.num_replicas_in_sync if context else 1
        scaled = loss / replicas
    gradients = tape.gradient(scaled, trainable)
    if context is not None:
        gradients = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
    return loss, gradients, statistics


@pytest.mark.slow  # ~80 s to compile the 2-replica XLA program on 2 cores
def test_model_step_with_sync_bn_and_gather_under_xla_equals_one_device():
    """Encoder with synchronised BN, projection head, NT-Xent over the
    gathered batch and the gradients' all-reduce, compiled with XLA on 2
    replicas, against the plain graph on one device over the global batch.
    (Keras's stateful optimizer update needs captured variables, which the
    CPU harness cannot reach; test_train compiles it on one device.)"""
    image_size = 16
    strategy = _lifted_strategy()
    model = _tiny_model(strategy, image_size)
    trainable = [tf.constant(v.numpy()) for v in model.trainable_variables]
    non_trainable = [
        tf.constant(v.numpy()) for v in model.non_trainable_variables
    ]
    rng = np.random.default_rng(2)
    shape = (REPLICAS * LOCAL_BATCH, image_size, image_size, 3)
    # Brighter images on replica 1: per-replica BN would differ.
    brightness = np.repeat([0.2, 0.7], LOCAL_BATCH)[:, None, None, None]
    view1, view2 = (
        (brightness + 0.2 * rng.uniform(size=shape)).astype(np.float32)
        for _ in range(2)
    )

    def replica_fn(view1, view2, trainable, non_trainable):
        context = tf.distribute.get_replica_context()
        return _model_gradients(
            model, view1, view2, trainable, non_trainable, context
        )

    compiled = tf.function(
        lambda *a: strategy.run(
            tf.function(replica_fn, jit_compile=True), args=a
        )
    )(
        _shard(strategy, view1),
        _shard(strategy, view2),
        trainable,
        non_trainable,
    )
    single = tf.function(_model_gradients)(
        model, view1, view2, trainable, non_trainable, None
    )
    local = strategy.experimental_local_results
    losses_per_replica = [float(v) for v in local(compiled[0])]
    np.testing.assert_allclose(
        np.mean(losses_per_replica), float(single[0]), rtol=1e-5
    )
    paths = [v.path for v in model.trainable_variables] + [
        v.path for v in model.non_trainable_variables
    ]
    for path, replicated, expected in zip(
        paths,
        [*compiled[1], *compiled[2]],
        [*single[1], *single[2]],
        strict=True,
    ):
        copies = [v.numpy() for v in local(replicated)]
        # Every replica applies the same gradients and statistics.
        np.testing.assert_array_equal(copies[0], copies[1], err_msg=path)
        # float32 round-off: one device runs the fused BN kernel, the
        # replicas synchronised BN (sums of x and x^2) and XLA fusions; it
        # grows through 20 BN backward passes to 4.3e-5 of a tensor's
        # largest entry (measured; 1.4e-5 between XLA and the plain graph
        # on 2 replicas). Per-replica BN or a lost gather path moves
        # gradients by O(1) of it.
        scale = np.max(np.abs(expected.numpy()))
        np.testing.assert_allclose(
            copies[0],
            expected.numpy(),
            rtol=0,
            atol=2e-4 * scale,
            err_msg=path,
        )
