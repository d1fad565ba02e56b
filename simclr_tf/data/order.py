"""Which examples a host's training stream holds, in which order, and where
a resumed run picks it up.

With a seed, example k of a host's stream and its augmentation seed depend
only on (seed, host, k): each epoch is the host's share in an order drawn
from (seed, epoch), through GR's shuffle buffer seeded by (seed, host,
epoch). A run restarted at step s starts at `host_position(s)` and trains
on exactly the batches an uninterrupted run would have. pipeline.py turns
the stream into augmented batches.
"""

from __future__ import annotations

import tensorflow as tf

from simclr_tf.data.sources import base as source_lib

# Salts that keep the shuffle, per-example, order and per-batch seed
# streams apart.
_SHUFFLE_SALT, _AUGMENT_SALT, _ORDER_SALT, _BATCH_SALT = 1, 2, 3, 4
# More epochs than any run has: the training stream is endless in effect.
_MAX_EPOCHS = 2**40


def derived_seed(seed: int, salt: int, pipeline_id: int) -> int:
    """A seed in [0, 2^31) distinct per (seed, purpose, host)."""
    return (seed * 1_000_003 + salt * 7919 + pipeline_id * 104_729) % 2**31


def shuffle_buffer_size(
    per_replica_batch_size: int, image_size: int, num_examples: int
) -> int:
    """GR's shuffle buffer: per-replica batch x 50 at <= 32 px, else x 10.

    Capped at `num_examples` (a bigger buffer only costs memory).
    """
    multiplier = 50 if image_size <= 32 else 10
    return max(1, min(per_replica_batch_size * multiplier, num_examples))


def _seed_stream(
    seed: int | None, salt: int, host: int, start: int
) -> tf.data.Dataset:
    """int32 [2] seeds [derived seed, start + k] (mod 2^31), k = 0, 1, ...

    Unseeded: random values from `Dataset.random`, different every run.
    """
    if seed is None:
        # One random int64 per element, viewed as two int32.
        return tf.data.Dataset.random().map(
            lambda value: tf.bitcast(value, tf.int32)
        )
    base = tf.constant(derived_seed(seed, salt, host), tf.int64)
    return tf.data.Dataset.counter(start).map(
        lambda index: tf.cast(tf.stack([base, index % 2**31]), tf.int32)
    )


def element_seeds(
    seed: int | None, host: int, start: int = 0
) -> tf.data.Dataset:
    """Endless int32 [2] seeds; element k seeds example start + k's crop.

    [derived(seed, _AUGMENT_SALT, host), start + k] (wrapping mod 2^31),
    or random draws when seed is None.
    """
    return _seed_stream(seed, _AUGMENT_SALT, host, start)


def batch_seeds(seed: int | None, host: int, start: int = 0) -> tf.data.Dataset:
    """Endless int32 [2] seeds; element k seeds batch start + k's views.

    [derived(seed, _BATCH_SALT, host), start + k] (wrapping mod 2^31), or
    random draws when seed is None.
    """
    return _seed_stream(seed, _BATCH_SALT, host, start)


def host_position(
    step: int, global_batch_size: int, input_context: tf.distribute.InputContext
) -> tuple[int, int]:
    """(examples, per-replica batches) this host's pipeline has produced
    after `step` train steps: where a resumed run's input continues.

    Each step takes one per-replica batch per replica; a host's pipeline
    feeds its local replicas, num_replicas_in_sync / num_input_pipelines.
    """
    hosts = input_context.num_input_pipelines
    local_replicas = input_context.num_replicas_in_sync // hosts
    per_replica = input_context.get_per_replica_batch_size(global_batch_size)
    return step * per_replica * local_replicas, step * local_replicas


def _epoch_seed(seed: int, salt: int, epoch: tf.Tensor) -> tf.Tensor:
    """int32 [2] stateless seed of one epoch, the same on every host."""
    return tf.stack([tf.constant(derived_seed(seed, salt, 0), tf.int64), epoch])


def training_examples(
    source: source_lib.Source,
    input_context: tf.distribute.InputContext,
    per_replica_batch_size: int,
    image_size: int,
    seed: int | None,
    cache: bool,
    start: int = 0,
) -> tf.data.Dataset:
    """This host's (image, label) stream, epoch after epoch, from example
    `start` of it on.

    Epoch e is the host's share of the source in an order drawn from (seed,
    e) (Reader.records: all examples or all files permuted), through GR's
    shuffle buffer seeded by (seed, e, host). So with a seed, example k of
    the stream depends only on (seed, host, k): a run resumed at step s
    continues with the examples it would have had (`start` = its
    host_position), however often it was stopped. Records are shuffled and
    skipped before decoding, which only the examples kept pay for. Without
    a seed the orders differ every run, and the first epoch after a restart
    is cut to what is left of it (the epochs stay aligned with the steps).
    With cache, decoded images are kept in memory after the first pass and
    each epoch reorders them through the shuffle buffer only.
    """
    hosts = input_context.num_input_pipelines
    if source.num_examples < hosts:
        raise ValueError(
            f"{source.name} {source.split} has {source.num_examples} "
            f"examples, fewer than the {hosts} input pipelines (hosts); use "
            f"a larger split or fewer hosts."
        )
    host = input_context.input_pipeline_id
    count = source.host_count(input_context)
    buffer = shuffle_buffer_size(per_replica_batch_size, image_size, count)
    first_epoch, offset = divmod(start, count)
    if cache:
        # uint8 images before any augmentation, in the fixed order.
        cached = source.dataset(input_context).cache()

    def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
        if cache:
            data = cached
        elif seed is None:
            data = source.records(
                input_context,
                tf.random.uniform([2], maxval=tf.int32.max, dtype=tf.int32),
            )
        else:
            order = _epoch_seed(seed, _ORDER_SALT, epoch)
            data = source.records(input_context, tf.cast(order, tf.int32))
        shuffle_seed = None
        if seed is not None:
            # The buffer's draws then come from (seed, host, epoch) alone:
            # this function's graph ignores TF's global seed (which would
            # otherwise be mixed in, and break a tensor seed when it is 0).
            tf.compat.v1.get_default_graph().seed = None
            shuffle_seed = derived_seed(seed, _SHUFFLE_SALT, host) + epoch
        return data.shuffle(buffer, seed=shuffle_seed)

    epochs = tf.data.Dataset.range(first_epoch, _MAX_EPOCHS)
    if seed is None:
        head = epoch_records(tf.constant(first_epoch, tf.int64))
        data = head.take(count - offset).concatenate(
            epochs.skip(1).flat_map(epoch_records)
        )
    else:
        data = epochs.flat_map(epoch_records).skip(offset)
    return data if cache else source.decode(data)
