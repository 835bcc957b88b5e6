"""Run the fairu coordinator on the benchmark's own queues.

The coordinator is the installed `fairu.broker.coordinator.Coordinator`, unchanged,
except that it reads registrations and heartbeats from the queues named on the command
line instead of the shared fairu.coordinator.* queues, which other users of the
broker read. It reads no dead letters. Usage:

    fairu_coordinator.py DATABASE URL RECORDS_QUEUE HEARTBEATS_QUEUE
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from fairu.broker.coordinator import Coordinator, CoordinatorQueues
from fairu.broker.store import Store
from fairu.logs import configure_logging


async def serve(database: Path, url: str, records: str, heartbeats: str) -> None:
    store = Store(database)
    coordinator = Coordinator(
        url, store, queues=CoordinatorQueues(records, heartbeats, dead_letters=None)
    )
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, coordinator.stopping.set)
    try:
        await coordinator.run()
    finally:
        store.close()


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__.rsplit("Usage:", 1)[1].strip())
    configure_logging("INFO")
    asyncio.run(serve(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]))
