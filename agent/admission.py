"""Admission, GPU assignment and the consumer prefetch that follows free resources.

The agent offers what the probe found minus the site config's reservations. A job
starts only when its whole request fits in what is free now, and it is then given
specific GPU units that no other job gets until the job releases them. Every method
of `Admission` runs on the event loop without awaiting, so checking and taking
resources is one atomic step.

`PrefetchGate` owns the job consumers of a broker session. RabbitMQ applies a
per-consumer prefetch (basic.qos with global=false) only to consumers created after
it, so the gate cancels a queue's consumer and creates it again whenever the number
of jobs that could start now changes, and keeps no consumer while that number is 0.
docs/scheduling.md describes the whole scheme.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from fairu.protocol.models import JobSpec, ResourceAmounts, Resources
from fairu.protocol.topology import DELIVERY_LIMIT
from fairu.protocol.placement import (
    MIB,
    GpuUnit,
    describe_offer,
    gpu_units,
    shortfalls,
    unit_matches,
)

from .config import ResourcesSection, SiteConfig
from .probe import Capacity
from .session import AmqpSession, Delivery, DeliveryHandler, SessionError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Offer:
    """The total that the agent gives to jobs, after the site's reservations."""

    cpus: float
    memory_bytes: int
    units: tuple[GpuUnit, ...]
    slots: int

    def amounts(self) -> ResourceAmounts:
        return ResourceAmounts(
            cpus=self.cpus,
            memory_bytes=self.memory_bytes,
            gpus=[unit.uuid for unit in self.units],
            slots=self.slots,
        )

    def describe(self) -> str:
        text = describe_offer(self.cpus, self.memory_bytes, self.units)
        return f"{text}, slots={self.slots}"


def build_offer(capacity: Capacity, slots: int, section: ResourcesSection) -> Offer:
    """Subtract the reservations of `section` from the probed capacity."""
    reserved = {str(name) for name in section.reserve_gpus}
    kept = []
    matched: set[str] = set()
    for unit in gpu_units(capacity.gpus):
        names = _unit_names(unit) & reserved
        if names:
            matched |= names
            logger.info(
                "GPU %s (%s) kept back by resources.reserve_gpus", unit.uuid, unit.name
            )
            continue
        kept.append(unit)
    for name in sorted(reserved - matched):
        # A GPU can be missing after a reboot or a MIG change, which is no reason
        # to stop the agent, so this is only a warning.
        logger.warning(
            "resources.reserve_gpus names %r, which matches no GPU the probe found",
            name,
        )
    return Offer(
        cpus=max(0.0, capacity.usable_cpus - section.reserve_cpus),
        memory_bytes=max(0, capacity.memory_bytes - section.reserve_memory_mb * MIB),
        units=tuple(kept),
        slots=slots,
    )


def _unit_names(unit: GpuUnit) -> set[str]:
    if unit.mig_index is None:
        return {unit.uuid, str(unit.gpu_index)}
    return {unit.uuid, f"{unit.gpu_index}:{unit.mig_index}"}


def cdi_device_name(unit: GpuUnit, section: ResourcesSection) -> str:
    """Return the CDI name that `nvidia-ctk cdi generate` gives this unit."""
    if section.cdi_device_names == "uuid":
        return f"{section.cdi_kind}={unit.uuid}"
    if unit.mig_index is None:
        return f"{section.cdi_kind}={unit.gpu_index}"
    # NOTE: this assumes nvidia-ctk numbers MIG devices as NVML's
    # nvmlDeviceGetMigDeviceHandleByIndex does; "uuid" names avoid the question.
    return f"{section.cdi_kind}={unit.gpu_index}:{unit.mig_index}"


@dataclass(frozen=True)
class Grant:
    """The resources one running job holds until it releases them."""

    job_id: str
    cpus: float
    memory_bytes: int
    units: tuple[GpuUnit, ...]


class Verdict(Enum):
    START = "start"
    # Fits the offer, but not what is free now.
    BUSY = "busy"
    # Exceeds the offer, so it can never start on this agent.
    NEVER = "never"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    grant: Grant | None = None
    # What is missing, one phrase each, for BUSY and NEVER.
    missing: tuple[str, ...] = ()


class Admission:
    """The resources of one agent: what is offered, and what each running job holds."""

    def __init__(self, offer: Offer) -> None:
        self.offer = offer
        self._grants: dict[str, Grant] = {}
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call `callback` after every change of the free resources."""
        self._listeners.append(callback)

    # --- queries ----------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._grants)

    def free_cpus(self) -> float:
        used = sum(grant.cpus for grant in self._grants.values())
        return max(0.0, self.offer.cpus - used)

    def free_memory_bytes(self) -> int:
        used = sum(grant.memory_bytes for grant in self._grants.values())
        return max(0, self.offer.memory_bytes - used)

    def free_units(self) -> list[GpuUnit]:
        taken = {unit.uuid for grant in self._grants.values() for unit in grant.units}
        return [unit for unit in self.offer.units if unit.uuid not in taken]

    def free_slots(self) -> int:
        return max(0, self.offer.slots - len(self._grants))

    def free(self) -> ResourceAmounts:
        return ResourceAmounts(
            cpus=round(self.free_cpus(), 6),
            memory_bytes=self.free_memory_bytes(),
            gpus=[unit.uuid for unit in self.free_units()],
            slots=self.free_slots(),
        )

    def grant(self, job_id: str) -> Grant | None:
        return self._grants.get(job_id)

    def startable(self, needs_gpu: bool) -> int:
        """Estimate how many more jobs could start now, for the consumer prefetch.

        The shape of a job is unknown until it arrives, so each job is assumed to
        take a slot, some CPU and memory, and one GPU unit where `needs_gpu`. A job
        that requests more is given back by the caller of `decide` as BUSY.
        """
        if self.free_cpus() < 0.01 or self.free_memory_bytes() < MIB:
            return 0
        count = self.free_slots()
        if needs_gpu:
            count = min(count, len(self.free_units()))
        return count

    # --- decisions --------------------------------------------------------------

    def decide(self, job_id: str, request: Resources) -> Decision:
        """Start a job by taking its resources now, or return why it cannot start."""
        offer = self.offer
        never = shortfalls(request, offer.cpus, offer.memory_bytes, offer.units)
        if offer.slots < 1:
            never.append("slots 1 > 0")
        if never:
            return Decision(Verdict.NEVER, missing=tuple(never))

        free_units = self.free_units()
        busy = shortfalls(
            request, self.free_cpus(), self.free_memory_bytes(), free_units
        )
        if self.free_slots() < 1:
            busy.append(f"slots 1 > 0 free of {offer.slots}")
        if busy:
            return Decision(Verdict.BUSY, missing=tuple(busy))

        grant = Grant(
            job_id=job_id,
            cpus=request.cpus,
            memory_bytes=request.memory_mb * MIB,
            units=tuple(_pick_units(free_units, request)),
        )
        self._grants[job_id] = grant
        self._notify()
        return Decision(Verdict.START, grant=grant)

    def release(self, job_id: str) -> None:
        """Return a job's resources; releasing a job without any does nothing."""
        if self._grants.pop(job_id, None) is not None:
            self._notify()

    def _notify(self) -> None:
        for callback in self._listeners:
            callback()


def _pick_units(free: Iterable[GpuUnit], request: Resources) -> list[GpuUnit]:
    """Pick the smallest matching units, keeping larger GPUs for larger requests."""
    matching = [unit for unit in free if unit_matches(unit, request)]
    matching.sort(
        key=lambda unit: (
            unit.memory_total_bytes or 0,
            unit.gpu_index,
            -1 if unit.mig_index is None else unit.mig_index,
        )
    )
    return matching[: request.gpus]


def set_up_admission(
    config: SiteConfig, capacity: Capacity, handler: DeliveryHandler, agent_id: str
) -> tuple[Admission, PrefetchGate]:
    """Build the offer from the probed capacity, and the gate over the queues."""
    offer = build_offer(capacity, config.agent.slots, config.resources)
    admission = Admission(offer)
    gate = PrefetchGate(admission, handler)
    for queue in config.queues:
        gate.add_queue(queue.amqp_name, queue.needs_gpu)
        if queue.needs_gpu and not offer.units:
            logger.warning(
                "agent %s serves GPU queue %s but offers no GPU, so every job from it "
                "goes back to the queue",
                agent_id,
                queue.amqp_name,
            )
    logger.info(
        "agent %s starting: site %s, %d cores (%g usable), %d MiB, %d GPUs; offers "
        "%s; queues %s",
        agent_id,
        config.site.name,
        capacity.cpu_cores,
        capacity.usable_cpus,
        capacity.memory_bytes // MIB,
        len(capacity.gpus),
        offer.describe(),
        ", ".join(queue.amqp_name for queue in config.queues),
    )
    return admission, gate


def log_give_back(
    agent_id: str, offer: Offer, job: JobSpec, delivery: Delivery, decision: Decision
) -> None:
    """Log why a job goes back to its queue, with its delivery count."""
    missing = "; ".join(decision.missing)
    # x-delivery-count counts earlier deliveries, and the broker dead-letters the
    # message when it reaches DELIVERY_LIMIT.
    attempt = f"delivery {delivery.delivery_count + 1} of at most {DELIVERY_LIMIT + 1}"
    if decision.verdict is Verdict.NEVER:
        logger.warning(
            "job %s can never start on agent %s (%s; this agent offers %s); "
            "returned it to %s for another agent (%s)",
            job.job_id,
            agent_id,
            missing,
            offer.describe(),
            delivery.queue,
            attempt,
        )
    else:
        logger.info(
            "job %s cannot start on agent %s now (%s); returned it to %s and "
            "paused that queue until a job ends (%s)",
            job.job_id,
            agent_id,
            missing,
            delivery.queue,
            attempt,
        )


# --- the consumer prefetch ---------------------------------------------------------


@dataclass
class _Consumer:
    tag: str
    prefetch: int
    # Deliveries through this consumer that are not acked or nacked yet, by id().
    unsettled: set[int] = field(default_factory=set)

    @property
    def credit(self) -> int:
        """Return how many more messages the broker may deliver to this consumer."""
        return max(0, self.prefetch - len(self.unsettled))


@dataclass
class _QueueState:
    name: str
    needs_gpu: bool
    consumer: _Consumer | None = None
    # Set when a job from this queue goes back BUSY and cleared when a job ends,
    # so that a queue whose first job waits for resources is not read in a loop.
    held: bool = False


class PrefetchGate:
    """Keeps each job queue's prefetch credit at the jobs that could start now.

    A consumer's credit is its prefetch less its unsettled deliveries. A job's
    delivery is acked when the job is claimed (`claimed`), so a running job holds a
    grant in `Admission` but no credit. The gate therefore replaces the consumer
    before that ack whenever the credit that the ack returns exceeds what could
    start. It creates a new consumer only when the credit must change, and none
    while no job could start. Deliveries not decided yet count against the estimate,
    because each of them may take resources that `Admission` does not show as taken.

    NOTE: every queue gets the whole estimate, because RabbitMQ has no prefetch
    shared by some consumers of a channel. An agent serving several queues can
    therefore receive more jobs than it can start, and the extra ones go back BUSY.
    """

    def __init__(self, admission: Admission, handler: DeliveryHandler) -> None:
        self.admission = admission
        self.handler = handler
        self.queues: dict[str, _QueueState] = {}
        self.session: AmqpSession | None = None
        self.pending: set[int] = set()
        self.stopped = False
        self._lock = asyncio.Lock()
        self._dirty = False
        self._refresher: asyncio.Task[None] | None = None
        admission.add_listener(self.request_refresh)

    def add_queue(self, name: str, needs_gpu: bool) -> None:
        self.queues[name] = _QueueState(name, needs_gpu)

    async def attach(self, session: AmqpSession) -> None:
        """Start consuming the job queues on a new session."""
        self.session = session
        self.pending.clear()
        for state in self.queues.values():
            state.consumer = None
            state.held = False
        await self.refresh()

    def stop(self) -> None:
        """Stop creating consumers; the caller cancels the existing ones."""
        self.stopped = True
        if self._refresher is not None:
            self._refresher.cancel()

    # --- deliveries -------------------------------------------------------------

    def _on_delivery(self, consumer: _Consumer, delivery: Delivery) -> None:
        consumer.unsettled.add(id(delivery))
        self.pending.add(id(delivery))
        self.handler(delivery)

    def decide(self, job: JobSpec, delivery: Delivery) -> Decision:
        """Decide a delivered job with `Admission.decide`."""
        self.pending.discard(id(delivery))
        return self.admission.decide(job.job_id, job.resources)

    async def hold(self, queue: str) -> None:
        """Stop consuming `queue` until a job ends.

        Call it before returning a BUSY job, so that the broker cannot deliver the
        returned job to this agent again while the consumer is being cancelled.
        """
        state = self.queues.get(queue)
        if state is not None:
            state.held = True
            await self.refresh()

    async def claimed(self, delivery: Delivery) -> None:
        """Stop counting a delivery that is about to be acked while its job runs.

        The consumers are updated before the caller acks, because the ack returns
        the delivery's credit to its consumer and the broker would otherwise send
        a job that cannot start. The running job's grant bounds the credit instead.
        """
        self.pending.discard(id(delivery))
        for state in self.queues.values():
            if state.consumer is not None:
                state.consumer.unsettled.discard(id(delivery))
        await self.refresh()

    def settled(self, delivery: Delivery) -> None:
        """Note that a delivery was acked or nacked, which returns its credit."""
        self.pending.discard(id(delivery))
        for state in self.queues.values():
            if state.consumer is not None:
                state.consumer.unsettled.discard(id(delivery))
        self.request_refresh()

    def release(self, job_id: str) -> None:
        """Free a job's resources and let held queues be read again."""
        for state in self.queues.values():
            state.held = False
        self.admission.release(job_id)
        self.request_refresh()

    # --- consumers --------------------------------------------------------------

    def request_refresh(self) -> None:
        """Schedule a refresh; requests made while one runs coalesce into one more."""
        if self.stopped or self.session is None:
            return
        self._dirty = True
        if self._refresher is None or self._refresher.done():
            loop = asyncio.get_running_loop()
            self._refresher = loop.create_task(self._refresh_while_dirty())

    async def _refresh_while_dirty(self) -> None:
        while self._dirty and not self.stopped:
            self._dirty = False
            await self.refresh()

    def allowed(self, state: _QueueState) -> int:
        """Return how many more deliveries `state`'s queue may send now."""
        if state.held:
            return 0
        return max(0, self.admission.startable(state.needs_gpu) - len(self.pending))

    async def refresh(self) -> None:
        async with self._lock:
            session = self.session
            if self.stopped or session is None or not session.is_open:
                return
            try:
                for state in self.queues.values():
                    await self._refresh_queue(session, state)
            except SessionError as exc:
                # The daemon reconnects when the session closes.
                logger.warning(
                    "job consumers not updated, the broker session failed: %s", exc
                )

    async def _refresh_queue(self, session: AmqpSession, state: _QueueState) -> None:
        allowed = self.allowed(state)
        current = state.consumer
        credit = current.credit if current is not None else 0
        # A held queue loses its consumer even at zero credit, because the job it
        # returns would give the credit back.
        keep = current is not None and not state.held
        if credit == allowed and (keep or current is None):
            return
        if current is not None:
            state.consumer = None
            await session.cancel(current.tag)
            # Deliveries that arrived before the cancel took effect are pending now.
            allowed = self.allowed(state)
        if allowed == 0 or self.stopped:
            logger.debug("not consuming %s: no job could start now", state.name)
            return
        await session.set_prefetch(allowed)
        consumer = _Consumer(tag="", prefetch=allowed)
        consumer.tag = await session.consume(
            state.name, lambda delivery: self._on_delivery(consumer, delivery)
        )
        state.consumer = consumer
        logger.debug("consuming %s with prefetch %d", state.name, allowed)
