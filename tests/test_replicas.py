"""Replica equivalence of the real train step (model, loss, optimizer, BN).

One optimizer step of the tiny SimCLR model on R = 2 or 4 virtual CPUs must
leave every weight, BN moving statistics included, where one step on one
device over the same global batch leaves it, and the mean of the replica
losses must be the single-device loss. Replicas get data with different
statistics, so a per-replica BN or a mis-scaled gradient shows up.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.config import schema as config_lib
from simclr_tf.training import builders, train_step
from simclr_tf.training import schedule as schedule_lib

GLOBAL_BATCH = 16
IMAGE_SIZE = 16
NUM_CLASSES = 10

# Losses are O(1) and come from the same float32 math; only the order of the
# all-gathered columns' reduction and of the final mean over replicas differs.
LOSS_RTOL = 1e-5
# Weights are O(0.01..1) and one step moves them by about lr = 0.01875. The
# replicated step sums R partial gradients (an all-reduce) instead of one
# big sum, and synchronised BN computes E[x^2] - E[x]^2 where tf.nn.moments
# uses squared deviations; both are float32 round-off (relative ~1e-6 of
# the gradient), far below 1e-5 absolute after scaling by lr. A real error
# (a per-replica BN, a loss scaled by R) moves weights by ~1e-3 or more.
# Measured when written: at most 6e-7 apart with global BN, 1e-2 without.
WEIGHT_ATOL = 1e-5
WEIGHT_RTOL = 1e-4


def _config(model_dir: str, optimizer: str, global_bn: bool = True):
    return config_lib.from_dict(
        {
            "model_dir": model_dir,
            "resnet_depth": 18,
            "width_multiplier": 0.125,
            "image_size": IMAGE_SIZE,
            "cifar_stem": True,
            "num_proj_layers": 2,
            "proj_out_dim": 16,
            "train_batch_size": GLOBAL_BATCH,
            "temperature": 0.5,
            "optimizer": optimizer,
            "learning_rate": 0.3,
            "weight_decay": 1e-4,
            "warmup_epochs": 0,
            "precision": "float32",
            "global_bn": global_bn,
            "lineareval_while_pretraining": True,
        }
    )


def _global_batch() -> dict[str, np.ndarray]:
    """Images whose mean and contrast grow with the row index.

    Any split into contiguous shards therefore gives each replica different
    statistics, so per-replica BN would normalise differently.
    """
    rng = np.random.default_rng(0)
    shape = (GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)
    means = np.linspace(0.15, 0.8, GLOBAL_BATCH)[:, None, None, None]
    spreads = np.linspace(0.02, 0.2, GLOBAL_BATCH)[:, None, None, None]

    def view() -> np.ndarray:
        noise = rng.normal(size=shape)
        return np.clip(means + spreads * noise, 0.0, 1.0).astype(np.float32)

    labels = rng.integers(0, NUM_CLASSES, size=GLOBAL_BATCH, dtype=np.int64)
    return {"view1": view(), "view2": view(), "label": labels}


def _dataset(batch: dict[str, np.ndarray]) -> tf.data.Dataset:
    # Batched (not from_tensors) so a strategy can split the batch dimension.
    return tf.data.Dataset.from_tensor_slices(batch).batch(GLOBAL_BATCH)


def _mirrored_strategy(replicas: int) -> tf.distribute.MirroredStrategy:
    """MirroredStrategy over the first `replicas` virtual CPUs (a fresh
    collective key base, as conftest gives each test: a fixture may build
    several strategies)."""
    tf.distribute.MirroredStrategy._collective_key_base += 100_000
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{index}" for index in range(replicas)]
    )


def _one_step(strategy, config, batch, initial_weights):
    """Builds model + optimizer in `strategy`, runs one real train step.

    The step is train_step.make_train_step inside one strategy.run, as in
    train_step.make_train_loop but without its loop, which traces the step a
    second time (tf.range body) and doubles the compile time here.

    Returns:
      (per-replica metrics {name: [R] floats}, the weights after the step,
      model.weights paths, the initial weights).
    """
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(0)
    schedule = schedule_lib.Schedule(
        steps_per_epoch=10,
        total_steps=100,
        warmup_steps=0,
        checkpoint_every=0,
        steps_per_loop=1,
    )
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        model = builders.build_model(config, NUM_CLASSES, 3)
        model(tf.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))
        if initial_weights is None:
            initial_weights = model.get_weights()
        model.set_weights(initial_weights)
        optimizer = builders.build_optimizer(config, schedule)
        optimizer.build(model.trainable_variables)
    step = train_step.make_train_step(config, model, optimizer, replicas)
    iterator = iter(strategy.experimental_distribute_dataset(_dataset(batch)))
    per_replica = tf.function(lambda: strategy.run(step, (next(iterator),)))()
    assert int(optimizer.iterations.numpy()) == 1
    metrics = {
        key: np.array(
            [float(v) for v in strategy.experimental_local_results(value)]
        )
        for key, value in per_replica.items()
    }
    paths = [weight.path for weight in model.weights]
    return metrics, model.get_weights(), paths, initial_weights


@pytest.fixture(scope="module")
def single_device_runs(tmp_path_factory):
    """One single-device step per optimizer, built lazily and shared."""
    runs = {}

    def get(optimizer: str):
        if optimizer not in runs:
            model_dir = str(tmp_path_factory.mktemp(f"single_{optimizer}"))
            runs[optimizer] = _one_step(
                tf.distribute.get_strategy(),
                _config(model_dir, optimizer),
                _global_batch(),
                None,
            )
        return runs[optimizer]

    return get


# Compiling the step costs ~12 s at R=2 and ~25 s at R=4 on a 2-core CPU, so
# the default run covers both replica counts and both optimizers once each;
# the other two combinations run with -m slow. Momentum is the stricter
# check of the loss scaling: LARS's trust ratio cancels a constant gradient
# factor for every adapted variable.
@pytest.fixture(
    scope="module",
    params=[
        pytest.param((2, "lars"), marks=pytest.mark.compat),
        (4, "momentum"),
        pytest.param((4, "lars"), marks=pytest.mark.slow),
        pytest.param((2, "momentum"), marks=pytest.mark.slow),
    ],
    ids=lambda p: f"{p[0]}replicas-{p[1]}",
)
def paired_runs(request, single_device_runs, tmp_path_factory):
    """(single-device run, replicated run) for one (R, optimizer) case."""
    replicas, optimizer = request.param
    single = single_device_runs(optimizer)
    model_dir = str(tmp_path_factory.mktemp(f"r{replicas}_{optimizer}"))
    replicated = _one_step(
        _mirrored_strategy(replicas),
        _config(model_dir, optimizer),
        _global_batch(),
        single[3],
    )
    return single, replicated


def _moving_statistics(paths):
    return [i for i, path in enumerate(paths) if "moving_" in path]


def _trainable(paths):
    return [i for i, path in enumerate(paths) if "moving_" not in path]


def _max_difference(first, second, indices):
    return max(float(np.max(np.abs(first[i] - second[i]))) for i in indices)


@pytest.mark.parametrize("replicas", [2, 4])
def test_distributed_dataset_splits_batch_in_replica_order(replicas):
    batch = _global_batch()
    strategy = _mirrored_strategy(replicas)
    shards = strategy.experimental_local_results(
        next(iter(strategy.experimental_distribute_dataset(_dataset(batch))))
    )
    local = GLOBAL_BATCH // replicas
    # nt_xent gives replica r's rows the global indices r*n .. r*n + n - 1.
    for replica, shard in enumerate(shards):
        rows = slice(replica * local, (replica + 1) * local)
        for key in ("view1", "view2", "label"):
            np.testing.assert_array_equal(shard[key].numpy(), batch[key][rows])


def test_train_step_replica_mean_loss_equals_single_device(paired_runs):
    (single_metrics, *_), (replicated_metrics, *_) = paired_runs
    replica_losses = replicated_metrics["contrast_loss"]
    # The shards differ, so the replicas' own losses differ.
    assert np.ptp(replica_losses) > 1e-3
    for key in ("contrast_loss", "supervised_loss", "total_loss"):
        np.testing.assert_allclose(
            np.mean(replicated_metrics[key]),
            single_metrics[key][0],
            rtol=LOSS_RTOL,
            err_msg=key,
        )


def test_train_step_replica_weights_equal_single_device(paired_runs):
    (_, single_weights, paths, initial), (_, weights, replica_paths, _) = (
        paired_runs
    )
    assert len(weights) == len(single_weights) == len(replica_paths)
    trainable = _trainable(paths)
    # The step must move the weights, or equality would prove nothing.
    assert _max_difference(single_weights, initial, trainable) > 1e-3
    for index in trainable:
        np.testing.assert_allclose(
            weights[index],
            single_weights[index],
            rtol=WEIGHT_RTOL,
            atol=WEIGHT_ATOL,
            err_msg=paths[index],
        )


def test_train_step_global_bn_moving_statistics_equal_single_device(
    paired_runs,
):
    (_, single_weights, paths, initial), (_, weights, _, _) = paired_runs
    statistics = _moving_statistics(paths)
    # 20 encoder BNs + 2 head BNs, each with a moving mean and variance.
    assert len(statistics) >= 2 * 20
    assert _max_difference(single_weights, initial, statistics) > 1e-3
    for index in statistics:
        np.testing.assert_allclose(
            weights[index],
            single_weights[index],
            rtol=WEIGHT_RTOL,
            atol=WEIGHT_ATOL,
            err_msg=paths[index],
        )


def test_train_step_without_global_bn_differs(single_device_runs, tmp_path):
    # Negative control: per-replica BN normalises each replica's shard with
    # its own statistics, so the same comparison must fail.
    single_metrics, single_weights, paths, initial = single_device_runs("lars")
    metrics, weights, _, _ = _one_step(
        _mirrored_strategy(2),
        _config(str(tmp_path), "lars", global_bn=False),
        _global_batch(),
        initial,
    )
    statistics = _moving_statistics(paths)
    variances = [i for i in statistics if "moving_variance" in paths[i]]
    assert _max_difference(weights, single_weights, variances) > 100 * (
        WEIGHT_ATOL
    )
    assert _max_difference(weights, single_weights, _trainable(paths)) > (
        100 * WEIGHT_ATOL
    )
    assert not np.isclose(
        np.mean(metrics["contrast_loss"]),
        single_metrics["contrast_loss"][0],
        rtol=1e-3,
    )
