"""A `Runner` that runs job containers through the podman REST API (podman-py).

The API service usually belongs to an unprivileged user (rootless podman), and the agent
may run as root beside it: see docs/podman.md. podman-py is synchronous, so every call
runs in a worker thread and the event loop never waits on the socket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import re
import secrets
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import podman
import requests
import urllib3
from podman.api import stream_frames
from podman.domain.containers import Container
from podman.errors import APIError, ImageNotFound, NotFound

from .base import ContainerError, RunnerError, RunnerUnavailable, RunOutcome, RunSpec

logger = logging.getLogger(__name__)

T = TypeVar("T")

MIB = 1024 * 1024
SETUP_HINT = (
    "start the podman API service (scripts/setup-host.sh starts it for the user fairu)"
)
# Podman reports "stopped" for a container whose process ended through `podman stop`.
FINISHED_STATES = frozenset({"exited", "stopped"})
# After SIGKILL, how long to wait for podman to report the container as exited.
KILL_WAIT_S = 30.0
# The first state check after the start waits this long, and each later wait is this
# fraction of the run time so far, up to `PodmanSettings.poll_interval_s`.
FIRST_POLL_S = 0.05
POLL_FRACTION = 0.2
# Inspect requests per state check when podman fails them while the container exits.
INSPECT_ATTEMPTS = 3
INSPECT_RETRY_S = 0.1
CONTAINER_NAME_MAX_JOB_CHARS = 48


def _default_socket_url() -> str:
    return f"unix:///run/user/{os.getuid()}/podman/podman.sock"


def _default_ulimits() -> dict[str, tuple[int, int]]:
    return {
        "nofile": (1024, 1024),
        # RLIMIT_NPROC counts every process and thread of the host UID that the
        # container user maps to. Container root maps to the rootless user itself, so
        # its podman service, its conmon processes and all other job containers count
        # against this limit too.
        "nproc": (512, 512),
        "fsize": (1024 * MIB, 1024 * MIB),
    }


@dataclass(frozen=True)
class PodmanSettings:
    """Connection and sandbox settings of a `PodmanRunner`.

    `ulimits` maps podman's ulimit names (nofile, nproc, fsize, data, ...) to
    (soft, hard) values, and a dict given here replaces the defaults as a whole.
    `data` defaults to each job's `RunSpec.memory_mb`, because rootless podman on
    cgroup v1 ignores memory limits and RLIMIT_DATA is what bounds the heap there.
    Set `data` here to override it for every job.
    """

    socket_url: str = field(default_factory=_default_socket_url)
    # OCI runtime of each container, such as "runc". None uses the service's default.
    runtime: str | None = None
    ulimits: dict[str, tuple[int, int]] = field(default_factory=_default_ulimits)
    # Size of the tmpfs at /tmp, in podman's notation ("256m", "1g").
    tmpfs_size: str = "256m"
    # Maximum bytes of log output kept per job. Earlier output is dropped.
    log_cap_bytes: int = 1 * MIB
    # Maximum interval between two state checks of a running container, in seconds.
    # Checks start more often, see `PodmanRunner._poll_delay`.
    poll_interval_s: float = 0.5
    # Limit of one API request in seconds. Container creation is one request, and with
    # the vfs storage driver it includes copying the whole image.
    api_timeout_s: float = 300.0
    # cgroup pids limit per container. Like memory and CPU limits, rootless podman on
    # cgroup v1 ignores it.
    pids_limit: int = 1024

    def __post_init__(self) -> None:
        scheme = urlparse(self.socket_url).scheme
        if scheme not in {"unix", "http+unix", "tcp", "http", "ssh", "http+ssh"}:
            raise ValueError(f"invalid podman socket URL {self.socket_url!r}")
        if self.log_cap_bytes < 1:
            raise ValueError(
                f"log_cap_bytes must be positive, not {self.log_cap_bytes}"
            )
        if self.poll_interval_s <= 0:
            raise ValueError(
                f"poll_interval_s must be positive, not {self.poll_interval_s}"
            )
        for name, (soft, hard) in self.ulimits.items():
            if soft > hard:
                raise ValueError(
                    f"ulimit {name}: soft limit {soft} exceeds hard limit {hard}"
                )

    @property
    def socket_path(self) -> Path | None:
        """Path of the API socket, or None for a socket URL that is not a local file."""
        parsed = urlparse(self.socket_url)
        if parsed.scheme not in {"unix", "http+unix"}:
            return None
        return Path(parsed.netloc + parsed.path)


class _TailBuffer:
    """The last `max_bytes` bytes of a byte stream, and the stream's total length."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.total_bytes = 0
        self._chunks: deque[bytes] = deque()
        self._kept_bytes = 0

    def append(self, data: bytes) -> None:
        self.total_bytes += len(data)
        self._chunks.append(data)
        self._kept_bytes += len(data)
        # Drop whole chunks while the rest still covers max_bytes, so memory stays
        # below max_bytes plus one chunk.
        while self._kept_bytes - len(self._chunks[0]) >= self.max_bytes:
            self._kept_bytes -= len(self._chunks.popleft())

    def value(self) -> bytes:
        return b"".join(self._chunks)[-self.max_bytes :]


@dataclass(frozen=True)
class _SocketOwner:
    uid: int
    gid: int
    group_ids: frozenset[int]


class PodmanRunner:
    """Runner that runs each job in a fresh, locked-down container, then removes it."""

    name = "podman"

    def __init__(self, settings: PodmanSettings | None = None) -> None:
        self.settings = settings or PodmanSettings()
        self._client = podman.PodmanClient(
            base_url=self.settings.socket_url, timeout=self.settings.api_timeout_s
        )
        # Removals of containers whose creation was in flight when run() was cancelled.
        self._cleanups: set[asyncio.Task[None]] = set()

    async def check(self) -> None:
        answered = await self._call("ping", self._client.ping)
        if not answered:
            raise RunnerUnavailable(
                f"the podman API service at {self.settings.socket_url} returned an "
                f"error to _ping; {SETUP_HINT}"
            )

    async def run(self, spec: RunSpec) -> RunOutcome:
        """Run the job's container until it exits or its walltime ends.

        `exit_code` is None when the walltime ended first: the runner then kills the
        container with SIGKILL and sets `timed_out`. `run_s` counts from the start of
        the container to its exit on a monotonic clock.
        """
        await asyncio.to_thread(self._prepare_bind_sources, spec)
        container = await self._create(spec)
        try:
            await self._call(
                f"start container {container.id[:12]} for job {spec.job_id}",
                container.start,
            )
            started = time.monotonic()
            logger.info("job %s: started container %s", spec.job_id, container.id[:12])
            exit_code = await self._wait(
                container, spec, deadline=started + spec.walltime_s
            )
            run_s = time.monotonic() - started
            log_tail, log_truncated = await asyncio.to_thread(
                self._read_log_tail, container, spec
            )
        finally:
            await self._remove(container, spec.job_id)
        return RunOutcome(
            exit_code=exit_code,
            timed_out=exit_code is None,
            log_tail=log_tail,
            log_truncated=log_truncated,
            run_s=run_s,
        )

    async def remove_labelled(self, agent_id: str) -> int:
        containers = await self._call(
            f"list the containers of agent {agent_id}",
            self._client.containers.list,
            all=True,
            filters={"label": f"fairu.agent_id={agent_id}"},
        )
        removed = 0
        for container in containers:
            job_id = container.labels.get("fairu.job_id", "?")
            try:
                await self._call(
                    f"remove container {container.id[:12]}",
                    container.remove,
                    force=True,
                )
            except ContainerError as error:
                if isinstance(error.__cause__, NotFound):
                    continue
                logger.warning(
                    "job %s: failed to remove leftover container %s: %s",
                    job_id,
                    container.id[:12],
                    error,
                )
                continue
            logger.info(
                "job %s: removed leftover container %s", job_id, container.id[:12]
            )
            removed += 1
        return removed

    async def close(self) -> None:
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
        await asyncio.to_thread(self._client.close)

    # --- container lifecycle ------------------------------------------------------

    async def _create(self, spec: RunSpec) -> Container:
        name = _container_name(spec.job_id)
        options = self._create_options(spec, name)
        creation = asyncio.ensure_future(
            self._call(
                f"create container {name} from image {spec.image}",
                self._client.containers.create,
                spec.image,
                spec.command,
                **options,
            )
        )
        try:
            # The worker thread cannot be cancelled, so a cancelled run() leaves the
            # creation going and removes the container once it exists.
            container = await asyncio.shield(creation)
        except asyncio.CancelledError:
            cleanup = asyncio.ensure_future(
                self._remove_when_created(creation, spec.job_id)
            )
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)
            raise
        except ContainerError as error:
            if _is_missing_image(error.__cause__):
                raise ContainerError(
                    f"image {spec.image} not found in the store of the podman service "
                    f"at {self.settings.socket_url}; build it as the socket's user "
                    "(for localhost/fairu-python:1: scripts/build-image.sh) or pull it"
                ) from error.__cause__
            raise
        logger.info(
            "job %s: created container %s (%s) from image %s",
            spec.job_id,
            container.id[:12],
            name,
            spec.image,
        )
        return container

    def _create_options(self, spec: RunSpec, name: str) -> dict[str, Any]:
        labels = dict(spec.labels)
        labels.setdefault("fairu.job_id", spec.job_id)

        environment = {"HOME": "/tmp", **spec.env}
        # "void" hides every GPU from the NVIDIA container hooks, even when the image
        # sets NVIDIA_VISIBLE_DEVICES=all.
        environment["NVIDIA_VISIBLE_DEVICES"] = _nvidia_visible_devices(
            spec.gpu_devices
        )

        ulimits = dict(self.settings.ulimits)
        memory_bytes = spec.memory_mb * MIB
        ulimits.setdefault("data", (memory_bytes, memory_bytes))

        mounts: list[dict[str, Any]] = [
            # Exec stays allowed on /tmp: /output is writable and executable anyway, and
            # some tools run code that they write to temporary files.
            {
                "type": "tmpfs",
                "source": "tmpfs",
                "target": "/tmp",
                "size": self.settings.tmpfs_size,
            },
            {
                "type": "bind",
                "source": str(spec.output_dir),
                "target": "/output",
                "read_only": False,
            },
        ]
        for mount in spec.mounts:
            mounts.append(
                {
                    "type": "bind",
                    "source": str(mount.source),
                    "target": mount.target,
                    "read_only": mount.read_only,
                }
            )

        options: dict[str, Any] = {
            "name": name,
            "labels": labels,
            "environment": environment,
            "working_dir": "/output",
            "network_mode": "none",
            "read_only": True,
            "mounts": mounts,
            "cap_drop": ["ALL"],
            # A stop, and so a forced removal, sends SIGKILL at once instead of SIGTERM
            # and a 10 s wait, because a job has no state worth a graceful stop.
            "stop_timeout": 0,
            # podman-py maps `security_opt` to SELinux options, so no-new-privileges
            # has its own keyword.
            "no_new_privileges": True,
            "ulimits": [
                {"Name": limit, "Soft": soft, "Hard": hard}
                for limit, (soft, hard) in ulimits.items()
            ],
            # For hosts where podman can use cgroups (rootful, or rootless on cgroup
            # v2 with the controllers delegated). Rootless podman 4.3 on cgroup v1
            # drops them, with a warning in the create response that podman-py
            # discards.
            "mem_limit": memory_bytes,
            "cpu_period": 100_000,
            "cpu_quota": max(1_000, int(spec.cpus * 100_000)),
            "pids_limit": self.settings.pids_limit,
            # CDI device names such as "nvidia.com/gpu=0".
            # NOTE: never run here, because fairu's test hosts have no GPU.
            "devices": list(spec.gpu_devices),
        }
        if self.settings.runtime:
            options["runtime"] = self.settings.runtime
        return options

    async def _wait(
        self, container: Container, spec: RunSpec, deadline: float
    ) -> int | None:
        """Poll the container until it exits and return its exit code.

        At the deadline, kill it and return None.
        """
        action = f"inspect container {container.id[:12]} of job {spec.job_id}"
        while True:
            await self._inspect(container, spec, action)
            if container.status in FINISHED_STATES:
                exit_code = int(container.attrs["State"]["ExitCode"])
                logger.info(
                    "job %s: container %s exited with code %d",
                    spec.job_id,
                    container.id[:12],
                    exit_code,
                )
                return exit_code
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await self._kill(container, spec)
                return None
            await asyncio.sleep(min(self._poll_delay(deadline - spec.walltime_s), remaining))

    async def _inspect(self, container: Container, spec: RunSpec, action: str) -> None:
        """Reload the container's state, retrying the failure podman reports at its exit.

        podman 4.3.1 can fail an inspect of a container whose process is exiting with
        HTTP 500 "read /proc/<pid>/cgroup: no such process", and a later inspect
        shows the container exited. Other errors are raised at once.
        """
        for attempt in range(1, INSPECT_ATTEMPTS + 1):
            try:
                await self._call(action, container.reload)
                return
            except ContainerError as error:
                if attempt == INSPECT_ATTEMPTS or not _is_exit_race(error.__cause__):
                    raise
                logger.info(
                    "job %s: inspect of container %s failed while it exited (%s); "
                    "retrying in %.1f s",
                    spec.job_id,
                    container.id[:12],
                    error,
                    INSPECT_RETRY_S,
                )
            await asyncio.sleep(INSPECT_RETRY_S)

    def _poll_delay(self, started: float) -> float:
        """Return the wait before the next state check of a container started at `started`.

        With a fixed interval, a job that runs for a fraction of a second waits up to
        that interval for its result. Waiting a fifth of the run time so far bounds
        the delay after the exit to FIRST_POLL_S or a fifth of the run time, whichever
        is larger, and never more than poll_interval_s.
        """
        elapsed = time.monotonic() - started
        return min(self.settings.poll_interval_s, max(FIRST_POLL_S, elapsed * POLL_FRACTION))

    async def _kill(self, container: Container, spec: RunSpec) -> None:
        logger.warning(
            "job %s: walltime of %.1f s exceeded, killing container %s",
            spec.job_id,
            spec.walltime_s,
            container.id[:12],
        )
        try:
            await self._call(
                f"kill container {container.id[:12]}", container.kill, signal="SIGKILL"
            )
        except ContainerError as error:
            # The process may have exited between the last poll and the kill.
            logger.info(
                "job %s: kill of container %s failed: %s",
                spec.job_id,
                container.id[:12],
                error,
            )
        kill_deadline = time.monotonic() + KILL_WAIT_S
        while time.monotonic() < kill_deadline:
            await self._call(f"inspect container {container.id[:12]}", container.reload)
            if container.status in FINISHED_STATES:
                logger.info(
                    "job %s: container %s killed", spec.job_id, container.id[:12]
                )
                return
            await asyncio.sleep(min(self.settings.poll_interval_s, 0.2))
        logger.warning(
            "job %s: container %s still %s %.0f s after SIGKILL; removing it by force",
            spec.job_id,
            container.id[:12],
            container.status,
            KILL_WAIT_S,
        )

    async def _remove(self, container: Container, job_id: str) -> None:
        """Remove the container by force, logging a failure instead of raising it.

        run() calls this from a `finally` block, where raising would hide the
        original error.
        """
        try:
            await asyncio.to_thread(container.remove, force=True)
        except NotFound:
            logger.info(
                "job %s: container %s was already removed", job_id, container.id[:12]
            )
        except (
            APIError,
            requests.RequestException,
            urllib3.exceptions.HTTPError,
        ) as error:
            logger.error(
                "job %s: failed to remove container %s: %s; remove_labelled() can "
                "remove it later",
                job_id,
                container.id[:12],
                error,
            )
        else:
            logger.info("job %s: removed container %s", job_id, container.id[:12])

    async def _remove_when_created(
        self, creation: asyncio.Future[Container], job_id: str
    ) -> None:
        try:
            container = await creation
        except RunnerError as error:
            logger.info(
                "job %s: container creation after cancel failed: %s", job_id, error
            )
            return
        await self._remove(container, job_id)

    # --- logs ---------------------------------------------------------------------

    def _read_log_tail(self, container: Container, spec: RunSpec) -> tuple[str, bool]:
        """Return the last `log_cap_bytes` of stdout and stderr together, decoded.

        The whole log streams through a bounded buffer, so the count of dropped bytes is
        exact. A failure to read the log is logged and noted in the returned text,
        because the job's exit code is still valid. Runs in a worker thread.
        """
        # NOTE: the logs API's `tail` parameter would skip most of a long log, but
        # podman 4.3.1 returns wrong bytes with it for lines longer than conmon's 8 KiB
        # buffer. Reading the whole log took 1.3 s per 300,000 short lines on a 2-core
        # Debian 12 VM, so a flood of tiny lines delays the job's result.
        response = None
        try:
            response = self._client.api.get(
                f"/containers/{container.id}/logs",
                params={"stdout": True, "stderr": True, "follow": False},
                stream=True,
            )
            response.raise_for_status()
            tail = _TailBuffer(self.settings.log_cap_bytes)
            # Each frame is one log line or one piece of a line longer than conmon's
            # buffer.
            for frame in stream_frames(response):
                tail.append(frame)
        except (
            APIError,
            requests.RequestException,
            urllib3.exceptions.HTTPError,
            OSError,
        ) as error:
            logger.warning(
                "job %s: failed to read the log of container %s: %s",
                spec.job_id,
                container.id[:12],
                error,
            )
            return f"[fairu: reading the container log failed: {error}]\n", False
        finally:
            if response is not None:
                response.close()
        kept_bytes = tail.value()
        dropped = tail.total_bytes - len(kept_bytes)
        if not dropped:
            return _decode(kept_bytes), False
        marker = f"[fairu: {dropped} earlier bytes of log dropped]\n"
        return marker + _decode(kept_bytes), True

    # --- bind mounts --------------------------------------------------------------

    def _prepare_bind_sources(self, spec: RunSpec) -> None:
        """Make the bind-mount sources usable by the user that the API service runs as.

        When this process is root and the socket belongs to another user, the output
        directory is handed to that user, because container root is that user on the
        host. Every source must be reachable through directories that user can search.
        Runs in a worker thread.
        """
        if not spec.output_dir.is_dir():
            raise ContainerError(
                f"output directory {spec.output_dir} of job {spec.job_id} not found"
            )
        for mount in spec.mounts:
            if not Path(mount.source).exists():
                raise ContainerError(
                    f"bind-mount source {mount.source} of job {spec.job_id} not found"
                )
        owner = self._socket_owner()
        if owner is None or owner.uid == os.geteuid():
            return
        if os.geteuid() == 0:
            os.chown(spec.output_dir, owner.uid, owner.gid)
        sources = [spec.output_dir, *(mount.source for mount in spec.mounts)]
        for source in sources:
            blocked = _first_unsearchable_directory(Path(source), owner)
            if blocked is not None:
                raise ContainerError(
                    f"bind-mount source {source} of job {spec.job_id} is not reachable "
                    f"by uid {owner.uid}, the owner of the podman socket: directory "
                    f"{blocked} is missing or lacks search (x) permission for that "
                    "uid; keep job folders under directories that it can search "
                    "(mode 0755)"
                )

    def _socket_owner(self) -> _SocketOwner | None:
        path = self.settings.socket_path
        if path is None:
            return None
        try:
            info = path.stat()
        except OSError:
            # An absent socket surfaces as RunnerUnavailable on the first API call.
            return None
        try:
            entry = pwd.getpwuid(info.st_uid)
            group_ids = frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
            gid = entry.pw_gid
        except KeyError:
            gid = info.st_gid
            group_ids = frozenset({gid})
        return _SocketOwner(uid=info.st_uid, gid=gid, group_ids=group_ids)

    # --- error mapping ------------------------------------------------------------

    async def _call(
        self, action: str, function: Callable[..., T], *args: Any, **kwargs: Any
    ) -> T:
        """Run a podman-py call in a worker thread, mapping errors to runner errors."""
        try:
            return await asyncio.to_thread(function, *args, **kwargs)
        except APIError as error:
            raise self._map_api_error(action, error) from error
        except (requests.RequestException, urllib3.exceptions.HTTPError) as error:
            raise self._unavailable(action, error) from error

    def _map_api_error(self, action: str, error: APIError) -> Exception:
        if error.response is None:
            # podman-py wraps connection failures and timeouts in an APIError without a
            # response, with the underlying error as its __cause__.
            return self._unavailable(action, error.__cause__ or error)
        return ContainerError(f"failed to {action}: {error.explanation or error}")

    def _unavailable(self, action: str, cause: BaseException) -> RunnerUnavailable:
        path = self.settings.socket_path
        if path is not None and not path.exists():
            problem = f"socket {path} not found"
        else:
            problem = f"no connection or no answer: {cause}"
        return RunnerUnavailable(
            f"failed to {action}: the podman API service at "
            f"{self.settings.socket_url} is unavailable ({problem}); {SETUP_HINT}"
        )


def _container_name(job_id: str) -> str:
    """Return a unique container name that podman accepts, built from the job id."""
    safe_job_id = re.sub(r"[^a-zA-Z0-9_.-]+", "-", job_id).strip("-.")
    safe_job_id = safe_job_id[:CONTAINER_NAME_MAX_JOB_CHARS] or "job"
    return f"fairu-{safe_job_id}-{secrets.token_hex(4)}"


def _is_missing_image(error: BaseException | None) -> bool:
    if isinstance(error, ImageNotFound):
        return True
    # podman 4.3.1 answers a create with a missing image with 500 "image not known",
    # not 404, so podman-py raises a plain APIError.
    return isinstance(error, APIError) and "image not known" in (
        error.explanation or ""
    )


def _is_exit_race(error: BaseException | None) -> bool:
    return isinstance(error, APIError) and "no such process" in (error.explanation or "")


def _nvidia_visible_devices(gpu_devices: Iterable[str]) -> str:
    """Return NVIDIA_VISIBLE_DEVICES for CDI names like "nvidia.com/gpu=0".

    "nvidia.com/gpu=0" and "nvidia.com/gpu=2" give "0,2"; no devices give "void".
    """
    indices = [device.rpartition("=")[2] for device in gpu_devices]
    return ",".join(indices) if indices else "void"


def _decode(data: bytes) -> str:
    # A cut through a multi-byte character at the start becomes U+FFFD.
    return data.decode("utf-8", errors="replace")


def _first_unsearchable_directory(path: Path, owner: _SocketOwner) -> Path | None:
    """Return the first directory on the way to `path` that `owner` cannot search.

    A directory that does not exist counts as unsearchable. None means all are fine.
    """
    resolved = path.resolve()
    directories = list(reversed(resolved.parents))
    if resolved.is_dir():
        directories.append(resolved)
    for directory in directories:
        try:
            info = directory.stat()
        except FileNotFoundError:
            return directory
        if info.st_uid == owner.uid:
            searchable = info.st_mode & stat.S_IXUSR
        elif info.st_gid in owner.group_ids:
            searchable = info.st_mode & stat.S_IXGRP
        else:
            searchable = info.st_mode & stat.S_IXOTH
        if not searchable:
            return directory
    return None
