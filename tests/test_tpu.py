"""Tests of tpu/: the exact gcloud commands, their quoting, and the scripts.

No TPU or gcloud is used: commands are compared with argv written by hand
from the gcloud reference, remote scripts are run by a local bash with a
fake python3, and the scripts run with a fake gcloud that records calls.
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request

import pytest

from tpu import gcloud, remote

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZONE = "europe-west4-a"
TRICKY_ARGS = [
    "--flagfile=flags/imagenet.cfg",
    "--model_dir=gs://bucket/run with space",
    '--note=it\'s "quoted" $HOME `x` ; rm -rf /',
]


def _command_value(argv: list[str]) -> str:
    (flag,) = [a for a in argv if a.startswith("--command=")]
    return flag.removeprefix("--command=")


def _fake_program(directory, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_create_command_v4_8_exact_argv():
    argv = gcloud.create_command("simclr-v4", "us-central2-b", "v4-8")
    assert argv == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "simclr-v4",
        "--zone=us-central2-b", "--accelerator-type=v4-8",
        "--version=tpu-ubuntu2204-base",
    ]  # fmt: skip


def test_create_command_v4_32_spot_pod_exact_argv():
    argv = gcloud.create_command(
        "my-pod", "us-central2-b", "v4-32", project="my-project", spot=True
    )
    assert argv == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "my-pod",
        "--zone=us-central2-b", "--project=my-project",
        "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
        "--spot",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "accelerator_type, image",
    # Google's table of TPU software versions to install a framework on
    # (cloud.google.com/tpu/docs/runtimes): one host and pod slices alike.
    [("v3-128", "tpu-ubuntu2204-base"), ("v4-8", "tpu-ubuntu2204-base"),
     ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-8", "v2-alpha-tpuv5-lite"),
     ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"),
     ("v6e-8", "v2-alpha-tpuv6e"), ("v6e-64", "v2-alpha-tpuv6e")],
)  # fmt: skip
def test_create_picks_the_image_of_the_generation(accelerator_type, image):
    argv = gcloud.create_command("x", ZONE, accelerator_type)
    assert argv[-1] == f"--version={image}"
    chosen = gcloud.create_command("x", ZONE, accelerator_type, version="v")
    assert chosen[-1] == "--version=v"  # --version overrides it


@pytest.mark.parametrize(
    "accelerator_type, hosts",
    # VMs from the Cloud TPU docs: 8 TensorCores per VM on v2-v4 and v5p;
    # v5e and v6e up to 8 chips on one VM, larger slices of 4-chip VMs
    # (v6e's table: v6e-16 4 VMs, v6e-256 64).
    [("v3-8", 1), ("v3-128", 16), ("v4-8", 1), ("v4-32", 4),
     ("v5p-8", 1), ("v5p-16", 2), ("v5litepod-4", 1), ("v5litepod-8", 1),
     ("v5litepod-16", 4), ("v5litepod-256", 64), ("v6e-4", 1), ("v6e-8", 1),
     ("v6e-16", 4), ("v6e-256", 64)],
)  # fmt: skip
def test_num_hosts_matches_documented_topologies(accelerator_type, hosts):
    assert gcloud.num_hosts(accelerator_type) == hosts


@pytest.mark.parametrize("local", [False, True])
def test_install_commands_target_every_worker(local):
    source = {"local_dir": "."} if local else {"git_url": "https://x/r.git"}
    commands = gcloud.install_commands("simclr-v3", ZONE, **source)
    assert len(commands) == (3 if local else 1)
    assert all("--worker=all" in argv for argv in commands)
    install = _command_value(commands[-1])
    assert "pip install -r /tmp/simclr_tf_requirements.txt -e '.[tpu]'" in (
        install
    )
    if local:
        copied = [os.path.basename(path) for path in commands[1][5:-4]]
        assert "requirements-compat.txt" in copied


def _pinned(path: str) -> dict[str, str]:
    with open(path) as file:
        lines = [line.strip() for line in file if "==" in line]
    return dict(line.split("==") for line in lines)


def _filtered_requirements(tmp_path, keep_tensorflow: bool) -> str:
    """Runs the install script's grep step here; returns the file it wrote."""
    script = remote.install_script("repo", keep_tensorflow=keep_tensorflow)
    (grep,) = [step for step in script.split(" && ") if "grep" in step]
    output = str(tmp_path / "kept.txt")
    grep = grep.replace(remote.FILTERED_REQUIREMENTS, output)
    subprocess.run(["bash", "-c", grep], cwd=REPOSITORY, check=True)
    return output


@pytest.mark.parametrize(
    "keep_tensorflow, dropped",
    [
        (False, {"tensorflow-cpu"}),
        (True, {"tensorflow-cpu", "tensorboard", "numpy"}),
    ],
)
def test_install_script_drops_only_the_cpu_tensorflow_or_the_kept_packages(
    tmp_path, keep_tensorflow, dropped
):
    kept = _pinned(_filtered_requirements(tmp_path, keep_tensorflow))
    pinned = _pinned(os.path.join(REPOSITORY, remote.DEFAULT_REQUIREMENTS))
    assert set(kept) == set(pinned) - dropped
    assert {"keras", "tensorflow-datasets"} <= set(kept)


@pytest.mark.slow
@pytest.mark.compat
@pytest.mark.skipif(
    sys.version_info[:2] != (3, 10),
    reason="resolves for the TPU VMs' Python 3.10; .ci/compat runs it there",
)
def test_tpu_install_resolves_on_python_3_10_from_pypi(tmp_path):
    """pip resolves the workers' install command (dry run, from PyPI).

    With this Python 3.10, not `--python-version 3.10 --only-binary=:all:`:
    tensorflow-datasets needs `promise`, which PyPI has as a source
    distribution only.
    """
    unreachable = _pypi_unreachable()
    if unreachable:
        pytest.skip(f"PyPI is unreachable ({unreachable}); cannot resolve")
    requirements = _filtered_requirements(tmp_path, keep_tensorflow=False)
    script = remote.install_script("repo")
    (install,) = [
        step for step in script.split(" && ") if "-e '.[tpu]'" in step
    ]
    report = tmp_path / "report.json"
    dry_run = (
        f"{shlex.quote(sys.executable)} -m pip install --dry-run "
        f"--ignore-installed --quiet --report {report}"
    )
    install = install.replace("python3 -m pip install", dry_run)
    install = install.replace(remote.FILTERED_REQUIREMENTS, requirements)
    subprocess.run(["bash", "-c", install], cwd=REPOSITORY, check=True)
    with open(report) as file:
        resolved = {
            item["metadata"]["name"].lower().replace("_", "-"): item[
                "metadata"
            ]["version"]
            for item in json.load(file)["install"]
        }
    assert resolved["tensorflow-tpu"].startswith("2.20.")
    assert "libtpu" in resolved
    # The TPU build is the only TensorFlow: no CPU or GPU wheel beside it.
    assert "tensorflow" not in resolved and "tensorflow-cpu" not in resolved
    for name, version in _pinned(requirements).items():
        assert resolved[name.lower().replace("_", "-")] == version, name


def _setup_requirements() -> dict[str, list[str]]:
    """install_requires and each extra, read from setup.py's setup() call."""
    with open(os.path.join(REPOSITORY, "setup.py")) as file:
        tree = ast.parse(file.read())
    (call,) = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", "") == "setup"
    ]
    keywords = {k.arg: k.value for k in call.keywords}
    extras = ast.literal_eval(keywords["extras_require"])
    return {"": ast.literal_eval(keywords["install_requires"]), **extras}


def _pypi_unreachable() -> str:
    """Why PyPI cannot be reached from here, "" when it can."""
    try:
        urllib.request.urlopen(
            "https://pypi.org/simple/tensorflow-tpu/", timeout=15
        ).close()
    except OSError as error:
        return f"{type(error).__name__}: {error}"
    return ""


def _resolve_for_python_3_10(tmp_path, requirements: list[str], *options):
    """pip's dry-run resolution for Python 3.10 wheels: {name: version}."""
    report = tmp_path / "report.json"
    finished = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
         "--ignore-installed", "--target", str(tmp_path / "target"),
         "--python-version", "3.10", "--only-binary=:all:",
         "--report", str(report), *options, *requirements],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    with open(report) as file:
        items = json.load(file)["install"]
    return {
        item["metadata"]["name"].lower().replace("_", "-"): item["metadata"][
            "version"
        ]
        for item in items
    }


def test_tpu_extra_resolves_to_python_3_10_wheels_from_any_python(tmp_path):
    """`pip install --dry-run --python-version 3.10 --only-binary=:all:`
    resolves the TPU workers' install from this Python, in `make test`.

    The `[tpu]` extra and install_requires come from setup.py, the pins
    from the install script's filtered requirements-compat.txt. Only
    tensorflow-datasets is resolved apart (--no-deps): it depends on
    `promise`, which PyPI has as a source distribution only, and
    --python-version admits wheels only; .ci/compat resolves the whole
    chain on Python 3.10 (test_tpu_install_resolves_on_python_3_10_from_pypi).
    """
    unreachable = _pypi_unreachable()
    if unreachable:
        pytest.skip(f"PyPI is unreachable ({unreachable}); cannot resolve")
    pins = _pinned(_filtered_requirements(tmp_path, keep_tensorflow=False))
    setup = _setup_requirements()
    assert setup["tpu"] == ["tensorflow-tpu>=2.20,<2.21"]
    wheels_only = [
        r
        for r in setup[""] + setup["tpu"]
        + [f"{name}=={version}" for name, version in pins.items()]
        if not r.startswith("tensorflow-datasets")
    ]  # fmt: skip
    resolved = _resolve_for_python_3_10(tmp_path, wheels_only)
    assert resolved["tensorflow-tpu"].startswith("2.20.")
    assert "libtpu" in resolved
    # The TPU build is the only TensorFlow: no CPU or GPU wheel beside it.
    assert "tensorflow" not in resolved and "tensorflow-cpu" not in resolved
    for name, version in pins.items():
        if name != "tensorflow-datasets":
            assert resolved[name.lower().replace("_", "-")] == version, name
    datasets = f"tensorflow-datasets=={pins['tensorflow-datasets']}"
    alone = _resolve_for_python_3_10(tmp_path, [datasets], "--no-deps")
    assert alone == {"tensorflow-datasets": pins["tensorflow-datasets"]}


def test_launch_command_runs_once_on_worker_zero():
    argv = gcloud.launch_command("my-pod", ZONE, TRICKY_ARGS, "v3-128")
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"]
    assert "--worker=0" in argv and "--worker=all" not in argv


def test_launch_command_pastes_back_to_the_same_argv():
    argv = gcloud.launch_command("my-pod", ZONE, TRICKY_ARGS, "v3-128")
    assert shlex.split(gcloud.format_command(argv)) == argv


@pytest.mark.parametrize(
    "accelerator_type, tpu_name, library",
    [("v3-8", "local", ""), ("v3-128", "my-pod", "0")],
)
def test_training_script_reaches_python_unchanged(
    tmp_path, accelerator_type, tpu_name, library
):
    """Runs the remote script in bash with a fake python3 that records argv."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "simclr_tf").mkdir()
    _fake_program(
        tmp_path / "bin",
        "python3",
        'printf "%s\\n" "$@" > "$HOME/argv.txt"\n'
        'echo "library=$TPU_LOAD_LIBRARY"\n',
    )
    argv = gcloud.launch_command("my-pod", ZONE, TRICKY_ARGS, accelerator_type)
    environment = {
        "HOME": str(tmp_path),
        "PATH": f"{tmp_path}/bin:/bin:/usr/bin",
    }
    subprocess.run(
        ["bash", "-c", _command_value(argv) + " wait"],
        env=environment,
        cwd=tmp_path,
        check=True,
        timeout=10,
    )
    received = (tmp_path / "argv.txt").read_text().splitlines()
    expected = ["-m", "simclr_tf", *TRICKY_ARGS, f"--tpu_name={tpu_name}"]
    assert received == expected
    log = tmp_path / "simclr_tf_logs" / "train.log"
    assert log.read_text() == f"library={library}\n"


def test_training_script_keeps_a_given_tpu_name():
    script = remote.training_script(["--tpu_name=other"], tpu_name="local")
    assert "--tpu_name=other" in script and "--tpu_name=local" not in script


def test_collect_logs_commands_one_scp_per_worker():
    commands = gcloud.collect_logs_commands("my-pod", ZONE, 3, "logs")
    workers = [a for argv in commands for a in argv if a.startswith("--worker")]
    assert workers == ["--worker=0", "--worker=1", "--worker=2"]
    assert [argv[4:7] for argv in commands] == [
        ["scp", "my-pod:simclr_tf_logs", f"logs/worker-{i}"] for i in range(3)
    ]


@pytest.mark.parametrize(
    "build, argument",
    [
        (
            lambda: gcloud.create_command("x", ZONE, "v3_8"),
            "--accelerator_type",
        ),
        (
            lambda: gcloud.create_command("x", ZONE, "tpu-8"),
            "--accelerator_type",
        ),
        (
            lambda: gcloud.create_command("x", ZONE, "v4-12"),
            "--accelerator_type",
        ),
        (lambda: gcloud.create_command("", ZONE, "v3-8"), "--name"),
        (lambda: gcloud.create_command("x", None, "v3-8"), "--zone"),
        (lambda: gcloud.delete_command("x", ""), "--zone"),
        (
            lambda: gcloud.create_command(
                "x", ZONE, "v3-8", spot=True, preemptible=True
            ),
            "--spot",
        ),
        (lambda: gcloud.install_commands("x", ZONE), "--git_url"),
        (
            lambda: gcloud.collect_logs_commands("x", ZONE, 0, "d"),
            "--num_workers",
        ),
    ],
)
def test_invalid_inputs_raise_value_error_naming_the_argument(build, argument):
    with pytest.raises(ValueError, match=argument):
        build()


def _run_script(tmp_path, script: str, *arguments: str):
    """Runs tpu/<script> with only a fake, recording gcloud on PATH."""
    _fake_program(tmp_path, "gcloud", f'echo "$@" >> "{tmp_path}/called"\n')
    return subprocess.run(
        [sys.executable, os.path.join("tpu", script), *arguments],
        env={"PATH": str(tmp_path)},
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    "script, arguments, verb",
    [
        ("create.py", ["--accelerator_type=v4-32", "--spot"], "create"),
        ("install.py", ["--local_dir=."], "scp"),
        ("launch.py", ["--accelerator_type=v3-8", "--", "--a=b c"], "ssh"),
        ("delete.py", [], "delete"),
    ],
)
def test_script_dry_run_prints_and_runs_nothing(
    tmp_path, script, arguments, verb
):
    finished = _run_script(
        tmp_path, script, "--name=my-pod", f"--zone={ZONE}", "--dry_run",
        *arguments,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    assert f"gcloud compute tpus tpu-vm {verb} " in finished.stdout
    assert not (tmp_path / "called").exists()


def test_script_without_dry_run_runs_the_printed_command(tmp_path):
    finished = _run_script(tmp_path, "delete.py", "--name=x", f"--zone={ZONE}")
    assert finished.returncode == 0, finished.stderr
    printed = shlex.split(finished.stdout.strip())
    deadline = time.monotonic() + 5  # the fake gcloud has exited already
    while not (tmp_path / "called").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "called").read_text().split() == printed[1:]


def _listener(directory, port: int) -> None:
    """A fake python3 that records its arguments and listens on `port`
    (what the TensorFlow server would do), writing its process id."""
    code = (
        "import os, socket, time; s = socket.socket(); "
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        f"s.bind(('localhost', {port})); s.listen(); "
        f"open('{directory}/pid', 'w').write(str(os.getpid())); "
        "time.sleep(60)"
    )
    _fake_program(
        directory,
        "python3",
        f'printf "%s\\n" "$@" >> "{directory}/argv.txt"\n'
        f"exec {shlex.quote(sys.executable)} -c {shlex.quote(code)}\n",
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _run_server_script(tmp_path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", remote.server_script(**kwargs)],
        env={"HOME": str(tmp_path), "PATH": f"{tmp_path}:/bin:/usr/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_server_script_starts_the_server_and_waits_until_it_listens(
    tmp_path,
):
    port = _free_port()
    _listener(tmp_path, port)
    try:
        finished = _run_server_script(tmp_path, port=port, wait_seconds=30)
        assert finished.returncode == 0, finished.stderr
        argv = (tmp_path / "argv.txt").read_text().splitlines()
        assert argv[0] == "-c" and f"localhost:{port}" in argv[1]
        # Once one listens, running the script again starts no second one.
        again = _run_server_script(tmp_path, port=port, wait_seconds=5)
        assert again.returncode == 0, again.stderr
        assert (tmp_path / "argv.txt").read_text().splitlines() == argv
    finally:
        if (tmp_path / "pid").exists():
            os.kill(int((tmp_path / "pid").read_text()), signal.SIGTERM)


def test_server_script_fails_naming_the_log_when_nothing_listens(tmp_path):
    _fake_program(tmp_path, "python3", "exit 1\n")
    finished = _run_server_script(tmp_path, port=_free_port(), wait_seconds=2)
    assert finished.returncode == 1
    assert "see ~/simclr_tf_logs/tpu_server.log" in finished.stderr


@pytest.mark.parametrize(
    "accelerator_type, hosts",
    [("v4-8", 1), ("v4-32", 4), ("v6e-8", 1), ("v6e-16", 4)],
)
def test_launch_starts_servers_on_every_worker_of_a_pod_first(
    tmp_path, accelerator_type, hosts
):
    finished = _run_script(
        tmp_path, "launch.py", "--name=my-pod", f"--zone={ZONE}",
        f"--accelerator_type={accelerator_type}", "--dry_run", "--", "--a=b",
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    commands = [shlex.split(line) for line in finished.stdout.splitlines()]
    workers = [a for argv in commands for a in argv if a.startswith("--wor")]
    if hosts == 1:
        assert workers == ["--worker=0"]
    else:
        assert workers == ["--worker=all", "--worker=0"]
        assert _command_value(commands[0]) == remote.server_script()
    training = _command_value(commands[-1])
    assert ("TPU_LOAD_LIBRARY=0" in training) == (hosts > 1)
    name = "local" if hosts == 1 else "my-pod"
    assert f"--tpu_name={name}" in training
