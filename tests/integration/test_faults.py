"""Faults against a private broker node, real agent processes and rootless podman.

Each test injects one fault: an agent killed with SIGKILL, a broker restart, or a
connection closed by the broker. A coordinator on the same node then shows that every
job has exactly one recorded final result. Each test also checks that the job's
message left the queue and that the agent still serves a normal job afterwards.
"""

from __future__ import annotations

import asyncio

import pytest

from .agent_jobs import (
    agent_containers,
    remove_agent_containers,
    sleeping_command,
    started_line,
    unconfirmed_results,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.podman]


async def test_killed_agent_job_goes_to_second(caplog, private_site, podman_socket):
    first = await private_site.start_agent()
    job = await private_site.start_sleeping_job(first, 8, "the first run")
    second = await private_site.start_agent()
    first_id = first.agent_id

    try:
        first.kill()
        stored = await private_site.recorded_success(job.job_id)
        assert stored.agent_id == second.agent_id
        assert stored.scores == {"slept": 1.0}
        assert second.log().count(started_line(job.job_id)) == 1
        # The job's delivery was acked on claim, so the coordinator, not the
        # broker, queued it again once the killed agent's lease expired.
        assert f"lease of job {job.job_id} held by agent {first_id} expired" in caplog.text
        # The killed agent's container outlives it until that agent starts again.
        assert await asyncio.to_thread(agent_containers, podman_socket, first_id)

        await private_site.serves_normal_job()
    finally:
        await asyncio.to_thread(remove_agent_containers, podman_socket, first_id)


async def test_killed_agent_reruns_after_restart(private_site, podman_socket):
    agent = await private_site.start_agent()
    agent_id = agent.agent_id
    job = await private_site.start_sleeping_job(agent, 8, "the first run")

    agent.kill()
    assert await asyncio.to_thread(agent_containers, podman_socket, agent_id) == [
        "running"
    ]
    await asyncio.to_thread(agent.start)

    assert "removed 1 containers left from before" in agent.log()
    assert f"releasing job {job.job_id}, claimed before a restart" in agent.log()
    stored = await private_site.recorded_success(job.job_id)
    assert stored.agent_id == agent_id
    assert agent.log().count(started_line(job.job_id)) == 2
    assert await asyncio.to_thread(agent_containers, podman_socket, agent_id) == []

    await private_site.serves_normal_job()


async def test_broker_restart_mid_job(private_site, podman_socket):
    agent = await private_site.start_agent()
    # Long enough to outlast the restart (about 10 s here) and the reconnect backoff.
    job = await private_site.start_sleeping_job(agent, 30, "the container")

    await asyncio.to_thread(private_site.broker.restart)
    await wait_for(
        lambda: agent.log().count("serving 1 queues") == 2, 90, "the agent to reconnect"
    )

    assert await asyncio.to_thread(agent_containers, podman_socket, agent.agent_id) == [
        "running"
    ]
    assert "reconnect attempt 1" in agent.log()
    stored = await private_site.recorded_success(job.job_id)
    assert stored.scores == {"slept": 1.0}
    # The delivery was acked on claim, so the broker has nothing to redeliver. The
    # coordinator queues a copy only if the lease lapsed before the agent was back;
    # the agent then acks that copy while the job runs, or from its job record.
    assert f"claimed job {job.job_id}" in agent.log()

    await private_site.serves_normal_job()


async def test_result_spooled_while_broker_down(private_site):
    agent = await private_site.start_agent()
    job = await private_site.start_sleeping_job(agent, 8, "the container")

    await asyncio.to_thread(private_site.broker.stop)
    await wait_for(
        lambda: unconfirmed_results(agent.state_dir) == [job.job_id],
        60,
        "the result to be spooled while the broker is down",
    )
    assert "exited with code 0" in agent.log()
    assert private_site.coordinator.store.result(job.job_id) is None

    await asyncio.to_thread(private_site.broker.start)
    try:
        stored = await private_site.recorded_once(job.job_id)
    except AssertionError as exc:
        # NOTE: this wait timed out once in a full suite run, and never when run alone.
        # The agent's log shows how far its reconnect and the spool got.
        raise AssertionError(f"{exc}; the agent's log ends with:\n{agent.log()[-6000:]}") from None
    assert stored.status == "succeeded"
    assert unconfirmed_results(agent.state_dir) == []
    assert agent.log().count(started_line(job.job_id)) == 1
    # The spooled result goes out once. A copy of the job reaches the agent only
    # when its lease lapsed while the broker was down; the agent acks such a copy
    # from its job record and publishes the result again only if the broker never
    # confirmed it.
    republished = agent.log().count(
        f"job {job.job_id} already finished here; publishing its recorded result"
    )
    assert republished <= 1
    assert private_site.coordinator.store.audit_count(job.job_id) == republished

    await private_site.serves_normal_job()


async def test_spooled_result_survives_agent_kill(private_site):
    agent = await private_site.start_agent()
    job = await private_site.start_sleeping_job(agent, 8, "the container")

    await asyncio.to_thread(private_site.broker.stop)
    await wait_for(
        lambda: unconfirmed_results(agent.state_dir) == [job.job_id],
        60,
        "the result to be spooled",
    )
    agent.kill()
    await asyncio.to_thread(private_site.broker.start)
    await asyncio.to_thread(agent.start)

    stored = await private_site.recorded_once(job.job_id)
    assert stored.status == "succeeded"
    assert f"published the recorded result of job {job.job_id}" in agent.log()
    assert unconfirmed_results(agent.state_dir) == []
    # The job ran once. Its claim is dropped, not released, because the job ended
    # before the kill and the spool flush published its recorded result.
    assert agent.log().count(started_line(job.job_id)) == 1
    assert f"dropped its claim of job {job.job_id}, which ended before" in agent.log()
    assert private_site.coordinator.store.audit_reasons(job.job_id) == []

    await private_site.serves_normal_job()


async def test_connection_closed_while_idle(private_site):
    agent = await private_site.start_agent(runner="null")

    closed = await asyncio.to_thread(
        private_site.broker.close_connections, f"fairu-agent {agent.agent_id}"
    )

    assert closed == 1
    await wait_for(
        lambda: agent.log().count("serving 1 queues") == 2, 60, "the agent to reconnect"
    )
    assert "CONNECTION_FORCED" in agent.log()
    await private_site.serves_normal_job()


async def test_connection_closed_mid_job(private_site, podman_socket):
    agent = await private_site.start_agent()
    job = await private_site.start_sleeping_job(agent, 12, "the container")

    closed = await asyncio.to_thread(
        private_site.broker.close_connections, f"fairu-agent {agent.agent_id}"
    )

    assert closed == 1
    await wait_for(
        lambda: agent.log().count("serving 1 queues") == 2, 60, "the agent to reconnect"
    )
    assert await asyncio.to_thread(agent_containers, podman_socket, agent.agent_id) == [
        "running"
    ]
    await private_site.recorded_success(job.job_id)
    assert agent.log().count(started_line(job.job_id)) == 1
    await private_site.serves_normal_job()


async def test_duplicate_message_while_running(private_site):
    # A publisher that retries after a lost confirm can enqueue the same job message
    # twice, and with two slots both copies reach the agent on one session.
    agent = await private_site.start_agent(slots=2)
    job = private_site.job(command=sleeping_command(6))
    body = await private_site.publish(job)
    await private_site.wait_until_started(agent, job, "the container")

    await private_site.publish_body(body)

    await wait_for(
        lambda: f"job {job.job_id} delivered again while running" in agent.log(),
        30,
        "the second copy to reach the agent",
    )
    await private_site.recorded_success(job.job_id)
    assert agent.log().count(started_line(job.job_id)) == 1
    await private_site.serves_normal_job()
