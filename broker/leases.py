"""Job leases: the coordinator's side of ack on claim (docs/delivery.md).

An agent acks a job's delivery once the coordinator's queue has confirmed its claim,
so the broker no longer returns the job when the agent dies. The coordinator does
instead. It stores each claim as a lease, renews the lease whenever a heartbeat or
registration of the holder lists the job, and queues the exact signed job message
again on `fairu.jobs` when the lease expires or its agent releases it. A job whose
lease expired `expiry_limit` times gets a failed result, so it is never stuck.
Agents cannot publish to `fairu.jobs`, which is why the coordinator re-queues.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Awaitable, Callable

from fairu.agent.session import AmqpSession, PublishFailed, SessionError
from fairu.protocol.errors import ErrorCode, RejectedError
from fairu.protocol.models import JobSpec, LeaseAction, LeaseEvent
from fairu.protocol.signing import open_unverified
from fairu.protocol.topology import JOBS_EXCHANGE, job_routing_key

from .store import HELD, Store, StoredLease

logger = logging.getLogger(__name__)

# Lease expiries after which a job fails instead of being queued again.
LEASE_EXPIRY_LIMIT = 3
LEASE_SWEEP_INTERVAL_S = 1.0
# A header on a job queued again after a lease expiry, counting the expiries.
LEASE_EXPIRIES_HEADER = "x-fairu-lease-expiries"

FailJob = Callable[[AmqpSession, JobSpec, str, ErrorCode], Awaitable[None]]
CaughtUp = Callable[[AmqpSession], Awaitable[bool]]


class Leases:
    def __init__(
        self, store: Store, fail_job: FailJob, expiry_limit: int = LEASE_EXPIRY_LIMIT
    ) -> None:
        """`fail_job` records and publishes a failed result signed by the coordinator."""
        if expiry_limit < 1:
            raise ValueError(f"lease expiry limit {expiry_limit} must be at least 1")
        self.store = store
        self.fail_job = fail_job
        self.expiry_limit = expiry_limit

    # --- agent messages -----------------------------------------------------------

    async def handle(self, event: LeaseEvent) -> None:
        """Store a verified claim or release; raise `RejectedError` for a bad one."""
        message = _job_message(event)
        now = time.time()
        if event.action is LeaseAction.CLAIM:
            if await asyncio.to_thread(self.store.result, event.job_id) is not None:
                logger.warning(
                    "agent %s claimed job %s, which already has a recorded result; "
                    "its second result will go to the audit table",
                    event.agent_id, event.job_id,
                )
                return
            await asyncio.to_thread(
                self.store.claim_lease, event.job_id, event.agent_id, event.routing_key,
                message, event.ttl_s, now,
            )
            logger.info(
                "agent %s claimed job %s with a lease of %g s",
                event.agent_id, event.job_id, event.ttl_s,
            )
            return
        outcome = await asyncio.to_thread(
            self.store.release_lease, event.job_id, event.agent_id, event.routing_key,
            message, now,
        )
        logger.info(
            "agent %s released job %s: %s", event.agent_id, event.job_id, outcome
        )

    async def renew(self, agent_id: str, job_ids: list[str]) -> None:
        """Renew the leases that `agent_id` holds on the jobs it reports running."""
        await asyncio.to_thread(self.store.renew_leases, agent_id, job_ids, time.time())

    # --- the sweep ----------------------------------------------------------------

    async def serve(self, session: AmqpSession, caught_up: CaughtUp) -> None:
        """Queue again the jobs whose lease expired or was released, until the
        session closes.

        Expired leases are acted on only while `caught_up` is true, that is while no
        heartbeat or result waits unread, since one of them may renew the lease or
        finish the job.
        """
        extended = await asyncio.to_thread(self.store.extend_leases, time.time())
        if extended:
            logger.info("coordinator extended %d held leases after connecting", extended)
        while session.is_open:
            try:
                await self.sweep(session, caught_up)
            except SessionError as exc:
                # The next sweep tries again; a closed session ends the loop.
                logger.warning("lease sweep failed, retrying in the next sweep: %s", exc)
            await asyncio.sleep(LEASE_SWEEP_INTERVAL_S)

    async def sweep(self, session: AmqpSession, caught_up: CaughtUp) -> None:
        await asyncio.to_thread(self.store.drop_finished_leases)
        due = await asyncio.to_thread(self.store.due_leases, time.time())
        if any(lease.state == HELD for lease in due) and not await caught_up(session):
            due = [lease for lease in due if lease.state != HELD]
        for lease in due:
            await self._queue_again(session, lease)

    async def _queue_again(self, session: AmqpSession, lease: StoredLease) -> None:
        expired = lease.state == HELD
        expiries = lease.expiries + 1 if expired else lease.expiries
        job = open_unverified(lease.message, JobSpec)
        if await asyncio.to_thread(self.store.result, lease.job_id) is not None:
            await asyncio.to_thread(self.store.drop_lease, lease.job_id)
            return
        if expired and expiries >= self.expiry_limit:
            await self._fail(
                session,
                lease,
                job,
                f"job {job.job_id} was claimed {expiries} times by agents that stopped "
                f"renewing its lease (the last was {lease.agent_id}), so it was given up; "
                "check those agents' logs, then submit the job again",
            )
            return
        try:
            await session.publish(
                JOBS_EXCHANGE,
                lease.routing_key,
                lease.message,
                mandatory=True,
                headers={LEASE_EXPIRIES_HEADER: expiries},
            )
        except PublishFailed as exc:
            if not exc.permanent:
                raise
            await self._fail(
                session, lease, job, f"job {job.job_id} cannot be queued again: {exc}"
            )
            return
        queued = await asyncio.to_thread(self.store.mark_lease_queued, lease, expiries)
        if expired:
            logger.warning(
                "lease of job %s held by agent %s expired (expiry %d of %d); queued "
                "the job again",
                lease.job_id, lease.agent_id, expiries, self.expiry_limit,
            )
        else:
            logger.info(
                "job %s released by agent %s; queued it again", lease.job_id, lease.agent_id
            )
        if not queued:
            logger.info(
                "job %s was claimed again while it was being queued; a copy may reach "
                "an agent that already runs it, which acks that copy",
                lease.job_id,
            )

    async def _fail(
        self, session: AmqpSession, lease: StoredLease, job: JobSpec, message: str
    ) -> None:
        await self.fail_job(session, job, message, ErrorCode.LEASE_EXPIRED)
        await asyncio.to_thread(self.store.drop_lease, lease.job_id)


def _job_message(event: LeaseEvent) -> bytes:
    """Return the job message of a lease event, checking that it names the job.

    NOTE: the coordinator has no job-signing trust, so the message is read
    unverified; the agents that receive it again verify its signature.
    """
    try:
        message = base64.b64decode(event.job_message, validate=True)
    except binascii.Error:
        raise RejectedError(
            ErrorCode.BAD_PAYLOAD, f"lease of job {event.job_id}: job_message is not base64"
        ) from None
    job = open_unverified(message, JobSpec)
    if job.job_id != event.job_id:
        raise RejectedError(
            ErrorCode.BAD_PAYLOAD,
            f"lease of job {event.job_id} carries the message of job {job.job_id}",
        )
    expected = job_routing_key(job.competition, job.queue)
    if event.routing_key != expected:
        raise RejectedError(
            ErrorCode.BAD_PAYLOAD,
            f"lease of job {event.job_id} names routing key {event.routing_key!r}, "
            f"but the job is for {expected!r}",
        )
    return message
