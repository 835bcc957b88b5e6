"""The work folder of a job: made only for a job whose runner writes to /output."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from pika.spec import BasicProperties

from fairu.agent.config import PolicySection
from fairu.agent.pipeline import JobPipeline, PipelineSettings
from fairu.agent.session import Delivery
from fairu.agent.state import Identity, StateDir
from fairu.protocol.errors import ErrorCode
from fairu.protocol.models import FinalStatus, JobResult, JobSpec, StatusEvent
from fairu.protocol.signing import generate_private_key, open_unverified
from fairu.runners.null import SHARD_COMMAND, NullRunner

from ..job_specs import job_spec

AGENT_ID = "site-0123456789ab"


class Results:
    """The publisher side of the pipeline, keeping each published result."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def publish_status(self, _event: StatusEvent) -> None:
        return None

    async def publish_result(self, _job_id: str, body: bytes, recorded: bool = False) -> None:
        self.bodies.append(body)


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[StateDir, list[str]]:
    """A prepared state folder that lists the job ids it made work folders for."""
    folder = StateDir(tmp_path / "state")
    folder.prepare()
    created: list[str] = []
    make = StateDir.make_work_dir

    def counted(self: StateDir, job_id: str) -> Path:
        created.append(job_id)
        return make(self, job_id)

    monkeypatch.setattr(StateDir, "make_work_dir", counted)
    yield folder, created
    folder.close()


async def run_job(folder: StateDir, job: JobSpec) -> JobResult:
    results = Results()
    pipeline = JobPipeline(
        PipelineSettings(site="laptop", max_message_bytes=1 << 20, clock_skew_s=60),
        Identity(agent_id=AGENT_ID, key=generate_private_key()),
        None,  # type: ignore[arg-type]  # execute() checks no signature
        PolicySection(),
        folder,
        None,  # type: ignore[arg-type]  # a job without inputs fetches nothing
        NullRunner(),
        results,
    )
    delivery = Delivery(
        queue="fairu.jobs.higgs.cpu", delivery_tag=1, redelivered=False,
        exchange="fairu.jobs", routing_key="job.higgs.cpu",
        properties=BasicProperties(), body=b"signed job message",
    )
    await pipeline.execute(job, delivery)
    [body] = results.bodies
    return open_unverified(body, JobResult)


async def test_no_op_job_gets_no_folder(state):
    folder, created = state

    result = await run_job(folder, job_spec())

    assert result.status is FinalStatus.SUCCEEDED
    assert created == []
    assert result.scores == {}
    assert list(folder.work.iterdir()) == []


async def test_shard_job_gets_a_folder(state):
    folder, created = state
    command = [SHARD_COMMAND, "0", "0", "1", "0", "2"]

    result = await run_job(folder, job_spec(command=command, artifacts=["predictions.json"]))

    assert result.status is FinalStatus.SUCCEEDED
    assert created == ["job-1"]
    [artifact] = result.artifacts
    assert artifact.name == "predictions.json"
    assert b'"experiment": 1' in base64.b64decode(artifact.data)
    # The folder is removed once the outputs are read.
    assert list(folder.work.iterdir()) == []


async def test_artifacts_need_a_folder(state):
    """A job that names artifacts gets a folder even from a runner that writes none."""
    folder, created = state

    result = await run_job(folder, job_spec(artifacts=["report.txt"]))

    assert created == ["job-1"]
    assert result.status is FinalStatus.FAILED
    assert result.error is not None
    assert result.error.code == ErrorCode.MISSING_ARTIFACT
