"""The linear classifier trained in place on a feature Bank's replicas.

The same protocol as linear.train_linear_classifier (standardised
features, softmax regression, Nesterov momentum SGD at lr 0.1 B / 256 with
cosine decay to 0, no warm-up, no weight decay by default), but on the
replicas: each replica draws its part of every batch from its own rows of
the bank, the gradients are summed across replicas, and nothing of the
bank leaves the devices. With one replica and a bank without padding it
follows linear.py's steps exactly (same permutations); with more replicas
each replica permutes its own rows, so batches mix differently.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from simclr_tf import optim
from simclr_tf.evaluation import banks, linear

# Constant features (train std below this) are centred, not scaled.
_MIN_STD = 1e-6
# Replica functions called from a loop that autograph rewrites are plain
# graph code: not rewritten with it.
_unconverted = tf.autograph.experimental.do_not_convert


def _sum_over_rows(bank: banks.Bank, chunk: int, row_sum) -> tf.Tensor:
    """In a replica context: sum of row_sum(features [c, F], real [c, 1])
    over this replica's rows, `chunk` rows at a time."""
    chunks = bank.chunks(chunk)
    width = bank.columns["features"].shape[-1]

    def body(index: tf.Tensor, total: tf.Tensor):
        rows, labels = bank.read_chunk(index, chunk, ("features", "label"))
        real = tf.cast(labels >= 0, tf.float32)[:, None]
        return index + 1, total + row_sum(rows, real)

    _, total = tf.while_loop(
        lambda index, _: index < chunks,
        body,
        (tf.constant(0), tf.zeros([width + 1])),
    )
    return total


def standardization(
    strategy: tf.distribute.Strategy, bank: banks.Bank, chunk: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean [F], std [F], rows) over the real rows of every replica.

    Two passes (the mean, then the squared deviations from it), each
    summed across replicas: float32 sums without the cancellation of
    E[x^2] - E[x]^2.
    """

    def first(rows, real):
        return tf.concat(
            [tf.reduce_sum(rows * real, 0), [tf.reduce_sum(real)]], 0
        )

    @tf.function(autograph=False)
    def totals(mean: tf.Tensor) -> tf.Tensor:
        def second(rows, real):
            deviations = tf.square(rows - mean) * real
            return tf.concat([tf.reduce_sum(deviations, 0), [0.0]], 0)

        sums = strategy.run(lambda: _sum_over_rows(bank, chunk, first))
        squares = strategy.run(lambda: _sum_over_rows(bank, chunk, second))
        return tf.stack(
            [
                strategy.reduce(tf.distribute.ReduceOp.SUM, sums, None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, squares, None),
            ]
        )

    width = bank.columns["features"].shape[-1]
    sums = totals(tf.zeros([width])).numpy()[0]
    count = int(round(float(sums[-1])))
    mean = sums[:-1] / max(count, 1)
    squares = totals(tf.constant(mean, tf.float32)).numpy()[1]
    std = np.sqrt(squares[:-1] / max(count, 1))
    std = np.where(std < _MIN_STD, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32), count


def train_on_bank(
    strategy: tf.distribute.Strategy,
    bank: banks.Bank,
    num_classes: int,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float | None = None,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    seed: int = 0,
    chunk: int | None = None,
) -> Trained:
    """Trains Dense(num_classes) on the bank's "features" in place.

    Args:
      strategy: the strategy the bank lives under.
      bank: a Bank with "features" [F] float32 and "label" columns.
      num_classes: C.
      epochs: passes over the rows, >= 1.
      batch_size: global batch B, a multiple of the replica count; each
        replica takes B / replicas of its own rows per step.
      learning_rate: peak rate; None: 0.1 B / 256.
      momentum, nesterov, weight_decay: as linear.train_linear_classifier.
      seed: seed of the per-epoch permutations.
      chunk: rows per step of the standardisation passes (a divisor of
        the bank's capacity); None: the capacity.

    Returns:
      The Trained classifier (its variables on the replicas).

    Raises:
      ValueError: batch_size is not a multiple of the replicas, or the bank
        holds no real rows.
    """
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas or epochs < 1:
        raise ValueError(
            f"batch_size={batch_size} must be a multiple of the {replicas} "
            f"replicas and epochs={epochs} >= 1."
        )
    mean, std, count = standardization(strategy, bank, chunk or bank.capacity)
    if count == 0:
        raise ValueError("the feature bank holds no rows; nothing to train.")
    if learning_rate is None:
        learning_rate = 0.1 * batch_size / 256
    local = batch_size // replicas
    steps = -(-bank.capacity // local)
    width = bank.columns["features"].shape[-1]
    with strategy.scope():
        kernel = keras.Variable(np.zeros([width, num_classes], np.float32))
        bias = keras.Variable(np.zeros([num_classes], np.float32))
        optimizer = optim.SGD(
            keras.optimizers.schedules.CosineDecay(
                learning_rate, decay_steps=epochs * steps, alpha=0.0
            ),
            momentum=momentum,
            nesterov=nesterov,
        )
        optimizer.build([kernel, bias])
    mean_t, std_t = tf.constant(mean), tf.constant(std)

    def permute(epoch: tf.Tensor) -> tf.Tensor:
        context = tf.distribute.get_replica_context()
        replica = tf.cast(context.replica_id_in_sync_group, tf.int64)
        # Replica 0 draws linear.py's permutation of (seed, epoch).
        noise = tf.random.stateless_uniform(
            [bank.capacity],
            seed=tf.stack([seed + replica * 1_000_003, epoch]),
        )
        # Positions past the capacity only pad the last batch.
        padding = tf.zeros([steps * local - bank.capacity], tf.int32)
        return tf.concat([tf.argsort(noise), padding], 0)

    def replica_step(order: tf.Tensor, index: tf.Tensor) -> None:
        _replica_step(
            bank,
            order,
            index,
            local,
            (mean_t, std_t, kernel, bias),
            optimizer,
            weight_decay,
            replicas,
        )

    # Autograph for the loop only, as in training.train_step.
    @tf.function
    def run_epoch(epoch: tf.Tensor) -> None:
        orders = strategy.run(_unconverted(permute), (epoch,))
        for index in tf.range(steps):
            strategy.run(_unconverted(replica_step), (orders, index))

    for epoch in range(epochs):
        run_epoch(tf.constant(epoch, tf.int64))
    return Trained(mean=mean_t, std=std_t, kernel=kernel, bias=bias)


@dataclasses.dataclass(frozen=True)
class Trained:
    """A classifier trained on the replicas: mean and std [F] tensors,
    kernel [F, C] and bias [C] mirrored variables (used in place)."""

    mean: tf.Tensor
    std: tf.Tensor
    kernel: keras.Variable
    bias: keras.Variable

    def logits(self, features: tf.Tensor) -> tf.Tensor:
        """[b, C] logits of [b, F] float32 features."""
        standardized = (features - self.mean) / self.std
        return tf.matmul(standardized, self.kernel) + self.bias

    def to_numpy(self) -> linear.LinearClassifier:
        """The host copy, as linear.train_linear_classifier returns it."""
        return linear.LinearClassifier(
            mean=np.asarray(self.mean),
            std=np.asarray(self.std),
            kernel=np.asarray(self.kernel.numpy()),
            bias=np.asarray(self.bias.numpy()),
        )


def _replica_step(
    bank: banks.Bank,
    order: tf.Tensor,
    index: tf.Tensor,
    local: int,
    weights_: tuple,
    optimizer: keras.optimizers.Optimizer,
    weight_decay: float,
    replicas: int,
) -> None:
    """One SGD step on this replica's batch, gradients summed across."""
    mean, std, kernel, bias = weights_
    position = index * local + tf.range(local)
    rows = tf.gather(order, position)
    labels = bank.gather("label", rows)
    real = (labels >= 0) & (position < bank.capacity)
    weights = tf.cast(real, tf.float32)
    count = tf.reduce_sum(weights)
    if replicas > 1:
        # A tf.custom_gradient: in a trace, its registry entry keeps the
        # graph alive (optim.py); one replica's count is its own.
        context = tf.distribute.get_replica_context()
        count = context.all_reduce(tf.distribute.ReduceOp.SUM, count)
    features = (bank.gather("features", rows) - mean) / std
    with tf.GradientTape() as tape:
        logits = tf.matmul(features, kernel) + bias
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.maximum(labels, 0), logits=logits
        )
        # Summed over replicas: the mean over the step's real rows, as
        # linear.py's (possibly short) last batch.
        loss = tf.reduce_sum(losses * weights) / tf.maximum(count, 1.0)
        loss += 0.5 * weight_decay * tf.reduce_sum(tf.square(kernel)) / replicas
    gradients = tape.gradient(loss, [kernel, bias])
    optimizer.apply_gradients(zip(gradients, [kernel, bias], strict=True))


def ranks_of(scores: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """[b] int32: classes scoring >= the label's, minus one (NaN counts as
    a rival); top-k correct iff < k."""
    labels = tf.maximum(tf.cast(labels, tf.int32), 0)
    own = tf.gather(scores, labels, batch_dims=1)[:, None]
    rivals = tf.logical_not(scores < own)
    return tf.reduce_sum(tf.cast(rivals, tf.int32), axis=1) - 1


def top_k_from_ranks(ranks: np.ndarray, k: int) -> float:
    """Accuracy from ranks_of's ranks."""
    return float(np.mean(np.asarray(ranks) < k)) if len(ranks) else math.nan
