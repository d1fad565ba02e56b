"""Per-class metrics of a classifier's predictions, in numpy: the confusion
matrix, precision / recall / F1 per class with macro averages, and their
text table. No sklearn.metrics; the pictures are images.py's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from simclr_tf.reports import images as report_images


def confusion_matrix(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int
) -> np.ndarray:
    """Counts of (true, predicted) pairs.

    Args:
      labels: [n] integer true classes in [0, num_classes).
      predictions: [n] integer predicted classes in [0, num_classes).
      num_classes: C >= 1.

    Returns:
      [C, C] int64; entry (i, j) counts examples of class i predicted as j.

    Raises:
      ValueError: on a shape mismatch, non-integer values or a class outside
        [0, num_classes).
    """
    labels = _class_ids(labels, "labels", num_classes)
    predictions = _class_ids(predictions, "predictions", num_classes)
    if labels.shape != predictions.shape:
        raise ValueError(
            f"labels {labels.shape} and predictions {predictions.shape} must "
            "have the same [n] shape; pass one prediction per label."
        )
    flat = labels * num_classes + predictions
    counts = np.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _class_ids(values: np.ndarray, name: str, num_classes: int) -> np.ndarray:
    if int(num_classes) < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1.")
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D [n]; got shape {array.shape}.")
    if array.size and not np.all(np.equal(np.mod(array, 1), 0)):
        raise ValueError(f"{name} must hold integer class ids; got floats.")
    array = array.astype(np.int64)
    bad = (array < 0) | (array >= num_classes)
    if np.any(bad):
        raise ValueError(
            f"{name} must lie in [0, num_classes={num_classes}); found "
            f"{array[bad][:5].tolist()}. Check num_classes or the label map."
        )
    return array


def safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0, no warnings."""
    out = np.zeros(np.shape(numerator), np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def classification_report(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int
) -> dict:
    """Per-class precision, recall, F1 and support, plus macro averages.

    A class never predicted has precision 0, one with no examples recall 0,
    and F1 is 0 when precision + recall == 0 (sklearn's zero_division=0).
    Macro averages weigh every class equally, absent classes included.

    Args:
      labels: [n] integer true classes in [0, num_classes).
      predictions: [n] integer predicted classes in [0, num_classes).
      num_classes: C >= 1.

    Returns:
      {"per_class": [{"class", "precision", "recall", "f1", "support"}] * C,
       "macro_precision", "macro_recall", "macro_f1", "accuracy"}; plain
      Python floats and ints, ready for json.

    Raises:
      ValueError: as confusion_matrix.
    """
    matrix = confusion_matrix(labels, predictions, num_classes)
    true_positives = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    precision = safe_divide(true_positives, matrix.sum(axis=0))
    recall = safe_divide(true_positives, support)
    f1 = safe_divide(2.0 * precision * recall, precision + recall)
    per_class = [
        {
            "class": index,
            "precision": float(precision[index]),
            "recall": float(recall[index]),
            "f1": float(f1[index]),
            "support": int(support[index]),
        }
        for index in range(num_classes)
    ]
    total = int(matrix.sum())
    return {
        "per_class": per_class,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "accuracy": float(true_positives.sum() / total) if total else 0.0,
    }


def format_report(
    report: dict, class_names: Sequence[str] | None = None
) -> str:
    """A fixed-width table of a classification_report, one row per class.

    Args:
      report: the dict classification_report returns.
      class_names: optional name per class index, shown after the index.

    Returns:
      Text lines: a header, one row per class, then macro avg and accuracy.
    """
    rows = report["per_class"]
    names = [
        report_images.class_label(row["class"], class_names) for row in rows
    ]
    width = min(max([len(name) for name in names] + [9]), 32)
    header = f"{'class':<{width}}  precision  recall      f1  support"
    lines = [header, "-" * len(header)]
    for name, row in zip(names, rows, strict=True):
        lines.append(
            f"{name[:width]:<{width}}  {row['precision']:9.4f}  "
            f"{row['recall']:6.4f}  {row['f1']:6.4f}  {row['support']:7d}"
        )
    total = sum(row["support"] for row in rows)
    lines += [
        "-" * len(header),
        f"{'macro avg':<{width}}  {report['macro_precision']:9.4f}  "
        f"{report['macro_recall']:6.4f}  {report['macro_f1']:6.4f}  "
        f"{total:7d}",
        f"{'accuracy':<{width}}  {'':9}  {'':6}  "
        f"{report['accuracy']:6.4f}  {total:7d}",
    ]
    return "\n".join(lines) + "\n"
