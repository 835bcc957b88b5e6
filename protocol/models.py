"""Versioned wire models. Every model forbids unknown fields and is immutable.

Payload models carry `protocol` and a `kind` literal, so a payload signed for one
purpose never validates as another. Sizes are capped here so that a hostile message
is rejected by validation instead of exhausting an agent.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    model_serializer,
)

PROTOCOL_VERSION = 1

# Competition, queue and input names end up in queue names and paths, so they are
# kept to a conservative alphabet without dots or slashes.
Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Base64Text = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]*={0,2}$")]
ShortText = Annotated[str, StringConstraints(max_length=4096)]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
ScoreName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
# The UUID NVML reports for a GPU ("GPU-...") or a MIG device ("MIG-...").
GpuUuid = Annotated[str, StringConstraints(max_length=128)]
# A file name directly in a job's /output folder.
ArtifactName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]

# The maximum bytes of result artifacts, all files together, in one result.
# A result envelope contains the artifacts base64-encoded inside a payload that is itself
# base64-encoded, so 8 MiB of files take about 14.9 MB of the envelope's 16 MiB.
MAX_ARTIFACT_BYTES = 8 * 1024 * 1024
MAX_ARTIFACTS = 16

MAX_LOG_TAIL_CHARS = 64 * 1024


class Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, allow_inf_nan=False
    )


# --- Signed envelope -------------------------------------------------------------


class Certificate(Model):
    """A signing key's certificate: `body` is the exact bytes of a `CertificateBody`
    as the root key signed them."""

    body: Annotated[Base64Text, StringConstraints(max_length=4096)]
    signature: Annotated[Base64Text, StringConstraints(max_length=128)]


class CertificateBody(Model):
    protocol: Literal[1] = PROTOCOL_VERSION
    kind: Literal["key_certificate"] = "key_certificate"
    key_id: Identifier
    public_key: Annotated[Base64Text, StringConstraints(max_length=64)]
    not_before: AwareDatetime
    not_after: AwareDatetime
    # The key id of the root key that issued the certificate.
    issuer: Identifier


class RevocationList(Model):
    """Revoked job-signing key ids, signed by the root key; a higher version wins."""

    protocol: Literal[1] = PROTOCOL_VERSION
    kind: Literal["revocation_list"] = "revocation_list"
    version: Annotated[int, Field(ge=1)]
    revoked: Annotated[list[Identifier], Field(max_length=100_000)]
    issued_at: AwareDatetime
    issuer: Identifier


class RootRotation(Model):
    """One link of the root chain: the root of `version - 1` names its successor."""

    protocol: Literal[1] = PROTOCOL_VERSION
    kind: Literal["root_rotation"] = "root_rotation"
    version: Annotated[int, Field(ge=2)]
    new_root_key: Annotated[Base64Text, StringConstraints(max_length=64)]
    issued_at: AwareDatetime
    issuer: Identifier


class RootChain(Model):
    """Every rotation since the first root, each an envelope signed by the root it replaces.

    An agent walks the links from the root it holds; a link that its current root
    did not sign breaks the chain and nothing after it is accepted.
    """

    protocol: Literal[1] = PROTOCOL_VERSION
    kind: Literal["root_chain"] = "root_chain"
    links: Annotated[list[Envelope], Field(max_length=1000)]


class Envelope(Model):
    """A payload and the Ed25519 signature over its exact bytes.

    `payload` is base64 of the bytes that were signed; the receiver verifies the
    signature before it decodes those bytes as JSON. `certificate`, when present,
    vouches for the key named by `key_id`.
    """

    protocol: Literal[1] = PROTOCOL_VERSION
    key_id: Identifier
    signature: Annotated[Base64Text, StringConstraints(max_length=128)]
    payload: Annotated[Base64Text, StringConstraints(max_length=16 * 1024 * 1024)]
    certificate: Certificate | None = None


# --- Jobs ------------------------------------------------------------------------


class InputSpec(Model):
    """One input file, fetched by URL and checked against its digest and size."""

    name: Name
    url: Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$", max_length=2048)]
    sha256: Sha256Hex
    size: Annotated[int, Field(ge=0, le=64 * 1024**3)]
    # A single path component; the input appears at /inputs/<mount> in the container.
    mount: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
    # "tar" extracts a tar archive (optionally gzip-, bzip2- or xz-compressed) and
    # "zip" a zip archive into /inputs/<mount>/.
    unpack: Literal["none", "tar", "zip"] = "none"


class Resources(Model):
    """The resources a job requests; the agent starts it only when all of it is free."""

    cpus: Annotated[float, Field(gt=0, le=1024)] = 1.0
    memory_mb: Annotated[int, Field(gt=0, le=16 * 1024 * 1024)] = 1024
    gpus: Annotated[int, Field(ge=0, le=64)] = 0
    walltime_s: Annotated[int, Field(gt=0, le=7 * 24 * 3600)] = 3600
    # Minimum total memory of each assigned GPU (or MIG device), in MiB.
    gpu_memory_mb: Annotated[int, Field(gt=0, le=16 * 1024 * 1024)] | None = None
    # A GPU model that the name NVML reports must contain, case-insensitively,
    # such as "A100" or "H100 80GB".
    gpu_model: (
        Annotated[str, StringConstraints(min_length=1, max_length=128)] | None
    ) = None

    @model_serializer(mode="wrap")
    def _omit_unset_gpu_conditions(self, handler: SerializerFunctionWrapHandler) -> Any:
        # Agents of the first release reject unknown fields, so a job that sets
        # neither condition is serialized exactly as those agents expect.
        data = handler(self)
        for name in ("gpu_memory_mb", "gpu_model"):
            if data.get(name) is None:
                data.pop(name, None)
        return data


class JobSpec(Model):
    """One evaluation job: an image, a command, its inputs and its resource request.

    The container writes its scores to /output/scores.json.
    """

    protocol: Literal[1] = PROTOCOL_VERSION
    kind: Literal["job"] = "job"
    job_id: Identifier
    competition: Name
    queue: Name
    submission_id: Identifier
    image: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    command: Annotated[list[ShortText], Field(min_length=1, max_length=64)]
    env: Annotated[dict[EnvName, ShortText], Field(max_length=64)] = {}
    inputs: Annotated[list[InputSpec], Field(max_length=32)] = []
    resources: Resources = Resources()
    # "egress" requests outbound network access, which a site grants only when its
    # policy allows it. "none" gives the container a loopback interface only.
    network: Literal["none", "egress"] = "none"
    created_at: AwareDatetime
    expires_at: AwareDatetime
    # Files of /output that the agent returns in the result, besides scores.json.
    artifacts: Annotated[list[ArtifactName], Field(max_length=MAX_ARTIFACTS)] = []

    @model_serializer(mode="wrap")
    def _omit_empty_artifacts(self, handler: SerializerFunctionWrapHandler) -> Any:
        # Agents of the first release reject unknown fields.
        return _omit_empty(handler(self), "artifacts")


class CancelRequest(Model):
    """Ends a job wherever it is; signed like a job, with a certified signing key."""

    protocol: Literal[1] = PROTOCOL_VERSION
    kind: Literal["cancel"] = "cancel"
    job_id: Identifier
    reason: Annotated[str, StringConstraints(max_length=1024)] = ""
    at: AwareDatetime


# --- Events and results ----------------------------------------------------------

# The largest signed lease event the coordinator reads. Its job message is base64
# inside a payload that is base64 again, so this fits job messages up to about 2 MiB.
MAX_LEASE_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_LEASED_MESSAGE_CHARS = MAX_LEASE_MESSAGE_BYTES * 3 // 4


class JobState(StrEnum):
    RECEIVED = "received"
    VERIFIED = "verified"
    FETCHING = "fetching"
    RUNNING = "running"
    READING_SCORES = "reading_scores"


class FinalStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    TIMED_OUT = "timed_out"
    # The output folder passed the site's size or file-count cap, so the job was killed.
    OUTPUT_TOO_LARGE = "output_too_large"
    CANCELLED = "cancelled"


class StatusEvent(Model):
    protocol: Literal[1] = PROTOCOL_VERSION
    kind: Literal["status"] = "status"
    job_id: Identifier
    agent_id: Identifier
    state: JobState
    at: AwareDatetime
    detail: Annotated[str, StringConstraints(max_length=1024)] = ""


class LeaseAction(StrEnum):
    CLAIM = "claim"
    RELEASE = "release"


class LeaseEvent(Model):
    """An agent's claim on a job whose delivery it acks, or the release of that claim.

    `job_message` is the base64 of the exact signed job message, and `routing_key`
    its key on `fairu.jobs`, so the coordinator can queue the job again unchanged.
    The coordinator counts `ttl_s` from when it reads the claim or a heartbeat that
    lists the job, on its own clock.
    """

    protocol: Literal[1] = PROTOCOL_VERSION
    kind: Literal["lease"] = "lease"
    action: LeaseAction
    agent_id: Identifier
    job_id: Identifier
    routing_key: Annotated[str, StringConstraints(max_length=255)]
    job_message: Annotated[str, StringConstraints(max_length=MAX_LEASED_MESSAGE_CHARS)]
    ttl_s: Annotated[float, Field(gt=0, le=86400)]
    at: AwareDatetime


class ErrorInfo(Model):
    code: str
    message: Annotated[str, StringConstraints(max_length=4096)]


class Durations(Model):
    """Seconds spent in each stage of the pipeline, from a monotonic clock."""

    fetch_s: Annotated[float, Field(ge=0)] = 0.0
    run_s: Annotated[float, Field(ge=0)] = 0.0
    total_s: Annotated[float, Field(ge=0)] = 0.0


class Artifact(Model):
    """One output file returned in a result: its name in /output and its bytes."""

    name: ArtifactName
    sha256: Sha256Hex
    size: Annotated[int, Field(ge=0, le=MAX_ARTIFACT_BYTES)]
    # Base64 of the file's bytes.
    data: Annotated[Base64Text, StringConstraints(max_length=(MAX_ARTIFACT_BYTES + 2) // 3 * 4)]


class JobResult(Model):
    """The one final result of a job on an agent; `error` is set unless it succeeded.

    `authenticated` is false when the message was rejected before its signature
    checked out: `job_id` is then only what the unverified payload claimed, or
    "unknown", and the platform must not record the result as that job's outcome.
    """

    protocol: Literal[1] = PROTOCOL_VERSION
    kind: Literal["result"] = "result"
    job_id: Identifier
    authenticated: bool = True
    agent_id: Identifier
    site: Name
    competition: Name | None = None
    queue: Name | None = None
    submission_id: Identifier | None = None
    status: FinalStatus
    exit_code: int | None = None
    scores: Annotated[dict[ScoreName, float], Field(max_length=256)] = {}
    log_tail: Annotated[str, StringConstraints(max_length=MAX_LOG_TAIL_CHARS)] = ""
    log_truncated: bool = False
    durations: Durations = Durations()
    error: ErrorInfo | None = None
    finished_at: AwareDatetime
    # UUIDs of the GPUs or MIG devices the job was given.
    gpus: Annotated[list[GpuUuid], Field(max_length=64)] = []
    # The files the job's `artifacts` named, read from /output after the run.
    artifacts: Annotated[list[Artifact], Field(max_length=MAX_ARTIFACTS)] = []

    @model_serializer(mode="wrap")
    def _omit_empty_artifacts(self, handler: SerializerFunctionWrapHandler) -> Any:
        # Coordinators of the first release reject unknown fields.
        return _omit_empty(handler(self), "artifacts")


# --- Agents ----------------------------------------------------------------------


class MigDeviceInfo(Model):
    """One MIG device of a GPU in MIG mode; jobs are given MIG devices, not the GPU."""

    index: Annotated[int, Field(ge=0)]
    uuid: Annotated[str, StringConstraints(max_length=128)]
    name: Annotated[str, StringConstraints(max_length=256)] | None = None
    memory_total_bytes: Annotated[int, Field(ge=0)] | None = None
    memory_free_bytes: Annotated[int, Field(ge=0)] | None = None
    gpu_instance_id: Annotated[int, Field(ge=0)] | None = None
    compute_instance_id: Annotated[int, Field(ge=0)] | None = None


class GpuInfo(Model):
    """A GPU as NVML reports it. A field is None where NVML does not support it."""

    index: Annotated[int, Field(ge=0)]
    uuid: Annotated[str, StringConstraints(max_length=128)]
    name: Annotated[str, StringConstraints(max_length=256)]
    memory_total_bytes: Annotated[int, Field(ge=0)] | None = None
    memory_free_bytes: Annotated[int, Field(ge=0)] | None = None
    # CUDA compute capability as "major.minor", such as "9.0".
    compute_capability: Annotated[str, StringConstraints(max_length=16)] | None = None
    # The current MIG mode: True enabled, False disabled, None not supported.
    mig_enabled: bool | None = None
    mig_devices: Annotated[list[MigDeviceInfo], Field(max_length=64)] = []


class ResourceAmounts(Model):
    """An amount of agent resources: a total offered to jobs, or the part free now.

    `gpus` contains the UUIDs of whole GPUs and of MIG devices, each given to one job
    at a time.
    """

    cpus: Annotated[float, Field(ge=0)]
    memory_bytes: Annotated[int, Field(ge=0)]
    gpus: Annotated[list[GpuUuid], Field(max_length=1024)] = []
    slots: Annotated[int, Field(ge=0)]


class AgentState(StrEnum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


class SandboxInfo(Model):
    """The confinement the agent's runner gives jobs on this host, probed when the agent starts.

    Each `*_limit` field is true where the runtime enforces the cgroup limit of that
    resource. Rootless podman on cgroup v1 enforces none of them, and kernel rlimits
    per process (`rlimits`) are then the only bound on processes, memory and CPU time.
    """

    runner: Annotated[str, StringConstraints(max_length=64)]
    rootless: bool
    cgroup_version: Literal["v1", "v2"] | None = None
    memory_limit: bool
    cpu_limit: bool
    pids_limit: bool
    rlimits: bool
    # Whether jobs are kept from creating user namespaces of their own, in which
    # they could mount file systems (such as a tmpfs) that no limit bounds.
    user_namespaces_blocked: bool

    @property
    def cgroup_limits_enforced(self) -> bool:
        return self.memory_limit and self.cpu_limit and self.pids_limit


class Registration(Model):
    """Sent once per broker session; `public_key` is the agent's Ed25519 identity."""

    protocol: Literal[1] = PROTOCOL_VERSION
    kind: Literal["registration"] = "registration"
    agent_id: Identifier
    site: Name
    version: Annotated[str, StringConstraints(max_length=64)]
    public_key: Annotated[Base64Text, StringConstraints(max_length=64)]
    cpu_cores: Annotated[int, Field(ge=0)]
    memory_bytes: Annotated[int, Field(ge=0)]
    gpus: Annotated[list[GpuInfo], Field(max_length=256)] = []
    queues: Annotated[list[Annotated[str, StringConstraints(max_length=255)]], Field(max_length=256)]
    slots: Annotated[int, Field(ge=0)]
    running_jobs: Annotated[list[Identifier], Field(max_length=1024)] = []
    free_slots: Annotated[int, Field(ge=0)]
    # A one-time token from `fairu-admin agents enroll`; it approves the agent once.
    enrollment_token: Annotated[str, StringConstraints(max_length=128)] | None = None
    # None from agents older than this field.
    sandbox: SandboxInfo | None = None
    at: AwareDatetime
    # Fields below came after the first release and default to "not reported".
    # Cores after the cgroup CPU quota; may be fractional, such as 1.5.
    usable_cpus: Annotated[float, Field(ge=0)] | None = None
    memory_available_bytes: Annotated[int, Field(ge=0)] | None = None
    scratch_free_bytes: Annotated[int, Field(ge=0)] | None = None
    driver_version: Annotated[str, StringConstraints(max_length=64)] | None = None
    cuda_version: Annotated[str, StringConstraints(max_length=16)] | None = None
    heartbeat_interval_s: Annotated[float, Field(gt=0)] = 10.0
    # What the agent offers to jobs in total (after the site's reservations), and
    # the part of it that is free now.
    capacity: ResourceAmounts | None = None
    free: ResourceAmounts | None = None


class Heartbeat(Model):
    protocol: Literal[1] = PROTOCOL_VERSION
    kind: Literal["heartbeat"] = "heartbeat"
    agent_id: Identifier
    site: Name
    state: AgentState
    running_jobs: Annotated[list[Identifier], Field(max_length=1024)] = []
    free_slots: Annotated[int, Field(ge=0)]
    at: AwareDatetime
    capacity: ResourceAmounts | None = None
    free: ResourceAmounts | None = None


def _omit_empty(data: Any, name: str) -> Any:
    if isinstance(data, dict) and not data.get(name):
        data.pop(name, None)
    return data


def utc_now() -> datetime:
    return datetime.now(UTC)
