"""Installs simclr_tf on every worker of a TPU VM: `python tpu/install.py`.

From a git URL and ref (cloned on each worker) or from this checkout
(copied with `gcloud compute tpus tpu-vm scp`). Prints the commands, then
runs them unless --dry_run. Example:
  python tpu/install.py --name=simclr-v3 --zone=europe-west4-a \
      --local_dir=. --dry_run
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tpu import gcloud, remote  # noqa: E402


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """Parses this script's flags (see --help)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gcloud.add_common_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--git_url", help="Repository to clone.")
    source.add_argument("--local_dir", help="Checkout to copy, e.g. '.'.")
    parser.add_argument("--git_ref", default="main", help="Branch/commit.")
    parser.add_argument(
        "--remote_dir",
        default="simclr_tf",
        help="Install directory on the workers, relative to the home dir.",
    )
    parser.add_argument(
        "--requirements",
        default=remote.DEFAULT_REQUIREMENTS,
        help="Pinned requirements file in the repository, for the workers' "
        "Python 3.10 ('' to skip); its tensorflow-cpu line is dropped.",
    )
    parser.add_argument(
        "--keep_tensorflow",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Keep the image's TensorFlow (2.20 or newer) and its NumPy and "
        "TensorBoard: skip their pins, install simclr_tf with --no-deps. "
        "Default: install tensorflow-tpu 2.20 (simclr_tf's [tpu] extra).",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Builds and prints (and unless --dry_run runs) the install commands."""
    arguments = parse_arguments(argv)
    try:
        commands = gcloud.install_commands(
            arguments.name,
            arguments.zone,
            project=arguments.project,
            git_url=arguments.git_url,
            git_ref=arguments.git_ref,
            local_dir=arguments.local_dir,
            remote_dir=arguments.remote_dir,
            requirements=arguments.requirements,
            keep_tensorflow=arguments.keep_tensorflow,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return gcloud.run_commands(commands, arguments.dry_run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
