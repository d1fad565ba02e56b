"""Linear evaluation on frozen features (v1 App. B.6, frozen-feature variant).

Features come from one pass of the frozen encoder (BN in inference mode) over
eval-preprocessed images (centre crop, or none at <= 32 px). Unlike the
paper's protocol, the classifier then trains without crop + flip, because
recomputing the encoder every epoch is too slow on a CPU; the full protocol
with augmentation is `--train_mode=lineareval`. kNN eval and the
eval-over-checkpoints loop are not here.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

# Features whose train std is below this are constant; they are centred but
# not scaled (dividing by ~0 would blow up rounding noise).
_MIN_STD = 1e-6


@dataclasses.dataclass(frozen=True)
class LinearClassifier:
    """A trained linear classifier on (optionally standardised) features.

    Attributes:
        mean: [F] float32 train-feature mean subtracted first (zeros when
            standardize=False).
        std: [F] float32 train-feature std divided next (ones when
            standardize=False; 1 for constant features).
        kernel: [F, C] float32 weights of the Dense layer.
        bias: [C] float32 bias of the Dense layer.
    """

    mean: np.ndarray
    std: np.ndarray
    kernel: np.ndarray
    bias: np.ndarray

    def predict_logits(self, features: np.ndarray) -> np.ndarray:
        """Logits ((x - mean) / std) @ kernel + bias.

        Args:
            features: [n, F] float features, same F as at training.

        Returns:
            [n, C] float32 logits.

        Raises:
            ValueError: if features is not [n, F] with the trained F.
        """
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.kernel.shape[0]:
            raise ValueError(
                f"features has shape {features.shape}; the classifier was "
                f"trained on [n, {self.kernel.shape[0]}] features. Pass "
                "features from the same encoder output."
            )
        standardized = _standardize(features, self.mean, self.std)
        return standardized @ self.kernel + self.bias


def _standardize(
    features: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
    """(x - mean) / std computed in float64, returned as float32."""
    centred = features.astype(np.float64) - mean.astype(np.float64)
    return (centred / std.astype(np.float64)).astype(np.float32)


def _check_training_inputs(
    features: np.ndarray, labels: np.ndarray, num_classes: int
) -> None:
    """Raises ValueError on mismatched shapes or out-of-range labels."""
    if features.ndim != 2 or labels.ndim != 1:
        raise ValueError(
            f"train_features has shape {features.shape} and train_labels "
            f"{labels.shape}; expected [n, F] and [n]."
        )
    if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise ValueError(
            f"train_features has {features.shape[0]} rows and train_labels "
            f"{labels.shape[0]}; they must be equal and non-zero."
        )
    if num_classes < 1 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"num_classes={num_classes} but labels span [{labels.min()}, "
            f"{labels.max()}]; labels must lie in [0, num_classes)."
        )


def _cosine_learning_rate(
    base: float, step: tf.Tensor, total_steps: int
) -> tf.Tensor:
    """base * 0.5 * (1 + cos(pi * step / total_steps)), no warm-up."""
    progress = tf.cast(step, tf.float32) / float(total_steps)
    return base * 0.5 * (1.0 + tf.cos(math.pi * progress))


def _momentum_update(
    variable: tf.Variable,
    velocity: tf.Variable,
    gradient: tf.Tensor,
    learning_rate: tf.Tensor,
    momentum: float,
    nesterov: bool,
) -> None:
    """SGD with momentum in Keras' form: v <- m v - lr g; w <- w + v.

    With nesterov, w <- w + m v - lr g (the look-ahead step), as in
    keras.optimizers.SGD.
    """
    velocity.assign(momentum * velocity - learning_rate * gradient)
    if nesterov:
        variable.assign_add(momentum * velocity - learning_rate * gradient)
    else:
        variable.assign_add(velocity)


def _train_sgd(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression by minibatch SGD; returns (kernel, bias).

    Each epoch visits a fresh stateless permutation of the rows in batches
    (the last one may be short), all inside one tf.function call: gathering
    rows in-graph avoids a tf.data copy of the feature matrix and per-step
    Python overhead. Weights start at zero (the problem is convex).
    """
    num_examples, dim = features.shape
    steps_per_epoch = -(-num_examples // batch_size)
    total_steps = epochs * steps_per_epoch
    features_tensor = tf.constant(features, tf.float32)
    labels_tensor = tf.constant(labels, tf.int64)
    kernel = tf.Variable(tf.zeros([dim, num_classes]))
    bias = tf.Variable(tf.zeros([num_classes]))
    variables = [kernel, bias]
    velocities = [tf.Variable(tf.zeros_like(v)) for v in variables]

    @tf.function
    def run_epoch(epoch: tf.Tensor) -> None:
        noise = tf.random.stateless_uniform(
            [num_examples], seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        order = tf.argsort(noise)
        for index in tf.range(steps_per_epoch, dtype=tf.int64):
            rows = order[index * batch_size : (index + 1) * batch_size]
            batch_features = tf.gather(features_tensor, rows)
            batch_labels = tf.gather(labels_tensor, rows)
            with tf.GradientTape() as tape:
                logits = tf.matmul(batch_features, kernel) + bias
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(
                        labels=batch_labels, logits=logits
                    )
                )
                loss += 0.5 * weight_decay * tf.reduce_sum(tf.square(kernel))
            gradients = tape.gradient(loss, variables)
            step_rate = _cosine_learning_rate(
                learning_rate, epoch * steps_per_epoch + index, total_steps
            )
            for variable, velocity, gradient in zip(
                variables, velocities, gradients, strict=True
            ):
                _momentum_update(
                    variable, velocity, gradient, step_rate, momentum, nesterov
                )

    for epoch in range(epochs):
        run_epoch(tf.constant(epoch, tf.int64))
    return kernel.numpy(), bias.numpy()


def train_linear_classifier(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    num_classes: int,
    *,
    epochs: int = 30,
    batch_size: int = 256,
    learning_rate: float | None = None,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    standardize: bool = True,
    seed: int = 0,
) -> LinearClassifier:
    """Trains Dense(num_classes) on frozen features (v1 App. B.6 recipe).

    Nesterov momentum SGD, lr 0.1 * batch_size / 256 by default, cosine decay
    to 0 over all steps without warm-up, no weight decay, softmax
    cross-entropy. With standardize=True the features are first scaled by the
    train mean / std per feature; this is an affine map, so the classifier
    stays linear in the raw features, and it is applied identically to every
    representation compared (encoder, random encoder, pixels) so they get
    the same optimiser conditioning.

    Args:
        train_features: [n, F] float features.
        train_labels: [n] int labels in [0, num_classes).
        num_classes: number of classes C >= 1.
        epochs: passes over the data, >= 1.
        batch_size: examples per step, >= 1.
        learning_rate: peak rate; None means 0.1 * batch_size / 256.
        momentum: momentum coefficient in [0, 1).
        nesterov: use Nesterov momentum.
        weight_decay: coefficient of 0.5 * wd * ||kernel||^2 in the loss.
        standardize: standardise features with the train mean / std.
        seed: seed of the per-epoch shuffles.

    Returns:
        The trained LinearClassifier.

    Raises:
        ValueError: on mismatched shapes, labels out of range or
            non-positive epochs, batch_size or learning_rate.
    """
    features = np.asarray(train_features, np.float32)
    labels = np.asarray(train_labels, np.int64)
    _check_training_inputs(features, labels, num_classes)
    if learning_rate is None:
        learning_rate = 0.1 * batch_size / 256
    if epochs < 1 or batch_size < 1 or learning_rate <= 0:
        raise ValueError(
            f"epochs={epochs}, batch_size={batch_size} and learning_rate="
            f"{learning_rate} must all be positive."
        )
    if standardize:
        mean = features.mean(axis=0, dtype=np.float64)
        std = features.std(axis=0, dtype=np.float64)
        std = np.where(std < _MIN_STD, 1.0, std)
    else:
        mean, std = np.zeros(features.shape[1]), np.ones(features.shape[1])
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    kernel, bias = _train_sgd(
        _standardize(features, mean, std),
        labels,
        num_classes,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=float(learning_rate),
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        seed=seed,
    )
    return LinearClassifier(mean=mean, std=std, kernel=kernel, bias=bias)


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is unambiguously among the k best logits.

    Ties count against the prediction: a row is correct only if fewer than k
    other classes have a logit >= the label's. So constant logits score 0
    (for k < C), unlike tf.math.in_top_k, which counts ties as hits. Without
    ties this equals "label in argsort(-logits)[:k]".

    Args:
        logits: [n, C] float scores.
        labels: [n] int labels in [0, C).
        k: number of top classes accepted, >= 1 (k >= C gives 1.0).

    Returns:
        Accuracy in [0, 1] as a Python float.

    Raises:
        ValueError: if k < 1, shapes mismatch or n == 0.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels, np.int64)
    if k < 1:
        raise ValueError(f"k={k} must be >= 1 (e.g. 1 or 5).")
    if (
        logits.ndim != 2
        or labels.shape != (logits.shape[0],)
        or not len(labels)
    ):
        raise ValueError(
            f"logits has shape {logits.shape} and labels {labels.shape}; "
            "expected [n, C] and [n] with n > 0."
        )
    label_logits = np.take_along_axis(logits, labels[:, None], axis=1)
    # Rivals: classes not strictly below the label's logit, minus the label's
    # own column. Written as ~(<) so a NaN logit counts as a rival and a NaN
    # label logit makes the row a miss rather than a hit.
    rivals = np.sum(~(logits < label_logits), axis=1) - 1
    return float(np.mean(rivals < k))


def evaluate_linear(
    classifier: LinearClassifier, features: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """Top-1 and top-5 accuracy of a classifier on features.

    Args:
        classifier: a trained LinearClassifier.
        features: [n, F] float features.
        labels: [n] int labels.

    Returns:
        {"top_1": float, "top_5": float}; top_5 is 1.0 when C <= 5.
    """
    logits = classifier.predict_logits(features)
    return {
        "top_1": top_k_accuracy(logits, labels, 1),
        "top_5": top_k_accuracy(logits, labels, 5),
    }


def linear_eval(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    **kwargs: float | bool | None,
) -> dict[str, float | int]:
    """Trains a linear classifier on train features, scores it on test.

    Args:
        train_features: [n, F] float features.
        train_labels: [n] int labels in [0, num_classes).
        test_features: [m, F] float features.
        test_labels: [m] int labels.
        num_classes: number of classes.
        **kwargs: passed to train_linear_classifier (epochs, batch_size, ...).

    Returns:
        {"top_1", "top_5", "num_train", "num_test"}.
    """
    classifier = train_linear_classifier(
        train_features, train_labels, num_classes, **kwargs
    )
    result: dict[str, float | int] = dict(
        evaluate_linear(classifier, test_features, test_labels)
    )
    result["num_train"] = int(np.asarray(train_labels).shape[0])
    result["num_test"] = int(np.asarray(test_labels).shape[0])
    return result
