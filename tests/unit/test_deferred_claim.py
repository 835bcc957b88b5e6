"""Deferred claims in the agent: a cancel request or a stop while a claim is in progress.

The agent's delivery handling runs here against fakes of the broker session, the
capacity gate, the leases and the pipeline, so that the claim and the end of the job
can be interleaved exactly.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from fairu.agent.admission import Decision, Grant, Verdict
from fairu.agent.config import SiteConfig
from fairu.agent.daemon import Agent
from fairu.agent.pipeline import Outcome
from fairu.agent.session import Delivery
from fairu.agent.state import Identity
from fairu.protocol.models import CancelRequest, FinalStatus, JobSpec, utc_now
from fairu.protocol.signing import generate_private_key
from fairu.runners.null import NullRunner
from pika.spec import BasicProperties

from ..job_specs import job_spec

AGENT_ID = "site-0123456789ab"
QUEUE = "fairu.jobs.higgs.cpu"


def delivery(tag: int = 1) -> Delivery:
    return Delivery(
        queue=QUEUE,
        delivery_tag=tag,
        redelivered=False,
        exchange="fairu.jobs",
        routing_key="job.higgs.cpu",
        properties=BasicProperties(),
        body=b"signed job message",
    )


class FakeSession:
    """The part of `AmqpSession` that settling a delivery uses."""

    is_open = True

    def __init__(self) -> None:
        self.settled: list[tuple[str, int]] = []

    def ack(self, delivery_tag: int) -> bool:
        self.settled.append(("ack", delivery_tag))
        return True

    def nack(self, delivery_tag: int, requeue: bool) -> bool:
        self.settled.append(("requeue" if requeue else "reject", delivery_tag))
        return True


class FakeGate:
    def __init__(self) -> None:
        self.granted: set[str] = set()

    def decide(self, job: JobSpec, _delivery: Delivery) -> Decision:
        self.granted.add(job.job_id)
        return Decision(Verdict.START, Grant(job.job_id, 0.01, 1, ()))

    def release(self, job_id: str) -> None:
        self.granted.discard(job_id)

    async def claimed(self, _delivery: Delivery) -> None:
        return None

    def settled(self, _delivery: Delivery) -> None:
        return None


class SlowLeases:
    """Leases whose claim waits until the test lets its confirm arrive."""

    def __init__(self) -> None:
        self.claim_started = asyncio.Event()
        self.confirm = asyncio.Event()
        self.finished: list[str] = []
        self.released: list[str] = []

    async def claim(self, _session: Any, _claim: Any) -> None:
        self.claim_started.set()
        await self.confirm.wait()

    async def finish(self, job_id: str) -> None:
        self.finished.append(job_id)

    async def release(self, _session: Any, claim: Any) -> bool:
        self.released.append(claim.job_id)
        return True


class FakePipeline:
    """A pipeline whose job runs until the test ends it."""

    def __init__(self, job: JobSpec) -> None:
        self.job = job
        self.end_job = asyncio.Event()
        self.results: list[FinalStatus] = []

    def authenticate(self, _delivery: Delivery) -> JobSpec:
        return self.job

    def admit(self, _job: JobSpec, _delivery: Delivery) -> None:
        return None

    async def execute(self, job: JobSpec, _delivery: Delivery, **_gpus: Any) -> Outcome:
        await self.end_job.wait()
        self.results.append(FinalStatus.SUCCEEDED)
        return Outcome(job.job_id, FinalStatus.SUCCEEDED, dead_letter=False, duration_s=1.0)

    async def cancel(self, job: JobSpec, _delivery: Delivery, _reason: str) -> Outcome:
        self.results.append(FinalStatus.CANCELLED)
        return Outcome(job.job_id, FinalStatus.CANCELLED, dead_letter=False)


class NoRecords:
    def finished(self, _job_id: str) -> None:
        return None


def agent_with_fakes(tmp_path, claim_after_s: float) -> tuple[Agent, dict[str, Any]]:
    config = SiteConfig.model_validate(
        {
            "site": {"name": "laptop"},
            "trust": {"signing_keys": []},
            "agent": {
                "state_dir": str(tmp_path),
                "claim_after_s": claim_after_s,
                "status_interval_s": 0,
            },
            "queues": [{"competition": "higgs", "name": "cpu"}],
        }
    )
    agent = Agent(config, NullRunner())
    agent.identity = Identity(agent_id=AGENT_ID, key=generate_private_key())
    fakes: dict[str, Any] = {
        "session": FakeSession(),
        "gate": FakeGate(),
        "leases": SlowLeases(),
        "pipeline": FakePipeline(job_spec()),
    }
    agent.session = fakes["session"]
    agent.gate = fakes["gate"]
    agent.leases = fakes["leases"]
    agent._pipeline = fakes["pipeline"]
    agent.state = NoRecords()  # type: ignore[assignment]
    return agent, fakes


async def end_job_during_claim(agent: Agent, fakes: dict[str, Any]) -> asyncio.Task[None]:
    """Start the job, end it once its claim has started, and return its task, which
    then waits for the claim's confirm."""
    handler = asyncio.create_task(agent._handle(fakes["session"], delivery()))
    await asyncio.wait_for(fakes["leases"].claim_started.wait(), 5)
    fakes["pipeline"].end_job.set()
    await asyncio.sleep(0.05)
    assert not handler.done()
    return handler


async def test_cancel_during_claim_after_job_end(tmp_path):
    """A cancel request that lands while the ended job waits for its claim.

    The job has its result, so the request comes too late to change it. The agent
    must still forget the job, free its resources and settle its delivery once.
    """
    agent, fakes = agent_with_fakes(tmp_path, claim_after_s=0.01)
    session, gate, leases, pipeline = (
        fakes["session"], fakes["gate"], fakes["leases"], fakes["pipeline"]
    )
    handler = await end_job_during_claim(agent, fakes)

    agent._apply_cancel(CancelRequest(job_id="job-1", reason="withdrawn", at=utc_now()))
    await asyncio.sleep(0.05)
    leases.confirm.set()
    await asyncio.wait([handler], timeout=5)

    assert handler.done()
    assert "job-1" not in agent.running
    assert "job-1" not in gate.granted
    assert pipeline.results == [FinalStatus.SUCCEEDED]
    # The claim acked the delivery, so nothing settles it again.
    assert session.settled == [("ack", 1)]
    assert leases.finished == ["job-1"]


async def test_stop_during_claim_after_job_end(tmp_path):
    """An immediate stop while the ended job waits for its claim.

    The job has published its result, so the drain must not hand it back to be run
    again: its claim completes and its delivery is acked once.
    """
    agent, fakes = agent_with_fakes(tmp_path, claim_after_s=0.01)
    session, gate, leases, pipeline = (
        fakes["session"], fakes["gate"], fakes["leases"], fakes["pipeline"]
    )
    handler = await end_job_during_claim(agent, fakes)

    agent._stop.immediate.set()
    drain = asyncio.create_task(agent._drain())
    await asyncio.sleep(0.05)
    leases.confirm.set()
    await asyncio.wait_for(drain, 5)
    await asyncio.wait([handler], timeout=5)

    assert handler.done()
    assert "job-1" not in agent.running
    assert "job-1" not in gate.granted
    assert pipeline.results == [FinalStatus.SUCCEEDED]
    assert session.settled == [("ack", 1)]
    assert leases.released == []
    assert leases.finished == ["job-1"]


async def test_stop_while_job_runs_hands_back(tmp_path):
    """An immediate stop of a job that still runs, unclaimed: its delivery goes back."""
    agent, fakes = agent_with_fakes(tmp_path, claim_after_s=30)
    session, gate, leases = fakes["session"], fakes["gate"], fakes["leases"]
    handler = asyncio.create_task(agent._handle(session, delivery()))
    await asyncio.sleep(0.05)
    assert "job-1" in agent.running

    agent._stop.immediate.set()
    await asyncio.wait_for(agent._drain(), 5)

    assert handler.done()
    assert "job-1" not in agent.running
    assert "job-1" not in gate.granted
    assert session.settled == [("requeue", 1)]
    assert not leases.claim_started.is_set()
    assert leases.released == []


class FlakyLeases(SlowLeases):
    """Leases whose first claim fails outside the broker session, as a full disk would."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0
        self.confirm.set()

    async def claim(self, session: Any, claim: Any) -> None:
        self.attempts += 1
        if self.attempts == 1:
            raise sqlite3.OperationalError("database or disk is full")
        await super().claim(session, claim)


async def test_claim_failing_outside_session_is_tried_again(tmp_path, caplog):
    agent, fakes = agent_with_fakes(tmp_path, claim_after_s=0.01)
    leases = fakes["leases"] = agent.leases = FlakyLeases()  # type: ignore[assignment]
    session, pipeline = fakes["session"], fakes["pipeline"]
    handler = asyncio.create_task(agent._handle(session, delivery()))

    await asyncio.wait_for(leases.claim_started.wait(), 5)
    await asyncio.sleep(0.05)
    pipeline.end_job.set()
    await asyncio.wait_for(handler, 5)

    assert leases.attempts == 2
    assert "failed claiming running job job-1" in caplog.text
    assert "trying again in 0.01 s" in caplog.text
    assert session.settled == [("ack", 1)]
    assert leases.finished == ["job-1"]
