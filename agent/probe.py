"""The capacity probe: CPUs, memory and scratch disk through psutil, GPUs through NVML.

The probe functions block (NVML calls, /proc and /sys reads), so the daemon runs
them in a worker thread. No NVML library, no driver or no GPU gives an empty GPU
list and one log line. A field that NVML does not support on a device is left out
(None), and a device that NVML fails to read is left out with a warning.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import psutil

from fairu.protocol.models import GpuInfo, MigDeviceInfo

logger = logging.getLogger(__name__)

T = TypeVar("T")

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 reports "no memory limit" as a huge number near 2**63, rounded to pages.
_V1_UNLIMITED_BYTES = 2**62


@dataclass(frozen=True)
class Capacity:
    """The resources this host gives the agent, before the site's reservations."""

    # Logical cores this process may run on (its CPU affinity).
    cpu_cores: int
    # `cpu_cores` bounded by the cgroup CPU quota; may be fractional.
    usable_cpus: float
    # Physical memory, bounded by the cgroup memory limit.
    memory_bytes: int
    memory_available_bytes: int
    # Free bytes on the file system of the scratch folder; None when not probed.
    scratch_free_bytes: int | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    driver_version: str | None = None
    cuda_version: str | None = None


@dataclass(frozen=True)
class GpuReport:
    gpus: list[GpuInfo] = field(default_factory=list)
    driver_version: str | None = None
    cuda_version: str | None = None


def probe_capacity(
    scratch_dir: Path | None = None, nvml: ModuleType | None = None
) -> Capacity:
    """Probe the host; `nvml` replaces the pynvml module in tests."""
    memory = psutil.virtual_memory()
    memory_limit = cgroup_memory_limit()
    total = memory.total if memory_limit is None else min(memory.total, memory_limit)
    cores = usable_cpu_cores()
    quota = cgroup_cpu_limit()
    report = probe_gpus(nvml)
    return Capacity(
        cpu_cores=cores,
        usable_cpus=float(cores) if quota is None else min(float(cores), quota),
        memory_bytes=total,
        memory_available_bytes=min(memory.available, total),
        scratch_free_bytes=scratch_free_bytes(scratch_dir) if scratch_dir else None,
        gpus=report.gpus,
        driver_version=report.driver_version,
        cuda_version=report.cuda_version,
    )


def usable_cpu_cores() -> int:
    """Return the cores this process may run on, honouring its CPU affinity."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return psutil.cpu_count(logical=True) or 1


def scratch_free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError as exc:
        logger.warning("cannot read free disk space of %s: %s", folder, exc.strerror)
        return None


# --- cgroups ---------------------------------------------------------------------


def parse_cpu_max(text: str) -> float | None:
    """Return the cores a cgroup v2 `cpu.max` ("QUOTA PERIOD") allows, or None."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    period = int(parts[1]) if len(parts) > 1 else 100_000
    return int(parts[0]) / period


def parse_cfs_quota(quota_text: str, period_text: str) -> float | None:
    """Return the cores cgroup v1 `cpu.cfs_quota_us` allows; None for -1 (no quota)."""
    quota = int(quota_text)
    if quota <= 0:
        return None
    return quota / int(period_text)


def parse_memory_limit(text: str) -> int | None:
    """Return a cgroup memory limit in bytes; None for "max" or v1's huge value."""
    text = text.strip()
    if text == "max":
        return None
    value = int(text)
    return None if value >= _V1_UNLIMITED_BYTES else value


def cgroup_cpu_limit() -> float | None:
    """Return the tightest CPU quota on this process's cgroup and its parents."""
    limits = []
    for folder in _cgroup_folders("cpu"):
        try:
            if (folder / "cpu.max").exists():
                limits.append(parse_cpu_max((folder / "cpu.max").read_text()))
            elif (folder / "cpu.cfs_quota_us").exists():
                limits.append(
                    parse_cfs_quota(
                        (folder / "cpu.cfs_quota_us").read_text(),
                        (folder / "cpu.cfs_period_us").read_text(),
                    )
                )
        except (OSError, ValueError, ZeroDivisionError) as exc:
            logger.debug("cannot read the CPU quota in %s: %s", folder, exc)
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def cgroup_memory_limit() -> int | None:
    """Return the tightest memory limit on this process's cgroup and its parents."""
    limits = []
    for folder in _cgroup_folders("memory"):
        for name in ("memory.max", "memory.limit_in_bytes"):
            try:
                if (folder / name).exists():
                    limits.append(parse_memory_limit((folder / name).read_text()))
                    break
            except (OSError, ValueError) as exc:
                logger.debug("cannot read %s in %s: %s", name, folder, exc)
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def _cgroup_folders(controller: str) -> list[Path]:
    """Return the cgroup folder of this process for `controller`, and its parents.

    cgroup v2 has one hierarchy ("0::/path"), and v1 has one per controller
    ("4:cpu,cpuacct:/path"), mounted under a folder named after its controllers.
    """
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base = CGROUP_ROOT
        elif controller in controllers.split(","):
            base = CGROUP_ROOT / controllers
            if not base.is_dir():
                base = CGROUP_ROOT / controller
        else:
            continue
        folder = base / path.lstrip("/")
        # Inside a container the cgroup namespace shows "/" while the path in
        # /proc/self/cgroup may name a folder that is not mounted there.
        if not folder.is_dir():
            folder = base
        folders = [folder]
        while folder != base and folder.parent != folder:
            folder = folder.parent
            folders.append(folder)
        return folders
    return []


# --- NVML ------------------------------------------------------------------------

# The library that pynvml loads on Linux.
NVML_LIBRARY = "libnvidia-ml.so.1"


def probe_gpus(nvml: ModuleType | None = None) -> GpuReport:
    """List the GPUs that NVML reports; `nvml` replaces the pynvml module in tests."""
    if nvml is None:
        missing = _nvml_library_missing()
        if missing:
            logger.info("no GPUs reported: NVML is not available (%s)", missing)
            return GpuReport()
        import pynvml

        nvml = pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        logger.info("no GPUs reported: NVML is not available (%s)", exc)
        return GpuReport()
    try:
        return _probe_initialized(nvml)
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as exc:
            logger.debug("nvmlShutdown failed: %s", exc)


def _nvml_library_missing() -> str | None:
    """Return why the NVML library cannot load, or None when it can.

    Importing pynvml costs an agent about 2 MB for its whole life, so the probe
    loads the library first, as pynvml would, and imports pynvml only when that works.
    """
    import ctypes

    try:
        ctypes.CDLL(NVML_LIBRARY)
    except OSError as exc:
        return f"cannot load {NVML_LIBRARY}: {exc}"
    return None


def _probe_initialized(nvml: ModuleType) -> GpuReport:
    driver = _optional(nvml, "driver version", nvml.nvmlSystemGetDriverVersion)
    cuda = _optional(nvml, "CUDA version", nvml.nvmlSystemGetCudaDriverVersion)
    try:
        count = nvml.nvmlDeviceGetCount()
    except nvml.NVMLError as exc:
        logger.warning("no GPUs reported: NVML failed to count them (%s)", exc)
        return GpuReport(driver_version=_text(driver) if driver else None)
    if count == 0:
        logger.info("no GPUs reported: NVML found none")
    gpus = []
    for index in range(count):
        try:
            gpus.append(_probe_gpu(nvml, index))
        except nvml.NVMLError as exc:
            logger.warning("GPU %d left out: NVML failed to read it (%s)", index, exc)
    return GpuReport(
        gpus=gpus,
        driver_version=_text(driver) if driver is not None else None,
        cuda_version=_cuda_version_text(cuda) if cuda is not None else None,
    )


def _probe_gpu(nvml: ModuleType, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = _optional(nvml, "memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
    capability = _optional(
        nvml,
        "compute capability",
        lambda: nvml.nvmlDeviceGetCudaComputeCapability(handle),
    )
    mig_mode = _optional(nvml, "MIG mode", lambda: nvml.nvmlDeviceGetMigMode(handle))
    mig_enabled = (
        None if mig_mode is None else mig_mode[0] == nvml.NVML_DEVICE_MIG_ENABLE
    )
    return GpuInfo(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        memory_total_bytes=int(memory.total) if memory is not None else None,
        memory_free_bytes=int(memory.free) if memory is not None else None,
        compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
        mig_enabled=mig_enabled,
        mig_devices=_probe_mig_devices(nvml, index, handle) if mig_enabled else [],
    )


def _probe_mig_devices(
    nvml: ModuleType, gpu_index: int, handle: Any
) -> list[MigDeviceInfo]:
    slots = _optional(
        nvml, "MIG device count", lambda: nvml.nvmlDeviceGetMaxMigDeviceCount(handle)
    )
    devices = []
    for index in range(slots or 0):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, index)
        except nvml.NVMLError_NotFound:
            # NVML raises "Not Found" for a slot without a configured MIG device.
            continue
        except nvml.NVMLError as exc:
            logger.warning(
                "MIG device %d of GPU %d left out: NVML failed to read it (%s)",
                index,
                gpu_index,
                exc,
            )
            continue
        try:
            devices.append(_probe_mig_device(nvml, index, mig))
        except nvml.NVMLError as exc:
            logger.warning(
                "MIG device %d of GPU %d left out: NVML failed to read it (%s)",
                index,
                gpu_index,
                exc,
            )
    return devices


def _probe_mig_device(nvml: ModuleType, index: int, handle: Any) -> MigDeviceInfo:
    memory = _optional(nvml, "memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
    name = _optional(nvml, "name", lambda: nvml.nvmlDeviceGetName(handle))
    return MigDeviceInfo(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(name) if name is not None else None,
        memory_total_bytes=int(memory.total) if memory is not None else None,
        memory_free_bytes=int(memory.free) if memory is not None else None,
        gpu_instance_id=_optional(
            nvml, "GPU instance id", lambda: nvml.nvmlDeviceGetGpuInstanceId(handle)
        ),
        compute_instance_id=_optional(
            nvml,
            "compute instance id",
            lambda: nvml.nvmlDeviceGetComputeInstanceId(handle),
        ),
    )


def _optional(nvml: ModuleType, what: str, read: Callable[[], T]) -> T | None:
    """Call `read`; return None when NVML does not support the field or lacks the call.

    "Not Supported" comes from devices without the feature, "Function Not Found"
    from drivers older than the call, "Insufficient Permissions" from fields that
    need root. Every other NVML error propagates and leaves the device out.
    """
    try:
        return read()
    except (
        nvml.NVMLError_NotSupported,
        nvml.NVMLError_FunctionNotFound,
        nvml.NVMLError_NoPermission,
    ) as exc:
        logger.debug("NVML field %s left out: %s", what, exc)
        return None


def _cuda_version_text(version: int) -> str:
    # NVML encodes CUDA 12.4 as 12040: major * 1000 + minor * 10.
    return f"{version // 1000}.{version % 1000 // 10}"


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- description -----------------------------------------------------------------


def describe_capacity(capacity: Capacity) -> str:
    """Return a few lines for people: cores, memory, scratch disk and each GPU."""
    gib = 2**30
    lines = [
        f"cpu cores      {capacity.cpu_cores} (usable {capacity.usable_cpus:g} "
        "after the cgroup quota)",
        f"memory         {capacity.memory_bytes / gib:.1f} GiB "
        f"({capacity.memory_available_bytes / gib:.1f} GiB available)",
    ]
    if capacity.scratch_free_bytes is not None:
        lines.append(f"scratch free   {capacity.scratch_free_bytes / gib:.1f} GiB")
    lines.append(f"driver         {capacity.driver_version or '-'}")
    lines.append(f"cuda           {capacity.cuda_version or '-'}")
    lines.append(f"gpus           {len(capacity.gpus)}")
    for gpu in capacity.gpus:
        memory = (
            f"{gpu.memory_total_bytes / gib:.1f} GiB"
            if gpu.memory_total_bytes is not None
            else "memory unknown"
        )
        mig = {True: "MIG on", False: "MIG off", None: "no MIG"}[gpu.mig_enabled]
        lines.append(
            f"  {gpu.index}  {gpu.uuid}  {gpu.name}  {memory}  "
            f"cc {gpu.compute_capability or '-'}  {mig}"
        )
        for device in gpu.mig_devices:
            size = (
                f"{device.memory_total_bytes / gib:.1f} GiB"
                if device.memory_total_bytes is not None
                else "memory unknown"
            )
            lines.append(
                f"     {gpu.index}:{device.index}  {device.uuid}  "
                f"{device.name or '-'}  {size}"
            )
    return "\n".join(lines)
