"""Decide what happens to a job that came back through the dead-letter exchange.

A job reaches the coordinator this way after its queue's delivery limit, because
every agent that received it gave it back (docs/scheduling.md). The coordinator then
compares the job's request with the fleet registry. When some approved agent that
serves the job's queue offers enough, the job is published again after a delay.
When none does, the job ends with a failed result that states the request and the
largest offer seen. This module contains the decision and its wording, without I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fairu.protocol.models import GpuInfo, JobSpec, Resources
from fairu.protocol.placement import (
    GpuUnit,
    describe_offer,
    describe_request,
    gpu_units,
    shortfalls,
)

# Rounds of "publish again, wait for the delivery limit" before the coordinator gives
# up on a job that fits some agent but that no agent started.
MAX_REQUEUE_ROUNDS = 10
# A header the coordinator sets on a job it publishes again, counting the rounds.
REQUEUE_ROUNDS_HEADER = "x-fairu-requeue-rounds"


def requeue_delay_s(rounds: int) -> float:
    """Return the wait before publishing a job again: 5 s, doubling, at most 5 min."""
    return min(300.0, 5.0 * 2**rounds)


@dataclass(frozen=True)
class AgentOffer:
    agent_id: str
    site: str
    fleet_state: str
    cpus: float
    memory_bytes: int
    units: tuple[GpuUnit, ...]
    slots: int

    @classmethod
    def from_row(cls, agent: Mapping[str, Any]) -> AgentOffer:
        """Read an offer from a `Store.agents()` row.

        An agent of the first release reported no capacity; its cores, memory and
        every GPU then stand for the offer.
        """
        gpus = [GpuInfo.model_validate(gpu) for gpu in agent["gpus"]]
        units = gpu_units(gpus)
        capacity = agent.get("capacity")
        if capacity is None:
            return cls(
                agent_id=str(agent["agent_id"]),
                site=str(agent["site"]),
                fleet_state=str(agent["fleet_state"]),
                cpus=float(agent["cpu_cores"]),
                memory_bytes=int(agent["memory_bytes"]),
                units=tuple(units),
                slots=int(agent["slots"]),
            )
        offered = set(capacity["gpus"])
        return cls(
            agent_id=str(agent["agent_id"]),
            site=str(agent["site"]),
            fleet_state=str(agent["fleet_state"]),
            cpus=float(capacity["cpus"]),
            memory_bytes=int(capacity["memory_bytes"]),
            units=tuple(unit for unit in units if unit.uuid in offered),
            slots=int(capacity["slots"]),
        )

    def missing(self, request: Resources) -> list[str]:
        missing = shortfalls(request, self.cpus, self.memory_bytes, self.units)
        if self.slots < 1:
            missing.append("slots 1 > 0")
        return missing

    def describe(self) -> str:
        return (
            f"agent {self.agent_id} of site {self.site} ({self.fleet_state}): "
            f"{describe_offer(self.cpus, self.memory_bytes, self.units)}"
        )


@dataclass(frozen=True)
class Placement:
    # Agents that are not offline and offer enough for the job.
    fitting: tuple[AgentOffer, ...]
    # The offer that comes closest, among every agent serving the queue.
    largest: AgentOffer | None
    largest_missing: tuple[str, ...]


def offers_for_queue(
    agents: Iterable[Mapping[str, Any]], queue: str
) -> list[AgentOffer]:
    """Return the offers of approved agents that consume `queue`."""
    return [
        AgentOffer.from_row(agent)
        for agent in agents
        if agent["approval"] == "approved" and queue in agent["queues"]
    ]


def place(request: Resources, offers: Sequence[AgentOffer]) -> Placement:
    fitting = tuple(
        offer
        for offer in offers
        if offer.fleet_state != "offline" and not offer.missing(request)
    )
    if not offers:
        return Placement(fitting, None, ())
    largest = min(
        offers,
        key=lambda offer: (
            len(offer.missing(request)),
            -len(offer.units),
            -offer.cpus,
            -offer.memory_bytes,
        ),
    )
    return Placement(fitting, largest, tuple(largest.missing(request)))


def unschedulable_message(job: JobSpec, queue: str, placement: Placement) -> str:
    requested = f"job {job.job_id} requests {describe_request(job.resources)}"
    if placement.largest is None:
        return (
            f"{requested}, and no approved agent serving {queue} has registered; "
            "start an agent that serves this queue, then submit the job again"
        )
    missing = "; ".join(placement.largest_missing) or "it is offline"
    return (
        f"{requested}, which no agent serving {queue} can ever run. The largest offer "
        f"seen is {placement.largest.describe()}, short of: {missing}"
    )


def give_up_message(job: JobSpec, queue: str, rounds: int, placement: Placement) -> str:
    agents = ", ".join(offer.agent_id for offer in placement.fitting)
    return (
        f"job {job.job_id} requests {describe_request(job.resources)}; agents {agents} "
        f"serving {queue} offer enough, but none started it in {rounds} rounds of "
        "deliveries, so it was given up; submit it again when they have room"
    )
