"""Tests for simclr_tf.eval_reports and the report_images it draws with."""

from __future__ import annotations

import glob
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from sklearn import metrics as sk_metrics
from tensorboard.plugins import projector

from simclr_tf.reports import evaluation as eval_reports
from simclr_tf.reports import images as report_images
from simclr_tf.reports import metrics as report_metrics

# Hand-computed 3-class case. Pairs (true, predicted):
# (0,0) (0,0) (0,1) (1,1) (1,1) (1,2) (2,2) (2,0) (2,0) (2,2)
HAND_LABELS = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
HAND_PREDICTIONS = np.array([0, 0, 1, 1, 1, 2, 2, 0, 0, 2])
HAND_MATRIX = np.array([[2, 1, 0], [0, 2, 1], [2, 0, 2]])


def _pixel(image, x, y):
    return tuple(int(v) for v in image.getpixel((x, y)))


def test_confusion_matrix_hand_computed():
    matrix = report_metrics.confusion_matrix(HAND_LABELS, HAND_PREDICTIONS, 3)
    assert matrix.dtype == np.int64
    np.testing.assert_array_equal(matrix, HAND_MATRIX)


def test_classification_report_hand_computed():
    report = report_metrics.classification_report(
        HAND_LABELS, HAND_PREDICTIONS, 3
    )
    # Column sums 4, 3, 3 predictions; row sums 3, 3, 4 supports.
    precision = [2 / 4, 2 / 3, 2 / 3]
    recall = [2 / 3, 2 / 3, 2 / 4]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True)]
    rows = report["per_class"]
    # Tolerance: float64 arithmetic in a different order.
    np.testing.assert_allclose([r["precision"] for r in rows], precision)
    np.testing.assert_allclose([r["recall"] for r in rows], recall)
    np.testing.assert_allclose([r["f1"] for r in rows], f1)
    assert [r["support"] for r in rows] == [3, 3, 4]
    assert [r["class"] for r in rows] == [0, 1, 2]
    assert report["accuracy"] == pytest.approx(6 / 10)
    assert report["macro_f1"] == pytest.approx(sum(f1) / 3)


def test_classification_report_matches_sklearn_with_empty_classes():
    rng = np.random.default_rng(1)
    num_classes = 6
    labels = rng.integers(0, 5, 200)  # class 5 has no support
    predictions = rng.integers(0, 4, 200)  # classes 4 and 5 never predicted
    with np.errstate(all="raise"):  # no division warnings allowed
        report = report_metrics.classification_report(
            labels, predictions, num_classes
        )
    reference = sk_metrics.precision_recall_fscore_support(
        labels,
        predictions,
        labels=list(range(num_classes)),
        zero_division=0,
    )
    rows = report["per_class"]
    # Tolerance: both are float64 ratios of the same integer counts.
    for key, expected in zip(
        ("precision", "recall", "f1"), reference[:3], strict=True
    ):
        np.testing.assert_allclose([r[key] for r in rows], expected)
    assert [r["support"] for r in rows] == reference[3].tolist()
    assert report["macro_f1"] == pytest.approx(np.mean(reference[2]))
    assert report["accuracy"] == pytest.approx(
        sk_metrics.accuracy_score(labels, predictions)
    )
    np.testing.assert_array_equal(
        report_metrics.confusion_matrix(labels, predictions, num_classes),
        sk_metrics.confusion_matrix(
            labels, predictions, labels=list(range(num_classes))
        ),
    )


@pytest.mark.parametrize(
    "labels, predictions",
    [([0, 3], [0, 1]), ([0, -1], [0, 1]), ([0, 1], [0, 1, 2]), ([0.5], [0])],
)
def test_confusion_matrix_rejects_bad_inputs(labels, predictions):
    with pytest.raises(ValueError, match="labels|predictions"):
        report_metrics.confusion_matrix(
            np.array(labels), np.array(predictions), 3
        )


def test_format_report_has_a_row_per_class_then_averages():
    report = report_metrics.classification_report(
        HAND_LABELS, HAND_PREDICTIONS, 3
    )
    text = report_metrics.format_report(report, ["cat", "dog", "emu"])
    lines = [line for line in text.splitlines() if line.strip("-")]
    assert [line.split()[:2] for line in lines[1:4]] == [
        ["0", "cat"],
        ["1", "dog"],
        ["2", "emu"],
    ]
    assert lines[4].startswith("macro avg")
    assert lines[5].startswith("accuracy")
    assert f"{6 / 10:.4f}" in lines[5]
    assert len({len(line) for line in lines[:5]}) == 1  # fixed width


def _dark_cells(image):
    """Coordinates of pixels drawn exactly in the heat map's 1.0 colour."""
    pixels = np.asarray(image)
    ys, xs = np.nonzero(np.all(pixels == report_images.DARK_BLUE, axis=-1))
    return xs, ys


def test_confusion_matrix_image_diagonal_darker_than_off_diagonal():
    num_classes = 4
    # Rows of very different totals: row normalisation makes each 1.0.
    matrix = np.diag([1, 5, 50, 500])
    image = report_images.confusion_matrix_image(matrix)
    assert image.mode == "RGB"
    xs, ys = _dark_cells(image)
    left, top = xs.min(), ys.min()
    cell = (xs.max() - left + 1) / num_classes
    assert ys.max() - top + 1 == pytest.approx(cell * num_classes)
    # Every fully dark pixel lies in a diagonal cell.
    np.testing.assert_array_equal((xs - left) // cell, (ys - top) // cell)
    for row in range(num_classes):
        for column in range(num_classes):
            corner = (left + column * cell + 1, top + row * cell + 1)
            brightness = sum(_pixel(image, *corner))
            if row == column:
                assert brightness == sum(report_images.DARK_BLUE)
            else:
                assert brightness == 3 * 255  # white: row fraction 0


@pytest.mark.parametrize("num_classes", [1, 300])
def test_confusion_matrix_image_any_size_fits(num_classes):
    matrix = np.eye(num_classes, dtype=np.int64)
    image = report_images.confusion_matrix_image(matrix)
    # Limit: MAX_MATRIX_PIXELS for the cells plus label/title margins.
    assert max(image.size) <= report_images.MAX_MATRIX_PIXELS + 200
    xs, _ = _dark_cells(image)
    assert xs.size > 0  # the diagonal is drawn


def _two_clusters(per_cluster=30, dim=10, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.zeros((2, dim))
    centres[1, 0] = 20.0  # 20 sigma apart
    labels = np.repeat([0, 1], per_cluster)
    features = centres[labels] + rng.normal(size=(2 * per_cluster, dim))
    return features, labels


def test_embed_2d_separates_two_clusters():
    features, labels = _two_clusters()
    coords, index = eval_reports.embed_2d(features, seed=0)
    assert coords.shape == (60, 2) and coords.dtype == np.float32
    np.testing.assert_array_equal(index, np.arange(60))
    centroids = np.stack([coords[labels == c].mean(axis=0) for c in (0, 1)])
    distances = np.linalg.norm(coords[:, None] - centroids[None], axis=-1)
    np.testing.assert_array_equal(distances.argmin(axis=1), labels)


def test_embed_2d_is_deterministic_per_seed():
    features, _ = _two_clusters(per_cluster=20)
    first = eval_reports.embed_2d(features, seed=3, max_points=30)
    second = eval_reports.embed_2d(features, seed=3, max_points=30)
    other = eval_reports.embed_2d(features, seed=4, max_points=30)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[1], other[1])


def test_embed_2d_respects_max_points():
    features, _ = _two_clusters(per_cluster=25)
    coords, index = eval_reports.embed_2d(features, seed=1, max_points=20)
    assert coords.shape == (20, 2)
    assert index.dtype == np.int64
    assert np.all(np.diff(index) > 0) and 0 <= index[0] and index[-1] < 50
    # The coords belong to exactly those rows: embedding them alone agrees.
    alone, _ = eval_reports.embed_2d(features[index], seed=1, max_points=20)
    np.testing.assert_array_equal(coords, alone)


@pytest.mark.parametrize("num_rows, dim", [(1, 4), (3, 4), (5, 1)])
def test_embed_2d_tiny_inputs_work(num_rows, dim):
    features = np.random.default_rng(0).normal(size=(num_rows, dim))
    coords, index = eval_reports.embed_2d(features)
    assert coords.shape == (num_rows, 2)
    assert np.all(np.isfinite(coords))
    np.testing.assert_array_equal(index, np.arange(num_rows))


def test_embedding_map_image_colours_points_by_label():
    coords = np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    labels = np.array([0, 1, 12])  # > 10 classes: the 20-colour palette
    image = report_images.embedding_map_image(coords, labels, size=200)
    colours = {tuple(c) for c in np.asarray(image).reshape(-1, 3).tolist()}
    for label in labels:
        assert report_images.PALETTE_20[label] in colours


def _brute_force_neighbours(queries, gallery, k, exclude_self):
    result = []
    for i, query in enumerate(queries):
        scored = []
        for j, item in enumerate(gallery):
            if exclude_self and i == j:
                continue
            norms = math.sqrt(sum(v * v for v in query)) * math.sqrt(
                sum(v * v for v in item)
            )
            cosine = sum(a * b for a, b in zip(query, item, strict=True))
            # Rounding: matmul and this loop differ in the last bits only.
            scored.append((-round(cosine / norms, 9), j))
        result.append([j for _, j in sorted(scored)[:k]])
    return np.array(result)


def _gallery_with_ties():
    rng = np.random.default_rng(2)
    gallery = rng.normal(size=(12, 5))
    gallery[7] = gallery[2]  # exact duplicates: tied similarities
    gallery[9] = gallery[2]
    gallery[4] = gallery[0]
    return gallery


@pytest.mark.parametrize("exclude_self", [False, True])
def test_nearest_neighbours_matches_brute_force(exclude_self):
    gallery = _gallery_with_ties()
    queries = gallery if exclude_self else gallery[[2, 0, 5, 9]]
    found = eval_reports.nearest_neighbours(
        queries, gallery, 4, exclude_self=exclude_self
    )
    expected = _brute_force_neighbours(
        queries.tolist(), gallery.tolist(), 4, exclude_self
    )
    assert found.dtype == np.int64
    np.testing.assert_array_equal(found, expected)


def test_nearest_neighbours_ties_go_to_lower_index():
    gallery = _gallery_with_ties()
    found = eval_reports.nearest_neighbours(gallery, gallery, 2)
    np.testing.assert_array_equal(found[9], [2, 7])  # 2, 7, 9 all equal
    excluded = eval_reports.nearest_neighbours(
        gallery, gallery, 2, exclude_self=True
    )
    np.testing.assert_array_equal(excluded[2], [7, 9])
    assert excluded[0, 0] == 4 and excluded[4, 0] == 0  # its twin, not itself


def test_nearest_neighbours_rejects_too_many_neighbours():
    gallery = np.eye(3)
    with pytest.raises(ValueError, match="k=3"):
        eval_reports.nearest_neighbours(gallery, gallery, 3, exclude_self=True)


def _tile_origin(row, column, cell_w, cell_h):
    """Top-left frame corner from the layout documented in the module."""
    pad = report_images.GRID_PAD
    x = pad if column == 0 else 2 * pad + column * (cell_w + pad)
    return x, pad + row * (cell_h + pad)


def test_retrieval_grid_borders_mark_label_matches():
    rng = np.random.default_rng(0)
    queries = rng.random((2, 8, 8, 1))  # float, one channel
    neighbours = rng.random((2, 3, 8, 8, 1))
    query_labels = np.array([0, 1])
    neighbour_labels = np.array([[0, 1, 0], [2, 1, 1]])
    image = report_images.retrieval_grid_image(
        queries, neighbours, query_labels, neighbour_labels
    )
    border = report_images.GRID_BORDER
    tile = 64  # 8 px upscaled by 8 reaches MIN_TILE exactly
    cell = tile + 2 * border
    right, bottom = _tile_origin(1, 3, cell, cell)
    assert image.width >= right + cell + report_images.GRID_PAD
    assert image.height > bottom + cell
    assert _pixel(image, right + cell, bottom + cell - 1) == (255, 255, 255)
    for row in range(2):
        for column in range(3):
            x, y = _tile_origin(row, column + 1, cell, cell)
            same = neighbour_labels[row, column] == query_labels[row]
            colour = (
                report_images.MATCH_COLOR
                if same
                else report_images.MISMATCH_COLOR
            )
            assert _pixel(image, x, y) == colour
            assert _pixel(image, x + cell - 1, y + cell - 1) == colour
            # Inside the frame: the upscaled image, grey repeated to RGB.
            value = round(neighbours[row, column, 7, 7, 0] * 255)
            inner = (x + border + tile - 1, y + border + tile - 1)
            assert _pixel(image, *inner) == (value,) * 3


def test_write_projector_files_parse(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(10, 4)).astype(np.float32)
    labels = rng.integers(0, 3, 10)
    images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    log_dir = str(tmp_path / "projector")
    path = eval_reports.write_projector(
        log_dir, features, labels, images, class_names=["a", "b", "c"]
    )
    with open(os.path.join(log_dir, "projector_config.pbtxt")) as file:
        config = text_format.Parse(file.read(), projector.ProjectorConfig())
    (embedding,) = config.embeddings
    assert embedding.tensor_name == "embedding/.ATTRIBUTES/VARIABLE_VALUE"
    with open(os.path.join(log_dir, embedding.metadata_path)) as file:
        lines = file.read().splitlines()
    assert len(lines) == 11 and lines[0] == "index\tlabel"
    assert lines[1:] == [f"{i}\t{'abc'[labels[i]]}" for i in range(10)]
    reader = tf.train.load_checkpoint(path)
    np.testing.assert_array_equal(
        reader.get_tensor(embedding.tensor_name), features
    )
    assert tf.train.latest_checkpoint(log_dir) == path  # what TB loads
    sprite = tf.io.decode_png(
        tf.io.read_file(os.path.join(log_dir, embedding.sprite.image_path))
    ).numpy()
    thumb = list(embedding.sprite.single_image_dim)
    assert thumb[0] == thumb[1] <= report_images.SPRITE_THUMB
    assert sprite.shape == (4 * thumb[0], 4 * thumb[0], 3)  # ceil(sqrt 10)


def test_write_projector_subsample_keeps_rows_and_metadata_aligned(tmp_path):
    features = np.arange(40, dtype=np.float32).reshape(20, 2)
    labels = np.arange(20) % 3
    path = eval_reports.write_projector(
        str(tmp_path), features, labels, max_points=5
    )
    with open(tmp_path / "metadata.tsv") as file:
        rows = [line.split("\t") for line in file.read().splitlines()[1:]]
    index = np.array([int(row[0]) for row in rows])
    assert len(rows) == 5 and not (tmp_path / "sprite.png").exists()
    assert [int(row[1]) for row in rows] == (labels[index]).tolist()
    values = tf.train.load_checkpoint(path).get_tensor(
        eval_reports.PROJECTOR_TENSOR
    )
    np.testing.assert_array_equal(values, features[index])


def _event_values(log_dir):
    values = {}
    for event_file in glob.glob(os.path.join(log_dir, "events.out.*")):
        for event in tf.compat.v1.train.summary_iterator(event_file):
            for value in event.summary.value:
                values[value.tag] = (event.step, value)
    return values


def test_write_reports_writes_files_and_summaries(tmp_path):
    features, labels = _two_clusters(per_cluster=15)
    predictions = labels.copy()
    predictions[:3] = 1  # three class-0 examples wrong
    images = np.random.default_rng(0).random((30, 8, 8, 3))
    summary_dir = str(tmp_path / "tb")
    writer = tf.summary.create_file_writer(summary_dir)
    paths = eval_reports.write_reports(
        str(tmp_path / "reports"),
        labels=labels,
        predictions=predictions,
        num_classes=2,
        features=features,
        images=images,
        class_names=["left", "right"],
        writer=writer,
        step=7,
        num_queries=4,
        k=3,
    )
    names = {"per_class_json", "per_class_txt", "confusion_matrix"}
    names |= {"embedding_map", "retrieval", "projector"}
    assert set(paths) == names
    for name in names - {"projector"}:
        assert os.path.isfile(paths[name])
    assert tf.train.load_checkpoint(paths["projector"]) is not None
    values = _event_values(summary_dir)
    for tag in ("confusion_matrix", "embedding_map", "retrieval"):
        step, _ = values[f"reports/{tag}"]
        assert step == 7
    step, value = values["reports/macro_f1"]
    report = report_metrics.classification_report(labels, predictions, 2)
    assert step == 7
    # Tolerance: the scalar is stored as float32.
    assert float(tf.make_ndarray(value.tensor)) == pytest.approx(
        report["macro_f1"], rel=1e-6
    )


def test_write_reports_without_features_writes_metrics_only(tmp_path):
    paths = eval_reports.write_reports(
        str(tmp_path),
        labels=HAND_LABELS,
        predictions=HAND_PREDICTIONS,
        num_classes=3,
    )
    assert set(paths) == {"per_class_json", "per_class_txt", "confusion_matrix"}
    assert sorted(os.listdir(tmp_path)) == [
        "confusion_matrix.png",
        "per_class.json",
        "per_class.txt",
    ]


def test_class_label_shows_a_name_only_when_it_adds_one():
    # tfds names classes without names "0", "1", ...: not repeated.
    assert report_images.class_label(3, ("a", "b", "c", "dog")) == "3 dog"
    assert report_images.class_label(3, ("0", "1", "2", "3")) == "3"
    assert report_images.class_label(3, None) == "3"
    assert report_images.class_label(5, ("a",)) == "5"
