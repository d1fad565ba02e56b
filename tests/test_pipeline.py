"""Tests for simclr_tf.data.pipeline: two-view, fine-tune and eval datasets.

Sources are tiny in-memory arrays so every pipeline runs in about a second;
the tfds path runs under tfds.testing.mock_data only (never the network).
"""

from __future__ import annotations

import functools
import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_tf.config import schema as config_lib
from simclr_tf.data import order, pipeline, run_data
from simclr_tf.data.augment import views
from simclr_tf.data.sources import base as source_lib
from simclr_tf.data.sources import registry, synthetic

SIZE = 16


def tiny_source(num_examples: int = 10) -> source_lib.Source:
    return synthetic.synthetic(
        num_examples=num_examples, image_size=SIZE, channels=3, seed=0
    )


def indexed_source(
    num_examples: int = 12, channels: int = 3
) -> tuple[source_lib.Source, np.ndarray]:
    """Random images labelled by their index, and the images as uint8."""
    rng = np.random.default_rng(4)
    shape = (num_examples, SIZE, SIZE, channels)
    images = rng.integers(0, 256, shape, np.uint8)
    labels = np.arange(num_examples)
    source = source_lib.from_arrays(
        "indexed", "train", images, labels, num_examples
    )
    return source, images


def constant_source(value: int, num_examples: int = 4) -> source_lib.Source:
    """Images of one flat colour: only a colour change can alter a pixel."""
    images = np.full((num_examples, SIZE, SIZE, 3), value, np.uint8)
    labels = np.arange(num_examples) % 2
    return source_lib.from_arrays("constant", "train", images, labels, 2)


def pretrain_batches(
    source, count, *, global_batch_size=5, seed=0, context=None, **kwargs
):
    kwargs = {"color_jitter_strength": 0.5, "blur": False, **kwargs}
    input_fn = pipeline.pretrain_input_fn(
        source,
        global_batch_size=global_batch_size,
        image_size=SIZE,
        seed=seed,
        **kwargs,
    )
    # tf.data's shuffle mixes in the global seed: the same one every time.
    keras.utils.set_random_seed(0)
    data = input_fn(context or tf.distribute.InputContext())
    return list(data.take(count).as_numpy_iterator())


def _seeds(stream, count):
    return list(stream.take(count).as_numpy_iterator())


@pytest.fixture(scope="module")
def seeded_batches():
    """6 batches of 5 from 12 indexed examples: epochs end mid-batch."""
    return pretrain_batches(indexed_source()[0], 6, blur=True)


@pytest.fixture(scope="module")
def per_image_batches():
    """The same pipeline cropping one image at a time: 3 batches."""
    return pretrain_batches(
        indexed_source()[0], 3, blur=True, batched_augment=False
    )


def test_pretrain_input_fn_views_shape_dtype_range(seeded_batches):
    for batch in seeded_batches:
        for key in ("view1", "view2"):
            assert batch[key].shape == (5, SIZE, SIZE, 3)
            assert batch[key].dtype == np.float32
            assert batch[key].min() >= 0.0 and batch[key].max() <= 1.0
        assert batch["label"].dtype == np.int64


def test_pretrain_input_fn_drops_remainder_across_epochs(seeded_batches):
    # 12 examples, batch 5: epochs end mid-batch, yet every batch is full.
    assert [len(batch["label"]) for batch in seeded_batches] == [5] * 6


def test_pretrain_input_fn_first_epoch_is_a_permutation(seeded_batches):
    labels = np.concatenate([batch["label"] for batch in seeded_batches])
    # The shuffle buffer (5 x 50, capped at 12) holds the whole split, so
    # the first 12 elements are each example (label = index) exactly once.
    np.testing.assert_array_equal(np.sort(labels[:12]), np.arange(12))


def test_pretrain_input_fn_views_differ(seeded_batches):
    for batch in seeded_batches:
        difference = np.abs(batch["view1"] - batch["view2"]).mean(
            axis=(1, 2, 3)
        )
        # Independent crops of a patterned image are never pixel-identical.
        assert np.all(difference > 1e-3)


def test_pretrain_input_fn_seed_repeats_exactly(seeded_batches):
    again = pretrain_batches(indexed_source()[0], 6, blur=True)
    for a, b in zip(seeded_batches, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_pretrain_input_fn_different_seeds_differ(seeded_batches):
    other = pretrain_batches(indexed_source()[0], 2, seed=1, blur=True)
    for a, b in zip(seeded_batches, other, strict=False):
        assert not np.array_equal(a["view1"], b["view1"])


def _latest_compiled_stage(make_input_fn, **changes) -> object:
    """The compiled stage a pipeline built with `changes` uses."""
    arguments = {"global_batch_size": 4, "image_size": SIZE, "seed": 0}
    make_input_fn(tiny_source(), **{**arguments, **changes})(
        tf.distribute.InputContext()
    )
    # The stage just built or reused is the most recently used entry.
    return next(reversed(pipeline._COMPILED.values()))


@pytest.mark.parametrize(
    "change",
    [
        {"image_size": 8},
        {"crop_min_area": 0.5},
        {"color_jitter_strength": 1.0},
        {"blur": True},
        {"brightness_impl": "v1"},
        {"augment_on_device": True},
    ],
)
def test_pipelines_share_compiled_stages_only_with_equal_parameters(change):
    """Equal augmentation parameters reuse one tf.function (XLA compiles it
    once per process); any parameter that changes the views gets its own.
    The seed is data, not a parameter: it shares."""
    pretrain = functools.partial(
        pipeline.pretrain_input_fn, color_jitter_strength=0.5, blur=False
    )
    reference = _latest_compiled_stage(pretrain)
    assert _latest_compiled_stage(pretrain) is reference
    assert _latest_compiled_stage(pretrain, seed=5) is reference
    assert _latest_compiled_stage(pretrain, **change) is not reference
    finetune = pipeline.finetune_input_fn
    assert _latest_compiled_stage(finetune) is not reference
    assert _latest_compiled_stage(finetune) is _latest_compiled_stage(finetune)


def test_training_input_fn_per_replica_batch():
    # pretrain and finetune share _training_input_fn; finetune's is quicker
    # to build (no colour distortion to compile).
    input_fn = pipeline.finetune_input_fn(
        tiny_source(), global_batch_size=8, image_size=SIZE, seed=0
    )
    context = tf.distribute.InputContext(num_replicas_in_sync=2)
    batch = next(input_fn(context).as_numpy_iterator())
    assert batch["image"].shape == (4, SIZE, SIZE, 3)


def test_pretrain_input_fn_changes_flat_colours():
    # Crop, flip and blur leave a flat image flat and unchanged, so any
    # change comes from the colour distortion (applied with p = 0.8).
    batch = pretrain_batches(
        constant_source(128, 8),
        1,
        global_batch_size=8,
        color_jitter_strength=1.0,
    )[0]
    both = np.concatenate([batch["view1"], batch["view2"]])
    assert np.any(np.abs(both - 128 / 255) > 0.02)


def test_finetune_input_fn_keeps_colours():
    input_fn = pipeline.finetune_input_fn(
        constant_source(77, 8), global_batch_size=8, image_size=SIZE, seed=0
    )
    batch = next(input_fn(tf.distribute.InputContext()).as_numpy_iterator())
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (8, SIZE, SIZE, 3)
    # Crop + bicubic resize of a flat image is flat: only float rounding.
    np.testing.assert_allclose(batch["image"], 77 / 255, atol=1e-5)


def test_eval_dataset_one_ordered_pass():
    source = tiny_source(10)
    batches = list(
        pipeline.eval_dataset(
            source, batch_size=4, image_size=SIZE
        ).as_numpy_iterator()
    )
    assert [len(batch["label"]) for batch in batches] == [4, 4, 2]
    images, labels = next(source.dataset().batch(10).as_numpy_iterator())
    np.testing.assert_array_equal(
        np.concatenate([b["label"] for b in batches]), labels
    )
    # At <= 32 px with the stored size, eval preprocessing is the identity
    # up to float rounding of x / 255.
    np.testing.assert_allclose(
        np.concatenate([b["image"] for b in batches]), images / 255, atol=1e-5
    )


def test_eval_dataset_shards_are_disjoint_and_cover():
    source = tiny_source(11)

    def keys(context):
        data = pipeline.eval_dataset(
            source, batch_size=4, image_size=SIZE, input_context=context
        )
        return [
            image.tobytes()
            for batch in data.as_numpy_iterator()
            for image in batch["image"]
        ]

    shards = [
        keys(
            tf.distribute.InputContext(
                num_input_pipelines=2, input_pipeline_id=index
            )
        )
        for index in range(2)
    ]
    everything = keys(None)
    assert len(set(everything)) == 11  # synthetic images are all distinct
    assert not set(shards[0]) & set(shards[1])
    assert sorted(itertools.chain(*shards)) == sorted(everything)


def test_pretrain_input_fn_rejects_more_hosts_than_examples():
    context = tf.distribute.InputContext(num_input_pipelines=4)
    with pytest.raises(ValueError, match="fewer than the 4 input pipelines"):
        pretrain_batches(tiny_source(3), 1, context=context)


def test_pretrain_input_fn_tfds_mock_cifar10():
    with tfds.testing.mock_data(
        num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        source = registry.open_source("cifar10", "train")
        input_fn = pipeline.pretrain_input_fn(
            source,
            global_batch_size=4,
            image_size=32,
            color_jitter_strength=0.5,
            blur=False,
            seed=0,
        )
        batches = list(
            input_fn(tf.distribute.InputContext()).take(2).as_numpy_iterator()
        )
    for batch in batches:
        assert batch["view1"].shape == (4, 32, 32, 3)
        assert batch["view2"].dtype == np.float32
        assert 0.0 <= batch["view1"].min() and batch["view1"].max() <= 1.0
        assert np.all((0 <= batch["label"]) & (batch["label"] < 10))


def test_pretrain_input_fn_varying_image_sizes_fall_back_to_per_image():
    shapes = [(20, 24), (18, 16), (24, 20), (16, 22)]
    images = [
        np.random.default_rng(i).integers(0, 256, (*shape, 3), np.uint8)
        for i, shape in enumerate(shapes)
    ]

    def records(input_context, order_seed):
        return tf.data.Dataset.from_generator(
            lambda: ((image, np.int64(0)) for image in images),
            output_signature=(
                tf.TensorSpec([None, None, 3], tf.uint8),
                tf.TensorSpec([], tf.int64),
            ),
        )

    reader = source_lib.Reader(
        records=records,
        decode=lambda image, label: (image, label),
        count=lambda input_context: len(images),
    )
    source = source_lib.Source(
        "varying", "train", 4, 1, (None, None, 3), reader=reader
    )
    # Batching before cropping would fail on these shapes.
    batch = pretrain_batches(source, 1, global_batch_size=4)[0]
    assert batch["view1"].shape == (4, SIZE, SIZE, 3)


def test_seed_streams_follow_the_documented_formula():
    streams = {
        order._AUGMENT_SALT: order.element_seeds,
        order._BATCH_SALT: order.batch_seeds,
    }
    bases = set()
    for salt, stream in streams.items():
        # Element / batch k of host 2: [derived seed, start + k].
        base = order.derived_seed(7, salt, 2)
        seeds = np.array(_seeds(stream(7, 2, start=5), 3))
        assert seeds.dtype == np.int32
        np.testing.assert_array_equal(seeds, [[base, 5], [base, 6], [base, 7]])
        # The index wraps modulo 2^31 (non-negative int32).
        wrapped = np.array(_seeds(stream(7, 2, start=2**31 - 2), 3))
        np.testing.assert_array_equal(wrapped[:, 1], [2**31 - 2, 2**31 - 1, 0])
        bases.add(base)
        # Unseeded: random int32 [2] seeds, different every run.
        first, again = (_seeds(stream(None, 0), 4) for _ in range(2))
        assert first[0].shape == (2,) and first[0].dtype == np.int32
        assert not np.array_equal(first, again)
    assert len(bases) == 2  # the two streams never share a seed


def test_pretrain_batched_views_are_simclr_augment_batch(seeded_batches):
    """Batch k is simclr_augment_batch of its images twice over (view1
    rows, then view2 rows) with batch seed k."""
    _, images = indexed_source()
    seeds = _seeds(order.batch_seeds(0, 0), len(seeded_batches))
    for batch, seed in zip(seeded_batches, seeds, strict=True):
        chosen = images[batch["label"]]
        expected = views.simclr_augment_batch(
            np.concatenate([chosen, chosen]),
            SIZE,
            color_jitter_strength=0.5,
            blur=True,
            seed=seed,
        )
        view1, view2 = np.split(expected.numpy(), 2)
        # The pipeline's is compiled with XLA: float rounding only
        # (test_augment's eager / XLA agreement).
        np.testing.assert_allclose(batch["view1"], view1, atol=1e-5)
        np.testing.assert_allclose(batch["view2"], view2, atol=1e-5)


def test_pretrain_per_image_views_use_element_then_batch_seeds(
    per_image_batches,
):
    """Example j's two crops are crop_and_flip of [image, image] with its
    element seed's crop seed; batch k's distort_views uses batch seed k's
    distort seed."""
    _, images = indexed_source()
    size = len(per_image_batches[0]["label"])
    element_seeds = _seeds(order.element_seeds(0, 0), 3 * size)
    batch_seeds = _seeds(order.batch_seeds(0, 0), 3)
    for index, batch in enumerate(per_image_batches):
        crops = np.stack(
            [
                views.crop_and_flip(
                    np.stack([images[label]] * 2),
                    SIZE,
                    views.stage_seeds(element_seeds[index * size + j])[0],
                )
                for j, label in enumerate(batch["label"])
            ]
        )  # [b, 2 views, S, S, C]
        expected = views.distort_views(
            (crops[:, 0], crops[:, 1]),
            views.stage_seeds(batch_seeds[index])[1],
            color_jitter_strength=0.5,
            blur=True,
        )
        for key, view in zip(("view1", "view2"), expected, strict=True):
            np.testing.assert_allclose(batch[key], view, atol=1e-5)


@pytest.mark.parametrize("batched", [True, False])
def test_pretrain_input_fn_on_device_views_complete_to_host_views(
    batched, seeded_batches, per_image_batches
):
    """augment_on_device stops after crop + flip; distort_views with the
    batch's distort_seed finishes it into the host pipeline's views."""
    host_batches = seeded_batches if batched else per_image_batches
    device_batches = pretrain_batches(
        indexed_source()[0],
        2,
        blur=True,
        augment_on_device=True,
        batched_augment=batched,
    )
    for host, device in zip(host_batches, device_batches, strict=False):
        assert "distort_seed" not in host
        assert device["distort_seed"].shape == (2,)
        distorted = views.distort_views(
            (device["view1"], device["view2"]),
            device["distort_seed"],
            color_jitter_strength=0.5,
            blur=True,
        )
        for key, view in zip(("view1", "view2"), distorted, strict=True):
            # Crops alone are not the views (colour jitter changes them)...
            assert np.abs(device[key] - host[key]).max() > 0.05
            # ...distorted with their seed they are, up to float rounding
            # (eager here, XLA in the pipeline).
            np.testing.assert_allclose(view, host[key], atol=1e-5)


def test_finetune_batched_views_are_crop_and_flip_with_batch_seeds():
    source, images = indexed_source()
    input_fn = pipeline.finetune_input_fn(
        source, global_batch_size=5, image_size=SIZE, seed=0
    )
    keras.utils.set_random_seed(0)
    batches = input_fn(tf.distribute.InputContext()).take(2)
    seeds = _seeds(order.batch_seeds(0, 0), 2)
    for batch, seed in zip(batches.as_numpy_iterator(), seeds, strict=True):
        expected = views.simclr_augment_batch(
            images[batch["label"]],
            SIZE,
            color_jitter_strength=0.0,
            blur=False,
            seed=seed,
            color_distort=False,
        )
        np.testing.assert_allclose(batch["image"], expected, atol=1e-5)


def _assert_whole_image_or_mirror(crops, labels, images) -> None:
    for view, label in zip(crops, labels, strict=True):
        image = images[label]
        error = min(
            np.abs(view - image).max(), np.abs(view - image[:, ::-1]).max()
        )
        assert error < 1e-5


@pytest.mark.parametrize("batched", [True, False])
def test_crop_min_area_reaches_both_pipelines_through_the_config(batched):
    # --crop_min_area=1 leaves no crop but the image itself: every crop +
    # flip view (pretraining before distortion, fine-tuning) is the image
    # or its mirror. The paper's 0.08 gives other views.
    source, images = indexed_source(6, channels=1)
    images = images.astype(np.float32) / 255.0
    for min_area, whole in ((1.0, True), (0.08, False)):
        config = config_lib.from_dict(
            {
                "image_size": SIZE,
                "train_batch_size": 6,
                "seed": 0,
                "crop_min_area": min_area,
            }
        )
        if batched:
            pretrain = run_data.pretrain_input_fn(
                config_lib.replace(config, augment_on_device=True), source
            )
            finetune = run_data.finetune_input_fn(config, source)
        else:
            options = {
                "global_batch_size": 6,
                "image_size": SIZE,
                "seed": 0,
                "batched_augment": False,
                "crop_min_area": min_area,
            }
            pretrain = pipeline.pretrain_input_fn(
                source,
                color_jitter_strength=0.5,
                blur=False,
                augment_on_device=True,
                **options,
            )
            finetune = pipeline.finetune_input_fn(source, **options)
        context = tf.distribute.InputContext()
        batch = next(iter(pretrain(context)))
        tuned = next(iter(finetune(context)))
        pairs = [
            (batch["view1"], batch["label"]),
            (batch["view2"], batch["label"]),
            (tuned["image"], tuned["label"]),
        ]
        for view, label in pairs:
            if whole:
                _assert_whole_image_or_mirror(
                    view.numpy(), label.numpy(), images
                )
            else:
                with pytest.raises(AssertionError):
                    _assert_whole_image_or_mirror(
                        view.numpy(), label.numpy(), images
                    )


def test_eval_steps_caps_only_the_eval_split_at_that_many_batches():
    """GR's --eval_steps: batches of --eval_batch_size evaluated; the train
    split's features (linear protocol, kNN bank) are not cut."""
    config = config_lib.from_dict(
        {
            "dataset": "synthetic",
            "image_size": SIZE,
            "eval_batch_size": 16,
            "eval_steps": 2,
        }
    )
    source = registry.open_source("synthetic", "test")  # 256 images
    capped = list(run_data.eval_input(config, source, eval_split=True))
    whole = list(run_data.eval_input(config, source))
    assert [len(batch["label"]) for batch in capped] == [16, 16]
    assert sum(len(batch["label"]) for batch in whole) == 256
    for got, want in zip(capped, whole[:2], strict=True):
        np.testing.assert_array_equal(got["image"], want["image"])
