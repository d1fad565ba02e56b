"""Tests of the supervised train modes: linear eval, fine-tuning, distillation.

Each runs the real training loop for a few steps on the synthetic dataset
with a tiny ResNet-18 and checks which weights moved against the weights
the run started from (a pretraining checkpoint written here).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import cli, export, losses
from simclr_tf.config import loading as config_loading
from simclr_tf.config import schema as config_lib
from simclr_tf.config import validation
from simclr_tf.data import run_data
from simclr_tf.evaluation import run_eval
from simclr_tf.training import builders, modes, train_state
from simclr_tf.training import loop as training_loop

_BASE = {
    "dataset": "synthetic",
    "train_split": "train",
    "eval_split": "test",
    "image_size": 16,
    "resnet_depth": 18,
    "width_multiplier": 0.125,
    "num_proj_layers": 2,
    "proj_out_dim": 16,
    "train_batch_size": 32,
    "train_steps": 3,
    "steps_per_loop": 3,
    "precision": "float32",
    "seed": 0,
    "max_eval_examples": 64,
    "eval_baselines": False,
    "eval_reports": False,
    "export_keras": False,
}


def _config(model_dir, train_mode="pretrain", explicit=(), **values):
    """A validated Config; unset flags take train_mode's protocol defaults."""
    flat = {**_BASE, "model_dir": str(model_dir), "train_mode": train_mode}
    flat.update(values)
    explicit = set(_BASE) | set(values) | set(explicit)
    return validation.validate(config_lib.from_dict(flat, explicit=explicit))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(checkpoint prefix, export dir, {variable path: value}) of a model
    with non-trivial weights and BN statistics (3 pretraining steps)."""
    model_dir = tmp_path_factory.mktemp("pretrained")
    config = _config(model_dir, learning_rate=0.5, warmup_epochs=0)
    summary = training_loop.run_training(config)
    model = summary["state"].model
    prefix = summary["state"].manager.latest_checkpoint
    path = export.export_saved_model(
        model, str(model_dir), 3, image_shape=(16, 16, 3)
    )
    values = {v.path: v.numpy() for v in model.variables}
    return prefix, path, values


def _snapshot(model):
    return {v.path: v.numpy() for v in model.variables}


def _changed(before, model):
    return {
        v.path
        for v in model.variables
        if not np.array_equal(before[v.path], v.numpy())
    }


def _encoder_and_head_paths(model):
    return [
        v.path
        for v in model.encoder.variables + model.projection_head.variables
    ]


def _pretrained_value(values, path):
    """The pretrained value of a variable (paths differ only in the model
    name's suffix, e.g. simclr_model vs simclr_model_1)."""
    tail = path.split("/", 1)[1] if path.startswith("simclr_model") else path
    (match,) = [
        v
        for k, v in values.items()
        if k == path or (k.startswith("simclr_model") and k.endswith(tail))
    ]
    return match


def test_lineareval_leaves_every_encoder_weight_and_bn_statistic(
    tmp_path, pretrained
):
    prefix, _, values = pretrained
    config = _config(tmp_path, "lineareval", checkpoint=prefix)
    # The protocol's defaults reach the flags the test left unset.
    assert config.optim.optimizer == "momentum"
    assert config.optim.weight_decay == 0.0
    state = training_loop.run_training(config)["state"]
    model = state.model
    for path in _encoder_and_head_paths(model):
        value = next(v for v in model.variables if v.path == path).numpy()
        # Exactly the pretrained values: frozen layers are never written.
        np.testing.assert_array_equal(
            value, _pretrained_value(values, path), err_msg=path
        )
    kernel = model.supervised_head.dense.kernel.numpy()
    assert np.abs(kernel).max() > 0  # zero-initialised, then trained
    assert state.optimizer.nesterov


def test_finetune_after_block_changes_only_later_layers(tmp_path, pretrained):
    prefix, _, _ = pretrained
    config = _config(
        tmp_path,
        "finetune",
        checkpoint=prefix,
        fine_tune_after_block=2,
        ft_proj_selector=1,
        learning_rate=0.05,
    )
    state = train_state.build_state(
        config, train_state.setup_run(config), _train_source(config)
    )
    before = _snapshot(state.model)
    changed = _train_from_state(config, state)
    model = state.model
    trainable = {v.path for v in model.trainable_variables}
    for variable in model.variables:
        path = variable.path
        frozen = (
            "/initial_" in f"/{path}"
            or "block_group1_" in path
            or "block_group2_" in path
        )
        if frozen and "moving_" not in path:
            assert path not in trainable, path
            assert path not in changed, path
        # The head layer past --ft_proj_selector=1: not read, so its
        # weights get no gradient (no weight decay in this protocol).
        if "projection_head/dense_1" in path or (
            "projection_head/batch_normalization_1/" in path
            and "moving_" not in path
        ):
            assert path not in changed, path
    # Later blocks (weights and BN statistics), the first head layer and
    # the supervised head all learn; as in GR, the frozen blocks' BN still
    # normalises with batch statistics and updates its moving averages.
    for fragment in (
        "block_group3_block0_conv2d_0/kernel",
        "block_group4_block1_batch_normalization_1/moving_mean",
        "projection_head/dense_0/kernel",
        "head_supervised/kernel",
        "block_group1_block0_batch_normalization_0/moving_mean",
        "initial_batch_normalization/moving_variance",
        "projection_head/batch_normalization_1/moving_mean",
    ):
        assert any(fragment in path for path in changed), fragment
    assert len(changed) < len(before)


def _train_source(config):
    from simclr_tf.data import run_data

    return run_data.labelled_train_source(
        config, run_data.open_train_source(config)
    )


def _train_from_state(config, state):
    """Runs config's steps on a built state; returns the paths that moved."""
    from simclr_tf.data import run_data
    from simclr_tf.training import train_step

    before = _snapshot(state.model)
    strategy = state.strategy
    data = strategy.distribute_datasets_from_function(
        run_data.finetune_input_fn(config, _train_source(config))
    )
    loop = train_step.make_train_loop(
        strategy,
        train_step.make_supervised_step(
            config, state.model, state.optimizer, 1
        ),
    )
    loop(iter(data), tf.constant(config.train.train_steps))
    return _changed(before, state.model)


def test_finetune_minus_one_trains_the_stem(tmp_path, pretrained):
    prefix, _, _ = pretrained
    config = _config(
        tmp_path, "finetune", checkpoint=prefix, learning_rate=0.05
    )
    state = train_state.build_state(
        config, train_state.setup_run(config), _train_source(config)
    )
    changed = _train_from_state(config, state)
    assert "initial_conv2d/kernel" in changed
    # ft_proj_selector=0: the projection head is not read, so its weights
    # get no gradient; its BN statistics follow the batches, as in GR.
    head = {p for p in changed if "projection_head" in p}
    assert head and all("/moving_" in p for p in head), head


def test_initialize_from_saved_model_equals_checkpoint(tmp_path, pretrained):
    prefix, export_path, values = pretrained
    config = _config(tmp_path, "finetune")
    models = []
    for path in (prefix, export_path, os.path.dirname(prefix)):
        model = builders.build_model(config, 10, 3)
        model(tf.zeros((1, 16, 16, 3)))
        modes.initialize_from(model, path)
        models.append(model)
    for model in models:
        variables = model.encoder.variables + model.projection_head.variables
        for variable in variables:
            expected = _pretrained_value(values, variable.path)
            np.testing.assert_array_equal(variable.numpy(), expected)


def test_initialize_from_bad_paths_name_the_fix(tmp_path, pretrained):
    prefix, export_path, _ = pretrained
    wider = _config(tmp_path, "finetune", width_multiplier=0.25)
    model = builders.build_model(wider, 10, 3)
    model(tf.zeros((1, 16, 16, 3)))
    for path in (prefix, export_path):
        with pytest.raises(ValueError, match="--width_multiplier|encoder fl"):
            modes.initialize_from(model, path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        modes.initialize_from(model, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="without checkpoints"):
        modes.initialize_from(model, str(tmp_path))


def test_distillation_loss_is_cross_entropy_of_softened_teacher():
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(5, 4)) * 3
    student = rng.normal(size=(5, 4))
    temperature = 2.0

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p_t, p_s = softmax(teacher / temperature), softmax(student / temperature)
    expected = -np.mean(np.sum(p_t * np.log(p_s), axis=-1))
    loss = losses.distillation_loss(
        tf.constant(teacher, tf.float32), tf.constant(student), temperature
    )
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)  # float32


def test_distillation_lowers_the_students_kl_to_the_teacher(tmp_path):
    """A student (own random init) trained by distill steps on a toy set
    moves its predictive distribution towards a fixed random teacher."""
    config = _config(
        tmp_path,
        "distill",
        teacher="unused",
        learning_rate=0.5,
        optimizer="momentum",
        weight_decay=0.0,
        distill_temperature=1.0,
        train_steps=15,
    )
    from simclr_tf.data import run_data
    from simclr_tf.training import train_step

    strategy = tf.distribute.get_strategy()
    source = run_data.open_train_source(config)
    teacher_model = builders.build_model(config, 10, 3)
    teacher_model(tf.zeros((1, 16, 16, 3)))
    # A confident teacher: scale its head so its softmax is far from uniform.
    head = teacher_model.supervised_head.dense
    head.kernel.assign(tf.random.normal(head.kernel.shape, seed=1) * 10.0)
    state = train_state.build_state(config, strategy, source)
    images = next(
        iter(run_data.eval_input(config, run_data.open_split(config, "test")))
    )["image"]

    def teacher(batch_images):
        return teacher_model(batch_images, training=False)["logits_sup"]

    def kl():
        p = tf.nn.softmax(teacher(images)).numpy().astype(np.float64)
        q = tf.nn.softmax(
            state.model(images, training=False)["logits_sup"]
        ).numpy()
        return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))

    def agreement():
        teacher_classes = np.argmax(teacher(images).numpy(), axis=-1)
        student = state.model(images, training=False)["logits_sup"].numpy()
        return float(np.mean(np.argmax(student, axis=-1) == teacher_classes))

    start, agreement_before = kl(), agreement()
    data = strategy.distribute_datasets_from_function(
        run_data.finetune_input_fn(config, source)
    )
    loop = train_step.make_train_loop(
        strategy,
        train_step.make_supervised_step(
            config, state.model, state.optimizer, 1, teacher
        ),
    )
    metrics = loop(iter(data), tf.constant(15))
    end, agreement_after = kl(), agreement()
    assert end < 0.5 * start, (start, end)
    # The student predicts the teacher's class more often than before, and
    # more often than chance (1 in 10), on images it was not trained on.
    assert agreement_after > max(agreement_before, 0.1), (
        agreement_before,
        agreement_after,
    )
    # The logged metric is the same agreement on the training batches (not
    # the ones above): also well above chance.
    assert float(metrics["teacher_agreement"]) > 0.1


def test_distill_cli_with_a_finetuned_teacher_dir(tmp_path, pretrained):
    prefix, _, _ = pretrained
    teacher_dir = tmp_path / "teacher"
    cli.run(
        _config(
            teacher_dir,
            "finetune",
            checkpoint=prefix,
            mode="train",
            train_steps=2,
            steps_per_loop=2,
        )
    )
    student_config = _config(
        tmp_path / "student",
        "distill",
        teacher=str(teacher_dir),
        mode="train_then_eval",
        train_steps=2,
        steps_per_loop=2,
    )
    result = cli.run(student_config)
    # The reported top-1 is the exported student's accuracy on the eval
    # split, recomputed here from the SavedModel (BN in inference mode).
    exported = tf.saved_model.load(result["export_path"])
    correct = count = 0
    test_source = run_data.open_split(student_config, "test")
    for batch in run_data.eval_input(student_config, test_source):
        logits = exported.signatures["serving_default"](batch["image"])
        predicted = np.argmax(logits["logits_sup"].numpy(), axis=-1)
        correct += int(np.sum(predicted == batch["label"].numpy()))
        count += len(predicted)
    assert count == result["eval/num_test"]
    # 1e-9: the same integer ratio.
    assert result["eval/top_1"] == pytest.approx(correct / count, abs=1e-9)
    assert result["eval/top_1"] <= result["eval/top_5"]
    # The teacher must predict the student's classes.
    with pytest.raises(ValueError, match="no logits_sup|output classes"):
        modes.load_teacher(
            export.export_saved_model(
                builders.build_model(_config(tmp_path, "pretrain"), 0, 3),
                str(tmp_path / "headless"),
                0,
                image_shape=(16, 16, 3),
            ),
            10,
            3,
            tf.distribute.get_strategy(),
        )


def test_label_fraction_trains_on_the_balanced_subset(tmp_path, pretrained):
    prefix, _, _ = pretrained
    config = _config(
        tmp_path, "finetune", checkpoint=prefix, label_fraction=0.25
    )
    source = _train_source(config)
    # synthetic train: 520 images, 52 per class -> 13 per class.
    labels = np.concatenate([y.numpy()[None] for _, y in source.dataset()])
    np.testing.assert_array_equal(np.bincount(labels), [13] * 10)
    state = train_state.build_state(
        config, train_state.setup_run(config), source
    )
    assert state.schedule.steps_per_epoch == 130 // 32


def test_mode_defaults_apply_only_to_unset_flags(tmp_path):
    explicit = _config(
        tmp_path, "finetune", explicit=("learning_rate",), learning_rate=0.3
    )
    assert explicit.optim.learning_rate == 0.3
    assert explicit.optim.learning_rate_scaling == "sqrt"  # v2 fine-tuning
    default = _config(tmp_path, "finetune")
    assert default.optim.learning_rate == 0.005
    assert default.optim.warmup_epochs == 0
    pretrain = _config(tmp_path)
    assert pretrain.optim.learning_rate == 0.3  # GR's default untouched


@pytest.mark.parametrize(
    "values, message",
    [
        ({"train_mode": "lineareval"}, "pass --checkpoint"),
        (
            {
                "train_mode": "lineareval",
                "checkpoint": "x",
                "optimizer": "lars",
            },
            "Nesterov momentum",
        ),
        ({"train_mode": "distill"}, "needs --teacher"),
        ({"label_fraction": 0.1}, "pretraining uses no labels|trains on every"),
        ({"train_mode": "finetune", "label_fraction": 0.0}, "in (0, 1]"),
        ({"train_mode": "finetune", "fine_tune_after_block": 5}, "[-1, 4]"),
    ],
)
def test_supervised_flags_are_checked(tmp_path, values, message):
    flat = {**_BASE, "model_dir": str(tmp_path), **values}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        validation.validate(config_lib.from_dict(flat, explicit=set(flat)))


def test_watch_checkpoints_yields_each_new_one_and_stops_at_the_last(
    tmp_path,
):
    step = tf.Variable(0, dtype=tf.int64)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(step=step), str(tmp_path), max_to_keep=5
    )
    manager.save(checkpoint_number=1)
    manager.save(checkpoint_number=2)
    seen, sleeps = [], []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 2:  # a new checkpoint appears while waiting
            manager.save(checkpoint_number=5)

    for _, number in run_eval.watch_checkpoints(
        str(tmp_path),
        last_step=lambda: 5,
        timeout_secs=60,
        poll_secs=1,
        sleep=sleep,
    ):
        seen.append(number)
    # The latest at start (2, not 1), then 5, which is the last step.
    assert seen == [2, 5]
    assert len(sleeps) == 2
    # Without a new checkpoint and no waiting, it stops after the latest.
    assert [
        n
        for _, n in run_eval.watch_checkpoints(
            str(tmp_path), last_step=lambda: 9, timeout_secs=0, sleep=sleep
        )
    ] == [5]


def test_eval_mode_writes_a_result_per_checkpoint(tmp_path, pretrained):
    prefix, _, _ = pretrained
    values = {"checkpoint": prefix, "train_steps": 2, "steps_per_loop": 1}
    trained = cli.run(
        _config(
            tmp_path,
            "finetune",
            mode="train_then_eval",
            checkpoint_steps=1,
            **values,
        )
    )
    evaluated = cli.run(_config(tmp_path, "finetune", mode="eval", **values))
    # The latest checkpoint (2) only; it is the last step, so eval stops.
    assert not os.path.exists(tmp_path / "result_1.json")
    with open(tmp_path / "result_2.json") as file:
        written = json.load(file)
    assert written["step"] == evaluated["step"] == 2
    # Restored weights score what the trained model scored.
    assert written["eval/top_1"] == trained["eval/top_1"]
    assert written["eval/num_test"] == 64
    # Given only model_dir and the mode, the run's config.json supplies the
    # rest (architecture, data, train mode) and the score is the same.
    given = {"model_dir": str(tmp_path), "mode": "eval"}
    saved = config_loading.saved_run_config(given)
    bare = validation.validate(config_loading.over_saved_run(saved, given))
    assert bare.train.train_mode == "finetune"
    assert cli.run(bare)["eval/top_1"] == trained["eval/top_1"]


def test_eval_mode_on_a_directory_without_a_run_fails_at_once(tmp_path):
    # No checkpoint and no config.json: nothing will appear, so no waiting
    # for --eval_timeout_secs (an hour by default).
    config = _config(tmp_path, mode="eval")
    with pytest.raises(FileNotFoundError, match="no training run"):
        cli.run(config)
