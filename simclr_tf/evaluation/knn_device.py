"""Weighted kNN (knn.py's protocol) against a feature Bank on the replicas.

Each step, every replica's eval rows are gathered to all replicas
(losses.cross_replica_concat, an all-reduce); each replica compares them
with its own bank rows, `chunk` rows per matmul, keeping a running top-k;
the replicas' candidates are gathered and merged, and each replica votes
for its own rows. Memory per replica: [queries, chunk] similarities and
[replicas, queries, k] candidates, whatever the bank's size.
"""

from __future__ import annotations

import tensorflow as tf

from simclr_tf import losses
from simclr_tf.evaluation import banks, linear_device


def _unit(rows: tf.Tensor) -> tf.Tensor:
    return tf.math.l2_normalize(rows, axis=1)


def _local_top_k(
    queries: tf.Tensor, bank: banks.Bank, k: int, chunk: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """The k most similar rows of this replica's bank for each query.

    Args:
      queries: [q, F] unit rows.
      bank: the Bank ("features", "label"; capacity a multiple of chunk).
      k: neighbours kept.
      chunk: bank rows per matmul.

    Returns:
      (similarities [q, k] float32, -inf where fewer than k rows exist;
      labels [q, k] int32, -1 there).
    """
    chunks = bank.chunks(chunk)
    count = queries.shape[0] or tf.shape(queries)[0]

    def body(index, best, best_labels):
        rows, row_labels = bank.read_chunk(index, chunk, ("features", "label"))
        similar = tf.matmul(queries, _unit(rows), transpose_b=True)
        similar = tf.where(row_labels[None, :] >= 0, similar, -float("inf"))
        both = tf.concat([best, similar], axis=1)  # [q, k + chunk]
        best, picked = tf.math.top_k(both, k=k)
        candidates = tf.concat(
            [best_labels, tf.broadcast_to(row_labels, [count, chunk])], 1
        )
        return index + 1, best, tf.gather(candidates, picked, batch_dims=1)

    _, best, best_labels = tf.while_loop(
        lambda index, *_: index < chunks,
        body,
        (
            tf.constant(0),
            tf.fill([count, k], -float("inf")),
            tf.fill([count, k], tf.constant(banks.PADDING_LABEL, tf.int32)),
        ),
    )
    return best, best_labels


def knn_ranks(
    features: tf.Tensor,
    labels: tf.Tensor,
    bank: banks.Bank,
    *,
    num_classes: int,
    k: int,
    temperature: float,
    chunk: int,
    queries: int,
) -> tf.Tensor:
    """In a replica context: kNN ranks of this replica's eval rows.

    Votes as knn.knn_scores: the k nearest bank rows by cosine similarity
    (over every replica's bank) vote for their labels with weight
    exp(similarity / temperature); the rank is linear_device.ranks_of the
    class scores (top-k correct iff rank < k, ties counted against).

    Args:
      features: [b, F] float32 eval features of this replica.
      labels: [b] int eval labels (negative: padding).
      bank: the training features (all replicas' banks together).
      num_classes: C.
      k: neighbours, at most the bank's real rows (knn.py's min(k, n)).
      temperature: vote temperature.
      chunk: bank rows per matmul.
      queries: eval rows per round (a divisor of b).

    Returns:
      [b] int32 ranks.
    """
    context = tf.distribute.get_replica_context()
    replicas = context.num_replicas_in_sync
    replica = tf.cast(context.replica_id_in_sync_group, tf.int32)
    ranks = []
    for start in range(0, features.shape[0], queries):
        mine = _unit(tf.cast(features[start : start + queries], tf.float32))
        every = losses.cross_replica_concat(mine, context)  # [R q, F]
        best, best_labels = _local_top_k(every, bank, k, chunk)
        # [R, R q, k] -> this replica's rows' candidates [q, R k].
        best = losses.cross_replica_concat(best[None], context)
        best_labels = losses.cross_replica_concat(best_labels[None], context)
        own = replica * queries + tf.range(queries)
        best = tf.reshape(
            tf.transpose(tf.gather(best, own, axis=1), [1, 0, 2]),
            [queries, replicas * k],
        )
        best_labels = tf.reshape(
            tf.transpose(tf.gather(best_labels, own, axis=1), [1, 0, 2]),
            [queries, replicas * k],
        )
        top, picked = tf.math.top_k(best, k=k)
        voters = tf.gather(best_labels, picked, batch_dims=1)
        weights = tf.where(voters >= 0, tf.exp(top / temperature), 0.0)
        # Weights summed per (row, class): no [q, k, C] one-hot.
        segments = tf.range(queries)[:, None] * num_classes + tf.maximum(
            voters, 0
        )
        scores = tf.reshape(
            tf.math.unsorted_segment_sum(
                weights, segments, queries * num_classes
            ),
            [queries, num_classes],
        )
        ranks.append(
            linear_device.ranks_of(scores, labels[start : start + queries])
        )
    return tf.concat(ranks, axis=0)
