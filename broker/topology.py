"""Declare the exchanges and queues fairu uses. Every declaration is idempotent."""

from __future__ import annotations

import logging

from fairu.agent.session import AmqpSession
from fairu.protocol import topology as names

logger = logging.getLogger(__name__)


async def declare_topology(session: AmqpSession) -> None:
    await session.declare_exchange(names.JOBS_EXCHANGE, "direct")
    await session.declare_exchange(names.EVENTS_EXCHANGE, "topic")
    await session.declare_exchange(names.RESULTS_EXCHANGE, "topic")
    await session.declare_exchange(names.DEAD_LETTER_EXCHANGE, "fanout")
    await session.declare_exchange(names.TRUST_EXCHANGE, "fanout")
    await session.declare_queue(
        names.TRUST_STREAM,
        arguments={"x-queue-type": "stream", "x-max-age": "400D"},
    )
    await session.bind(names.TRUST_STREAM, names.TRUST_EXCHANGE, "")
    quorum = {"x-queue-type": "quorum"}
    await session.declare_queue(names.DEAD_LETTER_QUEUE, arguments=quorum)
    await session.bind(names.DEAD_LETTER_QUEUE, names.DEAD_LETTER_EXCHANGE, "")
    # Results and agent events wait in durable queues until the coordinator reads them.
    records = names.COORDINATOR_RECORDS_QUEUE
    await session.declare_queue(records, arguments=quorum)
    await session.bind(records, names.RESULTS_EXCHANGE, "result.#")
    await session.bind(records, names.EVENTS_EXCHANGE, "agent.registration.#")
    await session.bind(records, names.EVENTS_EXCHANGE, "agent.lease.#")
    heartbeats = names.COORDINATOR_HEARTBEATS_QUEUE
    await session.declare_queue(heartbeats, arguments=quorum)
    await session.bind(heartbeats, names.EVENTS_EXCHANGE, "agent.heartbeat.#")
    logger.info("declared the fairu exchanges and platform queues")


async def declare_job_queue(session: AmqpSession, competition: str, queue: str) -> str:
    """Declare the quorum queue for one competition queue and bind it; return its name."""
    name = names.job_queue_name(competition, queue)
    await session.declare_queue(name, arguments=names.job_queue_arguments())
    await session.bind(name, names.JOBS_EXCHANGE, names.job_routing_key(competition, queue))
    logger.info("declared job queue %s", name)
    return name
