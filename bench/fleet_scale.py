"""Fleet scale: the coordinator under 1,000 simulated agents that heartbeat every 10 s.

A simulator process plays the agents. Each simulated agent has its own
Ed25519 identity key, registers with a one-time enrollment token as a real agent does
(so the coordinator approves it), then sends a signed heartbeat every `--interval`
seconds. The agents' heartbeats are spread evenly over the interval and go out over
`--connections` AMQP connections, unpersisted and confirmed, as the agent sends them.
The coordinator is the real one, on queues of the benchmark's own.

Once every agent is approved and `--warmup` seconds have passed, the script measures
over `--window` seconds:

- the coordinator's CPU share: its user and system CPU time over the wall time;
- the fleet-view delay: the time from a heartbeat's `at` (set just before it is
  signed and published) to the moment its `last_seen` appears in the coordinator's
  agents table, which is what `fairu-admin agents list` reads. The table is polled
  every `--poll-ms`, which adds up to that much to each delay.

    .venv/bin/python bench/fleet_scale.py        # 1,000 agents, 60 s measured
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pika
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import common
from fairu.agent.session import AmqpSession
from fairu.broker.store import Store
from fairu.protocol.models import (
    AgentState,
    Heartbeat,
    Registration,
    ResourceAmounts,
    utc_now,
)
from fairu.protocol.signing import agent_id_for, public_key_text, sign_model
from fairu.protocol.topology import heartbeat_routing_key, registration_routing_key

SITE = "fleet"
TARGET_CPU_SHARE = 0.25
# The resources of each simulated agent: a small CPU node without GPUs.
AMOUNTS = ResourceAmounts(cpus=8.0, memory_bytes=32 * 1024**3, gpus=[], slots=4)


# --- the simulated agents (run in their own process) -----------------------------------


@dataclass
class SimulatedAgent:
    key: Ed25519PrivateKey
    token: str

    def __post_init__(self) -> None:
        self.agent_id = agent_id_for(SITE, self.key.public_key())

    def registration(self, interval_s: float) -> bytes:
        registration = Registration(
            agent_id=self.agent_id,
            site=SITE,
            version="bench",
            public_key=public_key_text(self.key.public_key()),
            cpu_cores=8,
            memory_bytes=AMOUNTS.memory_bytes,
            queues=["fairu.jobs.fleet.cpu"],
            slots=4,
            free_slots=4,
            enrollment_token=self.token,
            at=utc_now(),
            heartbeat_interval_s=interval_s,
            capacity=AMOUNTS,
            free=AMOUNTS,
        )
        return sign_model(registration, self.key, self.agent_id)

    def heartbeat(self) -> bytes:
        heartbeat = Heartbeat(
            agent_id=self.agent_id,
            site=SITE,
            state=AgentState.SERVING,
            free_slots=4,
            at=utc_now(),
            capacity=AMOUNTS,
            free=AMOUNTS,
        )
        return sign_model(heartbeat, self.key, self.agent_id)


async def simulate(spec: dict[str, Any]) -> dict[str, float]:
    agents = [
        SimulatedAgent(Ed25519PrivateKey.from_private_bytes(bytes.fromhex(key)), token)
        for key, token in zip(spec["keys"], spec["tokens"], strict=True)
    ]
    sessions = [
        AmqpSession(spec["url"], name=f"fairu bench fleet {number}")
        for number in range(spec["connections"])
    ]
    for session in sessions:
        await session.open()
    exchange, interval = spec["exchange"], spec["interval_s"]
    try:
        await asyncio.gather(*(
            sessions[index % len(sessions)].publish(
                exchange, registration_routing_key(agent.agent_id),
                agent.registration(interval),
            )
            for index, agent in enumerate(agents)
        ))
        print("registered", flush=True)
        return await _heartbeat(agents, sessions, exchange, interval, spec["duration_s"])
    finally:
        for session in sessions:
            await session.close()


async def _heartbeat(
    agents: list[SimulatedAgent],
    sessions: list[AmqpSession],
    exchange: str,
    interval: float,
    duration_s: float,
) -> dict[str, float]:
    stats = {"sent": 0.0, "failed": 0.0, "max_late_s": 0.0}

    def count(confirm: asyncio.Future[None]) -> None:
        if confirm.cancelled() or confirm.exception() is not None:
            stats["failed"] += 1

    started = time.monotonic() + 0.5
    ends = started + duration_s
    beat = 0
    while True:
        for index, agent in enumerate(agents):
            due = started + (beat + index / len(agents)) * interval
            if due > ends:
                return stats
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                stats["max_late_s"] = max(stats["max_late_s"], -wait)
            session = sessions[index % len(sessions)]
            confirm = session.publish_nowait(
                exchange, heartbeat_routing_key(agent.agent_id), agent.heartbeat(),
                persistent=False,
            )
            confirm.add_done_callback(count)
            stats["sent"] += 1
        beat += 1


# --- the measurement -----------------------------------------------------------------


@dataclass
class Window:
    wall_s: float
    cpu_s: float
    delays_s: list[float]

    @property
    def cpu_share(self) -> float:
        return self.cpu_s / self.wall_s


class FleetView:
    """Reads the coordinator's agents table the way `fairu-admin agents list` does."""

    def __init__(self, database: Path) -> None:
        self.db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        self.last_seen: dict[str, str] = {}

    def approved(self) -> int:
        row = self.db.execute(
            "SELECT COUNT(*) FROM agents WHERE approval = 'approved'"
        ).fetchone()
        return int(row[0])

    def new_heartbeats(self) -> list[float]:
        """Return the delay of each heartbeat stored since the last call, in seconds."""
        now = time.time()
        delays = []
        for agent_id, last_seen in self.db.execute("SELECT agent_id, last_seen FROM agents"):
            if self.last_seen.get(agent_id) not in (None, last_seen):
                delays.append(now - datetime.fromisoformat(last_seen).timestamp())
            self.last_seen[agent_id] = last_seen
        return delays

    def close(self) -> None:
        self.db.close()


def measure(coordinator_pid: int, view: FleetView, window_s: float, poll_s: float) -> Window:
    view.new_heartbeats()
    cpu_started = common.tree_cpu_s(coordinator_pid)
    started = time.perf_counter()
    delays: list[float] = []
    while time.perf_counter() - started < window_s:
        time.sleep(poll_s)
        delays.extend(view.new_heartbeats())
    wall = time.perf_counter() - started
    return Window(wall, common.tree_cpu_s(coordinator_pid) - cpu_started, delays)


def wait_until_approved(view: FleetView, agents: int, timeout_s: float) -> float:
    started = time.monotonic()
    while view.approved() < agents:
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(
                f"only {view.approved()} of {agents} agents were approved within "
                f"{timeout_s:.0f} s; see the coordinator's log"
            )
        time.sleep(0.2)
    return time.monotonic() - started


def time_agents_list(database: Path) -> tuple[float, int]:
    """Run `fairu-admin agents list --json` once; return its seconds and live agents."""
    admin = Path(sys.executable).with_name("fairu-admin")
    started = time.perf_counter()
    listing = subprocess.run(
        [str(admin), "agents", "--db", str(database), "list", "--json"],
        capture_output=True, text=True, check=True,
    )
    elapsed = time.perf_counter() - started
    live = sum(1 for agent in json.loads(listing.stdout) if agent["fleet_state"] == "serving")
    return elapsed, live


def declare(topology: common.BenchTopology) -> tuple[str, str, str]:
    """Declare the events exchange and the coordinator's two queues, as in production."""
    exchange = f"{topology.prefix}.events"
    records = f"{topology.prefix}.records"
    heartbeats = f"{topology.prefix}.heartbeats"
    connection = pika.BlockingConnection(pika.URLParameters(topology.url))
    try:
        channel = connection.channel()
        channel.exchange_declare(exchange, "topic", durable=True)
        topology.exchanges.append(exchange)
        for queue, routing_key in (
            (records, "agent.registration.#"), (heartbeats, "agent.heartbeat.#")
        ):
            channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
            topology.queues.append(queue)
            channel.queue_bind(queue, exchange, routing_key)
    finally:
        connection.close()
    return exchange, records, heartbeats


def make_spec(
    args: argparse.Namespace, database: Path, exchange: str, duration_s: float
) -> dict[str, Any]:
    store = Store(database)
    try:
        tokens = [store.add_enrollment_token(SITE) for _ in range(args.agents)]
    finally:
        store.close()
    keys = [Ed25519PrivateKey.generate() for _ in range(args.agents)]
    return {
        "url": args.broker,
        "exchange": exchange,
        "connections": args.connections,
        "interval_s": args.interval,
        "duration_s": duration_s,
        "keys": [key.private_bytes_raw().hex() for key in keys],
        "tokens": tokens,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default=common.DEFAULT_BROKER_URL, help="AMQP URL")
    parser.add_argument("--agents", type=int, default=1000, help="simulated agents")
    parser.add_argument("--interval", type=float, default=10.0, help="heartbeat interval, s")
    parser.add_argument("--connections", type=int, default=4, help="AMQP connections")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before measuring")
    parser.add_argument("--window", type=float, default=60.0, help="seconds measured")
    parser.add_argument("--poll-ms", type=float, default=20.0, help="fleet view poll period")
    parser.add_argument(
        "--fairu-tree", type=Path, metavar="FOLDER",
        help="run the coordinator from this checkout of fairu instead of the installed "
        "one, to measure another version on the same machine",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder and logs")
    parser.add_argument("--simulate", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def run(args: argparse.Namespace) -> int:
    prefix = common.unique_prefix()
    folder = common.make_work_folder(prefix)
    topology = common.BenchTopology(args.broker, prefix)
    database = folder / "coordinator.sqlite"
    coordinator = common.ServiceProcess(
        "fairu-coordinator", [], folder / "coordinator.log"
    )
    simulator: subprocess.Popen[str] | None = None
    try:
        exchange, records, heartbeats = declare(topology)
        # The simulator runs past the window, so the load is steady while measuring.
        duration = args.warmup + args.window + 120
        spec_path = folder / "spec.json"
        spec_path.write_text(json.dumps(make_spec(args, database, exchange, duration)))
        coordinator.argv = [
            sys.executable, str(common.BENCH_DIR / "fairu_coordinator.py"), str(database),
            args.broker, records, heartbeats,
        ]
        if args.fairu_tree is not None:
            tree = common.package_tree(args.fairu_tree, folder)
            coordinator.env = {**os.environ, "PYTHONPATH": str(tree)}
        coordinator.start("coordinator serving")
        with open(folder / "simulator.log", "w") as log:
            simulator = subprocess.Popen(
                [sys.executable, __file__, "--simulate", str(spec_path)],
                stdout=subprocess.PIPE, stderr=log, text=True,
            )
        assert simulator.stdout is not None
        if simulator.stdout.readline().strip() != "registered":
            raise RuntimeError(f"the simulator failed; see {folder / 'simulator.log'}")
        view = FleetView(database)
        approve_s = wait_until_approved(view, args.agents, 120)
        print(f"{args.agents} agents approved {approve_s:.1f} s after their "
              "registrations were confirmed", file=sys.stderr, flush=True)
        time.sleep(args.warmup)
        window = measure(coordinator.pid, view, args.window, args.poll_ms / 1000)
        view.close()
        list_s, live = time_agents_list(database)
        simulator.terminate()
        simulator.wait(30)
        report(args, window, list_s, live)
    finally:
        if simulator is not None and simulator.poll() is None:
            simulator.kill()
            simulator.wait()
        coordinator.stop()
        topology.delete_all()
        if args.keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            common.remove_folder(folder)
    return 0


def report(args: argparse.Namespace, window: Window, list_s: float, live: int) -> None:
    rate = args.agents / args.interval
    delays_ms = [delay * 1000 for delay in window.delays_s]
    print(
        f"\n{args.agents} agents, a heartbeat each every {args.interval:g} s ({rate:.0f}/s) "
        f"over {args.connections} connections; {window.wall_s:.0f} s measured after "
        f"{args.warmup:.0f} s of warm-up; fleet view polled every {args.poll_ms:g} ms"
    )
    if args.fairu_tree is not None:
        print(f"coordinator from {args.fairu_tree}")
    print()
    common.print_table(
        ["figure", "value"],
        [
            ["heartbeats stored in the window", f"{len(delays_ms)} ({len(delays_ms) / window.wall_s:.0f}/s)"],
            ["coordinator CPU ms per heartbeat", f"{window.cpu_s * 1000 / max(len(delays_ms), 1):.2f}"],
            ["fleet-view delay p50 ms", f"{common.percentile(delays_ms, 0.5):.0f}"],
            ["fleet-view delay p99 ms", f"{common.percentile(delays_ms, 0.99):.0f}"],
            ["fleet-view delay max ms", f"{max(delays_ms):.0f}"],
            ["`agents list --json` s", f"{list_s:.2f} ({live} agents serving)"],
        ],
    )
    verdict = "met" if window.cpu_share <= TARGET_CPU_SHARE else "missed"
    print()
    common.print_table(
        ["figure", "value", "target", ""],
        [["coordinator CPU share of one core", f"{window.cpu_share:.1%}",
          f"<= {TARGET_CPU_SHARE:.0%}", verdict]],
    )


def main() -> int:
    args = parse_args()
    if args.simulate is not None:
        stats = asyncio.run(simulate(json.loads(args.simulate.read_text())))
        print(json.dumps(stats), flush=True)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
