"""Fault-injection run: jobs across several agents while agents and the broker fail.

The run starts a private RabbitMQ node, a coordinator in this process and N agent
processes, and submits jobs in bursts. While jobs are being submitted or still lack a
result, it kills agents with SIGKILL (and starts them again), closes agent
connections from the broker side and restarts the broker. The faults come at random
moments from a seeded generator, within bounded counts. The seed fixes those draws,
but how the faults line up with jobs still depends on timing. At the end the run
checks the coordinator's store: every job must have exactly one recorded final
result. The run stops by itself after `--max-seconds`.

Run as root (the private node's folder belongs to the rabbitmq user), from the
repository root:

    .venv/bin/python bench/fault_injection.py --jobs 200 --agents 3 --seed 1

It prints the figures and exits 0 when no job was lost or recorded twice, no agent
exited on its own and no message was left in the job queue. docs/faults.md lists the results of earlier runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pwd
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import common
from fairu.agent.session import AmqpSession, SessionError
from fairu.broker.coordinator import Coordinator
from fairu.broker.store import Store
from fairu.broker.topology import declare_job_queue, declare_topology
from fairu.logs import configure_logging
from fairu.protocol.models import JobSpec, utc_now
from fairu.protocol.signing import (
    agent_id_for,
    generate_private_key,
    load_private_key,
    public_key_text,
    sign_model,
)
from fairu.protocol.topology import JOBS_EXCHANGE, job_queue_name, job_routing_key

logger = logging.getLogger("fault_injection")

COMPETITION = "faults"
QUEUE = "cpu"
SITE = "bench"
IMAGE = "localhost/fairu-python:1"
SCORES_COMMAND = [
    "python3",
    "-c",
    "open('/output/scores.json', 'w').write('{\"ok\": 1}')",
]
DUPLICATE_REASON = "a final result was already recorded for this job"
# Agent state folders must be reachable by the rootless podman user, so the work
# folder is made under /var/tmp and opened to mode 0755.
WORK_BASE = Path("/var/tmp")


broker_node = common.load_repo_module(
    "tests/integration/broker_node.py", "fairu_bench_broker_node"
)


@dataclass
class Figures:
    """Counts and timings of one run, as printed and written with --json."""

    seed: int
    jobs: int
    agents: int
    slots: int
    runner: str
    kills: int = 0
    broker_restarts: int = 0
    connections_closed: int = 0
    publish_retries: int = 0
    unexpected_agent_exits: int = 0
    recorded: int = 0
    lost: int = 0
    duplicated: int = 0
    audit_copies: int = 0
    jobs_with_audit_copies: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    queue_left: tuple[int, int] = (0, 0)
    submit_s: float = 0.0
    wall_s: float = 0.0

    @property
    def passed(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.unexpected_agent_exits == 0
            and self.queue_left == (0, 0)
        )


# --- agents -------------------------------------------------------------------


@dataclass
class AgentHandle:
    """One `fairu-agent start` process; its folder survives kills and restarts."""

    index: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None
    killed: bool = False

    @property
    def log_path(self) -> Path:
        return self.folder / "agent.log"

    def write_config(
        self, broker_url: str, signing_key: str, token: str, args: argparse.Namespace
    ) -> None:
        self.folder.mkdir(parents=True)
        self.folder.chmod(0o755)
        (self.folder / "site.toml").write_text(
            f"""
[site]
name = "{SITE}"
[broker]
url = "{broker_url}"
[trust]
signing_keys = ["{signing_key}"]
[agent]
state_dir = "state"
slots = {args.slots}
heartbeat_interval_s = 5
# Short, so that the coordinator queues a killed agent's job again well within the
# recovery time at the end of the run.
lease_ttl_s = 20
stop_grace_s = 10
enrollment_token = "{token}"
[[queues]]
competition = "{COMPETITION}"
name = "{QUEUE}"
[runner]
kind = "{args.runner}"
[runner.podman]
socket = "{args.podman_socket}"
"""
        )

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fairu.agent.cli",
                    "start",
                    "--config",
                    str(self.folder / "site.toml"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.killed = False

    def kill(self) -> None:
        assert self.process is not None
        self.killed = True
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            logger.warning("agent %d did not stop within 30 s; killing it", self.index)
            self.process.kill()
            self.process.wait()

    def exited_unexpectedly(self) -> int | None:
        """Return the exit code when the process ended without being killed here."""
        if self.process is None or self.killed:
            return None
        return self.process.poll()

    def log(self) -> str:
        return (
            self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        )

    def serving_count(self) -> int:
        return self.log().count("serving 1 queues")

    @property
    def agent_id(self) -> str:
        """The id the agent derives from its identity key, made on its first start."""
        key = load_private_key(self.folder / "state" / "identity.key")
        return agent_id_for(SITE, key.public_key())


async def wait_until_serving(
    agents: list[AgentHandle], counts: list[int], timeout_s: float
) -> None:
    """Wait until each agent has logged more "serving" lines than in `counts`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(a.serving_count() > c for a, c in zip(agents, counts, strict=True)):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"agents did not serve within {timeout_s:.0f} s")


# --- submission ---------------------------------------------------------------


class JobPublisher:
    """Publishes signed jobs with confirms, reconnecting while the broker is down."""

    def __init__(self, url: str, figures: Figures) -> None:
        self.url = url
        self.figures = figures
        self.session: AmqpSession | None = None

    async def publish(self, body: bytes) -> None:
        routing_key = job_routing_key(COMPETITION, QUEUE)
        failures = 0
        while True:
            try:
                if self.session is None or not self.session.is_open:
                    self.session = AmqpSession(self.url, name="fairu-bench submitter")
                    await self.session.open(timeout_s=5)
                await self.session.publish(
                    JOBS_EXCHANGE, routing_key, body, mandatory=True
                )
                return
            except SessionError as exc:
                if exc.permanent:
                    raise
                # A publish without a confirm may still have reached the queue, so a
                # retry can enqueue the same job message twice. Agents dedupe it.
                self.figures.publish_retries += 1
                failures += 1
                if failures == 1:
                    logger.info("job publish failed (%s); retrying every 1 s", exc)
                self.session = None
                await asyncio.sleep(1)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def build_job(seed: int, number: int, command: list[str]) -> JobSpec:
    now = utc_now()
    return JobSpec(
        job_id=f"fi-{seed}-{number:04d}-{uuid.uuid4().hex[:6]}",
        competition=COMPETITION,
        queue=QUEUE,
        submission_id=f"sub-{number}",
        image=IMAGE,
        command=command,
        created_at=now,
        expires_at=now + timedelta(hours=1),
    )


async def submit_jobs(
    publisher: JobPublisher,
    key: Any,
    args: argparse.Namespace,
    rng: random.Random,
    job_ids: list[str],
) -> float:
    """Publish `args.jobs` jobs in bursts of 1 to 10, with pauses between bursts.

    Returns the seconds the submission took.
    """
    began = time.monotonic()
    number = 0
    while number < args.jobs:
        burst = min(args.jobs - number, rng.randint(1, 10))
        for _ in range(burst):
            job = build_job(args.seed, number, SCORES_COMMAND)
            await publisher.publish(sign_model(job, key))
            job_ids.append(job.job_id)
            number += 1
        await asyncio.sleep(rng.uniform(0.5, args.burst_pause_s))
    logger.info("submitted %d jobs", number)
    return time.monotonic() - began


# --- faults -------------------------------------------------------------------


async def inject_faults(
    node: Any,
    agents: list[AgentHandle],
    args: argparse.Namespace,
    rng: random.Random,
    figures: Figures,
    work_left: Callable[[], Awaitable[bool]],
    stop_at: float,
) -> None:
    """Inject one fault every few seconds while jobs are submitted or unfinished.

    Stops at `stop_at` (a `time.monotonic()` value) or once every count is used up.
    """
    while time.monotonic() < stop_at and await work_left():
        await asyncio.sleep(rng.uniform(2.0, args.fault_gap_s))
        kind = pick_fault(args, rng, figures)
        if kind is None or time.monotonic() >= stop_at or not await work_left():
            return
        if kind == "kill":
            await kill_and_restart(rng.choice(agents), rng, figures)
        elif kind == "broker":
            down_s = rng.uniform(0.0, 3.0)
            logger.info("restarting the broker (down %.1f s more)", down_s)
            await asyncio.to_thread(node.restart, down_s)
            figures.broker_restarts += 1
        else:
            await close_connection(node, rng.choice(agents), figures)


def pick_fault(
    args: argparse.Namespace, rng: random.Random, figures: Figures
) -> str | None:
    """Draw the next fault among those whose count is not used up; kills weigh 3."""
    kinds = []
    if figures.kills < args.max_kills:
        kinds += ["kill"] * 3
    if figures.broker_restarts < args.max_broker_restarts:
        kinds.append("broker")
    if figures.connections_closed < args.max_closes:
        kinds.append("close")
    return rng.choice(kinds) if kinds else None


async def kill_and_restart(
    agent: AgentHandle, rng: random.Random, figures: Figures
) -> None:
    logger.info("killing agent %d with SIGKILL", agent.index)
    await asyncio.to_thread(agent.kill)
    figures.kills += 1
    await asyncio.sleep(rng.uniform(0.5, 3.0))
    agent.start()


async def close_connection(node: Any, agent: AgentHandle, figures: Figures) -> None:
    if not (agent.folder / "state" / "identity.key").exists():
        return
    try:
        closed = await asyncio.to_thread(
            node.close_connections, f"fairu-agent {agent.agent_id}", "fault injection"
        )
    except (broker_node.BrokerNodeError, subprocess.TimeoutExpired) as exc:
        # A connection can close between listing and closing it.
        logger.info("closing agent %d's connection failed: %s", agent.index, exc)
        return
    logger.info("closed %d connections of agent %d", closed, agent.index)
    figures.connections_closed += closed


async def watch_agents(agents: list[AgentHandle], figures: Figures) -> None:
    """Restart and count every agent that exits without being killed by this run."""
    while True:
        for agent in agents:
            code = agent.exited_unexpectedly()
            if code is not None:
                figures.unexpected_agent_exits += 1
                tail = "\n".join(agent.log().splitlines()[-15:])
                logger.error(
                    "agent %d exited on its own with code %d, restarting it; "
                    "its log ends:\n%s",
                    agent.index,
                    code,
                    tail,
                )
                agent.start()
        await asyncio.sleep(0.5)


# --- checks -------------------------------------------------------------------


async def wait_for_results(store: Store, job_ids: list[str], deadline: float) -> None:
    pending = set(job_ids)
    while pending and time.monotonic() < deadline:
        pending = await asyncio.to_thread(unrecorded, store, pending)
        if pending:
            await asyncio.sleep(1)


async def wait_for_empty_queue(node: Any, deadline: float) -> tuple[int, int]:
    """Wait until the job queue has no ready or unacked message; return the counts."""
    queue = job_queue_name(COMPETITION, QUEUE)
    while True:
        counts = await asyncio.to_thread(node.queue_counts, queue)
        if counts == (0, 0) or time.monotonic() >= deadline:
            return counts
        await asyncio.sleep(1)


def unrecorded(store: Store, job_ids: set[str]) -> set[str]:
    return {job_id for job_id in job_ids if store.result(job_id) is None}


def check_store(store: Store, job_ids: list[str], figures: Figures) -> None:
    statuses: Counter[str] = Counter()
    for job_id in job_ids:
        stored = store.result(job_id)
        if stored is None:
            figures.lost += 1
            logger.error("job %s has no recorded result", job_id)
            continue
        figures.recorded += 1
        statuses[stored.status] += 1
        copies = store.audit_reasons(job_id).count(DUPLICATE_REASON)
        figures.audit_copies += copies
        figures.jobs_with_audit_copies += copies > 0
    figures.statuses = dict(statuses)
    # The results table keys on job_id, so a second row per job id would need a
    # schema change. The count also includes results of job ids never submitted.
    figures.duplicated = count_extra_results(store, set(job_ids))


def count_extra_results(store: Store, job_ids: set[str]) -> int:
    with sqlite3.connect(store.path) as connection:
        rows = connection.execute("SELECT job_id FROM results").fetchall()
    per_job = Counter(row[0] for row in rows)
    extra = sum(count - 1 for count in per_job.values())
    strangers = sum(1 for job_id in per_job if job_id not in job_ids)
    return extra + strangers


# --- the run ------------------------------------------------------------------


async def declare(url: str) -> None:
    session = AmqpSession(url, name="fairu-bench declare")
    await session.open()
    await declare_topology(session)
    await declare_job_queue(session, COMPETITION, QUEUE)
    await session.close()


async def run(args: argparse.Namespace, work: Path) -> Figures:
    began = time.monotonic()
    deadline = began + args.max_seconds
    # No fault in the last `recovery_s` seconds, so that reconnects can finish.
    stop_at = deadline - args.recovery_s
    rng = random.Random(args.seed)

    figures = Figures(
        seed=args.seed,
        jobs=args.jobs,
        agents=args.agents,
        slots=args.slots,
        runner=args.runner,
    )
    node = broker_node.BrokerNode()
    agents: list[AgentHandle] = []
    job_ids: list[str] = []

    try:
        await asyncio.to_thread(node.start)
        await declare(node.url)
        store = Store(work / "coordinator.sqlite")
        coordinator = Coordinator(node.url, store)
        coordinating = asyncio.create_task(coordinator.run())
        try:
            await start_agents(args, node, store, agents, work)
            await submit_under_faults(
                args, rng, figures, node, store, agents, job_ids, stop_at
            )
            logger.info("faults done; waiting for the results")
            await wait_for_results(store, job_ids, deadline)
            figures.queue_left = await wait_for_empty_queue(node, deadline)
            # Copies from redeliveries may still be on their way to the audit table.
            await asyncio.sleep(2)
        finally:
            for agent in agents:
                await asyncio.to_thread(agent.stop)
            coordinator.stopping.set()
            await asyncio.wait_for(coordinating, 60)
        check_store(store, job_ids, figures)
        store.close()
    finally:
        await asyncio.to_thread(node.destroy)

    figures.wall_s = time.monotonic() - began
    return figures


async def start_agents(
    args: argparse.Namespace,
    node: Any,
    store: Store,
    agents: list[AgentHandle],
    work: Path,
) -> None:
    """Start the agents, each approved through its own enrollment token."""
    public_key = public_key_text(args.signing_key.public_key())
    for index in range(args.agents):
        agent = AgentHandle(index, work / f"agent-{index}")
        token = await asyncio.to_thread(store.add_enrollment_token, SITE)
        agent.write_config(node.url, public_key, token, args)
        agent.start()
        agents.append(agent)
    await wait_until_serving(agents, [0] * len(agents), 60)


async def submit_under_faults(
    args: argparse.Namespace,
    rng: random.Random,
    figures: Figures,
    node: Any,
    store: Store,
    agents: list[AgentHandle],
    job_ids: list[str],
    stop_at: float,
) -> None:
    """Submit every job while faults are injected, until no job is left unrecorded."""
    watcher = asyncio.create_task(watch_agents(agents, figures))
    publisher = JobPublisher(node.url, figures)
    submitting = asyncio.create_task(
        submit_jobs(publisher, args.signing_key, args, rng, job_ids)
    )

    async def work_left() -> bool:
        if not submitting.done():
            return True
        return bool(await asyncio.to_thread(unrecorded, store, set(job_ids)))

    try:
        await inject_faults(node, agents, args, rng, figures, work_left, stop_at)
        figures.submit_s = await submitting
    finally:
        submitting.cancel()
        watcher.cancel()
        await asyncio.gather(submitting, watcher, return_exceptions=True)
        await publisher.close()


def default_podman_socket() -> str:
    try:
        uid = pwd.getpwnam("fairu").pw_uid
    except KeyError:
        uid = os.getuid()
    return f"unix:///run/user/{uid}/podman/podman.sock"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Submit jobs across agents while killing agents and restarting "
        "the broker, then check that every job has exactly one recorded result."
    )
    parser.add_argument("--jobs", type=int, default=200, help="jobs to submit")
    parser.add_argument("--agents", type=int, default=3, help="agent processes")
    parser.add_argument("--slots", type=int, default=2, help="job slots per agent")
    parser.add_argument(
        "--runner", choices=["null", "podman"], default="null", help="agent runner"
    )
    parser.add_argument(
        "--podman-socket",
        default=default_podman_socket(),
        help="podman API socket URL for --runner podman (default: user fairu's)",
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the fault schedule"
    )
    parser.add_argument("--max-kills", type=int, default=8, help="max agent kills")
    parser.add_argument(
        "--max-broker-restarts", type=int, default=3, help="max broker restarts"
    )
    parser.add_argument(
        "--max-closes", type=int, default=3, help="max connections closed by the broker"
    )
    parser.add_argument(
        "--fault-gap-s",
        type=float,
        default=6.0,
        help="max seconds between two faults (the min is 2 s)",
    )
    parser.add_argument(
        "--burst-pause-s",
        type=float,
        default=4.0,
        help="max seconds between two bursts of jobs (the min is 0.5 s)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=280.0,
        help="time limit of the whole run in seconds; results missing then are lost",
    )
    parser.add_argument(
        "--recovery-s",
        type=float,
        default=60.0,
        help="seconds at the end of --max-seconds without faults, for recovery",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--log-level", default="INFO", help="log level of this script")
    return parser.parse_args(argv)


def print_figures(figures: Figures) -> None:
    rows = [
        ("jobs submitted", figures.jobs),
        (
            "agents",
            f"{figures.agents}, {figures.slots} slots each, {figures.runner} runner",
        ),
        ("agent kills (SIGKILL, then restart)", figures.kills),
        ("broker restarts", figures.broker_restarts),
        ("connections closed by the broker", figures.connections_closed),
        ("job publishes retried", figures.publish_retries),
        ("agents that exited on their own", figures.unexpected_agent_exits),
        ("jobs with a recorded result", figures.recorded),
        ("lost (no recorded result)", figures.lost),
        ("duplicated (recorded more than once)", figures.duplicated),
        ("audit copies of recorded results", figures.audit_copies),
        ("jobs with audit copies", figures.jobs_with_audit_copies),
        ("statuses", json.dumps(figures.statuses, sort_keys=True)),
        ("job queue left (ready, unacked)", figures.queue_left),
        ("submission time", f"{figures.submit_s:.1f} s"),
        ("wall time", f"{figures.wall_s:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("PASSED" if figures.passed else "FAILED")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("WARNING")
    logger.setLevel(args.log_level.upper())
    # The coordinator logs each of its reconnects, which would bury the run's own log.
    logging.getLogger("fairu").setLevel(logging.ERROR)
    args.signing_key = generate_private_key()
    work = Path(tempfile.mkdtemp(prefix="fairu-faults-", dir=WORK_BASE))
    work.chmod(0o755)
    try:
        figures = asyncio.run(run(args, work))
    finally:
        if args.keep:
            print(f"work folder kept at {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_figures(figures)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(figures), indent=2) + "\n")
    return 0 if figures.passed else 1


if __name__ == "__main__":
    sys.exit(main())
