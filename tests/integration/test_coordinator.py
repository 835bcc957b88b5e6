"""The coordinator against the real broker: registry, one recorded result per job."""

from __future__ import annotations

import asyncio
import time

import pytest

from fairu.broker.coordinator import Coordinator, CoordinatorQueues
from fairu.broker.store import Store
from fairu.protocol.models import FinalStatus, JobResult, utc_now
from fairu.protocol.signing import generate_private_key, sign_model
from fairu.protocol.topology import RESULTS_EXCHANGE, result_routing_key

pytestmark = pytest.mark.broker


@pytest.fixture
async def coordinator(broker_url, tmp_path):
    store = Store(tmp_path / "coordinator.sqlite")
    # Reading no dead letters keeps this coordinator from ending other tests' jobs.
    queues = CoordinatorQueues(dead_letters=None)
    service = Coordinator(broker_url, store, queues=queues)
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
    token = await asyncio.to_thread(coordinator.store.add_enrollment_token, "test")
    agent = start_agent(competition, runner="null", agent_extra=f'enrollment_token = "{token}"')
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
    assert agents[result.agent_id]["approval"] == "approved"

    # The same message again is acked from the agent's record without a second run,
    # and without a second result, since the broker confirmed the first one.
    await publish(competition, signing_key.sign(job))
    await wait_for(lambda: "its result was published" in agent.log())
    assert coordinator.store.result(job.job_id).recorded_at == stored.recorded_at
    assert coordinator.store.audit_count(job.job_id) == 0
    assert len(results.results[job.job_id]) == 1


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


async def test_unapproved_agent_results_kept_apart(
    coordinator, competition, start_agent, signing_key, publish, results, make_job, caplog
):
    start_agent(competition, runner="null")
    job = make_job(competition)
    await publish(competition, signing_key.sign(job))
    result = await results.wait(job.job_id)

    await wait_for(lambda: coordinator.store.audit_count(job.job_id) == 1)
    assert coordinator.store.result(job.job_id) is None
    assert coordinator.store.audit_reasons(job.job_id) == ["agent is pending, not approved"]

    assert coordinator.store.set_approval(result.agent_id, "approved")
    second = make_job(competition)
    await publish(competition, signing_key.sign(second))
    await results.wait(second.job_id)
    assert (await wait_for(lambda: coordinator.store.result(second.job_id))).status == "succeeded"

    assert coordinator.store.set_approval(result.agent_id, "revoked")
    third = make_job(competition)
    await publish(competition, signing_key.sign(third))
    await results.wait(third.job_id)
    await wait_for(lambda: coordinator.store.audit_count(third.job_id) == 1)
    assert coordinator.store.result(third.job_id) is None
    assert coordinator.store.audit_reasons(third.job_id) == ["agent is revoked, not approved"]


async def test_enrollment_token_works_once(coordinator, competition, start_agent):
    token = await asyncio.to_thread(coordinator.store.add_enrollment_token, "test")
    first = start_agent(competition, runner="null", agent_extra=f'enrollment_token = "{token}"')
    second = start_agent(competition, runner="null", agent_extra=f'enrollment_token = "{token}"')

    def approvals():
        agents = coordinator.store.agents()
        return sorted(a["approval"] for a in agents if a["queues"] == [competition.amqp_queue]) if len(
            [a for a in agents if a["queues"] == [competition.amqp_queue]]) == 2 else None

    assert await wait_for(approvals) == ["approved", "pending"]
    for agent in (first, second):
        assert token not in agent.log()


async def test_token_for_other_site_rejected(coordinator, competition, start_agent):
    token = await asyncio.to_thread(coordinator.store.add_enrollment_token, "elsewhere")
    start_agent(competition, runner="null", agent_extra=f'enrollment_token = "{token}"')

    def approval():
        agents = [a for a in coordinator.store.agents() if a["queues"] == [competition.amqp_queue]]
        return agents[0]["approval"] if agents else None

    assert await wait_for(approval) == "pending"
