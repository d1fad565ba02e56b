"""Shell scripts that run on the TPU VM workers: install and start training.

Pure string builders; tpu/gcloud.py wraps them in `tpu-vm ssh --command`.
Every value from the user is quoted with shlex, so paths and training
arguments with spaces or quotes reach the worker unchanged.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

# TPU VM images run Python 3.10, on which requirements.txt's exact versions
# (Keras 3.15, ...) do not install; requirements-compat.txt pins the stack
# that .ci/compat tests on Python 3.10. Its CPU TensorFlow gives way to the
# [tpu] extra: tensorflow-tpu 2.20 (the newest TPU build) and the libtpu it
# requires, both from PyPI.
DEFAULT_REQUIREMENTS = "requirements-compat.txt"
CPU_TENSORFLOW = ("tensorflow-cpu", "tensorflow")
# keep_tensorflow also keeps what is compiled against the image's TensorFlow.
KEPT_PACKAGES = (*CPU_TENSORFLOW, "tensorboard", "numpy")
FILTERED_REQUIREMENTS = "/tmp/simclr_tf_requirements.txt"


def install_script(
    remote_dir: str,
    git_url: str | None = None,
    git_ref: str = "main",
    requirements: str = DEFAULT_REQUIREMENTS,
    keep_tensorflow: bool = False,
) -> str:
    """The shell script that fetches (git) and pip-installs simclr_tf.

    By default the pinned requirements, less their CPU TensorFlow, are
    installed together with simclr_tf's [tpu] extra in one pip resolve.
    With keep_tensorflow the image's TensorFlow (which must be 2.20 or
    newer), TensorBoard and NumPy are left alone: their lines are dropped
    too and simclr_tf is installed with --no-deps. An empty `requirements`
    skips installing requirements.
    """
    directory = shlex.quote(remote_dir)
    steps = []
    if git_url:
        steps += [
            f"rm -rf {directory}",
            f"git clone {shlex.quote(git_url)} {directory}",
            f"git -C {directory} checkout {shlex.quote(git_ref)}",
        ]
    steps.append(f"cd {directory}")
    pip = "python3 -m pip install"
    project = "--no-deps -e ." if keep_tensorflow else "-e '.[tpu]'"
    if requirements:
        dropped = "|".join(KEPT_PACKAGES if keep_tensorflow else CPU_TENSORFLOW)
        steps.append(
            f"grep -v -E {shlex.quote(f'^({dropped})==')} "
            f"{shlex.quote(requirements)} > {FILTERED_REQUIREMENTS}"
        )
        if keep_tensorflow:
            steps.append(f"{pip} -r {FILTERED_REQUIREMENTS}")
        else:
            project = f"-r {FILTERED_REQUIREMENTS} {project}"
    steps.append(f"{pip} {project}")
    check = "import tensorflow as tf, simclr_tf; print(tf.__version__)"
    steps.append(f"python3 -c {shlex.quote(check)}")
    return " && ".join(steps)


def training_script(
    train_args: Sequence[str],
    tpu_name: str,
    remote_dir: str = "simclr_tf",
    log_file: str = "simclr_tf_logs/train.log",
    multi_host: bool = False,
) -> str:
    """Shell script starting `python3 -m simclr_tf ARGS` under nohup.

    Adds --tpu_name=<tpu_name> unless train_args name one; on a multi-host
    slice sets TPU_LOAD_LIBRARY=0 so this process drives every host's TPU
    through the TensorFlow servers instead of claiming the local chips.
    Output goes to log_file (relative to the home directory) on the worker.
    """
    arguments = list(train_args)
    if not any(a.startswith("--tpu_name") for a in arguments):
        arguments.append(f"--tpu_name={tpu_name}")
    environment = "TPU_LOAD_LIBRARY=0 " if multi_host else ""
    log = '"$HOME"/' + shlex.quote(log_file)
    log_dir = '"$HOME"/' + shlex.quote(log_file.rpartition("/")[0] or ".")
    command = shlex.join(["python3", "-m", "simclr_tf", *arguments])
    return (
        f"mkdir -p {log_dir} && cd {shlex.quote(remote_dir)} && "
        f"{environment}nohup {command} > {log} 2>&1 < /dev/null &"
    )
