"""Claims on running jobs: the agent's side of ack on claim (docs/delivery.md).

Once a job may start, the agent stores a claim in its state folder, publishes a
signed lease event with a publisher confirm to the coordinator, and only then acks
the delivery. Heartbeats that list the job renew its lease. A job that will not
finish here is released, so that the coordinator queues it again at once. The
broker's consumer_timeout then never applies to a running job, because the delivery
of a running job is already acked.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Container

from fairu.protocol.models import MAX_LEASE_MESSAGE_BYTES, LeaseAction, LeaseEvent, utc_now
from fairu.protocol.signing import sign_model
from fairu.protocol.topology import EVENTS_EXCHANGE, lease_routing_key

from .session import AmqpSession, PublishFailed, SessionError
from .state import Claim, Identity, StateDir

logger = logging.getLogger(__name__)


class AgentLeases:
    def __init__(self, identity: Identity, state: StateDir, ttl_s: float) -> None:
        self.identity = identity
        self.state = state
        self.ttl_s = ttl_s

    @property
    def agent_id(self) -> str:
        return self.identity.agent_id

    async def claim(self, session: AmqpSession, claim: Claim) -> None:
        """Store the claim, then publish it and wait for the broker's confirm.

        Raises `SessionError` when the publish fails, after removing the stored
        claim, because the coordinator may never have seen it.
        """
        await asyncio.to_thread(
            self.state.record_claim, claim.job_id, claim.routing_key, claim.message
        )
        try:
            await self._publish(session, LeaseAction.CLAIM, claim)
        except BaseException:
            # Also on a stop during the publish: the caller hands the delivery back
            # unacked, and the agent that receives it next claims the job again.
            await asyncio.to_thread(self.state.drop_claim, claim.job_id)
            raise
        logger.info(
            "agent %s claimed job %s with a lease of %g s", self.agent_id, claim.job_id,
            self.ttl_s,
        )

    async def release(self, session: AmqpSession | None, claim: Claim) -> bool:
        """Ask the coordinator to queue a claimed job again; return False on failure.

        A claim that could not be released stays stored, so the next start releases
        it. Until then, the coordinator queues the job when its lease expires.
        """
        if session is None or not session.is_open:
            logger.warning(
                "agent %s cannot release job %s, no broker session; the next start "
                "releases it, or the coordinator queues it again when its lease expires",
                self.agent_id, claim.job_id,
            )
            return False
        try:
            await self._publish(session, LeaseAction.RELEASE, claim)
        except SessionError as exc:
            logger.warning(
                "agent %s failed to release job %s (%s); the next start releases it, "
                "or the coordinator queues it again when its lease expires",
                self.agent_id, claim.job_id, exc,
            )
            return False
        await asyncio.to_thread(self.state.drop_claim, claim.job_id)
        logger.info("agent %s released job %s to be queued again", self.agent_id, claim.job_id)
        return True

    async def finish(self, job_id: str) -> None:
        """Drop the claim of a job whose result this agent has recorded."""
        await asyncio.to_thread(self.state.drop_claim, job_id)

    async def release_left_over(self, session: AmqpSession, running: Container[str]) -> None:
        """Release the claims that an earlier run of this agent left unfinished.

        A claim whose job has a recorded result here only needs dropping, because
        the result spool publishes that result. Raises `SessionError` when a
        release fails, so the caller reconnects and tries again.
        """
        for claim in await asyncio.to_thread(self.state.claims):
            if claim.job_id in running:
                continue
            if await asyncio.to_thread(self.state.finished, claim.job_id) is not None:
                logger.info(
                    "agent %s dropped its claim of job %s, which ended before the restart",
                    self.agent_id, claim.job_id,
                )
                await self.finish(claim.job_id)
                continue
            logger.warning(
                "agent %s releasing job %s, claimed before a restart and not finished",
                self.agent_id, claim.job_id,
            )
            await self._publish(session, LeaseAction.RELEASE, claim)
            await self.finish(claim.job_id)

    async def _publish(self, session: AmqpSession, action: LeaseAction, claim: Claim) -> None:
        event = LeaseEvent(
            action=action,
            agent_id=self.agent_id,
            job_id=claim.job_id,
            routing_key=claim.routing_key,
            job_message=base64.b64encode(claim.message).decode(),
            ttl_s=self.ttl_s,
            at=utc_now(),
        )
        body = sign_model(event, self.identity.key, self.agent_id)
        if len(body) > MAX_LEASE_MESSAGE_BYTES:
            raise PublishFailed(
                f"the lease event of job {claim.job_id} is {len(body)} bytes, over the "
                f"coordinator's limit of {MAX_LEASE_MESSAGE_BYTES}",
                permanent=True,
            )
        # mandatory: a lease that reaches no queue must not let the delivery be acked.
        await session.publish(
            EVENTS_EXCHANGE, lease_routing_key(self.agent_id), body, mandatory=True
        )
