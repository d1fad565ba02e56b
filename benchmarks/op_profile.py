"""The analysis behind profile_step.py: a TensorFlow profile (.xplane.pb)
of train steps, summed by op category. Kept apart from the script so that
tests can import it without the script's absl flags.
"""

from __future__ import annotations

import collections
import re

# The optimizer's name scope in simclr_tf's step (optim.build_optimizer).
OPTIMIZER_SCOPE = "LARS"
# Op types (as executed, oneDNN variants included) -> category. Checked in
# this order; the first substring found wins.
_TYPE_CATEGORIES = (
    ("Conv2DBackpropFilter", "conv_filter_gradient"),
    ("Conv2DBackpropInput", "conv_input_gradient"),
    ("Conv2D", "conv_forward"),
    ("FusedBatchNormGrad", "batch_norm_backward"),
    ("FusedBatchNorm", "batch_norm_forward"),
    ("MatMul", "dense"),
    ("Cast", "cast"),
)
CATEGORIES = (
    *(category for _, category in _TYPE_CATEGORIES),
    "optimizer",
    "elementwise_and_other",
)


# Name scopes of simclr_tf.models.conv's custom gradients (forward convs
# and matmuls inside them are gradient work), numbered by TensorFlow from
# the second conv on ("conv_input_gradient_1/...").
_GRADIENT_SCOPES = (
    (re.compile(r"(^|/)conv_input_gradient(_\d+)?/"), "conv_input_gradient"),
    (re.compile(r"(^|/)conv_filter_gradient(_\d+)?/"), "conv_filter_gradient"),
)


def categorize(op_name: str, op_type: str) -> str:
    """The category of one executed op (its name scope, then its type)."""
    if f"/{OPTIMIZER_SCOPE}/" in f"/{op_name}":
        return "optimizer"
    for pattern, category in _GRADIENT_SCOPES:
        if pattern.search(op_name):
            return category
    for marker, category in _TYPE_CATEGORIES:
        if marker in op_type:
            return category
    return "elementwise_and_other"


def _union_seconds(intervals: list[tuple[int, int]]) -> float:
    """Length of the union of [start, end) picosecond intervals, in s."""
    covered, end_so_far = 0, None
    for start, end in sorted(intervals):
        if end_so_far is None or start > end_so_far:
            covered += end - start
            end_so_far = end
        elif end > end_so_far:
            covered += end - end_so_far
            end_so_far = end
    return covered / 1e12


def op_breakdown(xspace_path: str) -> dict[str, object]:
    """Sums the host ops of a profile (an .xplane.pb) by category.

    Only the executor's compute threads (lines "tf_Compute...") are read:
    each op event there lasts from the op's start to its end, including
    the intra-op threads it waits for, so concurrent ops can sum to more
    than the wall time; `busy_seconds` is the union of their intervals.

    Returns:
      {"op_seconds": {category: s}, "op_fraction": {category: share of
      the summed op time}, "top_ops": [[type, s, count], ...] (10 largest),
      "busy_seconds": s}.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(xspace_path, "rb") as file:
        space.ParseFromString(file.read())
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    by_type = collections.Counter()
    counts = collections.Counter()
    intervals = []
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                metadata = plane.event_metadata[event.metadata_id]
                if not metadata.display_name:  # Executor bookkeeping.
                    continue
                op_name = metadata.name.split(":")[0]
                op_type = metadata.display_name
                duration = event.duration_ps / 1e12
                seconds[categorize(op_name, op_type)] += duration
                by_type[op_type] += duration
                counts[op_type] += 1
                start = line.timestamp_ns * 1000 + event.offset_ps
                intervals.append((start, start + event.duration_ps))
    total = sum(seconds.values())
    if total <= 0:
        raise ValueError(f"{xspace_path} holds no TensorFlow op events.")
    return {
        "op_seconds": seconds,
        "op_fraction": {name: s / total for name, s in seconds.items()},
        "top_ops": [
            [name, s, counts[name]] for name, s in by_type.most_common(10)
        ],
        "busy_seconds": _union_seconds(intervals),
    }


def conv_rates(
    op_seconds: dict[str, float], forward_flops: float, peak: float
) -> dict[str, dict[str, float]]:
    """FLOP/s of each convolution category, and its fraction of `peak`.

    Each of forward, input gradient and filter gradient does about the
    forward's multiply-adds (the first layer's input gradient is not
    computed, so that rate is a slight overestimate). With concurrent ops
    (--inter_op_threads=0) the rates are those of ops sharing the cores.
    """
    rates = {
        category: forward_flops / op_seconds[category]
        for category in CATEGORIES[:3]
        if op_seconds[category] > 0
    }
    return {
        name: {"flops_per_second": rate, "fraction_of_matmul_peak": rate / peak}
        for name, rate in rates.items()
    }
