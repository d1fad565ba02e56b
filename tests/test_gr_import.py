"""GR checkpoints in simclr_tf: models/gr_layout.py, models/gr_import.py and
tools/import_checkpoint.py, checked against google-research/simclr's own code.

GR's code (tests/gr_reference.py, a subprocess with Keras 2) builds a model
with random BN and bias values, saves it as run.py does (SavedModel and
tf.train.Checkpoint) and records its outputs on synthetic images in
inference mode. The import must give GR's outputs and hold GR's variables.

Tolerances, as max |ours - GR| / max(1, max |GR|):
- TOLERANCE = 1e-5 for the encoder's outputs, and for logits_sup on the
  encoder's features: both sides run the same float32 convs, but GR's BN
  is composite ops and ours the fused kernel and graph fusions differ, so
  each layer rounds differently by about a float32 ulp (6e-8); over the
  50 layers of a ResNet-50 that adds up to a few 1e-6 (measured <= 3e-6).
  The reference's residual branches end in small BN gammas, as trained
  ResNets' do (gr_reference._randomize says why).
- TOLERANCE also for the heads fed GR's own proj_head_input.
- HEAD_TOLERANCE = 1e-4 for proj_head_output end to end (and for logits_sup
  read from a head layer): each head BN subtracts a batch mean that is
  most of its input (the features vary across these images less than
  their mean), which amplifies the features' rounding about tenfold. GR's
  own float32 output is as far from a float64 evaluation of the same
  weights (measured 2.7e-5 on ResNet-50) as ours.
A wrong or swapped variable changes outputs by O(0.1), far above both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import gr_reference
import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.config import schema as config_lib
from simclr_tf.data.sources import synthetic
from simclr_tf.models import gr_architecture, gr_checkpoint, gr_import, simclr
from simclr_tf.tools import import_checkpoint
from simclr_tf.training import modes, train_state

TOLERANCE = 1e-5
HEAD_TOLERANCE = 1e-4
ENCODER_OUTPUTS = (
    "initial_conv",
    "initial_max_pool",
    "block_group1",
    "block_group2",
    "block_group3",
    "block_group4",
    "final_avg_pool",
)
NUM_IMAGES = 8
NUM_CLASSES = 10
# name: (GR flags, GR training steps, slow). One case trains a LARS step,
# so that its checkpoint holds optimizer slots as run.py's do; the others
# skip it (tracing the step costs 15-70 s).
CASES = {
    "r18_cifar": ({"resnet_depth": 18, "image_size": 32}, 0, False),
    "r50_1x": ({"resnet_depth": 50, "image_size": 64}, 0, True),
    "r50_1x_sk": (
        {"resnet_depth": 50, "image_size": 64, "sk_ratio": 0.0625},
        0,
        True,
    ),
    "r50_2x": (
        {"resnet_depth": 50, "image_size": 64, "width_multiplier": 2},
        0,
        True,
    ),
    # Basic blocks with the ResNet-D stem and shortcuts and SE; a 2-layer
    # head whose middle layer feeds the supervised head.
    "r18_sk_se_selector1": (
        {
            "resnet_depth": 18,
            "image_size": 64,
            "sk_ratio": 0.0625,
            "se_ratio": 0.25,
            "num_proj_layers": 2,
            "proj_out_dim": 64,
            "ft_proj_selector": 1,
        },
        1,
        True,
    ),
}
# Largest differences seen, printed at the end of the module (pytest -s).
FOUND: dict[str, dict[str, float]] = {}


def _images(size: int) -> np.ndarray:
    """Synthetic shapes in [0, 1]: varied content, deterministic."""
    source = synthetic.synthetic(NUM_IMAGES, image_size=size, seed=1)
    images = np.stack(
        [image for image, _ in source.dataset().as_numpy_iterator()]
    )
    return images.astype(np.float32) / 255.0


def _case_params(names):
    return [
        pytest.param(name, marks=[pytest.mark.slow] if CASES[name][2] else [])
        for name in names
    ]


_REFERENCES: dict[str, gr_reference.Reference] = {}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """GR runs by case name, each built once per module."""
    gr_reference.require()

    def get(name: str) -> gr_reference.Reference:
        if name not in _REFERENCES:
            flags, steps, _ = CASES[name]
            work_dir = tmp_path_factory.mktemp(name)
            images = _images(flags["image_size"])
            start = time.perf_counter()
            _REFERENCES[name] = gr_reference.build_reference(
                str(work_dir),
                images,
                num_classes=NUM_CLASSES,
                train_steps=steps,
                **flags,
            )
            FOUND.setdefault(name, {})["gr_run_seconds"] = (
                time.perf_counter() - start
            )
        return _REFERENCES[name]

    yield get
    for name, values in FOUND.items():
        print(f"\n{name}: " + json.dumps(values, indent=1, sort_keys=True))


def _relative(ours, reference) -> float:
    """max |ours - reference| / max(1, max |reference|)."""
    reference = np.asarray(reference)
    difference = np.max(np.abs(np.asarray(ours) - reference))
    return float(difference / max(1.0, float(np.max(np.abs(reference)))))


def _compare(name, key, ours, reference, tolerance) -> None:
    """Asserts the relative difference; records it and the absolute one."""
    difference = _relative(ours, reference)
    _record(name, f"{key} relative", difference)
    _record(
        name,
        f"{key} absolute",
        float(np.max(np.abs(np.asarray(ours) - reference))),
    )
    assert difference <= tolerance, (key, difference)


def _source(reference: gr_reference.Reference, form: str) -> str:
    if form == "saved_model":
        return reference.saved_model_dir
    return reference.model_dir  # run.py's model_dir: its latest ckpt-N


def _record(name: str, key: str, value: float) -> None:
    values = FOUND.setdefault(name, {})
    values[key] = max(values.get(key, 0.0), value)


@pytest.mark.parametrize("form", ["saved_model", "checkpoint"])
@pytest.mark.parametrize("name", _case_params(CASES))
def test_import_gives_gr_outputs(references, name, form):
    reference = references(name)
    imported = gr_import.import_model(_source(reference, form))
    images = _images(CASES[name][0]["image_size"])
    ours = imported.model.endpoints(tf.constant(images), training=False)
    for output in ENCODER_OUTPUTS:
        _compare(
            name,
            f"{form}/{output}",
            ours[output],
            reference.outputs[output],
            TOLERANCE,
        )
    hiddens = imported.model.projection_head(
        tf.constant(reference.outputs["proj_head_input"]), training=False
    )
    selector = CASES[name][0].get("ft_proj_selector", 0)
    assert imported.ft_proj_selector == selector
    head_outputs = {
        "proj_head_output": hiddens[-1],
        "logits_sup": imported.model.supervised_head(hiddens[selector]),
    }
    for output, value in head_outputs.items():
        _compare(
            name,
            f"{form}/{output} (GR's features in)",
            value,
            reference.outputs[output],
            TOLERANCE,
        )
    end_to_end = {"proj_head_output": HEAD_TOLERANCE}
    end_to_end["logits_sup"] = HEAD_TOLERANCE if selector else TOLERANCE
    for output, tolerance in end_to_end.items():
        _compare(
            name,
            f"{form}/{output}",
            ours[output],
            reference.outputs[output],
            tolerance,
        )


def _match_variables(model_variables, gr_variables) -> float:
    """Pairs every GR variable with an equal-valued one of ours, 1 to 1.

    Independent of the import's own mapping: values are random, so an
    exact value match identifies the variable. Returns the largest |ours -
    GR| over the pairs (0 for exact copies).
    """
    ours = {v.path: np.asarray(v) for v in model_variables}
    assert len(ours) == len(gr_variables)
    largest = 0.0
    for gr_name, gr_value in gr_variables.items():
        matches = [
            path
            for path, value in ours.items()
            if value.shape == gr_value.shape and np.array_equal(value, gr_value)
        ]
        assert len(matches) == 1, (gr_name, matches)
        largest = max(
            largest, float(np.max(np.abs(ours.pop(matches[0]) - gr_value)))
        )
    return largest


@pytest.mark.parametrize("name", _case_params(CASES))
def test_cli_model_dir_restores_every_gr_variable(references, tmp_path, name):
    """tools/import_checkpoint's model_dir, restored as loop.py does."""
    reference = references(name)
    model_dir = str(tmp_path / "imported")
    summary = import_checkpoint.import_checkpoint(
        reference.model_dir, model_dir
    )
    with open(os.path.join(model_dir, "config.json")) as file:
        saved = json.load(file)
    config = config_lib.replace(
        config_lib.from_nested_dict(saved),
        model_dir=model_dir,
        strategy="default",
        precision="float32",
        train_batch_size=NUM_IMAGES,
    )
    size = CASES[name][0]["image_size"]
    source = synthetic.synthetic(
        NUM_IMAGES, image_size=size, num_classes=NUM_CLASSES, seed=1
    )
    state = train_state.restore_for_eval(config, source)["state"]
    largest = _match_variables(state.model.variables, reference.variables)
    _record(name, "variables (restored model_dir)", largest)
    assert largest == 0.0
    assert summary["variables"] == len(reference.variables)
    flags = CASES[name][0]
    assert saved["model"]["resnet_depth"] == flags["resnet_depth"]
    assert saved["model"]["cifar_stem"] == (flags["image_size"] <= 32)
    assert saved["model"]["width_multiplier"] == flags.get(
        "width_multiplier", 1
    )
    assert (saved["model"]["sk_ratio"] > 0) == (flags.get("sk_ratio", 0) > 0)
    assert saved["model"]["se_ratio"] == flags.get("se_ratio", 0)
    images = _images(size)
    outputs = state.model.endpoints(tf.constant(images), training=False)
    difference = _relative(
        outputs["block_group4"], reference.outputs["block_group4"]
    )
    assert difference <= TOLERANCE


def test_imported_model_dir_initialises_finetuning(references, tmp_path):
    """--checkpoint=<imported model_dir> loads as a simclr_tf pretraining."""
    reference = references("r18_cifar")
    model_dir = str(tmp_path / "imported")
    import_checkpoint.import_checkpoint(reference.saved_model_dir, model_dir)
    model = simclr.SimCLRModel(
        resnet_depth=18,
        cifar_stem=True,
        num_proj_layers=3,
        num_classes=5,
        train_mode="finetune",
    )
    model(tf.zeros((1, 32, 32, 3)))
    modes.initialize_from(model, model_dir)
    outputs = model.endpoints(tf.constant(_images(32)), training=False)
    for output in ("block_group4", "proj_head_output"):
        assert (
            _relative(outputs[output], reference.outputs[output])
            <= HEAD_TOLERANCE
        )


@pytest.mark.slow
def test_ambiguous_selector_without_flags_json(references, tmp_path, caplog):
    """Widths allow hiddens 0 and 1; no SavedModel, no flags.json: GR's
    default 0 with a warning, or the --ft_proj_selector given."""
    reference = references("r18_sk_se_selector1")
    prefix = reference.checkpoint_prefix
    for path in tf.io.gfile.glob(prefix + ".*"):
        tf.io.gfile.copy(path, str(tmp_path / os.path.basename(path)))
    copied = str(tmp_path / os.path.basename(prefix))
    with caplog.at_level("WARNING"):
        guessed = gr_import.import_model(copied)
    assert guessed.ft_proj_selector == 0
    assert "Pass --ft_proj_selector" in caplog.text
    given = gr_import.import_model(copied, ft_proj_selector=1)
    ours = given.model(tf.constant(_images(64)), training=False)
    _compare(
        "r18_sk_se_selector1",
        "checkpoint/logits_sup (--ft_proj_selector=1)",
        ours["logits_sup"],
        reference.outputs["logits_sup"],
        HEAD_TOLERANCE,
    )


def test_infer_architecture_reads_r18_cifar(references):
    reference = references("r18_cifar")
    _, found = gr_checkpoint.read_variables(
        gr_checkpoint.resolve_source(reference.saved_model_dir)
    )
    architecture = gr_architecture.infer_architecture(
        {path: variable.shape for path, variable in found.items()}
    )
    # GR's defaults: 3-layer head to 128, ft_proj_selector 0; 512 features
    # fit hiddens 0, 1 and 2.
    assert architecture == gr_architecture.Architecture(
        resnet_depth=18,
        width_multiplier=1,
        cifar_stem=True,
        sk_ratio=0.0,
        se_ratio=0.0,
        proj_head_mode="nonlinear",
        num_proj_layers=3,
        proj_out_dim=128,
        num_classes=NUM_CLASSES,
        ft_proj_selectors=(0, 1, 2),
    )
    assert len(found) == reference.info["num_variables"]


def test_import_reads_gfile_paths(references):
    """A SavedModel copied to TensorFlow's in-memory ram:// filesystem."""
    reference = references("r18_cifar")
    target = "ram://gr_import_test/saved_model"
    for directory, _, files in tf.io.gfile.walk(reference.saved_model_dir):
        relative = directory[len(reference.saved_model_dir) :]
        tf.io.gfile.makedirs(target + relative)
        for file in files:
            tf.io.gfile.copy(
                os.path.join(directory, file),
                f"{target}{relative}/{file}",
                overwrite=True,
            )
    imported = gr_import.import_model(target)
    assert imported.source.saved_model_dir == target
    # The import checked itself against the SavedModel's own outputs.
    assert set(imported.differences) == set(gr_reference.OUTPUT_NAMES)
    ours = imported.model.endpoints(tf.constant(_images(32)), training=False)
    difference = _relative(
        ours["block_group4"], reference.outputs["block_group4"]
    )
    assert difference <= TOLERANCE


def _tree(values: dict[str, np.ndarray]) -> tf.Module:
    """A tf.Module tree whose attribute paths are the given paths."""
    root = tf.Module()
    for path, value in values.items():
        node = root
        *parents, leaf = path.split("/")
        for part in parents:
            if not hasattr(node, part):
                setattr(node, part, tf.Module())
            node = getattr(node, part)
        setattr(node, leaf, tf.Variable(value))
    return root


def _rewritten(reference, tmp_path, change) -> str:
    """GR's variables (by GR path) changed by `change`, saved as run.py."""
    reader, found = gr_checkpoint.read_variables(
        gr_checkpoint.resolve_source(reference.model_dir)
    )
    values = {path: reader.get_tensor(v.key) for path, v in found.items()}
    change(values)
    prefix = str(tmp_path / "ckpt")
    return tf.train.Checkpoint(model=_tree(values)).write(prefix)


def test_rewritten_gr_tree_imports_like_the_original(references, tmp_path):
    """The helper behind the error tests keeps what the importer reads."""
    reference = references("r18_cifar")
    imported = gr_import.import_model(
        _rewritten(reference, tmp_path, lambda values: None)
    )
    images = _images(32)
    ours = imported.model.endpoints(tf.constant(images), training=False)
    difference = _relative(
        ours["block_group4"], reference.outputs["block_group4"]
    )
    assert difference <= TOLERANCE


def _drop_one_bn_statistic(values):
    del values[
        "resnet_model/block_groups/1/layers/1/conv2d_bn_layers/3/bn/moving_mean"
    ]


def _widen_supervised_input(values):
    kernel = values["supervised_head/linear_layer/dense/kernel"]
    values["supervised_head/linear_layer/dense/kernel"] = np.zeros(
        (kernel.shape[0] + 1, kernel.shape[1]), np.float32
    )


def _add_unknown(values):
    values["resnet_model/block_groups/0/layers/0/extra/kernel"] = np.zeros(
        (1, 1, 64, 64), np.float32
    )


def _narrow_conv(values):
    values[
        "resnet_model/block_groups/0/layers/0/conv2d_bn_layers/2/conv2d/kernel"
    ] = np.zeros((3, 3, 64, 32), np.float32)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_drop_one_bn_statistic, r"1 missing .*moving_mean"),
        (_widen_supervised_input, "supervised head reads 513 features"),
        (_add_unknown, r"1 unexpected .*extra/kernel"),
        (_narrow_conv, r"shape \(3, 3, 64, 32\).* needs \(3, 3, 64, 64\)"),
    ],
)
def test_mismatched_gr_layout_is_one_line_error(
    references, tmp_path, change, message
):
    reference = references("r18_cifar")
    prefix = _rewritten(reference, tmp_path, change)
    with pytest.raises(ValueError, match=message) as error:
        gr_import.import_model(prefix)
    assert "\n" not in str(error.value)
    assert prefix in str(error.value)


def test_load_into_other_architecture_names_both(references):
    reference = references("r18_cifar")
    model = simclr.SimCLRModel(
        resnet_depth=18,
        width_multiplier=0.5,
        cifar_stem=True,
        num_proj_layers=3,
    )
    model(tf.zeros((1, 32, 32, 3)))
    with pytest.raises(
        ValueError, match=r"GR ResNet-18 1x, CIFAR stem.*shape"
    ) as error:
        gr_import.load_into(model, reference.model_dir)
    assert "\n" not in str(error.value)


def test_load_into_same_architecture_copies_encoder_and_head(references):
    reference = references("r18_cifar")
    model = simclr.SimCLRModel(
        resnet_depth=18, cifar_stem=True, num_proj_layers=3, num_classes=3
    )
    model(tf.zeros((1, 32, 32, 3)))
    head_before = model.supervised_head.dense.kernel.numpy()
    gr_import.load_into(model, reference.saved_model_dir)
    outputs = model.endpoints(tf.constant(_images(32)), training=False)
    difference = _relative(
        outputs["block_group4"], reference.outputs["block_group4"]
    )
    assert difference <= TOLERANCE
    # The 3-class head is left as it was (GR's has 10 classes).
    np.testing.assert_array_equal(
        model.supervised_head.dense.kernel, head_before
    )


def test_simclr_tf_checkpoint_is_unknown_layout(tmp_path):
    model = simclr.SimCLRModel(
        resnet_depth=18, width_multiplier=0.25, cifar_stem=True
    )
    model(tf.zeros((1, 32, 32, 3)))
    prefix = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    with pytest.raises(
        ValueError, match=r"no GR ResNet \(resnet_model/...\)"
    ) as error:
        gr_import.import_model(prefix)
    assert "\n" not in str(error.value)


def test_checkpoint_without_model_is_unknown_layout(tmp_path):
    prefix = tf.train.Checkpoint(step=tf.Variable(3)).write(str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"root has \[.*'step'"):
        gr_import.import_model(prefix)


def test_name_based_checkpoint_is_rejected(tmp_path):
    prefix = str(tmp_path / "tf1")
    with tf.Graph().as_default():
        tf.compat.v1.get_variable("resnet/conv", [3, 3, 3, 8])
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, prefix)
    with pytest.raises(ValueError, match="name-based"):
        gr_import.import_model(prefix)


def test_missing_source_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GR SavedModel"):
        gr_import.import_model(str(tmp_path / "absent"))


def test_cli_refuses_a_used_model_dir(references, tmp_path):
    reference = references("r18_cifar")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a run"):
        import_checkpoint.import_checkpoint(reference.model_dir, str(tmp_path))


def test_cli_selector_that_does_not_fit_is_rejected(references, tmp_path):
    reference = references("r18_cifar")
    with pytest.raises(ValueError, match=r"use one of \[0, 1, 2\]"):
        import_checkpoint.import_checkpoint(
            reference.model_dir, str(tmp_path / "out"), ft_proj_selector=3
        )


def test_cli_error_is_one_line_without_traceback(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "simclr_tf.tools.import_checkpoint",
            f"--source={tmp_path / 'absent'}",
            f"--model_dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("import_checkpoint: --source=")
    assert "no GR SavedModel" in last


@pytest.mark.parametrize(
    ("widths", "minimum", "default", "expected"),
    [
        # R50 1x SK: every gate clamped to 32 -> SimCLRv2's 1/16.
        ({64: 32, 128: 32, 256: 32, 512: 32}, 32, 0.0625, 0.0625),
        # R50 2x SK: 1024 * r = 64 shows r.
        ({128: 32, 256: 32, 512: 32, 1024: 64}, 32, 0.0625, 0.0625),
        # SE 0.25 on R18: max(1, int(f / 4)).
        ({64: 16, 128: 32, 256: 64, 512: 128}, 1, 0.25, 0.25),
        # All clamped but not by the default: the largest fitting ratio.
        ({64: 32, 128: 32}, 32, 0.5, 0.25),
    ],
)
def test_ratio_from_widths(widths, minimum, default, expected):
    assert gr_architecture._ratio(widths, minimum, default) == expected


def test_ratio_from_inconsistent_widths_is_an_error():
    with pytest.raises(ValueError, match="follow no single ratio"):
        gr_architecture._ratio({64: 16, 128: 16, 512: 128}, 1, 0.25)
