"""The reports of an evaluation, written to disk and TensorBoard.

t-SNE of encoder features, cosine nearest neighbours, a TensorBoard
projector directory, and write_reports, which saves them with the per-class
metrics (metrics.py) and pictures drawn by images.py. Every file goes
through file_io, so reports land in a gs:// model_dir too.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import threadpoolctl
from PIL import Image
from sklearn import manifold
from tensorboard.plugins import projector

from simclr_tf import file_io
from simclr_tf.reports import images as report_images
from simclr_tf.reports import metrics

PROJECTOR_TENSOR = "embedding/.ATTRIBUTES/VARIABLE_VALUE"


# ---------------------------------------------------------------- features


def _subsample_index(num_rows: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices of at most max_points rows from a seeded permutation."""
    if max_points < 1:
        raise ValueError(f"max_points={max_points} must be >= 1.")
    if num_rows <= max_points:
        return np.arange(num_rows, dtype=np.int64)
    chosen = np.random.default_rng(seed).permutation(num_rows)[:max_points]
    return np.sort(chosen).astype(np.int64)


def _check_features(features: np.ndarray, name: str) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2 or not features.shape[0]:
        raise ValueError(
            f"{name} must be [n, d] with n >= 1; got shape {features.shape}."
        )
    return features.astype(np.float64)


def _check_examples(
    features: np.ndarray, labels: np.ndarray, images: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Returns float64 features and labels after checking rows agree."""
    features = _check_features(features, "features")
    labels = np.asarray(labels)
    if labels.shape != (len(features),) or (
        images is not None and len(images) != len(features)
    ):
        raise ValueError(
            f"labels {labels.shape} (and images, if given) must have one "
            f"entry per features row ({len(features)})."
        )
    return features, labels


def embed_2d(
    features: np.ndarray,
    *,
    seed: int = 0,
    max_points: int = 2000,
    perplexity: float = 30.0,
) -> tuple[np.ndarray, np.ndarray]:
    """t-SNE of (a seeded subsample of) features to 2-D.

    Args:
      features: [n, d] float features.
      seed: seeds both the subsample and sklearn's TSNE.
      max_points: at most this many rows are embedded (t-SNE is O(m log m)
        per iteration; 2000 takes tens of seconds on 2 CPU cores).
      perplexity: t-SNE perplexity, lowered to (m - 1) / 3 for small m since
        sklearn requires perplexity < m.

    Returns:
      coords: [m, 2] float32 positions; index: [m] int64 sorted row indices
      of features that coords belong to. A single row maps to (0, 0).

    Raises:
      ValueError: if features is not [n, d] with n >= 1, or max_points < 1.
    """
    features = _check_features(features, "features")
    index = _subsample_index(len(features), max_points, seed)
    chosen = features[index]
    if len(chosen) < 2:
        return np.zeros((len(chosen), 2), np.float32), index
    tsne = manifold.TSNE(
        n_components=2,
        perplexity=min(float(perplexity), (len(chosen) - 1) / 3.0),
        # PCA init needs two components to exist; random init does not.
        init="pca" if min(chosen.shape) >= 2 else "random",
        random_state=seed,
    )
    # One OpenMP thread: on a shared 2-core machine sklearn's threaded
    # Barnes-Hut ran 3-100x slower than one thread (spinning under load).
    with threadpoolctl.threadpool_limits(limits=1):
        coords = tsne.fit_transform(chosen)
    return coords.astype(np.float32), index


def nearest_neighbours(
    query_features: np.ndarray,
    gallery_features: np.ndarray,
    k: int,
    *,
    exclude_self: bool = False,
) -> np.ndarray:
    """Indices of the k most cosine-similar gallery rows for each query.

    Args:
      query_features: [q, d] float.
      gallery_features: [g, d] float. All-zero rows have similarity 0.
      k: neighbours per query, 1 <= k <= g (g - 1 with exclude_self).
      exclude_self: the query set is the gallery set (q == g, same order);
        row i never returns i.

    Returns:
      [q, k] int64 gallery indices, most similar first; equal similarities
      are ordered by lower index.

    Raises:
      ValueError: on mismatched dimensions or an impossible k.
    """
    queries = _unit_rows(_check_features(query_features, "query_features"))
    gallery = _unit_rows(_check_features(gallery_features, "gallery_features"))
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query_features {queries.shape} and gallery_features "
            f"{gallery.shape} must share the feature dimension d."
        )
    available = len(gallery) - int(exclude_self)
    if not 1 <= k <= available:
        raise ValueError(
            f"k={k} must be in [1, {available}] for a gallery of "
            f"{len(gallery)} rows (exclude_self={exclude_self}); lower k."
        )
    similarity = queries @ gallery.T  # [q, g]
    if exclude_self:
        if len(queries) != len(gallery):
            raise ValueError(
                f"exclude_self needs the query set to be the gallery set; got "
                f"{len(queries)} queries and {len(gallery)} gallery rows."
            )
        np.fill_diagonal(similarity, -np.inf)
    # A stable sort keeps equal similarities in index order.
    order = np.argsort(-similarity, axis=1, kind="stable")
    return order[:, :k].astype(np.int64)


def _unit_rows(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return metrics.safe_divide(features, np.broadcast_to(norms, features.shape))


# ---------------------------------------------------------------- writers


def write_projector(
    log_dir: str,
    features: np.ndarray,
    labels: np.ndarray,
    images: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    max_points: int = 2000,
) -> str:
    """Writes a TensorBoard projector directory for features.

    log_dir gets a tf.train.Checkpoint(embedding=tf.Variable) (tensor name
    PROJECTOR_TENSOR), metadata.tsv (header "index\\tlabel": the original row
    and the class name or id), sprite.png when images are given, and
    projector_config.pbtxt. Run `tensorboard --logdir log_dir`.

    Args:
      log_dir: directory, created if missing.
      features: [n, d] float features.
      labels: [n] integer labels.
      images: optional [n, H, W, C] float in [0, 1] or uint8, C = 1 or 3.
      class_names: optional name per class for the metadata.
      max_points: at most this many rows (a seed-0 subsample) are written.

    Returns:
      The checkpoint path prefix.

    Raises:
      ValueError: on mismatched lengths.
    """
    features, labels = _check_examples(features, labels, images)
    index = _subsample_index(len(features), max_points, seed=0)
    file_io.makedirs(log_dir)
    variable = tf.Variable(features[index].astype(np.float32), name="embedding")
    checkpoint_path = tf.train.Checkpoint(embedding=variable).save(
        file_io.join(log_dir, "embedding.ckpt")
    )
    rows = [
        f"{row}\t{_metadata_label(int(labels[row]), class_names)}\n"
        for row in index
    ]
    file_io.write_text(
        file_io.join(log_dir, "metadata.tsv"), "index\tlabel\n" + "".join(rows)
    )
    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = PROJECTOR_TENSOR
    embedding.metadata_path = "metadata.tsv"  # relative to the config file
    if images is not None:
        sprite, thumb = report_images.sprite_image(np.asarray(images)[index])
        _save_png(sprite, file_io.join(log_dir, "sprite.png"))
        embedding.sprite.image_path = "sprite.png"
        embedding.sprite.single_image_dim.extend([thumb, thumb])
    projector.visualize_embeddings(log_dir, config)
    return checkpoint_path


def _metadata_label(label: int, class_names: Sequence[str] | None) -> str:
    if class_names is None or label >= len(class_names):
        return str(label)
    return " ".join(str(class_names[label]).split())  # no tabs or newlines


def _neighbours_of(
    features: np.ndarray, queries: np.ndarray, k: int
) -> np.ndarray:
    """nearest_neighbours(..., exclude_self=True)[queries] without [n, n]."""
    found = nearest_neighbours(features[queries], features, k + 1)
    keep = found != queries[:, None]
    return np.stack(
        [row[mask][:k] for row, mask in zip(found, keep, strict=True)]
    )


def write_reports(
    output_dir: str,
    *,
    labels: np.ndarray,
    predictions: np.ndarray,
    num_classes: int,
    features: np.ndarray | None = None,
    images: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    writer: tf.summary.SummaryWriter | None = None,
    step: int = 0,
    seed: int = 0,
    num_queries: int = 8,
    k: int = 8,
) -> dict[str, str]:
    """Writes every report of one evaluation into output_dir.

    Always per_class.json, per_class.txt and confusion_matrix.png. With
    features: embedding_map.png (t-SNE) and projector/, plus retrieval.png
    when images are given too (num_queries seeded queries, k neighbours each
    from the same set, never themselves). With writer: the PNGs as
    tf.summary.image "reports/<name>" and "reports/macro_f1" at step.

    Args:
      output_dir: directory, created if missing.
      labels: [n] integer true classes; predictions: [n] predicted classes.
      num_classes: C.
      features: optional [n, d] encoder features of the same examples.
      images: optional [n, H, W, C] float in [0, 1] or uint8 of the examples.
      class_names: optional name per class.
      writer: optional tf.summary writer; step: its step.
      seed: seeds the t-SNE subsample and the retrieval queries.
      num_queries, k: retrieval rows and neighbours per row.

    Returns:
      {name: path} of everything written.

    Raises:
      ValueError: as the functions above, or features/images of another n.
    """
    file_io.makedirs(output_dir)
    paths = {
        "per_class_json": file_io.join(output_dir, "per_class.json"),
        "per_class_txt": file_io.join(output_dir, "per_class.txt"),
    }
    report = metrics.classification_report(labels, predictions, num_classes)
    file_io.write_json(paths["per_class_json"], report)
    file_io.write_text(
        paths["per_class_txt"], metrics.format_report(report, class_names)
    )
    pictures = {
        "confusion_matrix": report_images.confusion_matrix_image(
            metrics.confusion_matrix(labels, predictions, num_classes),
            class_names,
        )
    }
    if features is not None:
        pictures.update(
            _feature_pictures(
                features, labels, images, class_names, seed, num_queries, k
            )
        )
        projector_dir = file_io.join(output_dir, "projector")
        paths["projector"] = write_projector(
            projector_dir, features, labels, images, class_names
        )
    for name, picture in pictures.items():
        paths[name] = _save_png(
            picture, file_io.join(output_dir, f"{name}.png")
        )
    if writer is not None:
        _log_summaries(writer, pictures, report["macro_f1"], step)
    return paths


def _feature_pictures(
    features: np.ndarray,
    labels: np.ndarray,
    images: np.ndarray | None,
    class_names: Sequence[str] | None,
    seed: int,
    num_queries: int,
    k: int,
) -> dict[str, Image.Image]:
    """The t-SNE map and, with images, the retrieval grid."""
    features, labels = _check_examples(features, labels, images)
    coords, index = embed_2d(features, seed=seed)
    pictures = {
        "embedding_map": report_images.embedding_map_image(
            coords, labels[index], class_names
        )
    }
    if images is None or len(features) < 2:
        return pictures
    rng = np.random.default_rng(seed)
    count = min(num_queries, len(features))
    queries = np.sort(rng.choice(len(features), size=count, replace=False))
    neighbours = _neighbours_of(features, queries, min(k, len(features) - 1))
    images = np.asarray(images)
    pictures["retrieval"] = report_images.retrieval_grid_image(
        images[queries], images[neighbours], labels[queries], labels[neighbours]
    )
    return pictures


def _log_summaries(
    writer: tf.summary.SummaryWriter,
    pictures: dict[str, Image.Image],
    macro_f1: float,
    step: int,
) -> None:
    with writer.as_default():
        for name, picture in pictures.items():
            pixels = np.asarray(picture.convert("RGB"))[None]  # [1, h, w, 3]
            tf.summary.image(f"reports/{name}", pixels, step=step)
        tf.summary.scalar("reports/macro_f1", macro_f1, step=step)
    writer.flush()


def _save_png(picture: Image.Image, path: str) -> str:
    """Writes a PIL image as PNG through file_io; returns path."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return file_io.write_bytes(path, buffer.getvalue())
