"""simclr_tf: SimCLR (v1 and v2) in TensorFlow 2 and Keras 3."""

__version__ = "0.1.0"
