"""Site policy: which competitions, images and resource requests this site accepts."""

from __future__ import annotations

from fairu.protocol.errors import ErrorCode, RejectedError
from fairu.protocol.models import JobSpec

from .config import PolicySection

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
