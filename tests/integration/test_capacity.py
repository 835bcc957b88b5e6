"""Capacity, admission and the fleet against the real broker, agents and podman."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fairu.agent.admission import Admission, PrefetchGate, Verdict, build_offer
from fairu.agent.config import ResourcesSection
from fairu.agent.health import AgentMetrics, Gauges, HealthServer
from fairu.agent.probe import Capacity, probe_gpus
from fairu.agent.session import Delivery
from fairu.broker.coordinator import Coordinator, CoordinatorQueues
from fairu.broker.store import Store
from fairu.protocol.models import FinalStatus, JobSpec, Resources, utc_now
from fairu.protocol.signing import open_unverified
from fairu.protocol.topology import (
    COORDINATOR_ID,
    DELIVERY_LIMIT,
    EVENTS_EXCHANGE,
    JOBS_EXCHANGE,
    RESULTS_EXCHANGE,
    job_queue_arguments,
    job_routing_key,
)
from fairu.runners.podman import PodmanRunner, PodmanSettings

from .conftest import Competition, build_job

pytestmark = pytest.mark.broker

GIB = 2**30


async def wait_for(predicate, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} not met within {timeout_s:.0f} s")


async def queue_counts(amqp, queue: str) -> tuple[int, int]:
    """Return (ready messages, consumers) of a queue from a passive declare."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future = loop.create_future()
    amqp.channel.queue_declare(queue=queue, passive=True, callback=answer.set_result)
    frame = await asyncio.wait_for(answer, 10)
    return frame.method.message_count, frame.method.consumer_count


def health_url(agent) -> str:
    match = re.search(r"health endpoint listening on (http://\S+)", agent.log())
    assert match, agent.log()
    return match.group(1)


# --- isolated queues ------------------------------------------------------------------


@pytest.fixture
async def isolated(amqp):
    """A job queue whose dead letters go to this test's own exchange, and private
    copies of the coordinator's queues, so that no other test's messages are taken."""
    marker = uuid.uuid4().hex[:8]
    competition = Competition(name=f"t-{marker}", queue="cpu")
    dead_letter_exchange = f"fairu-tests.dlx-{marker}"
    queues = CoordinatorQueues(
        records=f"fairu-tests.records-{marker}",
        heartbeats=f"fairu-tests.heartbeats-{marker}",
        dead_letters=f"fairu-tests.dead-{marker}",
    )
    await amqp.declare_exchange(dead_letter_exchange, "fanout", durable=False)
    # The queues expire on their own should this fixture's cleanup never run.
    expiring = {"x-expires": 15 * 60 * 1000}
    for name in (queues.records, queues.heartbeats, queues.dead_letters):
        await amqp.declare_queue(name, durable=False, arguments=expiring)

    await amqp.bind(queues.dead_letters, dead_letter_exchange, "")
    await amqp.bind(queues.records, RESULTS_EXCHANGE, "result.#")
    await amqp.bind(queues.records, EVENTS_EXCHANGE, "agent.registration.#")
    await amqp.bind(queues.records, EVENTS_EXCHANGE, "agent.lease.#")
    await amqp.bind(queues.heartbeats, EVENTS_EXCHANGE, "agent.heartbeat.#")

    await amqp.declare_queue(
        competition.amqp_queue,
        arguments={
            **job_queue_arguments(),
            "x-dead-letter-exchange": dead_letter_exchange,
        },
    )
    await amqp.bind(
        competition.amqp_queue,
        JOBS_EXCHANGE,
        job_routing_key(competition.name, competition.queue),
    )
    yield competition, queues

    if amqp.is_open:
        for name in (competition.amqp_queue, *vars(queues).values()):
            await amqp.delete_queue(name)
        deleted = asyncio.get_running_loop().create_future()
        amqp.channel.exchange_delete(
            exchange=dead_letter_exchange, callback=deleted.set_result
        )
        await asyncio.wait_for(deleted, 10)


@pytest.fixture
async def coordinator(broker_url, tmp_path, isolated):
    _, queues = isolated
    store = Store(tmp_path / "coordinator.sqlite")
    service = Coordinator(
        broker_url, store, queues=queues, requeue_delay=lambda _r: 0.5
    )
    task = asyncio.create_task(service.run())
    yield service
    service.stopping.set()
    await asyncio.wait_for(task, 30)
    store.close()


def our_agents(coordinator, competition):
    return [
        agent
        for agent in coordinator.store.agents()
        if agent["queues"] == [competition.amqp_queue]
    ]


async def start_approved(coordinator, competition, start_agent, **options):
    token = await asyncio.to_thread(coordinator.store.add_enrollment_token, "test")
    agent = start_agent(
        competition, agent_extra=f'enrollment_token = "{token}"', **options
    )
    rows = await wait_for(
        lambda: [
            a
            for a in our_agents(coordinator, competition)
            if a["approval"] == "approved"
        ],
        what="the agent's registration",
    )
    return agent, rows[0]


# --- the never-fits path --------------------------------------------------------------


async def test_never_fitting_job_fails_with_offer(
    coordinator, isolated, start_agent, signing_key, publish, results
):
    competition, _ = isolated
    agent, row = await start_approved(
        coordinator, competition, start_agent, runner="null"
    )

    job = build_job(competition, resources=Resources(cpus=1, gpus=2, gpu_model="A100"))
    await publish(competition, signing_key.sign(job))
    result = await results.wait(job.job_id, timeout_s=60)

    assert result.agent_id == COORDINATOR_ID
    assert result.status is FinalStatus.FAILED
    assert result.error.code == "unschedulable"
    message = result.error.message
    assert "requests cpus=1, memory_mb=1024, gpus=2 (gpu_model='A100')" in message
    assert f"largest offer seen is agent {row['agent_id']}" in message
    assert "gpus 2 > 0 matching model 'A100'" in message
    stored = await wait_for(lambda: coordinator.store.result(job.job_id))
    assert stored.status == "failed"
    assert stored.agent_id == COORDINATOR_ID

    # The agent returned the job once per delivery until the delivery limit.
    returns = agent.log().count(f"job {job.job_id} can never start")
    assert returns == DELIVERY_LIMIT + 1, agent.log()
    assert (
        f"delivery {DELIVERY_LIMIT + 1} of at most {DELIVERY_LIMIT + 1}" in agent.log()
    )

    # The agent still serves jobs that fit.
    fitting = build_job(competition)
    await publish(competition, signing_key.sign(fitting))
    assert (await results.wait(fitting.job_id)).status is FinalStatus.SUCCEEDED


async def test_busy_job_published_again(
    coordinator, isolated, start_agent, signing_key, publish, amqp
):
    competition, _ = isolated
    agent, row = await start_approved(
        coordinator, competition, start_agent, runner="null"
    )
    # The agent that fits stops, so the test itself plays a busy agent.
    assert agent.stop() == 0
    await wait_for(
        lambda: our_agents(coordinator, competition)[0]["fleet_state"] == "stopped",
        what="the stopped agent",
    )

    job = build_job(competition)
    body = signing_key.sign(job)
    await publish(competition, body)
    deliveries: asyncio.Queue[Delivery] = asyncio.Queue()
    tag = await amqp.consume(competition.amqp_queue, deliveries.put_nowait)
    try:
        for count in range(DELIVERY_LIMIT + 1):
            delivery = await asyncio.wait_for(deliveries.get(), 10)
            assert delivery.delivery_count == count
            assert delivery.body == body
            amqp.nack(delivery.delivery_tag, requeue=True)

        # The coordinator finds that the stopped agent offers enough and publishes
        # the same signed job again, as a fresh message with the round counted.
        again = await asyncio.wait_for(deliveries.get(), 30)
        amqp.ack(again.delivery_tag)
    finally:
        await amqp.cancel(tag)
    assert again.body == body
    assert again.delivery_count == 0
    assert again.properties.headers["x-fairu-requeue-rounds"] == 1
    assert coordinator.store.result(job.job_id) is None
    (stopped,) = our_agents(coordinator, competition)
    assert stopped["agent_id"] == row["agent_id"]


# --- fleet ----------------------------------------------------------------------------


async def test_fleet_states_after_missed_heartbeats(coordinator, isolated, start_agent):
    competition, _ = isolated
    agent, row = await start_approved(
        coordinator, competition, start_agent, runner="null", heartbeat_interval_s=1
    )
    agent_id = row["agent_id"]

    def state() -> str:
        rows = [a for a in coordinator.store.agents() if a["agent_id"] == agent_id]
        return str(rows[0]["fleet_state"])

    assert await wait_for(lambda: state() == "serving", what="state serving")
    stored = [a for a in coordinator.store.agents() if a["agent_id"] == agent_id][0]
    assert stored["heartbeat_interval_s"] == 1.0
    assert stored["capacity"]["slots"] == 1
    assert stored["free"]["slots"] == 1
    assert stored["host"]["usable_cpus"] > 0

    def liveness() -> str:
        rows = [a for a in coordinator.store.agents() if a["agent_id"] == agent_id]
        return str(rows[0]["liveness"])

    agent.process.send_signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        assert await wait_for(lambda: state() == "stale", timeout_s=20, what="stale")
        stale_after = time.monotonic() - began
        assert await wait_for(
            lambda: state() == "offline", timeout_s=30, what="offline"
        )
        offline_after = time.monotonic() - began
        # The coordinator's sweep stores what fleet_state computes, once a second.
        assert await wait_for(
            lambda: liveness() == "offline", timeout_s=5, what="stored"
        )
    finally:
        agent.process.send_signal(signal.SIGCONT)
    # Stale comes after 3 missed 1 s heartbeats and offline after 10, both counted
    # from the last heartbeat, which may precede SIGSTOP by up to an interval.
    assert stale_after < 8.0
    assert 5.0 < offline_after - stale_after < 10.0

    assert await wait_for(
        lambda: state() == "serving", timeout_s=20, what="serving again"
    )

    assert agent.stop() == 0
    assert await wait_for(lambda: state() == "stopped", what="the last heartbeat")


async def test_agents_list_table_and_json(coordinator, isolated, start_agent):
    competition, _ = isolated
    _agent, row = await start_approved(
        coordinator, competition, start_agent, runner="null"
    )
    agent_id = row["agent_id"]

    table = subprocess.run(
        [
            sys.executable,
            "-m",
            "fairu.broker.admin",
            "agents",
            "--db",
            str(coordinator.store.path),
            "list",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    header, *lines = table.splitlines()
    assert header.split() == [
        "SITE",
        "AGENT",
        "APPROVAL",
        "STATE",
        "CORES",
        "FREE/TOTAL",
        "MEMORY",
        "FREE/TOTAL",
        "GPUS",
        "FREE/TOTAL",
        "RUNNING",
        "LAST",
        "SEEN",
    ]
    (line,) = [line for line in lines if agent_id in line]
    cells = line.split()
    assert cells[:4] == ["test", agent_id, "approved", "serving"]
    assert re.fullmatch(r"[0-9.]+/[0-9.]+", cells[4])
    assert cells[7] == "-"
    assert cells[8] == "0"

    listing = subprocess.run(
        [
            sys.executable,
            "-m",
            "fairu.broker.admin",
            "agents",
            "--db",
            str(coordinator.store.path),
            "list",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    (entry,) = [a for a in json.loads(listing) if a["agent_id"] == agent_id]
    assert entry["fleet_state"] == "serving"
    assert entry["gpus_by_model"] == {}
    assert entry["capacity"]["cpus"] == row["capacity"]["cpus"]


# --- prefetch -------------------------------------------------------------------------


@pytest.mark.podman
async def test_agent_holds_no_job_it_cannot_start(
    competition, start_agent, signing_key, publish, results, amqp
):
    agent = start_agent(competition, slots=2)
    jobs = [
        build_job(
            competition,
            command=[
                "python3",
                "-c",
                "import time; time.sleep(8); "
                "open('/output/scores.json', 'w').write('{}')",
            ],
        )
        for _ in range(4)
    ]
    for job in jobs:
        await publish(competition, signing_key.sign(job))

    async def two_held_back() -> bool:
        ready, _consumers = await queue_counts(amqp, competition.amqp_queue)
        return ready == 2

    deadline = time.monotonic() + 60
    while not await two_held_back():
        assert time.monotonic() < deadline, "the agent never held back two jobs"
        await asyncio.sleep(0.2)
    # Two jobs run and two stay in the queue, because the consumer has no credit.
    await asyncio.sleep(1.0)
    assert await two_held_back()

    for job in jobs:
        result = await results.wait(job.job_id, timeout_s=180)
        assert result.status is FinalStatus.SUCCEEDED, result
    assert "cannot start on agent" not in agent.log()


@dataclass
class GateHarness:
    admission: Admission
    gate: PrefetchGate
    deliveries: asyncio.Queue


async def test_gate_prefetch_follows_free_gpus(
    amqp, competition, signing_key, publish, fake_nvml, fake_gpu
):
    report = probe_gpus(fake_nvml([fake_gpu("GPU-g0"), fake_gpu("GPU-g1")]))
    capacity = Capacity(
        cpu_cores=8,
        usable_cpus=8.0,
        memory_bytes=32 * GIB,
        memory_available_bytes=30 * GIB,
        gpus=report.gpus,
    )
    admission = Admission(build_offer(capacity, 4, ResourcesSection()))
    deliveries: asyncio.Queue[Delivery] = asyncio.Queue()
    gate = PrefetchGate(admission, deliveries.put_nowait)
    gate.add_queue(competition.amqp_queue, needs_gpu=True)

    jobs = [build_job(competition, resources=Resources(gpus=1)) for _ in range(3)]
    wide = build_job(competition, resources=Resources(gpus=2))
    for job in [*jobs, wide]:
        await publish(competition, signing_key.sign(job))
    await gate.attach(amqp)

    async def next_job() -> tuple[Delivery, JobSpec]:
        delivery = await asyncio.wait_for(deliveries.get(), 10)
        return delivery, open_unverified(delivery.body, JobSpec)

    first, second = await next_job(), await next_job()
    for delivery, job in (first, second):
        assert gate.decide(job, delivery).verdict is Verdict.START
    await gate.refresh()
    await asyncio.sleep(0.5)
    # Both GPUs are taken, so the consumer has no credit and two jobs stay queued.
    assert deliveries.empty()
    ready, _consumers = await queue_counts(amqp, competition.amqp_queue)
    assert ready == 2

    amqp.ack(first[0].delivery_tag)
    gate.settled(first[0])
    gate.release(first[1].job_id)
    third = await next_job()
    assert third[1].job_id == jobs[2].job_id
    assert gate.decide(third[1], third[0]).verdict is Verdict.START
    amqp.ack(second[0].delivery_tag)
    gate.settled(second[0])
    gate.release(second[1].job_id)

    # One GPU is free, so the two-GPU job arrives and is BUSY: it goes back and the
    # queue is held until a job ends.
    wide_delivery, wide_job = await next_job()
    assert wide_job.job_id == wide.job_id
    decision = gate.decide(wide_job, wide_delivery)
    assert decision.verdict is Verdict.BUSY
    await gate.hold(competition.amqp_queue)
    amqp.nack(wide_delivery.delivery_tag, requeue=True)
    gate.settled(wide_delivery)
    await asyncio.sleep(0.5)
    assert deliveries.empty()
    # A quorum queue counts a cancelled consumer while it has unacked messages,
    # so only the ready count is checked.
    ready, _consumers = await queue_counts(amqp, competition.amqp_queue)
    assert ready == 1
    assert gate.queues[competition.amqp_queue].consumer is None

    amqp.ack(third[0].delivery_tag)
    gate.settled(third[0])
    gate.release(third[1].job_id)
    again, again_job = await next_job()
    assert again_job.job_id == wide.job_id
    assert again.delivery_count == 1
    assert gate.decide(again_job, again).verdict is Verdict.START
    assert {unit.uuid for unit in admission.grant(wide.job_id).units} == {
        "GPU-g0",
        "GPU-g1",
    }
    amqp.ack(again.delivery_tag)
    gate.stop()


# --- health ---------------------------------------------------------------------------


async def test_metrics_and_healthz(
    competition, start_agent, signing_key, publish, results
):
    agent = start_agent(competition, runner="null", slots=3)
    good = build_job(competition)
    expired = build_job(
        competition,
        created_at=utc_now().replace(year=2020),
        expires_at=utc_now().replace(year=2021),
    )
    await publish(competition, signing_key.sign(good))
    await publish(competition, signing_key.sign(expired))
    assert (await results.wait(good.job_id)).status is FinalStatus.SUCCEEDED
    assert (await results.wait(expired.job_id)).status is FinalStatus.REJECTED

    url = health_url(agent)
    assert url.startswith("http://127.0.0.1:")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/healthz") as response:
            assert response.status == 200
            health = await response.json()
        # The agent counts a job after publishing its result, so poll briefly.
        deadline = time.monotonic() + 10
        while True:
            async with http.get(f"{url}/metrics") as response:
                assert response.status == 200
                content_type = response.headers["Content-Type"]
                text = await response.text()
            if 'fairu_jobs_finished_total{status="succeeded"} 1' in text:
                break
            assert time.monotonic() < deadline, text
            await asyncio.sleep(0.2)

    assert content_type.startswith("text/plain; version=0.0.4")
    assert health == {
        "broker_connected": True,
        "podman_reachable": True,
        "status": "ok",
    }
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("fairu_jobs_finished_total", (("status", "succeeded"),))] == 1
    assert samples[("fairu_jobs_finished_total", (("status", "rejected"),))] == 1
    assert samples[("fairu_jobs_finished_total", (("status", "failed"),))] == 0
    assert samples[("fairu_job_duration_seconds_count", ())] == 1
    assert samples[("fairu_job_duration_seconds_bucket", (("le", "+Inf"),))] == 1
    assert samples[("fairu_job_duration_seconds_sum", ())] >= 0
    assert samples[("fairu_running_jobs", ())] == 0
    assert samples[("fairu_free_slots", ())] == 3
    assert samples[("fairu_free_gpus", ())] == 0
    assert samples[("fairu_broker_reconnects_total", ())] == 0
    assert samples[("fairu_broker_connected", ())] == 1


async def test_healthz_reports_each_failure(podman_socket):
    metrics = AgentMetrics()
    # Nothing listens on port 1 of loopback. A missing unix socket would do too, but
    # podman-py 5.8 leaves such a failed socket for the garbage collector to close.
    missing = PodmanRunner(PodmanSettings(socket_url="tcp://127.0.0.1:1"))
    reachable = PodmanRunner(PodmanSettings(socket_url=podman_socket))
    gauges = {"connected": False}

    def current() -> Gauges:
        return Gauges(0, 1, 0, 0, broker_connected=gauges["connected"])

    servers = [
        HealthServer("127.0.0.1:0", metrics, current, runner.check)
        for runner in (missing, reachable)
    ]
    urls = [await server.start() for server in servers]
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{urls[0]}/healthz") as response:
                assert response.status == 503
                body = await response.json()
            assert body["broker_connected"] is False
            assert body["podman_reachable"] is False
            assert "tcp://127.0.0.1:1" in body["podman_error"]

            gauges["connected"] = True
            async with http.get(f"{urls[1]}/healthz") as response:
                assert response.status == 200
                assert (await response.json())["status"] == "ok"
    finally:
        for server in servers:
            await server.stop()
        await missing.close()
        await reachable.close()
