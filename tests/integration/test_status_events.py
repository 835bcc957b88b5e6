"""Status events of a job on the real broker: which states a watcher receives."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fairu.protocol.models import FinalStatus, JobResult, JobState

from .agent_jobs import sleeping_command, watch_status

pytestmark = [pytest.mark.broker, pytest.mark.podman]


@pytest.fixture
def watched_job(
    broker_url, competition, start_agent, signing_key, publish, results, make_job
) -> Any:
    """Return a coroutine function that runs one job on a fresh agent and returns the
    states its watcher received, with the job's result."""

    async def run(
        job_fields: dict[str, Any], **agent_options: Any
    ) -> tuple[list[JobState], JobResult]:
        start_agent(competition, **agent_options)
        job = make_job(competition, **job_fields)
        watcher, events = await watch_status(broker_url, job.job_id)
        try:
            await publish(competition, signing_key.sign(job))
            result = await results.wait(job.job_id)
            # Longer than the default interval of 0.5 s, so a held event would arrive.
            await asyncio.sleep(1.5)
        finally:
            await watcher.close()
        assert all(event.at <= result.finished_at for event in events)
        return [event.state for event in events], result

    return run


async def test_short_job_publishes_no_status(watched_job):
    states, result = await watched_job({}, runner="null")

    assert result.status is FinalStatus.SUCCEEDED
    assert states == []


async def test_interval_zero_publishes_every_state(watched_job):
    states, _result = await watched_job(
        {}, runner="null", agent_extra="status_interval_s = 0"
    )

    # A no-op job writes no files, so it has no reading_scores state.
    assert states == [JobState.VERIFIED, JobState.FETCHING, JobState.RUNNING]


async def test_container_job_publishes_newest_states(watched_job):
    states, result = await watched_job({"command": sleeping_command(3)})

    assert result.status is FinalStatus.SUCCEEDED
    # verified and fetching are replaced by running within the first 0.5 s.
    assert states == [JobState.RUNNING, JobState.READING_SCORES]
