"""Tests of the memory plan (simclr_tf/planning): network sizes against the
built Keras model and against google-research/simclr's published counts,
the activation figure against TensorFlow's allocator, the plan's
arithmetic, its refusals, and the evaluation's baselines at scale.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf import hardware
from simclr_tf.config import schema as config_lib
from simclr_tf.config import validation
from simclr_tf.models import simclr
from simclr_tf.planning import devices, eval_memory, memory, network
from simclr_tf.tools import memory_table

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET = memory.DataFacts(
    num_train=1_281_167,
    num_eval=50_000,
    num_classes=1000,
    image_channels=3,
    stored_image_bytes=memory.UNKNOWN_IMAGE_BYTES,
)


def _imagenet_config(**changes) -> config_lib.Config:
    """flags/imagenet.cfg's settings (as absl would read them) + changes."""
    values = {"model_dir": "/tmp/plan"}
    with open(os.path.join(REPOSITORY, "flags", "imagenet.cfg")) as file:
        for line in file:
            if line.startswith("--"):
                name, _, value = line[2:].strip().partition("=")
                values[name] = {"true": True, "false": False}.get(value, value)
    for name, value in values.items():
        for kind in (int, float):
            try:
                values[name] = kind(value)
                break
            except (TypeError, ValueError):
                pass
    values.update(changes)
    return validation.validate(
        config_lib.from_dict(values, explicit=set(values))
    )


ARCHITECTURES = [
    {"resnet_depth": 18, "width_multiplier": 0.25, "cifar_stem": True},
    {"resnet_depth": 50, "width_multiplier": 0.25},
    {"resnet_depth": 50, "width_multiplier": 0.25, "sk_ratio": 0.0625},
    {"resnet_depth": 50, "width_multiplier": 0.25, "se_ratio": 0.25},
    {"resnet_depth": 34, "width_multiplier": 0.25, "sk_ratio": 0.0625},
]
HEADS = [
    {"num_proj_layers": 2},
    {"num_proj_layers": 3, "ft_proj_selector": 1, "num_classes": 10},
    {"proj_head_mode": "linear", "num_classes": 5, "ft_proj_selector": -1},
    {"proj_head_mode": "none", "num_classes": 7},
]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_network_facts_count_the_built_models_variables(architecture, head):
    model = simclr.SimCLRModel(**architecture, **head)
    model(tf.zeros([1, 32, 32, 3]))
    facts = network.network_facts(image_size=32, **architecture, **head)

    def count(variables):
        return sum(int(np.prod(v.shape)) for v in variables)

    assert facts.trainable_parameters == count(model.trainable_variables)
    assert facts.non_trainable_parameters == count(
        model.non_trainable_variables
    )
    assert facts.feature_dim == model.encoder.output.shape[-1]


@pytest.mark.parametrize(
    "depth, width, sk, millions",
    [
        (50, 1, 0.0625, 35.2),
        (101, 1, 0, 42.5),
        (152, 1, 0, 58.1),
        (152, 3, 0.0625, 794.7),
        (50, 2, 0, 94),
        (50, 4, 0, 375),
    ],
)
def test_network_facts_match_google_research_simclr_counts(
    depth, width, sk, millions
):
    # google-research/simclr's table (README "Flags beyond ..."; R50 2x and
    # 4x from REFERENCE.md, rounded to the million): trainable encoder
    # weights without BN moving statistics or heads.
    facts = network.network_facts(
        resnet_depth=depth,
        width_multiplier=width,
        image_size=224,
        sk_ratio=sk,
        proj_head_mode="none",
    )
    digits = 1 if millions < 90 or millions > 700 else 0
    assert round(facts.trainable_parameters / 1e6, digits) == millions


def test_plan_items_are_the_counts_times_their_dtype_sizes():
    config = _imagenet_config()
    plan = memory.plan_run(
        config, devices.named("v3", 128), IMAGENET, "mixed_bfloat16"
    )
    facts = memory.network_of(config, 1000, 3)
    trainable = facts.trainable_parameters
    assert plan.replica["parameters"] == 4 * facts.parameters
    assert plan.replica["gradients"] == 4 * trainable
    assert plan.replica["optimizer"] == 4 * trainable  # LARS: one slot
    assert plan.replica["weight copies"] == 2 * facts.kernel_parameters
    # 32 images per replica, two views each, bfloat16 activations.
    saved = sum(facts.saved_per_example)
    assert plan.replica["activations"] == 64 * 2 * saved
    # NT-Xent over the gathered batch: five [2n, 2N] float32 tensors and
    # the gathered [2N, d] blocks forward and backward.
    assert plan.replica["contrastive loss"] == (
        5 * 64 * 8192 * 4 + 4 * 8192 * 128 * 4
    )
    # A ring all-reduce moves 2 (R - 1) / R of the [N, 2d] float32 block,
    # forward and backward.
    assert plan.gather_bytes == int(2 * 2 * 127 / 128 * 4096 * 256 * 4)


def test_plan_adam_has_two_slots_and_float32_no_weight_copies():
    config = _imagenet_config(optimizer="adam", weight_decay=0.0)
    plan = memory.plan_run(
        config, devices.named("v3", 128), IMAGENET, "float32"
    )
    facts = memory.network_of(config, 1000, 3)
    assert plan.replica["optimizer"] == 8 * facts.trainable_parameters
    assert "weight copies" not in plan.replica
    assert plan.replica["activations"] == 64 * 4 * sum(facts.saved_per_example)


def test_plan_of_lineareval_keeps_only_the_heads_activations():
    pretrain = _imagenet_config()
    linear = _imagenet_config(
        train_mode="lineareval",
        checkpoint="/tmp/x",
        optimizer="momentum",
        weight_decay=0.0,
    )
    facts = memory.network_of(linear, 1000, 3)
    plan = memory.plan_run(
        linear, devices.named("v3", 128), IMAGENET, "mixed_bfloat16"
    )
    # One view of 32 images, heads only (the encoder is frozen).
    assert plan.replica["activations"] == 32 * 2 * facts.saved_per_example[5]
    assert "contrastive loss" not in plan.replica
    assert (
        plan.replica_total
        < memory.plan_run(
            pretrain, devices.named("v3", 128), IMAGENET, "mixed_bfloat16"
        ).replica_total
    )


@pytest.mark.parametrize("cores, fits", [(32, True), (16, False)])
def test_imagenet_batch_4096_needs_32_tpu_v3_cores_as_gr_says(cores, fits):
    # google-research/simclr's README: "A batch size of 4096 requires at
    # least 32 TPUs" (v3 cores, 16 GiB each) for ResNet-50 at 224 px.
    config = _imagenet_config()
    plan = memory.plan_run(
        config, devices.named("v3", cores), IMAGENET, "mixed_bfloat16"
    )
    if fits:
        memory.check(plan, config)
        return
    with pytest.raises(ValueError) as error:
        memory.check(plan, config)
    message = str(error.value)
    assert "--train_batch_size=4096 on 16 x TPU v3" in message
    assert "\n" not in message and "--image_size" in message


def test_refusal_suggests_a_batch_that_fits():
    config = _imagenet_config()
    plan = memory.plan_run(
        config, devices.named("v3", 8), IMAGENET, "mixed_bfloat16"
    )
    with pytest.raises(ValueError, match=r"use --train_batch_size=(\d+)") as e:
        memory.check(plan, config)
    suggested = int(
        str(e.value).split("use --train_batch_size=")[1].split(" ")[0]
    )
    assert suggested % 8 == 0 and suggested < 4096
    smaller = _imagenet_config(train_batch_size=suggested)
    memory.check(
        memory.plan_run(
            smaller, devices.named("v3", 8), IMAGENET, "mixed_bfloat16"
        ),
        smaller,
    )
    # One image more per replica no longer fits: the suggestion is tight.
    larger = _imagenet_config(train_batch_size=suggested + 8)
    with pytest.raises(ValueError):
        memory.check(
            memory.plan_run(
                larger, devices.named("v3", 8), IMAGENET, "mixed_bfloat16"
            ),
            larger,
        )


def test_refusal_of_float32_on_an_accelerator_names_mixed_bfloat16():
    config = _imagenet_config(precision="float32")
    plan = memory.plan_run(config, devices.named("40", 8), IMAGENET, "float32")
    with pytest.raises(ValueError, match="--precision=mixed_bfloat16"):
        memory.check(plan, config)


def test_cached_imagenet_does_not_fit_a_host_and_names_cache_dataset():
    config = _imagenet_config(cache_dataset=True)
    host = dataclasses_replace(devices.named("v3", 8), host_memory=335 * 10**9)
    plan = memory.plan_run(config, host, IMAGENET, "mixed_bfloat16")
    # 1.28M decoded images of about 420 kB do not fit 335 GB.
    assert plan.host["input pipeline"] > 335 * 10**9
    with pytest.raises(ValueError, match="drop --cache_dataset"):
        memory.check(
            dataclasses_replace(
                plan, replica={"parameters": 1}, per_image_bytes=0
            ),
            config,
        )


def dataclasses_replace(value, **changes):
    import dataclasses

    return dataclasses.replace(value, **changes)


def test_evaluation_plan_of_imagenet_cuts_baselines_and_fits_pixels():
    config = _imagenet_config()
    facts = memory.network_of(config, 1000, 3)
    plan = eval_memory.plan_evaluation(
        config, devices.named("v3", 8), IMAGENET, facts
    )
    by_prefix = {entry.prefix: entry for entry in plan.representations}
    assert by_prefix[""].train_rows == 1_281_167
    assert by_prefix["random_init/"].train_rows == 100_000
    assert "first 100,000 of 1,281,167" in by_prefix["random_init/"].note
    pixels = by_prefix["pixels/"]
    assert pixels.feature_dim == 224 * 224 * 3 and not pixels.skipped
    # Its bank fits the share of a 16 GiB core left for banks.
    per_replica = eval_memory.bank_bytes(
        pixels.train_rows, pixels.feature_dim, 8, plan.per_replica_batch
    )
    assert per_replica <= eval_memory.BANK_SHARE * 16 * 2**30
    # What reaches the host is per-row results, the reports and the eval
    # pipeline's batches (512 images per core at --eval_batch_size=4096),
    # not the 771 GB of raw pixels: well within a v3-8 host's 335 GB.
    assert plan.host["results"] == 5 * 4 * 50_000
    assert plan.host_total < 20 * 2**30


def test_evaluation_plan_refuses_pixels_that_cannot_fit_with_a_reason():
    config = _imagenet_config()
    facts = memory.network_of(config, 1000, 3)
    small = dataclasses_replace(
        devices.named("v3", 8), replica_memory=2 * 2**30
    )
    plan = eval_memory.plan_evaluation(config, small, IMAGENET, facts)
    pixels = plan.representations[-1]
    assert pixels.prefix == "pixels/"
    assert "--eval_baselines=false" in pixels.skipped
    assert "\n" not in pixels.skipped


def test_evaluation_plan_keeps_every_fashion_mnist_image_for_baselines():
    config = validation.validate(
        config_lib.from_dict(
            {
                "model_dir": "/tmp/x",
                "dataset": "fashion_mnist",
                "image_size": 28,
                "resnet_depth": 18,
                "width_multiplier": 0.25,
            }
        )
    )
    data = memory.data_facts(60_000, 10_000, 10, (28, 28, 1))
    facts = memory.network_of(config, 10, 1)
    plan = eval_memory.plan_evaluation(
        config, devices.Devices(name="CPU", replicas=1), data, facts
    )
    assert [r.train_rows for r in plan.representations] == [60_000] * 3
    assert not any(r.note or r.skipped for r in plan.representations)


def test_gpu_memory_is_read_from_its_name():
    assert devices.gpu_memory_from_name("NVIDIA A100-SXM4-80GB") == 80 * 10**9
    assert devices.gpu_memory_from_name("NVIDIA H100 80GB HBM3") == 80 * 10**9
    assert devices.gpu_memory_from_name("Tesla T4") is None


def test_devices_of_a_cpu_strategy_share_the_hosts_memory():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    found = devices.from_strategy(strategy, host_memory_gb=8)
    assert found.on_host and found.replicas == 2 and found.hosts == 1
    assert found.replica_memory == 4 * 10**9


_MEASURE = r"""
import json, sys
import numpy as np, tensorflow as tf, keras
from simclr_tf.models import simclr
cases = json.loads(sys.argv[1])
found = []
for case in cases:
    keras.mixed_precision.set_global_policy(case.pop("precision"))
    batch, size = case.pop("batch"), case.pop("image_size")
    model = simclr.SimCLRModel(**case, num_proj_layers=2)
    images = tf.random.uniform([batch, size, size, 3])
    model(images[:2], training=False)

    @tf.function
    def step(images):
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            loss = tf.reduce_mean(outputs["proj_head_output"])
        return tape.gradient(loss, model.trainable_variables)

    del step(images)[:]  # trace and run once
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.config.experimental.reset_memory_stats("CPU:0")
    gradients = step(images)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    sizes = sum(int(np.prod(g.shape)) * g.dtype.size for g in gradients)
    found.append(peak - before - sizes)
print(json.dumps(found))
"""

MEASURED = [
    {
        "resnet_depth": 18,
        "width_multiplier": 0.25,
        "image_size": 32,
        "cifar_stem": True,
        "precision": "float32",
        "batch": 64,
    },
    {
        "resnet_depth": 18,
        "width_multiplier": 0.25,
        "image_size": 32,
        "cifar_stem": True,
        "precision": "mixed_bfloat16",
        "batch": 64,
    },
    {
        "resnet_depth": 50,
        "width_multiplier": 0.25,
        "image_size": 64,
        "precision": "float32",
        "batch": 64,
    },
    {
        "resnet_depth": 50,
        "width_multiplier": 0.25,
        "image_size": 64,
        "sk_ratio": 0.0625,
        "precision": "float32",
        "batch": 64,
    },
]


def test_activation_figure_is_within_25_percent_of_tensorflows_peak():
    """TensorFlow's allocator (oneDNN's CPU allocator keeps statistics,
    so oneDNN is on whatever the CPU's default): the peak of a compiled
    forward + backward pass above the memory in use before it, less the
    gradients it returns, against the plan's activations for that batch.
    Fresh process: clean statistics, one device. Measured 1-11% apart
    (docs/memory.md); 25% is the issue's bound. The bfloat16 case counts
    only where oneDNN runs bfloat16: elsewhere (AVX2 CPUs) the conv
    gradients accumulate in float32 buffers of their own (models/conv.py),
    which a bfloat16 plan for TPUs does not hold (measured 33% above it on
    a Zen 3)."""
    onednn = {"TF_ENABLE_ONEDNN_OPTS": "1"}  # the measuring process's
    bf16_on_onednn = hardware.tensorflow_bf16_on_onednn(environ=onednn)
    cases = [
        case
        for case in MEASURED
        if bf16_on_onednn or case["precision"] != "mixed_bfloat16"
    ]
    finished = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps(cases)],
        env={
            **os.environ,
            "PYTHONPATH": REPOSITORY,
            "TF_CPP_MIN_LOG_LEVEL": "3",
            **onednn,
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    measured = json.loads(finished.stdout.strip().splitlines()[-1])
    for case, tensorflow_bytes in zip(cases, measured, strict=True):
        case = dict(case)
        precision, batch = case.pop("precision"), case.pop("batch")
        facts = network.network_facts(**case, num_proj_layers=2)
        planned = memory.activation_bytes(facts, batch, precision)
        assert abs(planned / tensorflow_bytes - 1) < 0.25, (case, planned)


def test_docs_memory_tables_are_the_plans_output():
    """docs/memory.md's tables are tools/memory_table.py's output from
    the plan's code (regenerate: python -m simclr_tf.tools.memory_table
    --output=docs/memory.md)."""
    with open(os.path.join(REPOSITORY, "docs", "memory.md")) as file:
        text = file.read()
    assert text == memory_table.replace_after_marker(
        text, memory_table.render()
    )


def test_memory_table_refuses_a_file_without_its_marker():
    with pytest.raises(ValueError, match="add it where the tables go"):
        memory_table.replace_after_marker("# no marker\n", "| table |\n")
