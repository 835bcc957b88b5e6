"""The coordinator against the real broker: registry, one recorded result per job."""

from __future__ import annotations

import asyncio
import time

import pytest

from fairu.broker.coordinator import Coordinator
from fairu.broker.store import Store
from fairu.protocol.models import FinalStatus, JobResult, utc_now
from fairu.protocol.signing import generate_private_key, sign_model
from fairu.protocol.topology import RESULTS_EXCHANGE, result_routing_key

pytestmark = pytest.mark.broker


@pytest.fixture
async def coordinator(broker_url, tmp_path):
    store = Store(tmp_path / "coordinator.sqlite")
    service = Coordinator(broker_url, store)
    task = asyncio.create_task(service.run())
    yield service
    service.stopping.set()
    await asyncio.wait_for(task, 30)
    store.close()


async def wait_for(predicate, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"condition not met within {timeout_s:.0f} s")


async def test_result_recorded_once(
    coordinator, competition, start_agent, signing_key, publish, results, make_job, amqp
):
    start_agent(competition, runner="null")
    job = make_job(competition)
    await publish(competition, signing_key.sign(job))
    result = await results.wait(job.job_id)
    assert result.status is FinalStatus.SUCCEEDED

    stored = await wait_for(lambda: coordinator.store.result(job.job_id))
    assert stored.agent_id == result.agent_id
    assert stored.status == "succeeded"

    agents = {a["agent_id"]: a for a in coordinator.store.agents()}
    assert result.agent_id in agents
    assert agents[result.agent_id]["site"] == "test"

    # The same job published again is answered from the agent's record and the
    # coordinator keeps the first result, auditing the repeat.
    await publish(competition, signing_key.sign(job))
    await wait_for(lambda: coordinator.store.audit_count(job.job_id) >= 1)
    assert coordinator.store.result(job.job_id).recorded_at == stored.recorded_at


async def test_result_from_unregistered_agent_ignored(coordinator, amqp, caplog):
    stranger = generate_private_key()
    forged = JobResult(
        job_id="job-forged-1", agent_id="evil-000000000000", site="evil",
        status=FinalStatus.SUCCEEDED, scores={"quantiles_score": 99.0}, finished_at=utc_now(),
    )
    body = sign_model(forged, stranger, forged.agent_id)
    await amqp.publish(RESULTS_EXCHANGE, result_routing_key(forged.job_id), body)
    await wait_for(lambda: "evil-000000000000, which never registered" in caplog.text)
    assert coordinator.store.result(forged.job_id) is None
