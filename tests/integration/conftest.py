"""Fixtures for tests against the real RabbitMQ node, real agents and real podman.

A missing broker or podman service fails the tests with the fix in the message;
nothing is skipped, so CI cannot pass on a machine that lacks them.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from fairu.agent.session import AmqpSession, Delivery, SessionError
from fairu.broker.store import StoredResult
from fairu.broker.topology import declare_job_queue, declare_topology
from fairu.protocol.errors import RejectedError
from fairu.protocol.models import JobResult, JobSpec, utc_now
from fairu.protocol.signing import (
    agent_id_for,
    generate_private_key,
    load_private_key,
    open_unverified,
    public_key_text,
    sign_model,
)
from fairu.protocol.topology import (
    EVENTS_EXCHANGE,
    JOBS_EXCHANGE,
    RESULTS_EXCHANGE,
    job_queue_name,
    job_routing_key,
)

from .agent_jobs import QUICK_COMMAND, sleeping_command, started_line, wait_for

BROKER_URL = os.environ.get("FAIRU_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
# Bind-mount sources must be reachable by the rootless podman user, so test state
# lives under a world-traversable folder instead of pytest's 0700 tmp_path.
WORK_BASE = Path(os.environ.get("FAIRU_TEST_WORK", "/var/tmp/fairu-tests"))
EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "higgsml-demo"


@pytest.fixture(scope="session")
def broker_url() -> str:
    async def probe() -> None:
        session = AmqpSession(BROKER_URL, name="fairu-tests probe")
        await session.open(timeout_s=10)
        await declare_topology(session)
        await session.close()

    try:
        asyncio.run(probe())
    except SessionError as exc:
        pytest.fail(f"{exc}. Start RabbitMQ with scripts/setup-host.sh", pytrace=False)
    return BROKER_URL


@pytest.fixture(scope="session")
def work_root() -> Iterator[Path]:
    root = WORK_BASE / uuid.uuid4().hex[:8]
    root.mkdir(parents=True)
    for folder in (WORK_BASE, root):
        folder.chmod(0o755)
    yield root
    if not os.environ.get("FAIRU_KEEP_TEST_WORK"):
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class SigningKey:
    private: Any
    public_text: str

    def sign(self, job: JobSpec) -> bytes:
        return sign_model(job, self.private)


@pytest.fixture
def signing_key() -> SigningKey:
    key = generate_private_key()
    return SigningKey(key, public_key_text(key.public_key()))


@pytest.fixture
async def amqp(broker_url: str) -> AsyncIterator[AmqpSession]:
    session = AmqpSession(broker_url, name="fairu-tests client")
    await session.open()
    yield session
    await session.close()


@dataclass
class Competition:
    name: str
    queue: str

    @property
    def amqp_queue(self) -> str:
        return job_queue_name(self.name, self.queue)


@pytest.fixture
async def competition(amqp: AmqpSession) -> AsyncIterator[Competition]:
    """A competition with one fresh job queue, deleted after the test."""
    made = Competition(name=f"t-{uuid.uuid4().hex[:8]}", queue="cpu")
    await declare_job_queue(amqp, made.name, made.queue)
    yield made
    if amqp.is_open:
        await amqp.delete_queue(made.amqp_queue)


@dataclass
class ResultWatcher:
    """Collects every result published while a test runs, keyed by job id."""

    session: AmqpSession
    results: dict[str, list[JobResult]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        queue = await self.session.declare_queue(
            "", durable=False, exclusive=True, auto_delete=True
        )
        await self.session.bind(queue, RESULTS_EXCHANGE, "result.#")
        await self.session.consume(queue, self._on_delivery)

    def _on_delivery(self, delivery: Delivery) -> None:
        self.session.ack(delivery.delivery_tag)
        try:
            result = open_unverified(delivery.body, JobResult)
        except RejectedError:
            # Other test runs on the same broker, from other branches, may publish
            # results this branch cannot read; raising here would close the session.
            return
        self.results.setdefault(result.job_id, []).append(result)
        self.arrived.set()

    async def wait(self, job_id: str, timeout_s: float = 120.0) -> JobResult:
        deadline = time.monotonic() + timeout_s
        while job_id not in self.results:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no result for job {job_id} within {timeout_s:.0f} s")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except TimeoutError:
                pass
        return self.results[job_id][0]


@pytest.fixture
async def results(amqp: AmqpSession) -> ResultWatcher:
    watcher = ResultWatcher(amqp)
    await watcher.start()
    return watcher


@pytest.fixture
def publish(amqp: AmqpSession) -> Any:
    """Return a coroutine function that publishes raw bytes to a competition's queue."""

    async def publish_body(competition: Competition, body: bytes) -> None:
        await amqp.publish(
            JOBS_EXCHANGE,
            job_routing_key(competition.name, competition.queue),
            body,
            mandatory=True,
        )

    return publish_body


@pytest.fixture
def make_job() -> Any:
    """Return a function that builds a valid job for a competition, with overrides."""
    return build_job


def build_job(competition: Competition, **fields: Any) -> JobSpec:
    now = utc_now()
    values: dict[str, Any] = {
        "job_id": f"job-{uuid.uuid4().hex[:12]}",
        "competition": competition.name,
        "queue": competition.queue,
        "submission_id": "sub-1",
        "image": "localhost/fairu-python:1",
        "command": ["python3", "-c", "print('hello')"],
        "created_at": now,
        "expires_at": now + timedelta(minutes=30),
    }
    values.update(fields)
    return JobSpec(**values)


@dataclass
class AgentProcess:
    """A `fairu-agent start` subprocess with its own config and state folder."""

    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the agent and wait until it serves. A restart appends to the log."""
        offset = len(self.log())
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fairu.agent.cli", "start", "--config",
                 str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while "serving" not in self.log()[offset:]:
            if self.process.poll() is not None:
                raise AssertionError(f"agent exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"agent did not start within {timeout_s:.0f} s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def state_dir(self) -> Path:
        return self.config_path.parent / "state"

    @property
    def agent_id(self) -> str:
        """The id the agent derives from its identity key and the site name "test"."""
        key = load_private_key(self.state_dir / "identity.key")
        return agent_id_for("test", key.public_key())

    def kill(self) -> None:
        """Kill the agent with SIGKILL, as a crash would, and reap it."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"agent did not stop within {timeout_s:.0f} s:\n{self.log()}")


@pytest.fixture
def start_agent(
    work_root: Path, broker_url: str, signing_key: SigningKey, podman_socket: str
) -> Iterator[Any]:
    """Return a function that starts an agent serving one competition's queue.

    `broker_url` replaces the test broker URL, for example with a site's credentials.
    """
    agents: list[AgentProcess] = []
    default_broker_url = broker_url

    def start(
        competition: Competition,
        *,
        runner: str = "podman",
        slots: int = 1,
        stop_grace_s: float = 10,
        heartbeat_interval_s: float = 2,
        lease_ttl_s: float = 12,
        claim_after_s: float | None = None,
        trust: str | None = None,
        agent_extra: str = "",
        extra: str = "",
        broker_url: str | None = None,
    ) -> AgentProcess:
        """Start an agent; `trust` replaces the [trust] body, `extra` adds sections.

        The lease TTL is short, so that a killed agent's job is queued again soon.
        `claim_after_s` None keeps the agent's default.
        """
        folder = work_root / f"agent-{uuid.uuid4().hex[:8]}"
        folder.mkdir()
        folder.chmod(0o755)
        config = folder / "site.toml"
        config.write_text(
            f"""
[site]
name = "test"
[broker]
url = "{broker_url or default_broker_url}"
[trust]
{trust if trust is not None else f'signing_keys = ["{signing_key.public_text}"]'}
[agent]
state_dir = "state"
slots = {slots}
heartbeat_interval_s = {heartbeat_interval_s}
lease_ttl_s = {lease_ttl_s}
{"" if claim_after_s is None else f"claim_after_s = {claim_after_s}"}
stop_grace_s = {stop_grace_s}
{agent_extra}
[[queues]]
competition = "{competition.name}"
name = "{competition.queue}"
[runner]
kind = "{runner}"
[runner.podman]
socket = "{podman_socket}"
{extra}
"""
        )
        agent = AgentProcess(config, folder / "agent.log")
        agents.append(agent)
        agent.start()
        return agent

    yield start
    for agent in agents:
        agent.stop()


async def serve_app(app: web.Application) -> tuple[web.AppRunner, int]:
    """Serve `app` on a free port of 127.0.0.1 and return its runner and the port.

    The caller stops the server with `runner.cleanup()`.
    """
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


@pytest.fixture
async def artifact_server(work_root: Path) -> AsyncIterator["ArtifactServer"]:
    from fairu.broker.artifacts import make_app

    folder = work_root / f"artifacts-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    runner, port = await serve_app(make_app(folder))
    yield ArtifactServer(folder, f"http://127.0.0.1:{port}")
    await runner.cleanup()


@dataclass
class ArtifactServer:
    root: Path
    base_url: str

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"


async def _serve_coordinator(url: str, database: Path) -> AsyncIterator[Any]:
    from fairu.broker.coordinator import Coordinator
    from fairu.broker.store import Store

    store = Store(database)
    service = Coordinator(url, store)
    task = asyncio.create_task(service.run())
    yield service
    service.stopping.set()
    await asyncio.wait_for(task, 60)
    store.close()


@pytest.fixture
async def coordinator(broker_url: str, tmp_path: Path) -> AsyncIterator[Any]:
    """A coordinator serving in this test's event loop, with its own SQLite file."""
    async for service in _serve_coordinator(broker_url, tmp_path / "coordinator.sqlite"):
        yield service


# --- a private broker node, for tests that stop, restart or reconfigure the broker ---


def _load_broker_node() -> Any:
    # With --import-mode=importlib, test folders are not on sys.path, so the helper
    # module is loaded from its file; bench/ loads it the same way.
    path = Path(__file__).with_name("broker_node.py")
    spec = importlib.util.spec_from_file_location("fairu_tests_broker_node", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


broker_node = _load_broker_node()


@pytest.fixture
async def private_broker(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A private RabbitMQ node with the fairu topology, stopped and deleted afterwards.

    The node is a `broker_node.BrokerNode`: `url`, `stop()`, `start()`, `restart()`,
    `close_connections(name_substring)`, `queue_counts(queue)`. Its methods block, so
    async tests call them through `asyncio.to_thread`. Parametrize the fixture
    indirectly with a list of rabbitmq.conf lines to configure the node, for example
    `["consumer_timeout = 5000"]`.
    """
    config = list(getattr(request, "param", []))
    # pika logs every refused reconnect of an in-process client as an error with a
    # traceback, which would bury the report of a failing test.
    pika_logger = logging.getLogger("pika")
    pika_level = pika_logger.level
    pika_logger.setLevel(logging.CRITICAL)
    node = broker_node.BrokerNode(config=config)
    try:
        await asyncio.to_thread(node.start)
        session = AmqpSession(node.url, name="fairu-tests topology")
        await session.open()
        await declare_topology(session)
        await session.close()
        yield node
    finally:
        await asyncio.to_thread(node.destroy)
        pika_logger.setLevel(pika_level)


@pytest.fixture
async def private_competition(private_broker: Any) -> Competition:
    """A competition with one job queue on the private node."""
    made = Competition(name=f"t-{uuid.uuid4().hex[:8]}", queue="cpu")
    session = AmqpSession(private_broker.url, name="fairu-tests declare")
    await session.open()
    await declare_job_queue(session, made.name, made.queue)
    await session.close()
    return made


@pytest.fixture
def private_publish(private_broker: Any) -> Any:
    """Return a coroutine function that publishes a job to the private node.

    Each call opens its own session, so publishing works again after a restart.
    """

    async def publish_body(competition: Competition, body: bytes) -> None:
        session = AmqpSession(private_broker.url, name="fairu-tests publisher")
        await session.open()
        try:
            await session.publish(
                JOBS_EXCHANGE,
                job_routing_key(competition.name, competition.queue),
                body,
                mandatory=True,
            )
        finally:
            await session.close()

    return publish_body


@pytest.fixture
async def private_coordinator(
    private_broker: Any, tmp_path: Path
) -> AsyncIterator[Any]:
    """A coordinator on the private node, run in this event loop with its own store."""
    async for service in _serve_coordinator(private_broker.url, tmp_path / "coordinator.sqlite"):
        yield service


@pytest.fixture
def start_private_agent(
    private_broker: Any, private_coordinator: Any, start_agent: Any
) -> Any:
    """Return a function that starts an agent on the private node, approved by the
    private coordinator through a fresh enrollment token."""

    def start(competition: Competition, **options: Any) -> AgentProcess:
        token = private_coordinator.store.add_enrollment_token("test")
        extra = options.pop("agent_extra", "")
        return start_agent(
            competition,
            broker_url=private_broker.url,
            agent_extra=f'enrollment_token = "{token}"\n{extra}',
            **options,
        )

    return start


@dataclass
class PrivateSite:
    """The private node with its coordinator, one competition and the job signer.

    Its methods are the steps that the fault and lease tests share: start an agent,
    publish a signed job, wait for the container to start and for the final result.
    """

    broker: Any
    coordinator: Any
    competition: Competition
    signing_key: SigningKey
    agent_starter: Any
    node_publisher: Any

    async def start_agent(self, **options: Any) -> AgentProcess:
        """Start an approved agent that serves the competition's queue.

        The lease and fault tests are about claimed jobs, so these agents claim each
        job before it starts unless the test passes another `claim_after_s`.
        """
        options.setdefault("claim_after_s", 0)
        return await asyncio.to_thread(self.agent_starter, self.competition, **options)

    def job(self, **fields: Any) -> JobSpec:
        return build_job(self.competition, **fields)

    async def publish(self, job: JobSpec) -> bytes:
        """Sign the job, publish it to the competition's queue and return the body."""
        body = self.signing_key.sign(job)
        await self.publish_body(body)
        return body

    async def publish_body(self, body: bytes) -> None:
        await self.node_publisher(self.competition, body)

    async def wait_until_started(
        self, agent: AgentProcess, job: JobSpec, what: str
    ) -> None:
        await wait_for(lambda: started_line(job.job_id) in agent.log(), 120, what)

    async def start_sleeping_job(
        self, agent: AgentProcess, seconds: float, what: str
    ) -> JobSpec:
        """Publish a job that sleeps `seconds` and wait until `agent` starts it."""
        job = self.job(command=sleeping_command(seconds))
        await self.publish(job)
        await self.wait_until_started(agent, job, what)
        return job

    async def recorded_once(
        self, job_id: str, timeout_s: float = 120.0, coordinator: Any = None
    ) -> StoredResult:
        """Wait for the job's final result in the coordinator and for its message's ack.

        The results table keys on the job id, so a second final result can only show
        up in the audit table. Callers check `audit_count` for that. `coordinator`
        replaces the site's own, for example after a restart.
        """
        coordinator = coordinator or self.coordinator
        queue = self.competition.amqp_queue
        stored = await wait_for(
            lambda: coordinator.store.result(job_id),
            timeout_s,
            f"a recorded result of {job_id}",
        )
        await wait_for(
            lambda: self.broker.queue_counts(queue) == (0, 0),
            30,
            f"queue {queue} to be empty with nothing unacked",
        )
        return stored

    async def recorded_success(
        self, job_id: str, timeout_s: float = 120.0, coordinator: Any = None
    ) -> StoredResult:
        """Wait as `recorded_once` does, then check that the job succeeded once."""
        coordinator = coordinator or self.coordinator
        stored = await self.recorded_once(job_id, timeout_s, coordinator)
        assert stored.status == "succeeded"
        assert coordinator.store.audit_count(job_id) == 0
        return stored

    async def serves_normal_job(self) -> StoredResult:
        """Run a quick job to show that the node's agents still serve."""
        job = self.job(command=QUICK_COMMAND)
        await self.publish(job)
        # The null runner writes empty scores, so only the status is common to both.
        return await self.recorded_success(job.job_id)


@pytest.fixture
def private_site(
    private_broker: Any,
    private_coordinator: Any,
    private_competition: Competition,
    signing_key: SigningKey,
    start_private_agent: Any,
    private_publish: Any,
) -> PrivateSite:
    return PrivateSite(
        broker=private_broker,
        coordinator=private_coordinator,
        competition=private_competition,
        signing_key=signing_key,
        agent_starter=start_private_agent,
        node_publisher=private_publish,
    )


@pytest.fixture
async def coordinator_queues(amqp: AmqpSession) -> AsyncIterator[Any]:
    """Private copies of the coordinator's records and heartbeat queues.

    A coordinator reading them takes no result meant for another test run on the
    same broker, and reads no dead letters.
    """
    from fairu.broker.coordinator import CoordinatorQueues

    marker = uuid.uuid4().hex[:8]
    made = CoordinatorQueues(
        records=f"fairu-tests.records-{marker}",
        heartbeats=f"fairu-tests.heartbeats-{marker}",
        dead_letters=None,
    )
    expiring = {"x-expires": 15 * 60 * 1000}
    for name in (made.records, made.heartbeats):
        await amqp.declare_queue(name, durable=False, arguments=expiring)
    await amqp.bind(made.records, RESULTS_EXCHANGE, "result.#")
    await amqp.bind(made.records, EVENTS_EXCHANGE, "agent.registration.#")
    await amqp.bind(made.records, EVENTS_EXCHANGE, "agent.lease.#")
    await amqp.bind(made.heartbeats, EVENTS_EXCHANGE, "agent.heartbeat.#")
    yield made
    if amqp.is_open:
        for name in (made.records, made.heartbeats):
            await amqp.delete_queue(name)
