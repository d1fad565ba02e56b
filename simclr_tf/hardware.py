"""Which accelerators this machine has, and the evidence for each.

Reads only files (/dev, /sys, /proc under a root directory), environment
variables and TensorFlow's device list, all passed in, so that tests can fake
a TPU v5e VM, a GPU machine without CUDA and so on. runtime.py turns the
result into a strategy and a precision; nothing here touches the network
(the GCE metadata server is not asked). Importing it does not load
TensorFlow: simclr_tf/__init__.py asks `onednn_switch` which CPU kernels
TensorFlow should run before it loads.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Mapping, Sequence

GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of Google's TPU chips (v2 and v3 share one and differ in
# the subsystem id), as Google's tpu-info tool reads them.
_TPU_PCI_DEVICES = {
    "0x005e": "v4",
    "0x0062": "v5p",
    "0x0063": "v5e",
    "0x006f": "v6e",
}
_TPU_V2_V3_DEVICE = "0x0027"
_TPU_V2_V3_SUBSYSTEMS = {"0x004e": "v2", "0x004f": "v3"}
# TPU_ACCELERATOR_TYPE prefixes (v5litepod-8 is a v5e slice).
_ACCELERATOR_TYPES = {
    "v2": "v2",
    "v3": "v3",
    "v4": "v4",
    "v5litepod": "v5e",
    "v5lite": "v5e",
    "v5e": "v5e",
    "v5p": "v5p",
    "v6e": "v6e",
}
# Set on TPU VMs by their images or on GKE TPU nodes; TPU_NAME also names a
# remote TPU for TPUClusterResolver.
TPU_VARIABLES = (
    "TPU_ACCELERATOR_TYPE",
    "TPU_NAME",
    "TPU_WORKER_ID",
    "TPU_WORKER_HOSTNAMES",
)
# CPU flags (/proc/cpuinfo) with native bfloat16 arithmetic: AVX-512 BF16
# (Cooper Lake, Zen 4+) and AMX (Sapphire Rapids+).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# TensorFlow's oneDNN kernels are on by default (TF_ENABLE_ONEDNN_OPTS
# unset) on Linux CPUs with one of these flags (its DefaultOneDnnPolicy);
# on others, Zen 3 and other AVX2 CPUs among them, Eigen runs every op.
ONEDNN_DEFAULT_CPU_FLAGS = (
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
# With oneDNN on, TensorFlow hands it bfloat16 ops only on CPUs with one of
# these (its IsBF16SupportedByOneDNNOnThisCPU); otherwise Eigen runs them,
# and Eigen's bfloat16 Conv2DBackpropFilter rounds its sums to bfloat16:
# 2^-4.7 of the largest entry off on a 3x3 conv over 2 x 28 x 28
# positions, against 2^-9.4 through oneDNN (tests/test_conv.py).
ONEDNN_BF16_CPU_FLAGS = ("avx512f", "avx_ne_convert")

# oneDNN's ISA levels below AVX512_CORE_BF16: ONEDNN_MAX_CPU_ISA set to one
# of them keeps TensorFlow's oneDNN kernels off the CPU's bfloat16
# instructions (on such a CPU a bfloat16 convolution then fails to build).
ONEDNN_ISAS_BELOW_BF16 = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TPU:
    """A TPU found on (or named for) this machine.

    Attributes:
        generation: "v2" .. "v6e", or a hint such as "v2-v4" when only the
            device nodes are known.
        local: whether its chips are attached to this machine (a TPU VM),
            rather than only named by TPU_NAME.
        evidence: what showed it, e.g. ("/dev/vfio/0-3", ...).
    """

    generation: str
    local: bool
    evidence: tuple[str, ...]

    def describe(self) -> str:
        """e.g. "TPU v5e VM (4 PCI devices 1ae0:0063; /dev/vfio/0-3)"."""
        kind = "VM" if self.local else "named by the environment"
        return f"TPU {self.generation} {kind} ({'; '.join(self.evidence)})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPU:
    """A GPU TensorFlow can use.

    Attributes:
        name: its device name, e.g. "NVIDIA A100-SXM4-40GB".
        compute_capability: (major, minor), None when TensorFlow does not
            report it.
    """

    name: str
    compute_capability: tuple[int, int] | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hardware:
    """What `detect` found.

    Attributes:
        tpu: the TPU, or None.
        gpus: the GPUs TensorFlow can use.
        nvidia_driver: evidence of an NVIDIA GPU at the operating-system
            level (driver files, device nodes, nvidia-smi), "" if none; a
            GPU there that is not in `gpus` is one TensorFlow cannot use.
        cpu_bf16: the CPU's bfloat16 flags found, e.g. ("avx512_bf16",).
        onednn_limit: ONEDNN_MAX_CPU_ISA when it names a level below
            bfloat16 (e.g. "AVX2"), else "".
    """

    tpu: TPU | None
    gpus: tuple[GPU, ...]
    nvidia_driver: str
    cpu_bf16: tuple[str, ...]
    onednn_limit: str = ""

    @property
    def cpu_bf16_held_back(self) -> bool:
        """The CPU has bfloat16, but ONEDNN_MAX_CPU_ISA keeps oneDNN below
        it: TensorFlow's bfloat16 convolutions and matmuls then abort."""
        return bool(self.cpu_bf16) and bool(self.onednn_limit)

    @property
    def hidden_gpu(self) -> bool:
        """An NVIDIA GPU is present but TensorFlow sees none."""
        return bool(self.nvidia_driver) and not self.gpus


def detect(
    root: str = "/",
    environ: Mapping[str, str] | None = None,
    gpus: Sequence[GPU] | None = None,
) -> Hardware:
    """Looks for TPUs, GPUs and bfloat16 CPU support.

    Args:
        root: directory holding dev/, sys/ and proc/ ("/" on a real machine).
        environ: environment variables; default os.environ.
        gpus: the GPUs TensorFlow can use; default `visible_gpus()`.

    Returns:
        The Hardware found.
    """
    environ = os.environ if environ is None else environ
    return Hardware(
        tpu=detect_tpu(root, environ),
        gpus=tuple(visible_gpus() if gpus is None else gpus),
        nvidia_driver=detect_nvidia_driver(root, environ),
        cpu_bf16=cpu_bf16_flags(root),
        onednn_limit=onednn_limit(environ),
    )


def onednn_limit(environ: Mapping[str, str]) -> str:
    """ONEDNN_MAX_CPU_ISA (upper case) if it keeps oneDNN below bfloat16."""
    value = environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return value if value in ONEDNN_ISAS_BELOW_BF16 else ""


def detect_tpu(root: str, environ: Mapping[str, str]) -> TPU | None:
    """A TPU from PCI devices, device nodes or TPU_* variables.

    v2-v4 VMs expose /dev/accel<n>; v5e, v5p and v6e expose /dev/vfio/<n>
    instead. A VFIO device alone is not proof (any passthrough device makes
    one), so /dev/vfio/<n> counts only on a Google Compute Engine VM (its
    DMI product name) or next to another sign of a TPU.

    Args:
        root: directory holding dev/, sys/ and proc/.
        environ: environment variables.

    Returns:
        The TPU, or None when nothing points to one.
    """
    chips = _tpu_pci_chips(root)
    accel = _numbered(os.path.join(root, "dev"), "accel")
    vfio = _numbered(os.path.join(root, "dev", "vfio"), "")
    variables = [
        f"{name}={environ[name]}" for name in TPU_VARIABLES if environ.get(name)
    ]
    if vfio and not (chips or accel or variables or _on_gce(root)):
        vfio = []
    evidence = []
    if chips:
        generation, devices = chips
        evidence.append(f"{len(devices)} PCI device(s) {', '.join(devices)}")
    if accel:
        evidence.append(_device_range("/dev/accel", accel))
    if vfio:
        evidence.append(_device_range("/dev/vfio/", vfio))
    evidence += variables
    if not evidence:
        return None
    return TPU(
        generation=_generation(chips, environ, accel, vfio),
        local=bool(chips or accel or vfio),
        evidence=tuple(evidence),
    )


def _generation(
    chips: tuple[str, list[str]] | None,
    environ: Mapping[str, str],
    accel: list[int],
    vfio: list[int],
) -> str:
    """The most specific generation the evidence gives."""
    if chips:
        return chips[0]
    accelerator_type = environ.get("TPU_ACCELERATOR_TYPE", "")
    prefix = accelerator_type.split("-")[0].lower()
    if prefix in _ACCELERATOR_TYPES:
        return _ACCELERATOR_TYPES[prefix]
    if accel:
        return "v2-v4"
    if vfio:
        return "v5e or later"
    return accelerator_type or "(generation unknown)"


def _tpu_pci_chips(root: str) -> tuple[str, list[str]] | None:
    """(generation, ["1ae0:0063", ...]) of the TPU chips on the PCI bus."""
    base = os.path.join(root, "sys", "bus", "pci", "devices")
    found = []
    for name in sorted(_listdir(base)):
        directory = os.path.join(base, name)
        if _read(os.path.join(directory, "vendor")) != GOOGLE_PCI_VENDOR:
            continue  # Google's vendor id is also on its gVNIC network card
        device = _read(os.path.join(directory, "device"))
        generation = _TPU_PCI_DEVICES.get(device)
        if device == _TPU_V2_V3_DEVICE:
            subsystem = _read(os.path.join(directory, "subsystem_device"))
            generation = _TPU_V2_V3_SUBSYSTEMS.get(subsystem, "v2-v3")
        if generation:
            found.append((generation, f"1ae0:{device[2:]}"))
    if not found:
        return None
    return found[0][0], [device for _, device in found]


def _on_gce(root: str) -> bool:
    path = os.path.join(root, "sys", "class", "dmi", "id", "product_name")
    return _read(path) == "Google Compute Engine"


def detect_nvidia_driver(root: str, environ: Mapping[str, str]) -> str:
    """Evidence of an NVIDIA GPU at the OS level, "" if none.

    Args:
        root: directory holding dev/ and proc/.
        environ: environment variables (PATH is searched for nvidia-smi).

    Returns:
        e.g. "/proc/driver/nvidia/gpus/0000:00:04.0" or "nvidia-smi at
        /usr/bin/nvidia-smi".
    """
    gpus = os.path.join(root, "proc", "driver", "nvidia", "gpus")
    for name in sorted(_listdir(gpus)):
        return f"/proc/driver/nvidia/gpus/{name}"
    nodes = _numbered(os.path.join(root, "dev"), "nvidia")
    if nodes:
        return f"/dev/nvidia{nodes[0]}"
    smi = shutil.which("nvidia-smi", path=environ.get("PATH", ""))
    return f"nvidia-smi at {smi}" if smi else ""


def cpu_bf16_flags(root: str = "/") -> tuple[str, ...]:
    """The CPU_BF16_FLAGS that /proc/cpuinfo lists (Linux; else none)."""
    flags = _cpu_flags(root)
    return tuple(flag for flag in CPU_BF16_FLAGS if flag in flags)


def tensorflow_onednn_enabled(
    root: str = "/", environ: Mapping[str, str] | None = None
) -> bool:
    """Whether TensorFlow runs CPU ops with oneDNN rather than Eigen: as
    TF_ENABLE_ONEDNN_OPTS says (1/true, 0/false), else by
    ONEDNN_DEFAULT_CPU_FLAGS. Reads x86 flags only (an Arm Neoverse V1,
    where TensorFlow's default is on too, reads as off)."""
    return _onednn_enabled(_cpu_flags(root), environ)


def tensorflow_bf16_on_onednn(
    root: str = "/", environ: Mapping[str, str] | None = None
) -> bool:
    """Whether TensorFlow runs bfloat16 ops on the CPU with oneDNN (not
    Eigen): oneDNN on and a CPU with one of ONEDNN_BF16_CPU_FLAGS."""
    flags = _cpu_flags(root)
    return _onednn_enabled(flags, environ) and any(
        flag in flags for flag in ONEDNN_BF16_CPU_FLAGS
    )


def onednn_switch(
    root: str = "/", environ: Mapping[str, str] | None = None
) -> str:
    """The TF_ENABLE_ONEDNN_OPTS value simclr_tf sets before TensorFlow
    loads (simclr_tf/__init__.py), "" for none.

    "1" on an x86 CPU with AVX2 and FMA where TensorFlow would leave oneDNN
    off (none of ONEDNN_DEFAULT_CPU_FLAGS: AMD Zen 2 and Zen 3, Skylake,
    AVX2 laptops), when no TPU or NVIDIA GPU is present: there TensorFlow
    runs every op with Eigen, whose convolutions and their gradients ran
    at about half oneDNN's AVX2 rate (benchmarks/RESULTS.md, "oneDNN on
    AVX2 CPUs without VNNI"). "" where the variable is set (the user's
    choice stands), where oneDNN is on by default, on other CPUs, and on
    accelerator hosts, whose CPU kernels stay TensorFlow's default.
    """
    environ = os.environ if environ is None else environ
    if "TF_ENABLE_ONEDNN_OPTS" in environ:
        return ""
    flags = _cpu_flags(root)
    if not {"avx2", "fma"} <= flags or _onednn_enabled(flags, environ):
        return ""
    if detect_tpu(root, environ) or detect_nvidia_driver(root, environ):
        return ""
    return "1"


def tensorflow_float32_on_onednn_avx2(
    root: str = "/", environ: Mapping[str, str] | None = None
) -> bool:
    """Whether TensorFlow runs float32 ops with oneDNN's AVX2 kernels:
    oneDNN on, and no AVX-512 or ONEDNN_MAX_CPU_ISA holding it to AVX2 or
    below (AVX-VNNI laptops by default; Zen 2/3 with oneDNN turned on)."""
    environ = os.environ if environ is None else environ
    flags = _cpu_flags(root)
    if not _onednn_enabled(flags, environ):
        return False
    limit = onednn_limit(environ)
    return "avx512f" not in flags or (
        bool(limit) and not limit.startswith("AVX512")
    )


def _onednn_enabled(flags: set[str], environ: Mapping[str, str] | None) -> bool:
    environ = os.environ if environ is None else environ
    switch = environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower()
    if switch in ("1", "true"):
        return True
    if switch in ("0", "false"):
        return False
    return any(flag in flags for flag in ONEDNN_DEFAULT_CPU_FLAGS)


def _cpu_flags(root: str) -> set[str]:
    """The flags /proc/cpuinfo lists (Linux; else none)."""
    flags = set()
    for line in _read(os.path.join(root, "proc", "cpuinfo")).splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return flags


def visible_gpus() -> tuple[GPU, ...]:
    """The GPUs TensorFlow can use, with their compute capability."""
    import tensorflow as tf  # this module is read before TensorFlow loads

    found = []
    for device in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(device)
        except (ValueError, RuntimeError):
            details = {}
        capability = details.get("compute_capability")
        found.append(
            GPU(
                name=details.get("device_name", device.name),
                compute_capability=tuple(capability) if capability else None,
            )
        )
    return tuple(found)


def _numbered(directory: str, prefix: str) -> list[int]:
    """n of the entries named prefix<n> in directory, sorted."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)")
    numbers = []
    for name in _listdir(directory):
        match = pattern.fullmatch(name)
        if match:
            numbers.append(int(match.group(1)))
    return sorted(numbers)


def _device_range(prefix: str, numbers: list[int]) -> str:
    if len(numbers) == 1:
        return f"{prefix}{numbers[0]}"
    return f"{prefix}{numbers[0]}-{numbers[-1]}"


def _listdir(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _read(path: str) -> str:
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return ""
