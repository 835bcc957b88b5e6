"""Per-job overhead: a trivial container job through fairu-agent against `podman run`.

The agent uses the podman runner with one slot. Each job's time runs from its publish
to the arrival of its result. The baseline is `podman --remote run --rm` of the same
image, command and sandbox flags against the same podman API service, timed around
the CLI process. The two alternate (ABBA order, so drift hits both alike), after one
warm-up of each. Each agent job and the `podman run` next to it form a pair, and the
figures are the ratio of the medians and the median paired difference, each with a
95% bootstrap confidence interval over the pairs. Container creation varies by
seconds on a loaded disk, so the interval shows whether a run can show the target.

    .venv/bin/python bench/job_overhead.py       # 40 jobs each way
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import common
from fairu.protocol.topology import JOBS_EXCHANGE, job_queue_name, job_routing_key
from fairu.runners.podman import PodmanSettings

IMAGE = "localhost/fairu-python:1"
# The smallest job the agent reports as succeeded: it writes an empty scores object.
JOB_COMMAND = ["sh", "-c", "echo '{}' > /output/scores.json"]
TARGET_RATIO = 1.05
MIB = 1024 * 1024
# Log lines of the agent that open each phase of a job, in order, and the phase names.
PHASE_MARKS = [
    ("(competition ", "create the container"),
    ("created container", "start"),
    ("started container", "run until the exit is seen"),
    ("exited with code", "read the log, remove"),
    ("removed container", "sign, record, publish"),
    ("finished: ", None),
]
# The podman-py calls that are requests to the podman service, as the stage trace
# names them. The agent's own time is the rest of a job's delivery-to-ack time.
PODMAN_REQUESTS = {
    "thread CreateMixin.create",
    "thread Container.start",
    "thread PodmanResource.reload",
    "thread Container.kill",
    "thread Container.remove",
}
LOG_LINE = re.compile(r"^(\S+ \S+) \S+\s+\S+: job (\S+?):? (.*)$")


def podman_run_argv(socket_url: str, output_dir: Path) -> list[str]:
    """Return a `podman run` command line with the options that PodmanRunner sets.

    Defaults are those of `PodmanSettings()` and of a job's default resources (1 CPU,
    1024 MB). Cgroup limits are passed too, although rootless podman on cgroup v1
    ignores them in both paths.
    """
    settings = PodmanSettings(socket_url=socket_url)
    memory_bytes = 1024 * MIB
    ulimits = {**settings.ulimits, "data": (memory_bytes, memory_bytes)}
    argv = [
        "podman", "--remote", "--url", socket_url, "run", "--rm",
        "--name", f"fairu-bench-{secrets.token_hex(4)}",
        "--label", "fairu.job_id=bench", "--label", "fairu.agent_id=bench",
        "--env", "HOME=/tmp", "--env", "NVIDIA_VISIBLE_DEVICES=void",
        "--workdir", "/output",
        "--network", "none",
        "--read-only",
        "--mount", f"type=tmpfs,destination=/tmp,tmpfs-size={settings.tmpfs_size}",
        "--mount", f"type=bind,source={output_dir},destination=/output,rw=true",
        "--cap-drop", "ALL",
        "--stop-timeout", "0",
        "--security-opt", "no-new-privileges",
        "--memory", str(memory_bytes),
        "--cpu-period", "100000", "--cpu-quota", "100000",
        "--pids-limit", str(settings.pids_limit),
    ]
    for name, (soft, hard) in ulimits.items():
        argv += ["--ulimit", f"{name}={soft}:{hard}"]
    return argv + [IMAGE, *JOB_COMMAND]


def time_podman_run(argv: list[str], output_dir: Path) -> float:
    (output_dir / "scores.json").unlink(missing_ok=True)
    started = time.perf_counter()
    completed = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if completed.returncode != 0 or not (output_dir / "scores.json").exists():
        raise RuntimeError(
            f"podman run failed with status {completed.returncode}: {completed.stderr[-2000:]}"
        )
    return elapsed


def make_output_dir(folder: Path, owner: str) -> Path:
    """Make the baseline's /output folder, owned by the podman user as the agent does."""
    output = folder / "baseline-output"
    output.mkdir()
    output.chmod(0o755)
    entry = pwd.getpwnam(owner)
    os.chown(output, entry.pw_uid, entry.pw_gid)
    return output


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default=common.DEFAULT_BROKER_URL, help="AMQP URL")
    parser.add_argument(
        "--socket", default="unix:///run/user/1001/podman/podman.sock",
        help="podman API socket URL, used by the agent and by podman --remote",
    )
    parser.add_argument("--user", default="fairu", help="the user that owns the socket")
    parser.add_argument("--jobs", type=int, default=40, help="timed jobs each way")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and logs")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    prefix = common.unique_prefix()
    folder = common.make_work_folder(prefix)
    topology = common.BenchTopology(args.broker, prefix)
    competition = f"b{uuid.uuid4().hex[:8]}"
    agent: common.ServiceProcess | None = None
    try:
        topology.declare_results()
        topology.declare_job_queue(
            job_queue_name(competition, "cpu"), JOBS_EXCHANGE,
            job_routing_key(competition, "cpu"), own_exchange=False,
        )
        key = common.make_signing_key()
        agent_folder = folder / "agent"
        agent_folder.mkdir()
        agent_folder.chmod(0o755)
        config = common.write_agent_config(
            agent_folder, url=args.broker, trust=common.signing_key_trust(key),
            competition=competition, queue="cpu", runner="podman", slots=1,
            podman_socket=args.socket,
        )
        trace_path = agent_folder / "stages.json"
        env = {**common.agent_env(topology), "FAIRU_BENCH_TRACE": str(trace_path)}
        agent = common.ServiceProcess(
            "fairu-agent", common.fairu_agent_argv(config), agent_folder / "agent.log", env=env
        )
        agent.start("serving")
        output_dir = make_output_dir(folder, args.user)

        def agent_job(tag: str) -> float:
            messages = common.signed_fairu_messages(
                key, competition, "cpu", 1, JOB_COMMAND, f"{prefix}-{tag}"
            )
            outcome = common.drive_closed_loop(
                args.broker, JOBS_EXCHANGE, job_routing_key(competition, "cpu"),
                topology.results_exchange, messages, window=1, timeout_s=120,
            )
            return outcome.latencies_s[0]

        def podman_job() -> float:
            return time_podman_run(podman_run_argv(args.socket, output_dir), output_dir)

        agent_job("warmup")
        podman_job()
        agent_times: list[float] = []
        podman_times: list[float] = []
        for index in range(args.jobs):
            print(f"job {index + 1}/{args.jobs}", file=sys.stderr, flush=True)
            # ABBA: agent first on even rounds, podman first on odd ones.
            if index % 2 == 0:
                agent_times.append(agent_job(f"j{index}"))
                podman_times.append(podman_job())
            else:
                podman_times.append(podman_job())
                agent_times.append(agent_job(f"j{index}"))
        agent.stop()
        report(args, agent_times, podman_times, agent.log())
        common.print_stage_times("fairu-agent", trace_path)
        report_own_time(trace_path, common.median(podman_times))
    finally:
        if agent is not None:
            agent.stop()
        topology.delete_all()
        if not args.keep:
            common.remove_folder(folder)
    return 0


def report(
    args: argparse.Namespace, agent_times: list[float], podman_times: list[float],
    agent_log: str,
) -> None:
    succeeded = agent_log.count("finished: succeeded in ")
    print(f"\n{args.jobs} jobs each way, interleaved; {succeeded} of {args.jobs + 1} agent "
          "jobs succeeded (including the warm-up)\n")
    rows = []
    for name, times in (("fairu-agent, publish to result", agent_times),
                        ("podman --remote run --rm", podman_times)):
        rows.append([
            name,
            f"{common.median(times) * 1000:.0f}",
            f"{min(times) * 1000:.0f}",
            f"{max(times) * 1000:.0f}",
        ])
    common.print_table(["path", "median ms", "min ms", "max ms"], rows)
    # A pair is the two jobs that ran next to each other, so it shares their load.
    pairs = list(zip(agent_times, podman_times, strict=True))
    ratio, ratio_low, ratio_high = _with_interval(pairs, _ratio_of_medians)
    paired, paired_low, paired_high = _with_interval(pairs, _median_paired_ratio)
    difference, difference_low, difference_high = _with_interval(pairs, _median_difference_ms)
    if ratio_high <= TARGET_RATIO:
        verdict = "met"
    elif ratio_low > TARGET_RATIO:
        verdict = "missed"
    else:
        verdict = "not shown: the interval contains the target"
    print()
    common.print_table(
        ["figure", "value", "95% interval", "target", ""],
        [
            ["ratio of medians, agent / podman run", f"{ratio:.3f}",
             f"{ratio_low:.3f} to {ratio_high:.3f}", f"<= {TARGET_RATIO}", verdict],
            ["median of paired ratios", f"{paired:.3f}",
             f"{paired_low:.3f} to {paired_high:.3f}", "", ""],
            ["median paired difference, agent - podman run, ms", f"{difference:.0f}",
             f"{difference_low:.0f} to {difference_high:.0f}", "", ""],
        ],
    )
    phases = agent_phases(agent_log)
    if phases:
        print("\nagent phases from its log, median ms over all jobs:\n")
        common.print_table(
            ["phase", "median ms"],
            [[name, f"{common.median(values):.0f}"] for name, values in phases.items()],
        )


def report_own_time(trace_path: Path, podman_median_s: float) -> None:
    """Print the agent's mean time per job outside podman requests.

    This part does not depend on how long podman takes to create a container, so it
    is steadier than the ratio. The podman CLI makes the same create, start and
    remove requests, and waits on the container where the agent polls it.
    """
    if not trace_path.exists():
        return
    stages = json.loads(trace_path.read_text())
    job = stages.get("job, delivery to ack")
    if not job:
        return
    requests_ms = sum(
        values["count"] * values["mean_ms"]
        for stage, values in stages.items()
        if stage in PODMAN_REQUESTS
    ) / job["count"]
    own_ms = job["mean_ms"] - requests_ms
    print(
        f"\nagent time per job outside podman requests: {own_ms:.0f} ms of "
        f"{job['mean_ms']:.0f} ms (mean), {own_ms / (podman_median_s * 1000):.1%} of "
        "the median `podman run`"
    )


def _with_interval(
    pairs: list[tuple[float, float]],
    statistic: Callable[[Sequence[tuple[float, float]]], float],
) -> tuple[float, float, float]:
    low, high = common.bootstrap_interval(pairs, statistic)
    return statistic(pairs), low, high


def _ratio_of_medians(pairs: Sequence[tuple[float, float]]) -> float:
    return common.median([a for a, _ in pairs]) / common.median([p for _, p in pairs])


def _median_paired_ratio(pairs: Sequence[tuple[float, float]]) -> float:
    return common.median([a / p for a, p in pairs])


def _median_difference_ms(pairs: Sequence[tuple[float, float]]) -> float:
    return common.median([(a - p) * 1000 for a, p in pairs])


def agent_phases(agent_log: str) -> dict[str, list[float]]:
    """Return the milliseconds between the runner's log lines, by phase, over all jobs."""
    marks: dict[str, dict[str, datetime]] = {}
    for line in agent_log.splitlines():
        match = LOG_LINE.match(line)
        if match is None:
            continue
        at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
        job_id, text = match.group(2), match.group(3)
        for mark, _ in PHASE_MARKS:
            if mark in text:
                marks.setdefault(job_id, {}).setdefault(mark, at)
    phases: dict[str, list[float]] = {name: [] for _, name in PHASE_MARKS if name}
    for seen in marks.values():
        if len(seen) != len(PHASE_MARKS):
            continue
        for (mark, name), (next_mark, _) in zip(PHASE_MARKS, PHASE_MARKS[1:]):
            assert name is not None
            phases[name].append((seen[next_mark] - seen[mark]).total_seconds() * 1000)
    return phases if any(phases.values()) else {}


if __name__ == "__main__":
    sys.exit(main())
