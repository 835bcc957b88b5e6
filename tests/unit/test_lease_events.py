"""The coordinator's handling of agents' lease events, without a broker.

Storing a lease is what later makes the coordinator publish the event's job message
to `fairu.jobs`, so these tests check which events may store one.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from fairu.broker.coordinator import Coordinator
from fairu.broker.store import Store
from fairu.protocol.errors import RejectedError
from fairu.protocol.models import JobSpec, LeaseAction, utc_now
from fairu.protocol.signing import generate_private_key, sign_model
from fairu.protocol.topology import job_routing_key

from ..signed_agent import SignedAgent


class Client(SignedAgent):
    """An agent identity serving competition "mine", with leases of a 60 s TTL."""

    def __init__(self) -> None:
        super().__init__(["fairu.jobs.mine.cpu"])

    def job_lease(
        self,
        action: LeaseAction,
        job: JobSpec,
        message: bytes,
        routing_key: str | None = None,
    ) -> bytes:
        """Sign a lease event for `job`, published with the job's own routing key
        unless `routing_key` replaces it."""
        routing_key = routing_key or job_routing_key(job.competition, job.queue)
        return self.lease(action, job.job_id, routing_key, message, ttl_s=60)


def forged_job(competition: str) -> tuple[JobSpec, bytes]:
    """Return a job for `competition`, signed by a key that no site trusts."""
    now = utc_now()
    job = JobSpec(
        job_id="job-forged0001",
        competition=competition,
        queue="cpu",
        submission_id="sub-1",
        image="localhost/fairu-python:1",
        command=["python3", "-c", "print('forged')"],
        created_at=now,
        expires_at=now + timedelta(minutes=30),
    )
    return job, sign_model(job, generate_private_key())


async def approved_client(coordinator: Coordinator) -> Client:
    client = Client()
    await coordinator.handle_message(client.registration())
    assert coordinator.store.set_approval(client.agent_id, "approved")
    return client


@pytest.fixture
def coordinator(tmp_path):
    store = Store(tmp_path / "coordinator.sqlite")
    # The URL is never opened: handle_message only reads and writes the store.
    yield Coordinator("amqp://127.0.0.1:1/%2F", store)
    store.close()


@pytest.mark.parametrize("action", [LeaseAction.CLAIM, LeaseAction.RELEASE])
@pytest.mark.parametrize("approval", ["pending", "revoked"])
async def test_unapproved_lease_event_stores_nothing(coordinator, action, approval):
    client = Client()
    await coordinator.handle_message(client.registration())
    if approval != "pending":
        assert coordinator.store.set_approval(client.agent_id, approval)
    job, message = forged_job("someone-elses")

    with pytest.raises(RejectedError, match=approval):
        await coordinator.handle_message(client.job_lease(action, job, message))

    assert coordinator.store.lease(job.job_id) is None


@pytest.mark.parametrize("action", [LeaseAction.CLAIM, LeaseAction.RELEASE])
async def test_approved_lease_event_stored(coordinator, action):
    client = await approved_client(coordinator)
    job, message = forged_job("mine")

    await coordinator.handle_message(client.job_lease(action, job, message))

    lease = coordinator.store.lease(job.job_id)
    assert lease is not None
    assert lease.agent_id == client.agent_id
    assert lease.message == message
    assert lease.state == ("held" if action is LeaseAction.CLAIM else "released")


async def test_other_agent_cannot_renew_or_release(coordinator):
    holder = await approved_client(coordinator)
    other = await approved_client(coordinator)
    job, message = forged_job("mine")
    await coordinator.handle_message(holder.job_lease(LeaseAction.CLAIM, job, message))
    claimed = coordinator.store.lease(job.job_id)

    await coordinator.handle_message(other.heartbeat([job.job_id]))
    await coordinator.handle_message(other.job_lease(LeaseAction.RELEASE, job, message))

    lease = coordinator.store.lease(job.job_id)
    assert lease == claimed


async def test_claim_routing_key_must_match_job(coordinator):
    client = await approved_client(coordinator)
    job, message = forged_job("mine")
    routing_key = job_routing_key("someone-elses", "cpu")

    with pytest.raises(RejectedError, match="routing key"):
        await coordinator.handle_message(
            client.job_lease(LeaseAction.CLAIM, job, message, routing_key)
        )

    assert coordinator.store.lease(job.job_id) is None


def test_finished_leases_dropped_by_key(tmp_path):
    store = Store(tmp_path / "coordinator.sqlite")
    for job_id in ("job-done", "job-running"):
        store.claim_lease(job_id, "test-a", "job.mine.cpu", b"message", 60, 0.0)
    assert store.record_result("job-done", "test-a", "test", "succeeded", {}, b"result")
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)

    assert store.drop_finished_leases() == 1

    store._db.set_trace_callback(None)
    assert store.lease("job-done") is None
    assert store.lease("job-running") is not None
    # The sweep runs this every second, so it must look results up by key instead
    # of reading every recorded result.
    (delete,) = [text for text in statements if text.startswith("DELETE")]
    rows = store._db.execute(f"EXPLAIN QUERY PLAN {delete}").fetchall()
    plan = " | ".join(row[3] for row in rows)
    assert "SEARCH results" in plan, plan
    store.close()
