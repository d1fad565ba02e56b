"""simclr_tf: SimCLR (v1 and v2) in TensorFlow 2 and Keras 3."""

import re

import setuptools

with open("simclr_tf/__init__.py") as init:
    VERSION = re.search(r'__version__ = "([^"]+)"', init.read()).group(1)

setuptools.setup(
    name="simclr_tf",
    version=VERSION,
    description="SimCLR v1/v2 for TensorFlow 2 and Keras 3: exact to the "
    "paper, any replica count, SavedModel export.",
    packages=setuptools.find_packages(include=["simclr_tf", "simclr_tf.*"]),
    python_requires=">=3.10",
    # TensorFlow itself is an extra: its CPU, GPU and TPU builds are three
    # distributions (tensorflow-cpu, tensorflow, tensorflow-tpu) that all
    # provide the `tensorflow` module, and a requirement on one name would
    # pull that wheel beside another build already installed.
    install_requires=[
        # Keras 3.10 is the oldest that TensorFlow 2.20 accepts (2.21 asks
        # for 3.12); .ci/compat tests 3.10, `make test` tests 3.15.
        "keras>=3.10,<4",
        "tensorflow-datasets>=4.9.10",
        # tfds 4.9.10 imports importlib_resources without depending on it.
        "importlib_resources",
        "absl-py>=2.1",
        "numpy>=1.26",
        "tensorboard>=2.20,<2.22",
        # --mode=preview's caption text (and PNG reports).
        "pillow>=10",
        # t-SNE map of the evaluation reports.
        "scikit-learn>=1.4",
    ],
    extras_require={
        # One of these: `pip install -e '.[cpu]'`.
        "cpu": ["tensorflow-cpu>=2.20,<2.22"],
        "gpu": ["tensorflow[and-cuda]>=2.20,<2.22"],
        # The newest TPU build is 2.20; it brings libtpu from PyPI.
        "tpu": ["tensorflow-tpu>=2.20,<2.21"],
        "test": ["pytest>=8", "pytest-xdist>=3.8", "ruff"],
    },
    entry_points={"console_scripts": ["simclr_tf=simclr_tf.cli:run_main"]},
)
