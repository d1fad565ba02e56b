"""Builds the gcloud argv lists that create, set up, run and delete TPU VMs.

Every builder is a pure function returning list[str] (or a list of them);
only `run_commands` executes anything. Nothing here imports TensorFlow or
simclr_tf, so the scripts in tpu/ start fast on a laptop.
"""

from __future__ import annotations

import argparse
import functools
import re
import shlex
import subprocess
from collections.abc import Callable, Sequence

from tpu import remote

# The TPU software version (image) Google documents per generation for
# installing a framework yourself (cloud.google.com/tpu/docs/runtimes): Ubuntu
# 22.04 with Python 3.10 and no TensorFlow. simclr_tf needs TensorFlow 2.20,
# and no tpu-vm-tf-* image carries it, so install.py puts tensorflow-tpu 2.20
# from PyPI on every host, and on a pod slice launch.py starts the
# TensorFlow TPU server on each host that tpu-vm-tf-*-pod images would run
# (tpu/remote.py).
RUNTIME_IMAGES = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
COPIED_PATHS = (
    "simclr_tf",
    "flags",
    "setup.py",
    "requirements.txt",
    "requirements-compat.txt",
)
GENERATIONS = tuple(RUNTIME_IMAGES)
# What the count in an accelerator type counts, 8 of them per host:
# TensorCores on v2/v3/v4/v5p, chips on v5litepod and v6e.
CORES_PER_HOST = 8
# v5e and v6e slices of more than 8 chips are made of 4-chip VMs (Cloud TPU
# docs, v5e "VM types" and v6e "Supported configurations": v6e-16 is 4 VMs,
# v6e-256 64); one VM holds up to 8 (v5litepod-8, v6e-8).
CHIPS_PER_POD_VM = {"v5litepod": 4, "v6e": 4}
_ACCELERATOR = re.compile(rf"^({'|'.join(GENERATIONS)})-([1-9][0-9]*)$")
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ZONE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
_BASE = ("gcloud", "compute", "tpus", "tpu-vm")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--name, --zone, --project and --dry_run, which every script takes."""
    parser.add_argument("--name", required=True, help="TPU name.")
    parser.add_argument("--zone", required=True, help="e.g. europe-west4-a.")
    parser.add_argument("--project", help="GCP project (default: gcloud's).")
    parser.add_argument(
        "--dry_run", action="store_true", help="Print, run nothing."
    )


def validate_name(name: str) -> str:
    """Checks a TPU name: lowercase letters, digits, '-', 1-63 characters."""
    if not name or not _NAME.match(name):
        raise ValueError(
            f"--name={name!r} is not a valid TPU name: use 1-63 lowercase "
            "letters, digits or '-', starting with a letter, e.g. simclr-v3."
        )
    return name


def validate_zone(zone: str | None) -> str:
    """Checks that a zone like europe-west4-a is given."""
    if not zone or not _ZONE.match(zone):
        raise ValueError(
            f"--zone={zone!r} must be a Compute Engine zone such as "
            "europe-west4-a or us-central2-b (see `gcloud compute tpus "
            "locations list`)."
        )
    return zone


def parse_accelerator_type(accelerator_type: str) -> tuple[str, int]:
    """Splits e.g. "v4-32" into ("v4", 32) after checking its form.

    Raises:
      ValueError: not GENERATION-COUNT, or a multi-host count that does not
        fill whole hosts of 8.
    """
    match = _ACCELERATOR.match(accelerator_type or "")
    if match is None:
        raise ValueError(
            f"--accelerator_type={accelerator_type!r} must look like v4-8, "
            f"v5litepod-16 or v6e-8 (generation one of {GENERATIONS})."
        )
    count = int(match.group(2))
    if count > CORES_PER_HOST and count % CORES_PER_HOST:
        raise ValueError(
            f"--accelerator_type={accelerator_type!r}: a multi-host slice "
            f"has a multiple of {CORES_PER_HOST} cores; use e.g. "
            f"{match.group(1)}-{count - count % CORES_PER_HOST}."
        )
    return match.group(1), count


def num_hosts(accelerator_type: str) -> int:
    """Number of TPU VMs (gcloud's workers) of a slice: v3-8 1, v3-128 16,
    v4-32 4, v5litepod-8 1, v5litepod-16 4, v6e-256 64."""
    generation, count = parse_accelerator_type(accelerator_type)
    if count <= CORES_PER_HOST:
        return 1
    return count // CHIPS_PER_POD_VM.get(generation, CORES_PER_HOST)


def default_version(accelerator_type: str) -> str:
    """The TPU software version for a generation: v4-32 tpu-ubuntu2204-base,
    v5litepod-16 v2-alpha-tpuv5-lite, v6e-8 v2-alpha-tpuv6e; one host or
    a pod slice alike."""
    generation, _ = parse_accelerator_type(accelerator_type)
    return RUNTIME_IMAGES[generation]


def _tpu_vm(
    verb: str, operands: list[str], zone: str, project: str | None, *flags: str
) -> list[str]:
    """gcloud compute tpus tpu-vm VERB OPERANDS --zone [--project] FLAGS."""
    location = [f"--zone={validate_zone(zone)}"]
    location += [f"--project={project}"] if project else []
    return [*_BASE, verb, *operands, *location, *flags]


def create_command(
    name: str,
    zone: str,
    accelerator_type: str,
    version: str | None = None,
    project: str | None = None,
    spot: bool = False,
    preemptible: bool = False,
) -> list[str]:
    """`gcloud compute tpus tpu-vm create` for a TPU VM or pod slice.

    Args:
      name: TPU name. zone: e.g. europe-west4-a.
      accelerator_type: e.g. v3-8, v4-32, v5litepod-16.
      version: runtime image; None for `default_version(accelerator_type)`.
      project: GCP project; None for gcloud's configured project.
      spot: Spot VM (cheaper, preemptible at any time, SIGTERM first).
      preemptible: legacy preemptible VM (at most 24 h); not with spot.
    """
    if spot and preemptible:
        raise ValueError(
            "--spot and --preemptible are exclusive; pass one (spot is the "
            "newer kind, without the 24-hour limit)."
        )
    parse_accelerator_type(accelerator_type)
    kind = ["--spot"] if spot else ["--preemptible"] if preemptible else []
    version = version or default_version(accelerator_type)
    return _tpu_vm(
        "create",
        [validate_name(name)],
        zone,
        project,
        f"--accelerator-type={accelerator_type}",
        f"--version={version}",
        *kind,
    )


def ssh_command(
    name: str, zone: str, command: str, worker: str, project: str | None = None
) -> list[str]:
    """`gcloud compute tpus tpu-vm ssh` running a shell command on workers.

    Args:
      worker: "all" or a worker index such as "0".
    """
    if worker != "all" and not worker.isdigit():
        raise ValueError(f"worker={worker!r} must be 'all' or an index ≥ 0.")
    return _tpu_vm(
        "ssh",
        [validate_name(name)],
        zone,
        project,
        f"--worker={worker}",
        f"--command={command}",
    )


def install_commands(
    name: str,
    zone: str,
    project: str | None = None,
    git_url: str | None = None,
    git_ref: str = "main",
    local_dir: str | None = None,
    remote_dir: str = "simclr_tf",
    requirements: str = remote.DEFAULT_REQUIREMENTS,
    keep_tensorflow: bool = False,
) -> list[list[str]]:
    """Commands that put simclr_tf on every worker and pip-install it.

    Exactly one of git_url (cloned at git_ref) and local_dir (its
    COPIED_PATHS copied with `tpu-vm scp --recurse`, not .venv or
    runs/) is the source. remote_dir is relative to the home directory.
    """
    if bool(git_url) == bool(local_dir):
        raise ValueError(
            f"--git_url={git_url!r} and --local_dir={local_dir!r}: give "
            "exactly one (a git URL to clone, or a checkout to copy)."
        )
    script = remote.install_script(
        remote_dir, git_url, git_ref, requirements, keep_tensorflow
    )
    install = ssh_command(name, zone, script, "all", project)
    if git_url:
        return [install]
    fresh = f"rm -rf {shlex.quote(remote_dir)} && mkdir -p "
    sources = [f"{local_dir.rstrip('/')}/{item}" for item in COPIED_PATHS]
    destination = f"{name}:{remote_dir}/"
    copy = _tpu_vm(
        "scp",
        [*sources, destination],
        zone,
        project,
        "--worker=all",
        "--recurse",
    )
    mkdir = ssh_command(
        name, zone, fresh + shlex.quote(remote_dir), "all", project
    )
    return [mkdir, copy, install]


def launch_command(
    name: str,
    zone: str,
    train_args: Sequence[str],
    accelerator_type: str,
    project: str | None = None,
    remote_dir: str = "simclr_tf",
    log_file: str = "simclr_tf_logs/train.log",
) -> list[str]:
    """Starts training on worker 0, the one TensorFlow process of a slice.

    TPUStrategy is single-controller: on one host it uses the local TPU
    (--tpu_name=local); on a pod slice it resolves every host by the TPU's
    name (--tpu_name=NAME) and reaches their TPUs through the servers that
    `server_command` starts. Running it on every worker would start one
    independent run per host, all writing to the same model_dir.
    """
    multi_host = num_hosts(accelerator_type) > 1
    script = remote.training_script(
        train_args,
        name if multi_host else "local",
        remote_dir,
        log_file,
        multi_host,
    )
    return ssh_command(name, zone, script, "0", project)


def server_command(
    name: str, zone: str, project: str | None = None
) -> list[str]:
    """Starts the TensorFlow TPU server on every worker of a pod slice and
    returns once each one listens (remote.server_script)."""
    return ssh_command(name, zone, remote.server_script(), "all", project)


def collect_logs_commands(
    name: str,
    zone: str,
    num_workers: int,
    local_dir: str,
    project: str | None = None,
    log_dir: str = "simclr_tf_logs",
) -> list[list[str]]:
    """One `tpu-vm scp --worker=i` per worker: log_dir to local_dir/worker-i."""
    if num_workers < 1:
        raise ValueError(f"--num_workers={num_workers} must be ≥ 1.")
    if not local_dir:
        raise ValueError("--collect_logs_to is empty; give a local directory.")
    source = f"{validate_name(name)}:{log_dir}"
    return [
        _tpu_vm(
            "scp",
            [source, f"{local_dir.rstrip('/')}/worker-{worker}"],
            zone,
            project,
            f"--worker={worker}",
            "--recurse",
        )
        for worker in range(num_workers)
    ]


def delete_command(
    name: str, zone: str, project: str | None = None
) -> list[str]:
    """`gcloud compute tpus tpu-vm delete NAME --quiet` (no prompt)."""
    return _tpu_vm("delete", [validate_name(name)], zone, project, "--quiet")


def format_command(argv: Sequence[str]) -> str:
    """One shell-quoted line, ready to paste into a terminal."""
    return shlex.join(argv)


def run_commands(
    commands: Sequence[Sequence[str]],
    dry_run: bool,
    printer: Callable[[str], object] | None = None,
) -> int:
    """Prints each command and, unless dry_run, runs it (check=True).

    Returns:
      0, or the exit status of the first command that failed (the ones
      after it are not run).

    Raises:
      FileNotFoundError: gcloud is not installed.
    """
    printer = printer or functools.partial(print, flush=True)
    for argv in commands:
        printer(format_command(argv))
        if dry_run:
            continue
        try:
            subprocess.run(list(argv), check=True)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"{argv[0]} is not on PATH: install the Google Cloud CLI "
                "(https://cloud.google.com/sdk/docs/install), run `gcloud "
                "auth login`, or use --dry_run to only print the commands."
            ) from error
        except subprocess.CalledProcessError as error:
            printer(f"# failed with exit status {error.returncode}; stopped.")
            return error.returncode
    return 0
