"""Tests for simclr_tf.hardware on faked machines (a root directory holding
the dev/, sys/ and proc/ entries each kind of machine has)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from simclr_tf import hardware

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _machine(root, files=(), pci=()) -> str:
    """Creates the given files (empty) and PCI devices under root.

    Args:
        root: a pathlib.Path.
        files: paths relative to root, e.g. "dev/accel0".
        pci: (vendor, device, subsystem_device) id strings, one per device.
    """
    for relative in files:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    for index, (vendor, device, subsystem) in enumerate(pci):
        directory = root / "sys/bus/pci/devices" / f"0000:00:{index + 4:02x}.0"
        directory.mkdir(parents=True)
        (directory / "vendor").write_text(vendor + "\n")
        (directory / "device").write_text(device + "\n")
        (directory / "subsystem_device").write_text(subsystem + "\n")
    return str(root)


def _chips(device: str, count: int = 4, subsystem: str = "0x0000"):
    return [("0x1ae0", device, subsystem)] * count


_ACCEL = [f"dev/accel{i}" for i in range(4)]
_VFIO = ["dev/vfio/vfio", *(f"dev/vfio/{i}" for i in range(4))]
_GVNIC = [("0x1ae0", "0x0042", "0x0058")]  # Google's NIC, on every GCE VM


@pytest.mark.parametrize(
    ("files", "pci", "generation", "evidence"),
    [
        (_ACCEL, _chips("0x0027", subsystem="0x004e"), "v2", "/dev/accel0-3"),
        (_ACCEL, _chips("0x0027", subsystem="0x004f"), "v3", "1ae0:0027"),
        (_ACCEL, _chips("0x005e") + _GVNIC, "v4", "4 PCI device(s)"),
        (_VFIO, _chips("0x0063") + _GVNIC, "v5e", "/dev/vfio/0-3"),
        (_VFIO, _chips("0x0062"), "v5p", "1ae0:0062"),
        (_VFIO, _chips("0x006f", count=8), "v6e", "8 PCI device(s)"),
        # No sysfs (e.g. a container): the device nodes tell the family.
        (_ACCEL[:1], [], "v2-v4", "/dev/accel0"),
    ],
    ids=["v2", "v3", "v4", "v5e", "v5p", "v6e", "accel-only"],
)
def test_tpu_vm_of_each_generation(tmp_path, files, pci, generation, evidence):
    root = _machine(tmp_path, files, pci)
    tpu = hardware.detect_tpu(root, {})
    assert tpu is not None
    assert tpu.generation == generation
    assert tpu.local
    assert evidence in tpu.describe()
    assert tpu.describe().startswith(f"TPU {generation} VM (")


def test_v5e_and_later_have_no_accel_devices(tmp_path):
    tpu = hardware.detect_tpu(_machine(tmp_path, _VFIO, _chips("0x0063")), {})
    assert not any("accel" in item for item in tpu.evidence)
    assert tpu.evidence == (
        "4 PCI device(s) " + ", ".join(["1ae0:0063"] * 4),
        "/dev/vfio/0-3",
    )


def test_tpu_accelerator_type_names_the_generation(tmp_path):
    # A container with the VFIO devices but no sysfs, as on GKE.
    root = _machine(tmp_path, _VFIO[:2])
    environ = {"TPU_ACCELERATOR_TYPE": "v5litepod-8", "TPU_WORKER_ID": "0"}
    tpu = hardware.detect_tpu(root, environ)
    assert tpu.generation == "v5e" and tpu.local
    assert "TPU_ACCELERATOR_TYPE=v5litepod-8" in tpu.evidence
    assert "TPU_WORKER_ID=0" in tpu.evidence
    for accelerator_type, generation in [
        ("v2-8", "v2"),
        ("v3-32", "v3"),
        ("v4-16", "v4"),
        ("v5p-8", "v5p"),
        ("v6e-256", "v6e"),
    ]:
        environ = {"TPU_ACCELERATOR_TYPE": accelerator_type}
        assert hardware.detect_tpu(root, environ).generation == generation


def test_vfio_device_on_a_gce_vm_is_a_tpu(tmp_path):
    root = _machine(tmp_path, [*_VFIO, "sys/class/dmi/id/product_name"])
    (tmp_path / "sys/class/dmi/id/product_name").write_text(
        "Google Compute Engine\n"
    )
    tpu = hardware.detect_tpu(root, {})
    assert tpu.generation == "v5e or later" and tpu.local


def test_vfio_device_alone_is_not_a_tpu(tmp_path):
    # Any passthrough device (a NIC for DPDK, a GPU for a guest) makes one.
    root = _machine(tmp_path, _VFIO, _GVNIC)
    assert hardware.detect_tpu(root, {}) is None


def test_google_network_card_alone_is_not_a_tpu(tmp_path):
    assert hardware.detect_tpu(_machine(tmp_path, [], _GVNIC), {}) is None


def test_tpu_name_alone_names_a_remote_tpu(tmp_path):
    tpu = hardware.detect_tpu(_machine(tmp_path), {"TPU_NAME": "my-tpu"})
    assert not tpu.local
    assert tpu.evidence == ("TPU_NAME=my-tpu",)
    assert "named by the environment" in tpu.describe()


def test_plain_machine_has_no_tpu(tmp_path):
    assert hardware.detect_tpu(_machine(tmp_path), {"PATH": "/bin"}) is None


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (["proc/driver/nvidia/gpus/0000:00:04.0/information"], "/proc/driver"),
        (["dev/nvidiactl", "dev/nvidia0"], "/dev/nvidia0"),
        (["dev/nvidiactl"], ""),  # the control node alone: no GPU
        ([], ""),
    ],
)
def test_nvidia_driver_evidence(tmp_path, files, expected):
    found = hardware.detect_nvidia_driver(_machine(tmp_path, files), {})
    assert found.startswith(expected) and bool(found) == bool(expected)


def test_nvidia_smi_on_path_is_evidence(tmp_path):
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    root = _machine(tmp_path / "root")
    environ = {"PATH": f"/nonexistent{os.pathsep}{smi.parent}"}
    assert hardware.detect_nvidia_driver(root, environ) == (
        f"nvidia-smi at {smi}"
    )
    assert hardware.detect_nvidia_driver(root, {"PATH": "/nonexistent"}) == ""


def test_gpu_that_tensorflow_cannot_see_is_hidden(tmp_path):
    root = _machine(tmp_path, ["dev/nvidia0"])
    hidden = hardware.detect(root, {}, gpus=())
    assert hidden.hidden_gpu and hidden.nvidia_driver == "/dev/nvidia0"
    gpu = hardware.GPU(name="A100", compute_capability=(8, 0))
    assert not hardware.detect(root, {}, gpus=(gpu,)).hidden_gpu


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni", ("avx512_bf16",)),
        ("fpu avx512f amx_bf16 amx_tile amx_int8", ("amx_bf16",)),
        ("fpu avx512_bf16 amx_bf16", ("avx512_bf16", "amx_bf16")),
        ("fpu sse2 avx2 fma", ()),
    ],
)
def test_cpu_bf16_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "proc" / "cpuinfo"
    cpuinfo.parent.mkdir()
    # Only the flags line counts, not e.g. a model name mentioning a flag.
    cpuinfo.write_text(
        f"processor\t: 0\nmodel name\t: amx_bf16 avx512_bf16\nflags\t\t: "
        f"{flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    )
    assert hardware.cpu_bf16_flags(str(tmp_path)) == expected


def _cpuinfo(root, flags: str) -> str:
    cpuinfo = root / "proc" / "cpuinfo"
    cpuinfo.parent.mkdir()
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    return str(root)


ZEN3 = "fpu sse2 avx avx2 fma"
SKYLAKE_SP = "fpu avx2 fma avx512f avx512bw avx512vl"
CASCADE_LAKE = f"{SKYLAKE_SP} avx512_vnni"
ZEN4 = f"{CASCADE_LAKE} avx512_bf16"
SAPPHIRE_RAPIDS = f"{ZEN4} amx_bf16 amx_tile amx_int8 avx_vnni"
ALDER_LAKE = "fpu avx2 fma avx_vnni"
ARROW_LAKE = f"{ALDER_LAKE} avx_ne_convert"


@pytest.mark.parametrize(
    ("flags", "environ", "onednn", "bf16"),
    [
        (ZEN3, {}, False, False),
        # AVX-512 without VNNI: oneDNN off by default, Eigen runs bfloat16.
        (SKYLAKE_SP, {}, False, False),
        (CASCADE_LAKE, {}, True, True),
        (ZEN4, {}, True, True),
        (SAPPHIRE_RAPIDS, {}, True, True),
        # oneDNN on, but bfloat16 needs AVX-512 or AVX-NE-CONVERT.
        (ALDER_LAKE, {}, True, False),
        (ARROW_LAKE, {}, True, True),
        (ZEN3, {"TF_ENABLE_ONEDNN_OPTS": "1"}, True, False),
        (SKYLAKE_SP, {"TF_ENABLE_ONEDNN_OPTS": "true"}, True, True),
        (ZEN4, {"TF_ENABLE_ONEDNN_OPTS": "0"}, False, False),
        (ZEN4, {"TF_ENABLE_ONEDNN_OPTS": "False"}, False, False),
    ],
)
def test_tensorflow_onednn_and_bf16_follow_tensorflows_rules(
    tmp_path, flags, environ, onednn, bf16
):
    root = _cpuinfo(tmp_path, flags)
    assert hardware.tensorflow_onednn_enabled(root, environ) is onednn
    assert hardware.tensorflow_bf16_on_onednn(root, environ) is bf16


@pytest.mark.parametrize("switch", [None, "0"])
def test_tensorflow_onednn_enabled_agrees_with_tensorflow(switch):
    """Against TensorFlow's own IsMklEnabled on this machine, in a process
    started with TF_ENABLE_ONEDNN_OPTS unset and 0 (TensorFlow reads the
    variable once)."""
    script = (
        "from tensorflow.python.util import _pywrap_util_port as port\n"
        "from simclr_tf import hardware\n"
        "print(port.IsMklEnabled(), hardware.tensorflow_onednn_enabled())\n"
    )
    extra = {} if switch is None else {"TF_ENABLE_ONEDNN_OPTS": switch}
    theirs, ours = _printed_by_fresh_process(script, extra)[-2:]
    assert ours == theirs


def _printed_by_fresh_process(script, extra=None):
    """The words `script` prints in a Python process started without
    TF_ENABLE_ONEDNN_OPTS (plus `extra`), simclr_tf on its path."""
    environ = {
        k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"
    }
    environ.update(PYTHONPATH=REPOSITORY, **(extra or {}))
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


@pytest.mark.parametrize(
    ("flags", "files", "environ", "switch"),
    [
        # AVX2 and FMA, TensorFlow's default off: oneDNN turned on.
        (ZEN3, (), {}, "1"),
        (SKYLAKE_SP, (), {}, "1"),
        # oneDNN on by default already.
        (CASCADE_LAKE, (), {}, ""),
        (ZEN4, (), {}, ""),
        (SAPPHIRE_RAPIDS, (), {}, ""),
        (ALDER_LAKE, (), {}, ""),
        # No AVX2 or no FMA (Sandy Bridge, an emulator): left alone.
        ("fpu sse2 avx", (), {}, ""),
        ("fpu sse2 avx avx2", (), {}, ""),
        # The user's setting stands, whatever it says.
        (ZEN3, (), {"TF_ENABLE_ONEDNN_OPTS": "0"}, ""),
        (ZEN3, (), {"TF_ENABLE_ONEDNN_OPTS": ""}, ""),
        (ZEN3, (), {"TF_ENABLE_ONEDNN_OPTS": "1"}, ""),
        # Accelerator hosts keep TensorFlow's default CPU kernels.
        (ZEN3, ("dev/nvidia0",), {}, ""),
        (ZEN3, ("dev/accel0",), {}, ""),
        (ZEN3, (), {"TPU_NAME": "my-tpu"}, ""),
    ],
)
def test_onednn_switch(tmp_path, flags, files, environ, switch):
    root = _cpuinfo(tmp_path, flags)
    _machine(tmp_path, files)
    environ = {"PATH": "/nonexistent", **environ}
    assert hardware.onednn_switch(root, environ) == switch


@pytest.mark.parametrize("tensorflow_first", [False, True])
def test_importing_simclr_tf_turns_onednn_on_where_the_switch_says(
    tensorflow_first,
):
    """In a process started without TF_ENABLE_ONEDNN_OPTS: TensorFlow's own
    IsMklEnabled is its default or, when simclr_tf was imported first and
    onednn_switch says "1" for this machine, on. TensorFlow imported first
    keeps its default, and the variable is then left unset."""
    first = "import tensorflow\n" if tensorflow_first else ""
    script = (
        f"{first}import os\n"
        "from simclr_tf import hardware\n"
        "environ = dict(os.environ)\n"
        "value = environ.pop('TF_ENABLE_ONEDNN_OPTS', None)\n"
        "from tensorflow.python.util import _pywrap_util_port as port\n"
        "print(port.IsMklEnabled(), value,\n"
        "      hardware.tensorflow_onednn_enabled(environ=environ),\n"
        "      hardware.onednn_switch(environ=environ) or None)\n"
    )
    enabled, value, default, switch = _printed_by_fresh_process(script)[-4:]
    if tensorflow_first:
        assert value == "None" and enabled == default
    else:
        assert value == switch
        assert enabled == str(default == "True" or switch == "1")


@pytest.mark.parametrize(
    ("flags", "environ", "avx2"),
    [
        (ZEN3, {}, False),  # oneDNN off: Eigen
        (ZEN3, {"TF_ENABLE_ONEDNN_OPTS": "1"}, True),
        (ALDER_LAKE, {}, True),  # AVX-VNNI: oneDNN on, no AVX-512
        (ZEN4, {}, False),
        (ZEN4, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, True),
        (ZEN4, {"ONEDNN_MAX_CPU_ISA": "avx2_vnni"}, True),
        (SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, False),
        (ALDER_LAKE, {"TF_ENABLE_ONEDNN_OPTS": "0"}, False),
    ],
)
def test_tensorflow_float32_on_onednn_avx2(tmp_path, flags, environ, avx2):
    root = _cpuinfo(tmp_path, flags)
    assert hardware.tensorflow_float32_on_onednn_avx2(root, environ) is avx2


def test_cpu_bf16_flags_without_cpuinfo(tmp_path):
    assert hardware.cpu_bf16_flags(str(tmp_path)) == ()


def test_this_machine_reads_its_own_cpuinfo():
    with open("/proc/cpuinfo") as cpuinfo:
        flags = {
            flag
            for line in cpuinfo
            if line.startswith("flags")
            for flag in line.partition(":")[2].split()
        }
    expected = tuple(f for f in hardware.CPU_BF16_FLAGS if f in flags)
    assert hardware.detect().cpu_bf16 == expected
