"""Creates a TPU VM or pod slice: `python tpu/create.py --name=... --dry_run`.

Prints the gcloud command, then runs it unless --dry_run. Example:
  python tpu/create.py --name=simclr-v4 --zone=us-central2-b \
      --accelerator_type=v4-32 --spot --dry_run
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tpu import gcloud  # noqa: E402


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """Parses this script's flags (see --help)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gcloud.add_common_arguments(parser)
    parser.add_argument(
        "--accelerator_type",
        required=True,
        help="e.g. v4-8, v4-32, v5litepod-16, v6e-8.",
    )
    parser.add_argument(
        "--version",
        help="TPU software version (image); default by generation: "
        + ", ".join(f"{g} {v}" for g, v in gcloud.RUNTIME_IMAGES.items())
        + ".",
    )
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="Spot TPU VM.")
    kind.add_argument("--preemptible", action="store_true", help="Legacy.")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Builds and prints (and unless --dry_run runs) the create command."""
    arguments = parse_arguments(argv)
    try:
        command = gcloud.create_command(
            arguments.name,
            arguments.zone,
            arguments.accelerator_type,
            version=arguments.version,
            project=arguments.project,
            spot=arguments.spot,
            preemptible=arguments.preemptible,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return gcloud.run_commands([command], arguments.dry_run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
