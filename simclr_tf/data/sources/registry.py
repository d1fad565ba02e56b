"""open_source: one split of a dataset, by name.

The registry sits above the concrete sources (fashion_mnist, synthetic,
tfds, folder, tfrecord), which build on base.py; nothing imports it back.
"""

from __future__ import annotations

from simclr_tf.data.sources import (
    base,
    fashion_mnist,
    folder,
    synthetic,
    tfds,
    tfrecord,
)


def open_source(
    dataset: str,
    split: str,
    *,
    data_dir: str | None = None,
    verify_images: bool = True,
) -> base.Source:
    """Opens one split of a dataset by name.

    "folder" reads a directory of images (folder.py: class sub-folders or a
    flat unlabelled folder, split sub-folders); "tfrecord" reads shards
    written by `python -m simclr_tf.tools.make_tfrecords` (tfrecord.py).

    Names: "fashion_mnist" (IDX files from data_dir, else
    /usr/share/datasets/fashion-mnist, else tfds; splits train/test),
    "synthetic" (512 train / 256 test images of 32x32x3) and "synthetic_gray"
    (the same counts at 28x28x1), both with 10 classes, see `synthetic`; any
    other name is a tfds builder with "image" and "label" features, prepared
    with download_and_prepare if data_dir does not hold it yet. A tfds
    dataset's classes, image shape, split names and sizes come from its
    builder info.

    Args:
      dataset: the name, as --dataset.
      split: the split, as --train_split / --eval_split: a name, "auto" (the
        first of "validation", "test" the dataset has), or for tfds a slice
        such as "train[:10%]", "train[10%:]" or "test[:500]"
        (num_examples is then the slice's size).
      data_dir: the folder or shard directory for folder / tfrecord, the
        IDX directory for fashion_mnist, the tfds data_dir otherwise.
      verify_images: folder only: decode every image once when opening, so
        that unreadable files are counted exactly (Source.skipped).

    Returns:
      The Source, with the resolved split name.

    Raises:
      ValueError: an unknown dataset (with close names), a split it does not
        have or an empty slice (with its splits), a dataset without
        image/label features, or a tfds dataset that is not prepared and
        cannot be: it needs a manual download, or the download failed.
    """
    if dataset == "folder":
        return folder.open_folder(data_dir, split, verify=verify_images)
    if dataset == "tfrecord":
        return tfrecord.open_tfrecord(data_dir, split)
    if dataset == "fashion_mnist":
        return fashion_mnist.open_fashion_mnist(split, data_dir)
    if dataset in synthetic.DATASETS:
        return synthetic.open_synthetic(dataset, split)
    return tfds.open_tfds(dataset, split, data_dir)
