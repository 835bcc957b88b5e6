"""`fairu-agent`: start the site agent from a site config, or show what it offers."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import fcntl
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from fairu.logs import configure_logging, log_level_argument
from fairu.protocol.errors import ConfigError

from .admission import build_offer, cdi_device_name
from .config import ResourcesSection, load_config
from .daemon import Agent, AgentError, build_runner
from .probe import describe_capacity, probe_capacity

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fairu-agent", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="connect to the broker and serve jobs")
    start.add_argument("--config", type=Path, required=True, help="site config (TOML)")
    start.add_argument(
        "--log-level",
        default="INFO",
        type=log_level_argument,
        help="DEBUG, INFO, WARNING or ERROR (default INFO)",
    )
    drain = commands.add_parser(
        "drain",
        help="stop a running agent gracefully: no new jobs, running ones may finish",
    )
    drain.add_argument("--config", type=Path, required=True, help="the agent's site config")
    drain.add_argument(
        "--wait", type=float, default=0, help="seconds to wait for the agent to exit (default 0)"
    )
    probe = commands.add_parser(
        "probe", help="print the CPUs, memory, disk and GPUs the agent would offer"
    )
    probe.add_argument(
        "--config", type=Path, help="site config whose reservations and state_dir apply"
    )
    probe.add_argument("--json", action="store_true", help="print JSON")
    probe.add_argument(
        "--log-level", default="INFO", type=log_level_argument, help="default INFO"
    )
    args = parser.parse_args(argv)
    if args.command == "drain":
        return _drain(args.config, args.wait)
    configure_logging(args.log_level)
    if args.command == "probe":
        return _probe(args.config, args.json)

    try:
        config = load_config(args.config)
        agent = Agent(config, build_runner(config))
        asyncio.run(_start(agent))
    except ConfigError as exc:
        print(f"fairu-agent: error: {exc}", file=sys.stderr)
        return 2
    except AgentError as exc:
        print(f"fairu-agent: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _drain(config_path: Path, wait_s: float) -> int:
    """Send SIGTERM to the agent of this config; it drains as on any SIGTERM."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"fairu-agent: error: {exc}", file=sys.stderr)
        return 2
    pid_file = config.agent.state_dir / "agent.pid"
    pid = _locked_pid(pid_file)
    if pid is None:
        print(f"fairu-agent: no agent is running for {config_path} (nothing holds the "
              f"lock on {pid_file})", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        print(f"fairu-agent: agent process {pid} from {pid_file} is not running", file=sys.stderr)
        return 1
    print(f"asked agent process {pid} to drain: no new jobs; running jobs get "
          f"{config.agent.stop_grace_s:.0f} s to finish")
    if wait_s <= 0:
        return 0
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if _locked_pid(pid_file) is None:
            print("agent stopped")
            return 0
        time.sleep(0.2)
    print(f"fairu-agent: agent process {pid} is still draining after {wait_s:.0f} s",
          file=sys.stderr)
    return 3


def _locked_pid(pid_file: Path) -> int | None:
    """Return the id of the agent holding the state folder's lock, or None.

    A pid file whose lock no process holds is stale, so its number is never signalled.
    """
    try:
        handle = open(pid_file)
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = handle.read().strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


def _probe(config_path: Path | None, as_json: bool) -> int:
    try:
        config = load_config(config_path) if config_path else None
    except ConfigError as exc:
        print(f"fairu-agent: error: {exc}", file=sys.stderr)
        return 2
    scratch = config.agent.state_dir if config else Path.cwd()
    if not scratch.exists():
        scratch = Path.cwd()
    capacity = probe_capacity(scratch)
    resources = config.resources if config else ResourcesSection()
    offer = build_offer(capacity, config.agent.slots if config else 1, resources)
    if as_json:
        print(
            json.dumps(
                {
                    "capacity": dataclasses.asdict(capacity)
                    | {"gpus": [gpu.model_dump(mode="json") for gpu in capacity.gpus]},
                    "offer": offer.amounts().model_dump(mode="json"),
                    "cdi_devices": [
                        cdi_device_name(unit, resources) for unit in offer.units
                    ],
                },
                indent=2,
            )
        )
        return 0
    print(describe_capacity(capacity))
    print(f"offer          {offer.describe()}")
    for unit in offer.units:
        print(f"  {cdi_device_name(unit, resources)}  {unit.name}")
    return 0


async def _start(agent: Agent) -> None:
    agent.install_signal_handlers()
    await agent.run()


if __name__ == "__main__":
    sys.exit(main())
