"""tf.data pipelines from a Source: two-view pretraining, fine-tune, eval.

The training functions return an `input_fn(input_context)` for
`strategy.distribute_datasets_from_function`; each host reads its own shard
and batches per replica. Training pipelines batch first and augment whole
batches with one seed per batch; images of varying size are cropped one at
a time first. The augmentations themselves live in data/augment/.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import NamedTuple

import tensorflow as tf

from simclr_tf.data import order
from simclr_tf.data.augment import crop, ops, views
from simclr_tf.data.sources import base as source_lib

InputFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]
AUTOTUNE = tf.data.AUTOTUNE


class Augmenter(NamedTuple):
    """How a training pipeline makes its views: crop, then finish a batch.

    per_image(image, label, seed) crops one image (as a batch of one) into
    one element's dict; per_batch(images, labels, seed) crops a batch into
    a dict of [b, ...]; finish(batch, seed) completes a batch of such dicts
    (e.g. colour distortion) and is compiled with XLA. Seeds are int32 [2]:
    the crop seed and the distort seed of `views.stage_seeds`. `key` names
    everything the three functions depend on: augmenters with equal keys
    compute the same thing, and share their compiled functions.
    """

    per_image: Callable[..., dict]
    per_batch: Callable[..., dict]
    finish: Callable[[dict, tf.Tensor], dict]
    key: Hashable


# The XLA-compiled stages of recent augmenters, by (Augmenter.key, stage).
# A pipeline with the key of an earlier one (a resumed or repeated run in
# the same process, the input benchmark's repeats) reuses its tf.function
# and so the compiled program: XLA compiles a batch shape once per process
# instead of once per pipeline (2-3 s each on 2 cores).
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_COMPILED_KEPT = 16


def _compiled(key: Hashable, function: Callable) -> Callable:
    """tf.function(function, jit_compile=True), shared by equal keys."""
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key]
    compiled = tf.function(function, jit_compile=True, autograph=False)
    _COMPILED[key] = compiled
    if len(_COMPILED) > _COMPILED_KEPT:
        _COMPILED.popitem(last=False)
    return compiled


def _unconverted(build: Callable) -> Callable:
    """`build` with autograph off in every tf.data function it makes.

    tf.data rewrites a map function with autograph unless it is made in a
    context that turns autograph off. Ours are plain graph code (no
    Python `if` or loop over tensors), and rewriting them, with every
    function they call, cost each new pipeline ~0.5 s before its first
    element.
    """
    return tf.autograph.experimental.do_not_convert(build)


def _augment_and_batch(
    examples: tf.data.Dataset,
    batch_size: int,
    seed: int | None,
    host: int,
    augmenter: Augmenter,
    batched_augment: bool,
    start: int = 0,
) -> tf.data.Dataset:
    """Batches (image, label) pairs and augments them.

    `examples` begins at example `start` of the host's stream (a multiple of
    batch_size, where a resumed run continues), and so do both seed
    streams: example `start` and batch `start // batch_size`.

    Batch k's views come from seed k of `order.batch_seeds` split by
    `views.stage_seeds`: its crop seed crops the whole batch, its distort
    seed finishes it. Whole batches are far faster (the batched function
    is compiled with XLA, which fuses its many element-wise ops;
    benchmarks/RESULTS.md), but images of varying size cannot be batched
    before cropping: those are cropped one at a time, example k with the
    crop seed of seed k of `order.element_seeds`, then batched and finished.

    Returns:
      Batches of the augmenter's dicts, drop_remainder.
    """
    static_size = examples.element_spec[0].shape[:2].is_fully_defined()
    batch_seeds = order.batch_seeds(seed, host, start // batch_size)
    if batched_augment and static_size:
        data = examples.batch(batch_size, drop_remainder=True)

        def per_batch(images, labels, batch_seed):
            crop_seed, distort_seed = views.stage_seeds(batch_seed)
            batch = augmenter.per_batch(images, labels, crop_seed)
            return augmenter.finish(batch, distort_seed)

        compiled = _compiled((augmenter.key, "per_batch"), per_batch)
        return tf.data.Dataset.zip(data, batch_seeds).map(
            lambda pair, batch_seed: compiled(*pair, batch_seed),
            num_parallel_calls=AUTOTUNE,
        )
    element_seeds = order.element_seeds(seed, host, start)
    data = tf.data.Dataset.zip(examples, element_seeds)
    data = data.map(
        lambda pair, element_seed: augmenter.per_image(
            *pair, views.stage_seeds(element_seed)[0]
        ),
        num_parallel_calls=AUTOTUNE,
    )
    data = data.batch(batch_size, drop_remainder=True)

    def finish(batch, batch_seed):
        return augmenter.finish(batch, views.stage_seeds(batch_seed)[1])

    compiled = _compiled((augmenter.key, "finish"), finish)
    return tf.data.Dataset.zip(data, batch_seeds).map(
        compiled, num_parallel_calls=AUTOTUNE
    )


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

    Per host: the example stream of `order.training_examples` (epochs
    ordered from the seed, GR's shuffle buffer, from where a resumed run
    is) -> batch (drop_remainder) -> two views
    per image -> prefetch. Batch k's views are
    `views.simclr_augment_batch` of its images twice over (a batch of 2b:
    image i's views are rows i and b + i) with batch seed k
    (`order.batch_seeds`), made in two stages: crop + flip with the crop seed
    (whole batches when the images share one size, else each image as a
    batch of two with its own seed, `order.element_seeds`, before batching),
    then colour jitter, grayscale and blur with the distort seed
    (`views.distort_views`). With augment_on_device the second stage is
    left to the train step, which calls `distort_views` with the batch's
    "distort_seed".

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
      augment_on_device: stop after crop + flip and add "distort_seed".
      crop_min_area: least crop area as a fraction of the image (paper
        0.08).
      start_step: the train step the run resumes at: the stream starts
        where an uninterrupted run would be after that many steps.

    Returns:
      input_fn(input_context) -> infinite dataset of dicts: "view1", "view2"
      [b, S, S, C] float32 in [0, 1] (with augment_on_device: crops before
      distortion, and "distort_seed" int32 [2] for `distort_views`)
      and "label" [b] int64, with b = the per-replica batch size.
    """
    ops.check_strength(color_jitter_strength)
    options = {
        "color_jitter_strength": color_jitter_strength,
        "blur": blur,
        "brightness_impl": brightness_impl,
    }

    def crop_batch(images: tf.Tensor, labels: tf.Tensor, seed_: tf.Tensor):
        # Both views in one call on a batch of 2b: image i's views are
        # rows i and b + i.
        crops = views.crop_and_flip(
            tf.concat([images, images], axis=0),
            image_size,
            seed_,
            crop_min_area=crop_min_area,
        )
        view1, view2 = tf.split(crops, 2, axis=0)
        return {"view1": view1, "view2": view2, "label": labels}

    def crop_image(image: tf.Tensor, label: tf.Tensor, seed_: tf.Tensor):
        batch = crop_batch(image[None], label[None], seed_)
        return {key: value[0] for key, value in batch.items()}

    def distort(batch: dict, seed_: tf.Tensor) -> dict:
        if augment_on_device:
            return {**batch, "distort_seed": seed_}
        crops = (batch["view1"], batch["view2"])
        view1, view2 = views.distort_views(crops, seed_, **options)
        return {**batch, "view1": view1, "view2": view2}

    return _training_input_fn(
        source,
        global_batch_size,
        image_size,
        seed,
        cache,
        Augmenter(
            crop_image,
            crop_batch,
            distort,
            key=(
                "pretrain",
                image_size,
                crop_min_area,
                augment_on_device,
                tuple(sorted(options.items())),
            ),
        ),
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
    `views.simclr_augment_batch(..., color_distort=False, blur=False)` (paper
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

    def one_view_batch(images: tf.Tensor, labels: tf.Tensor, seed_: tf.Tensor):
        crops = views.crop_and_flip(
            images, image_size, seed_, crop_min_area=crop_min_area
        )
        return {"image": crops, "label": labels}

    def one_view(image: tf.Tensor, label: tf.Tensor, seed_: tf.Tensor):
        batch = one_view_batch(image[None], label[None], seed_)
        return {key: value[0] for key, value in batch.items()}

    def clip(batch: dict, seed_: tf.Tensor) -> dict:
        # simclr_augment(color_distort=False, blur=False) ends in this clip.
        del seed_  # nothing random is left
        return {**batch, "image": tf.clip_by_value(batch["image"], 0.0, 1.0)}

    return _training_input_fn(
        source,
        global_batch_size,
        image_size,
        seed,
        cache,
        Augmenter(
            one_view,
            one_view_batch,
            clip,
            key=("finetune", image_size, crop_min_area),
        ),
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

    return _unconverted(input_fn)


@_unconverted
def eval_dataset(
    source: source_lib.Source,
    *,
    batch_size: int,
    image_size: int,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """One ordered pass over the split with `views.preprocess_for_eval`.

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
        image = views.preprocess_for_eval(image, image_size)
        return {"image": image, "label": label}

    data = source.dataset(input_context)
    data = data.map(preprocess, num_parallel_calls=AUTOTUNE)
    return data.batch(batch_size).prefetch(AUTOTUNE)


# The label of padding rows in padded_eval_dataset: no class has it.
PADDING_LABEL = -1


@_unconverted
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
        image = views.preprocess_for_eval(image, image_size)
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
