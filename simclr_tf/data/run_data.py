"""A run's data, opened from its Config: sources and input pipelines.

The bridge between flags and simclr_tf.data: which split, with which
augmentation settings; train.py, the monitors and the linear protocol all
open data through here.
"""

from __future__ import annotations

import tensorflow as tf

from simclr_tf.config import schema as config_lib
from simclr_tf.data import pipeline, subsets
from simclr_tf.data.sources import base as source_lib
from simclr_tf.data.sources import registry


def open_split(config: config_lib.Config, split: str) -> source_lib.Source:
    """One split of --dataset, opened with the run's data flags."""
    return registry.open_source(
        config.data.dataset,
        split,
        data_dir=config.data.data_dir,
        verify_images=config.data.verify_images,
    )


def open_train_source(config: config_lib.Config) -> source_lib.Source:
    """The --train_split of --dataset."""
    return open_split(config, config.data.train_split)


def pretrain_input_fn(
    config: config_lib.Config, source: source_lib.Source, start_step: int = 0
) -> pipeline.InputFn:
    """The two-view pretraining input_fn of `source` with the run's flags,
    positioned where a run is after `start_step` steps."""
    data = config.data
    return pipeline.pretrain_input_fn(
        source,
        global_batch_size=config.train.train_batch_size,
        image_size=data.image_size,
        color_jitter_strength=data.color_jitter_strength,
        blur=data.use_blur,
        brightness_impl=data.brightness_impl,
        seed=config.train.seed,
        cache=data.cache_dataset,
        augment_on_device=data.augment_on_device,
        crop_min_area=data.crop_min_area,
        start_step=start_step,
    )


def finetune_input_fn(
    config: config_lib.Config, source: source_lib.Source, start_step: int = 0
) -> pipeline.InputFn:
    """The labelled crop + flip input_fn of the supervised train modes,
    positioned where a run is after `start_step` steps."""
    return pipeline.finetune_input_fn(
        source,
        global_batch_size=config.train.train_batch_size,
        image_size=config.data.image_size,
        seed=config.train.seed,
        cache=config.data.cache_dataset,
        crop_min_area=config.data.crop_min_area,
        start_step=start_step,
    )


def labelled_train_source(
    config: config_lib.Config, source: source_lib.Source
) -> source_lib.Source:
    """`source`, cut to --label_fraction of its labels (class-balanced)."""
    fraction = config.data.label_fraction
    if fraction >= 1:
        return source
    return subsets.label_fraction_source(source, fraction, config.train.seed)


def eval_input(
    config: config_lib.Config,
    source: source_lib.Source,
    limit: int | None = None,
    *,
    eval_split: bool = False,
) -> tf.data.Dataset:
    """One ordered pass over `source` with eval preprocessing.

    Args:
      config: the run's Config (eval batch size, image size).
      source: the split.
      limit: at most this many examples when > 0; None: --max_eval_examples.
      eval_split: source is the --eval_split: --eval_steps > 0 (GR's flag)
        then also stops it after that many batches of --eval_batch_size.
    """
    data = pipeline.eval_dataset(
        source,
        batch_size=config.eval.eval_batch_size,
        image_size=config.data.image_size,
    )
    if limit is None:
        limit = config.eval.max_eval_examples
    if limit > 0:
        data = data.unbatch().take(limit).batch(config.eval.eval_batch_size)
    if eval_split and config.eval.eval_steps > 0:
        data = data.take(config.eval.eval_steps)
    return data


MAX_EXAMPLE_PATHS = 10


def skipped_files(source: source_lib.Source) -> dict[str, object]:
    """result.json entries for the files the source could not read.

    Returns:
      {} when nothing was skipped, else {"data/skipped_files": total,
      "data/skipped_by_reason": {reason: count}, "data/skipped_examples":
      {reason: up to 10 paths}}.
    """
    counts = source.skip_counts()
    if not counts:
        return {}
    return {
        "data/skipped_files": sum(counts.values()),
        "data/skipped_by_reason": counts,
        "data/skipped_examples": {
            reason: list(paths[:MAX_EXAMPLE_PATHS])
            for reason, paths in source.skipped.items()
        },
    }
