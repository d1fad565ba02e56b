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


# What tpu-vm-tf-*-pod images run on every host as the tpu-runtime service,
# after tensorflow/tpu's tools/grpc_tpu_worker: a TensorFlow gRPC server
# owning the host's TPU chips, which TPUStrategy on worker 0 drives.
TPU_SERVER_PORT = 8470
_SERVER_CODE = (
    "import tensorflow as tf; "
    "tf.distribute.Server(tf.train.ClusterSpec("
    '{{"tpu_worker": ["localhost:{port}"]}}), job_name="tpu_worker", '
    'task_index=0, protocol="grpc").join()'
)


def server_script(
    port: int = TPU_SERVER_PORT,
    log_file: str = "simclr_tf_logs/tpu_server.log",
    wait_seconds: int = 180,
) -> str:
    """Bash script starting this host's TensorFlow TPU server, if none
    listens on `port` yet, and returning once one does (exit 1 after
    `wait_seconds`, naming the log). Run on every worker of a pod slice
    before the training process starts on worker 0."""
    listening = f"(echo > /dev/tcp/localhost/{port}) 2>/dev/null"
    log = '"$HOME"/' + shlex.quote(log_file)
    log_dir = '"$HOME"/' + shlex.quote(log_file.rpartition("/")[0] or ".")
    code = shlex.quote(_SERVER_CODE.format(port=port))
    start = f"nohup python3 -c {code} > {log} 2>&1 < /dev/null"
    return (
        f"mkdir -p {log_dir}; {listening} || {{ {start} & }}; "
        f"for _ in $(seq {max(1, wait_seconds)}); do "
        f"{listening} && exit 0; sleep 1; done; "
        f'echo "no TensorFlow TPU server on port {port} after '
        f'{wait_seconds} s; see ~/{log_file}" >&2; exit 1'
    )
