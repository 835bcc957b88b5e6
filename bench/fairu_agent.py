"""Run `fairu-agent` with its results and events sent to the benchmark's own exchanges.

The agent is the installed `fairu.agent.cli`, unchanged, except that the exchanges it
publishes results and events to are read from FAIRU_BENCH_RESULTS_EXCHANGE and
FAIRU_BENCH_EVENTS_EXCHANGE. In the shared topology, fairu.results and the lease
events on fairu.events go into fairu.coordinator.records, where thousands of
benchmark messages would wait for the next coordinator that reads that queue.

FAIRU_BENCH_SKIP, for profiling only, names pipeline steps to leave out, comma
separated, to measure what each one costs:

    status   the four signed status events of each job
    record   the job record in jobs.sqlite, which is also the result's spool (a
             group commit with an fsync, and one without once the result is confirmed)

FAIRU_BENCH_TRACE, also for profiling, names a JSON file that the agent writes when
it stops: the count and mean wall time of each job, of each call that a job makes
through asyncio.to_thread, and of each publish, by exchange.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fairu.agent.daemon
import fairu.agent.leases
import fairu.agent.session
from fairu.agent.cli import main
from fairu.agent.state import StateDir

SKIPPABLE = {"status", "record"}


def _no_status(_agent: object, _event: object) -> None:
    return None


async def _no_record(_state: object, *_args: object) -> None:
    return None


def skip_steps(names: set[str]) -> None:
    unknown = names - SKIPPABLE
    if unknown:
        sys.exit(f"fairu_agent.py: error: unknown steps in FAIRU_BENCH_SKIP: {sorted(unknown)}")
    if "status" in names:
        fairu.agent.daemon.Agent.publish_status = _no_status  # type: ignore[method-assign]
    if "record" in names:
        StateDir.record = _no_record  # type: ignore[method-assign]
        StateDir.confirmed = _no_record  # type: ignore[method-assign]


class StageTimes:
    """Count and total wall time of each traced stage."""

    def __init__(self) -> None:
        self.count: defaultdict[str, int] = defaultdict(int)
        self.total_s: defaultdict[str, float] = defaultdict(float)

    def add(self, stage: str, started: float) -> None:
        self.count[stage] += 1
        self.total_s[stage] += time.perf_counter() - started

    def write(self, path: Path) -> None:
        report = {
            stage: {"count": count, "mean_ms": self.total_s[stage] / count * 1000}
            for stage, count in self.count.items()
        }
        path.write_text(json.dumps(report, indent=2))


def trace_stages(path: Path) -> None:
    times = StageTimes()
    to_thread = asyncio.to_thread
    publish = fairu.agent.session.AmqpSession.publish
    handle = fairu.agent.daemon.Agent._handle

    async def traced_to_thread(function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await to_thread(function, *args, **kwargs)
        finally:
            times.add(f"thread {getattr(function, '__qualname__', function)}", started)

    @functools.wraps(publish)
    async def traced_publish(self: Any, exchange: str, *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        try:
            await publish(self, exchange, *args, **kwargs)
        finally:
            times.add(f"publish to {exchange}", started)

    @functools.wraps(handle)
    async def traced_handle(*args: Any) -> None:
        started = time.perf_counter()
        try:
            await handle(*args)
        finally:
            times.add("job, delivery to ack", started)

    # The agent's modules look asyncio.to_thread up at each call, so this reaches them.
    asyncio.to_thread = traced_to_thread  # type: ignore[assignment]
    fairu.agent.session.AmqpSession.publish = traced_publish  # type: ignore[method-assign]
    fairu.agent.daemon.Agent._handle = traced_handle  # type: ignore[method-assign]
    atexit.register(times.write, path)


if __name__ == "__main__":
    exchange = os.environ.get("FAIRU_BENCH_RESULTS_EXCHANGE")
    if not exchange:
        sys.exit("fairu_agent.py: error: FAIRU_BENCH_RESULTS_EXCHANGE is not set")
    events = os.environ.get("FAIRU_BENCH_EVENTS_EXCHANGE")
    if not events:
        sys.exit("fairu_agent.py: error: FAIRU_BENCH_EVENTS_EXCHANGE is not set")
    # The modules bind the names at import, so the module attributes are what they use.
    fairu.agent.daemon.RESULTS_EXCHANGE = exchange
    fairu.agent.daemon.EVENTS_EXCHANGE = events
    fairu.agent.leases.EVENTS_EXCHANGE = events
    skipped = os.environ.get("FAIRU_BENCH_SKIP", "")
    skip_steps({name for name in skipped.split(",") if name})
    trace = os.environ.get("FAIRU_BENCH_TRACE")
    if trace:
        trace_stages(Path(trace))
    sys.exit(main())
