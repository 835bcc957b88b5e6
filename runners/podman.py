"""A `Runner` that runs job containers through the podman REST API (podman-py).

The API service usually belongs to an unprivileged user (rootless podman), and the agent
may run as root beside it: see docs/podman.md. podman-py is synchronous, so every call
runs in a worker thread and the event loop never waits on the socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
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

from fairu.protocol.models import SandboxInfo

from .base import ContainerError, RunnerError, RunnerUnavailable, RunOutcome, RunSpec
from .output import OutputLimits, check_output
from .seccomp import block_user_namespaces

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
GIB = 1024 * MIB
# CPU seconds that RLIMIT_CPU allows beyond the job's cpus × walltime_s, so that the
# walltime, not this backstop, ends a job that merely runs too long.
CPU_LIMIT_GRACE_S = 30
PODMAN_COMMAND_TIMEOUT_S = 300.0


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


def _parse_user(user: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+):(\d+)", user)
    if match is None:
        raise ValueError(f"invalid container user {user!r}: expected numeric UID:GID")
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class PodmanSettings:
    """Connection and sandbox settings of a `PodmanRunner`.

    `ulimits` maps podman's ulimit names (nofile, nproc, fsize, data, ...) to
    (soft, hard) values, and a dict given here replaces the defaults as a whole.
    `data` defaults to each job's `RunSpec.memory_mb`, because rootless podman on
    cgroup v1 ignores memory limits and RLIMIT_DATA is what bounds the heap there.
    `cpu` defaults to the job's cpus × walltime_s plus CPU_LIMIT_GRACE_S, in CPU
    seconds per process. Set `data` or `cpu` here to override it for every job.
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
    # Numeric UID:GID that the job runs as. Rootless podman maps a non-zero UID to a
    # subordinate UID of the socket's user, which owns nothing else on the host.
    user: str = "1000:1000"
    # Size of /dev/shm, in podman's notation.
    shm_size: str = "64m"
    # Caps on /output, checked every output_check_interval_s seconds and once more
    # after the exit. A job can write about write speed × interval past the cap.
    output_max_bytes: int = 1 * GIB
    output_max_entries: int = 10_000
    output_check_interval_s: float = 0.1
    # Size at which conmon starts the container's log file over, bounding its disk use
    # and the time to read it back. Must be at least log_cap_bytes.
    log_file_max_bytes: int = 32 * MIB
    # Run jobs under podman's default seccomp profile with new user namespaces
    # blocked (see seccomp.py). False uses the service's default profile unchanged.
    block_user_namespaces: bool = True

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
        _parse_user(self.user)
        if self.log_file_max_bytes < self.log_cap_bytes:
            raise ValueError(
                f"log_file_max_bytes ({self.log_file_max_bytes}) must be at least "
                f"log_cap_bytes ({self.log_cap_bytes})"
            )
        if self.output_max_bytes < 1 or self.output_max_entries < 1:
            raise ValueError("output_max_bytes and output_max_entries must be positive")

    @property
    def container_ids(self) -> tuple[int, int]:
        """The (UID, GID) that jobs run as inside the container."""
        return _parse_user(self.user)

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


@dataclass(frozen=True)
class _IdRange:
    container_id: int
    host_id: int
    size: int


@dataclass(frozen=True)
class _HostInfo:
    """The parts of the podman service's `GET /info` response that the runner uses."""

    rootless: bool
    cgroup_version: str | None
    cgroup_controllers: frozenset[str]
    uid_map: tuple[_IdRange, ...]
    gid_map: tuple[_IdRange, ...]
    seccomp_profile_path: str | None

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> _HostInfo:
        host = info.get("host") or {}
        security = host.get("security") or {}
        mappings = host.get("idMappings") or {}
        version = host.get("cgroupVersion")
        return cls(
            rootless=bool(security.get("rootless", False)),
            cgroup_version=version if version in ("v1", "v2") else None,
            cgroup_controllers=frozenset(host.get("cgroupControllers") or ()),
            uid_map=_id_ranges(mappings.get("uidmap")),
            gid_map=_id_ranges(mappings.get("gidmap")),
            seccomp_profile_path=security.get("seccompProfilePath") or None,
        )


@dataclass(frozen=True)
class _Ending:
    """The end of a container as `_wait` saw it. `exit_code` is None when killed."""

    exit_code: int | None
    timed_out: bool = False
    output_too_large: str | None = None


class _LogFileWatch:
    """Notices, from its size, when conmon starts the container's log file over.

    conmon 2.1 truncates the file in place once it would pass `log_file_max_bytes`
    (the inode stays the same, tested), so a size smaller than at the previous check
    means that earlier output is gone.
    """

    # NOTE: a restart goes unseen if conmon writes more than the whole limit between
    # two checks and the file ends up larger than before: 32 MiB in 10 ms is 3.4 GB/s.
    # On a 2-core VM, conmon 2.1.6 wrote 175 MB/s of log file for a flood of 12-byte
    # lines and 365 MB/s for 8 KB lines, with peaks near 670 MB/s over 50 ms.
    INTERVAL_S = 0.01

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.last_size = 0
        self.restarted = False

    async def watch(self) -> None:
        """Check the size every INTERVAL_S until cancelled.

        os.stat of a local file takes microseconds, so it runs on the event loop.
        """
        while True:
            self.observe()
            await asyncio.sleep(self.INTERVAL_S)

    def observe(self) -> None:
        if self.path is None:
            return
        try:
            size = os.stat(self.path).st_size
        except OSError:
            # Not on this host, or not readable by the agent's user.
            return
        if size < self.last_size:
            self.restarted = True
        self.last_size = size


class _OutputWatch:
    """Checks /output against its caps every interval, until the first violation.

    A check of 10,000 empty files took 72 ms on a 2-core VM, so the pause after a
    check is at least four times its duration, which keeps the walk under a fifth of
    one core.
    """

    def __init__(self, root: str, limits: OutputLimits) -> None:
        self.root = root
        self.limits = limits
        self.problem: str | None = None
        self._found = asyncio.Event()

    async def watch(self, interval_s: float) -> None:
        while self.problem is None:
            began = time.monotonic()
            self.problem = await asyncio.to_thread(check_output, self.root, self.limits)
            if self.problem is None:
                await asyncio.sleep(max(interval_s, 4 * (time.monotonic() - began)))
        self._found.set()

    async def wait(self, timeout_s: float) -> None:
        """Sleep `timeout_s`, or less when a violation is found meanwhile."""
        try:
            await asyncio.wait_for(self._found.wait(), timeout_s)
        except TimeoutError:
            pass


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
        self._host: _HostInfo | None = None
        # The derived seccomp profile, in a folder of its own that close() removes.
        self._seccomp_dir: Path | None = None
        # Concurrent runs write the profile from worker threads.
        self._seccomp_lock = threading.Lock()
        self._seccomp_unavailable_logged = False

    def writes_output(self, command: Sequence[str]) -> bool:
        return True

    async def check(self) -> None:
        answered = await self._call("ping", self._client.ping)
        if not answered:
            raise RunnerUnavailable(
                f"the podman API service at {self.settings.socket_url} returned an "
                f"error to _ping; {SETUP_HINT}"
            )

    async def describe_sandbox(self) -> SandboxInfo:
        """Report which limits this host enforces, from the service's host information.

        Rootful podman applies cgroup limits on cgroup v1 and v2. Rootless podman
        applies them only on cgroup v2, and only for the controllers delegated to its
        user. Rootless podman on cgroup v1 drops all of them.
        """
        # NOTE: only rootless podman on cgroup v1 has run this. The rootful and
        # cgroup v2 branches follow podman's documentation and are untested.
        host = await self._host_info()
        profile = await asyncio.to_thread(self._seccomp_profile, host)
        if not host.rootless:
            enforced = {"memory": True, "cpu": True, "pids": True}
        elif host.cgroup_version == "v2":
            enforced = {
                name: name in host.cgroup_controllers
                for name in ("memory", "cpu", "pids")
            }
        else:
            enforced = {"memory": False, "cpu": False, "pids": False}
        return SandboxInfo(
            runner=self.name,
            rootless=host.rootless,
            cgroup_version=host.cgroup_version,  # type: ignore[arg-type]
            memory_limit=enforced["memory"],
            cpu_limit=enforced["cpu"],
            pids_limit=enforced["pids"],
            rlimits=True,
            user_namespaces_blocked=profile is not None,
        )

    async def run(self, spec: RunSpec) -> RunOutcome:
        """Run the job's container until it exits, its walltime ends or /output
        passes its cap.

        `exit_code` is None when the runner killed the container with SIGKILL: at the
        walltime (`timed_out`) or for its output (`output_too_large`, which is also
        set for a container that exits past the cap). `run_s` counts from the start of
        the container to its exit on a monotonic clock.
        """
        host = await self._host_info()
        profile = await asyncio.to_thread(self._seccomp_profile, host)
        await asyncio.to_thread(self._prepare_bind_sources, spec, host)
        container = await self._create(spec, profile)
        log_watch = _LogFileWatch(_log_path(container))
        watching = asyncio.create_task(log_watch.watch())
        try:
            await self._start(container, spec)
            started = time.monotonic()
            logger.info("job %s: started container %s", spec.job_id, container.id[:12])
            ending = await self._wait(
                container, spec, deadline=started + spec.walltime_s
            )
            run_s = time.monotonic() - started
            watching.cancel()
            log_watch.observe()
            log_tail, log_truncated = await asyncio.to_thread(
                self._read_log_tail, container, spec, log_watch.restarted
            )
        finally:
            watching.cancel()
            await self._remove(container, spec.job_id)
            await asyncio.to_thread(self._reclaim_output, spec)
        return RunOutcome(
            exit_code=ending.exit_code,
            timed_out=ending.timed_out,
            log_tail=log_tail,
            log_truncated=log_truncated,
            run_s=run_s,
            output_too_large=ending.output_too_large,
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
        if self._seccomp_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self._seccomp_dir, True)
            self._seccomp_dir = None

    # --- host information and seccomp ---------------------------------------------

    async def _host_info(self) -> _HostInfo:
        if self._host is None:
            info = await self._call(
                "read the host information of the podman service", self._client.info
            )
            self._host = _HostInfo.from_info(info)
        return self._host

    def _seccomp_profile(self, host: _HostInfo) -> Path | None:
        """Return the path of the derived seccomp profile, writing it when missing.

        Return None, and so the service's default profile, when blocking user
        namespaces is off or the default profile cannot be read. Runs in a worker
        thread.
        """
        if not self.settings.block_user_namespaces:
            return None
        with self._seccomp_lock:
            return self._write_seccomp_profile(host)

    def _write_seccomp_profile(self, host: _HostInfo) -> Path | None:
        if self._seccomp_dir is not None:
            path = self._seccomp_dir / "seccomp.json"
            # A cleaner of /tmp may have removed it while the agent ran.
            if path.is_file():
                return path

        try:
            if host.seccomp_profile_path is None:
                raise ValueError("the service reports no default profile")
            default = json.loads(Path(host.seccomp_profile_path).read_text())
            derived = block_user_namespaces(default)
        except (OSError, ValueError) as error:
            if not self._seccomp_unavailable_logged:
                logger.warning(
                    "the default seccomp profile %s of the podman service cannot be "
                    "read (%s), so jobs keep podman's default profile and can create "
                    "user namespaces",
                    host.seccomp_profile_path,
                    error,
                )
                self._seccomp_unavailable_logged = True
            return None

        # The service reads the profile as the socket's user, so the folder and the
        # file are readable by every user. They hold nothing secret.
        folder = Path(tempfile.mkdtemp(prefix="fairu-seccomp-"))
        folder.chmod(0o755)
        path = folder / "seccomp.json"
        path.write_text(json.dumps(derived))
        path.chmod(0o644)
        if self._seccomp_dir is not None:
            shutil.rmtree(self._seccomp_dir, ignore_errors=True)
        self._seccomp_dir = folder
        logger.info(
            "wrote the job seccomp profile %s from %s", path, host.seccomp_profile_path
        )
        return path

    # --- container lifecycle ------------------------------------------------------

    async def _create(self, spec: RunSpec, seccomp_profile: Path | None) -> Container:
        name = _container_name(spec.job_id)
        options = self._create_options(spec, name, seccomp_profile)
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

    def _create_options(
        self, spec: RunSpec, name: str, seccomp_profile: Path | None
    ) -> dict[str, Any]:
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
        # The soft limit sends SIGXCPU, whose default action ends the process, and
        # the hard limit one second later SIGKILL.
        cpu_seconds = math.ceil(spec.cpus * spec.walltime_s) + CPU_LIMIT_GRACE_S
        ulimits.setdefault("cpu", (cpu_seconds, cpu_seconds + 1))

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
            "user": self.settings.user,
            "working_dir": "/output",
            "network_mode": "none",
            "read_only": True,
            "mounts": mounts,
            "shm_size": self.settings.shm_size,
            # podman's init (catatonit) is PID 1, so the job's processes get default
            # signal handling (the kernel drops SIGXCPU for a namespace's init) and
            # orphaned processes are reaped instead of counting against RLIMIT_NPROC.
            "init": True,
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
            "log_config": {
                "Type": "k8s-file",
                "Config": {"size": self.settings.log_file_max_bytes},
            },
        }
        if spec.egress:
            # slirp4netns gives the container its own network stack with outbound
            # access. allow_host_loopback=false keeps services on the host's 127.0.0.1,
            # such as RabbitMQ on fairu's hosts, out of reach.
            # NOTE: never run here: fairu's test hosts give the rootless user no
            # access to /dev/net/tun, which slirp4netns needs.
            options["network_mode"] = "slirp4netns"
            options["network_options"] = {"slirp4netns": ["allow_host_loopback=false"]}
        if seccomp_profile is not None:
            options["seccomp_profile_path"] = str(seccomp_profile)
        if self.settings.runtime:
            options["runtime"] = self.settings.runtime
        return options

    async def _start(self, container: Container, spec: RunSpec) -> None:
        starting = asyncio.ensure_future(
            self._call(
                f"start container {container.id[:12]} for job {spec.job_id}",
                container.start,
            )
        )
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            # The worker thread cannot be cancelled. A forced removal during the start
            # request can fail and leave the container running, so let the start end.
            await asyncio.gather(starting, return_exceptions=True)
            raise

    async def _wait(
        self, container: Container, spec: RunSpec, deadline: float
    ) -> _Ending:
        """Poll the container until it exits, while a task checks /output.

        At the deadline, or when /output passes its cap, kill the container.
        """
        action = f"inspect container {container.id[:12]} of job {spec.job_id}"
        watch = _OutputWatch(
            str(spec.output_dir),
            OutputLimits(
                max_bytes=self.settings.output_max_bytes,
                max_entries=self.settings.output_max_entries,
            ),
        )
        watching = asyncio.create_task(
            watch.watch(self.settings.output_check_interval_s)
        )
        try:
            while True:
                await self._inspect(container, spec, action)
                if container.status in FINISHED_STATES:
                    return await self._ended(container, spec, watch)
                if watch.problem:
                    await self._kill(container, spec, watch.problem)
                    return _Ending(None, output_too_large=watch.problem)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    await self._kill(
                        container, spec, f"walltime of {spec.walltime_s:.1f} s exceeded"
                    )
                    return _Ending(None, timed_out=True)
                delay = self._poll_delay(deadline - spec.walltime_s)
                await watch.wait(min(delay, remaining))
        finally:
            watching.cancel()

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

    async def _ended(
        self, container: Container, spec: RunSpec, watch: _OutputWatch
    ) -> _Ending:
        exit_code = int(container.attrs["State"]["ExitCode"])
        logger.info(
            "job %s: container %s exited with code %d",
            spec.job_id,
            container.id[:12],
            exit_code,
        )
        # The job may have written past the cap since the last check.
        problem = watch.problem or await asyncio.to_thread(
            check_output, watch.root, watch.limits
        )
        if problem:
            logger.warning("job %s: %s", spec.job_id, problem)
        return _Ending(exit_code, output_too_large=problem)

    async def _kill(self, container: Container, spec: RunSpec, reason: str) -> None:
        logger.warning(
            "job %s: %s, killing container %s", spec.job_id, reason, container.id[:12]
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

    def _read_log_tail(
        self, container: Container, spec: RunSpec, file_restarted: bool
    ) -> tuple[str, bool]:
        """Return the last `log_cap_bytes` of stdout and stderr together, decoded.

        The log file streams through a bounded buffer, so the count of bytes dropped
        here is exact. When conmon started the file over (`file_restarted`), the
        output before that is lost, and a first line states it. A failure to read the
        log is logged and noted in the returned text, because the job's exit code is
        still valid. Runs in a worker thread.
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
        markers = ""
        if file_restarted:
            markers += (
                "[fairu: the log file passed its limit of "
                f"{self.settings.log_file_max_bytes} bytes, so podman dropped earlier "
                "output]\n"
            )
        if dropped:
            markers += f"[fairu: {dropped} earlier bytes of log dropped]\n"
        return markers + _decode(kept_bytes), bool(markers)

    # --- bind mounts --------------------------------------------------------------

    def _prepare_bind_sources(self, spec: RunSpec, host: _HostInfo) -> None:
        """Make the bind-mount sources usable by the container and by the service.

        The output directory is handed to the host UID that the container user maps
        to, with mode 0700, so that no other user of the host can reach what the job
        writes, such as a setuid file. Every source must be reachable through
        directories that the socket's user can search, because the runtime mounts
        them as that user. Runs in a worker thread.
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
        self._hand_output_to_job_user(spec, host, owner)
        if owner is None or owner.uid == os.geteuid():
            return
        # The runtime needs search permission on the folders above a source, not on
        # the source itself, and the output directory is now closed to that user.
        sources = [spec.output_dir.parent, *(mount.source for mount in spec.mounts)]
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

    def _hand_output_to_job_user(
        self, spec: RunSpec, host: _HostInfo, owner: _SocketOwner | None
    ) -> None:
        uid, gid = self.settings.container_ids
        host_uid = _map_id(host.uid_map, uid, "UID")
        host_gid = _map_id(host.gid_map, gid, "GID")
        if os.geteuid() == 0:
            os.chown(spec.output_dir, host_uid, host_gid)
            os.chmod(spec.output_dir, 0o700)
        elif owner is not None and owner.uid == os.geteuid():
            # Only the user namespace of the socket's user can give a file to one of
            # its subordinate UIDs.
            # NOTE: this path (an agent running as the socket's user) has not run on
            # fairu's test hosts, where the agent runs as root.
            os.chmod(spec.output_dir, 0o700)
            _podman_unshare(
                ["chown", f"{uid}:{gid}", str(spec.output_dir)], spec.job_id
            )
        elif spec.output_dir.stat().st_uid != host_uid:
            raise ContainerError(
                f"output directory {spec.output_dir} of job {spec.job_id} must belong "
                f"to uid {host_uid}, which container user {uid} maps to; run the agent "
                "as root or as the owner of the podman socket, which can hand it over"
            )

    def _reclaim_output(self, spec: RunSpec) -> None:
        """Give the output tree back to an agent that runs as the socket's user.

        Without this, that agent could neither read files that the job made
        private nor remove the tree. Root needs neither. Failures are logged, because
        run() calls this from a `finally` block. Runs in a worker thread.
        """
        owner = self._socket_owner()
        if os.geteuid() == 0 or owner is None or owner.uid != os.geteuid():
            return
        try:
            # Container root is the socket's user. -h changes links, not their targets.
            _podman_unshare(
                ["chown", "-R", "-h", "0:0", str(spec.output_dir)], spec.job_id
            )
        except ContainerError as error:
            logger.error("job %s: %s", spec.job_id, error)

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


def _id_ranges(entries: Any) -> tuple[_IdRange, ...]:
    ranges = []
    for entry in entries or ():
        ranges.append(
            _IdRange(
                container_id=int(entry["container_id"]),
                host_id=int(entry["host_id"]),
                size=int(entry["size"]),
            )
        )
    return tuple(ranges)


def _map_id(ranges: tuple[_IdRange, ...], container_id: int, kind: str) -> int:
    """Return the host ID that `container_id` maps to. No ranges means no mapping."""
    if not ranges:
        return container_id
    for entry in ranges:
        if entry.container_id <= container_id < entry.container_id + entry.size:
            return entry.host_id + container_id - entry.container_id
    raise ContainerError(
        f"container {kind} {container_id} is outside the ID mappings of the podman "
        "service; choose a user inside its subordinate range (see /etc/subuid)"
    )


def _log_path(container: Container) -> str | None:
    log_config = (container.attrs.get("HostConfig") or {}).get("LogConfig") or {}
    return log_config.get("Path") or None


def _podman_unshare(arguments: list[str], job_id: str) -> None:
    """Run a command in the user namespace of this user's rootless podman."""
    command = ["podman", "unshare", *arguments]
    try:
        subprocess.run(
            command,
            check=True,
            capture_output=True,
            text=True,
            timeout=PODMAN_COMMAND_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        raise ContainerError(
            f"`{' '.join(command)}` for job {job_id} failed: {detail}; the agent needs "
            "the podman command of the socket's user on its PATH"
        ) from error


def _container_name(job_id: str) -> str:
    """Return a unique container name that podman accepts, built from the job id."""
    safe_job_id = re.sub(r"[^a-zA-Z0-9_.-]+", "-", job_id).strip("-.")
    safe_job_id = safe_job_id[:CONTAINER_NAME_MAX_JOB_CHARS] or "job"
    return f"fairu-{safe_job_id}-{secrets.token_hex(4)}"


def _is_missing_image(error: BaseException | None) -> bool:
    if isinstance(error, ImageNotFound):
        return True
    # podman 4.3.1 fails a create with a missing image with HTTP 500 "image not
    # known", not 404, so podman-py raises a plain APIError.
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
