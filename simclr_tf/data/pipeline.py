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

from simclr_tf.data.augment import batch as augment_batch
from simclr_tf.data.augment import crop
from simclr_tf.data.augment import image as augment
from simclr_tf.data.augment import randomness as random_ops
from simclr_tf.data.sources import base as source_lib

InputFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]
AUTOTUNE = tf.data.AUTOTUNE
# Salts that keep the shuffle, augmentation and order seed streams apart.
_SHUFFLE_SALT, _AUGMENT_SALT, _ORDER_SALT = 1, 2, 3
# More epochs than any run has: the training stream is endless in effect.
_MAX_EPOCHS = 2**40


def _derived_seed(seed: int, salt: int, pipeline_id: int) -> int:
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


def _element_seeds(
    seed: int | None,
    host: int,
    batch_size: int | None = None,
    start: int = 0,
) -> tf.data.Dataset:
    """An endless stream of int32 [2] stateless seeds, one per element.

    Seeded: [derived seed, element index], independent of TF's global seed,
    from element `start` on (a resumed run continues its stream).
    Unseeded: random values from `Dataset.random`, different every run.
    With batch_size, one int32 [batch_size, 2] element per batch instead,
    made in one step (no per-element map): seeded, exactly the batched
    per-element stream; `start` must then be a multiple of batch_size.
    """
    if seed is None:
        # One random int64 per element, viewed as two int32.
        data = tf.data.Dataset.random()
        if batch_size is not None:
            data = data.batch(batch_size)
        return data.map(lambda value: tf.bitcast(value, tf.int32))
    base = tf.constant(_derived_seed(seed, _AUGMENT_SALT, host), tf.int64)
    # The index wraps modulo 2^32 in the cast: 4e9 distinct seeds per host.
    if batch_size is None:
        return tf.data.Dataset.counter(start).map(
            lambda index: tf.cast(tf.stack([base, index]), tf.int32)
        )

    def batch_seeds(batch: tf.Tensor) -> tf.Tensor:
        index = batch * batch_size + tf.range(batch_size, dtype=tf.int64)
        bases = tf.fill([batch_size], base)
        return tf.cast(tf.stack([bases, index], axis=1), tf.int32)

    return tf.data.Dataset.counter(start // batch_size).map(batch_seeds)


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
    return tf.stack(
        [tf.constant(_derived_seed(seed, salt, 0), tf.int64), epoch]
    )


def _training_examples(
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
            shuffle_seed = _derived_seed(seed, _SHUFFLE_SALT, host) + epoch
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
        seeds = _element_seeds(seed, host, batch_size, start)

        def per_batch(images, labels, seeds_):
            return augmenter.finish(augmenter.per_batch(images, labels, seeds_))

        compiled = tf.function(per_batch, jit_compile=True)
        return tf.data.Dataset.zip(data, seeds).map(
            lambda pair, seeds_: compiled(*pair, seeds_),
            num_parallel_calls=AUTOTUNE,
        )
    data = tf.data.Dataset.zip(
        examples, _element_seeds(seed, host, start=start)
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
        start, _ = host_position(start_step, global_batch_size, input_context)
        examples = _training_examples(
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
