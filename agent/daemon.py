"""The agent daemon: broker sessions, deliveries, heartbeats and a clean stop.

One `Agent` owns one broker session at a time and reconnects with jittered
exponential backoff when it drops. Jobs run as tasks and keep running across a
reconnect. A delivery is acked only on the session that carried it, because a
delivery tag means nothing on another channel.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import signal
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import ModuleType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fairu import __version__
from fairu.protocol.errors import ErrorCode, RejectedError
from fairu.protocol.models import (
    AgentState,
    CancelRequest,
    Envelope,
    Heartbeat,
    JobSpec,
    Registration,
    ResourceAmounts,
    RootChain,
    SandboxInfo,
    StatusEvent,
    utc_now,
)
from fairu.protocol.placement import GpuUnit
from fairu.protocol.signing import decode_envelope, parse_payload, public_key_text, sign_model
from fairu.protocol.trust import verify_job_envelope
from fairu.protocol.topology import (
    EVENTS_EXCHANGE,
    RESULTS_EXCHANGE,
    TRUST_STREAM,
    heartbeat_routing_key,
    job_routing_key,
    registration_routing_key,
    result_routing_key,
    status_routing_key,
)
from fairu.runners.base import Runner, RunnerError

from .admission import (
    Admission,
    Decision,
    PrefetchGate,
    Verdict,
    cdi_device_name,
    log_give_back,
    set_up_admission,
)
from .config import SiteConfig
from .fetch import InputCache
from .health import AgentMetrics, Gauges, HealthServer, parse_listen
from .leases import AgentLeases
from .pipeline import JobPipeline, Outcome, PipelineSettings, message_digest
from .policy import review_sandbox
from .probe import Capacity, probe_capacity
from .session import AmqpSession, Delivery, PublishFailed, SessionError
from .state import Claim, Identity, StateDir
from .status import StatusCoalescer
from .trust import TrustStore

logger = logging.getLogger(__name__)

RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 30.0
# A session that stayed up this long resets the backoff to its minimum.
STABLE_SESSION_S = 60.0
# How long an agent waits, when it connects, to replay the trust stream before it
# takes jobs anyway.
TRUST_REPLAY_TIMEOUT_S = 15.0


class AgentError(Exception):
    """The agent cannot serve (bad config, broker refuses it, runtime missing)."""


@dataclass
class RunningJob:
    job: JobSpec
    session: AmqpSession
    delivery: Delivery
    task: asyncio.Task[None] | None = None
    # Set by a cancel request; the task is then cancelled and ends the job as cancelled.
    cancel_reason: str | None = None
    # True once the coordinator confirmed the claim and the delivery was acked; a
    # job that is not claimed yet, or could not be, runs with its delivery unacked.
    claimed: bool = False
    # The task that claims the job once it has run for agent.claim_after_s.
    claimer: asyncio.Task[None] | None = None
    # True while that task publishes the claim and acks, which must not be cut short.
    claiming: bool = False
    # True once the job has its result. A cancel request or a drain no longer cancels
    # its task then, because the task only waits for a claim in progress and settles
    # the delivery.
    ended: bool = False

    @property
    def claim(self) -> Claim:
        routing_key = job_routing_key(self.job.competition, self.job.queue)
        return Claim(self.job.job_id, routing_key, self.delivery.body)


@dataclass
class _Stop:
    requested: asyncio.Event = field(default_factory=asyncio.Event)
    immediate: asyncio.Event = field(default_factory=asyncio.Event)


class Agent:
    def __init__(
        self, config: SiteConfig, runner: Runner, nvml: ModuleType | None = None
    ) -> None:
        """`nvml` replaces the pynvml module that the capacity probe uses."""
        self.config = config
        self.runner = runner
        self._nvml = nvml
        self.admission: Admission | None = None
        self.gate: PrefetchGate | None = None
        self.metrics = AgentMetrics()
        self.health: HealthServer | None = None
        self.state = StateDir(config.agent.state_dir)
        self.identity: Identity | None = None
        self.capacity: Capacity | None = None
        self.session: AmqpSession | None = None
        self.connected = asyncio.Event()
        self.running: dict[str, RunningJob] = {}
        self.agent_state = AgentState.STARTING
        self._stop = _Stop()
        self._abandon_publishing = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        # Spool files, and job ids of recorded results, that a publish_result call is
        # still publishing. The spool flush after a reconnect skips them, so that no
        # result goes out twice.
        self._publishing: set[Path | str] = set()
        self._pipeline: JobPipeline | None = None
        self.trust: TrustStore | None = None
        # Job ids that a cancel request named, with its reason.
        self.cancelled: dict[str, str] = {}
        self._trust_seen = 0
        self._trust_backlog = 0
        self._trust_caught_up = asyncio.Event()
        self.sandbox: SandboxInfo | None = None
        self.leases: AgentLeases | None = None
        # Read once at start, so that removing a used token file does not stop the
        # agent at its next reconnect.
        self._enrollment_token: str | None = None
        # Deliveries acked on claim, by id(), so that no later step settles them again.
        self._acked_claims: set[int] = set()
        self._status_events = StatusCoalescer(
            self._publish_status_now, config.agent.status_interval_s
        )

    @property
    def agent_id(self) -> str:
        return self.identity.agent_id if self.identity else "unregistered"

    @property
    def free_slots(self) -> int:
        if self.admission is not None:
            return self.admission.free_slots()
        return max(0, self.config.agent.slots - len(self.running))

    # --- lifecycle --------------------------------------------------------------

    def request_stop(self, immediate: bool = False) -> None:
        if self._stop.requested.is_set() and not immediate:
            return
        logger.info("agent %s stopping%s", self.agent_id, " now" if immediate else "")
        self._stop.requested.set()
        if immediate:
            self._stop.immediate.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self._on_sigint)

    def _on_sigint(self) -> None:
        # The first SIGINT drains like SIGTERM; a second one stops at once.
        self.request_stop(immediate=self._stop.requested.is_set())

    async def run(self) -> None:
        # The settings that name files or addresses are checked before the state
        # folder is touched, so that a broken config leaves nothing behind.
        root_key, trusted_keys, self._enrollment_token = await asyncio.to_thread(
            self._read_config_files
        )
        parse_listen(self.config.agent.health_listen)
        await asyncio.to_thread(self.state.prepare)
        await asyncio.to_thread(self.state.lock)
        self.identity = await asyncio.to_thread(
            self.state.load_identity, self.config.site.name
        )
        self.leases = AgentLeases(self.identity, self.state, self.config.agent.lease_ttl_s)
        self.trust = TrustStore(
            self.config.agent.state_dir / "trust",
            root_key,
            trusted_keys,
            timedelta(seconds=self.config.agent.clock_skew_s),
        )
        await asyncio.to_thread(self.trust.load)
        self.capacity = await asyncio.to_thread(
            probe_capacity, self.config.agent.state_dir, self._nvml
        )
        self._set_up_admission(self.capacity)
        try:
            await self.runner.check()
            self.sandbox = await self.runner.describe_sandbox()
        except RunnerError as exc:
            raise AgentError(str(exc)) from None
        problem = review_sandbox(self.sandbox, self.config.runner, self.agent_id)
        if problem:
            # close() removes the seccomp profile that describe_sandbox() wrote.
            await self.runner.close()
            raise AgentError(problem)
        removed = await self.runner.remove_labelled(self.agent_id)
        if removed:
            logger.warning("agent %s removed %d containers left from before", self.agent_id, removed)

        async with aclosing(
            InputCache(self.state.cache, self.config.inputs.unpack_limits())
        ) as cache:
            self._pipeline = JobPipeline(
                PipelineSettings(
                    site=self.config.site.name,
                    max_message_bytes=self.config.agent.max_message_bytes,
                    clock_skew_s=self.config.agent.clock_skew_s,
                    max_artifact_bytes=self.config.agent.max_artifact_bytes,
                ),
                self.identity,
                self.trust,
                self.config.policy,
                self.state,
                cache,
                self.runner,
                self,
            )
            self.health = HealthServer(
                self.config.agent.health_listen,
                self.metrics,
                self._gauges,
                self.runner.check,
            )
            await self.health.start()
            try:
                await self._serve_until_stopped()
            finally:
                await self._shutdown()
                await self.health.stop()
        logger.info("agent %s stopped", self.agent_id)

    def _read_config_files(
        self,
    ) -> tuple[Ed25519PublicKey | None, dict[str, Ed25519PublicKey], str | None]:
        config = self.config
        return config.root_key(), config.trusted_keys(), config.agent.read_enrollment_token()

    def _set_up_admission(self, capacity: Capacity) -> None:
        self.admission, self.gate = set_up_admission(
            self.config, capacity, self._on_delivery, self.agent_id
        )

    def _gauges(self) -> Gauges:
        assert self.admission is not None
        connected = self.session is not None and self.session.is_open
        return Gauges.of(self.admission, len(self.running), connected)

    async def _serve_until_stopped(self) -> None:
        attempt = 0
        while not self._stop.requested.is_set():
            began = time.monotonic()
            try:
                await self._serve_session()
                attempt = 0
            except SessionError as exc:
                if exc.permanent:
                    raise AgentError(str(exc)) from None
                if time.monotonic() - began > STABLE_SESSION_S:
                    attempt = 0
                attempt += 1
                delay = min(RECONNECT_MAX_S, RECONNECT_MIN_S * 2 ** (attempt - 1))
                delay *= random.uniform(0.5, 1.0)
                logger.warning(
                    "agent %s broker session failed (%s); reconnect attempt %d in %.1f s",
                    self.agent_id, exc, attempt, delay,
                )
                await self._sleep_unless_stopped(delay)

    async def _serve_session(self) -> None:
        session = AmqpSession(
            self.config.broker.url,
            name=f"fairu-agent {self.agent_id}",
            heartbeat_s=self.config.broker.heartbeat_s,
        )
        await session.open()
        try:
            await self._subscribe(session)
            assert session.closed is not None
            stop = asyncio.create_task(self._stop.requested.wait())
            await asyncio.wait({stop, session.closed}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if session.closed.done():
                raise SessionError(session.closed.result())
        except SessionError as exc:
            if session.is_open:
                await session.close()
            if session.access_refused:
                raise SessionError(
                    f"{exc}; the broker rejected an operation for these credentials, so "
                    "check that the site's queues in the config are the ones assigned "
                    "to it (`fairu-admin sites list`)",
                    permanent=True,
                ) from None
            raise
        finally:
            # A stop leaves the session open so running jobs can still publish their
            # results while the agent drains; _shutdown closes it.
            if not session.is_open:
                self.connected.clear()

    async def _subscribe(self, session: AmqpSession) -> None:
        for queue in self.config.queues:
            if not await session.queue_exists(queue.amqp_name):
                raise SessionError(
                    f"queue {queue.amqp_name} does not exist on the broker; create it "
                    f"with `fairu-admin queues create {queue.name} --competition "
                    f"{queue.competition}` or fix [[queues]] in the site config",
                    permanent=True,
                )
        trust_backlog = await session.queue_message_count(TRUST_STREAM)
        if trust_backlog is None:
            raise SessionError(
                f"the trust stream {TRUST_STREAM} does not exist on the broker; declare the "
                "topology with `fairu-admin topology declare`",
                permanent=True,
            )
        await session.set_prefetch(self.config.agent.slots)
        self.session = session
        self.connected.set()
        assert session.closed is not None
        session.closed.add_done_callback(lambda _f: self.connected.clear())
        self.metrics.session_opened()
        await self._flush_spool(session)
        await self._publish_registration(session)
        assert self.leases is not None
        await self.leases.release_left_over(session, self.running)
        # Read the whole history: versions only go up and cancellations are final, so
        # replaying it is harmless and catches up on what this agent missed offline.
        # Jobs are consumed only after the replay, so a revoked key or a cancelled job
        # published while this agent was offline is known before any job arrives.
        self._trust_seen = 0
        self._trust_backlog = trust_backlog
        self._trust_caught_up = asyncio.Event()
        if trust_backlog == 0:
            self._trust_caught_up.set()
        await session.consume(
            TRUST_STREAM, self._on_trust_message, arguments={"x-stream-offset": "first"}
        )
        try:
            await asyncio.wait_for(self._trust_caught_up.wait(), TRUST_REPLAY_TIMEOUT_S)
        except TimeoutError:
            logger.warning(
                "agent %s read %d of %d trust messages within %.0f s; serving anyway",
                self.agent_id, self._trust_seen, trust_backlog, TRUST_REPLAY_TIMEOUT_S,
            )
        self.agent_state = AgentState.SERVING
        assert self.gate is not None
        await self.gate.attach(session)
        heartbeat = asyncio.create_task(self._heartbeat_loop(session))
        self._track(heartbeat)
        logger.info("agent %s serving %d queues", self.agent_id, len(self.config.queues))

    async def _shutdown(self) -> None:
        self.agent_state = AgentState.DRAINING
        if self.gate is not None:
            self.gate.stop()
        session = self.session
        if session is not None and session.is_open:
            # Closing the channel's consumers stops new deliveries; prefetched ones
            # that never started are returned by the broker when the channel closes.
            for tag in list(session.channel.consumer_tags):
                try:
                    await session.cancel(tag)
                except SessionError:
                    break
        await self._drain()
        self._status_events.clear()
        self.agent_state = AgentState.STOPPED
        if session is not None and session.is_open:
            try:
                await self._publish_heartbeat(session)
            except SessionError as exc:
                logger.warning("agent %s could not send its last heartbeat: %s", self.agent_id, exc)
        self._abandon_publishing.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if session is not None:
            await session.close()
        await self.runner.close()
        await asyncio.to_thread(self.state.close)
        await asyncio.to_thread(self.state.unlock)

    async def _drain(self) -> None:
        jobs = [job.task for job in self.running.values() if job.task is not None]
        if not jobs:
            return
        grace = 0.0 if self._stop.immediate.is_set() else self.config.agent.stop_grace_s
        logger.info(
            "agent %s waiting up to %.0f s for %d running jobs", self.agent_id, grace, len(jobs)
        )
        immediate = asyncio.create_task(self._stop.immediate.wait())
        all_done = asyncio.create_task(asyncio.wait(jobs))
        await asyncio.wait({immediate, all_done}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        immediate.cancel()
        all_done.cancel()
        unfinished = [job for job in self.running.values() if job.task and not job.task.done()]
        # A job that has its result only waits for a claim in progress, at most the
        # claim's publish timeout, so it settles on its own instead of going back.
        ending = [job.task for job in unfinished if job.ended and job.task]
        unfinished = [job for job in unfinished if not job.ended]
        for job in unfinished:
            logger.warning(
                "agent %s handing job %s back to be run again", self.agent_id, job.job.job_id
            )
            assert job.task is not None
            job.task.cancel()
            # The job ends here without a result, so its held status event goes too.
            self._status_events.finish(job.job.job_id)
        await asyncio.gather(
            *(job.task for job in unfinished if job.task), *ending, return_exceptions=True
        )
        for job in unfinished:
            await self._hand_back(job)

    async def _hand_back(self, job: RunningJob) -> None:
        """Release a claimed job to the coordinator, or return an unacked delivery."""
        if not job.claimed:
            self._settle(job.session, job.delivery, requeue=True)
            return
        assert self.leases is not None
        await self.leases.release(self.session, job.claim)

    async def _sleep_unless_stopped(self, delay: float) -> None:
        try:
            await asyncio.wait_for(self._stop.requested.wait(), delay)
        except TimeoutError:
            pass

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- deliveries -------------------------------------------------------------

    def _on_delivery(self, delivery: Delivery) -> None:
        session = self.session
        assert session is not None
        task = asyncio.create_task(self._handle(session, delivery))
        self._track(task)

    async def _handle(self, session: AmqpSession, delivery: Delivery) -> None:
        assert self._pipeline is not None
        try:
            await self._handle_delivery(session, delivery)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The pipeline turns its own failures into results; this catches a fault
            # around it (the job record, the spool) so the job still gets one.
            logger.exception(
                "agent %s failed handling delivery %d from %s",
                self.agent_id, delivery.delivery_tag, delivery.queue,
            )
            outcome = await self._pipeline.fail_internal(delivery, exc)
            if id(delivery) in self._acked_claims:
                # The delivery is acked already. The coordinator audits this result
                # without recording it, and queues the job again when its lease
                # expires, at most lease_expiry_limit times.
                self._count_outcome(outcome)
                assert self.leases is not None
                await self.leases.finish(outcome.job_id)
            else:
                self._settle_outcome(session, delivery, outcome)
        finally:
            assert self.gate is not None
            self.gate.settled(delivery)
            self._acked_claims.discard(id(delivery))

    async def _handle_delivery(self, session: AmqpSession, delivery: Delivery) -> None:
        assert self._pipeline is not None
        pipeline = self._pipeline
        try:
            job = pipeline.authenticate(delivery)
        except RejectedError as exc:
            outcome = await pipeline.reject(delivery, exc, None)
            self._settle_outcome(session, delivery, outcome)
            return

        running = self.running.get(job.job_id)
        if running is not None and running.claimed:
            await self._renew_claim(session, delivery, running)
            return
        if running is not None and running.session is session and session.is_open:
            # A second copy of the job message, such as a publisher's retry after a
            # lost confirm. The first delivery stays unacked until the job ends, so
            # the copy is acked now instead of holding a prefetch slot forever.
            logger.info(
                "job %s delivered again while running; acking the copy", job.job_id
            )
            self._settle(session, delivery, requeue=False)
            return
        if running is not None:
            # The broker redelivered a job that is still running here, after the
            # session that carried it dropped: ack the new delivery when it ends.
            logger.info("job %s redelivered while running; not starting it twice", job.job_id)
            running.session, running.delivery = session, delivery
            return

        record = await asyncio.to_thread(self.state.finished, job.job_id)
        if record is not None:
            if record.message_sha256 == message_digest(delivery.body):
                outcome = await pipeline.replay(job.job_id, record.result)
            else:
                replayed = RejectedError(
                    ErrorCode.REPLAYED,
                    f"job id {job.job_id} already ended here as {record.status}; a job id "
                    "runs once, so submit the job again under a new id",
                )
                outcome = await pipeline.reject(delivery, replayed, job, record=False)
            self._settle_outcome(session, delivery, outcome)
            return

        try:
            pipeline.admit(job, delivery)
        except RejectedError as exc:
            outcome = await pipeline.reject(delivery, exc, job)
            self._settle_outcome(session, delivery, outcome)
            return

        if job.job_id in self.cancelled:
            outcome = await pipeline.cancel(job, delivery, self.cancelled[job.job_id])
            self._settle_outcome(session, delivery, outcome)
            return

        assert self.gate is not None
        decision = self.gate.decide(job, delivery)
        if decision.grant is None:
            await self._give_back(session, delivery, job, decision)
            return

        running = RunningJob(job, session, delivery, asyncio.current_task())  # type: ignore[arg-type]
        self.running[job.job_id] = running
        try:
            claim_after_s = self.config.agent.claim_after_s
            if claim_after_s == 0:
                if not await self._claim(running):
                    return
            else:
                running.claimer = asyncio.create_task(
                    self._claim_when_long(running, claim_after_s)
                )
            outcome = await self._execute(running, decision.grant.units)
            running.ended = True
        finally:
            try:
                await _stop_claimer(running)
            finally:
                self.running.pop(job.job_id, None)
                self.gate.release(job.job_id)
        if running.claimed:
            assert self.leases is not None
            self._count_outcome(outcome)
            await self.leases.finish(job.job_id)
        else:
            self._settle_outcome(running.session, running.delivery, outcome)

    async def _execute(self, running: RunningJob, units: tuple[GpuUnit, ...]) -> Outcome:
        assert self._pipeline is not None
        pipeline = self._pipeline
        job, delivery = running.job, running.delivery
        devices = [cdi_device_name(unit, self.config.resources) for unit in units]
        uuids = [unit.uuid for unit in units]
        try:
            return await pipeline.execute(job, delivery, gpu_devices=devices, gpu_uuids=uuids)
        except asyncio.CancelledError:
            if running.cancel_reason is None:
                raise
            # A cancel request, not a stop: the container is gone, so report it.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            return await pipeline.cancel(job, delivery, running.cancel_reason)

    # --- claims (docs/delivery.md) ------------------------------------------------

    async def _claim(self, running: RunningJob) -> bool:
        """Claim a job that may start and ack its delivery; return False to drop it.

        A job whose claim cannot reach the coordinator's queue runs with its
        delivery unacked instead, so the broker's consumer_timeout bounds its run.
        """
        assert self.leases is not None
        session, delivery, job_id = running.session, running.delivery, running.job.job_id
        try:
            await self.leases.claim(session, running.claim)
        except SessionError as exc:
            if isinstance(exc, PublishFailed) and exc.permanent:
                logger.error(
                    "agent %s could not claim job %s (%s); running it with its delivery "
                    "unacked, so the broker's consumer_timeout bounds its run time. "
                    "Declare the topology with `fairu-admin topology declare`",
                    self.agent_id, job_id, exc,
                )
                return True
            logger.warning(
                "agent %s could not claim job %s (%s); handing its delivery back",
                self.agent_id, job_id, exc,
            )
            self._settle(session, delivery, requeue=True)
            return False
        running.claimed = True
        await self._ack_claimed(session, delivery)
        return True

    async def _claim_when_long(self, running: RunningJob, delay_s: float) -> None:
        """Claim a job that still runs `delay_s` seconds after it started.

        Until then its delivery stays unacked, and a job that ends sooner is acked
        after its result. A claim that fails leaves the delivery unacked and is tried
        again `delay_s` later, unless no queue can ever receive it.
        """
        assert self.leases is not None
        job_id = running.job.job_id
        while True:
            await asyncio.sleep(delay_s)
            # The session that carries the delivery, which a redelivery replaces.
            session = running.session
            if not session.is_open:
                continue
            running.claiming = True
            try:
                await self.leases.claim(session, running.claim)
                running.claimed = True
                await self._ack_claimed(session, running.delivery)
                return
            except SessionError as exc:
                permanent = isinstance(exc, PublishFailed) and exc.permanent
                logger.warning(
                    "agent %s could not claim running job %s (%s); its delivery stays "
                    "unacked, so the broker's consumer_timeout bounds its run time%s",
                    self.agent_id, job_id, exc,
                    "" if permanent else f"; trying again in {delay_s:g} s",
                )
                if permanent:
                    return
            except Exception:
                # A fault outside the broker session, such as the state folder's
                # database, must not end this task unseen.
                logger.exception(
                    "agent %s failed claiming running job %s; its delivery stays unacked%s",
                    self.agent_id, job_id,
                    "" if running.claimed else f"; trying again in {delay_s:g} s",
                )
                if running.claimed:
                    return
            finally:
                running.claiming = False

    async def _renew_claim(
        self, session: AmqpSession, delivery: Delivery, running: RunningJob
    ) -> None:
        """Ack a copy of a job that runs here under a claim, after claiming it again.

        The copy comes from a publisher's retry, or from the coordinator after the
        lease lapsed, for example while this agent was cut off from the broker. The
        new claim makes the lease this agent's again.
        """
        assert self.leases is not None
        job_id = running.job.job_id
        logger.info(
            "job %s delivered again while running here; renewing its claim and "
            "acking the copy", job_id,
        )
        try:
            # NOTE: a failed claim drops the stored claim, although the job still runs
            # under its first one, so a restart after this no longer releases the job
            # and the coordinator queues it only when its lease expires.
            await self.leases.claim(session, running.claim)
        except SessionError as exc:
            logger.warning(
                "agent %s could not renew its claim of job %s (%s); handing the copy back",
                self.agent_id, job_id, exc,
            )
            self._settle(session, delivery, requeue=True)
            return
        await self._ack_claimed(session, delivery)

    async def _ack_claimed(self, session: AmqpSession, delivery: Delivery) -> None:
        # The gate adjusts the consumers before the ack, because the ack returns the
        # delivery's prefetch credit, which a running job must not get back.
        assert self.gate is not None
        await self.gate.claimed(delivery)
        self._acked_claims.add(id(delivery))
        self._settle(session, delivery, requeue=False)

    async def _give_back(
        self, session: AmqpSession, delivery: Delivery, job: JobSpec, decision: Decision
    ) -> None:
        """Return a job that cannot start here to its queue (docs/scheduling.md)."""
        assert self.admission is not None and self.gate is not None
        log_give_back(self.agent_id, self.admission.offer, job, delivery, decision)
        if decision.verdict is Verdict.BUSY:
            await self.gate.hold(delivery.queue)
        self._settle(session, delivery, requeue=True)

    def _on_trust_message(self, delivery: Delivery) -> None:
        session = self.session
        task = asyncio.create_task(self._apply_trust(delivery))
        task.add_done_callback(lambda _t: self._trust_applied(session, delivery))
        self._track(task)

    def _trust_applied(self, session: AmqpSession | None, delivery: Delivery) -> None:
        if session is not None:
            session.ack(delivery.delivery_tag)
        self._trust_seen += 1
        if self._trust_seen >= self._trust_backlog:
            self._trust_caught_up.set()

    async def _apply_trust(self, delivery: Delivery) -> None:
        assert self.trust is not None
        try:
            envelope = decode_envelope(delivery.body)
            kind = _payload_kind(envelope)
            if kind in ("revocation_list", "root_chain") and self.trust.view().root_key is None:
                return  # This site trusts bare keys only; root messages do not apply.
            if kind == "revocation_list":
                await asyncio.to_thread(self.trust.apply_revocations, envelope)
            elif kind == "root_chain":
                chain = parse_payload(_payload_bytes(envelope), RootChain)
                await asyncio.to_thread(self.trust.apply_chain, chain)
            elif kind == "cancel":
                try:
                    payload = verify_job_envelope(envelope, self.trust.view())
                except RejectedError as exc:
                    # Usually a cancel request of a platform this site does not serve.
                    logger.info("agent %s ignored a cancel request: %s", self.agent_id, exc)
                    return
                self._apply_cancel(parse_payload(payload, CancelRequest))
            else:
                logger.warning("agent %s ignored a trust message of kind %r", self.agent_id, kind)
        except RejectedError as exc:
            # Messages of another platform or of an earlier root are expected in a
            # shared stream, so they are logged once each at WARNING, not as errors.
            logger.warning("agent %s rejected a trust message: %s", self.agent_id, exc)

    def _apply_cancel(self, request: CancelRequest) -> None:
        reason = request.reason or "cancelled by the platform"
        self.cancelled[request.job_id] = reason
        running = self.running.get(request.job_id)
        if (
            running is not None
            and running.task is not None
            and running.cancel_reason is None
            and not running.ended
        ):
            logger.warning("agent %s cancelling running job %s: %s", self.agent_id,
                           request.job_id, reason)
            running.cancel_reason = reason
            running.task.cancel()

    def _settle_outcome(self, session: AmqpSession, delivery: Delivery, outcome: Outcome) -> None:
        self._count_outcome(outcome)
        self._settle(session, delivery, requeue=False, dead_letter=outcome.dead_letter)

    def _count_outcome(self, outcome: Outcome) -> None:
        if not outcome.replayed:
            self.metrics.job_finished(outcome.status.value, outcome.duration_s)

    def _settle(
        self,
        session: AmqpSession,
        delivery: Delivery,
        *,
        requeue: bool,
        dead_letter: bool = False,
    ) -> None:
        if session is not self.session or not session.is_open:
            # The broker already returned this delivery to its queue when the
            # session closed; the redelivery is acked from the job record.
            logger.info(
                "delivery %d from %s belongs to a closed session; the broker requeued it",
                delivery.delivery_tag, delivery.queue,
            )
            return
        if requeue:
            session.nack(delivery.delivery_tag, requeue=True)
        elif dead_letter:
            session.nack(delivery.delivery_tag, requeue=False)
        else:
            session.ack(delivery.delivery_tag)

    # --- publishing (the pipeline's `Publisher`) --------------------------------

    def publish_status(self, event: StatusEvent) -> None:
        """Publish the event now, or hold it for `agent.status_interval_s`."""
        self._status_events.submit(event)

    def _publish_status_now(self, event: StatusEvent) -> None:
        session = self.session
        if session is None or not session.is_open:
            return
        assert self.identity is not None
        body = sign_model(event, self.identity.key, self.identity.agent_id)
        try:
            confirm = session.publish_nowait(
                EVENTS_EXCHANGE, status_routing_key(event.job_id), body, persistent=False
            )
        except SessionError as exc:
            _log_status_not_sent(event, exc)
            return
        confirm.add_done_callback(lambda done: _check_status_confirm(event, done))

    async def publish_result(self, job_id: str, body: bytes, recorded: bool = False) -> None:
        # Each job's result is published through here. Dropping the job's held status
        # event first means that no status event follows the result.
        self._status_events.finish(job_id)
        routing_key = result_routing_key(job_id)
        # A recorded result's row in jobs.sqlite is its spool; others get a file.
        path = (
            None
            if recorded
            else await asyncio.to_thread(self.state.spool_write, job_id, routing_key, body)
        )
        # Only a stop cancels this coroutine, and no flush follows a stop, so a key
        # left in the set then does no harm.
        key = path or job_id
        self._publishing.add(key)
        attempt = 0
        while True:
            session = await self._wait_connected()
            if session is None:
                logger.warning(
                    "result of job %s stays spooled at %s until the next start",
                    job_id, path or self.state.root / "jobs.sqlite",
                )
                self._publishing.discard(key)
                return
            attempt += 1
            try:
                await session.publish(RESULTS_EXCHANGE, routing_key, body)
                break
            except SessionError as exc:
                logger.warning(
                    "result of job %s: publish attempt %d failed (%s); retrying after reconnect",
                    job_id, attempt, exc,
                )
                await asyncio.sleep(min(5.0, 0.5 * attempt))
        if path is None:
            await self.state.confirmed(job_id)
        else:
            await asyncio.to_thread(self.state.mark_published, job_id)
            await asyncio.to_thread(path.unlink, True)
        self._publishing.discard(key)

    async def _wait_connected(self) -> AmqpSession | None:
        """Return the open session, or None once the agent gives up publishing."""
        while not self._abandon_publishing.is_set():
            session = self.session
            if session is not None and session.is_open:
                return session
            abandon = asyncio.create_task(self._abandon_publishing.wait())
            connected = asyncio.create_task(self.connected.wait())
            await asyncio.wait({abandon, connected}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
            abandon.cancel()
            connected.cancel()
        return None

    async def _flush_spool(self, session: AmqpSession) -> None:
        entries = await asyncio.to_thread(self.state.spooled)
        for path, routing_key, body in entries:
            if path in self._publishing:
                continue
            await session.publish(RESULTS_EXCHANGE, routing_key, body)
            job_id = routing_key.removeprefix("result.")
            await asyncio.to_thread(self.state.mark_published, job_id)
            await asyncio.to_thread(path.unlink, True)
            logger.info("agent %s published spooled result %s", self.agent_id, routing_key)
        for job_id, body in await asyncio.to_thread(self.state.unconfirmed):
            if job_id in self._publishing:
                continue
            await session.publish(RESULTS_EXCHANGE, result_routing_key(job_id), body)
            await self.state.confirmed(job_id)
            logger.info("agent %s published the recorded result of job %s", self.agent_id, job_id)

    async def _publish_registration(self, session: AmqpSession) -> None:
        assert self.identity is not None and self.capacity is not None
        registration = Registration(
            agent_id=self.identity.agent_id,
            site=self.config.site.name,
            version=__version__,
            public_key=public_key_text(self.identity.key.public_key()),
            cpu_cores=self.capacity.cpu_cores,
            memory_bytes=self.capacity.memory_bytes,
            gpus=self.capacity.gpus,
            queues=[q.amqp_name for q in self.config.queues],
            slots=self.config.agent.slots,
            running_jobs=sorted(self.running),
            free_slots=self.free_slots,
            enrollment_token=self._enrollment_token,
            sandbox=self.sandbox,
            at=utc_now(),
            usable_cpus=self.capacity.usable_cpus,
            memory_available_bytes=self.capacity.memory_available_bytes,
            scratch_free_bytes=self.capacity.scratch_free_bytes,
            driver_version=self.capacity.driver_version,
            cuda_version=self.capacity.cuda_version,
            heartbeat_interval_s=self.config.agent.heartbeat_interval_s,
            **self._amounts(),
        )
        body = sign_model(registration, self.identity.key, self.identity.agent_id)
        await session.publish(
            EVENTS_EXCHANGE, registration_routing_key(self.identity.agent_id), body
        )
        logger.info("agent %s registered", self.agent_id)

    async def _publish_heartbeat(self, session: AmqpSession) -> None:
        assert self.identity is not None
        heartbeat = Heartbeat(
            agent_id=self.identity.agent_id,
            site=self.config.site.name,
            state=self.agent_state,
            running_jobs=sorted(self.running),
            free_slots=self.free_slots,
            at=utc_now(),
            **self._amounts(),
        )
        body = sign_model(heartbeat, self.identity.key, self.identity.agent_id)
        await session.publish(
            EVENTS_EXCHANGE, heartbeat_routing_key(self.identity.agent_id), body, persistent=False
        )

    def _amounts(self) -> dict[str, ResourceAmounts]:
        if self.admission is None:
            return {}
        return {
            "capacity": self.admission.offer.amounts(),
            "free": self.admission.free(),
        }

    async def _heartbeat_loop(self, session: AmqpSession) -> None:
        # Heartbeats go on while the agent drains, because they renew the leases of
        # the jobs that still run; `_shutdown` cancels this task after the drain.
        interval = self.config.agent.heartbeat_interval_s
        while session.is_open:
            try:
                await self._publish_heartbeat(session)
            except SessionError as exc:
                logger.warning("agent %s heartbeat not sent: %s", self.agent_id, exc)
                return
            await asyncio.sleep(interval)


def _check_status_confirm(event: StatusEvent, confirm: asyncio.Future[None]) -> None:
    if not confirm.cancelled() and confirm.exception() is not None:
        _log_status_not_sent(event, confirm.exception())


async def _stop_claimer(running: RunningJob) -> None:
    """End a job's claim task: wait for a claim in progress, cancel a waiting one.

    A claim that was published is either acked and marked, or dropped before its
    error is logged, so `running.claimed` is settled when this returns.
    """
    claimer = running.claimer
    if claimer is None or claimer.done():
        return
    if not running.claiming:
        claimer.cancel()
    await asyncio.wait([claimer])


def _log_status_not_sent(event: StatusEvent, error: BaseException | None) -> None:
    logger.warning("job %s status %s not sent: %s", event.job_id, event.state.value, error)


def _payload_bytes(envelope: Envelope) -> bytes:
    return base64.b64decode(envelope.payload)


def _payload_kind(envelope: Envelope) -> object:
    try:
        data = json.loads(_payload_bytes(envelope))
    except ValueError:
        return None
    return data.get("kind") if isinstance(data, dict) else None


def build_runner(config: SiteConfig) -> Runner:
    if config.runner.kind == "null":
        from fairu.runners.null import NullRunner

        return NullRunner()
    from fairu.runners.podman import PodmanRunner, PodmanSettings

    podman = config.runner.podman
    settings = PodmanSettings(
        socket_url=podman.socket_url(),
        tmpfs_size=podman.tmpfs_size,
        shm_size=podman.shm_size,
        log_cap_bytes=podman.log_cap_bytes,
        log_file_max_bytes=podman.log_file_max_bytes,
        user=podman.container_user,
        output_max_bytes=podman.output_max_bytes,
        output_max_entries=podman.output_max_entries,
        block_user_namespaces=podman.block_user_namespaces,
        **({"ulimits": dict(podman.ulimits)} if podman.ulimits else {}),
    )
    return PodmanRunner(settings)

