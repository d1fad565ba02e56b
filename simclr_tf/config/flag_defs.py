"""The absl flag definitions: google-research/simclr's, then ours.

Defining is all this module does; loading.py reads the values into a
Config. The values the enumerated flags accept are schema.py's.
"""

from __future__ import annotations

from absl import flags

from simclr_tf.config import schema

MODES = schema.MODES
TRAIN_MODES = schema.TRAIN_MODES
STRATEGIES = schema.STRATEGIES
PRECISIONS = schema.PRECISIONS
OPTIMIZERS = schema.OPTIMIZERS
RESNET_DEPTHS = schema.RESNET_DEPTHS


def define_flags() -> None:
    """Defines every simclr_tf flag on absl's global FLAGS (idempotent)."""
    if "train_batch_size" in flags.FLAGS:
        return
    define_gr_flags()
    define_extension_flags()


def define_gr_flags() -> None:
    """google-research/simclr flags, with its names and defaults."""
    d = flags
    d.DEFINE_float("learning_rate", 0.3, "Base learning rate before scaling.")
    d.DEFINE_enum(
        "learning_rate_scaling",
        "linear",
        ["linear", "sqrt"],
        "linear: lr*B/256; sqrt: lr*sqrt(B).",
    )
    d.DEFINE_float("warmup_epochs", 10, "Linear warm-up length in epochs.")
    d.DEFINE_float("weight_decay", 1e-6, "Weight decay (L2) coefficient.")
    d.DEFINE_float("batch_norm_decay", 0.9, "BatchNormalization momentum.")
    d.DEFINE_integer(
        "train_batch_size",
        512,
        "Global batch size in images (each gives two views).",
    )
    d.DEFINE_string("train_split", "train", "Split to train on.")
    d.DEFINE_integer("train_epochs", 100, "Training length in epochs.")
    d.DEFINE_integer(
        "train_steps", 0, "Training length in steps; overrides train_epochs."
    )
    d.DEFINE_integer(
        "eval_steps",
        0,
        "Batches of --eval_batch_size to evaluate on; 0 = the whole eval "
        "split.",
    )
    d.DEFINE_integer("eval_batch_size", 256, "Batch size for evaluation.")
    d.DEFINE_integer("checkpoint_epochs", 1, "Checkpoint every N epochs.")
    d.DEFINE_integer(
        "checkpoint_steps",
        0,
        "Checkpoint every N steps; overrides checkpoint_epochs.",
    )
    d.DEFINE_string(
        "eval_split",
        "auto",
        "Split to evaluate on; auto = validation if the dataset has one, "
        "else test.",
    )
    d.DEFINE_string(
        "dataset",
        "imagenet2012",
        "A tfds name, or fashion_mnist | synthetic.",
    )
    d.DEFINE_bool("cache_dataset", False, "Cache decoded images in memory.")
    d.DEFINE_enum("mode", "train", list(MODES), "What to run.")
    d.DEFINE_enum("train_mode", "pretrain", list(TRAIN_MODES), "What to train.")
    d.DEFINE_bool(
        "lineareval_while_pretraining",
        True,
        "Train a linear head on stop_gradient(features) while pretraining.",
    )
    d.DEFINE_string("checkpoint", None, "Checkpoint to initialise from.")
    d.DEFINE_bool(
        "zero_init_logits_layer", False, "Zero-initialise the linear head."
    )
    d.DEFINE_integer(
        "fine_tune_after_block", -1, "Freeze blocks up to this one."
    )
    d.DEFINE_string(
        "master",
        None,
        "TPU address used with --use_tpu when --tpu_name is not set.",
    )
    d.DEFINE_string("model_dir", None, "Where checkpoints and logs go.")
    d.DEFINE_string("data_dir", None, "Where the dataset lives.")
    d.DEFINE_bool(
        "use_tpu",
        False,
        "Use a TPU (same as --strategy=tpu; auto-detected by default).",
    )
    d.DEFINE_string("tpu_name", None, "TPU name or grpc address.")
    d.DEFINE_string("tpu_zone", None, "TPU zone.")
    d.DEFINE_string("gcp_project", None, "GCP project of the TPU.")
    d.DEFINE_enum(
        "optimizer", "lars", list(OPTIMIZERS), "Optimizer for training."
    )
    d.DEFINE_float("momentum", 0.9, "Momentum of lars and momentum.")
    d.DEFINE_string(
        "eval_name", None, "Accepted for GR's command lines; no effect."
    )
    d.DEFINE_integer("keep_checkpoint_max", 5, "Checkpoints to keep.")
    d.DEFINE_integer("keep_hub_module_max", 1, "SavedModel exports to keep.")
    d.DEFINE_float("temperature", 0.1, "NT-Xent temperature.")
    d.DEFINE_bool("hidden_norm", True, "L2-normalise projections.")
    d.DEFINE_enum(
        "proj_head_mode",
        "nonlinear",
        ["none", "linear", "nonlinear"],
        "Projection head type.",
    )
    d.DEFINE_integer("proj_out_dim", 128, "Projection output width.")
    d.DEFINE_integer(
        "num_proj_layers", 3, "Projection head layers (2 = v1, 3 = v2)."
    )
    d.DEFINE_integer(
        "ft_proj_selector",
        0,
        "Head layer the linear head reads (0 = encoder output).",
    )
    d.DEFINE_bool("global_bn", True, "Synchronise BN across replicas.")
    d.DEFINE_float(
        "width_multiplier", 1.0, "ResNet width multiplier (0.25 allowed)."
    )
    d.DEFINE_integer("resnet_depth", 50, "ResNet depth.")
    d.DEFINE_float("sk_ratio", 0.0, "Selective kernel ratio (0 = off).")
    d.DEFINE_float("se_ratio", 0.0, "Squeeze-excitation ratio (0 = off).")
    d.DEFINE_integer("image_size", 224, "Input image side in pixels.")
    d.DEFINE_float("color_jitter_strength", 1.0, "Colour jitter strength s.")
    d.DEFINE_bool("use_blur", True, "Gaussian blur in pretraining views.")
    # Not a flag of GR's tf2/run.py, but its README's ImageNet command
    # passes it (a tf1/ flag); accepted so that command runs.
    d.DEFINE_integer(
        "train_summary_steps",
        None,
        "Accepted for GR's README command lines; no effect (summaries are "
        "written every --steps_per_loop steps).",
    )


# GR's flags that are accepted and do nothing here, and why; a run that
# sets one logs the note (config/loading.py).
NO_EFFECT_FLAGS = {
    "eval_name": (
        "google-research/simclr defines it but never reads it; result "
        "files are named by step"
    ),
    "train_summary_steps": (
        "a flag of google-research/simclr's tf1/ code; TensorBoard scalars "
        "are written every --steps_per_loop steps"
    ),
}


def define_extension_flags() -> None:
    """simclr_tf's own flags (README.md lists them)."""
    d = flags
    d.DEFINE_enum("strategy", "auto", list(STRATEGIES), "Distribution.")
    d.DEFINE_float(
        "crop_min_area",
        0.08,
        "Least random-crop area as a fraction of the image (paper 0.08).",
    )
    d.DEFINE_integer(
        "num_virtual_cpus",
        0,
        "Split the CPU into N logical devices (MirroredStrategy over them).",
    )
    d.DEFINE_enum(
        "precision",
        "auto",
        list(PRECISIONS),
        "Compute precision; auto = the measured fastest for the device.",
    )
    d.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
    d.DEFINE_integer(
        "steps_per_loop",
        100,
        "Steps per tf.function call; one console line per loop.",
    )
    d.DEFINE_float(
        "time_budget_minutes",
        0.0,
        "Wall-time budget of the training loop; the schedule is cut to the "
        "steps that fit at the step time measured in the first loop (one "
        "host). 0: train the full --train_steps / --train_epochs.",
    )
    d.DEFINE_integer("seed", None, "Seed for weights, data and views.")
    d.DEFINE_enum(
        "brightness_impl",
        "v2",
        ["v1", "v2"],
        "v2: multiplicative brightness (GR default); v1: additive.",
    )
    d.DEFINE_bool(
        "export_keras", True, "Also write saved_model/<step>/model.keras."
    )
    d.DEFINE_bool(
        "export_tflite",
        False,
        "Also write saved_model/<step>/model.tflite (float32 encoder).",
    )
    d.DEFINE_bool(
        "verify_images",
        True,
        "--dataset=folder: decode every image once when opening, to count "
        "unreadable files (off: they are skipped uncounted while training).",
    )
    d.DEFINE_bool(
        "augment_on_device",
        False,
        "Colour jitter, grayscale and blur in the train step instead of "
        "tf.data (for hosts that cannot keep up).",
    )
    d.DEFINE_bool(
        "cifar_stem",
        None,
        "3x3/1 stem without max-pool; default: image_size <= 32.",
    )
    d.DEFINE_integer(
        "linear_eval_epochs",
        30,
        "Epochs of the offline linear classifier on frozen features (0: "
        "none; with --noeval_knn, eval reads only --eval_split).",
    )
    d.DEFINE_bool(
        "eval_baselines",
        True,
        "Also linear-evaluate raw pixels and the random-init encoder.",
    )
    d.DEFINE_bool(
        "eval_knn",
        True,
        "Also report kNN accuracy (cosine, --knn_k neighbours, votes "
        "exp(sim / --knn_temperature)) in evaluation.",
    )
    d.DEFINE_integer("knn_k", 200, "Neighbours in kNN evaluation.")
    d.DEFINE_float("knn_temperature", 0.1, "Vote temperature of kNN.")
    d.DEFINE_integer(
        "knn_every_steps",
        0,
        "kNN monitor during pretraining every N steps, to TensorBoard "
        "(0 = off).",
    )
    d.DEFINE_integer(
        "knn_max_train_examples",
        10_000,
        "Training examples in the kNN monitor's memory bank (0 = all).",
    )
    d.DEFINE_integer(
        "baseline_max_train_examples",
        100_000,
        "The random-init and raw-pixel baselines train on at most this many "
        "training images (the first ones; 0 = all); result.json says so.",
    )
    d.DEFINE_float(
        "device_memory_gb",
        0.0,
        "Memory of one replica in GB for the memory plan (0 = found from "
        "the device: TPU generation, GPU name, host RAM for CPUs).",
    )
    d.DEFINE_float(
        "host_memory_gb",
        0.0,
        "RAM of one host in GB for the memory plan (0 = this machine's).",
    )
    d.DEFINE_integer(
        "max_eval_examples",
        0,
        "Cap on examples per split in offline evaluation (0 = all).",
    )
    define_transfer_flags()


def define_transfer_flags() -> None:
    """Flags of fine-tuning, label fractions, distillation and reports."""
    d = flags
    d.DEFINE_float(
        "label_fraction",
        1.0,
        "Train the supervised modes on this class-balanced fraction of "
        "--train_split's labels (deterministic by --seed), e.g. 0.01.",
    )
    d.DEFINE_string(
        "teacher",
        None,
        "--train_mode=distill: the teacher, a SavedModel export, a "
        "model_dir or a checkpoint of a model with a supervised head.",
    )
    d.DEFINE_float(
        "distill_temperature", 1.0, "Softmax temperature of distillation."
    )
    d.DEFINE_float(
        "distill_label_weight",
        0.0,
        "Weight of the labelled cross-entropy mixed into distillation "
        "(0 = teacher only, as in SimCLRv2).",
    )
    d.DEFINE_bool(
        "eval_reports",
        True,
        "Write per-class metrics, confusion matrix, t-SNE map, retrieval "
        "grid and TensorBoard projector after evaluation.",
    )
    d.DEFINE_integer(
        "eval_timeout_secs",
        3600,
        "--mode=eval: stop waiting for a new checkpoint after this long "
        "(0: evaluate the latest checkpoint only, then stop).",
    )
