"""Job commands, polling, status watching and podman checks shared by agent tests."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import podman

from fairu.agent.session import AmqpSession, Delivery
from fairu.protocol.models import StatusEvent
from fairu.protocol.signing import open_unverified
from fairu.protocol.topology import EVENTS_EXCHANGE

T = TypeVar("T")

QUICK_COMMAND = [
    "python3",
    "-c",
    "open('/output/scores.json', 'w').write('{\"ok\": 1}')",
]


def unconfirmed_results(state_dir: Path) -> list[str]:
    """Return the job ids whose recorded result waits for the broker's confirm.

    A finished job's row in jobs.sqlite is its result's spool until the confirm.
    """
    database = sqlite3.connect(f"file:{state_dir / 'jobs.sqlite'}?mode=ro", uri=True)
    try:
        rows = database.execute("SELECT job_id FROM jobs WHERE unconfirmed = 1").fetchall()
    finally:
        database.close()
    return [row[0] for row in rows]


def sleeping_command(seconds: float) -> list[str]:
    """Return a job command that sleeps, then writes a one-score scores.json."""
    return [
        "python3",
        "-c",
        (
            f"import time; time.sleep({seconds}); "
            "open('/output/scores.json', 'w').write('{\"slept\": 1}')"
        ),
    ]


async def wait_for(predicate: Callable[[], T], timeout_s: float, what: str) -> T:
    """Poll a blocking predicate in a thread until it returns a true value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s:.0f} s waiting for {what}"
            )
        await asyncio.sleep(0.2)


def started_line(job_id: str) -> str:
    return f"job {job_id}: started container"


def agent_containers(socket_url: str, agent_id: str) -> list[str]:
    """Return the status of every container labelled with the agent's id."""
    with podman.PodmanClient(base_url=socket_url, timeout=30) as client:
        containers = client.containers.list(
            all=True, filters={"label": f"fairu.agent_id={agent_id}"}
        )
        statuses = []
        for container in containers:
            # In podman 4.3's list response State is a bare string, which
            # `Container.status` cannot read, so inspect each container.
            container.reload()
            statuses.append(container.status)
        return statuses


def remove_agent_containers(socket_url: str, agent_id: str) -> None:
    with podman.PodmanClient(base_url=socket_url, timeout=60) as client:
        for container in client.containers.list(
            all=True, filters={"label": f"fairu.agent_id={agent_id}"}
        ):
            container.remove(force=True)


async def watch_status(url: str, job_id: str) -> tuple[AmqpSession, list[StatusEvent]]:
    """Collect the status events of one job on a node."""
    session = AmqpSession(url, name="fairu-tests status watcher")
    await session.open()
    events: list[StatusEvent] = []
    queue = await session.declare_queue("", durable=False, exclusive=True, auto_delete=True)
    await session.bind(queue, EVENTS_EXCHANGE, f"status.{job_id}")

    def on_delivery(delivery: Delivery) -> None:
        session.ack(delivery.delivery_tag)
        events.append(open_unverified(delivery.body, StatusEvent))

    await session.consume(queue, on_delivery)
    return session, events
