"""Dataset sources: base (the Source type) below the concrete sources
(fashion_mnist, synthetic, tfds, folder, tfrecord), registry above them.
"""
