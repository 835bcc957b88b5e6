"""Matching a job's resource request against what an agent offers. No I/O.

The agent uses it to admit jobs and the coordinator to decide whether any agent of
the fleet could ever run a job, so both apply the same rules:

- `cpus` and `memory_mb` must fit in the offered amounts;
- `gpus` counts allocatable GPU units: a whole GPU, or one MIG device of a GPU in
  MIG mode (a GPU in MIG mode is never given whole);
- `gpu_memory_mb` is compared with each unit's total memory, because a unit is
  given to one job at a time;
- `gpu_model` must occur in the unit's NVML name, ignoring case.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .models import GpuInfo, Resources

MIB = 2**20


@dataclass(frozen=True)
class GpuUnit:
    """One allocatable GPU: a whole GPU, or one MIG device of a GPU in MIG mode."""

    uuid: str
    name: str
    memory_total_bytes: int | None
    gpu_index: int
    # The MIG device's index on its GPU; None for a whole GPU.
    mig_index: int | None = None


def gpu_units(gpus: Iterable[GpuInfo]) -> list[GpuUnit]:
    """Return the allocatable units of probed GPUs, in NVML index order."""
    units = []
    for gpu in gpus:
        if gpu.mig_enabled:
            for device in gpu.mig_devices:
                units.append(
                    GpuUnit(
                        uuid=device.uuid,
                        name=device.name or f"{gpu.name} MIG",
                        memory_total_bytes=device.memory_total_bytes,
                        gpu_index=gpu.index,
                        mig_index=device.index,
                    )
                )
        else:
            units.append(
                GpuUnit(
                    uuid=gpu.uuid,
                    name=gpu.name,
                    memory_total_bytes=gpu.memory_total_bytes,
                    gpu_index=gpu.index,
                )
            )
    return units


def unit_matches(unit: GpuUnit, request: Resources) -> bool:
    """Check a unit against the request's GPU memory and model conditions."""
    if request.gpu_memory_mb is not None:
        # A unit whose memory NVML did not report cannot prove that it is enough.
        if unit.memory_total_bytes is None:
            return False
        if unit.memory_total_bytes < request.gpu_memory_mb * MIB:
            return False
    if request.gpu_model is not None:
        return request.gpu_model.casefold() in unit.name.casefold()
    return True


def shortfalls(
    request: Resources, cpus: float, memory_bytes: int, units: Sequence[GpuUnit]
) -> list[str]:
    """Return what the amounts lack for the request, one phrase each (none: it fits)."""
    missing = []
    # A hundredth of a core absorbs float rounding in sums of fractional requests.
    if request.cpus > cpus + 0.005:
        missing.append(f"cpus {request.cpus:g} > {cpus:g}")
    if request.memory_mb * MIB > memory_bytes:
        missing.append(f"memory_mb {request.memory_mb} > {memory_bytes // MIB}")
    if request.gpus:
        matching = sum(1 for unit in units if unit_matches(unit, request))
        if matching < request.gpus:
            missing.append(
                f"gpus {request.gpus} > {matching} {describe_gpu_kind(request)}"
            )
    return missing


def describe_gpu_kind(request: Resources) -> str:
    conditions = []
    if request.gpu_model is not None:
        conditions.append(f"model {request.gpu_model!r}")
    if request.gpu_memory_mb is not None:
        conditions.append(f">= {request.gpu_memory_mb} MiB")
    return "matching " + " and ".join(conditions) if conditions else "available"


def describe_request(request: Resources) -> str:
    """Return the request as "cpus=2, memory_mb=4096, gpus=1 (model 'A100')"."""
    text = f"cpus={request.cpus:g}, memory_mb={request.memory_mb}, gpus={request.gpus}"
    extras = []
    if request.gpu_model is not None:
        extras.append(f"gpu_model={request.gpu_model!r}")
    if request.gpu_memory_mb is not None:
        extras.append(f"gpu_memory_mb={request.gpu_memory_mb}")
    return text + (f" ({', '.join(extras)})" if extras else "")


def describe_offer(cpus: float, memory_bytes: int, units: Sequence[GpuUnit]) -> str:
    """Return an offer as "cpus=8, memory_mb=32000, gpus=2 (2 NVIDIA A100 ...)"."""
    text = f"cpus={cpus:g}, memory_mb={memory_bytes // MIB}, gpus={len(units)}"
    counts: dict[str, int] = {}
    for unit in units:
        counts[unit.name] = counts.get(unit.name, 0) + 1
    if counts:
        text += " (" + ", ".join(f"{n} {model}" for model, n in counts.items()) + ")"
    return text
