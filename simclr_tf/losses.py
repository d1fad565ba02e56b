"""SimCLR losses: NT-Xent across replicas, supervised cross-entropy, L2 decay.

Pure tensor functions with plain arguments; scaling the loss for the number of
replicas is the train step's job, not this module's. Optimizers and
schedules live in optim.py.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import tensorflow as tf

# Subtracted from each anchor's self-similarity logit: exp(-1e9) underflows to
# exactly 0 in float32 while the logit stays finite (GR uses the same value).
_SELF_MASK = 1e9


def nt_xent(
    z1: tf.Tensor,
    z2: tf.Tensor,
    temperature: float,
    *,
    normalize: bool = True,
    replica_context: tf.distribute.ReplicaContext | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Normalised temperature-scaled cross-entropy (SimCLR eq. 1, Alg. 1).

    Each of the 2n local rows [z1; z2] is an anchor scored against all 2N
    columns of the global batch, laid out as [view-1 rows of the global
    batch (N); view-2 rows (N)]. The positive is the other view of the same
    image, its own column is masked, and the other 2N-2 are negatives.

    With a replica context, z1 and z2 are concatenated over the replicas
    by `cross_replica_concat` (an all-reduce, so this also runs inside
    XLA-compiled replica functions); its gradient is this replica's block of
    the summed upstream gradient, so each replica's gradient reaches the
    owner of every column. The local row i has global index
    replica_id_in_sync_group * n + i, so every replica must hold the same n
    (batch the distributed dataset with drop_remainder).

    Convention: the loss is the mean over this replica's 2n anchors, as in
    the paper (about ln(2N-1) at initialisation), and is what
    train/contrast_loss logs. google-research/simclr returns
    reduce_mean(loss_a + loss_b), which is 2x this value, and
    differentiates that; the pretraining step differentiates
    train_step.CONTRAST_LOSS_WEIGHT (2) x this loss, so that the update
    (LARS's non-adapted BN and bias variables, weight decay and the
    supervised head's loss against it) is GR's. Averaging the per-replica
    losses (sum divided by the replica count, done by the train step) gives
    the single-device loss on the global batch.

    Args:
        z1: [n, d] float projections of view 1 on this replica (any float
            dtype, e.g. bfloat16; computed in float32).
        z2: [n, d] float projections of view 2, row i pairs with z1 row i.
        temperature: softmax temperature tau > 0 (0.1 ImageNet, 0.5 CIFAR).
        normalize: L2-normalise rows first (cosine similarity, GR's
            hidden_norm); if False, raw dot products are used.
        replica_context: the tf.distribute ReplicaContext to gather the
            global batch across (anything with all_reduce,
            replica_id_in_sync_group and num_replicas_in_sync); None for a
            single device (n = N).

    Returns:
        loss: float32 scalar, mean cross-entropy over the 2n local anchors.
        logits: [2n, 2N] float32 similarity / temperature, self column
            lowered by 1e9.
        labels: [2n] int32 column of each anchor's positive.

    Raises:
        ValueError: if temperature is not positive.
    """
    if not temperature > 0:
        raise ValueError(
            f"temperature={temperature!r} must be > 0; use e.g. 0.1 "
            "(ImageNet) or 0.5 (CIFAR)."
        )
    z1 = tf.cast(z1, tf.float32)
    z2 = tf.cast(z2, tf.float32)
    if normalize:
        z1 = tf.math.l2_normalize(z1, axis=-1)
        z2 = tf.math.l2_normalize(z2, axis=-1)
    local_batch = tf.shape(z1)[0]
    if replica_context is None:
        z1_global, z2_global = z1, z2
        offset = tf.constant(0, tf.int32)
    else:
        # One collective for both views: [n, 2d] -> [N, 2d].
        both = cross_replica_concat(
            tf.concat([z1, z2], axis=1), replica_context
        )
        z1_global, z2_global = tf.split(both, 2, axis=1)  # [N, d] each
        replica_id = replica_context.replica_id_in_sync_group
        offset = tf.cast(replica_id, tf.int32) * local_batch
    global_batch = tf.shape(z1_global)[0]

    rows = tf.concat([z1, z2], axis=0)  # [2n, d]
    columns = tf.concat([z1_global, z2_global], axis=0)  # [2N, d]
    logits = tf.matmul(rows, columns, transpose_b=True) / temperature
    global_index = offset + tf.range(local_batch, dtype=tf.int32)  # [n]
    self_columns = tf.concat([global_index, global_index + global_batch], 0)
    labels = tf.concat([global_index + global_batch, global_index], 0)
    self_mask = tf.one_hot(self_columns, 2 * global_batch)  # [2n, 2N]
    logits = logits - _SELF_MASK * self_mask  # [2n, 2N]

    per_anchor = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=logits
    )
    return tf.reduce_mean(per_anchor), logits, labels


def cross_replica_concat(
    value: tf.Tensor, replica_context: tf.distribute.ReplicaContext
) -> tf.Tensor:
    """Concatenates every replica's `value` along axis 0, in replica order.

    As google-research/simclr's tpu_cross_replica_concat: each replica
    writes its rows into its own block of an otherwise zero [R, n, ...]
    buffer and one SUM all-reduce fills every block (adding zeros is exact,
    so the result equals an all-gather bit for bit). ReplicaContext.
    all_gather would call merge_call, which MirroredStrategy refuses inside
    an XLA-compiled replica function (GPUs with --jit_compile); all_reduce
    does not need it there, nor on TPUs or in multi-worker runs, so one code
    path serves every strategy. The all-reduce moves about twice the bytes
    of an all-gather: 2 MiB of float32 [4096, 128] projections, far below
    the gradients' all-reduce.

    The gradient is the SUM all-reduce of the upstream gradient, restricted
    to this replica's block: exactly what all_gather's gradient gives.

    Args:
        value: [n, ...] tensor of this replica; every replica has the same
            shape.
        replica_context: the ReplicaContext (or any object with all_reduce,
            replica_id_in_sync_group and num_replicas_in_sync).

    Returns:
        [R n, ...] tensor, replica r's rows at r n .. r n + n - 1.
    """
    replicas = replica_context.num_replicas_in_sync
    if replicas == 1:
        return value
    replica_id = replica_context.replica_id_in_sync_group
    shape = tf.shape(value)
    blocks = tf.scatter_nd(
        indices=tf.reshape(tf.cast(replica_id, tf.int32), [1, 1]),
        updates=value[None],
        shape=tf.concat([[replicas], shape], axis=0),
    )  # [R, n, ...], zero outside block replica_id
    blocks = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, blocks)
    if value.shape.is_fully_defined():
        return tf.reshape(blocks, [replicas * value.shape[0], *value.shape[1:]])
    return tf.reshape(blocks, tf.concat([[-1], shape[1:]], axis=0))


def contrast_metrics(
    logits: tf.Tensor, labels: tf.Tensor
) -> dict[str, tf.Tensor]:
    """Top-1 accuracy and entropy of the contrastive prediction, as in GR.

    Each anchor is scored only against the N cross-view columns (view-1
    anchors against view-2 columns and vice versa), which is where its
    positive lies. GR reports these over the n view-1 anchors only; here all
    2n anchors count, which has the same expectation.

    Args:
        logits: [2n, 2N] float logits from nt_xent.
        labels: [2n] int positive columns from nt_xent.

    Returns:
        {"contrast_acc": float32 scalar in [0, 1], fraction of anchors whose
        positive has the largest cross-view logit; "contrast_entropy":
        float32 scalar in [0, ln N], mean entropy (nats) of the softmax over
        the N cross-view logits}.
    """
    logits = tf.cast(logits, tf.float32)
    local_batch = tf.shape(logits)[0] // 2
    global_batch = tf.shape(logits)[1] // 2
    cross_view = tf.concat(
        [
            logits[:local_batch, global_batch:],
            logits[local_batch:, :global_batch],
        ],
        axis=0,
    )  # [2n, N]
    cross_labels = tf.math.floormod(tf.cast(labels, tf.int32), global_batch)
    predicted = tf.argmax(cross_view, axis=-1, output_type=tf.int32)
    accuracy = tf.reduce_mean(
        tf.cast(tf.equal(predicted, cross_labels), tf.float32)
    )
    log_probabilities = tf.nn.log_softmax(cross_view, axis=-1)
    entropy = -tf.reduce_sum(
        tf.exp(log_probabilities) * log_probabilities, axis=-1
    )
    return {
        "contrast_acc": accuracy,
        "contrast_entropy": tf.reduce_mean(entropy),
    }


def supervised_loss(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Mean sparse softmax cross-entropy of the supervised head.

    Args:
        labels: [b] int class indices in [0, num_classes).
        logits: [b, num_classes] float logits (any float dtype).

    Returns:
        float32 scalar, mean over the b examples.
    """
    per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32)
    )
    return tf.reduce_mean(per_example)


def distillation_loss(
    teacher_logits: tf.Tensor, student_logits: tf.Tensor, temperature: float
) -> tf.Tensor:
    """SimCLRv2's distillation loss (v2 eq. 3), mean over the batch.

    -sum_y P_T(y | x; t) log P_S(y | x; t), where P(y | x; t) is the softmax
    of logits / t. No gradient reaches the teacher's logits.

    Args:
        teacher_logits: [b, C] float logits of the teacher.
        student_logits: [b, C] float logits of the student.
        temperature: t > 0; 1 in most of SimCLRv2's runs.

    Returns:
        float32 scalar. It equals KL(P_T || P_S) plus the teacher's entropy,
        so it falls exactly as the KL does.
    """
    teacher = tf.nn.softmax(
        tf.stop_gradient(tf.cast(teacher_logits, tf.float32)) / temperature
    )
    per_example = tf.nn.softmax_cross_entropy_with_logits(
        labels=teacher,
        logits=tf.cast(student_logits, tf.float32) / temperature,
    )
    return tf.reduce_mean(per_example)


def l2_weight_decay(
    variables: Sequence[tf.Variable],
    weight_decay: float,
    exclude_patterns: Sequence[str] = (),
) -> tf.Tensor:
    """Weight decay as a loss term: wd * sum of 0.5 * ||w||^2.

    Used with the momentum and Adam optimizers (all decayed variables) and
    with LARS for the supervised head, which LARS itself does not decay.

    Args:
        variables: Keras or tf variables; matched on `.path` (Keras 3, e.g.
            "resnet/batch_normalization/gamma") or else `.name`.
        weight_decay: decay coefficient wd >= 0, e.g. 1e-6.
        exclude_patterns: regular expressions; a variable whose path any of
            them matches (re.search) is not decayed.

    Returns:
        float32 scalar (0.0 if no variable is decayed).

    Raises:
        ValueError: if weight_decay is negative.
    """
    if weight_decay < 0:
        raise ValueError(
            f"weight_decay={weight_decay!r} must be >= 0; use 0.0 to disable."
        )
    patterns = [re.compile(pattern) for pattern in exclude_patterns]
    squared_norms = [
        tf.nn.l2_loss(tf.cast(variable, tf.float32))
        for variable in variables
        if not any(
            pattern.search(_variable_path(variable)) for pattern in patterns
        )
    ]
    if not squared_norms:
        return tf.constant(0.0, tf.float32)
    return weight_decay * tf.add_n(squared_norms)


def _variable_path(variable: tf.Variable) -> str:
    """The Keras 3 path of a variable, or its tf name for plain tf.Variable."""
    return getattr(variable, "path", None) or variable.name
