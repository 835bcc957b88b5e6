"""Result artifacts: reading them from /output under the cap, and their wire form."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import timedelta
from pathlib import Path

import pytest

from fairu.agent.artifacts import artifact_bytes, read_artifacts
from fairu.protocol.errors import ErrorCode, JobError
from fairu.protocol.models import Artifact, FinalStatus, JobResult, JobSpec, utc_now


def test_read_artifacts_returns_bytes_and_digest(tmp_path: Path) -> None:
    (tmp_path / "predictions.json").write_bytes(b"[1, 2]")
    (tmp_path / "extra.txt").write_bytes(b"x")

    artifacts = read_artifacts(tmp_path, ["predictions.json", "extra.txt"], 100)

    assert [a.name for a in artifacts] == ["predictions.json", "extra.txt"]
    assert artifacts[0].size == 6
    assert artifacts[0].sha256 == hashlib.sha256(b"[1, 2]").hexdigest()
    assert base64.b64decode(artifacts[0].data) == b"[1, 2]"
    assert artifact_bytes(artifacts[0]) == b"[1, 2]"


def test_read_artifacts_missing_file(tmp_path: Path) -> None:
    with pytest.raises(JobError) as caught:
        read_artifacts(tmp_path, ["predictions.json"], 100)

    assert caught.value.code == ErrorCode.MISSING_ARTIFACT
    assert "/output/predictions.json" in caught.value.message


def test_read_artifacts_symlink_counts_as_missing(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("key")
    output = tmp_path / "output"
    output.mkdir()
    (output / "predictions.json").symlink_to(secret)

    with pytest.raises(JobError) as caught:
        read_artifacts(output, ["predictions.json"], 100)

    assert caught.value.code == ErrorCode.MISSING_ARTIFACT


def test_read_artifacts_over_cap_counts_all_files(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 60)
    (tmp_path / "b").write_bytes(b"y" * 60)

    assert len(read_artifacts(tmp_path, ["a"], 60)) == 1
    with pytest.raises(JobError) as caught:
        read_artifacts(tmp_path, ["a", "b"], 100)

    assert caught.value.code == ErrorCode.ARTIFACTS_TOO_LARGE
    assert "agent.max_artifact_bytes of 100 bytes" in caught.value.message


def test_artifact_bytes_detects_tampering() -> None:
    artifact = Artifact(
        name="p.json",
        sha256=hashlib.sha256(b"abc").hexdigest(),
        size=3,
        data=base64.b64encode(b"abd").decode(),
    )

    with pytest.raises(JobError):
        artifact_bytes(artifact)


def _job(**fields: object) -> JobSpec:
    now = utc_now()
    return JobSpec(
        job_id="job-1",
        competition="c",
        queue="cpu",
        submission_id="s",
        image="img",
        command=["true"],
        created_at=now,
        expires_at=now + timedelta(hours=1),
        **fields,  # type: ignore[arg-type]
    )


def test_job_without_artifacts_serializes_as_before() -> None:
    data = json.loads(_job().model_dump_json())

    assert "artifacts" not in data


def test_job_artifacts_round_trip() -> None:
    job = _job(artifacts=["predictions.json"])

    again = JobSpec.model_validate_json(job.model_dump_json())

    assert again.artifacts == ["predictions.json"]


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", ".hidden", ""])
def test_job_rejects_artifact_paths(name: str) -> None:
    with pytest.raises(ValueError):
        _job(artifacts=[name])


def test_result_without_artifacts_serializes_as_before() -> None:
    result = JobResult(
        job_id="job-1", agent_id="a", site="s", status=FinalStatus.SUCCEEDED,
        finished_at=utc_now(),
    )

    assert "artifacts" not in json.loads(result.model_dump_json())
