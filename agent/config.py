"""The site config: one TOML file that an operator writes and `fairu-agent start` reads.

Relative paths in the file are resolved against the folder that contains the file.
Unknown keys are errors, so a misspelt setting never silently falls back to a default.
"""

from __future__ import annotations

import os
import pwd
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from fairu.protocol.errors import ConfigError
from fairu.protocol.models import MAX_ARTIFACT_BYTES, Name
from fairu.protocol.signing import (
    DEFAULT_MAX_MESSAGE_BYTES,
    describe_validation,
    key_id_for,
    load_public_key_text,
)
from fairu.protocol.topology import class_needs_gpu, job_queue_name

from .session import check_amqp_url
from .unpack import UnpackLimits


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteSection(Section):
    name: Name


class BrokerSection(Section):
    url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    heartbeat_s: Annotated[int, Field(ge=0, le=600)] = 30

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        check_amqp_url(url)
        return url


class TrustSection(Section):
    # The root public key that certifies job-signing keys (base64), inline or in a file.
    root_key: str | None = None
    root_key_file: Path | None = None
    # Job-signing keys trusted without a certificate, inline or in files.
    signing_keys: list[str] = []
    signing_key_files: list[Path] = []


class PolicySection(Section):
    """The competitions, images and resources this site accepts. Empty lists accept everything the queues deliver."""

    competitions: list[Name] = []
    # Image reference prefixes, e.g. "ghcr.io/higgsml/" or "localhost/".
    allowed_images: list[str] = []
    # Images outside localhost/ must be pinned by digest (name@sha256:...).
    require_digest: bool = True
    max_cpus: Annotated[float, Field(gt=0)] | None = None
    max_memory_mb: Annotated[int, Field(gt=0)] | None = None
    max_gpus: Annotated[int, Field(ge=0)] | None = None
    max_walltime_s: Annotated[int, Field(gt=0)] | None = None
    # Jobs with network = "egress" get outbound access only where this is true.
    allow_egress: bool = False


class InputsSection(Section):
    """Caps on each unpacked input bundle (`unpack = "tar"` or `"zip"`)."""

    max_unpacked_bytes: Annotated[int, Field(gt=0)] = UnpackLimits.max_bytes
    max_unpacked_members: Annotated[int, Field(gt=0)] = UnpackLimits.max_members
    max_unpacked_member_bytes: Annotated[int, Field(gt=0)] = (
        UnpackLimits.max_member_bytes
    )
    max_compression_ratio: Annotated[float, Field(gt=0)] = UnpackLimits.max_ratio

    def unpack_limits(self) -> UnpackLimits:
        return UnpackLimits(
            max_bytes=self.max_unpacked_bytes,
            max_members=self.max_unpacked_members,
            max_member_bytes=self.max_unpacked_member_bytes,
            max_ratio=self.max_compression_ratio,
        )


class QueueSection(Section):
    competition: Name
    # The queue's resource class, such as "cpu", "gpu" or "gpu-large".
    name: Name
    # Whether the queue's jobs use GPUs, which bounds its prefetch by the free GPUs.
    # Unset, it is true for classes whose name starts with "gpu".
    gpu: bool | None = None

    @property
    def needs_gpu(self) -> bool:
        return class_needs_gpu(self.name) if self.gpu is None else self.gpu

    @property
    def amqp_name(self) -> str:
        return job_queue_name(self.competition, self.name)


# A lease must outlast this many heartbeat intervals.
LEASE_TTL_MIN_HEARTBEATS = 3
# The maximum time a status event may be held, so that a watcher learns a job's
# state within a minute.
STATUS_INTERVAL_MAX_S = 60.0


class AgentSection(Section):
    state_dir: Path
    slots: Annotated[int, Field(ge=1, le=1024)] = 1
    heartbeat_interval_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    stop_grace_s: Annotated[float, Field(ge=0, le=7 * 24 * 3600)] = 30.0
    # Seconds the coordinator keeps a claimed job's lease without a heartbeat that
    # renews it; after that it queues the job again (docs/delivery.md).
    lease_ttl_s: Annotated[float, Field(gt=0, le=86400)] = 60.0
    # Seconds a job runs before the agent claims it and acks its delivery. A job
    # that ends sooner needs no lease, so it is acked after its result. 0 claims
    # every job before it starts. Keep it well under the broker's consumer_timeout
    # (30 minutes by default), which closes the channel of a delivery left unacked
    # longer.
    claim_after_s: Annotated[float, Field(ge=0, le=86400)] = 30.0
    max_message_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = (
        DEFAULT_MAX_MESSAGE_BYTES
    )
    # Most bytes of the files a job's `artifacts` names, all together, returned in
    # its result; a job over it fails with artifacts_too_large.
    max_artifact_bytes: Annotated[int, Field(ge=0, le=MAX_ARTIFACT_BYTES)] = (
        MAX_ARTIFACT_BYTES
    )
    # Clock skew tolerated when checking created_at and expires_at.
    clock_skew_s: Annotated[float, Field(ge=0, le=3600)] = 60.0
    # Minimum time from a job's start to its first published status event, and
    # between two published events of one job. The newest event within it waits
    # until it ends. 0 publishes each event at once.
    status_interval_s: float = 0.5
    health_listen: str = "127.0.0.1:0"
    # A one-time token from `fairu-admin agents enroll`, inline or in a file; the
    # coordinator approves the agent on its first registration with it.
    enrollment_token: str | None = None
    enrollment_token_file: Path | None = None

    @field_validator("status_interval_s")
    @classmethod
    def _check_status_interval(cls, value: float) -> float:
        if not 0 <= value <= STATUS_INTERVAL_MAX_S:
            raise ValueError(
                f"{value:g} is not a number of seconds from 0 to "
                f"{STATUS_INTERVAL_MAX_S:g}; set 0 to publish every status event at "
                "once, or a fraction of a second such as the default 0.5"
            )
        return value

    @model_validator(mode="after")
    def _check_lease_ttl(self) -> AgentSection:
        if self.lease_ttl_s < LEASE_TTL_MIN_HEARTBEATS * self.heartbeat_interval_s:
            raise ValueError(
                f"lease_ttl_s {self.lease_ttl_s:g} is less than {LEASE_TTL_MIN_HEARTBEATS} "
                f"heartbeat intervals ({self.heartbeat_interval_s:g} s); raise "
                "lease_ttl_s or lower heartbeat_interval_s, so that one late heartbeat "
                "does not send a running job to another agent"
            )
        return self

    def read_enrollment_token(self) -> str | None:
        if self.enrollment_token_file is None:
            return self.enrollment_token
        try:
            return self.enrollment_token_file.read_text().strip() or None
        except OSError as exc:
            raise ConfigError(
                f"cannot read agent.enrollment_token_file {self.enrollment_token_file}: "
                f"{exc.strerror}"
            ) from None


class ResourcesSection(Section):
    """Resources kept back from jobs, and how assigned GPUs are named to podman."""

    reserve_cpus: Annotated[float, Field(ge=0)] = 0.0
    reserve_memory_mb: Annotated[int, Field(ge=0)] = 0
    # GPUs kept back: NVML indices (0), GPU or MIG UUIDs, or "GPU:MIG" indices ("0:1").
    reserve_gpus: list[int | str] = []
    # CDI device names as `nvidia-ctk cdi generate --device-name-strategy` makes
    # them: "index" gives nvidia.com/gpu=0 (MIG: 0:1), "uuid" gives the UUID.
    cdi_device_names: Literal["index", "uuid"] = "index"
    cdi_kind: Annotated[str, Field(pattern=r"^[a-z0-9.-]+/[a-z0-9_.-]+$")] = (
        "nvidia.com/gpu"
    )


class PodmanSection(Section):
    # Either the API socket URL, or the user whose rootless socket to use.
    socket: str | None = None
    user: str | None = None
    tmpfs_size: Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]*[kmg]?$")] = "256m"
    shm_size: str = "64m"
    log_cap_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    log_file_max_bytes: Annotated[int, Field(ge=1024)] = 32 * 1024 * 1024
    ulimits: dict[str, tuple[int, int]] = {}
    # Numeric UID:GID that jobs run as inside the container.
    container_user: Annotated[str, Field(pattern=r"^[0-9]+:[0-9]+$")] = "1000:1000"
    output_max_bytes: Annotated[int, Field(gt=0)] = 1024**3
    output_max_entries: Annotated[int, Field(gt=0)] = 10_000
    block_user_namespaces: bool = True

    @field_validator("ulimits")
    @classmethod
    def _check_ulimits(cls, ulimits: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        for name, (soft, hard) in ulimits.items():
            if name not in ULIMIT_NAMES:
                raise ValueError(f"unknown ulimit {name!r}; use one of {', '.join(ULIMIT_NAMES)}")
            if not 0 <= soft <= hard:
                raise ValueError(f"ulimit {name}: need 0 <= soft <= hard, got [{soft}, {hard}]")
        return ulimits

    def socket_url(self) -> str:
        if self.socket and self.user:
            raise ConfigError("set either runner.podman.socket or runner.podman.user, not both")
        if self.socket:
            return self.socket
        if self.user:
            try:
                uid = pwd.getpwnam(self.user).pw_uid
            except KeyError:
                raise ConfigError(
                    f"runner.podman.user {self.user!r} does not exist on this host; "
                    "create it (scripts/setup-host.sh does) or set runner.podman.socket"
                ) from None
        else:
            uid = os.getuid()
        return f"unix:///run/user/{uid}/podman/podman.sock"


# The rlimit names podman accepts (without RLIMIT_), as in `podman run --ulimit`.
ULIMIT_NAMES = (
    "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice",
    "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack",
)


class RunnerSection(Section):
    kind: Literal["podman", "null"] = "podman"
    # Stop at start, instead of serving with a warning, when the runtime cannot
    # enforce the memory, CPU and pids cgroup limits (rootless podman on cgroup v1).
    require_cgroup_limits: bool = False
    podman: PodmanSection = PodmanSection()


class SiteConfig(Section):
    site: SiteSection
    broker: BrokerSection = BrokerSection()
    trust: TrustSection
    agent: AgentSection
    queues: Annotated[list[QueueSection], Field(min_length=1)]
    policy: PolicySection = PolicySection()
    resources: ResourcesSection = ResourcesSection()
    inputs: InputsSection = InputsSection()
    runner: RunnerSection = RunnerSection()

    @model_validator(mode="after")
    def _check_unique_queues(self) -> SiteConfig:
        seen: set[str] = set()
        for queue in self.queues:
            if queue.amqp_name in seen:
                raise ValueError(
                    f"[[queues]] lists competition {queue.competition!r} name "
                    f"{queue.name!r} twice; remove the second entry"
                )
            seen.add(queue.amqp_name)
        return self

    def root_key(self) -> Ed25519PublicKey | None:
        if self.trust.root_key and self.trust.root_key_file:
            raise ConfigError("set either trust.root_key or trust.root_key_file, not both")
        text = self.trust.root_key
        if self.trust.root_key_file is not None:
            try:
                text = self.trust.root_key_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read trust.root_key_file {self.trust.root_key_file}: "
                    f"{exc.strerror}; write it with `fairu-admin keys init-root`"
                ) from None
        if not text:
            return None
        setting = "trust.root_key"
        if self.trust.root_key_file is not None:
            setting = f"trust.root_key_file {self.trust.root_key_file}"
        return _load_key(text, setting)

    def trusted_keys(self) -> dict[str, Ed25519PublicKey]:
        keys: dict[str, Ed25519PublicKey] = {}
        texts = [(text, "trust.signing_keys") for text in self.trust.signing_keys]
        for path in self.trust.signing_key_files:
            try:
                texts.append((path.read_text().strip(), f"trust.signing_key_files {path}"))
            except OSError as exc:
                raise ConfigError(
                    f"cannot read trust.signing_key_files entry {path}: {exc.strerror}; "
                    "write it with `fairu-admin keys init` or fix the path"
                ) from None
        for text, setting in texts:
            key = _load_key(text, setting)
            keys[key_id_for(key)] = key
        if not keys and self.root_key() is None:
            raise ConfigError(
                "the [trust] section names no key: set root_key (or root_key_file) to "
                "the platform's root public key, or list signing_keys"
            )
        return keys


def _load_key(text: str, setting: str) -> Ed25519PublicKey:
    """Parse a public key from the config, naming the setting it came from on error."""
    try:
        return load_public_key_text(text)
    except ConfigError as exc:
        raise ConfigError(f"{setting}: {exc}") from None


def load_config(path: Path) -> SiteConfig:
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read site config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"site config {path} is not valid TOML: {exc}") from None
    try:
        config = SiteConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid site config {path}: {describe_validation(exc)}") from None
    return _resolve_paths(config, path.parent.resolve())


def _resolve_paths(config: SiteConfig, base: Path) -> SiteConfig:
    def resolve(value: Path) -> Path:
        value = value.expanduser()
        return value if value.is_absolute() else base / value

    trust = config.trust.model_copy(
        update={
            "signing_key_files": [resolve(p) for p in config.trust.signing_key_files],
            "root_key_file": resolve(config.trust.root_key_file)
            if config.trust.root_key_file
            else None,
        }
    )
    agent = config.agent.model_copy(
        update={
            "state_dir": resolve(config.agent.state_dir),
            "enrollment_token_file": resolve(config.agent.enrollment_token_file)
            if config.agent.enrollment_token_file
            else None,
        }
    )
    return config.model_copy(update={"trust": trust, "agent": agent})
