"""Coalescing of each job's status events: what is published, when, what is dropped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from fairu.agent.config import SiteConfig
from fairu.agent.daemon import Agent
from fairu.agent.state import Identity
from fairu.agent.status import StatusCoalescer
from fairu.protocol.models import JobState, StatusEvent, utc_now
from fairu.protocol.signing import generate_private_key
from fairu.runners.null import NullRunner

AGENT_ID = "site-0123456789ab"


def event(state: JobState, job_id: str = "job-1") -> StatusEvent:
    return StatusEvent(job_id=job_id, agent_id=AGENT_ID, state=state, at=utc_now())


@dataclass
class FakeTimer:
    when: float
    callback: Callable[..., object]
    args: tuple[Any, ...]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """An event loop's `time` and `call_at`, with time that moves only by `advance`."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[FakeTimer] = []

    def time(self) -> float:
        return self.now

    def call_at(
        self, when: float, callback: Callable[..., object], *args: Any
    ) -> FakeTimer:
        timer = FakeTimer(when, callback, args)
        self.timers.append(timer)
        return timer

    def pending(self) -> list[FakeTimer]:
        return [timer for timer in self.timers if not timer.cancelled]

    def advance(self, seconds: float) -> None:
        """Move the time on and run the timers that are due, in order."""
        self.now += seconds
        while True:
            due = [t for t in self.pending() if t.when <= self.now]
            if not due:
                return
            timer = min(due, key=lambda t: t.when)
            self.timers.remove(timer)
            timer.callback(*timer.args)


class Published(list[tuple[str, JobState]]):
    def __call__(self, status: StatusEvent) -> None:
        self.append((status.job_id, status.state))


def coalescer(interval_s: float = 0.5) -> tuple[StatusCoalescer, Published, FakeClock]:
    published = Published()
    clock = FakeClock()
    return StatusCoalescer(published, interval_s, clock), published, clock


def test_first_event_held_for_one_interval():
    statuses, published, clock = coalescer(0.5)
    statuses.submit(event(JobState.VERIFIED))
    assert published == []
    [timer] = clock.pending()
    assert timer.when == pytest.approx(1000.5)

    clock.advance(0.49)
    assert published == []
    clock.advance(0.01)
    assert published == [("job-1", JobState.VERIFIED)]
    assert clock.pending() == []


def test_burst_keeps_only_newest():
    statuses, published, clock = coalescer()
    statuses.submit(event(JobState.VERIFIED))
    clock.advance(0.01)
    statuses.submit(event(JobState.FETCHING))
    clock.advance(0.01)
    statuses.submit(event(JobState.RUNNING))
    assert published == []
    pending = statuses.pending_event("job-1")
    assert pending is not None
    assert pending.state is JobState.RUNNING
    # One timer for the held event, however many events replaced it.
    assert len(clock.pending()) == 1

    clock.advance(1.0)
    assert published == [("job-1", JobState.RUNNING)]


def test_held_event_flushed_when_interval_ends():
    statuses, published, clock = coalescer(0.5)
    statuses.submit(event(JobState.VERIFIED))
    clock.advance(0.1)
    statuses.submit(event(JobState.FETCHING))
    [timer] = clock.pending()
    # The first event's interval, not one from the newer event.
    assert timer.when == pytest.approx(1000.5)

    clock.advance(0.39)
    assert published == []
    clock.advance(0.01)
    assert published == [("job-1", JobState.FETCHING)]
    assert statuses.pending_event("job-1") is None
    assert clock.pending() == []


def test_interval_counts_from_flush():
    statuses, published, clock = coalescer(0.5)
    statuses.submit(event(JobState.VERIFIED))
    clock.advance(0.1)
    statuses.submit(event(JobState.FETCHING))
    clock.advance(0.4)  # FETCHING is published at 1000.5.
    clock.advance(0.3)
    statuses.submit(event(JobState.RUNNING))
    assert published == [("job-1", JobState.FETCHING)]
    [timer] = clock.pending()
    assert timer.when == pytest.approx(1001.0)

    clock.advance(0.2)
    assert published == [("job-1", JobState.FETCHING), ("job-1", JobState.RUNNING)]


def test_event_after_interval_published_at_once():
    statuses, published, clock = coalescer(0.5)
    statuses.submit(event(JobState.VERIFIED))
    clock.advance(0.5)  # VERIFIED is published at 1000.5.
    clock.advance(0.5)
    statuses.submit(event(JobState.FETCHING))
    clock.advance(10)
    statuses.submit(event(JobState.RUNNING))
    assert published == [
        ("job-1", JobState.VERIFIED),
        ("job-1", JobState.FETCHING),
        ("job-1", JobState.RUNNING),
    ]
    assert clock.timers == []


def test_finish_drops_held_and_cancels_timer(caplog):
    statuses, published, clock = coalescer()
    with caplog.at_level(logging.DEBUG, logger="fairu.agent.status"):
        statuses.submit(event(JobState.VERIFIED))
        clock.advance(0.01)
        statuses.submit(event(JobState.FETCHING))
        clock.advance(0.01)
        statuses.submit(event(JobState.RUNNING))
        [timer] = clock.pending()
        statuses.finish("job-1")

    assert timer.cancelled
    assert len(statuses) == 0
    assert statuses.pending_event("job-1") is None
    clock.advance(5)
    # A job that ends within its first interval publishes no status event.
    assert published == []
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "job job-1 status verified dropped: replaced by fetching within 0.5 s",
        "job job-1 status fetching dropped: replaced by running within 0.5 s",
        "job job-1 status running dropped: the job's result follows",
    ]
    assert all(record.levelno == logging.DEBUG for record in caplog.records)


def test_finish_without_held_event():
    statuses, published, clock = coalescer()
    statuses.submit(event(JobState.VERIFIED))
    clock.advance(0.5)
    statuses.finish("job-1")
    statuses.finish("job-2")
    assert len(statuses) == 0
    assert published == [("job-1", JobState.VERIFIED)]
    assert clock.pending() == []


def test_job_after_finish_starts_afresh():
    statuses, published, clock = coalescer()
    statuses.submit(event(JobState.VERIFIED))
    statuses.finish("job-1")
    clock.advance(0.01)
    statuses.submit(event(JobState.VERIFIED))
    clock.advance(0.5)
    assert published == [("job-1", JobState.VERIFIED)]


def test_interval_zero_sends_all():
    statuses, published, clock = coalescer(0)
    states = [
        JobState.VERIFIED,
        JobState.FETCHING,
        JobState.RUNNING,
        JobState.READING_SCORES,
    ]
    for state in states:
        statuses.submit(event(state))
    assert published == [("job-1", state) for state in states]
    assert clock.timers == []
    assert len(statuses) == 0


def test_clear_drops_everything(caplog):
    statuses, published, clock = coalescer()
    for job_id in ("job-1", "job-2", "job-3"):
        statuses.submit(event(JobState.VERIFIED, job_id))
    clock.advance(0.01)
    statuses.submit(event(JobState.RUNNING, "job-1"))
    statuses.submit(event(JobState.FETCHING, "job-2"))
    timers = clock.pending()
    assert len(timers) == 3

    with caplog.at_level(logging.DEBUG, logger="fairu.agent.status"):
        statuses.clear()

    assert all(timer.cancelled for timer in timers)
    assert len(statuses) == 0
    clock.advance(5)
    assert published == []
    assert sorted(record.getMessage() for record in caplog.records) == [
        "job job-1 status running dropped: the agent is stopping",
        "job job-2 status fetching dropped: the agent is stopping",
        "job job-3 status verified dropped: the agent is stopping",
    ]


def test_jobs_are_independent():
    statuses, published, clock = coalescer(0.5)
    statuses.submit(event(JobState.VERIFIED, "job-1"))
    clock.advance(0.1)
    statuses.submit(event(JobState.VERIFIED, "job-2"))
    statuses.submit(event(JobState.FETCHING, "job-1"))
    clock.advance(0.1)
    statuses.submit(event(JobState.FETCHING, "job-2"))
    assert published == []
    assert [timer.when for timer in clock.pending()] == pytest.approx([1000.5, 1000.6])

    statuses.finish("job-2")
    clock.advance(1)
    assert published == [("job-1", JobState.FETCHING)]
    assert len(statuses) == 1


@pytest.mark.parametrize("interval_s", [-0.1, float("nan")])
def test_invalid_interval_rejected(interval_s):
    with pytest.raises(ValueError, match="invalid status interval"):
        StatusCoalescer(Published(), interval_s)


async def test_event_loop_timers():
    """The held event goes out through a real loop timer, not a polling task."""
    published = Published()
    statuses = StatusCoalescer(published, 0.05)
    loop = asyncio.get_running_loop()
    statuses.submit(event(JobState.VERIFIED))
    statuses.submit(event(JobState.FETCHING))
    statuses.submit(event(JobState.RUNNING))
    began = loop.time()
    assert published == []

    while not published and loop.time() - began < 2:
        await asyncio.sleep(0.01)

    assert published == [("job-1", JobState.RUNNING)]
    assert loop.time() - began >= 0.04
    assert statuses.pending_event("job-1") is None


async def test_event_loop_finish_cancels_timer():
    published = Published()
    statuses = StatusCoalescer(published, 0.05)
    statuses.submit(event(JobState.VERIFIED))
    statuses.submit(event(JobState.RUNNING))
    statuses.finish("job-1")
    await asyncio.sleep(0.15)
    assert published == []


class FakeSession:
    """The part of `AmqpSession` that status events use, recording each publish."""

    is_open = True

    def __init__(self) -> None:
        self.routing_keys: list[str] = []

    def publish_nowait(
        self, exchange: str, routing_key: str, body: bytes, persistent: bool = True
    ) -> asyncio.Future[None]:
        self.routing_keys.append(routing_key)
        confirm: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        confirm.set_result(None)
        return confirm


def agent_with_session(tmp_path, interval_s: float) -> tuple[Agent, FakeSession]:
    config = SiteConfig.model_validate(
        {
            "site": {"name": "laptop"},
            "trust": {"signing_keys": []},
            "agent": {"state_dir": str(tmp_path), "status_interval_s": interval_s},
            "queues": [{"competition": "higgs", "name": "cpu"}],
        }
    )
    agent = Agent(config, NullRunner())
    agent.identity = Identity(agent_id=AGENT_ID, key=generate_private_key())
    session = FakeSession()
    agent.session = session  # type: ignore[assignment]
    return agent, session


async def test_agent_result_drops_held_status(tmp_path, caplog):
    agent, session = agent_with_session(tmp_path, 30)
    for state in (JobState.VERIFIED, JobState.FETCHING, JobState.RUNNING):
        agent.publish_status(event(state))
    assert session.routing_keys == []

    # With publishing abandoned, publish_result returns before it publishes, as
    # after a stop; the held status event must be gone all the same.
    agent._abandon_publishing.set()
    with caplog.at_level(logging.DEBUG, logger="fairu.agent.status"):
        await agent.publish_result("job-1", b"result", recorded=True)

    assert len(agent._status_events) == 0
    assert "job job-1 status running dropped: the job's result follows" in caplog.text
    assert session.routing_keys == []


async def test_agent_interval_zero_publishes_all(tmp_path):
    agent, session = agent_with_session(tmp_path, 0)
    for state in (JobState.VERIFIED, JobState.FETCHING, JobState.RUNNING):
        agent.publish_status(event(state))
    assert session.routing_keys == ["status.job-1"] * 3
