"""Tests of the evaluation under a strategy (banks, linear_device,
knn_device, scoring) on 1, 2 and 4 virtual CPU replicas, against the
host references linear.py and knn.py (themselves tested against numpy
loops in test_evaluate.py and test_knn.py).
"""

from __future__ import annotations

import gc

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import func_graph

from simclr_tf.data import pipeline
from simclr_tf.data.sources import base as source_lib
from simclr_tf.evaluation import (
    banks,
    knn,
    knn_device,
    linear,
    linear_device,
    scoring,
)


def virtual_devices(count: int) -> list[str]:
    """The first `count` of conftest's four logical CPU devices."""
    return [f"/cpu:{index}" for index in range(count)]


def _source(count: int, seed: int = 0, classes: int = 3) -> source_lib.Source:
    """count 4x4 RGB images, image i's first pixel = i, label i % classes."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 4, 4, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(count)
    return source_lib.from_arrays(
        "tiny", "train", images, np.arange(count) % classes, classes
    )


def _bank(strategy, features, labels, capacity):
    """A Bank with rows split as evenly as array_split over the replicas."""
    bank = banks.Bank(
        strategy, capacity, {"features": ((features.shape[1],), tf.float32)}
    )
    parts = np.array_split(
        np.arange(len(labels)),
        len(strategy.experimental_local_results(bank.columns["label"])),
    )
    columns = zip(
        strategy.experimental_local_results(bank.columns["features"]),
        strategy.experimental_local_results(bank.columns["label"]),
        parts,
        strict=True,
    )
    for feature_part, label_part, rows in columns:
        padding = capacity - len(rows)
        feature_part.assign(
            np.concatenate(
                [features[rows], np.zeros((padding, features.shape[1]))]
            ).astype(np.float32)
        )
        label_part.assign(
            np.concatenate([labels[rows], -np.ones(padding)]).astype(np.int32)
        )
    return bank


def _pixel_features(images):
    return {"features": tf.reshape(images, [tf.shape(images)[0], -1])}


def _pixels(batch):
    return _pixel_features(batch["image"])


@pytest.mark.parametrize("replicas, limit", [(1, 0), (2, 0), (4, 13)])
def test_fill_keeps_each_row_once_and_pads_the_rest(replicas, limit):
    strategy = tf.distribute.MirroredStrategy(virtual_devices(replicas))
    source = _source(23)
    split = banks.distribute_split(
        strategy, source, batch=3, image_size=4, limit=limit
    )
    rows = limit or 23
    # Every replica takes the same number of full steps.
    assert split.rows == rows
    assert split.steps == -(-rows // (3 * replicas))
    bank = banks.Bank(
        strategy,
        banks.capacity_for(split, 4),
        {"features": ((48,), tf.float32)},
    )
    banks.fill(strategy, bank, split, _pixels)
    kept = bank.local_rows()
    real = kept["label"] >= 0
    ids = np.round(kept["features"][real][:, 0] * 255).astype(int)
    # The first `rows` images, each exactly once, with their labels; all
    # other rows are padding (label -1, zeros).
    assert sorted(ids) == list(range(rows))
    np.testing.assert_array_equal(kept["label"][real], ids % 3)
    assert not kept["features"][~real].any()
    assert len(kept["label"]) == replicas * bank.capacity


@pytest.mark.parametrize("replicas", [1, 4])
def test_stream_returns_rows_in_the_splits_order_without_padding(replicas):
    strategy = tf.distribute.MirroredStrategy(virtual_devices(replicas))
    split = banks.distribute_split(strategy, _source(23), batch=2, image_size=4)
    rows = banks.stream(strategy, split, _pixels)
    expected = np.concatenate(
        [
            batch["image"].numpy().reshape(len(batch["label"]), -1)
            for batch in pipeline.eval_dataset(
                _source(23), batch_size=5, image_size=4
            )
        ]
    )
    np.testing.assert_array_equal(rows["features"], expected)
    np.testing.assert_array_equal(rows["label"], np.arange(23) % 3)


def test_linear_on_one_replica_follows_linear_py_step_for_step():
    strategy = tf.distribute.MirroredStrategy(virtual_devices(1))
    rng = np.random.default_rng(0)
    features = (3 * rng.normal(size=(96, 5)) + 1).astype(np.float32)
    labels = rng.integers(0, 3, 96)
    bank = _bank(strategy, features, labels, 96)
    trained = linear_device.train_on_bank(
        strategy, bank, 3, epochs=3, batch_size=32, seed=4, chunk=32
    ).to_numpy()
    reference = linear.train_linear_classifier(
        features, labels, 3, epochs=3, batch_size=32, seed=4
    )
    # Same permutations and batches; float32 sums in another order.
    for name in ("mean", "std", "kernel", "bias"):
        np.testing.assert_allclose(
            getattr(trained, name), getattr(reference, name), atol=1e-6
        )


def _traced_graphs() -> int:
    """Traced graphs alive in this process after a full collection."""
    gc.collect()
    return sum(isinstance(o, func_graph.FuncGraph) for o in gc.get_objects())


def test_linear_on_one_replica_leaves_no_graph_behind():
    """The classifier's traced epoch goes with it: nothing in its step
    registers a gradient (tf.custom_gradient) that would hold the graph."""
    strategy = tf.distribute.MirroredStrategy(virtual_devices(1))
    rng = np.random.default_rng(0)
    features = rng.normal(size=(64, 5)).astype(np.float32)
    bank = _bank(strategy, features, rng.integers(0, 3, 64), 64)
    before = _traced_graphs()
    linear_device.train_on_bank(
        strategy, bank, 3, epochs=2, batch_size=32, seed=4, chunk=32
    )
    assert _traced_graphs() == before


@pytest.mark.parametrize("replicas", [2, 4])
def test_linear_full_batch_on_replicas_equals_one_device(replicas):
    """With the whole bank in every step, the order of rows cannot matter:
    R replicas with padding must give linear.py's full-batch result."""
    strategy = tf.distribute.MirroredStrategy(virtual_devices(replicas))
    rng = np.random.default_rng(1)
    features = (2 * rng.normal(size=(90, 6)) - 3).astype(np.float32)
    labels = rng.integers(0, 4, 90)
    capacity = 48  # > 90 / replicas: padding on every replica
    bank = _bank(strategy, features, labels, capacity)
    trained = linear_device.train_on_bank(
        strategy,
        bank,
        4,
        epochs=4,
        batch_size=replicas * capacity,
        learning_rate=0.5,
        seed=0,
        chunk=16,
    ).to_numpy()
    reference = linear.train_linear_classifier(
        features, labels, 4, epochs=4, batch_size=90, learning_rate=0.5
    )
    np.testing.assert_allclose(trained.mean, reference.mean, atol=1e-6)
    np.testing.assert_allclose(trained.std, reference.std, rtol=1e-6)
    np.testing.assert_allclose(trained.kernel, reference.kernel, atol=2e-6)
    np.testing.assert_allclose(trained.bias, reference.bias, atol=2e-6)


@pytest.mark.parametrize("replicas, chunk", [(1, 16), (4, 8), (4, 24)])
@pytest.mark.parametrize("k", [1, 5, 200])
def test_knn_ranks_on_replicas_equal_knn_py_scores(replicas, chunk, k):
    strategy = tf.distribute.MirroredStrategy(virtual_devices(replicas))
    rng = np.random.default_rng(2)
    train = rng.normal(size=(90, 6)).astype(np.float32)
    train_labels = rng.integers(0, 7, 90)
    queries = rng.normal(size=(40, 6)).astype(np.float32)
    query_labels = rng.integers(0, 7, 40)
    bank = _bank(strategy, train, train_labels, 96 // replicas)
    per_replica = 40 // replicas

    def values(context):
        rows = slice(
            context.replica_id_in_sync_group * per_replica,
            (context.replica_id_in_sync_group + 1) * per_replica,
        )
        return tf.constant(queries[rows]), tf.constant(query_labels[rows])

    inputs = strategy.experimental_distribute_values_from_function(values)

    @tf.function
    def run(inputs):
        return strategy.run(
            lambda q, y: knn_device.knn_ranks(
                q,
                y,
                bank,
                num_classes=7,
                k=min(k, 90),
                temperature=0.1,
                chunk=chunk,
                queries=5,
            ),
            args=inputs,
        )

    ranks = np.concatenate(
        [r.numpy() for r in strategy.experimental_local_results(run(inputs))]
    )
    scores = knn.knn_scores(
        train, train_labels, queries, num_classes=7, k=k, temperature=0.1
    )
    own = scores[np.arange(40), query_labels][:, None]
    expected = np.sum(~(scores < own), axis=1) - 1
    np.testing.assert_array_equal(ranks, expected)


def test_score_representation_on_two_replicas_matches_the_host_protocol():
    """Pixels of a small split: bank, linear classifier and kNN on two
    replicas against linear.py + knn.py on the host (same rows)."""
    strategy = tf.distribute.MirroredStrategy(virtual_devices(2))
    train_source, test_source = _source(40, seed=0), _source(17, seed=1)
    options = scoring.Options(
        num_classes=3,
        image_size=4,
        batch=4,
        chunk=8,
        linear_epochs=20,
        linear_batch=80,
        knn_k=5,
        knn_queries=2,
    )
    test = banks.distribute_split(strategy, test_source, batch=4, image_size=4)
    metrics, rows = scoring.score_representation(
        strategy,
        _pixel_features,
        train_source,
        test,
        options,
        train_rows=40,
        feature_dim=48,
        name="pixels",
    )
    # One step per epoch on both sides: all 40 rows (each replica's 20 and
    # padding fill its 40-row share of the 80-row batch).
    train_features, train_labels = (
        rows_features(train_source),
        np.arange(40) % 3,
    )
    classifier = linear.train_linear_classifier(
        train_features,
        train_labels,
        3,
        epochs=20,
        batch_size=80,
        learning_rate=0.1 * 80 / 256,
    )
    expected = linear.evaluate_linear(
        classifier, rows_features(test_source), rows["label"]
    )
    neighbours = knn.knn_accuracy(
        train_features,
        train_labels,
        rows_features(test_source),
        rows["label"],
        num_classes=3,
        k=5,
    )
    assert metrics["top_1"] == pytest.approx(expected["top_1"], abs=1e-9)
    assert metrics["knn/top_1"] == pytest.approx(neighbours["top_1"], abs=1e-9)
    assert metrics["knn/top_5"] == 1.0  # 3 classes
    assert (metrics["num_train"], metrics["num_test"]) == (40, 17)


def rows_features(source):
    return np.concatenate(
        [
            batch["image"].numpy().reshape(len(batch["label"]), -1)
            for batch in pipeline.eval_dataset(
                source, batch_size=8, image_size=4
            )
        ]
    )


def test_local_top_k_equals_numpy_argsort_of_cosine_similarity():
    """The running top-k over bank chunks against a plain numpy sort of
    every query-row cosine similarity (padding rows never chosen)."""
    strategy = tf.distribute.MirroredStrategy(virtual_devices(1))
    rng = np.random.default_rng(3)
    train = rng.normal(size=(50, 6)).astype(np.float32)
    train_labels = rng.integers(0, 5, 50)
    queries = rng.normal(size=(7, 6)).astype(np.float32)
    bank = _bank(strategy, train, train_labels, 64)  # 14 padding rows
    unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)

    @tf.function
    def top(queries):
        return knn_device._local_top_k(queries, bank, 9, 16)

    similar, labels = (t.numpy() for t in top(tf.constant(unit)))
    train_unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    cosine = unit.astype(np.float64) @ train_unit.T.astype(np.float64)
    order = np.argsort(-cosine, axis=1, kind="stable")[:, :9]
    np.testing.assert_allclose(
        similar, np.take_along_axis(cosine, order, 1), atol=1e-6
    )
    np.testing.assert_array_equal(labels, train_labels[order])


def test_bank_reads_chunks_that_divide_its_rows():
    """read_chunk(i, size) is rows i * size .. of each column asked for; a
    size that does not divide the rows is one clear error, also for the
    kNN and the linear classifier's passes."""
    strategy = tf.distribute.MirroredStrategy(virtual_devices(1))
    features = np.arange(24, dtype=np.float32).reshape(12, 2)
    bank = _bank(strategy, features, np.arange(12) % 3, 12)
    assert bank.chunks(4) == 3
    rows, labels = strategy.run(
        tf.function(lambda: bank.read_chunk(2, 4, ("features", "label")))
    )
    np.testing.assert_array_equal(rows, features[8:12])
    np.testing.assert_array_equal(labels, np.arange(8, 12) % 3)
    message = "chunk=5 must divide the bank's 12 rows per replica"
    with pytest.raises(ValueError, match=message):
        bank.chunks(5)
    with pytest.raises(ValueError, match=message):
        knn_device._local_top_k(tf.zeros([1, 2]), bank, 1, 5)
    with pytest.raises(ValueError, match=message):
        linear_device.standardization(strategy, bank, 5)


def _graphs(graph):
    """A traced graph and the graphs of its while bodies and branches."""
    yield graph
    for function in graph._functions.values():
        if getattr(function, "graph", None) is not None:
            yield from _graphs(function.graph)


def _op_types(graph) -> set[str]:
    return {op.type for part in _graphs(graph) for op in part.get_operations()}


@pytest.mark.parametrize(
    "replicas, jit_compile", [(0, False), (0, True), (2, False)]
)
def test_bank_writes_and_reads_only_the_rows_asked_for(replicas, jit_compile):
    """Bank.write scatters and Bank.gather gathers, each replica on its own
    rows: no whole column is read (a dense read of a variable in a loop
    copies all of it every step), and the rows read back are the rows
    written; under the default strategy (0 replicas) also compiled by XLA,
    as a TPU replica runs them, and under MirroredStrategy on 2."""
    strategy = (
        tf.distribute.MirroredStrategy(virtual_devices(replicas))
        if replicas
        else tf.distribute.get_strategy()
    )
    bank = banks.Bank(strategy, 8, {"features": ((3,), tf.float32)})
    values = np.arange(1, 13, dtype=np.float32).reshape(4, 3)
    labels = np.array([3, 1, 4, 1], np.int64)  # written as int32

    def replica_step(offset):
        context = tf.distribute.get_replica_context()
        scale = tf.cast(1 + context.replica_id_in_sync_group, tf.float32)
        bank.write(offset, {"features": values * scale, "label": labels})
        rows = offset - 1 + tf.range(6)
        return bank.gather("features", rows), bank.gather("label", rows)

    @tf.function(jit_compile=jit_compile)
    def write_then_read(offset):
        return strategy.run(replica_step, (offset,))

    features, read_labels = write_then_read(tf.constant(2))
    for replica in range(max(replicas, 1)):
        expected = np.zeros((6, 3), np.float32)
        expected[1:5] = values * (1 + replica)
        np.testing.assert_array_equal(
            strategy.experimental_local_results(features)[replica], expected
        )
        np.testing.assert_array_equal(
            strategy.experimental_local_results(read_labels)[replica],
            [banks.PADDING_LABEL, 3, 1, 4, 1, banks.PADDING_LABEL],
        )
    concrete = write_then_read.get_concrete_function(
        tf.TensorSpec([], tf.int32)
    )
    assert "ReadVariableOp" not in _op_types(concrete.graph)


def test_linear_classifier_reads_the_bank_by_rows():
    """The standardisation's chunk sums and the classifier's step on 2
    replicas: no traced read of a whole bank column ([capacity, ...]); the
    classifier's own variables are read whole, as they should be."""
    strategy = tf.distribute.MirroredStrategy(virtual_devices(2))
    capacity = 96
    bank = banks.Bank(strategy, capacity, {"features": ((5,), tf.float32)})
    with strategy.scope():
        kernel = keras.Variable(np.zeros([5, 3], np.float32))
        bias = keras.Variable(np.zeros([3], np.float32))
        optimizer = keras.optimizers.SGD(0.1)
        optimizer.build([kernel, bias])

    def replica_step():
        total = linear_device._sum_over_rows(
            bank,
            32,
            lambda rows, real: tf.concat(
                [tf.reduce_sum(rows * real, 0), [tf.reduce_sum(real)]], 0
            ),
        )
        weights = (tf.zeros([5]), tf.ones([5]), kernel, bias)
        linear_device._replica_step(
            bank, tf.range(capacity), 0, 16, weights, optimizer, 0.0, 2
        )
        return total

    concrete = tf.function(
        lambda: strategy.run(replica_step)
    ).get_concrete_function()
    reads = [
        op.outputs[0].shape.as_list()
        for graph in _graphs(concrete.graph)
        for op in graph.get_operations()
        if op.type == "ReadVariableOp"
    ]
    assert [5, 3] in reads  # the kernel: reads are seen
    assert not [shape for shape in reads if shape[:1] == [capacity]]


def _largest_tensor(concrete) -> int:
    """Elements of the largest tensor a traced kNN step computes, bank
    reads included (a dense read of the bank would be the whole bank)."""
    sizes = []
    for graph in _graphs(concrete.graph):
        for op in graph.get_operations():
            if op.type in ("Placeholder", "VarHandleOp"):
                continue
            for tensor in op.outputs:
                # Static shapes everywhere (as TPUs need), so the bound holds.
                assert tensor.shape.is_fully_defined(), (op.type, tensor)
                sizes.append(tensor.shape.num_elements())
    return max(sizes)


@pytest.mark.parametrize("replicas", [1, 2])
def test_knn_memory_does_not_grow_with_the_bank(replicas):
    """Every tensor of a kNN step has a static shape, and the largest is
    the [R queries, k + chunk] candidates of one bank chunk, whatever the
    bank's size (a [queries, bank] similarity matrix would be 65,536 wide)."""
    strategy = tf.distribute.MirroredStrategy(virtual_devices(replicas))
    largest = []
    for rows in (512, 65_536):
        bank = banks.Bank(strategy, rows, {"features": ((8,), tf.float32)})

        @tf.function
        def ranks(queries, labels, bank=bank):
            return strategy.run(
                lambda q, y: knn_device.knn_ranks(
                    q,
                    y,
                    bank,
                    num_classes=10,
                    k=20,
                    temperature=0.1,
                    chunk=256,
                    queries=8,
                ),
                args=(queries, labels),
            )

        largest.append(
            _largest_tensor(
                ranks.get_concrete_function(
                    tf.TensorSpec([40, 8]), tf.TensorSpec([40], tf.int64)
                )
            )
        )
    assert largest == [replicas * 8 * (20 + 256)] * 2


def _numpy_full_batch_fit(features, labels, classes, epochs, learning_rate):
    """Softmax regression on standardised rows, written from the protocol
    (float64): zero init, Nesterov momentum 0.9 in Keras' form, cosine
    decay to 0 without warm-up, one full-batch step per epoch."""
    mean = features.mean(axis=0, dtype=np.float64)
    std = features.std(axis=0, dtype=np.float64)
    x = (features - mean) / std
    onehot = np.eye(classes)[labels]
    kernel, bias = np.zeros((x.shape[1], classes)), np.zeros(classes)
    velocity = [np.zeros_like(kernel), np.zeros_like(bias)]
    for step in range(epochs):
        rate = learning_rate * 0.5 * (1 + np.cos(np.pi * step / epochs))
        logits = x @ kernel + bias
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        error = (probabilities - onehot) / len(labels)
        for index, gradient in enumerate((x.T @ error, error.sum(axis=0))):
            velocity[index] = 0.9 * velocity[index] - rate * gradient
            update = 0.9 * velocity[index] - rate * gradient
            if index == 0:
                kernel = kernel + update
            else:
                bias = bias + update
    return mean, std, kernel, bias


@pytest.mark.parametrize("replicas", [1, 4])
def test_linear_on_replicas_equals_a_numpy_softmax_regression(replicas):
    strategy = tf.distribute.MirroredStrategy(virtual_devices(replicas))
    rng = np.random.default_rng(5)
    features = (rng.normal(size=(60, 4)) * [1, 2, 3, 4] + 5).astype(np.float32)
    labels = rng.integers(0, 3, 60)
    capacity = 64 // replicas  # 4 padding rows in all
    bank = _bank(strategy, features, labels, capacity)
    trained = linear_device.train_on_bank(
        strategy,
        bank,
        3,
        epochs=6,
        batch_size=64,
        learning_rate=0.8,
        chunk=capacity // 2,
    ).to_numpy()
    mean, std, kernel, bias = _numpy_full_batch_fit(
        features.astype(np.float64), labels, 3, 6, 0.8
    )
    np.testing.assert_allclose(trained.mean, mean, atol=1e-5)
    np.testing.assert_allclose(trained.std, std, rtol=1e-5)
    np.testing.assert_allclose(trained.kernel, kernel, atol=1e-5)
    np.testing.assert_allclose(trained.bias, bias, atol=1e-5)
