"""--time_budget_minutes: the decision rule, the learning rate it moves,
and a run that ends at the decided step and resumes to it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import optim
from simclr_tf.config import schema as config_lib
from simclr_tf.config import validation
from simclr_tf.data import run_data
from simclr_tf.evaluation import run_eval
from simclr_tf.training import budget, loop


@pytest.mark.parametrize(
    "configured, warmup, expected",
    [
        # 100 s budget, 20 s spent, 0.5 s/step from step 10: 10 + 160.
        (500, 0, 170),
        (100, 0, 100),  # the configured length fits: unchanged
        (500, 200, 201),  # never shorter than the warm-up plus one step
    ],
)
def test_decide_fits_the_remaining_time_at_the_measured_rate(
    configured, warmup, expected
):
    decision = budget.decide(
        step=10,
        elapsed_seconds=20.0,
        step_seconds=0.5,
        budget_seconds=100.0,
        configured_steps=configured,
        warmup_steps=warmup,
    )
    assert decision.total_steps == expected
    assert decision.configured_steps == configured


def test_decide_spent_budget_still_takes_one_more_step():
    decision = budget.decide(
        step=6,
        elapsed_seconds=90.0,
        step_seconds=0.5,
        budget_seconds=30.0,
        configured_steps=40,
        warmup_steps=0,
    )
    assert decision.total_steps == 7


def _numpy_rate(step, base, warmup, total):
    if step < warmup:
        return base * step / max(warmup, 1)
    progress = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def test_set_total_steps_reaches_a_step_traced_before_it():
    schedule = optim.WarmUpAndCosineDecay(2.0, warmup_steps=10, total_steps=100)
    rate = tf.function(schedule)
    steps = [0, 5, 10, 30, 60, 100]
    before = [float(rate(tf.constant(s))) for s in steps]
    schedule.set_total_steps(60)
    after = [float(rate(tf.constant(s))) for s in steps]
    np.testing.assert_allclose(
        before, [_numpy_rate(s, 2.0, 10, 100) for s in steps], atol=1e-6
    )
    np.testing.assert_allclose(
        after, [_numpy_rate(s, 2.0, 10, 60) for s in steps], atol=1e-6
    )
    with pytest.raises(ValueError, match="warm-up"):
        schedule.set_total_steps(10)


def test_budgeted_run_ends_at_the_decided_step_and_resumes_to_it(tmp_path):
    # A budget (0.6 s) that compiling alone exceeds: the run takes its
    # first step, times the next loop of 5, and then only one more step
    # fits (decide's floor), whatever this machine's speed.
    config = validation.validate(
        config_lib.from_dict(
            {
                "model_dir": str(tmp_path),
                "dataset": "synthetic",
                "image_size": 16,
                "resnet_depth": 18,
                "width_multiplier": 0.125,
                "proj_out_dim": 16,
                "train_batch_size": 16,
                "train_steps": 40,
                "steps_per_loop": 5,
                "warmup_epochs": 0,
                "use_blur": False,
                "time_budget_minutes": 0.01,
                "precision": "float32",
                "seed": 0,
            }
        )
    )
    result = loop.run_training(config)
    assert result["step"] == 7
    with open(tmp_path / budget.FILE_NAME) as file:
        decided = json.load(file)
    assert decided["total_steps"] == 7 and decided["configured_steps"] == 40
    assert result["state"].schedule.total_steps == 7
    # The learning rate decays to 0 at the decided end, not at step 40.
    assert float(result["state"].optimizer.learning_rate) == pytest.approx(
        0.0, abs=1e-7
    )
    # The same command again: the saved decision holds, nothing to train.
    again = loop.run_training(config)
    assert again["step"] == 7
    # --mode=eval on this model_dir ends at the decided step: it neither
    # waits --eval_timeout_secs for step 40 nor sleeps.
    source = run_data.open_train_source(config)
    assert run_eval.final_step(config, source) == 7

    def sleep(seconds):
        raise AssertionError(f"waited {seconds} s for a checkpoint")

    watched = run_eval.watch_checkpoints(
        str(tmp_path),
        last_step=lambda: run_eval.final_step(config, source),
        timeout_secs=3600,
        sleep=sleep,
    )
    assert [step for _, step in watched] == [7]
    # Resumed without a budget, training ignores the decision (its
    # schedule runs to step 40): so does --mode=eval.
    unbudgeted = config_lib.replace(config, time_budget_minutes=0.0)
    assert run_eval.final_step(unbudgeted, source) == 40


def test_negative_budget_is_a_flag_error():
    with pytest.raises(ValueError, match="--time_budget_minutes=-1.0"):
        validation.validate(
            config_lib.from_dict(
                {"model_dir": "/tmp/x", "time_budget_minutes": -1.0}
            )
        )
