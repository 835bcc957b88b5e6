"""The coordinator: the fleet registry and the one place where results are recorded.

It reads agent events and results from their durable platform queues, checks each
message's signature against the agent's identity key, and writes SQLite. A result
is recorded once per job id: the first authenticated final result wins, and every
later or unverifiable one goes to the audit table instead.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import random
import signal
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fairu.agent.session import AmqpSession, Delivery, SessionError
from fairu.logs import configure_logging
from fairu.protocol.errors import ConfigError, ErrorCode, RejectedError
from fairu.protocol.models import Envelope, Heartbeat, JobResult, Registration
from fairu.protocol.signing import (
    agent_id_for,
    decode_envelope,
    load_public_key_text,
    parse_payload,
    verify_envelope,
)
from fairu.agent.pipeline import claimed_job_id
from fairu.protocol.topology import (
    COORDINATOR_DEAD_QUEUE,
    COORDINATOR_HEARTBEATS_QUEUE,
    COORDINATOR_RECORDS_QUEUE,
    DELIVERY_LIMIT,
)

from .store import Store
from .topology import declare_topology

logger = logging.getLogger(__name__)

PREFETCH = 256
RECONNECT_MAX_S = 30.0


class Coordinator:
    def __init__(self, broker_url: str, store: Store) -> None:
        self.broker_url = broker_url
        self.store = store
        self.stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._workers: dict[str, _Worker] = {}

    async def run(self) -> None:
        logger.info("coordinator starting with database %s", self.store.path)
        attempt = 0
        while not self.stopping.is_set():
            try:
                await self._serve()
                attempt = 0
            except SessionError as exc:
                if exc.permanent:
                    raise
                attempt += 1
                delay = min(RECONNECT_MAX_S, 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                logger.warning(
                    "coordinator broker session failed (%s); reconnect attempt %d in %.1f s",
                    exc, attempt, delay,
                )
                try:
                    await asyncio.wait_for(self.stopping.wait(), delay)
                except TimeoutError:
                    pass
        logger.info("coordinator stopped")

    async def _serve(self) -> None:
        session = AmqpSession(self.broker_url, name="fairu-coordinator")
        await session.open()
        try:
            await declare_topology(session)
            await session.set_prefetch(PREFETCH)
            for queue in (
                COORDINATOR_RECORDS_QUEUE,
                COORDINATOR_HEARTBEATS_QUEUE,
                COORDINATOR_DEAD_QUEUE,
            ):
                await session.consume(queue, lambda d: self._spawn(session, d))
            logger.info("coordinator serving")
            assert session.closed is not None
            stop = asyncio.create_task(self.stopping.wait())
            await asyncio.wait({stop, session.closed}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if session.closed.done():
                raise SessionError(session.closed.result())
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._workers.clear()
            await session.close()

    def _spawn(self, session: AmqpSession, delivery: Delivery) -> None:
        # One worker per source queue keeps each queue's messages in order, so a
        # registration is stored before the heartbeats that follow it.
        worker = self._workers.get(delivery.queue)
        if worker is None or worker.session is not session:
            worker = _Worker(session, asyncio.Queue())
            worker.task = asyncio.create_task(self._work(worker))
            self._workers[delivery.queue] = worker
            self._tasks.add(worker.task)
            worker.task.add_done_callback(self._tasks.discard)
        worker.inbox.put_nowait(delivery)

    async def _work(self, worker: "_Worker") -> None:
        while worker.session.is_open:
            delivery = await worker.inbox.get()
            await self._handle(worker.session, delivery)

    async def _handle(self, session: AmqpSession, delivery: Delivery) -> None:
        try:
            if delivery.queue == COORDINATOR_DEAD_QUEUE:
                await self.handle_dead_letter(delivery)
            else:
                await self.handle_message(delivery.body)
        except RejectedError as exc:
            logger.warning(
                "dropped a message from %s (routing key %s): %s",
                delivery.queue, delivery.routing_key, exc,
            )
        except Exception:
            # Keep serving; the message is acked below so it cannot loop, and the
            # traceback is in the log for the operator.
            logger.exception(
                "unexpected error handling a message from %s (routing key %s)",
                delivery.queue, delivery.routing_key,
            )
        session.ack(delivery.delivery_tag)

    # --- agent events -----------------------------------------------------------

    async def handle_dead_letter(self, delivery: Delivery) -> None:
        """Give a job that hit the delivery limit its failed result.

        Messages that an agent rejected were dead-lettered after their result was
        published, so only the delivery limit needs a result here.
        """
        reason = _death_reason(delivery)
        if reason != "delivery_limit":
            return
        job_id = claimed_job_id(delivery.body)
        message = (
            f"the job message was delivered {DELIVERY_LIMIT} times without a result "
            "(each agent that took it crashed or lost its connection) and went to the "
            "dead-letter queue"
        )
        recorded = await asyncio.to_thread(
            self.store.record_failure, job_id, ErrorCode.DELIVERY_LIMIT.value, message
        )
        if recorded:
            logger.warning("job %s failed: %s", job_id, message)

    async def handle_message(self, body: bytes) -> None:
        envelope = decode_envelope(body)
        kind = _peek_kind(envelope.payload)
        if kind == "registration":
            await self._register(envelope)
        elif kind == "heartbeat":
            await self._heartbeat(envelope)
        elif kind == "result":
            await self._record_result(envelope, body)
        else:
            raise RejectedError(ErrorCode.BAD_PAYLOAD, f"unexpected message kind {kind!r}")

    async def _heartbeat(self, envelope: Envelope) -> None:
        key = await self._agent_key(envelope.key_id)
        payload = verify_envelope(envelope, {envelope.key_id: key})
        beat = parse_payload(payload, Heartbeat)
        _check_sender(envelope.key_id, beat.agent_id)
        await asyncio.to_thread(
            self.store.update_heartbeat,
            beat.agent_id,
            beat.state.value,
            beat.free_slots,
            list(beat.running_jobs),
            beat.at.isoformat(),
        )

    async def _register(self, envelope: Envelope) -> None:
        # A registration is self-signed: it proves possession of the key it carries.
        claimed = parse_payload(base64.b64decode(envelope.payload), Registration)
        key = load_public_key_text(claimed.public_key)
        payload = verify_envelope(envelope, {envelope.key_id: key})
        registration = parse_payload(payload, Registration)
        _check_sender(envelope.key_id, registration.agent_id)
        if registration.agent_id != agent_id_for(registration.site, key):
            raise RejectedError(
                ErrorCode.BAD_PAYLOAD,
                f"agent id {registration.agent_id} does not derive from its key and site",
            )
        known = await asyncio.to_thread(self.store.agent_key, registration.agent_id)
        if known is not None and known != registration.public_key:
            raise RejectedError(
                ErrorCode.BAD_SIGNATURE,
                f"agent {registration.agent_id} registered with a different key",
            )
        fields = registration.model_dump(
            mode="json", exclude={"protocol", "kind", "enrollment_token"}
        )
        await asyncio.to_thread(self.store.upsert_registration, fields)
        if registration.enrollment_token:
            enrolled = await asyncio.to_thread(
                self.store.redeem_enrollment_token,
                registration.enrollment_token,
                registration.site,
                registration.agent_id,
            )
            if enrolled:
                logger.info("agent %s enrolled with a one-time token", registration.agent_id)
        approval = await asyncio.to_thread(self.store.approval, registration.agent_id)
        logger.info(
            "agent %s of site %s registered (%d cores, %d GPUs, %s)",
            registration.agent_id, registration.site, registration.cpu_cores,
            len(registration.gpus), approval,
        )

    # --- results ----------------------------------------------------------------

    async def _record_result(self, envelope: Envelope, body: bytes) -> None:
        key = await self._agent_key(envelope.key_id)
        payload = verify_envelope(envelope, {envelope.key_id: key})
        result = parse_payload(payload, JobResult)
        _check_sender(envelope.key_id, result.agent_id)
        status = result.status.value
        approval = await asyncio.to_thread(self.store.approval, result.agent_id)
        if approval != "approved":
            await asyncio.to_thread(
                self.store.audit_result, result.job_id, result.agent_id, status,
                f"agent is {approval}, not approved", body,
            )
            logger.warning(
                "result of job %s from %s agent %s kept apart, not recorded",
                result.job_id, approval, result.agent_id,
            )
            return
        if not result.authenticated:
            await asyncio.to_thread(
                self.store.audit_result, result.job_id, result.agent_id, status,
                "rejected before its signature was verified", body,
            )
            logger.info("result from %s for an unverified message kept for audit", result.agent_id)
            return
        recorded = await asyncio.to_thread(
            self.store.record_result, result.job_id, result.agent_id, result.site, status,
            dict(result.scores), body,
        )
        if recorded:
            logger.info(
                "recorded result of job %s from agent %s: %s", result.job_id, result.agent_id,
                status,
            )
        else:
            await asyncio.to_thread(
                self.store.audit_result, result.job_id, result.agent_id, status,
                "a final result was already recorded for this job", body,
            )
            logger.info(
                "duplicate result of job %s from agent %s kept for audit",
                result.job_id, result.agent_id,
            )

    async def _agent_key(self, agent_id: str) -> Ed25519PublicKey:
        text = await asyncio.to_thread(self.store.agent_key, agent_id)
        if text is None:
            raise RejectedError(
                ErrorCode.UNKNOWN_KEY,
                f"message from agent {agent_id}, which never registered",
            )
        return load_public_key_text(text)


@dataclass
class _Worker:
    session: AmqpSession
    inbox: asyncio.Queue[Delivery]
    task: asyncio.Task[None] | None = None


def _death_reason(delivery: Delivery) -> str | None:
    deaths = (delivery.properties.headers or {}).get("x-death") or []
    if not deaths or not isinstance(deaths[0], dict):
        return None
    reason = deaths[0].get("reason")
    return reason.decode() if isinstance(reason, bytes) else reason


def _peek_kind(payload_b64: str) -> object:
    try:
        return json.loads(base64.b64decode(payload_b64, validate=True)).get("kind")
    except (ValueError, binascii.Error, AttributeError):
        return None


def _check_sender(key_id: str, agent_id: str) -> None:
    if key_id != agent_id:
        raise RejectedError(
            ErrorCode.BAD_PAYLOAD,
            f"message signed as {key_id} claims to come from agent {agent_id}",
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fairu-coordinator", description="Record agents and results in SQLite."
    )
    parser.add_argument("--db", type=Path, required=True, help="SQLite database file")
    parser.add_argument(
        "--broker", default="amqp://guest:guest@127.0.0.1:5672/%2F", help="AMQP URL"
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        args.db.parent.mkdir(parents=True, exist_ok=True)
        store = Store(args.db)
    except (OSError, ConfigError, sqlite3.Error) as exc:
        print(f"fairu-coordinator: error: cannot open database {args.db}: {exc}", file=sys.stderr)
        return 2

    async def serve() -> None:
        coordinator = Coordinator(args.broker, store)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, coordinator.stopping.set)
        await coordinator.run()

    try:
        asyncio.run(serve())
    except SessionError as exc:
        print(f"fairu-coordinator: error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
