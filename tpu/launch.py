"""Starts simclr_tf training on a TPU VM, or collects its logs.

Training arguments follow `--`; the run starts under nohup on worker 0 (the
one TensorFlow process of a slice) and logs to ~/simclr_tf_logs/train.log
there. On a pod slice, the TensorFlow TPU server is first started on every
worker. Prints the commands, then runs them unless --dry_run. Examples:
  python tpu/launch.py --name=my-pod --zone=us-central2-b \
      --accelerator_type=v4-32 --dry_run -- \
      --flagfile=flags/imagenet.cfg --model_dir=gs://b/r --data_dir=gs://b/tfds
  python tpu/launch.py --name=my-pod --zone=us-central2-b \
      --accelerator_type=v4-32 --collect_logs_to=logs/my-pod
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tpu import gcloud  # noqa: E402

LOG_FILE = "simclr_tf_logs/train.log"


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """Parses the flags before `--`; the rest becomes `train_args`."""
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gcloud.add_common_arguments(parser)
    parser.add_argument(
        "--accelerator_type",
        required=True,
        help="As given to create.py: one host uses --tpu_name=local, a pod "
        "slice --tpu_name=<name> with TPU_LOAD_LIBRARY=0.",
    )
    parser.add_argument(
        "--remote_dir", default="simclr_tf", help="As given to install.py."
    )
    parser.add_argument(
        "--collect_logs_to",
        help="Copy each worker's ~/simclr_tf_logs to DIR/worker-<i> instead "
        "of launching.",
    )
    parser.add_argument(
        "--num_workers",
        type=int,
        default=1,
        help="Workers to collect logs from (training logs on worker 0).",
    )
    arguments = parser.parse_args(argv[:split])
    arguments.train_args = argv[split + 1 :]
    if not arguments.train_args and not arguments.collect_logs_to:
        parser.error("give training arguments after `--`, or --collect_logs_to")
    return arguments


def build_commands(arguments: argparse.Namespace) -> list[list[str]]:
    """The launch command, or the log-collection commands."""
    if arguments.collect_logs_to:
        return gcloud.collect_logs_commands(
            arguments.name,
            arguments.zone,
            arguments.num_workers,
            arguments.collect_logs_to,
            project=arguments.project,
            log_dir=os.path.dirname(LOG_FILE),
        )
    launch = gcloud.launch_command(
        arguments.name,
        arguments.zone,
        arguments.train_args,
        arguments.accelerator_type,
        project=arguments.project,
        remote_dir=arguments.remote_dir,
        log_file=LOG_FILE,
    )
    if gcloud.num_hosts(arguments.accelerator_type) == 1:
        return [launch]
    server = gcloud.server_command(
        arguments.name, arguments.zone, project=arguments.project
    )
    return [server, launch]


def main(argv: list[str]) -> int:
    """Builds and prints (and unless --dry_run runs) the commands."""
    arguments = parse_arguments(argv)
    try:
        commands = build_commands(arguments)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if arguments.collect_logs_to and not arguments.dry_run:
        os.makedirs(arguments.collect_logs_to, exist_ok=True)
    return gcloud.run_commands(commands, arguments.dry_run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
