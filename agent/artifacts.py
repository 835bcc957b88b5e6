"""Read the result artifacts a job names from its /output folder, under a size cap."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from pathlib import Path

from fairu.protocol.errors import ErrorCode, JobError
from fairu.protocol.models import Artifact


def read_artifacts(
    output_dir: Path, names: Sequence[str], max_bytes: int
) -> list[Artifact]:
    """Return the named files as artifacts; raise `JobError` for a missing file or
    when their sizes add up to more than `max_bytes`. Blocking: call it in a thread."""
    paths = []
    total = 0
    for name in dict.fromkeys(names):
        path = output_dir / name
        # A symlink could point the agent at any file it can read, so it counts as missing.
        if path.is_symlink() or not path.is_file():
            raise JobError(
                ErrorCode.MISSING_ARTIFACT,
                f"the container wrote no /output/{name}, which the job lists in "
                "`artifacts`; write that file or remove it from the list",
            )
        total += path.stat().st_size
        if total > max_bytes:
            raise JobError(
                ErrorCode.ARTIFACTS_TOO_LARGE,
                f"the artifacts {', '.join(names)} add up to more than this site's "
                f"agent.max_artifact_bytes of {max_bytes} bytes (at /output/{name}); "
                "return smaller files",
            )
        paths.append(path)
    artifacts = []
    for path in paths:
        data = path.read_bytes()
        artifacts.append(
            Artifact(
                name=path.name,
                sha256=hashlib.sha256(data).hexdigest(),
                size=len(data),
                data=base64.b64encode(data).decode("ascii"),
            )
        )
    return artifacts


def artifact_bytes(artifact: Artifact) -> bytes:
    """Decode an artifact and check it against its size and sha256."""
    data = base64.b64decode(artifact.data, validate=True)
    if len(data) != artifact.size or hashlib.sha256(data).hexdigest() != artifact.sha256:
        raise JobError(
            ErrorCode.BAD_PAYLOAD,
            f"artifact {artifact.name} does not match its size or sha256",
        )
    return data
