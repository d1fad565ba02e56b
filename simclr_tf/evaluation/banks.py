"""Evaluation passes under the run's strategy, in bounded memory.

Every host reads its shard of a split (`distribute_split`) in full
per-replica batches, padded (label -1) so that all hosts take the same
number of steps; the replicas compute what each row gives. `fill` keeps
the rows on the replicas in a Bank (each replica its own rows: the
training features the linear classifier and kNN use in place); `stream`
brings small per-row results (ranks, predictions) back to the host.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from simclr_tf.data import pipeline
from simclr_tf.data.sources import base as source_lib

# Steps per tf.function call of `fill` (one progress line per call).
STEPS_PER_CALL = 200
PADDING_LABEL = pipeline.PADDING_LABEL


@dataclasses.dataclass(frozen=True)
class Split:
    """One distributed pass over (the first rows of) a split.

    Attributes:
      dataset: the distributed dataset (per-replica batches).
      steps: steps of one pass, the same on every host.
      batch: b, rows per replica and step.
      rows: real rows over all hosts (the rest is padding).
    """

    dataset: object
    steps: int
    batch: int
    rows: int


def host_rows(
    source: source_lib.Source, hosts: int, host: int, limit: int
) -> int:
    """Rows host `host` of `hosts` takes: its shard, cut to its share of
    `limit` (limit // hosts, one more for the first limit % hosts hosts;
    0 = no limit)."""
    context = tf.distribute.InputContext(
        num_input_pipelines=hosts, input_pipeline_id=host
    )
    count = source.host_count(context) if hosts > 1 else source.num_examples
    if limit > 0:
        count = min(count, limit // hosts + (1 if host < limit % hosts else 0))
    return count


def distribute_split(
    strategy: tf.distribute.Strategy,
    source: source_lib.Source,
    *,
    batch: int,
    image_size: int,
    limit: int = 0,
) -> Split:
    """The first `limit` rows (0: all) of `source`, b per replica and step.

    Raises:
      ValueError: the split gives no rows.
    """
    found: dict[str, int] = {}

    def input_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        hosts = context.num_input_pipelines
        local = max(1, context.num_replicas_in_sync // hosts)
        counts = [host_rows(source, hosts, h, limit) for h in range(hosts)]
        steps = -(-max(counts) // (batch * local))
        found.update(steps=steps, rows=sum(counts))
        return pipeline.padded_eval_dataset(
            source,
            batch_size=batch,
            image_size=image_size,
            rows=counts[context.input_pipeline_id],
            padded_rows=steps * batch * local,
            input_context=context if hosts > 1 else None,
        )

    dataset = strategy.distribute_datasets_from_function(input_fn)
    if not found.get("rows"):
        raise ValueError(
            f"{source.name} {source.split} gives no rows to evaluate; pass "
            f"another split or a larger --max_eval_examples."
        )
    return Split(
        dataset=dataset, steps=found["steps"], batch=batch, rows=found["rows"]
    )


class Bank:
    """Rows kept on the replicas: each replica its own [capacity, ...].

    Columns are sync-on-read variables (one copy per replica, as Keras
    metrics keep their state); "label" holds -1 for padding rows. Rows are
    written by scatter and read by gather on the replica's own variable
    (its handle): a slice of a column (`column[a:b]`, tf.slice), or
    tf.gather on it under MirroredStrategy, reads the whole column, and
    inside a loop TensorFlow copies all of it on every step (a 60,000 x
    784 bank: 180 MiB a write or read; benchmarks/RESULTS.md, "Evaluation").

    Args:
      strategy: the run's strategy.
      capacity: rows per replica.
      columns: name -> (row shape, dtype); "label" is added (int32).
    """

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        capacity: int,
        columns: Mapping[str, tuple[tuple[int, ...], tf.DType]],
    ) -> None:
        self.strategy = strategy
        self.capacity = capacity
        specs = {**columns, "label": ((), tf.int32)}
        self.columns = {}
        with strategy.scope():
            for name, (shape, dtype) in specs.items():
                fill = PADDING_LABEL if name == "label" else 0
                self.columns[name] = tf.Variable(
                    tf.fill([capacity, *shape], tf.constant(fill, dtype)),
                    trainable=False,
                    synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                    name=f"bank_{name}",
                )

    def write(self, offset: tf.Tensor, values: Mapping[str, tf.Tensor]) -> None:
        """In a replica context: rows offset.. of this replica's columns.

        Args:
          offset: int32 scalar, the first row written.
          values: column name -> [n, ...] rows (cast to the column's
            dtype); offset + n <= capacity.
        """
        for name, value in values.items():
            column = self.columns[name]
            rows = tf.shape(value)[0]
            tf.raw_ops.ResourceScatterUpdate(
                resource=column.handle,
                indices=offset + tf.range(rows),
                updates=tf.cast(value, column.dtype),
            )

    def gather(self, name: str, indices: tf.Tensor) -> tf.Tensor:
        """In a replica context: rows of this replica's column `name`.

        Args:
          name: a column ("features", "label", ...).
          indices: [n] int32 rows, each < capacity.

        Returns:
          [n, ...] rows in the column's dtype.
        """
        column = self.columns[name]
        return tf.raw_ops.ResourceGather(
            resource=column.handle, indices=indices, dtype=column.dtype
        )

    def chunks(self, size: int) -> int:
        """The number of `size`-row chunks of each replica's rows.

        Args:
          size: rows per chunk.

        Returns:
          capacity / size.

        Raises:
          ValueError: size does not divide the capacity.
        """
        if self.capacity % size:
            raise ValueError(
                f"chunk={size} must divide the bank's {self.capacity} rows "
                f"per replica (banks.capacity_for makes it so)."
            )
        return self.capacity // size

    def read_chunk(
        self, index: int | tf.Tensor, size: int, names: Sequence[str]
    ) -> list[tf.Tensor]:
        """In a replica context: chunk `index` of this replica's columns.

        Args:
          index: the chunk, < chunks(size).
          size: rows per chunk (static: TPUs compile static shapes only).
          names: the columns read.

        Returns:
          One [size, ...] tensor per name: rows index * size .. of it.
        """
        rows = index * size + tf.range(size)
        return [self.gather(name, rows) for name in names]

    def local_rows(self) -> dict[str, np.ndarray]:
        """This process's replicas' rows, replica after replica (padding
        included)."""
        return {
            name: np.concatenate(
                [
                    np.asarray(part)
                    for part in self.strategy.experimental_local_results(column)
                ]
            )
            for name, column in self.columns.items()
        }


def capacity_for(split: Split, chunk: int) -> int:
    """Rows per replica of a bank of `split`, a multiple of `chunk`."""
    rows = split.steps * split.batch
    return -(-rows // chunk) * chunk


def _full(batch: Mapping[str, tf.Tensor], size: int) -> dict:
    """The batch with its static batch dimension: batches are full (padded),
    but MultiWorkerMirroredStrategy's iterator forgets the dimension, which
    the chunked kNN needs static."""
    return {
        name: tf.ensure_shape(value, [size, *value.shape[1:]])
        for name, value in batch.items()
    }


def fill(
    strategy: tf.distribute.Strategy,
    bank: Bank,
    split: Split,
    rows_of: Callable[[Mapping[str, tf.Tensor]], Mapping[str, tf.Tensor]],
    name: str = "",
) -> None:
    """Runs one pass of `split` and writes rows_of(batch) into `bank`.

    Args:
      strategy: the run's strategy.
      bank: the Bank, capacity >= split.steps * split.batch.
      split: the pass.
      rows_of: per replica, a batch {"image", "label"} -> {column: [b,
        ...]}; the labels are written by `fill`.
      name: for the progress lines.
    """

    def replica_step(batch: Mapping[str, tf.Tensor], offset: tf.Tensor):
        batch = _full(batch, split.batch)
        bank.write(offset, {**rows_of(batch), "label": batch["label"]})

    # The replica step is plain graph code: autograph need not rewrite the
    # encoder's Python (see train_step.make_train_loop).
    unconverted = tf.autograph.experimental.do_not_convert(replica_step)

    @tf.function
    def run(iterator: object, first: tf.Tensor, steps: tf.Tensor) -> None:
        for index in tf.range(steps):
            offset = (first + index) * split.batch
            strategy.run(unconverted, (next(iterator), offset))

    iterator = iter(split.dataset)
    started = time.time()
    for first in range(0, split.steps, STEPS_PER_CALL):
        steps = min(STEPS_PER_CALL, split.steps - first)
        run(iterator, tf.constant(first), tf.constant(steps))
        logging.info(
            "%s bank: step %d/%d (%.0f s)",
            name or "feature",
            first + steps,
            split.steps,
            time.time() - started,
        )


def stream(
    strategy: tf.distribute.Strategy,
    split: Split,
    rows_of: Callable[[Mapping[str, tf.Tensor]], Mapping[str, tf.Tensor]],
) -> dict[str, np.ndarray]:
    """One pass of `split`; rows_of's per-row results on the host.

    Args:
      strategy: the run's strategy.
      split: the pass.
      rows_of: per replica, a batch -> {name: [b, ...]} (small rows: ranks,
        predictions); "label" is added.

    Returns:
      {name: [rows, ...]} of this process's real rows (padding dropped),
      in (step, replica) order: the split's order on one host.
    """

    def replica_step(batch: Mapping[str, tf.Tensor]) -> dict:
        batch = _full(batch, split.batch)
        return {**rows_of(batch), "label": tf.cast(batch["label"], tf.int32)}

    @tf.function(autograph=False)
    def run(iterator: object) -> dict:
        return strategy.run(replica_step, (next(iterator),))

    iterator = iter(split.dataset)
    parts: dict[str, list[np.ndarray]] = {}
    for _ in range(split.steps):
        for name, value in run(iterator).items():
            parts.setdefault(name, []).extend(
                np.asarray(part)
                for part in strategy.experimental_local_results(value)
            )
    arrays = {name: np.concatenate(part) for name, part in parts.items()}
    real = arrays["label"] != PADDING_LABEL
    return {name: array[real] for name, array in arrays.items()}
