"""Idle memory: the RSS of an idle fairu-agent against an idle Celery worker.

Each process tree (the process and all its descendants) is started and left idle for
`--settle` seconds after it reports ready. Then it is sampled `--samples` times, one
second apart, and the figure is the median sample. The systems start one after the other in
rounds, so no two run at once, and the ratio is of the medians over rounds. RSS counts
pages that a forked child shares with its parent in both processes, so PSS, which
divides shared pages among the processes that map them, is printed beside it.

    .venv/bin/python bench/idle_memory.py        # 3 rounds
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import common
from fairu.protocol.topology import JOBS_EXCHANGE, job_queue_name, job_routing_key

TARGET_RATIO = 0.6
TARGET_AGENT_MB = 60.0
MB = 1_000_000


@dataclass
class Sample:
    rss_bytes: float
    pss_bytes: float
    processes: int


def measure(service: common.ServiceProcess, ready_text: str, settle_s: float, samples: int) -> Sample:
    service.start(ready_text)
    try:
        time.sleep(settle_s)
        taken = []
        for _ in range(samples):
            taken.append(common.tree_rss_bytes(service.pid))
            time.sleep(1.0)
    finally:
        service.stop()
    return Sample(
        common.median([rss for rss, _, _ in taken]),
        common.median([pss for _, pss, _ in taken]),
        max(count for _, _, count in taken),
    )


def agent_factory(
    topology: common.BenchTopology, folder: Path, url: str, runner: str, socket: str
) -> Callable[[int], common.ServiceProcess]:
    competition = f"b{uuid.uuid4().hex[:8]}"
    topology.declare_job_queue(
        job_queue_name(competition, "cpu"), JOBS_EXCHANGE, job_routing_key(competition, "cpu"),
        own_exchange=False,
    )
    key = common.make_signing_key()

    def make(round_index: int) -> common.ServiceProcess:
        agent_folder = folder / f"agent-{runner}-{round_index}"
        agent_folder.mkdir()
        agent_folder.chmod(0o755)
        config = common.write_agent_config(
            agent_folder, url=url, trust=common.signing_key_trust(key),
            competition=competition, queue="cpu", runner=runner, slots=1,
            podman_socket=socket,
        )
        return common.ServiceProcess(
            f"fairu-agent ({runner} runner)", common.fairu_agent_argv(config),
            agent_folder / "agent.log", env=common.agent_env(topology),
        )

    return make


def celery_factory(
    topology: common.BenchTopology, folder: Path, url: str
) -> Callable[[int], common.ServiceProcess]:
    queue = f"{topology.prefix}.celery"
    exchange = f"{topology.prefix}.celery-jobs"
    topology.declare_job_queue(queue, exchange, queue, own_exchange=True)
    env = {
        **common.agent_env(topology),
        "FAIRU_BENCH_BROKER_URL": url,
        "FAIRU_BENCH_CELERY_QUEUE": queue,
        "FAIRU_BENCH_CELERY_EXCHANGE": exchange,
        "PYTHONPATH": str(common.BENCH_DIR),
    }

    def make(round_index: int) -> common.ServiceProcess:
        return common.ServiceProcess(
            "celery worker",
            [
                sys.executable, "-m", "celery", "-A", "celery_app", "worker",
                "--pool", "prefork", "--concurrency", "1", "--queues", queue,
                "--without-gossip", "--without-mingle", "--without-heartbeat",
                "--loglevel", "INFO", "--hostname", f"{topology.prefix}-{round_index}@%h",
            ],
            folder / f"celery-{round_index}.log",
            env=env,
        )

    return make


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default=common.DEFAULT_BROKER_URL, help="AMQP URL")
    parser.add_argument(
        "--socket", default="unix:///run/user/1001/podman/podman.sock",
        help="podman API socket URL for the agent's podman runner",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds idle before sampling")
    parser.add_argument("--samples", type=int, default=5, help="samples per process tree")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and logs")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    prefix = common.unique_prefix()
    folder = common.make_work_folder(prefix)
    topology = common.BenchTopology(args.broker, prefix)
    try:
        topology.declare_results()
        systems = [
            ("fairu-agent, podman runner", "serving",
             agent_factory(topology, folder, args.broker, "podman", args.socket)),
            ("fairu-agent, null runner", "serving",
             agent_factory(topology, folder, args.broker, "null", args.socket)),
            ("celery worker, prefork, concurrency 1", "ready.",
             celery_factory(topology, folder, args.broker)),
        ]
        results: dict[str, list[Sample]] = {name: [] for name, _, _ in systems}
        for round_index in range(args.rounds):
            for name, ready_text, make in systems:
                print(f"round {round_index + 1}/{args.rounds}: {name}", file=sys.stderr,
                      flush=True)
                results[name].append(
                    measure(make(round_index), ready_text, args.settle, args.samples)
                )
        report(args, results)
    finally:
        topology.delete_all()
        if not args.keep:
            common.remove_folder(folder)
    return 0


def report(args: argparse.Namespace, results: dict[str, list[Sample]]) -> None:
    print(f"\n{args.rounds} rounds, each the median of {args.samples} samples taken after "
          f"{args.settle:.0f} s idle; medians over rounds, [min-max] over rounds\n")
    rows = []
    for name, samples in results.items():
        rss = [s.rss_bytes / MB for s in samples]
        pss = [s.pss_bytes / MB for s in samples]
        rows.append([
            name,
            str(max(s.processes for s in samples)),
            f"{common.median(rss):.1f} [{min(rss):.1f}-{max(rss):.1f}]",
            f"{common.median(pss):.1f}",
        ])
    common.print_table(["process tree", "processes", "RSS MB", "PSS MB"], rows)
    names = list(results)
    agent = common.median([s.rss_bytes for s in results[names[0]]]) / MB
    celery = common.median([s.rss_bytes for s in results[names[-1]]]) / MB
    ratio = agent / celery
    print()
    common.print_table(["figure", "value", "target", ""], [
        ["agent RSS / Celery RSS", f"{ratio:.2f}", f"<= {TARGET_RATIO}",
         "met" if ratio <= TARGET_RATIO else "missed"],
        ["agent RSS", f"{agent:.1f} MB", f"<= {TARGET_AGENT_MB:.0f} MB",
         "met" if agent <= TARGET_AGENT_MB else "missed"],
    ])


if __name__ == "__main__":
    sys.exit(main())
