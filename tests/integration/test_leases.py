"""Ack on claim and job leases against private broker nodes, agents and rootless podman.

A job is claimed once it has run for agent.claim_after_s, and its delivery is acked
once its claim is confirmed, so the broker's consumer_timeout never closes the
channel of an agent that runs a long job. The coordinator queues a job again when its
lease expires or its agent releases it. Most agents here claim each job before it
starts (`PrivateSite.start_agent`).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid
from typing import Any

import pytest

from fairu.agent.session import AmqpSession, Delivery
from fairu.broker.coordinator import Coordinator
from fairu.protocol.models import JobState, LeaseAction
from fairu.protocol.topology import (
    EVENTS_EXCHANGE,
    job_routing_key,
    lease_routing_key,
    registration_routing_key,
)

from ..signed_agent import SignedAgent
from .agent_jobs import (
    remove_agent_containers,
    watch_status,
    sleeping_command,
    started_line,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.podman]

# RabbitMQ 3.10 checks consumer_timeout on each channel tick, every
# channel_tick_interval (60000 ms by default), so an unacked delivery loses its
# channel between 5 s and about 65 s after it arrived.
SHORT_CONSUMER_TIMEOUT = ["consumer_timeout = 5000"]
# Longer than the consumer timeout plus one full channel tick, with a margin.
LONG_JOB_S = 75


async def hold_unacked(url: str) -> tuple[AmqpSession, str]:
    """Consume one message from a fresh queue and never ack it."""
    session = AmqpSession(url, name="fairu-tests unacked consumer")
    await session.open()
    queue = f"fairu-tests.unacked-{uuid.uuid4().hex[:8]}"
    await session.declare_queue(queue, arguments={"x-queue-type": "quorum"})
    await session.publish("", queue, b"held without an ack")
    received = asyncio.Event()
    await session.consume(queue, lambda _delivery: received.set())
    await asyncio.wait_for(received.wait(), 30)
    return session, queue


@pytest.mark.parametrize("private_broker", [SHORT_CONSUMER_TIMEOUT], indirect=True)
async def test_job_outlives_consumer_timeout(private_site):
    agent = await private_site.start_agent()
    job = private_site.job(command=sleeping_command(LONG_JOB_S))
    watcher, events = await watch_status(private_site.broker.url, job.job_id)
    control, control_queue = await hold_unacked(private_site.broker.url)
    try:
        await private_site.publish(job)

        # Without a lease, a delivery held this long loses its channel.
        assert control.closed is not None
        reason = await asyncio.wait_for(asyncio.shield(control.closed), 150)
        assert "PRECONDITION_FAILED" in reason
        assert "timed out" in reason
        ready, unacked = await asyncio.to_thread(
            private_site.broker.queue_counts, control_queue
        )
        assert (ready, unacked) == (1, 0)

        stored = await private_site.recorded_success(
            job.job_id, timeout_s=LONG_JOB_S + 120
        )
    finally:
        await watcher.close()
        await control.close()

    assert stored.agent_id == agent.agent_id
    log = agent.log()
    assert log.count(started_line(job.job_id)) == 1
    assert [event.state for event in events].count(JobState.RUNNING) == 1
    # The agent kept its one session: the broker closed no channel of it.
    assert log.count("serving 1 queues") == 1
    assert "PRECONDITION_FAILED" not in log
    assert "reconnect attempt" not in log
    assert f"claimed job {job.job_id}" in log


async def test_drain_releases_claimed_job(private_site):
    first = await private_site.start_agent(stop_grace_s=1)
    job = await private_site.start_sleeping_job(first, 20, "the first run")

    drained = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "fairu.agent.cli", "drain", "--config",
         str(first.config_path), "--wait", "30"],
        capture_output=True, text=True, timeout=60,
    )
    assert drained.returncode == 0, drained.stderr
    log = first.log()
    assert f"handing job {job.job_id} back" in log
    assert f"released job {job.job_id} to be queued again" in log
    # The release, not a lease expiry, queued the job again.
    assert private_site.coordinator.store.lease(job.job_id).expiries == 0

    second = await private_site.start_agent()
    stored = await private_site.recorded_success(job.job_id)
    assert stored.agent_id == second.agent_id
    assert second.log().count(started_line(job.job_id)) == 1


async def test_second_sigint_releases_claimed_job(private_site):
    first = await private_site.start_agent(stop_grace_s=600)
    job = await private_site.start_sleeping_job(first, 30, "the first run")

    assert first.process is not None
    first.process.send_signal(2)
    await wait_for(lambda: "waiting up to 600 s" in first.log(), 30, "the drain")
    first.process.send_signal(2)
    assert await asyncio.to_thread(first.process.wait, 60) == 0
    assert f"released job {job.job_id} to be queued again" in first.log()

    second = await private_site.start_agent()
    stored = await private_site.recorded_success(job.job_id)
    assert stored.agent_id == second.agent_id


class ClaimingClient(SignedAgent):
    """A registered agent identity that claims jobs and never renews their leases."""

    def __init__(self, session: AmqpSession, competition: Any) -> None:
        super().__init__([competition.amqp_queue])
        self.session = session
        self.competition = competition
        self.deliveries: list[Delivery] = []

    async def register(self) -> None:
        await self.session.publish(
            EVENTS_EXCHANGE,
            registration_routing_key(self.agent_id),
            self.registration(),
        )

    async def claim(self, delivery: Delivery, job_id: str) -> None:
        routing_key = job_routing_key(self.competition.name, self.competition.queue)
        await self.session.publish(
            EVENTS_EXCHANGE,
            lease_routing_key(self.agent_id),
            self.lease(LeaseAction.CLAIM, job_id, routing_key, delivery.body, ttl_s=1),
            mandatory=True,
        )
        self.session.ack(delivery.delivery_tag)


async def test_lease_expiry_limit_fails_job(private_site):
    store = private_site.coordinator.store
    session = AmqpSession(private_site.broker.url, name="fairu-tests claiming client")
    await session.open()
    client = ClaimingClient(session, private_site.competition)
    await client.register()
    # The coordinator stores lease events of approved agents only.
    await wait_for(lambda: store.agent_key(client.agent_id), 30, "the registration")
    assert store.set_approval(client.agent_id, "approved")
    job = private_site.job()
    claims: list[asyncio.Task[None]] = []

    def on_delivery(delivery: Delivery) -> None:
        client.deliveries.append(delivery)
        claims.append(asyncio.create_task(client.claim(delivery, job.job_id)))

    try:
        await session.consume(private_site.competition.amqp_queue, on_delivery)
        body = await private_site.publish(job)
        stored = await wait_for(
            lambda: store.result(job.job_id), 60, "the failed result"
        )
        await asyncio.gather(*claims)
    finally:
        await session.close()

    assert stored.status == "failed"
    assert stored.agent_id == "fairu-coordinator"
    # The coordinator queued the exact message again after each of the first two
    # expiries and ended the job at the third.
    assert len(client.deliveries) == 3
    assert all(delivery.body == body for delivery in client.deliveries)
    counts = [
        (delivery.properties.headers or {}).get("x-fairu-lease-expiries")
        for delivery in client.deliveries
    ]
    assert counts == [None, 1, 2]
    assert store.lease(job.job_id) is None


async def unbind_lease_events(url: str) -> None:
    """Leave lease events unroutable on a node whose coordinator has started.

    The coordinator declared the topology when it started, so it does not bind the
    lease routing key again.
    """
    session = AmqpSession(url, name="fairu-tests unbind")
    await session.open()
    unbound = asyncio.get_running_loop().create_future()
    session.channel.queue_unbind(
        queue="fairu.coordinator.records",
        exchange=EVENTS_EXCHANGE,
        routing_key="agent.lease.#",
        callback=unbound.set_result,
    )
    await asyncio.wait_for(unbound, 10)
    await session.close()


async def test_short_job_is_not_claimed(private_site):
    # The default claim_after_s is 30 s, far longer than this job.
    agent = await private_site.start_agent(runner="null", claim_after_s=None)
    job = private_site.job()

    await private_site.publish(job)

    stored = await private_site.recorded_once(job.job_id)
    assert stored.status == "succeeded"
    assert f"claimed job {job.job_id}" not in agent.log()
    assert private_site.coordinator.store.lease(job.job_id) is None


async def test_long_job_is_claimed_while_it_runs(private_site):
    agent = await private_site.start_agent(claim_after_s=2)
    job = await private_site.start_sleeping_job(agent, 12, "the run")

    await wait_for(
        lambda: f"claimed job {job.job_id}" in agent.log(), 30, "the claim"
    )
    lease = await wait_for(
        lambda: private_site.coordinator.store.lease(job.job_id), 30, "the lease"
    )
    assert lease.agent_id == agent.agent_id

    stored = await private_site.recorded_success(job.job_id)
    assert stored.agent_id == agent.agent_id
    assert agent.log().count(started_line(job.job_id)) == 1
    assert agent.log().count(f"claimed job {job.job_id}") == 1


async def test_unroutable_claim_leaves_running_job_unacked(private_site):
    agent = await private_site.start_agent(claim_after_s=1)
    await unbind_lease_events(private_site.broker.url)
    job = await private_site.start_sleeping_job(agent, 6, "the run")

    stored = await private_site.recorded_success(job.job_id)
    assert stored.agent_id == agent.agent_id
    log = agent.log()
    assert f"could not claim running job {job.job_id}" in log
    assert "its delivery stays unacked" in log
    assert f"claimed job {job.job_id}" not in log
    assert log.count(started_line(job.job_id)) == 1


async def test_unroutable_claim_runs_unacked(private_site):
    agent = await private_site.start_agent(runner="null")
    await unbind_lease_events(private_site.broker.url)
    job = private_site.job()

    await private_site.publish(job)

    stored = await private_site.recorded_once(job.job_id)
    assert stored.status == "succeeded"
    assert f"could not claim job {job.job_id}" in agent.log()
    assert "running it with its delivery unacked" in agent.log()
    assert f"claimed job {job.job_id}" not in agent.log()


async def test_drain_longer_than_ttl_keeps_lease(private_site):
    # A grace far longer than the 12 s lease TTL: heartbeats must go on renewing the
    # lease while the agent drains, or the coordinator queues a second copy.
    agent = await private_site.start_agent(stop_grace_s=120)
    job = await private_site.start_sleeping_job(agent, 30, "the run")

    assert await asyncio.to_thread(agent.stop, 15, 150) == 0

    stored = await private_site.recorded_success(job.job_id)
    assert stored.agent_id == agent.agent_id
    assert f"handing job {job.job_id} back" not in agent.log()


async def test_lease_expires_after_coordinator_restart(
    caplog, private_site, podman_socket
):
    caplog.set_level(logging.INFO, logger="fairu.broker")
    first = await private_site.start_agent()
    first_id = first.agent_id
    job = await private_site.start_sleeping_job(first, 10, "the first run")

    private_site.coordinator.stopping.set()
    await wait_for(
        lambda: "coordinator stopped" in caplog.text, 60, "the coordinator stop"
    )
    first.kill()
    # Longer than the 12 s TTL: the lease has lapsed on the coordinator's clock by
    # the time it starts again, and it must extend the lease instead of acting on it.
    await asyncio.sleep(15)
    restarted = Coordinator(private_site.broker.url, private_site.coordinator.store)
    serving = asyncio.create_task(restarted.run())
    try:
        await wait_for(
            lambda: "coordinator extended 1 held leases" in caplog.text,
            60,
            "the restart",
        )
        second = await private_site.start_agent()
        stored = await private_site.recorded_success(
            job.job_id, coordinator=restarted
        )
        assert stored.agent_id == second.agent_id
        assert second.log().count(started_line(job.job_id)) == 1
        expired = f"lease of job {job.job_id} held by agent {first_id} expired"
        assert expired in caplog.text
    finally:
        restarted.stopping.set()
        await asyncio.wait_for(serving, 60)
        await asyncio.to_thread(remove_agent_containers, podman_socket, first_id)
