"""`fairu-agent`: start the site agent from a site config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from fairu.logs import configure_logging
from fairu.protocol.errors import ConfigError

from .config import load_config
from .daemon import Agent, AgentError, build_runner

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fairu-agent", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="connect to the broker and serve jobs")
    start.add_argument("--config", type=Path, required=True, help="site config (TOML)")
    start.add_argument(
        "--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)"
    )
    args = parser.parse_args(argv)
    configure_logging(args.log_level)

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


async def _start(agent: Agent) -> None:
    agent.install_signal_handlers()
    await agent.run()


if __name__ == "__main__":
    sys.exit(main())
