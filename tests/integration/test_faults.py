"""Faults against a private broker node, real agent processes and rootless podman.

Each test injects one fault: an agent killed with SIGKILL, a broker restart, or a
connection closed by the broker. A coordinator on the same node then shows that every
job has exactly one recorded final result. Each test also checks that the job's
message left the queue and that the agent still serves a normal job afterwards.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

import podman
import pytest

from fairu.broker.store import StoredResult

pytestmark = [pytest.mark.broker, pytest.mark.podman]

T = TypeVar("T")

QUICK_COMMAND = [
    "python3",
    "-c",
    "open('/output/scores.json', 'w').write('{\"ok\": 1}')",
]


def sleeping_command(seconds: float) -> list[str]:
    """Return a job command that sleeps, then writes a one-score scores.json."""
    return [
        "python3",
        "-c",
        (
            f"import time; time.sleep({seconds}); "
            "open('/output/scores.json', 'w').write('{\"slept\": 1}')"
        ),
    ]


async def wait_for(predicate: Callable[[], T], timeout_s: float, what: str) -> T:
    """Poll a blocking predicate in a thread until it returns a true value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s:.0f} s waiting for {what}"
            )
        await asyncio.sleep(0.2)


def unconfirmed_results(state_dir: Path) -> list[str]:
    """Return the job ids whose recorded result waits for the broker's confirm.

    A finished job's row in jobs.sqlite is its result's spool until the confirm.
    """
    database = sqlite3.connect(f"file:{state_dir / 'jobs.sqlite'}?mode=ro", uri=True)
    try:
        rows = database.execute("SELECT job_id FROM jobs WHERE unconfirmed = 1").fetchall()
    finally:
        database.close()
    return [row[0] for row in rows]


def started_line(job_id: str) -> str:
    return f"job {job_id}: started container"


def agent_containers(socket_url: str, agent_id: str) -> list[str]:
    """Return the status of every container labelled with the agent's id."""
    with podman.PodmanClient(base_url=socket_url, timeout=30) as client:
        containers = client.containers.list(
            all=True, filters={"label": f"fairu.agent_id={agent_id}"}
        )
        statuses = []
        for container in containers:
            # In podman 4.3's list response State is a bare string, which
            # `Container.status` cannot read, so inspect each container.
            container.reload()
            statuses.append(container.status)
        return statuses


def remove_agent_containers(socket_url: str, agent_id: str) -> None:
    with podman.PodmanClient(base_url=socket_url, timeout=60) as client:
        for container in client.containers.list(
            all=True, filters={"label": f"fairu.agent_id={agent_id}"}
        ):
            container.remove(force=True)


async def recorded_once(
    coordinator: Any, node: Any, competition: Any, job_id: str, timeout_s: float = 120.0
) -> StoredResult:
    """Wait for the job's final result in the coordinator and for its message's ack.

    The results table keys on the job id, so a second final result can only show up
    in the audit table. Callers check `audit_count` for that.
    """
    stored = await wait_for(
        lambda: coordinator.store.result(job_id),
        timeout_s,
        f"a recorded result of {job_id}",
    )
    await wait_for(
        lambda: node.queue_counts(competition.amqp_queue) == (0, 0),
        30,
        f"queue {competition.amqp_queue} to be empty with nothing unacked",
    )
    return stored


async def serves_normal_job(
    coordinator: Any,
    node: Any,
    competition: Any,
    publish: Any,
    make_job: Any,
    signing_key: Any,
) -> StoredResult:
    job = make_job(competition, command=QUICK_COMMAND)
    await publish(competition, signing_key.sign(job))
    stored = await recorded_once(coordinator, node, competition, job.job_id)
    # The null runner writes empty scores, so only the status is common to both.
    assert stored.status == "succeeded"
    assert coordinator.store.audit_count(job.job_id) == 0
    return stored


async def test_killed_agent_job_goes_to_second(
    caplog,
    private_broker,
    private_coordinator,
    private_competition,
    start_private_agent,
    private_publish,
    make_job,
    signing_key,
    podman_socket,
):
    first = await asyncio.to_thread(start_private_agent, private_competition)
    job = make_job(private_competition, command=sleeping_command(8))
    await private_publish(private_competition, signing_key.sign(job))
    await wait_for(
        lambda: started_line(job.job_id) in first.log(), 120, "the first run"
    )
    second = await asyncio.to_thread(start_private_agent, private_competition)
    first_id = first.agent_id

    try:
        first.kill()
        stored = await recorded_once(
            private_coordinator, private_broker, private_competition, job.job_id
        )
        assert stored.agent_id == second.agent_id
        assert stored.status == "succeeded"
        assert stored.scores == {"slept": 1.0}
        assert private_coordinator.store.audit_count(job.job_id) == 0
        assert second.log().count(started_line(job.job_id)) == 1
        # The job's delivery was acked on claim, so the coordinator, not the
        # broker, queued it again once the killed agent's lease expired.
        assert f"lease of job {job.job_id} held by agent {first_id} expired" in caplog.text
        # The killed agent's container outlives it until that agent starts again.
        assert await asyncio.to_thread(agent_containers, podman_socket, first_id)

        await serves_normal_job(
            private_coordinator,
            private_broker,
            private_competition,
            private_publish,
            make_job,
            signing_key,
        )
    finally:
        await asyncio.to_thread(remove_agent_containers, podman_socket, first_id)


async def test_killed_agent_reruns_after_restart(
    private_broker,
    private_coordinator,
    private_competition,
    start_private_agent,
    private_publish,
    make_job,
    signing_key,
    podman_socket,
):
    agent = await asyncio.to_thread(start_private_agent, private_competition)
    agent_id = agent.agent_id
    job = make_job(private_competition, command=sleeping_command(8))
    await private_publish(private_competition, signing_key.sign(job))
    await wait_for(
        lambda: started_line(job.job_id) in agent.log(), 120, "the first run"
    )

    agent.kill()
    assert await asyncio.to_thread(agent_containers, podman_socket, agent_id) == [
        "running"
    ]
    await asyncio.to_thread(agent.start)

    assert "removed 1 containers left from before" in agent.log()
    assert f"releasing job {job.job_id}, claimed before a restart" in agent.log()
    stored = await recorded_once(
        private_coordinator, private_broker, private_competition, job.job_id
    )
    assert stored.agent_id == agent_id
    assert stored.status == "succeeded"
    assert private_coordinator.store.audit_count(job.job_id) == 0
    assert agent.log().count(started_line(job.job_id)) == 2
    assert await asyncio.to_thread(agent_containers, podman_socket, agent_id) == []

    await serves_normal_job(
        private_coordinator,
        private_broker,
        private_competition,
        private_publish,
        make_job,
        signing_key,
    )


async def test_broker_restart_mid_job(
    private_broker,
    private_coordinator,
    private_competition,
    start_private_agent,
    private_publish,
    make_job,
    signing_key,
    podman_socket,
):
    agent = await asyncio.to_thread(start_private_agent, private_competition)
    # Long enough to outlast the restart (about 10 s here) and the reconnect backoff.
    job = make_job(private_competition, command=sleeping_command(30))
    await private_publish(private_competition, signing_key.sign(job))
    await wait_for(
        lambda: started_line(job.job_id) in agent.log(), 120, "the container"
    )

    await asyncio.to_thread(private_broker.restart)
    await wait_for(
        lambda: agent.log().count("serving 1 queues") == 2, 90, "the agent to reconnect"
    )

    assert await asyncio.to_thread(agent_containers, podman_socket, agent.agent_id) == [
        "running"
    ]
    assert "reconnect attempt 1" in agent.log()
    stored = await recorded_once(
        private_coordinator, private_broker, private_competition, job.job_id
    )
    assert stored.status == "succeeded"
    assert stored.scores == {"slept": 1.0}
    assert private_coordinator.store.audit_count(job.job_id) == 0
    # The delivery was acked on claim, so the broker has nothing to redeliver. The
    # coordinator queues a copy only if the lease lapsed before the agent was back;
    # the agent then acks that copy while the job runs, or from its job record.
    assert f"claimed job {job.job_id}" in agent.log()

    await serves_normal_job(
        private_coordinator,
        private_broker,
        private_competition,
        private_publish,
        make_job,
        signing_key,
    )


async def test_result_spooled_while_broker_down(
    private_broker,
    private_coordinator,
    private_competition,
    start_private_agent,
    private_publish,
    make_job,
    signing_key,
):
    agent = await asyncio.to_thread(start_private_agent, private_competition)
    job = make_job(private_competition, command=sleeping_command(8))
    await private_publish(private_competition, signing_key.sign(job))
    await wait_for(
        lambda: started_line(job.job_id) in agent.log(), 120, "the container"
    )

    await asyncio.to_thread(private_broker.stop)
    await wait_for(
        lambda: unconfirmed_results(agent.state_dir) == [job.job_id],
        60,
        "the result to be spooled while the broker is down",
    )
    assert "exited with code 0" in agent.log()
    assert private_coordinator.store.result(job.job_id) is None

    await asyncio.to_thread(private_broker.start)
    stored = await recorded_once(
        private_coordinator, private_broker, private_competition, job.job_id
    )
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
    assert private_coordinator.store.audit_count(job.job_id) == republished

    await serves_normal_job(
        private_coordinator,
        private_broker,
        private_competition,
        private_publish,
        make_job,
        signing_key,
    )


async def test_spooled_result_survives_agent_kill(
    private_broker,
    private_coordinator,
    private_competition,
    start_private_agent,
    private_publish,
    make_job,
    signing_key,
):
    agent = await asyncio.to_thread(start_private_agent, private_competition)
    job = make_job(private_competition, command=sleeping_command(8))
    await private_publish(private_competition, signing_key.sign(job))
    await wait_for(
        lambda: started_line(job.job_id) in agent.log(), 120, "the container"
    )

    await asyncio.to_thread(private_broker.stop)
    await wait_for(
        lambda: unconfirmed_results(agent.state_dir) == [job.job_id],
        60,
        "the result to be spooled",
    )
    agent.kill()
    await asyncio.to_thread(private_broker.start)
    await asyncio.to_thread(agent.start)

    stored = await recorded_once(
        private_coordinator, private_broker, private_competition, job.job_id
    )
    assert stored.status == "succeeded"
    assert f"published the recorded result of job {job.job_id}" in agent.log()
    assert unconfirmed_results(agent.state_dir) == []
    # The job ran once. Its claim is dropped, not released, because the job ended
    # before the kill and the spool flush published its recorded result.
    assert agent.log().count(started_line(job.job_id)) == 1
    assert f"dropped its claim of job {job.job_id}, which ended before" in agent.log()
    assert private_coordinator.store.audit_reasons(job.job_id) == []

    await serves_normal_job(
        private_coordinator,
        private_broker,
        private_competition,
        private_publish,
        make_job,
        signing_key,
    )


async def test_connection_closed_while_idle(
    private_broker,
    private_coordinator,
    private_competition,
    start_private_agent,
    private_publish,
    make_job,
    signing_key,
):
    agent = await asyncio.to_thread(
        start_private_agent, private_competition, runner="null"
    )

    closed = await asyncio.to_thread(
        private_broker.close_connections, f"fairu-agent {agent.agent_id}"
    )

    assert closed == 1
    await wait_for(
        lambda: agent.log().count("serving 1 queues") == 2, 60, "the agent to reconnect"
    )
    assert "CONNECTION_FORCED" in agent.log()
    await serves_normal_job(
        private_coordinator,
        private_broker,
        private_competition,
        private_publish,
        make_job,
        signing_key,
    )


async def test_connection_closed_mid_job(
    private_broker,
    private_coordinator,
    private_competition,
    start_private_agent,
    private_publish,
    make_job,
    signing_key,
    podman_socket,
):
    agent = await asyncio.to_thread(start_private_agent, private_competition)
    job = make_job(private_competition, command=sleeping_command(12))
    await private_publish(private_competition, signing_key.sign(job))
    await wait_for(
        lambda: started_line(job.job_id) in agent.log(), 120, "the container"
    )

    closed = await asyncio.to_thread(
        private_broker.close_connections, f"fairu-agent {agent.agent_id}"
    )

    assert closed == 1
    await wait_for(
        lambda: agent.log().count("serving 1 queues") == 2, 60, "the agent to reconnect"
    )
    assert await asyncio.to_thread(agent_containers, podman_socket, agent.agent_id) == [
        "running"
    ]
    stored = await recorded_once(
        private_coordinator, private_broker, private_competition, job.job_id
    )
    assert stored.status == "succeeded"
    assert private_coordinator.store.audit_count(job.job_id) == 0
    assert agent.log().count(started_line(job.job_id)) == 1
    await serves_normal_job(
        private_coordinator,
        private_broker,
        private_competition,
        private_publish,
        make_job,
        signing_key,
    )


async def test_duplicate_message_while_running(
    private_broker,
    private_coordinator,
    private_competition,
    start_private_agent,
    private_publish,
    make_job,
    signing_key,
):
    # A publisher that retries after a lost confirm can enqueue the same job message
    # twice, and with two slots both copies reach the agent on one session.
    agent = await asyncio.to_thread(start_private_agent, private_competition, slots=2)
    job = make_job(private_competition, command=sleeping_command(6))
    body = signing_key.sign(job)
    await private_publish(private_competition, body)
    await wait_for(
        lambda: started_line(job.job_id) in agent.log(), 120, "the container"
    )

    await private_publish(private_competition, body)

    await wait_for(
        lambda: f"job {job.job_id} delivered again while running" in agent.log(),
        30,
        "the second copy to reach the agent",
    )
    stored = await recorded_once(
        private_coordinator, private_broker, private_competition, job.job_id
    )
    assert stored.status == "succeeded"
    assert private_coordinator.store.audit_count(job.job_id) == 0
    assert agent.log().count(started_line(job.job_id)) == 1
    await serves_normal_job(
        private_coordinator,
        private_broker,
        private_competition,
        private_publish,
        make_job,
        signing_key,
    )
