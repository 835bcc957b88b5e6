"""Run `fairu-agent` with its results sent to the benchmark's own exchange.

The agent is the installed `fairu.agent.cli`, unchanged, except that the exchange it
publishes results to is read from FAIRU_BENCH_RESULTS_EXCHANGE. In the shared topology,
fairu.results routes every result into fairu.coordinator.records, where thousands of
benchmark results would wait for the next coordinator that reads that queue.

FAIRU_BENCH_SKIP, for profiling only, names pipeline steps to leave out, comma
separated, to measure what each one costs:

    status   the four signed status events of each job
    spool    writing the result to spool/ (two fsyncs) before publishing it
    record   the job record in jobs.sqlite (one commit)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import fairu.agent.daemon
from fairu.agent.cli import main
from fairu.agent.state import StateDir

SKIPPABLE = {"status", "spool", "record"}


async def _no_status(_agent: object, _event: object) -> None:
    return None


def _no_spool(_state: object, name: str, _routing_key: str, _body: bytes) -> Path:
    # publish_result unlinks this path with missing_ok once the broker confirms.
    return Path("/nonexistent/fairu-bench") / name


def _no_record(_state: object, *_args: object) -> None:
    return None


def skip_steps(names: set[str]) -> None:
    unknown = names - SKIPPABLE
    if unknown:
        sys.exit(f"fairu_agent.py: error: unknown steps in FAIRU_BENCH_SKIP: {sorted(unknown)}")
    if "status" in names:
        fairu.agent.daemon.Agent.publish_status = _no_status  # type: ignore[method-assign]
    if "spool" in names:
        StateDir.spool_write = _no_spool  # type: ignore[method-assign]
    if "record" in names:
        StateDir.record_finished = _no_record  # type: ignore[method-assign]


if __name__ == "__main__":
    exchange = os.environ.get("FAIRU_BENCH_RESULTS_EXCHANGE")
    if not exchange:
        sys.exit("fairu_agent.py: error: FAIRU_BENCH_RESULTS_EXCHANGE is not set")
    # The daemon binds the name at import, so the module attribute is what it uses.
    fairu.agent.daemon.RESULTS_EXCHANGE = exchange
    skipped = os.environ.get("FAIRU_BENCH_SKIP", "")
    skip_steps({name for name in skipped.split(",") if name})
    sys.exit(main())
