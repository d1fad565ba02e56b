"""Deletes a TPU VM or pod slice without prompting: `python tpu/delete.py`.

Prints the gcloud command, then runs it unless --dry_run. Checkpoints and
TensorBoard files on gs:// are kept. Example:
  python tpu/delete.py --name=simclr-v3 --zone=europe-west4-a --dry_run
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
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Builds and prints (and unless --dry_run runs) the delete command."""
    arguments = parse_arguments(argv)
    try:
        command = gcloud.delete_command(
            arguments.name, arguments.zone, project=arguments.project
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return gcloud.run_commands([command], arguments.dry_run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
