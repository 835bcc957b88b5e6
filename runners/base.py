"""The interface every container runtime implements, and the values it exchanges."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fairu.protocol.models import SandboxInfo


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class RunSpec:
    """Everything a runner needs to run one job's container.

    `output_dir` is the one writable bind mount, at /output in the container. The
    pipeline makes it only when the runner's `writes_output` is true for the job.
    `labels` carry at least `fairu.job_id` and `fairu.agent_id`.
    """

    job_id: str
    image: str
    command: list[str]
    env: dict[str, str]
    mounts: list[Mount]
    output_dir: Path
    walltime_s: float
    labels: dict[str, str]
    cpus: float = 1.0
    memory_mb: int = 1024
    gpu_devices: list[str] = field(default_factory=list)
    # Outbound network access. Without it the container has a loopback interface only.
    egress: bool = False


@dataclass(frozen=True)
class RunOutcome:
    """The end of one container run. `exit_code` is None when the runner killed it."""

    exit_code: int | None
    timed_out: bool
    log_tail: str
    log_truncated: bool
    run_s: float
    # Why /output passed its cap, when the runner killed the container for it.
    output_too_large: str | None = None


class Runner(Protocol):
    """A container runtime. Implementations never block the event loop."""

    name: str

    async def check(self) -> None:
        """Raise `RunnerUnavailable` when the runtime cannot be reached."""

    def writes_output(self, command: Sequence[str]) -> bool:
        """Return whether a job with this command writes files to /output.

        A job that writes none gets no work folder and reports empty scores. Only
        the null runner's no-op jobs write none.
        """

    async def run(self, spec: RunSpec) -> RunOutcome:
        """Run the container to completion, enforce the walltime, always remove it.

        Raise `RunnerUnavailable` when the runtime cannot be reached and
        `ContainerError` when the container cannot be created or started.
        """

    async def describe_sandbox(self) -> SandboxInfo:
        """Return how this runtime confines jobs on this host."""

    async def remove_labelled(self, agent_id: str) -> int:
        """Remove leftover containers labelled with `agent_id`; return how many."""

    async def close(self) -> None: ...


class RunnerError(Exception):
    """Base of runner failures; the message names the container or image involved."""


class RunnerUnavailable(RunnerError):
    """The runtime (its API socket, its service) cannot be reached."""


class ContainerError(RunnerError):
    """The container could not be created or started (bad image, bad command)."""
