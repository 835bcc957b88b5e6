"""The capacity probe: CPU cores and memory through psutil, GPUs through NVML.

The probe functions block (NVML and /proc reads), so callers run them in a thread.
No NVML library or no driver gives an empty GPU list and one log line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import psutil

from fairu.protocol.models import GpuInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Capacity:
    cpu_cores: int
    memory_bytes: int
    memory_available_bytes: int
    gpus: list[GpuInfo] = field(default_factory=list)


def probe_capacity(nvml: ModuleType | None = None) -> Capacity:
    memory = psutil.virtual_memory()
    return Capacity(
        cpu_cores=usable_cpu_cores(),
        memory_bytes=memory.total,
        memory_available_bytes=memory.available,
        gpus=probe_gpus(nvml),
    )


def usable_cpu_cores() -> int:
    """Return the cores this process may run on, honouring its CPU affinity."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return psutil.cpu_count(logical=True) or 1


def probe_gpus(nvml: ModuleType | None = None) -> list[GpuInfo]:
    """List the GPUs NVML sees; `nvml` replaces the pynvml module in tests."""
    if nvml is None:
        import pynvml

        nvml = pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        logger.info("no GPUs reported: NVML is not available (%s)", exc)
        return []
    try:
        count = nvml.nvmlDeviceGetCount()
        gpus = []
        for index in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    memory_total_bytes=_optional(
                        nvml, lambda: int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
                    ),
                )
            )
        return gpus
    except nvml.NVMLError as exc:
        logger.warning("GPU probe failed, reporting no GPUs: %s", exc)
        return []
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass


def _optional(nvml: ModuleType, read: Any) -> Any:
    try:
        return read()
    except nvml.NVMLError_NotSupported:
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
