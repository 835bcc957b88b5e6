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
import os
import random
import signal
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fairu.agent.session import (
    AmqpSession,
    Delivery,
    PublishFailed,
    SessionError,
    amqp_url_argument,
)
from fairu.logs import configure_logging, log_level_argument
from fairu.protocol.errors import ConfigError, ErrorCode, RejectedError
from fairu.protocol.models import (
    Envelope,
    ErrorInfo,
    FinalStatus,
    Heartbeat,
    JobResult,
    MAX_LEASE_MESSAGE_BYTES,
    JobSpec,
    LeaseEvent,
    Registration,
    utc_now,
)
from fairu.protocol.signing import (
    agent_id_for,
    decode_envelope,
    generate_private_key,
    load_private_key,
    load_public_key_text,
    parse_payload,
    sign_model,
    verify_envelope,
    write_private_key,
)
from fairu.protocol.topology import (
    COORDINATOR_DEAD_LETTERS_QUEUE,
    COORDINATOR_HEARTBEATS_QUEUE,
    COORDINATOR_ID,
    COORDINATOR_RECORDS_QUEUE,
    DEAD_LETTER_EXCHANGE,
    JOBS_EXCHANGE,
    RESULTS_EXCHANGE,
    job_queue_name,
    job_routing_key,
    result_routing_key,
)

from .api import (
    DEFAULT_HTTP_HOST,
    DEFAULT_HTTP_PORT,
    ApiServer,
    is_loopback_address,
    make_app,
    parse_listen,
)
from .leases import LEASE_EXPIRY_LIMIT, Leases
from .scheduling import (
    MAX_REQUEUE_ROUNDS,
    REQUEUE_ROUNDS_HEADER,
    give_up_message,
    offers_for_queue,
    place,
    requeue_delay_s,
    unschedulable_message,
)
from .store import Store
from .topology import declare_topology

if TYPE_CHECKING:
    from .evaluations import Evaluations

logger = logging.getLogger(__name__)

PREFETCH = 256
RECONNECT_MAX_S = 30.0
LIVENESS_INTERVAL_S = 1.0
# Dead-letter reason of a quorum queue message past x-delivery-limit (RabbitMQ 3.10).
DELIVERY_LIMIT_REASON = "delivery_limit"
PLATFORM_SITE = "platform"
# A result may carry up to 8 MiB of artifacts, base64-encoded twice in its envelope.
MAX_RECORD_BYTES = 24 * 1024 * 1024


@dataclass(frozen=True)
class CoordinatorQueues:
    """The queues the coordinator reads; tests pass copies of their own."""

    records: str = COORDINATOR_RECORDS_QUEUE
    heartbeats: str = COORDINATOR_HEARTBEATS_QUEUE
    # None reads no dead letters, so no job is ended or published again.
    dead_letters: str | None = COORDINATOR_DEAD_LETTERS_QUEUE


class Coordinator:
    def __init__(
        self,
        broker_url: str,
        store: Store,
        *,
        queues: CoordinatorQueues = CoordinatorQueues(),
        key: Ed25519PrivateKey | None = None,
        requeue_delay: Callable[[int], float] = requeue_delay_s,
        lease_expiry_limit: int = LEASE_EXPIRY_LIMIT,
        evaluations: Evaluations | None = None,
        http: tuple[str, int] | None = None,
    ) -> None:
        """`key` signs the coordinator's own results; None makes a key for this run.

        A job fails once its lease has expired `lease_expiry_limit` times.
        `evaluations`, when given, receives every recorded result. `http` is the
        (host, port) of the HTTP API and page; None serves neither.
        """
        self.broker_url = broker_url
        self.store = store
        self.queues = queues
        self.key = key or generate_private_key()
        self.requeue_delay = requeue_delay
        self.stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._workers: dict[str, _Worker] = {}
        self.leases = Leases(store, self._fail_job, lease_expiry_limit)
        self.evaluations = evaluations
        self.api: ApiServer | None = None
        if http is not None:
            host, port = http
            app = make_app(store, evaluations, loopback_only=is_loopback_address(host))
            self.api = ApiServer(app, host, port)
        self._agent_keys: dict[str, Ed25519PublicKey] = {}

    async def run(self) -> None:
        logger.info("coordinator starting with database %s", self.store.path)
        if self.api is not None:
            # Before anything else, so a port in use stops the start at once.
            await self.api.start()
        liveness = asyncio.create_task(self._watch_liveness())
        if self.evaluations is not None:
            await self.evaluations.start()
        try:
            await self._serve_until_stopped()
        finally:
            liveness.cancel()
            await asyncio.gather(liveness, return_exceptions=True)
            if self.api is not None:
                await self.api.stop()
            if self.evaluations is not None:
                await self.evaluations.close()
        logger.info("coordinator stopped")

    async def _serve_until_stopped(self) -> None:
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

    async def _watch_liveness(self) -> None:
        """Mark agents stale or offline as their heartbeats stop; log each change."""
        while True:
            try:
                changes = await asyncio.to_thread(self.store.mark_liveness)
            except Exception:
                logger.exception("coordinator failed to update agent liveness")
                changes = []
            for agent_id, old, new in changes:
                level = logging.INFO if new == "live" else logging.WARNING
                logger.log(level, "agent %s is now %s (was %s)", agent_id, new, old)
            await asyncio.sleep(LIVENESS_INTERVAL_S)

    async def _serve(self) -> None:
        session = AmqpSession(self.broker_url, name="fairu-coordinator")
        await session.open()
        try:
            await declare_topology(session)
            if self.queues.dead_letters == COORDINATOR_DEAD_LETTERS_QUEUE:
                await session.declare_queue(
                    COORDINATOR_DEAD_LETTERS_QUEUE, arguments={"x-queue-type": "quorum"}
                )
                await session.bind(
                    COORDINATOR_DEAD_LETTERS_QUEUE, DEAD_LETTER_EXCHANGE, ""
                )
            await session.set_prefetch(PREFETCH)
            queues = [self.queues.records, self.queues.heartbeats]
            if self.queues.dead_letters is not None:
                queues.append(self.queues.dead_letters)
            for queue in queues:
                await session.consume(queue, lambda d: self._spawn(session, d))
            sweep = asyncio.create_task(self.leases.serve(session, self._caught_up))
            self._tasks.add(sweep)
            sweep.add_done_callback(self._tasks.discard)
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
        if delivery.queue == self.queues.dead_letters:
            await self._handle_dead_letter(session, delivery)
            return
        try:
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

    async def handle_message(self, body: bytes) -> None:
        # Results carry artifacts and lease events a whole job message, so both may
        # exceed a job's limit; MAX_RECORD_BYTES is the larger of the two limits.
        envelope = decode_envelope(body, max(MAX_RECORD_BYTES, MAX_LEASE_MESSAGE_BYTES))
        kind = _peek_kind(envelope.payload)
        if kind == "registration":
            await self._register(envelope)
        elif kind == "heartbeat":
            await self._heartbeat(envelope)
        elif kind == "result":
            await self._record_result(envelope, body)
        elif kind == "lease":
            await self._lease(envelope)
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
            beat.capacity.model_dump(mode="json") if beat.capacity else None,
            beat.free.model_dump(mode="json") if beat.free else None,
        )
        await self.leases.renew(beat.agent_id, list(beat.running_jobs))

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
        await self.leases.renew(registration.agent_id, list(registration.running_jobs))
        approval = await asyncio.to_thread(self.store.approval, registration.agent_id)
        logger.info(
            "agent %s of site %s registered (%d cores, %d GPUs, %s)",
            registration.agent_id, registration.site, registration.cpu_cores,
            len(registration.gpus), approval,
        )

    # --- leases -----------------------------------------------------------------

    async def _lease(self, envelope: Envelope) -> None:
        key = await self._agent_key(envelope.key_id)
        payload = verify_envelope(envelope, {envelope.key_id: key})
        event = parse_payload(payload, LeaseEvent)
        _check_sender(envelope.key_id, event.agent_id)
        # A stored lease makes this coordinator publish the event's job message,
        # unverified, to fairu.jobs. Only approved agents may do that, as only their
        # results are recorded.
        approval = await asyncio.to_thread(self.store.approval, event.agent_id)
        if approval != "approved":
            raise RejectedError(
                ErrorCode.UNKNOWN_KEY,
                f"{event.action.value} of job {event.job_id} from agent "
                f"{event.agent_id}, which is {approval}, not approved; approve it with "
                "`fairu-admin agents approve` before it takes jobs",
            )
        await self.leases.handle(event)

    async def _caught_up(self, session: AmqpSession) -> bool:
        """Return whether no heartbeat or result waits to be read."""
        for queue in (self.queues.records, self.queues.heartbeats):
            worker = self._workers.get(queue)
            if worker is not None and not worker.inbox.empty():
                return False
            if await session.queue_message_count(queue):
                return False
        return True

    # --- results ----------------------------------------------------------------

    async def _record_result(self, envelope: Envelope, body: bytes) -> None:
        if envelope.key_id == COORDINATOR_ID:
            # A result this coordinator made: it was recorded before it was published.
            verify_envelope(envelope, {COORDINATOR_ID: self.key.public_key()})
            logger.debug("skipped a result this coordinator published itself")
            return
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
            await self._notify_evaluations(result, body)
        else:
            await asyncio.to_thread(
                self.store.audit_result, result.job_id, result.agent_id, status,
                "a final result was already recorded for this job", body,
            )
            logger.info(
                "duplicate result of job %s from agent %s kept for audit",
                result.job_id, result.agent_id,
            )
            # The first copy may have been recorded just before a crash, before its
            # evaluation saw it; an attempt that already ended ignores the repeat.
            await self._notify_evaluations(result, body)

    async def _notify_evaluations(self, result: JobResult, body: bytes) -> None:
        if self.evaluations is not None:
            await self.evaluations.on_result(result, body)

    async def _agent_key(self, agent_id: str) -> Ed25519PublicKey:
        # An agent id derives from its key, so a key once found never changes.
        key = self._agent_keys.get(agent_id)
        if key is not None:
            return key
        text = await asyncio.to_thread(self.store.agent_key, agent_id)
        if text is None:
            raise RejectedError(
                ErrorCode.UNKNOWN_KEY,
                f"message from agent {agent_id}, which never registered",
            )
        key = self._agent_keys[agent_id] = load_public_key_text(text)
        return key


    # --- dead letters -----------------------------------------------------------

    async def _handle_dead_letter(
        self, session: AmqpSession, delivery: Delivery
    ) -> None:
        """End or publish again a job past its delivery limit; ack other dead letters.

        A message rejected by an agent already has its result, so only messages
        dead-lettered for the delivery limit need a decision.
        """
        reason, queue = _first_death(delivery)
        job = _read_job(delivery.body) if reason == DELIVERY_LIMIT_REASON else None
        if job is None:
            logger.debug("ignored a dead letter from %s (reason %s)", queue, reason)
            session.ack(delivery.delivery_tag)
            return
        queue = job_queue_name(job.competition, job.queue)
        agents = await asyncio.to_thread(self.store.agents)
        placement = place(job.resources, offers_for_queue(agents, queue))
        rounds = _requeue_rounds(delivery)
        if placement.fitting and rounds < MAX_REQUEUE_ROUNDS:
            task = asyncio.create_task(
                self._publish_again(session, delivery, job, rounds)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        if placement.fitting:
            message = give_up_message(job, queue, rounds, placement)
        else:
            message = unschedulable_message(job, queue, placement)
        try:
            await self._fail_job(session, job, message)
        except SessionError as exc:
            # The dead letter stays unacked, so the broker delivers it again after
            # the reconnect and the job still gets its result.
            logger.warning(
                "result of unschedulable job %s not published: %s", job.job_id, exc
            )
            return
        session.ack(delivery.delivery_tag)

    async def _publish_again(
        self, session: AmqpSession, delivery: Delivery, job: JobSpec, rounds: int
    ) -> None:
        delay = self.requeue_delay(rounds)
        logger.info(
            "job %s went past its delivery limit, but agents offer enough for it; "
            "publishing it again in %.0f s (round %d of %d)",
            job.job_id, delay, rounds + 1, MAX_REQUEUE_ROUNDS,
        )
        await asyncio.sleep(delay)
        try:
            await session.publish(
                JOBS_EXCHANGE,
                job_routing_key(job.competition, job.queue),
                delivery.body,
                mandatory=True,
                headers={REQUEUE_ROUNDS_HEADER: rounds + 1},
            )
        except PublishFailed as exc:
            if not exc.permanent:
                logger.warning("job %s not published again: %s", job.job_id, exc)
                return
            # No queue is bound for the job any more, so it can never run.
            queue = job_queue_name(job.competition, job.queue)
            try:
                await self._fail_job(
                    session, job, f"job {job.job_id} cannot be published again: {exc}"
                )
            except SessionError as error:
                logger.warning("job %s has no result yet: %s", job.job_id, error)
                return
            logger.warning("job %s ended because %s is gone", job.job_id, queue)
        except SessionError as exc:
            logger.warning("job %s not published again: %s", job.job_id, exc)
            return
        session.ack(delivery.delivery_tag)

    async def _fail_job(
        self,
        session: AmqpSession,
        job: JobSpec,
        message: str,
        code: ErrorCode = ErrorCode.UNSCHEDULABLE,
    ) -> None:
        """Record and publish a failed result for a job that no agent will run."""
        logger.warning("job %s failed: %s", job.job_id, message)
        result = JobResult(
            job_id=job.job_id,
            agent_id=COORDINATOR_ID,
            site=PLATFORM_SITE,
            competition=job.competition,
            queue=job.queue,
            submission_id=job.submission_id,
            status=FinalStatus.FAILED,
            error=ErrorInfo(code=code, message=message[:4000]),
            finished_at=utc_now(),
        )
        body = sign_model(result, self.key, COORDINATOR_ID)
        recorded = await asyncio.to_thread(
            self.store.record_result, job.job_id, COORDINATOR_ID, PLATFORM_SITE,
            result.status.value, {}, body,
        )
        if not recorded:
            logger.info(
                "job %s already has a recorded result; not publishing another",
                job.job_id,
            )
            return
        await self._notify_evaluations(result, body)
        await session.publish(RESULTS_EXCHANGE, result_routing_key(job.job_id), body)


def _first_death(delivery: Delivery) -> tuple[str, str]:
    """Return the reason and queue of a dead letter's first x-death entry."""
    headers = delivery.properties.headers or {}
    deaths = headers.get("x-death") or []
    if not deaths or not isinstance(deaths[0], dict):
        return "", ""
    death = deaths[0]
    return _header_text(death.get("reason")), _header_text(death.get("queue"))


def _header_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value) if value is not None else ""


def _requeue_rounds(delivery: Delivery) -> int:
    rounds = (delivery.properties.headers or {}).get(REQUEUE_ROUNDS_HEADER, 0)
    return rounds if isinstance(rounds, int) and rounds >= 0 else 0


def _read_job(body: bytes) -> JobSpec | None:
    """Read a dead-lettered job without checking its signature.

    NOTE: the coordinator has no job-signing trust, so it reads the job unverified.
    Only admins can publish jobs, and the worst a forged one can do here is to end
    its own job id with a failed result or to be published again.
    """
    try:
        envelope = decode_envelope(body)
        return parse_payload(base64.b64decode(envelope.payload), JobSpec)
    except (RejectedError, binascii.Error) as exc:
        logger.info("ignored a dead letter that is not a readable job: %s", exc)
        return None


@dataclass
class _Worker:
    session: AmqpSession
    inbox: asyncio.Queue[Delivery]
    task: asyncio.Task[None] | None = None


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
        "--broker",
        default="amqp://guest:guest@127.0.0.1:5672/%2F",
        type=amqp_url_argument,
        help="AMQP URL of the broker (default: the local guest URL)",
    )
    parser.add_argument(
        "--key",
        type=Path,
        help="private key that signs the coordinator's own results; made on first "
        "start (default: the database path with .key appended)",
    )
    parser.add_argument(
        "--lease-expiry-limit",
        type=int,
        default=LEASE_EXPIRY_LIMIT,
        help="lease expiries after which a job gets a failed result instead of being "
        f"queued again (default {LEASE_EXPIRY_LIMIT})",
    )
    parser.add_argument(
        "--keys-dir",
        type=Path,
        help="key folder with a certified job-signing key, root.pub and revocations, "
        "laid out as `fairu-admin keys` writes it; turns on sharded evaluations",
    )
    parser.add_argument(
        "--passphrase-env", metavar="VAR", help="variable holding the --keys-dir passphrase"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="folder for evaluation artifacts (default: the database path with "
        ".evaluations appended)",
    )
    parser.add_argument(
        "--public-url",
        help="base URL of this coordinator's HTTP API as agents reach it, such as "
        "http://coordinator.example:8480; needed for scoring programs",
    )
    parser.add_argument(
        "--http",
        default=f"{DEFAULT_HTTP_HOST}:{DEFAULT_HTTP_PORT}",
        metavar="HOST:PORT",
        help="address of the HTTP API and the organizer page (default "
        f"{DEFAULT_HTTP_HOST}:{DEFAULT_HTTP_PORT}; 'off' serves neither). The API has "
        "no authentication, so keep it on loopback or behind an authenticating proxy",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=log_level_argument,
        help="DEBUG, INFO, WARNING or ERROR (default INFO)",
    )
    args = parser.parse_args(argv)
    if args.lease_expiry_limit < 1:
        parser.error(f"--lease-expiry-limit {args.lease_expiry_limit} must be 1 or more")
    configure_logging(args.log_level)
    try:
        http = None if args.http == "off" else parse_listen(args.http)
    except ConfigError as exc:
        print(f"fairu-coordinator: error: {exc}", file=sys.stderr)
        return 2
    if http is not None and not is_loopback_address(http[0]):
        logger.warning(
            "the HTTP API on %s:%d is reachable beyond this host and has no "
            "authentication: anyone who reaches it can cancel evaluations",
            *http,
        )
    try:
        args.db.parent.mkdir(parents=True, exist_ok=True)
        key = _load_or_make_key(args.key or args.db.with_name(args.db.name + ".key"))
        store = Store(args.db)
    except (OSError, ConfigError, sqlite3.Error) as exc:
        print(f"fairu-coordinator: error: cannot open database {args.db}: {exc}", file=sys.stderr)
        return 2
    try:
        evaluations = _make_evaluations(args, store)
    except (OSError, ConfigError, sqlite3.Error) as exc:
        print(f"fairu-coordinator: error: {exc}", file=sys.stderr)
        store.close()
        return 2

    async def serve() -> None:
        coordinator = Coordinator(
            args.broker,
            store,
            key=key,
            lease_expiry_limit=args.lease_expiry_limit,
            evaluations=evaluations,
            http=http,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, coordinator.stopping.set)
        await coordinator.run()

    try:
        asyncio.run(serve())
    except ConfigError as exc:
        print(f"fairu-coordinator: error: {exc}", file=sys.stderr)
        return 2
    except SessionError as exc:
        print(f"fairu-coordinator: error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


def _make_evaluations(args: argparse.Namespace, store: Store) -> Evaluations | None:
    from .evaluations import CoordinatorKeys, Evaluations

    if args.keys_dir is None:
        return None
    passphrase = None
    if args.passphrase_env:
        value = os.environ.get(args.passphrase_env)
        if value is None:
            raise ConfigError(f"--passphrase-env names {args.passphrase_env}, which is not set")
        passphrase = value.encode()
    keys = CoordinatorKeys(args.keys_dir, passphrase)
    keys.check()
    data_dir = args.data_dir or args.db.with_name(args.db.name + ".evaluations")
    return Evaluations(args.broker, store, data_dir, keys, public_base_url=args.public_url)


def _load_or_make_key(path: Path) -> Ed25519PrivateKey:
    if not path.exists():
        write_private_key(path, generate_private_key())
        logger.info("made the coordinator's signing key at %s", path)
    return load_private_key(path)


if __name__ == "__main__":
    sys.exit(main())
