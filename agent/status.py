"""Per-job coalescing of status events, so that short jobs publish fewer of them.

A job's first interval of `interval_s` starts with its first status event. An event
that comes within an interval of the job's start or of its last published event is
held, a newer one replaces it, and the held event is published when the interval
ends. `finish` drops the job's held event before its result is published, so that
no status event of a job follows its result, and a job that ends within its first
interval publishes its result alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fairu.protocol.models import StatusEvent

logger = logging.getLogger(__name__)


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """The event loop calls that the coalescer uses, which tests replace with a fake."""

    def time(self) -> float: ...

    def call_at(
        self, when: float, callback: Callable[..., object], *args: Any
    ) -> TimerHandle: ...


@dataclass
class _JobStatus:
    # Clock time of the job's last published event, or of its first event.
    sent_at: float
    pending: StatusEvent | None = None
    # The timer that publishes `pending`, which is set exactly when `pending` is.
    timer: TimerHandle | None = None


class StatusCoalescer:
    """Coalescer that publishes at most one status event of a job per `interval_s`.

    `publish` sends one event without waiting for its confirm. An `interval_s` of 0
    publishes every event at once and keeps no state. Without a `clock`, the
    coalescer uses the running event loop.
    """

    def __init__(
        self,
        publish: Callable[[StatusEvent], None],
        interval_s: float,
        clock: Clock | None = None,
    ) -> None:
        if not interval_s >= 0:
            raise ValueError(
                f"invalid status interval {interval_s!r}; give 0 or more seconds"
            )
        self._publish = publish
        self.interval_s = interval_s
        self._clock = clock
        self._jobs: dict[str, _JobStatus] = {}

    def __len__(self) -> int:
        """Return the number of jobs whose state the coalescer keeps."""
        return len(self._jobs)

    def pending_event(self, job_id: str) -> StatusEvent | None:
        """Return the job's event that waits for its interval to end, if any."""
        job = self._jobs.get(job_id)
        return job.pending if job else None

    def submit(self, event: StatusEvent) -> None:
        """Publish `event` now, or hold it until the job's interval ends."""
        if self.interval_s == 0:
            self._publish(event)
            return
        clock = self._get_clock()
        now = clock.time()
        job = self._jobs.get(event.job_id)
        if job is None:
            # The first interval starts now, as if an event had just been published.
            job = self._jobs[event.job_id] = _JobStatus(sent_at=now, pending=event)
            job.timer = clock.call_at(now + self.interval_s, self._flush, event.job_id)
            return
        if job.pending is not None:
            # The timer is already set, so the newer event only replaces the held one.
            logger.debug(
                "job %s status %s dropped: replaced by %s within %g s",
                job.pending.job_id, job.pending.state.value, event.state.value,
                self.interval_s,
            )
            job.pending = event
            return
        if now - job.sent_at >= self.interval_s:
            job.sent_at = now
            self._publish(event)
            return
        job.pending = event
        due = job.sent_at + self.interval_s
        job.timer = clock.call_at(due, self._flush, event.job_id)

    def finish(self, job_id: str) -> None:
        """Drop the job's held event and its state, because its result follows."""
        job = self._jobs.pop(job_id, None)
        if job is not None:
            self._drop_pending(job, "the job's result follows")

    def clear(self) -> None:
        """Drop every held event and all state, for a stop of the agent."""
        jobs = list(self._jobs.values())
        self._jobs.clear()
        for job in jobs:
            self._drop_pending(job, "the agent is stopping")

    def _flush(self, job_id: str) -> None:
        job = self._jobs.get(job_id)
        if job is None or job.pending is None:
            return
        event = job.pending
        job.pending = None
        job.timer = None
        job.sent_at = self._get_clock().time()
        self._publish(event)

    def _drop_pending(self, job: _JobStatus, reason: str) -> None:
        if job.timer is not None:
            job.timer.cancel()
        if job.pending is not None:
            logger.debug(
                "job %s status %s dropped: %s",
                job.pending.job_id, job.pending.state.value, reason,
            )
        job.pending = None
        job.timer = None

    def _get_clock(self) -> Clock:
        if self._clock is None:
            self._clock = asyncio.get_running_loop()
        return self._clock
