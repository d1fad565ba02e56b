"""Tests for simclr_tf.config: GR defaults, flag parsing, validation."""

from __future__ import annotations

import json
import pathlib

import pytest
import tensorflow as tf
from absl import flags

from simclr_tf.config import flag_defs, validation
from simclr_tf.config import loading as config_loading
from simclr_tf.config import schema as config_lib

flag_defs.define_flags()
FLAGS_DIR = pathlib.Path(__file__).resolve().parent.parent / "flags"


def _parse(*arguments: str) -> config_lib.Config:
    """Parses command-line style arguments into a Config (fresh FLAGS)."""
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["simclr_tf", *arguments])
    try:
        return config_loading.from_flags()
    finally:
        flags.FLAGS.unparse_flags()


def test_config_defaults_follow_google_research_simclr():
    config = _parse("--model_dir=/tmp/x")
    # Values from google-research/simclr tf2/run.py (REFERENCE.md).
    assert config.optim.learning_rate == 0.3
    assert config.optim.learning_rate_scaling == "linear"
    assert config.optim.warmup_epochs == 10
    assert config.optim.weight_decay == 1e-6
    assert config.model.batch_norm_decay == 0.9
    assert config.train.train_batch_size == 512
    assert config.train.train_epochs == 100
    assert config.loss.temperature == 0.1
    assert config.model.proj_out_dim == 128
    assert config.model.num_proj_layers == 3
    assert config.model.resnet_depth == 50
    assert config.data.image_size == 224
    assert config.data.color_jitter_strength == 1.0
    assert config.data.use_blur is True
    assert config.data.crop_min_area == 0.08  # paper App. A: 8% to 100%
    assert config.model.global_bn is True
    # GR defaults to "validation"; auto picks it where the dataset has one
    # (imagenet2012) and "test" where it does not (cifar10).
    assert config.data.eval_split == "auto"
    assert config.runtime.use_tpu is False  # GR defaults True; we detect.


def test_config_cifar_stem_follows_image_size():
    assert _parse("--model_dir=/x", "--image_size=32").model.cifar_stem
    assert not _parse("--model_dir=/x", "--image_size=224").model.cifar_stem
    explicit = _parse("--model_dir=/x", "--image_size=32", "--cifar_stem=false")
    assert not explicit.model.cifar_stem


def test_config_flagfiles_parse_and_validate():
    names = sorted(path.stem for path in FLAGS_DIR.glob("*.cfg"))
    assert {"demo", "demo_lineareval", "imagenet_finetune_1pct"} <= set(names)
    for name in names:
        path = FLAGS_DIR / f"{name}.cfg"
        # A recipe's gs://BUCKET placeholder would be read for the
        # architecture it holds: a local path that does not exist keeps
        # the test offline and leaves the flagfile's own flags as they are.
        offline = (
            ["--checkpoint=/nonexistent/simclr_run"]
            if "--checkpoint=gs://" in path.read_text()
            else []
        )
        config = _parse(f"--flagfile={path}", "--model_dir=/tmp/x", *offline)
        assert validation.validate(config) is config, name


def test_train_mode_defaults_fill_only_flags_not_given():
    linear = _parse("--flagfile=" + str(FLAGS_DIR / "demo_lineareval.cfg"))
    # The flagfile sets neither: the protocol's values (v1 App. B.6).
    assert linear.optim.optimizer == "momentum"
    assert linear.optim.learning_rate == 0.1
    assert linear.optim.weight_decay == 0.0
    # Given on the command line, a flag keeps its value.
    finetune = _parse("--train_mode=finetune", "--learning_rate=0.2")
    assert finetune.optim.learning_rate == 0.2
    assert finetune.optim.learning_rate_scaling == "sqrt"
    assert _parse("--learning_rate=0.2").optim.learning_rate_scaling == (
        "linear"
    )


def test_config_round_trips_through_json():
    config = _parse("--model_dir=/tmp/x", "--width_multiplier=0.25")
    restored = json.loads(config.to_json())
    assert restored["model"]["width_multiplier"] == 0.25
    assert restored["model_dir"] == "/tmp/x"


def test_validate_reports_every_problem_with_flag_and_fix():
    config = config_lib.from_dict(
        {
            "model_dir": "/tmp/x",
            "resnet_depth": 42,
            "temperature": 0.0,
            "color_jitter_strength": 2.0,
            "train_batch_size": 0,
        }
    )
    with pytest.raises(ValueError) as error:
        validation.validate(config)
    message = str(error.value)
    assert message.startswith("4 invalid flag value(s)")
    assert "--resnet_depth=42" in message and "use e.g." in message
    assert "--temperature=0.0" in message
    assert "--color_jitter_strength=2.0" in message
    assert "--train_batch_size=0" in message


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_validate_rejects_crop_min_area_outside_the_image(value):
    config = _parse("--model_dir=/tmp/x", f"--crop_min_area={value}")
    with pytest.raises(ValueError, match=f"--crop_min_area={value} must be"):
        validation.validate(config)
    milder = _parse("--model_dir=/tmp/x", "--crop_min_area=0.25")
    assert validation.validate(milder).data.crop_min_area == 0.25


def test_validate_rejects_missing_model_dir():
    with pytest.raises(ValueError, match="--model_dir is not set"):
        validation.validate(config_lib.from_dict({}))


def test_validate_rejects_selector_outside_head():
    config = config_lib.from_dict(
        {"model_dir": "/x", "num_proj_layers": 2, "ft_proj_selector": 3}
    )
    with pytest.raises(ValueError, match=r"--ft_proj_selector=3 must be in"):
        validation.validate(config)


def test_validate_rejects_distill_without_teacher():
    config = config_lib.from_dict({"model_dir": "/x", "train_mode": "distill"})
    with pytest.raises(ValueError, match="--train_mode=distill needs"):
        validation.validate(config)


def test_replace_changes_one_flag_and_keeps_the_rest():
    config = config_lib.from_dict({"model_dir": "/x", "image_size": 28})
    changed = config_lib.replace(config, train_steps=7)
    assert changed.train.train_steps == 7
    assert changed.data.image_size == 28
    assert changed.model.cifar_stem is True


def test_config_accepts_simclr_v2_blocks_and_rejects_bad_ratios():
    config = _parse("--model_dir=/x", "--sk_ratio=0.0625", "--se_ratio=0.25")
    assert validation.validate(config).model.sk_ratio == 0.0625
    with pytest.raises(ValueError, match=r"--sk_ratio=-1.0 .* in \[0, 1\)"):
        validation.validate(_parse("--model_dir=/x", "--sk_ratio=-1"))


def _write_run_config(model_dir: pathlib.Path, **values) -> None:
    """Writes model_dir/config.json as a finished run would."""
    flat = {"model_dir": str(model_dir), **values}
    config = config_lib.from_dict(flat, explicit=set(flat))
    (model_dir / "config.json").write_text(config.to_json())


def test_eval_mode_takes_the_run_settings_from_its_config_json(tmp_path):
    _write_run_config(
        tmp_path,
        train_mode="finetune",
        width_multiplier=0.5,
        learning_rate=0.08,
        weight_decay=1e-4,
        dataset="fashion_mnist",
    )
    config = _parse(f"--model_dir={tmp_path}", "--mode=eval")
    assert config.train.mode == "eval"
    assert config.train.train_mode == "finetune"
    assert config.model.width_multiplier == 0.5
    assert config.data.dataset == "fashion_mnist"
    # Saved values, not finetune's protocol defaults (0.005, 0).
    assert config.optim.learning_rate == 0.08
    assert config.optim.weight_decay == 1e-4
    # A flag given on the command line still wins.
    config = _parse(
        f"--model_dir={tmp_path}", "--mode=eval", "--eval_batch_size=64"
    )
    assert config.eval.eval_batch_size == 64
    assert config.model.width_multiplier == 0.5


def test_only_eval_mode_reads_config_json(tmp_path):
    _write_run_config(tmp_path, width_multiplier=0.5)
    config = _parse(f"--model_dir={tmp_path}", "--mode=train")
    assert config.model.width_multiplier == 1.0
    # And eval mode on a directory without config.json keeps the flags.
    config = _parse(f"--model_dir={tmp_path / 'new'}", "--mode=eval")
    assert config.model.width_multiplier == 1.0


def test_unreadable_checkpoint_storage_leaves_the_flags_to_the_run(
    monkeypatch,
):
    from simclr_tf import file_io
    from simclr_tf.config import transfer

    def denied(path):
        raise tf.errors.PermissionDeniedError(None, None, f"denied: {path}")

    monkeypatch.setattr(file_io, "exists", denied)
    # Nothing inherited; the flags given stay, and loading the model at
    # --checkpoint is what reports the storage error, once, later.
    assert transfer.checkpoint_architecture("gs://bucket/run") == {}
