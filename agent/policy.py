"""Site policy: which jobs this site accepts (competitions, images, resources, network),
and whether its host confines them well enough to serve at all."""

from __future__ import annotations

import logging

from fairu.protocol.errors import ErrorCode, RejectedError
from fairu.protocol.models import JobSpec, SandboxInfo

from .config import PolicySection, RunnerSection

logger = logging.getLogger(__name__)

LOCAL_IMAGE_PREFIX = "localhost/"


def check_policy(job: JobSpec, policy: PolicySection) -> None:
    """Raise `RejectedError` with the code of the first rule the job breaks."""
    if policy.competitions and job.competition not in policy.competitions:
        raise RejectedError(
            ErrorCode.COMPETITION_NOT_ALLOWED,
            f"competition {job.competition!r} is not accepted by this site "
            f"(policy.competitions: {', '.join(policy.competitions)})",
        )
    _check_image(job.image, policy)
    _check_resources(job, policy)
    if job.network == "egress" and not policy.allow_egress:
        raise RejectedError(
            ErrorCode.EGRESS_NOT_ALLOWED,
            f"job {job.job_id} requests network egress, which this site does not "
            "allow (policy.allow_egress)",
        )


def _check_image(image: str, policy: PolicySection) -> None:
    if policy.allowed_images and not any(image.startswith(p) for p in policy.allowed_images):
        raise RejectedError(
            ErrorCode.IMAGE_NOT_ALLOWED,
            f"image {image!r} matches none of policy.allowed_images "
            f"({', '.join(policy.allowed_images)})",
        )
    if policy.require_digest and not image.startswith(LOCAL_IMAGE_PREFIX):
        name, _, digest = image.partition("@sha256:")
        if not name or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise RejectedError(
                ErrorCode.IMAGE_NOT_ALLOWED,
                f"image {image!r} is not pinned by digest; reference it as "
                "NAME@sha256:<64 hex digits> (only localhost/ images may use a tag)",
            )


def _check_resources(job: JobSpec, policy: PolicySection) -> None:
    asked = job.resources
    limits = [
        ("cpus", asked.cpus, policy.max_cpus),
        ("memory_mb", asked.memory_mb, policy.max_memory_mb),
        ("gpus", asked.gpus, policy.max_gpus),
        ("walltime_s", asked.walltime_s, policy.max_walltime_s),
    ]
    for name, value, limit in limits:
        if limit is not None and value > limit:
            raise RejectedError(
                ErrorCode.RESOURCES_EXCEED_POLICY,
                f"job asks for {name} = {value:g}, above this site's limit of {limit:g} "
                f"(policy.max_{name})",
            )


def review_sandbox(
    sandbox: SandboxInfo, runner: RunnerSection, agent_id: str
) -> str | None:
    """Log what this host does not confine, and return why the agent must not serve.

    None means it may serve: the cgroup limits are enforced, or the site accepts
    kernel rlimits in their place (`runner.require_cgroup_limits = false`).
    """
    if sandbox.runner == "null":
        return None
    missing = [
        name
        for name, enforced in (
            ("memory", sandbox.memory_limit),
            ("CPU", sandbox.cpu_limit),
            ("pids", sandbox.pids_limit),
        )
        if not enforced
    ]
    if missing and runner.require_cgroup_limits:
        return (
            f"the {sandbox.runner} runtime cannot enforce the {', '.join(missing)} "
            f"cgroup limits on this host (rootless {sandbox.rootless}, cgroup "
            f"{sandbox.cgroup_version or 'unknown'}), and runner.require_cgroup_limits "
            "is true; use a host with cgroup v2 and delegated controllers, or set "
            "it to false to rely on kernel rlimits"
        )
    if missing:
        logger.warning(
            "agent %s: the %s runtime does not enforce the %s cgroup limits on this "
            "host (rootless %s, cgroup %s); kernel rlimits per process bound jobs "
            "instead, and docs/security.md lists what that leaves open",
            agent_id,
            sandbox.runner,
            ", ".join(missing),
            sandbox.rootless,
            sandbox.cgroup_version or "unknown",
        )
    if not sandbox.user_namespaces_blocked:
        logger.warning(
            "agent %s: jobs can create user namespaces, in which they can mount file "
            "systems that no limit bounds",
            agent_id,
        )
    return None
