"""Container runtimes behind one interface (`Runner`)."""

from .base import ContainerError, Mount, Runner, RunnerError, RunnerUnavailable, RunOutcome, RunSpec
from .podman import PodmanRunner, PodmanSettings

__all__ = [
    "ContainerError",
    "Mount",
    "PodmanRunner",
    "PodmanSettings",
    "RunOutcome",
    "RunSpec",
    "Runner",
    "RunnerError",
    "RunnerUnavailable",
]
