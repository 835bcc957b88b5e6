"""Result artifacts returned by a real agent from a rootless podman job's /output."""

from __future__ import annotations

import base64
import hashlib

import pytest

from fairu.protocol.errors import ErrorCode
from fairu.protocol.models import FinalStatus

pytestmark = [pytest.mark.broker, pytest.mark.podman]


async def test_artifacts_returned_missing_and_over_cap(
    competition, start_agent, signing_key, publish, results, make_job
):
    start_agent(competition, agent_extra="max_artifact_bytes = 1000")
    write = "import sys; open('/output/predictions.json', 'w').write('x' * int(sys.argv[1]))"
    returned = make_job(
        competition, command=["python3", "-c", write, "10"], artifacts=["predictions.json"]
    )
    missing = make_job(
        competition, command=["python3", "-c", "print('no file')"],
        artifacts=["predictions.json"],
    )
    too_large = make_job(
        competition, command=["python3", "-c", write, "2000"],
        artifacts=["predictions.json"],
    )
    for job in (returned, missing, too_large):
        await publish(competition, signing_key.sign(job))

    result = await results.wait(returned.job_id, timeout_s=180)
    assert result.status is FinalStatus.SUCCEEDED, result
    assert result.scores == {}
    [artifact] = result.artifacts
    assert artifact.name == "predictions.json"
    assert base64.b64decode(artifact.data) == b"x" * 10
    assert artifact.sha256 == hashlib.sha256(b"x" * 10).hexdigest()

    result = await results.wait(missing.job_id, timeout_s=180)
    assert result.status is FinalStatus.FAILED
    assert result.error is not None
    assert result.error.code == ErrorCode.MISSING_ARTIFACT
    assert result.artifacts == []

    result = await results.wait(too_large.job_id, timeout_s=180)
    assert result.status is FinalStatus.FAILED
    assert result.error is not None
    assert result.error.code == ErrorCode.ARTIFACTS_TOO_LARGE
    assert "1000 bytes" in result.error.message
