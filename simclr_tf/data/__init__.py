"""Data: sources, augmentations and the tf.data input pipelines."""
