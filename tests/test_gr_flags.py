"""google-research/simclr's (GR) flags and README command lines.

Every flag GR's tf2/run.py defines is a simclr_tf flag with GR's default
(except the listed, documented ones) and a row in README's table; the
`python run.py ...` commands of GR's tf2/README.md run unchanged as
`python -m simclr_tf ...` (in-process, cifar10 / imagenet2012 from
tfds.testing.mock_data, never the network) with overrides appended that
make them tiny: 2 steps of a ResNet-18 x 0.125 at 32 px, batch 8, on the
default strategy (the ImageNet command asks for a TPU).
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import socket

import gr_reference
import pytest
import tensorflow_datasets as tfds
from absl import flags

from simclr_tf import cli, runtime
from simclr_tf import hardware as hardware_lib
from simclr_tf.config import flag_defs, validation
from simclr_tf.config import loading as config_loading
from simclr_tf.config import schema as config_lib

flag_defs.define_flags()
GR_RUN = os.path.join(gr_reference.GR_REFERENCE_DIR, "run.py")
GR_README = os.path.join(gr_reference.GR_REFERENCE_DIR, "README.md")
README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")
# GR flags whose default differs here, on purpose (README's table says why).
DIFFERENT_DEFAULTS = {"use_tpu", "eval_split"}
# Appended to GR's command lines to keep them tiny (absl: the last wins).
TINY = (
    "--train_steps=2",
    "--train_batch_size=8",
    "--image_size=32",
    "--resnet_depth=18",
    "--width_multiplier=0.125",
    "--steps_per_loop=1",
    "--strategy=default",
    "--precision=float32",
)


def _require_gr() -> None:
    if not os.path.isfile(GR_RUN):
        pytest.skip(
            f"GR's TF2 code is not in {gr_reference.GR_REFERENCE_DIR} (set "
            "GR_REFERENCE_DIR to a copy of google-research/simclr's tf2/)"
        )


def _gr_flag_defaults() -> dict[str, object]:
    """{name: default} of every flags.DEFINE_* call in GR's run.py."""
    with open(GR_RUN) as file:
        tree = ast.parse(file.read())
    found = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr.startswith("DEFINE_")
        ):
            name = ast.literal_eval(node.args[0])
            found[name] = ast.literal_eval(node.args[1])
    return found


def _gr_readme_commands() -> list[list[str]]:
    """The arguments of each `python run.py ...` in GR's tf2/README.md."""
    with open(GR_README) as file:
        text = file.read()
    commands = []
    for block in re.findall(r"```\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("python run.py"):
                commands.append(shlex.split(line)[2:])
    return commands


@pytest.fixture
def parse():
    """Parses command-line arguments into absl's FLAGS; resets after."""

    def parse_arguments(*arguments: str) -> None:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["simclr_tf", *arguments])

    yield parse_arguments
    flags.FLAGS.unparse_flags()


def test_every_gr_flag_is_a_simclr_tf_flag_with_grs_default():
    _require_gr()
    gr_defaults = _gr_flag_defaults()
    assert len(gr_defaults) == 48  # grep -c flags.DEFINE_ run.py (383d414)
    missing = sorted(set(gr_defaults) - set(flags.FLAGS))
    assert missing == []
    different = {
        name
        for name, default in gr_defaults.items()
        if flags.FLAGS[name].default != default
    }
    assert different == DIFFERENT_DEFAULTS


def test_readme_table_has_a_row_for_every_gr_flag():
    _require_gr()
    with open(README) as file:
        rows = set(re.findall(r"^\| `--(\w+)`", file.read(), re.M))
    expected = set(_gr_flag_defaults()) | set(flag_defs.NO_EFFECT_FLAGS)
    assert expected <= rows, sorted(expected - rows)


def test_gr_readme_has_the_two_pretraining_commands():
    _require_gr()
    commands = _gr_readme_commands()
    datasets = [
        next(a for a in command if a.startswith("--dataset="))
        for command in commands
    ]
    assert datasets == ["--dataset=cifar10", "--dataset=imagenet2012"]


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt raises at once (urllib3 would retry minutes)."""

    def refuse(*args, **kwargs):
        raise RuntimeError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("index", [0, 1], ids=["cifar10", "imagenet2012"])
def test_gr_readme_command_runs_unchanged(
    index, parse, tmp_path, no_network, caplog
):
    _require_gr()
    command = _gr_readme_commands()[index]
    environment = {
        "$DATA_DIR": str(tmp_path / "data"),
        "$MODEL_DIR": str(tmp_path / "model"),
        "$TPU_NAME": "tpu-name",
    }
    arguments = []
    for argument in command:
        for variable, value in environment.items():
            argument = argument.replace(variable, value)
        arguments.append(argument)
    model_dir = str(tmp_path / "run")
    parse(*arguments, *TINY, f"--model_dir={model_dir}")
    config = validation.validate(config_loading.from_flags())
    notes = config_loading.no_effect_notes()
    # GR's flags as given reach the config; the tiny overrides win.
    given = dict(a[2:].split("=", 1) for a in arguments if "=" in a)
    assert str(config.loss.temperature) == given["temperature"]
    assert str(config.optim.learning_rate) == given["learning_rate"]
    assert config.data.dataset == given["dataset"]
    assert config.train.train_batch_size == 8
    with tfds.testing.mock_data(
        num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        result = cli.run(config)
    assert result["step"] == 2
    assert os.path.isfile(os.path.join(model_dir, "ckpt-2.index"))
    # The ImageNet command passes tf1's --train_summary_steps: a note.
    expected = ["train_summary_steps"] if "imagenet" in given["dataset"] else []
    assert [n.split()[0][2:] for n in notes] == expected


def test_no_effect_flags_are_accepted_with_a_note(parse):
    parse("--eval_name=x", "--train_summary_steps=0", "--model_dir=/tmp/x")
    notes = config_loading.no_effect_notes()
    assert len(notes) == 2
    assert all("has no effect" in note for note in notes)
    parse("--model_dir=/tmp/x")
    assert config_loading.no_effect_notes() == []


def test_master_is_the_tpu_address_without_tpu_name():
    """GR's run.py: TPUClusterResolver(FLAGS.master) when --tpu_name is
    unset."""
    hardware = hardware_lib.Hardware(
        tpu=None, gpus=(), nvidia_driver="", cpu_bf16=()
    )
    given = config_lib.Runtime(use_tpu=True, master="grpc://10.0.0.2:8470")
    assert runtime._tpu_address(given, hardware, {}) == "grpc://10.0.0.2:8470"
    # No TPU on this machine, but an address: no "no TPU found" error.
    runtime.check_devices("tpu", given, hardware)
    named = config_lib.Runtime(use_tpu=True, tpu_name="a", master="b")
    assert runtime._tpu_address(named, hardware, {}) == "a"
