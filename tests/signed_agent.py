"""An agent identity for tests that send agent messages without an agent process."""

from __future__ import annotations

import base64

from fairu.protocol.models import (
    AgentState,
    Heartbeat,
    LeaseAction,
    LeaseEvent,
    Registration,
    utc_now,
)
from fairu.protocol.signing import (
    agent_id_for,
    generate_private_key,
    public_key_text,
    sign_model,
)


class SignedAgent:
    """An agent of site "test" that signs its registration, heartbeats and leases."""

    def __init__(self, queues: list[str]) -> None:
        self.key = generate_private_key()
        self.agent_id = agent_id_for("test", self.key.public_key())
        self.queues = queues

    def registration(self) -> bytes:
        registration = Registration(
            agent_id=self.agent_id,
            site="test",
            version="test",
            public_key=public_key_text(self.key.public_key()),
            cpu_cores=1,
            memory_bytes=1 << 30,
            queues=self.queues,
            slots=1,
            free_slots=1,
            at=utc_now(),
        )
        return sign_model(registration, self.key, self.agent_id)

    def heartbeat(self, running_jobs: list[str]) -> bytes:
        heartbeat = Heartbeat(
            agent_id=self.agent_id,
            site="test",
            state=AgentState.SERVING,
            running_jobs=running_jobs,
            free_slots=0,
            at=utc_now(),
        )
        return sign_model(heartbeat, self.key, self.agent_id)

    def lease(
        self,
        action: LeaseAction,
        job_id: str,
        routing_key: str,
        job_message: bytes,
        ttl_s: float,
    ) -> bytes:
        """Sign a lease event for the job message published with `routing_key`."""
        event = LeaseEvent(
            action=action,
            agent_id=self.agent_id,
            job_id=job_id,
            routing_key=routing_key,
            job_message=base64.b64encode(job_message).decode(),
            ttl_s=ttl_s,
            at=utc_now(),
        )
        return sign_model(event, self.key, self.agent_id)
