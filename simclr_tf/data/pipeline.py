"""tf.data pipelines from a Source: two-view pretraining, fine-tune, eval.

The training functions return an `input_fn(input_context)` for
`strategy.distribute_datasets_from_function`; each host reads its own shard
and batches per replica. Training pipelines batch first and augment whole
batches (augment.*_batch); the per-image path gives the same values.
Augmentations themselves live in augment.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import tensorflow as tf

from simclr_tf.data import order
from simclr_tf.data.augment import batch as augment_batch
from simclr_tf.data.augment import crop
from simclr_tf.data.augment import image as augment
from simclr_tf.data.augment import randomness as random_ops
from simclr_tf.data.sources import base as source_lib

InputFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]
AUTOTUNE = tf.data.AUTOTUNE


class Augmenter(NamedTuple):
    """How a training pipeline makes its views, in up to three stages.

    per_image(image, label, seed) and per_batch(images, labels, seeds) make
    the same dict (one element / a [b, ...] batch) on the host; finish(dict)
    completes a batch of it (e.g. colour distortion after a per-image crop)
    and is compiled with XLA. Both routes give the same values.
    """

    per_image: Callable[..., dict]
    per_batch: Callable[..., dict]
    finish: Callable[[dict], dict]


def _augment_and_batch(
    examples: tf.data.Dataset,
    batch_size: int,
    seed: int | None,
    host: int,
    augmenter: Augmenter,
    batched_augment: bool,
    start: int = 0,
) -> tf.data.Dataset:
    """Batches (image, label) pairs and augments them, each with its seed.

    `examples` begins at element `start` of the host's stream (a multiple
    of batch_size), and so do the seeds.

    Element k gets stateless seed k of `_element_seeds` on both routes, so
    they agree. Whole batches are far faster (fewer ops per image, and the
    batched function is compiled with XLA, which fuses its many element-wise
    ops: 6x faster on 32x32 and 4x on 224x224 batches on a CPU,
    benchmarks/RESULTS.md), but images of varying size cannot be batched
    before cropping: those are cropped per image, batched, then finished.

    Returns:
      Batches of the augmenter's dicts, drop_remainder.
    """
    static_size = examples.element_spec[0].shape[:2].is_fully_defined()
    if batched_augment and static_size:
        data = examples.batch(batch_size, drop_remainder=True)
        seeds = order.element_seeds(seed, host, batch_size, start)

        def per_batch(images, labels, seeds_):
            return augmenter.finish(augmenter.per_batch(images, labels, seeds_))

        compiled = tf.function(per_batch, jit_compile=True)
        return tf.data.Dataset.zip(data, seeds).map(
            lambda pair, seeds_: compiled(*pair, seeds_),
            num_parallel_calls=AUTOTUNE,
        )
    data = tf.data.Dataset.zip(
        examples, order.element_seeds(seed, host, start=start)
    )
    data = data.map(
        lambda pair, seed_: augmenter.per_image(*pair, seed_),
        num_parallel_calls=AUTOTUNE,
    )
    data = data.batch(batch_size, drop_remainder=True)
    finish = tf.function(augmenter.finish, jit_compile=True)
    return data.map(finish, num_parallel_calls=AUTOTUNE)


def _finish(data: tf.data.Dataset, seed: int | None) -> tf.data.Dataset:
    data = data.prefetch(AUTOTUNE)
    options = tf.data.Options()
    # Seeded runs must repeat exactly; unseeded ones may reorder for speed.
    options.deterministic = seed is not None
    return data.with_options(options)


def pretrain_input_fn(
    source: source_lib.Source,
    *,
    global_batch_size: int,
    image_size: int,
    color_jitter_strength: float,
    blur: bool,
    brightness_impl: str = "v2",
    seed: int | None = None,
    cache: bool = False,
    batched_augment: bool = True,
    augment_on_device: bool = False,
    crop_min_area: float = crop.MIN_AREA,
    start_step: int = 0,
) -> InputFn:
    """Two independently augmented views per image (paper Sec. 2.1).

    Per host: shard -> cache (optional) -> shuffle (GR's buffer, see
    `shuffle_buffer_size`) -> repeat -> batch (drop_remainder) -> two views
    per image, each image and view with its own stateless seed -> prefetch.
    A view is `augment.simclr_augment` with that seed, made in two stages:
    crop + flip (whole batches when the images share one size, else per
    image before batching), then colour jitter, grayscale and blur on the
    batch (`distort_views`). With augment_on_device the second stage is
    left to the train step, which calls `distort_views`.

    Args:
      source: the training split.
      global_batch_size: N, images per step over all replicas; each replica
        gets N / replicas (the input context checks divisibility).
      image_size: S, side of the augmented views in pixels.
      color_jitter_strength: s in [0, 1.25] (1.0 ImageNet, 0.5 CIFAR).
      blur: apply the random Gaussian blur.
      brightness_impl: "v2" multiplicative (GR default) or "v1" additive.
      seed: with an int the pipeline is deterministic (shuffle order and
        every augmentation) given the same TF global seed, which tf.data's
        shuffle mixes in; None is non-deterministic and faster.
      cache: cache the decoded uint8 images in memory after the first pass.
      batched_augment: crop whole batches (fast) rather than images.
      augment_on_device: stop after crop + flip and add "view_seeds".
      crop_min_area: least crop area as a fraction of the image (paper
        0.08).
      start_step: the train step the run resumes at: the stream starts
        where an uninterrupted run would be after that many steps.

    Returns:
      input_fn(input_context) -> infinite dataset of dicts: "view1", "view2"
      [b, S, S, C] float32 in [0, 1] (with augment_on_device: crops before
      distortion, and "view_seeds" int32 [b, 2, 2] for `distort_views`)
      and "label" [b] int64, with b = the per-replica batch size.
    """
    augment.check_strength(color_jitter_strength)
    options = {
        "color_jitter_strength": color_jitter_strength,
        "blur": blur,
        "brightness_impl": brightness_impl,
    }

    def crop_image(image: tf.Tensor, label: tf.Tensor, seed_: tf.Tensor):
        seeds = random_ops.stateless_split(seed_, 2)  # [2, 2]: view seeds
        view1, view2 = (
            augment.crop_and_flip(
                image, image_size, seeds[i], crop_min_area=crop_min_area
            )
            for i in (0, 1)
        )
        return {
            "view1": view1,
            "view2": view2,
            "view_seeds": seeds,
            "label": label,
        }

    def crop_batch(images: tf.Tensor, labels: tf.Tensor, seeds: tf.Tensor):
        # Image i's view seeds are stateless_split(seeds[i], 2), as above;
        # both views go through one call on a batch of 2b.
        seeds = random_ops.stateless_split(seeds, 2)  # [b, 2, 2]
        views = augment_batch.crop_and_flip_batch(
            tf.concat([images, images], axis=0),
            image_size,
            tf.concat([seeds[:, 0], seeds[:, 1]], axis=0),
            crop_min_area=crop_min_area,
        )
        view1, view2 = tf.split(views, 2, axis=0)
        return {
            "view1": view1,
            "view2": view2,
            "view_seeds": seeds,
            "label": labels,
        }

    def distort(batch: dict) -> dict:
        if augment_on_device:
            return batch
        batch = dict(batch)
        views = (batch.pop("view1"), batch.pop("view2"))
        view1, view2 = augment_batch.distort_views(
            views, batch.pop("view_seeds"), **options
        )
        return {"view1": view1, "view2": view2, **batch}

    return _training_input_fn(
        source,
        global_batch_size,
        image_size,
        seed,
        cache,
        Augmenter(crop_image, crop_batch, distort),
        batched_augment,
        start_step,
    )


def finetune_input_fn(
    source: source_lib.Source,
    *,
    global_batch_size: int,
    image_size: int,
    seed: int | None = None,
    cache: bool = False,
    batched_augment: bool = True,
    crop_min_area: float = crop.MIN_AREA,
    start_step: int = 0,
) -> InputFn:
    """One crop + flip view per image, for fine-tuning and linear eval.

    The same pipeline as `pretrain_input_fn` with
    `augment.simclr_augment(..., color_distort=False, blur=False)` (paper
    App. B.6: no colour distortion or blur outside pretraining), batched
    as there.

    Args:
      source: the training split.
      global_batch_size: N, images per step over all replicas.
      image_size: S, output side in pixels.
      seed: with an int the pipeline is deterministic; None is not.
      cache: cache the decoded uint8 images in memory.
      batched_augment: augment whole batches (fast) rather than images.
      crop_min_area: least crop area as a fraction of the image.
      start_step: the train step the run resumes at.

    Returns:
      input_fn(input_context) -> infinite dataset of dicts: "image"
      [b, S, S, C] float32 in [0, 1] and "label" [b] int64.
    """

    def one_view(image: tf.Tensor, label: tf.Tensor, seed_: tf.Tensor):
        view = augment.crop_and_flip(
            image, image_size, seed_, crop_min_area=crop_min_area
        )
        return {"image": view, "label": label}

    def one_view_batch(images: tf.Tensor, labels: tf.Tensor, seeds: tf.Tensor):
        views = augment_batch.crop_and_flip_batch(
            images, image_size, seeds, crop_min_area=crop_min_area
        )
        return {"image": views, "label": labels}

    def clip(batch: dict) -> dict:
        # simclr_augment(color_distort=False, blur=False) ends in this clip.
        return {**batch, "image": tf.clip_by_value(batch["image"], 0.0, 1.0)}

    return _training_input_fn(
        source,
        global_batch_size,
        image_size,
        seed,
        cache,
        Augmenter(one_view, one_view_batch, clip),
        batched_augment,
        start_step,
    )


def _training_input_fn(
    source: source_lib.Source,
    global_batch_size: int,
    image_size: int,
    seed: int | None,
    cache: bool,
    augmenter: Augmenter,
    batched_augment: bool,
    start_step: int,
) -> InputFn:
    """The input_fn shared by pretraining and fine-tuning pipelines."""

    def input_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        batch = input_context.get_per_replica_batch_size(global_batch_size)
        start, _ = order.host_position(
            start_step, global_batch_size, input_context
        )
        examples = order.training_examples(
            source, input_context, batch, image_size, seed, cache, start
        )
        data = _augment_and_batch(
            examples,
            batch,
            seed,
            input_context.input_pipeline_id,
            augmenter,
            batched_augment,
            start,
        )
        return _finish(data, seed)

    return input_fn


def eval_dataset(
    source: source_lib.Source,
    *,
    batch_size: int,
    image_size: int,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """One ordered pass over the split with `augment.preprocess_for_eval`.

    Args:
      source: the split to evaluate on.
      batch_size: images per batch; the last batch may be smaller, so every
        example is seen exactly once.
      image_size: S, output side in pixels.
      input_context: with it, only this host's shard.

    Returns:
      A finite dataset of dicts: "image" [b, S, S, C] float32 in [0, 1] and
      "label" [b] int64, b <= batch_size.
    """

    def preprocess(image: tf.Tensor, label: tf.Tensor) -> dict:
        image = augment.preprocess_for_eval(image, image_size)
        return {"image": image, "label": label}

    data = source.dataset(input_context)
    data = data.map(preprocess, num_parallel_calls=AUTOTUNE)
    return data.batch(batch_size).prefetch(AUTOTUNE)


# The label of padding rows in padded_eval_dataset: no class has it.
PADDING_LABEL = -1


def padded_eval_dataset(
    source: source_lib.Source,
    *,
    batch_size: int,
    image_size: int,
    rows: int,
    padded_rows: int,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """The first `rows` examples of this host's shard, eval-preprocessed,
    padded to `padded_rows` and batched in full batches (static shapes, as
    TPUs need, and the same number of steps on every host).

    Args:
      source: the split.
      batch_size: b, images per batch (one replica's).
      image_size: S, output side in pixels.
      rows: examples taken from the shard, in its fixed order.
      padded_rows: rows of the result, a multiple of batch_size >= rows;
        rows past `rows` are zero images with label PADDING_LABEL.
      input_context: this host's; None reads the whole split.

    Returns:
      padded_rows / b batches of {"image": [b, S, S, C] float32 in [0, 1],
      "label": [b] int64}.
    """
    channels = source.image_shape[-1]

    def preprocess(image: tf.Tensor, label: tf.Tensor) -> dict:
        image = augment.preprocess_for_eval(image, image_size)
        image.set_shape([image_size, image_size, channels])
        return {"image": image, "label": label}

    data = source.dataset(input_context).take(rows)
    data = data.map(preprocess, num_parallel_calls=AUTOTUNE)
    padding = tf.data.Dataset.from_tensors(
        {
            "image": tf.zeros([image_size, image_size, channels]),
            "label": tf.constant(PADDING_LABEL, tf.int64),
        }
    ).repeat()
    # Taken after the padding: a file that broke since the source was
    # opened (skipped by decode) cannot shorten the pass.
    data = data.concatenate(padding).take(padded_rows)
    return data.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)
