"""Reading a google-research/simclr (GR) model from disk: where it is, and
its variables by GR attribute path.

A GR SavedModel (the released gs://simclr-checkpoints-tf2/ models, or
run.py's exports) or a run.py checkpoint, read through tf.io.gfile: the
checkpoint's object graph names each variable by the attribute path of its
Keras 2 layers (e.g. resnet_model/block_groups/0/...), which is what
gr_architecture.py and gr_layout.py read. No GR code is needed.
"""

from __future__ import annotations

import collections
import dataclasses

import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from simclr_tf import file_io

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"

# Children of Keras 2 layers in a SavedModel that alias variables or hold
# functions; the GR attribute path of a variable never passes them.
_ALIASES = {
    "variables",
    "trainable_variables",
    "non_trainable_variables",
    "trainable_variables_list",
    "regularization_losses",
    "keras_api",
    "metrics",
    "layer_metrics",
    "layer_regularization_losses",
    "signatures",
    "__call__",
    "call_and_return_all_conditional_losses",
    "call_and_return_conditional_losses",
    "_jit_compiled_convolution_op",
}


@dataclasses.dataclass(frozen=True)
class Source:
    """A GR model on disk: the checkpoint read and its SavedModel, if any."""

    path: str
    prefix: str
    saved_model_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class SourceVariable:
    """One GR variable: its key in the checkpoint and its shape."""

    key: str
    shape: tuple[int, ...]


def resolve_source(path: str) -> Source:
    """Finds what to read at `path` (any tf.io.gfile path).

    Args:
      path: a SavedModel directory (saved_model.pb), a directory with
        checkpoints (its latest; else its newest saved_model/<N>), or a
        checkpoint prefix (<prefix>.index exists).

    Raises:
      FileNotFoundError: none of these is at path.
    """
    path = path.rstrip("/")
    if file_io.exists(file_io.join(path, "saved_model.pb")):
        return Source(path, file_io.join(path, "variables", "variables"), path)
    if file_io.exists(path + ".index"):
        return Source(path, path)
    if file_io.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest:
            return Source(path, latest)
        exports = file_io.join(path, "saved_model")
        steps = [
            name
            for name in (
                file_io.listdir(exports) if file_io.isdir(exports) else []
            )
            if name.isdigit()
        ]
        if steps:
            return resolve_source(file_io.join(exports, max(steps, key=int)))
    raise FileNotFoundError(
        f"--source={path}: no GR SavedModel (saved_model.pb), checkpoint "
        "directory or checkpoint prefix (.index) there; pass e.g. "
        "gs://simclr-checkpoints-tf2/simclrv2/pretrained/r50_1x_sk0/"
        "saved_model or a run.py model_dir."
    )


def _object_graph(
    reader: tf.train.CheckpointReader, source: Source
) -> trackable_object_graph_pb2.TrackableObjectGraph:
    if not reader.has_tensor(OBJECT_GRAPH_KEY):
        raise ValueError(
            f"{source.prefix} is a name-based (TF1) checkpoint, not a TF2 "
            "one; use GR's TF2 SavedModels (gs://simclr-checkpoints-tf2/)."
        )
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(OBJECT_GRAPH_KEY))
    return graph


def read_variables(
    source: Source,
) -> tuple[tf.train.CheckpointReader, dict[str, SourceVariable]]:
    """The GR model's variables by attribute path (e.g. resnet_model/...).

    The model is the root's child "model" (run.py's checkpoint and its
    SavedModel module both name it so). Paths skip Keras 2's aliases.

    Raises:
      ValueError: not a TF2 checkpoint, or no "model" in it.
    """
    # Not tf.train.load_checkpoint: on ram:// it takes the prefix for a
    # directory (it is the prefix of existing file names) and fails.
    reader = tf.compat.v1.train.NewCheckpointReader(source.prefix)
    graph = _object_graph(reader, source)
    children = {c.local_name: c.node_id for c in graph.nodes[0].children}
    if "model" not in children:
        raise ValueError(
            f"{source.prefix} holds no GR model: its root has "
            f"{sorted(children)}, run.py's checkpoints and SavedModels have "
            "'model'."
        )
    shapes = reader.get_variable_to_shape_map()
    found: dict[str, SourceVariable] = {}
    seen = {children["model"]}
    queue = collections.deque([(children["model"], "")])
    while queue:
        node_id, path = queue.popleft()
        node = graph.nodes[node_id]
        for attribute in node.attributes:
            if attribute.name == "VARIABLE_VALUE":
                key = attribute.checkpoint_key
                found[path.rstrip("/")] = SourceVariable(
                    key, tuple(shapes[key])
                )
        for child in node.children:
            name = child.local_name
            if name in _ALIASES or name.startswith("trace_"):
                continue
            if child.node_id not in seen:
                seen.add(child.node_id)
                queue.append((child.node_id, f"{path}{name}/"))
    return reader, found


def is_gr_model(path: str) -> bool:
    """Whether `path` holds a GR model (a TF2 checkpoint or SavedModel whose
    "model" has GR's "resnet_model"), not e.g. a simclr_tf run; False when
    nothing readable is there.
    """
    try:
        source = resolve_source(path)
        reader = tf.compat.v1.train.NewCheckpointReader(source.prefix)
        graph = _object_graph(reader, source)
    except (FileNotFoundError, ValueError, tf.errors.OpError):
        return False
    children = {c.local_name: c.node_id for c in graph.nodes[0].children}
    if "model" not in children:
        return False
    model = graph.nodes[children["model"]]
    return any(c.local_name == "resnet_model" for c in model.children)
