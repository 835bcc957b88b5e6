"""Control-plane throughput: fairu-agent with the null runner against Celery and raw pika.

Each system consumes persistent job messages from its own durable quorum queue and
publishes one persistent result per job, with a publisher confirm, before it acks the
job. One load driver serves all of them: it keeps `--window` jobs in flight and times
each job from its publish to the arrival of its result. A second, unloaded phase sends
jobs one at a time. The systems run in interleaved rounds, and each ratio is taken
within one round, so load from other users of the machine hits both sides alike.

    .venv/bin/python bench/control_plane.py      # 3 rounds of 2,000 jobs per system
    .venv/bin/python bench/control_plane.py --certified   # jobs carry certificates
"""

from __future__ import annotations

import argparse
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kombu.serialization import dumps

import common
from fairu.protocol.topology import JOBS_EXCHANGE, job_queue_name, job_routing_key

# The null runner starts no container, so the command is never run.
JOB_COMMAND = ["true"]
TARGET_VS_CELERY = 1.5
TARGET_VS_RAW = 0.5


@dataclass
class PhaseResult:
    jobs_per_s: float
    p50_ms: float
    p99_ms: float
    # CPU milliseconds per job of the system's processes (user and system).
    cpu_ms_per_job: float


@dataclass
class System:
    """One system under test: its process and the messages it consumes."""

    name: str
    kind: str  # "fairu", "celery" or "raw"
    exchange: str
    routing_key: str
    make_messages: Callable[[int, str], list[common.BenchMessage]]
    service: common.ServiceProcess
    ready_text: str
    # The stage times an agent writes when it stops, with --trace-agent.
    trace_path: Path | None = None


@dataclass(frozen=True)
class CeleryConfig:
    pool: str
    concurrency: int
    prefetch_multiplier: int

    @classmethod
    def parse(cls, text: str) -> CeleryConfig:
        try:
            pool, concurrency, multiplier = text.split(":")
            return cls(pool, int(concurrency), int(multiplier))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid Celery config {text!r}: expected POOL:CONCURRENCY:MULTIPLIER, "
                "for example prefork:2:4"
            ) from None

    @property
    def label(self) -> str:
        prefetch = self.concurrency * self.prefetch_multiplier
        return f"celery {self.pool} {self.concurrency}, prefetch {prefetch}"


def fairu_system(
    topology: common.BenchTopology, folder: Path, url: str, slots: int, log_level: str,
    skip: str, trace: bool, tree: Path | None = None, certified: bool = False,
) -> System:
    """Return an agent system; `tree` is another fairu source tree that it runs.

    With `certified`, its jobs carry a certificate of their signing key, and the agent
    pins the root key that issued it.
    """
    competition = f"b{uuid.uuid4().hex[:8]}"
    queue = "cpu"
    topology.declare_job_queue(
        job_queue_name(competition, queue), JOBS_EXCHANGE, job_routing_key(competition, queue),
        own_exchange=False,
    )
    key = common.make_signing_key(certified)
    name = f"fairu, {slots} slots" + (f", without {skip}" if skip else "")
    if tree is not None:
        name += f", {tree.name}"
    agent_folder = folder / f"fairu-{competition}"
    agent_folder.mkdir()
    agent_folder.chmod(0o755)
    config = common.write_agent_config(
        agent_folder, url=url, trust=common.signing_key_trust(key),
        competition=competition, queue=queue, runner="null", slots=slots,
    )
    env = common.agent_env(topology, skip)
    if tree is not None:
        env["PYTHONPATH"] = str(common.package_tree(tree, folder))
    trace_path = agent_folder / "stages.json" if trace else None
    if trace_path is not None:
        env["FAIRU_BENCH_TRACE"] = str(trace_path)
    service = common.ServiceProcess(
        name, common.fairu_agent_argv(config, log_level), agent_folder / "agent.log", env=env
    )

    def make_messages(count: int, tag: str) -> list[common.BenchMessage]:
        return common.signed_fairu_messages(
            key, competition, queue, count, JOB_COMMAND, tag, common.NOOP_RESOURCES
        )

    return System(
        name, "fairu", JOBS_EXCHANGE, job_routing_key(competition, queue), make_messages,
        service, "serving", trace_path,
    )


def celery_system(
    topology: common.BenchTopology, folder: Path, url: str, config: CeleryConfig, index: int
) -> System:
    import celery_app

    queue = f"{topology.prefix}.celery-{index}"
    exchange = f"{topology.prefix}.celery-{index}-jobs"
    topology.declare_job_queue(queue, exchange, queue, own_exchange=True)
    env = {
        **common.agent_env(topology),
        "FAIRU_BENCH_BROKER_URL": url,
        "FAIRU_BENCH_CELERY_QUEUE": queue,
        "FAIRU_BENCH_CELERY_EXCHANGE": exchange,
        "FAIRU_BENCH_PREFETCH_MULTIPLIER": str(config.prefetch_multiplier),
        "PYTHONPATH": str(common.BENCH_DIR),
    }
    worker_folder = folder / f"celery-{index}"
    worker_folder.mkdir()
    service = common.ServiceProcess(
        config.label,
        [
            sys.executable, "-m", "celery", "-A", "celery_app", "worker",
            "--pool", config.pool, "--concurrency", str(config.concurrency),
            "--queues", queue, "--without-gossip", "--without-mingle",
            "--without-heartbeat", "--loglevel", "INFO",
            "--hostname", f"{topology.prefix}-{index}@%h",
        ],
        worker_folder / "worker.log",
        env=env,
    )

    def make_messages(count: int, tag: str) -> list[common.BenchMessage]:
        messages = []
        for number in range(count):
            job_id = f"{tag}-{number:05d}"
            job = common.build_job(
                "celery", "cpu", job_id, JOB_COMMAND, common.NOOP_RESOURCES
            )
            # Celery's own message builder, so the worker reads a regular task message.
            task = celery_app.app.amqp.as_task_v2(
                job_id, celery_app.TASK_NAME, args=(job.model_dump(mode="json"),)
            )
            content_type, content_encoding, body = dumps(task.body, serializer="json")
            properties = common.persistent_properties(
                job_id,
                content_type=content_type,
                content_encoding=content_encoding,
                headers=task.headers,
                **task.properties,
            )
            messages.append(common.BenchMessage(job_id, body.encode(), properties))
        return messages

    return System(config.label, "celery", exchange, queue, make_messages, service, "ready.")


def raw_system(topology: common.BenchTopology, folder: Path, url: str, prefetch: int) -> System:
    queue = f"{topology.prefix}.raw"
    exchange = f"{topology.prefix}.raw-jobs"
    topology.declare_job_queue(queue, exchange, queue, own_exchange=True)
    worker_folder = folder / "raw"
    worker_folder.mkdir()
    name = f"raw pika, prefetch {prefetch}"
    service = common.ServiceProcess(
        name,
        [sys.executable, str(common.BENCH_DIR / "raw_worker.py"), url, queue,
         topology.results_exchange, str(prefetch)],
        worker_folder / "worker.log",
    )

    def make_messages(count: int, tag: str) -> list[common.BenchMessage]:
        body = b'{"job": "raw"}'
        job_ids = [f"{tag}-{number:05d}" for number in range(count)]
        return [
            common.BenchMessage(job_id, body, common.persistent_properties(job_id))
            for job_id in job_ids
        ]

    return System(name, "raw", exchange, queue, make_messages, service, "serving")


def run_phase(
    system: System, topology: common.BenchTopology, url: str, count: int, window: int,
    tag: str,
) -> PhaseResult:
    messages = system.make_messages(count, tag)
    cpu_before = common.tree_cpu_s(system.service.pid)
    outcome = common.drive_closed_loop(
        url, system.exchange, system.routing_key, topology.results_exchange, messages, window
    )
    cpu_s = common.tree_cpu_s(system.service.pid) - cpu_before
    topology.purge(topology.records_queue)
    return PhaseResult(
        outcome.jobs_per_s,
        common.percentile(outcome.latencies_s, 0.50) * 1000,
        common.percentile(outcome.latencies_s, 0.99) * 1000,
        cpu_s / count * 1000,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default=common.DEFAULT_BROKER_URL, help="AMQP URL")
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per loaded run")
    parser.add_argument("--window", type=int, default=64, help="jobs in flight when loaded")
    parser.add_argument(
        "--latency-jobs", type=int, default=200, help="jobs per unloaded run, sent one at a time"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")

    parser.add_argument(
        "--slots", default="64,8",
        help="agent slots, which are also its prefetch; a comma-separated list runs one "
        "agent per value, and the first is compared with the others (default 64,8)",
    )
    parser.add_argument(
        "--celery", action="append", type=CeleryConfig.parse, metavar="POOL:N:MULTIPLIER",
        help="a Celery worker: pool, concurrency and worker_prefetch_multiplier; "
        "repeatable, and the first is the one compared (default prefork:2:4 and "
        "threads:8:1)",
    )
    parser.add_argument("--raw-prefetch", type=int, default=64, help="prefetch of the raw worker")

    parser.add_argument(
        "--agent-log-level", default="INFO", help="the agent's --log-level (default INFO)"
    )
    parser.add_argument(
        "--fairu-skip", action="append", default=[], metavar="STEPS",
        help="also run an agent with the first slot count that leaves out these steps "
        "(status, record; comma separated), to measure what they cost; repeatable",
    )
    parser.add_argument(
        "--fairu-tree", action="append", default=[], type=Path, metavar="FOLDER",
        help="also run an agent with the first slot count from this checkout of fairu, "
        "such as `git worktree add FOLDER REV` or `git archive REV` unpacked, to compare "
        "two versions in one run; repeatable",
    )
    parser.add_argument(
        "--trace-agent", action="store_true",
        help="print the mean time of each stage of an agent's jobs, over all its jobs",
    )
    parser.add_argument(
        "--certified", action="store_true",
        help="sign the agents' jobs with a root-certified key, as `fairu-admin submit` "
        "does, instead of a key that the agents trust directly",
    )
    parser.add_argument("--only", help="comma-separated subset of fairu,celery,raw")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and logs")

    args = parser.parse_args()
    if args.celery is None:
        args.celery = [CeleryConfig("prefork", 2, 4), CeleryConfig("threads", 8, 1)]
    return args


def build_systems(
    args: argparse.Namespace, topology: common.BenchTopology, folder: Path
) -> list[System]:
    wanted = set((args.only or "fairu,celery,raw").split(","))
    slot_counts = [int(value) for value in args.slots.split(",")]
    systems: list[System] = []
    if "fairu" in wanted:
        for slots in slot_counts:
            systems.append(fairu_system(
                topology, folder, args.broker, slots, args.agent_log_level, "",
                args.trace_agent, certified=args.certified,
            ))
        for tree in args.fairu_tree:
            systems.append(fairu_system(
                topology, folder, args.broker, slot_counts[0], args.agent_log_level, "",
                args.trace_agent, tree, certified=args.certified,
            ))
        for skip in args.fairu_skip:
            systems.append(fairu_system(
                topology, folder, args.broker, slot_counts[0], args.agent_log_level, skip,
                args.trace_agent, certified=args.certified,
            ))
    if "celery" in wanted:
        for index, config in enumerate(args.celery):
            systems.append(celery_system(topology, folder, args.broker, config, index))
    if "raw" in wanted:
        systems.append(raw_system(topology, folder, args.broker, args.raw_prefetch))
    return systems


def main() -> int:
    args = parse_args()
    prefix = common.unique_prefix()
    folder = common.make_work_folder(prefix)
    topology = common.BenchTopology(args.broker, prefix)
    systems: list[System] = []
    try:
        topology.declare_results()
        systems = build_systems(args, topology, folder)
        for system in systems:
            system.service.start(system.ready_text)
        loaded: dict[str, list[PhaseResult]] = {s.name: [] for s in systems}
        unloaded: dict[str, list[PhaseResult]] = {s.name: [] for s in systems}
        for round_index in range(args.rounds):
            for system in systems:
                print(f"round {round_index + 1}/{args.rounds}: {system.name}",
                      file=sys.stderr, flush=True)
                tag = f"{prefix}-r{round_index}"
                loaded[system.name].append(run_phase(
                    system, topology, args.broker, args.jobs, args.window, f"{tag}-load"
                ))
                unloaded[system.name].append(run_phase(
                    system, topology, args.broker, args.latency_jobs, 1, f"{tag}-one"
                ))
        for system in systems:
            system.service.stop()
        report(args, systems, loaded, unloaded)
        for system in systems:
            if system.trace_path is not None:
                common.print_stage_times(system.name, system.trace_path)
    finally:
        for system in systems:
            system.service.stop()
        topology.delete_all()
        if not args.keep:
            common.remove_folder(folder)
    return 0


def report(
    args: argparse.Namespace,
    systems: list[System],
    loaded: dict[str, list[PhaseResult]],
    unloaded: dict[str, list[PhaseResult]],
) -> None:
    print(f"\n{args.jobs} jobs per loaded run with {args.window} in flight, "
          f"{args.latency_jobs} jobs one at a time, {args.rounds} rounds; "
          "medians over rounds, [min-max] over rounds\n")

    rows = []
    for system in systems:
        runs, single = loaded[system.name], unloaded[system.name]
        rates = [r.jobs_per_s for r in runs]
        rows.append([
            system.name,
            f"{common.median(rates):.0f} [{min(rates):.0f}-{max(rates):.0f}]",
            f"{common.median([r.p50_ms for r in runs]):.0f}",
            f"{common.median([r.p99_ms for r in runs]):.0f}",
            f"{common.median([r.p50_ms for r in single]):.1f}",
            f"{common.median([r.p99_ms for r in single]):.1f}",
            f"{common.median([r.cpu_ms_per_job for r in runs]):.2f}",
        ])
    common.print_table(
        ["system", "jobs/s", "loaded p50 ms", "loaded p99 ms", "one at a time p50 ms",
         "one at a time p99 ms", "CPU ms/job"],
        rows,
    )

    fairu = [s for s in systems if s.kind == "fairu"]
    if not fairu:
        return
    compared = fairu[0].name
    first_celery = next((s.name for s in systems if s.kind == "celery"), None)
    ratio_rows = []
    for system in systems:
        if system.name == compared:
            continue
        ratios = [
            mine.jobs_per_s / theirs.jobs_per_s
            for mine, theirs in zip(loaded[compared], loaded[system.name])
        ]
        value = common.median(ratios)
        target_text = verdict = ""
        if system.kind == "raw" or system.name == first_celery:
            target = TARGET_VS_CELERY if system.kind == "celery" else TARGET_VS_RAW
            target_text = f">= {target}"
            verdict = "met" if value >= target else "missed"
        ratio_rows.append([
            f"{compared} / {system.name}",
            f"{value:.2f} [{min(ratios):.2f}-{max(ratios):.2f}]",
            target_text,
            verdict,
        ])
    if not ratio_rows:
        return
    print()
    common.print_table(["jobs/s ratio, per round", "median [min-max]", "target", ""], ratio_rows)


if __name__ == "__main__":
    sys.exit(main())
