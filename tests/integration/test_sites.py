"""Site credentials from `fairu-admin sites` against the real broker and management API.

Every site and user a test makes has a unique name and is deleted afterwards, even
when the test fails, because the broker is shared with other test runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import sys
import tomllib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from aiohttp import web

from fairu.agent.session import AmqpSession, Delivery, SessionError
from fairu.broker.management import ManagementClient, ManagementError
from fairu.broker.sites import WRITE_PATTERN, site_user
from fairu.broker.topology import declare_job_queue
from fairu.protocol.models import FinalStatus
from fairu.protocol.topology import (
    EVENTS_EXCHANGE,
    JOBS_EXCHANGE,
    RESULTS_EXCHANGE,
    job_queue_arguments,
    job_queue_name,
    job_routing_key,
)

from .conftest import serve_app

pytestmark = pytest.mark.broker

MGMT_URL = os.environ.get("FAIRU_TEST_MGMT_URL", "http://127.0.0.1:15672")
MGMT_USER = os.environ.get("FAIRU_TEST_MGMT_USER", "guest")
MGMT_PASSWORD = os.environ.get("FAIRU_TEST_MGMT_PASSWORD", "guest")
# A site name that no test creates, for commands that must fail before creating it.
UNUSED_SITE = f"t-unused-{uuid.uuid4().hex[:8]}"


@dataclass
class AdminRun:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class SiteCredentials:
    name: str
    url: str
    queues: list[str]


@pytest.fixture
def podman_socket() -> str:
    # Every agent in this module uses the null runner, which never opens the socket.
    return "unix:///nonexistent/podman.sock"


@pytest.fixture
async def management() -> AsyncIterator[ManagementClient]:
    async with ManagementClient(MGMT_URL, MGMT_USER, MGMT_PASSWORD) as client:
        yield client


@pytest.fixture
async def new_site(management: ManagementClient) -> AsyncIterator[Callable[[], str]]:
    """Return a function that makes a unique site name, whose user is deleted after the test."""
    names: list[str] = []

    def make() -> str:
        name = f"t-{uuid.uuid4().hex[:8]}"
        names.append(name)
        return name

    yield make
    for name in names:
        await management.delete_user(site_user(name))


@pytest.fixture
async def other_competition(amqp: AmqpSession, competition):
    """A second competition's job queue, the one "another site" serves."""
    other = dataclasses.replace(competition, name=f"t-{uuid.uuid4().hex[:8]}")
    await declare_job_queue(amqp, other.name, other.queue)
    yield other
    if amqp.is_open:
        await amqp.delete_queue(other.amqp_queue)


@pytest.fixture
def add_site(broker_url: str):
    """Return a coroutine function that runs `sites add` and returns the credentials."""

    async def add(
        name: str, *competitions, extra: tuple[str, ...] = ()
    ) -> SiteCredentials:
        queues = ",".join(f"{c.name}.{c.queue}" for c in competitions)
        args = ["sites", "add", name, *(["--queues", queues] if queues else []), *extra]
        run = await fairu_admin(broker_url, *args)
        assert run.returncode == 0, run.stderr
        return parse_snippet(name, run.stdout)

    return add


async def fairu_admin(broker_url: str, *args: str, **env: str) -> AdminRun:
    """Run fairu-admin in a subprocess with the test's management API settings."""
    environment = {
        **os.environ,
        "FAIRU_MGMT_URL": MGMT_URL,
        "FAIRU_MGMT_USER": MGMT_USER,
        "FAIRU_MGMT_PASSWORD": MGMT_PASSWORD,
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fairu.broker.admin",
        "--broker",
        broker_url,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return AdminRun(process.returncode, stdout.decode(), stderr.decode())


def parse_snippet(name: str, stdout: str) -> SiteCredentials:
    snippet = tomllib.loads(stdout)
    queues = [
        job_queue_name(q["competition"], q["name"]) for q in snippet.get("queues", [])
    ]
    return SiteCredentials(name, snippet["broker"]["url"], queues)


@contextlib.asynccontextmanager
async def site_session(url: str) -> AsyncIterator[AmqpSession]:
    session = AmqpSession(url, name="fairu-tests site")
    await session.open()
    try:
        yield session
    finally:
        await session.close()


async def next_delivery(
    queue: asyncio.Queue[Delivery], timeout_s: float = 10.0
) -> Delivery:
    return await asyncio.wait_for(queue.get(), timeout_s)


async def channel_call(session: AmqpSession, method: str, **arguments: Any) -> Any:
    """Call a pika channel method that AmqpSession does not wrap, and await its reply.

    Raise SessionError with the broker's reason when the channel closes instead.
    """
    reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    getattr(session.channel, method)(
        callback=lambda *frames: reply.set_result(frames), **arguments
    )
    assert session.closed is not None
    await asyncio.wait(
        {reply, session.closed}, timeout=10, return_when=asyncio.FIRST_COMPLETED
    )
    if reply.done():
        return reply.result()
    if session.closed.done():
        raise SessionError(session.closed.result())
    raise AssertionError(f"no reply to {method} within 10 s (or an empty basic.get)")


async def wait_closed(session: AmqpSession, timeout_s: float = 20.0) -> str:
    assert session.closed is not None
    return await asyncio.wait_for(asyncio.shield(session.closed), timeout_s)


# --- what a site can do ------------------------------------------------------------


async def test_site_consumes_own_queue(amqp, competition, new_site, add_site, publish):
    site = await add_site(new_site(), competition)
    assert site.queues == [competition.amqp_queue]

    async with site_session(site.url) as session:
        assert await session.queue_exists(competition.amqp_queue)
        await session.set_prefetch(2)
        received: asyncio.Queue[Delivery] = asyncio.Queue()
        await session.consume(competition.amqp_queue, received.put_nowait)
        await publish(competition, b"job body")
        delivery = await next_delivery(received)
        assert delivery.body == b"job body"
        assert session.ack(delivery.delivery_tag)
        await asyncio.sleep(0.2)
        assert session.is_open

    # The ack removed the message: a fresh consumer on the admin session gets nothing.
    leftovers: asyncio.Queue[Delivery] = asyncio.Queue()
    tag = await amqp.consume(competition.amqp_queue, leftovers.put_nowait)
    await asyncio.sleep(0.5)
    await amqp.cancel(tag)
    assert leftovers.empty()


async def test_site_publishes_events_and_results(amqp, competition, new_site, add_site):
    site = await add_site(new_site(), competition)
    # No platform queue is bound to these routing keys, so nothing reaches the shared
    # coordinator queues. Only this test's own queue receives the two messages.
    marker = uuid.uuid4().hex[:12]
    watch = await amqp.declare_queue(
        "", durable=False, exclusive=True, auto_delete=True
    )
    await amqp.bind(watch, EVENTS_EXCHANGE, f"status.sites-test-{marker}")
    await amqp.bind(watch, RESULTS_EXCHANGE, f"sites-test.{marker}")
    received: asyncio.Queue[Delivery] = asyncio.Queue()
    await amqp.consume(watch, received.put_nowait)

    async with site_session(site.url) as session:
        # AmqpSession.publish waits for the publisher confirm and uses mandatory=False.
        await session.publish(
            EVENTS_EXCHANGE, f"status.sites-test-{marker}", b"event", persistent=False
        )
        await session.publish(RESULTS_EXCHANGE, f"sites-test.{marker}", b"result")
        assert session.is_open

    first = await next_delivery(received)
    second = await next_delivery(received)
    assert {(first.exchange, first.body), (second.exchange, second.body)} == {
        (EVENTS_EXCHANGE, b"event"),
        (RESULTS_EXCHANGE, b"result"),
    }


async def test_nack_dead_letters_without_permission(
    amqp, competition, new_site, add_site
):
    # A job queue whose dead-letter exchange is this test's own, so that nothing
    # reaches the shared fairu.dead queue.
    marker = uuid.uuid4().hex[:8]
    dead_letters_exchange = f"fairu-tests.dlx-{marker}"
    dead_letters = f"fairu-tests.dead-{marker}"
    rejecting = dataclasses.replace(competition, queue="dlx")
    arguments = {
        **job_queue_arguments(),
        "x-dead-letter-exchange": dead_letters_exchange,
    }
    await amqp.declare_exchange(dead_letters_exchange, "fanout", durable=False)
    await amqp.declare_queue(dead_letters, durable=False, exclusive=True)
    await amqp.bind(dead_letters, dead_letters_exchange, "")
    await amqp.declare_queue(rejecting.amqp_queue, arguments=arguments)
    try:
        site = await add_site(new_site(), rejecting)
        await amqp.publish("", rejecting.amqp_queue, b"bad job")
        async with site_session(site.url) as session:
            received: asyncio.Queue[Delivery] = asyncio.Queue()
            await session.consume(rejecting.amqp_queue, received.put_nowait)
            delivery = await next_delivery(received)
            assert session.nack(delivery.delivery_tag, requeue=False)
            await asyncio.sleep(0.2)
            assert session.is_open

        dead: asyncio.Queue[Delivery] = asyncio.Queue()
        await amqp.consume(dead_letters, dead.put_nowait)
        dead_lettered = await next_delivery(dead)
        assert dead_lettered.body == b"bad job"
    finally:
        await amqp.delete_queue(rejecting.amqp_queue)
        done = asyncio.get_running_loop().create_future()
        amqp.channel.exchange_delete(
            exchange=dead_letters_exchange, callback=done.set_result
        )
        await done


async def test_known_limits_of_read_access(
    amqp, competition, other_competition, new_site, add_site
):
    """Pin two things RabbitMQ 3.10 permits that docs/sites.md warns about."""
    site = await add_site(new_site(), competition)
    async with site_session(site.url) as session:
        # A passive declare needs no permission, so a site learns that another
        # competition's queue exists, though it cannot read it.
        assert await session.queue_exists(other_competition.amqp_queue)
        # queue.purge needs only read permission, so a site can empty its own queue.
        (frame,) = await channel_call(
            session, "queue_purge", queue=competition.amqp_queue
        )
        assert frame.method.message_count == 0


# --- what a site cannot do ---------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    own: str  # the site's job queue
    own_routing_key: str
    other: str  # another site's job queue
    other_routing_key: str
    marker: str  # makes the names of anything a wrongly allowed declare creates unique


DENIED_OPERATIONS: dict[str, Callable[[AmqpSession, Targets], Awaitable[object]]] = {
    "consume another site's queue": lambda s, t: s.consume(t.other, lambda _d: None),
    "publish to the jobs exchange": lambda s, t: s.publish(
        JOBS_EXCHANGE, t.other_routing_key, b"{}"
    ),
    "get from another site's queue": lambda s, t: channel_call(
        s, "basic_get", queue=t.other, auto_ack=False
    ),
    "publish to the default exchange": lambda s, t: s.publish("", t.own, b"{}"),
    "publish to amq.topic": lambda s, t: s.publish("amq.topic", "x", b"{}"),
    "declare a named queue": lambda s, t: s.declare_queue(f"fairu-tests.q-{t.marker}"),
    "declare a server-named queue": lambda s, t: s.declare_queue(
        "", durable=False, exclusive=True, auto_delete=True
    ),
    "redeclare its own queue": lambda s, t: s.declare_queue(
        t.own, arguments=job_queue_arguments()
    ),
    "declare an exchange": lambda s, t: s.declare_exchange(
        f"fairu-tests.x-{t.marker}", "fanout", durable=False
    ),
    "redeclare the events exchange": lambda s, t: s.declare_exchange(
        EVENTS_EXCHANGE, "topic"
    ),
    "bind its queue to the results exchange": lambda s, t: s.bind(
        t.own, RESULTS_EXCHANGE, "#"
    ),
    "bind its queue to the jobs exchange": lambda s, t: s.bind(
        t.own, JOBS_EXCHANGE, "x.y"
    ),
    "unbind its queue from the jobs exchange": lambda s, t: channel_call(
        s,
        "queue_unbind",
        queue=t.own,
        exchange=JOBS_EXCHANGE,
        routing_key=t.own_routing_key,
    ),
    "delete its queue": lambda s, t: s.delete_queue(t.own),
}


@pytest.mark.parametrize("operation", list(DENIED_OPERATIONS))
async def test_site_operation_refused(
    operation, amqp, competition, other_competition, new_site, add_site
):
    site = await add_site(new_site(), competition)
    targets = Targets(
        own=competition.amqp_queue,
        own_routing_key=job_routing_key(competition.name, competition.queue),
        other=other_competition.amqp_queue,
        other_routing_key=job_routing_key(
            other_competition.name, other_competition.queue
        ),
        marker=uuid.uuid4().hex[:8],
    )
    try:
        async with site_session(site.url) as session:
            with pytest.raises(SessionError, match="ACCESS_REFUSED"):
                await DENIED_OPERATIONS[operation](session, targets)
    finally:
        # If the broker wrongly allowed a declare, remove what it made.
        await amqp.delete_queue(f"fairu-tests.q-{targets.marker}")
    assert await amqp.queue_exists(competition.amqp_queue)


async def test_site_user_cannot_use_management_api(competition, new_site, add_site):
    site = await add_site(new_site(), competition)
    parts = urlsplit(site.url)
    assert parts.username is not None
    assert parts.password is not None
    user, password = unquote(parts.username), unquote(parts.password)
    async with ManagementClient(MGMT_URL, user, password) as client:
        with pytest.raises(ManagementError) as raised:
            await client.list_users()
    assert raised.value.status == 401
    assert "Not management user" in str(raised.value)


async def test_site_permissions_are_exact(management, competition, new_site, add_site):
    site = await add_site(new_site(), competition)
    permissions = await management.get_permissions("/", site_user(site.name))
    assert permissions is not None
    assert permissions.configure == "^$"
    assert permissions.write == WRITE_PATTERN == r"^(fairu\.events|fairu\.results)$"
    escaped_queue = competition.amqp_queue.replace(".", "\\.").replace("-", "\\-")
    assert permissions.read == f"^({escaped_queue}|fairu\\.trust\\.log)$"
    user = await management.get_user(site_user(site.name))
    assert user is not None
    assert user.tags == ()


# --- changing a site ---------------------------------------------------------------


async def test_assign_and_unassign_change_reads(
    broker_url, competition, other_competition, new_site, add_site
):
    site = await add_site(new_site(), competition)
    other = other_competition
    assign = ["--competition", other.name, "--site", site.name]

    async with site_session(site.url) as session:
        with pytest.raises(SessionError, match="ACCESS_REFUSED"):
            await session.consume(other.amqp_queue, lambda _d: None)

    run = await fairu_admin(broker_url, "queues", "assign", other.queue, *assign)
    assert run.returncode == 0, run.stderr
    listing = await fairu_admin(broker_url, "sites", "list")
    assert _listed_queues(site.name, listing.stdout) == {
        f"{competition.name}.cpu",
        f"{other.name}.cpu",
    }

    async with site_session(site.url) as session:
        await session.consume(other.amqp_queue, lambda _d: None)

        # A consumer that is already running is not checked again by RabbitMQ, so
        # unassign must close the site's connections.
        run = await fairu_admin(broker_url, "queues", "unassign", other.queue, *assign)
        assert run.returncode == 0, run.stderr
        assert f"connections of {site_user(site.name)}" in run.stdout
        reason = await wait_closed(session)
        assert "CONNECTION_FORCED" in reason

    async with site_session(site.url) as session:
        with pytest.raises(SessionError, match="ACCESS_REFUSED"):
            await session.consume(other.amqp_queue, lambda _d: None)
    async with site_session(site.url) as session:
        await session.consume(competition.amqp_queue, lambda _d: None)

    listing = await fairu_admin(broker_url, "sites", "list")
    assert _listed_queues(site.name, listing.stdout) == {f"{competition.name}.cpu"}


async def test_assign_twice_changes_nothing(
    broker_url, competition, new_site, add_site
):
    site = await add_site(new_site(), competition)
    run = await fairu_admin(
        broker_url,
        "queues",
        "assign",
        competition.queue,
        "--competition",
        competition.name,
        "--site",
        site.name,
    )
    assert run.returncode == 0, run.stderr
    assert "nothing changed" in run.stdout


async def test_remove_deletes_user(
    broker_url, management, competition, new_site, add_site
):
    site = await add_site(new_site(), competition)
    async with site_session(site.url) as session:
        run = await fairu_admin(broker_url, "sites", "remove", site.name)
        assert run.returncode == 0, run.stderr
        assert "CONNECTION_FORCED" in await wait_closed(session)

    assert await management.get_user(site_user(site.name)) is None
    with pytest.raises(SessionError, match="rejected the credentials"):
        async with site_session(site.url):
            pass
    listing = await fairu_admin(broker_url, "sites", "list")
    assert site.name not in listing.stdout


async def test_add_existing_site_needs_rotate(
    broker_url, competition, new_site, add_site
):
    site = await add_site(new_site(), competition)

    again = await fairu_admin(
        broker_url, "sites", "add", site.name, "--queues", f"{competition.name}.cpu"
    )
    assert again.returncode == 2
    assert "already exists" in again.stderr
    assert "--rotate-password" in again.stderr

    async with site_session(site.url) as old_session:
        # Without --queues, rotation keeps the site's queues.
        rotated = await add_site(site.name, extra=("--rotate-password",))
        assert rotated.url != site.url
        assert rotated.queues == site.queues
        assert "CONNECTION_FORCED" in await wait_closed(old_session)

    with pytest.raises(SessionError, match="rejected the credentials"):
        async with site_session(site.url):
            pass
    async with site_session(rotated.url) as session:
        await session.consume(competition.amqp_queue, lambda _d: None)


# --- bad input and a broken management API -----------------------------------------


async def test_unknown_queue_fails_with_fix(
    broker_url, management, competition, new_site
):
    name = new_site()
    run = await fairu_admin(
        broker_url,
        "sites",
        "add",
        name,
        "--queues",
        f"{competition.name}.cpu,{competition.name}.nope",
    )
    assert run.returncode == 2
    assert (
        f"queue {job_queue_name(competition.name, 'nope')} does not exist" in run.stderr
    )
    assert (
        f"fairu-admin queues create nope --competition {competition.name}" in run.stderr
    )
    assert "Traceback" not in run.stderr
    assert run.stdout == ""
    assert await management.get_user(site_user(name)) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["sites", "add", "Bad Name", "--queues", "c.q"],
            "invalid site name 'Bad Name'",
        ),
        (
            ["sites", "add", UNUSED_SITE, "--queues", "nodot"],
            "invalid entry 'nodot' in --queues",
        ),
        (
            ["sites", "add", UNUSED_SITE, "--queues", "C.q"],
            "invalid competition name 'C'",
        ),
        (["sites", "add", UNUSED_SITE], "--queues is required"),
        (
            [
                "sites",
                "add",
                UNUSED_SITE,
                "--queues",
                "c.q",
                "--vhost",
                "no-such-vhost",
            ],
            "virtual host 'no-such-vhost' does not exist",
        ),
        (["sites", "remove", UNUSED_SITE], f"site {UNUSED_SITE} does not exist"),
        (["sites", "add", UNUSED_SITE, "--rotate-password"], "no password to rotate"),
        (
            ["queues", "assign", "cpu", "--competition", "c", "--site", UNUSED_SITE],
            f"site {UNUSED_SITE} does not exist",
        ),
        (
            ["sites", "list", "--mgmt-url", "127.0.0.1:15672"],
            "invalid management API URL",
        ),
    ],
)
async def test_bad_input_exits_2(broker_url, args, message):
    run = await fairu_admin(broker_url, *args)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr
    assert "Traceback" not in run.stderr


async def test_unassign_unassigned_queue_exits_2(
    broker_url, competition, other_competition, new_site, add_site
):
    site = await add_site(new_site(), competition)
    run = await fairu_admin(
        broker_url,
        "queues",
        "unassign",
        other_competition.queue,
        "--competition",
        other_competition.name,
        "--site",
        site.name,
    )
    assert run.returncode == 2
    assert f"its queues are: {competition.name}.cpu" in run.stderr
    assert "Traceback" not in run.stderr


async def test_management_api_down_exits_1(broker_url):
    # A bound socket that never listens refuses connections, and no other
    # process can take its port while the test runs.
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{placeholder.getsockname()[1]}"
        run = await fairu_admin(broker_url, "sites", "list", FAIRU_MGMT_URL=url)
    assert run.returncode == 1
    assert f"cannot connect to the RabbitMQ management API at {url}" in run.stderr
    assert "rabbitmq-plugins enable rabbitmq_management" in run.stderr
    assert "Traceback" not in run.stderr


async def test_other_http_server_exits_1(broker_url):
    async def not_found(_request: web.Request) -> web.Response:
        return web.Response(
            status=404, text="<html>not here</html>", content_type="text/html"
        )

    app = web.Application()
    app.router.add_get("/{tail:.*}", not_found)
    runner, port = await serve_app(app)
    try:
        run = await fairu_admin(
            broker_url, "sites", "list", FAIRU_MGMT_URL=f"http://127.0.0.1:{port}"
        )
    finally:
        await runner.cleanup()
    assert run.returncode == 1
    assert "the body is not JSON" in run.stderr
    assert "<html>" not in run.stderr
    assert "Traceback" not in run.stderr


async def test_wrong_admin_password_exits_1(broker_url, competition):
    password = f"wrong-{uuid.uuid4().hex[:8]}"
    run = await fairu_admin(
        broker_url,
        "sites",
        "add",
        UNUSED_SITE,
        "--queues",
        f"{competition.name}.cpu",
        FAIRU_MGMT_PASSWORD=password,
    )
    assert run.returncode == 1
    assert f"rejected the admin credentials of user {MGMT_USER!r}" in run.stderr
    assert password not in run.stderr + run.stdout
    assert "Traceback" not in run.stderr


async def test_non_admin_management_user_exits_1(broker_url, management):
    user = f"fairu-tests-monitor-{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    await management.put_user(user, password, ("management",))
    try:
        run = await fairu_admin(
            broker_url,
            "sites",
            "list",
            FAIRU_MGMT_USER=user,
            FAIRU_MGMT_PASSWORD=password,
        )
    finally:
        await management.delete_user(user)
    assert run.returncode == 1
    assert "does not have the administrator tag" in run.stderr
    assert "Traceback" not in run.stderr


# --- a real agent ------------------------------------------------------------------


async def test_agent_runs_job_with_site_credentials(
    broker_url,
    competition,
    new_site,
    add_site,
    start_agent,
    signing_key,
    publish,
    results,
    make_job,
):
    site = await add_site(new_site(), competition)
    agent = await asyncio.to_thread(
        start_agent, competition, runner="null", broker_url=site.url
    )

    job = make_job(competition)
    await publish(competition, signing_key.sign(job))
    result = await results.wait(job.job_id, timeout_s=60)
    assert result.status is FinalStatus.SUCCEEDED, result

    # After a rotation the agent's connection is closed, its reconnect with the
    # old password is rejected, and it stops instead of retrying.
    rotation = await fairu_admin(
        broker_url, "sites", "add", site.name, "--rotate-password"
    )
    assert rotation.returncode == 0, rotation.stderr
    assert agent.process is not None
    assert await asyncio.to_thread(agent.process.wait, 60) == 1
    log = agent.log()
    assert "rejected the credentials" in log
    assert "ACCESS_REFUSED" not in log
    assert "site-" + site.name in log  # the redacted URL names the site's user


def _listed_queues(site: str, listing: str) -> set[str]:
    """Return the queues that `sites list` shows for one site."""
    lines = [line for line in listing.splitlines() if line.split()[:1] == [site]]
    assert len(lines) == 1, listing
    return set(lines[0].split(None, 1)[1].split(", "))
