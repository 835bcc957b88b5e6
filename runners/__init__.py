"""Container runtimes behind one interface (`Runner`).

The podman runner is imported on first use of its names, because podman-py and
the requests stack it brings cost an agent with another runner about 8 MB.
"""

from typing import TYPE_CHECKING, Any

from .base import ContainerError, Mount, Runner, RunnerError, RunnerUnavailable, RunOutcome, RunSpec

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name in ("PodmanRunner", "PodmanSettings"):
        from . import podman

        return getattr(podman, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
