"""simclr_tf: SimCLR (v1 and v2) in TensorFlow 2 and Keras 3.

TensorFlow is an extra of the package (setup.py: [cpu], [gpu] or [tpu]), so
importing simclr_tf first checks that some build of 2.20 or newer is there.
On an AVX2 CPU where TensorFlow would leave its oneDNN kernels off, it
turns them on before TensorFlow loads (hardware.onednn_switch).
"""

import os as _os
import sys as _sys

from simclr_tf import hardware as _hardware

__version__ = "0.1.0"
OLDEST_TENSORFLOW = (2, 20)

# oneDNN's CPU kernels where TensorFlow would run Eigen's on an AVX2 CPU
# (hardware.onednn_switch). TensorFlow reads the variable when it loads:
# imported before simclr_tf, it keeps its own choice.
if "tensorflow" not in _sys.modules and (_switch := _hardware.onednn_switch()):
    _os.environ["TF_ENABLE_ONEDNN_OPTS"] = _switch

try:
    import tensorflow as _tensorflow
except ModuleNotFoundError as error:
    raise ImportError(
        "simclr_tf needs TensorFlow 2.20 or 2.21 and none is installed: "
        "pip install 'simclr_tf[cpu]' (or [gpu], or [tpu] on a TPU VM)."
    ) from error
if tuple(map(int, _tensorflow.__version__.split(".")[:2])) < OLDEST_TENSORFLOW:
    raise ImportError(
        f"simclr_tf needs TensorFlow 2.20 or 2.21, found "
        f"{_tensorflow.__version__}: pip install 'simclr_tf[cpu]' (or [gpu], "
        "or [tpu]) to upgrade it."
    )
