"""conv2d with a custom gradient for CPUs, and the Keras layer that uses it.

On one AVX2 machine TensorFlow's oneDNN Conv2DBackpropInput ran at 36% of
the matmul rate while the forward conv ran at 93%. `conv2d` computes the
forward pass with tf.nn.conv2d and, on CPUs, each gradient by the
formulation of models/conv_gradients.py that METHODS picks for the conv's
kernel size and stride (TensorFlow's own kernel where none measured
faster). On GPUs and TPUs and under XLA, cuDNN and XLA have their own
gradient kernels and `conv2d` is plain tf.nn.conv2d (`gradient_path`).

The custom gradient is recorded on the gradient tape only, as tf.function
records its own calls: the forward conv under record.stop_recording, then
record.record_operation with the backward function (TensorFlow's private
tensorflow.python.eager.record; tf.custom_gradient would also register
each traced call's gradient in a global registry that keeps every traced
graph alive, benchmarks/RESULTS.md). So a tf.GradientTape in the same
graph (simclr_tf's steps, training/train_step.py) or eagerly gets the
custom gradient; a symbolic gradient of the graph (tf.gradients, a tape
around a whole tf.function, or a tf.cond/tf.while_loop between the tape
and the conv) gets TensorFlow's own Conv2D gradient kernels: the same
maths, slower on some CPUs and, in half precision on Eigen, less exact.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import keras
import tensorflow as tf

# Private: the tape's recording primitives (module docstring).
from tensorflow.python.eager import record

from simclr_tf import hardware
from simclr_tf.models import conv_gradients

Path = Literal["custom", "tensorflow"]
# (input gradient, filter gradient) method per (kernel side, stride); others
# by stride alone (DEFAULT_METHODS). Measured with benchmarks/
# conv_gradients.py (benchmarks/RESULTS.md): a stride-1 input gradient as
# a forward conv ran as fast as Conv2DBackpropInput on an AVX-512 and an
# AVX2-capped Intel CPU (oneDNN runs that very forward kernel there), and it
# is the forward conv that ran at 93% of the matmul on the AVX2 machine
# where Conv2DBackpropInput ran at 36%. Every other formulation was slower
# than TensorFlow's kernel on the Intel CPU, so the filter gradient and
# strided input gradients stay TensorFlow's.
METHODS: dict[tuple[int, int], tuple[str, str]] = {}
DEFAULT_METHODS = {
    1: ("conv", "tensorflow"),
    2: ("tensorflow", "tensorflow"),
}
_TENSORFLOW_METHODS = ("tensorflow", "tensorflow")
# float16 on a CPU (a GPU recipe tried on a laptop, the float16 tests):
# TensorFlow's float16 Conv2DBackpropFilter has no oneDNN kernel and ran
# at 0.3% of the forward conv's rate on the demo model's shapes; where
# TensorFlow gives no float16 op to oneDNN (CPUs without AVX512-FP16),
# both its gradient kernels ran at ~10%. bfloat16 where TensorFlow runs it
# on Eigen (hardware.tensorflow_bf16_on_onednn: Zen 3, Skylake-SP, AVX2
# laptops, TF_ENABLE_ONEDNN_OPTS=0): both gradient kernels ran at 3%, and
# Conv2DBackpropFilter sums in bfloat16 (2^-4.7 of the largest entry off).
# In these "half" cases a square conv's filter gradient is one matmul for
# a 1x1 kernel ("patches") and one forward conv otherwise ("swapped"), and
# a strided input gradient is forward convs over the stride's phases
# ("phases"), within one rounding of the float32 result. float16: filter
# gradients at 0.37-0.47 of the forward's rate, input gradients (with the
# stride-1 forward conv) at 0.90-0.93 on both kinds of CPU; bfloat16 on
# Eigen: 0.59 and 0.89, and the demo's mixed_bfloat16 step 26 -> 194
# img/s (benchmarks/RESULTS.md, "float16 on CPUs", "CPUs where TensorFlow
# runs Eigen, not oneDNN"; tests/test_conv.py).
HALF_FILTER_METHODS = {1: "patches"}
# oneDNN's AVX2 Conv2DBackpropFilter of 1x1 stride-2 convs with 1-5 input
# channels on even sides was wrong, by 5-138% of the largest entry and not
# repeatably, on a Zen 3 with oneDNN turned on (8 or more channels were
# right; benchmarks/RESULTS.md, "A real Zen 3"). Where oneDNN runs float32
# with AVX2 kernels, the filter gradient of a strided 1x1 conv with fewer
# input channels than this is one matmul ("patches"): such convs are tiny.
ONEDNN_AVX2_FILTER_MIN_CHANNELS = 8
HALF_DEFAULT_FILTER_METHOD = "swapped"
HALF_INPUT_METHOD = "phases"
PADDINGS = ("SAME", "VALID")
# Name scopes of the custom gradients' ops (benchmarks/op_profile.py).
INPUT_GRADIENT_SCOPE = "conv_input_gradient"
FILTER_GRADIENT_SCOPE = "conv_filter_gradient"


def gradient_path(device: str | None = None) -> Path:
    """Which gradient a conv2d traced here gets: "custom" or "tensorflow"
    (custom for a tape in the same graph; module docstring).

    "tensorflow" inside an XLA context (tf.function(jit_compile=True),
    TPUs) and for a GPU or TPU device; "custom" for a CPU device. With no
    device given, the current device scope decides, and with none set,
    TensorFlow's default placement (a GPU if one is visible, else the CPU).

    Args:
      device: a device string such as "/cpu:0" or
        "/job:worker/replica:0/task:0/device:GPU:1"; None reads the scope.

    Returns:
      "custom" or "tensorflow".
    """
    if tf.__internal__.get_enclosing_xla_context() is not None:
        return "tensorflow"
    if device is None:
        device = _scope_device()
    device_type = tf.DeviceSpec.from_string(device or "").device_type
    if device_type is None:
        visible = tf.config.list_logical_devices
        device_type = "GPU" if visible("GPU") else "CPU"
    return "custom" if device_type.upper() == "CPU" else "tensorflow"


def _scope_device() -> str:
    """The device an op created now is requested on ("" if unset)."""
    if tf.executing_eagerly():
        return tf.__internal__.eager_context.get_device_name() or ""
    return tf.no_op(name="device_probe").device


def methods_for(
    kernel_size: int,
    stride: int,
    dtype: tf.DType = tf.float32,
    in_channels: int | None = None,
) -> tuple[str, str]:
    """(input, filter) gradient methods for a square conv (see METHODS).

    Args:
      kernel_size: the kernel's height and width.
      stride: the stride along both axes.
      dtype: the conv's compute dtype; in float16, and in bfloat16 where
        TensorFlow runs it on Eigen, neither gradient is TensorFlow's
        kernel (HALF_INPUT_METHOD, HALF_FILTER_METHODS).
      in_channels: the conv's input channels, if known: a strided 1x1 conv
        with fewer than ONEDNN_AVX2_FILTER_MIN_CHANNELS gets "patches" for
        its filter gradient where oneDNN runs float32 with AVX2 kernels.

    Returns:
      (input method, filter method), names from conv_gradients.
    """
    methods = METHODS.get(
        (kernel_size, stride), DEFAULT_METHODS.get(stride, _TENSORFLOW_METHODS)
    )
    if methods[1] == "tensorflow" and tensorflow_filter_gradient_is_wrong(
        kernel_size, stride, in_channels
    ):
        methods = (methods[0], HALF_FILTER_METHODS[1])
    if not _half(tf.as_dtype(dtype)):
        return methods
    input_method, filter_method = methods
    if input_method == "tensorflow":
        input_method = HALF_INPUT_METHOD
    if filter_method == "tensorflow":
        filter_method = HALF_FILTER_METHODS.get(
            kernel_size, HALF_DEFAULT_FILTER_METHOD
        )
    return input_method, filter_method


def tensorflow_filter_gradient_is_wrong(
    kernel_size: int, stride: int, in_channels: int | None
) -> bool:
    """Whether TensorFlow's float32 Conv2DBackpropFilter of this square
    conv is oneDNN's AVX2 kernel where it was measured wrong: a strided 1x1
    conv with fewer than ONEDNN_AVX2_FILTER_MIN_CHANNELS input channels,
    where oneDNN runs float32 with AVX2 kernels. Unknown channels: False."""
    return (
        kernel_size == 1
        and stride > 1
        and in_channels is not None
        and in_channels < ONEDNN_AVX2_FILTER_MIN_CHANNELS
        and _float32_on_onednn_avx2()
    )


def _half(dtype: tf.DType) -> bool:
    """float16, or bfloat16 that TensorFlow runs on Eigen (see above)."""
    if dtype == tf.bfloat16:
        return not _bf16_on_onednn()
    return dtype == tf.float16


@functools.cache
def _bf16_on_onednn() -> bool:
    return hardware.tensorflow_bf16_on_onednn()


@functools.cache
def _float32_on_onednn_avx2() -> bool:
    return hardware.tensorflow_float32_on_onednn_avx2()


def conv2d(
    inputs: tf.Tensor,
    kernel: tf.Tensor,
    strides: int | Sequence[int] = 1,
    padding: str = "SAME",
    *,
    gradient: Literal["auto", "custom", "tensorflow"] = "auto",
    methods: tuple[str, str] | None = None,
) -> tf.Tensor:
    """tf.nn.conv2d (NHWC) whose gradients on CPUs come from METHODS.

    The forward pass is tf.nn.conv2d in every case; only the gradient
    differs, and it equals TensorFlow's up to float rounding. The custom
    gradient reaches a tf.GradientTape in the same graph or eagerly
    (module docstring).

    Args:
      inputs: [B, H, W, ci] float32, bfloat16 or float16; H, W and ci
        static for the custom gradient (B may be unknown).
      kernel: [kh, kw, ci, co] of the inputs' dtype.
      strides: an int or (stride_h, stride_w).
      padding: "SAME" or "VALID" (TensorFlow's arithmetic).
      gradient: "auto" (`gradient_path()`), "custom" or "tensorflow".
      methods: (input method, filter method) from
        conv_gradients.INPUT_METHODS / FILTER_METHODS; None = METHODS.

    Returns:
      [B, Ho, Wo, co] like tf.nn.conv2d.

    Raises:
      ValueError: a padding other than SAME/VALID, or gradient="custom"
        with unknown spatial sizes.
    """
    padding = padding.upper()
    if padding not in PADDINGS:
        raise ValueError(
            f"padding={padding!r} is not supported; use 'SAME' or 'VALID'."
        )
    stride_h, stride_w = (
        (strides, strides) if isinstance(strides, int) else strides
    )
    static = None not in inputs.shape[1:]
    if gradient == "auto":
        gradient = gradient_path() if static else "tensorflow"
    if gradient == "tensorflow":
        return tf.nn.conv2d(inputs, kernel, (stride_h, stride_w), padding)
    if not static:
        raise ValueError(
            f"gradient='custom' needs static H, W, C; got inputs of shape "
            f"{inputs.shape}; use gradient='auto' or give the model a fixed "
            "input_shape."
        )
    kh, kw = kernel.shape[:2]
    rows = conv_gradients.axis(inputs.shape[1], kh, stride_h, padding)
    cols = conv_gradients.axis(inputs.shape[2], kw, stride_w, padding)
    if methods is None:
        square = kh == kw and stride_h == stride_w
        methods = (
            methods_for(kh, stride_h, inputs.dtype, inputs.shape[-1])
            if square
            else _TENSORFLOW_METHODS
        )
    if tuple(methods) == _TENSORFLOW_METHODS:
        return tf.nn.conv2d(inputs, kernel, (stride_h, stride_w), padding)
    input_method, filter_method = methods
    if input_method == "conv" and stride_h != stride_w:
        input_method = "phases"  # depth_to_space needs one block size.

    # Read variables (and convert arrays) before recording stops: a read
    # under stop_recording is not recorded, so no gradient would reach the
    # variable.
    inputs = tf.convert_to_tensor(inputs)
    kernel = tf.convert_to_tensor(kernel)

    def gradients(dy):
        # Named scopes, so that profiles can tell these ops (forward convs
        # and matmuls among them) from the forward pass.
        with tf.name_scope(INPUT_GRADIENT_SCOPE):
            dx = conv_gradients.input_gradient(
                dy, kernel, rows, cols, input_method
            )
        with tf.name_scope(FILTER_GRADIENT_SCOPE):
            dw = conv_gradients.filter_gradient(
                inputs, dy, tuple(kernel.shape), rows, cols, filter_method
            )
        return [dx, dw]

    with record.stop_recording():
        outputs = tf.nn.conv2d(inputs, kernel, (stride_h, stride_w), padding)
    record.record_operation(
        "SimclrConv2D", [outputs], [inputs, kernel], gradients
    )
    return outputs


@keras.saving.register_keras_serializable(package="simclr_tf")
class Conv2D(keras.layers.Conv2D):
    """keras.layers.Conv2D whose gradients on CPUs come from `conv2d`.

    Same arguments, variables (names, shapes, initialisers), checkpoint
    keys and outputs as the Keras layer; only the backward pass differs,
    and only where `gradient_path` says "custom". Falls back to Keras's
    code for channels_first, dilation, groups or another backend.
    """

    def _supported(self) -> bool:
        return (
            keras.backend.backend() == "tensorflow"
            and self.data_format == "channels_last"
            and tuple(self.dilation_rate) == (1, 1)
            and self.groups == 1
        )

    def convolution_op(self, inputs, kernel):
        if not self._supported():
            return super().convolution_op(inputs, kernel)
        inputs = tf.convert_to_tensor(inputs)
        kernel = tf.cast(tf.convert_to_tensor(kernel), inputs.dtype)
        return conv2d(inputs, kernel, tuple(self.strides), self.padding)
