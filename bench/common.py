"""Helpers shared by the benchmark scripts: broker objects, the load driver, statistics.

Every benchmark makes its own uniquely named queues and exchanges on the broker and
deletes them when it ends, because the RabbitMQ node may be shared with other users.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import pika
import psutil

from fairu.protocol.models import Certificate, JobSpec, Resources, utc_now
from fairu.protocol.signing import generate_private_key, public_key_text
from fairu.protocol.trust import issue_certificate, sign_job
from fairu.protocol.topology import job_queue_arguments

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
BENCH_DIR = Path(__file__).resolve().parent
# Bind-mount sources must be reachable by the rootless podman user, so state folders
# live under a world-traversable folder.
WORK_BASE = Path(os.environ.get("FAIRU_BENCH_WORK", "/var/tmp/fairu-bench"))


def unique_prefix() -> str:
    return f"fairu-bench-{uuid.uuid4().hex[:8]}"


def make_work_folder(prefix: str) -> Path:
    folder = WORK_BASE / prefix
    folder.mkdir(parents=True)
    for path in (WORK_BASE, folder):
        path.chmod(0o755)
    return folder


def load_repo_module(relative_path: str, name: str) -> ModuleType:
    """Load a file of this repository that is not an installed module, as `name`."""
    path = BENCH_DIR.parent / relative_path
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --- broker objects -----------------------------------------------------------------


@dataclass
class BenchTopology:
    """The benchmark's own exchanges and queues on the broker.

    `results_exchange` replaces fairu.results. It is a topic exchange with a durable
    quorum queue bound to `result.#`, as fairu.coordinator.records is bound in the
    real topology, so a result's publisher confirm waits for a quorum-queue write as
    it does in production. The shared exchange is not used, because thousands of
    benchmark results would wait in fairu.coordinator.records for the next
    coordinator that reads it, and would reach every test that subscribes there.
    """

    url: str
    prefix: str
    queues: list[str] = field(default_factory=list)
    exchanges: list[str] = field(default_factory=list)

    @property
    def results_exchange(self) -> str:
        return f"{self.prefix}.results"

    @property
    def events_exchange(self) -> str:
        return f"{self.prefix}.events"

    @property
    def records_queue(self) -> str:
        return f"{self.prefix}.records"

    def _channel(self) -> tuple[pika.BlockingConnection, pika.adapters.blocking_connection.BlockingChannel]:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        return connection, connection.channel()

    def declare_platform(self) -> None:
        """Declare fairu's own exchanges and platform queues, as `fairu-admin topology
        declare` does, so that a benchmark also runs on a broker that fairu never used."""
        from fairu.agent.session import AmqpSession
        from fairu.broker.topology import declare_topology

        async def declare() -> None:
            session = AmqpSession(self.url, name="fairu-bench topology")
            await session.open()
            try:
                await declare_topology(session)
            finally:
                await session.close()

        asyncio.run(declare())

    def declare_results(self) -> None:
        self.declare_platform()
        connection, channel = self._channel()
        try:
            channel.exchange_declare(self.results_exchange, "topic", durable=True)
            self.exchanges.append(self.results_exchange)
            channel.queue_declare(
                self.records_queue, durable=True, arguments={"x-queue-type": "quorum"}
            )
            self.queues.append(self.records_queue)
            channel.queue_bind(self.records_queue, self.results_exchange, "result.#")
            # Agent events replace fairu.events. Lease events are routed to the records
            # queue as in the shared topology, so a claim's confirm also waits for a
            # quorum-queue write. Status events and heartbeats reach no queue.
            channel.exchange_declare(self.events_exchange, "topic", durable=True)
            self.exchanges.append(self.events_exchange)
            channel.queue_bind(self.records_queue, self.events_exchange, "agent.lease.#")
        finally:
            connection.close()

    def declare_job_queue(
        self, name: str, exchange: str, routing_key: str, *, own_exchange: bool
    ) -> None:
        """Declare a quorum job queue with fairu's arguments and bind it.

        With `own_exchange`, the direct exchange is the benchmark's own: it is declared
        here and deleted with the queue, and the queue gets no dead-letter exchange,
        because fairu.dlx belongs to fairu.
        """
        arguments = job_queue_arguments()
        connection, channel = self._channel()
        try:
            if own_exchange:
                arguments.pop("x-dead-letter-exchange")
                channel.exchange_declare(exchange, "direct", durable=True)
                self.exchanges.append(exchange)
            channel.queue_declare(name, durable=True, arguments=arguments)
            self.queues.append(name)
            channel.queue_bind(name, exchange, routing_key)
        finally:
            connection.close()

    def purge(self, name: str) -> None:
        connection, channel = self._channel()
        try:
            channel.queue_purge(name)
        finally:
            connection.close()

    def delete_all(self) -> None:
        connection, channel = self._channel()
        try:
            for name in self.queues:
                channel.queue_delete(name)
            for name in self.exchanges:
                channel.exchange_delete(name)
        finally:
            connection.close()
        self.queues.clear()
        self.exchanges.clear()


# --- jobs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchMessage:
    job_id: str
    body: bytes
    properties: pika.BasicProperties


@dataclass
class SigningKey:
    private: object
    public_text: str
    # Set for a key that a root certified. The agents then pin `root_text`.
    certificate: Certificate | None = None
    root_text: str | None = None


def make_signing_key(certified: bool = False) -> SigningKey:
    """Make a job-signing key, with a root key and a certificate when `certified`.

    Agents trust an uncertified key directly. A certified key signs jobs as
    `fairu-admin submit` does, so each job carries the certificate that the agent
    checks against the pinned root.
    """
    key = generate_private_key()
    public_text = public_key_text(key.public_key())
    if not certified:
        return SigningKey(key, public_text)
    root = generate_private_key()
    now = utc_now()
    certificate = issue_certificate(
        root, key.public_key(), now - timedelta(minutes=5), now + timedelta(hours=12)
    )
    return SigningKey(key, public_text, certificate, public_key_text(root.public_key()))


# The resources of a null-runner job, small enough that 64 of them fit the admission
# of a 2-core machine at once. The null runner starts no container to use them.
NOOP_RESOURCES = Resources(cpus=0.01, memory_mb=1)


def build_job(
    competition: str,
    queue: str,
    job_id: str,
    command: list[str],
    resources: Resources | None = None,
) -> JobSpec:
    now = utc_now()
    return JobSpec(
        job_id=job_id,
        competition=competition,
        queue=queue,
        submission_id="bench",
        image="localhost/fairu-python:1",
        command=command,
        created_at=now,
        expires_at=now + timedelta(hours=2),
        resources=resources or Resources(),
    )


def signed_fairu_messages(
    key: SigningKey,
    competition: str,
    queue: str,
    count: int,
    command: list[str],
    tag: str,
    resources: Resources | None = None,
) -> list[BenchMessage]:
    """Sign `count` jobs ahead of time, so signing stays out of the timed region."""
    messages = []
    for index in range(count):
        job_id = f"{tag}-{index:05d}"
        job = build_job(competition, queue, job_id, command, resources)
        envelope = sign_job(job.model_dump_json().encode(), key.private, key.certificate)
        body = envelope.model_dump_json(exclude_none=True).encode()
        messages.append(BenchMessage(job_id, body, persistent_properties(job_id)))
    return messages


def persistent_properties(job_id: str, **fields: object) -> pika.BasicProperties:
    values: dict[str, object] = {
        "content_type": "application/json",
        "delivery_mode": 2,
        "message_id": job_id,
    }
    values.update(fields)
    return pika.BasicProperties(**values)  # type: ignore[arg-type]


# --- the load driver ------------------------------------------------------------------


class DriverError(Exception):
    """The load driver timed out or the broker returned or rejected a job message."""


@dataclass
class LoadResult:
    # Seconds from publishing a job to receiving its result, in publish order.
    latencies_s: list[float]
    # Seconds from the first publish to the last result.
    wall_s: float

    @property
    def jobs_per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s


def drive_closed_loop(
    url: str,
    exchange: str,
    routing_key: str,
    results_exchange: str,
    messages: Sequence[BenchMessage],
    window: int,
    timeout_s: float = 300.0,
) -> LoadResult:
    """Publish `messages` keeping `window` jobs in flight, and time each job's result.

    A result is a message on `results_exchange` with routing key `result.<job_id>`.
    The subscriber queue is bound before the first publish. Every job message is
    persistent, mandatory and confirmed; a return or nack raises `DriverError`.
    """
    driver = _ClosedLoopDriver(url, exchange, routing_key, results_exchange, messages, window)
    return driver.run(timeout_s)


class _ClosedLoopDriver:
    def __init__(
        self,
        url: str,
        exchange: str,
        routing_key: str,
        results_exchange: str,
        messages: Sequence[BenchMessage],
        window: int,
    ) -> None:
        self.params = pika.URLParameters(url)
        self.params.client_properties = {"connection_name": "fairu bench driver"}
        self.exchange = exchange
        self.routing_key = routing_key
        self.results_exchange = results_exchange
        self.messages = messages
        self.window = window
        self.next_index = 0
        self.published_at: dict[str, float] = {}
        self.received_at: dict[str, float] = {}
        self.error: str | None = None
        self.connection: pika.SelectConnection | None = None
        self.channel: pika.channel.Channel | None = None
        self.started_at = 0.0
        self.finished_at = 0.0

    def run(self, timeout_s: float) -> LoadResult:
        self.connection = pika.SelectConnection(
            self.params,
            on_open_callback=self._on_open,
            on_open_error_callback=lambda _c, error: self._fail(f"connection failed: {error}"),
            on_close_callback=lambda _c, _reason: self.connection.ioloop.stop(),  # type: ignore[union-attr]
        )
        self.connection.ioloop.call_later(timeout_s, self._on_timeout)
        self.connection.ioloop.start()
        if self.error is not None:
            raise DriverError(self.error)
        latencies = [
            self.received_at[m.job_id] - self.published_at[m.job_id] for m in self.messages
        ]
        return LoadResult(latencies, self.finished_at - self.started_at)

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        self._close()

    def _close(self) -> None:
        assert self.connection is not None
        if self.connection.is_open:
            self.connection.close()
        elif not self.connection.is_closing:
            self.connection.ioloop.stop()

    def _on_timeout(self) -> None:
        self._fail(
            f"timed out with {len(self.received_at)} of {len(self.messages)} results "
            "received; check the worker's log"
        )

    def _on_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: pika.channel.Channel) -> None:
        self.channel = channel
        channel.add_on_return_callback(
            lambda _ch, _m, props, _b: self._fail(f"job {props.message_id} was unroutable")
        )
        channel.confirm_delivery(ack_nack_callback=self._on_confirm)
        channel.queue_declare(
            "", exclusive=True, auto_delete=True, callback=self._on_results_queue
        )

    def _on_results_queue(self, frame: pika.frame.Method) -> None:
        assert self.channel is not None
        queue = frame.method.queue
        self.channel.queue_bind(
            queue,
            self.results_exchange,
            "result.#",
            callback=lambda _f: self.channel.basic_consume(  # type: ignore[union-attr]
                queue,
                self._on_result,
                auto_ack=True,
                callback=lambda _f: self._start(),
            ),
        )

    def _start(self) -> None:
        self.started_at = time.perf_counter()
        for _ in range(min(self.window, len(self.messages))):
            self._publish_next()

    def _publish_next(self) -> None:
        assert self.channel is not None
        message = self.messages[self.next_index]
        self.next_index += 1
        self.published_at[message.job_id] = time.perf_counter()
        self.channel.basic_publish(
            self.exchange,
            self.routing_key,
            message.body,
            properties=message.properties,
            mandatory=True,
        )

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        if isinstance(frame.method, pika.spec.Basic.Nack):
            self._fail("the broker nacked a job message")

    def _on_result(
        self,
        _channel: pika.channel.Channel,
        method: pika.spec.Basic.Deliver,
        _properties: pika.BasicProperties,
        _body: bytes,
    ) -> None:
        now = time.perf_counter()
        job_id = method.routing_key.removeprefix("result.")
        if job_id not in self.published_at or job_id in self.received_at:
            return  # another run's result, or a repeat
        self.received_at[job_id] = now
        if self.next_index < len(self.messages):
            self._publish_next()
        elif len(self.received_at) == len(self.messages):
            self.finished_at = now
            self._close()


# --- processes ------------------------------------------------------------------------


@dataclass
class ServiceProcess:
    """A long-running subprocess whose output goes to a log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self, ready_text: str, timeout_s: float = 60.0) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        deadline = time.monotonic() + timeout_s
        while ready_text not in self.log():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self.process.returncode} before "
                    f"it was ready; its log {self.log_path} ends with:\n{self.log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.name} was not ready within {timeout_s:.0f} s; see {self.log_path}"
                )
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def tree_rss_bytes(pid: int) -> tuple[int, int, int]:
    """Return (RSS, PSS, process count) summed over a process and all its descendants."""
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    rss = pss = 0
    for process in processes:
        info = process.memory_full_info()
        rss += info.rss
        pss += info.pss
    return rss, pss, len(processes)


def tree_cpu_s(pid: int) -> float:
    """Return the user and system CPU seconds of a process and its live descendants."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        times = process.cpu_times()
        total += times.user + times.system
    return total


def package_tree(checkout: Path, folder: Path) -> Path:
    """Lay out a fairu checkout as an importable `fairu` package under `folder`.

    The repository's top-level folders are the package's subpackages (see
    pyproject.toml), so a folder for PYTHONPATH needs links with the package names.
    Return that folder, which comes before the installed fairu on the import path.
    """
    root = folder / f"tree-{checkout.name}"
    package = root / "fairu"
    package.mkdir(parents=True)
    for entry in (checkout / "fairu").iterdir():
        (package / entry.name).symlink_to(entry.resolve())
    for name in ("agent", "broker", "protocol", "runners"):
        (package / name).symlink_to((checkout / name).resolve())
    return root


def fairu_agent_argv(config: Path, log_level: str = "INFO") -> list[str]:
    return [
        sys.executable, str(BENCH_DIR / "fairu_agent.py"), "start", "--config", str(config),
        "--log-level", log_level,
    ]


def write_agent_config(
    folder: Path,
    *,
    url: str,
    trust: str,
    competition: str,
    queue: str,
    runner: str,
    slots: int,
    heartbeat_interval_s: float = 20,
    agent_extra: str = "",
    podman_socket: str = "unix:///run/user/1001/podman/podman.sock",
) -> Path:
    """Write a bench agent's site config; `trust` is the body of its [trust] section.

    Heartbeats renew leases, so `heartbeat_interval_s` is at most a third of the
    default lease_ttl_s of 60 s.
    """
    config = folder / "site.toml"
    config.write_text(
        f"""[site]
name = "bench"
[broker]
url = "{url}"
[trust]
{trust}
[agent]
state_dir = "state"
slots = {slots}
heartbeat_interval_s = {heartbeat_interval_s}
stop_grace_s = 10
{agent_extra}
[[queues]]
competition = "{competition}"
name = "{queue}"
[runner]
kind = "{runner}"
[runner.podman]
socket = "{podman_socket}"
"""
    )
    return config


def signing_key_trust(key: SigningKey) -> str:
    """Return the [trust] body that accepts jobs signed by `key`."""
    if key.root_text is not None:
        return f'root_key = "{key.root_text}"'
    return f'signing_keys = ["{key.public_text}"]'


def agent_env(topology: BenchTopology, skip: str = "") -> dict[str, str]:
    return {
        **os.environ,
        "FAIRU_BENCH_RESULTS_EXCHANGE": topology.results_exchange,
        "FAIRU_BENCH_EVENTS_EXCHANGE": topology.events_exchange,
        "FAIRU_BENCH_SKIP": skip,
    }


def remove_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


# --- statistics and tables ------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the value at `fraction` (0 to 1) by linear interpolation between ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    position = fraction * (len(ordered) - 1)
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def bootstrap_interval(
    pairs: Sequence[tuple[float, float]],
    statistic: Callable[[Sequence[tuple[float, float]]], float],
    confidence: float = 0.95,
    resamples: int = 4000,
    seed: int = 1,
) -> tuple[float, float]:
    """Return a percentile bootstrap confidence interval of `statistic` over `pairs`.

    Pairs are resampled whole, so the load that two neighbouring runs shared stays
    with them. The seed is fixed, so one set of pairs always gives one interval.
    """
    generator = random.Random(seed)
    estimates = sorted(
        statistic(generator.choices(pairs, k=len(pairs))) for _ in range(resamples)
    )
    tail = (1 - confidence) / 2
    return percentile(estimates, tail), percentile(estimates, 1 - tail)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a Markdown table, so the output can be pasted into docs/benchmarks.md."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


def print_stage_times(name: str, path: Path) -> None:
    """Print the stage times that an agent run with FAIRU_BENCH_TRACE wrote to `path`.

    Only stages that ran at least once per job are shown, most total time first.
    """
    if not path.exists():
        print(f"\n{name}: no stage times in {path}; see the agent's log")
        return
    stages = json.loads(path.read_text())
    jobs = stages.get("job, delivery to ack", {}).get("count", 0)
    ordered = sorted(stages.items(), key=lambda item: -item[1]["count"] * item[1]["mean_ms"])
    rows = [
        [stage, str(values["count"]), f"{values['mean_ms']:.2f}"]
        for stage, values in ordered
        if values["count"] >= jobs
    ]
    print(f"\n{name}: mean wall time of each stage over its {jobs} jobs\n")
    print_table(["stage", "count", "mean ms"], rows)
