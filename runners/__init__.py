"""Container runtimes behind one interface (`Runner`)."""

from .base import ContainerError, Mount, Runner, RunnerError, RunnerUnavailable, RunOutcome, RunSpec

__all__ = [
    "ContainerError",
    "Mount",
    "RunOutcome",
    "RunSpec",
    "Runner",
    "RunnerError",
    "RunnerUnavailable",
]
