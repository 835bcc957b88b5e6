"""Print the resident memory that each import adds to a fresh Python process.

    .venv/bin/python bench/import_memory.py            # the agent's imports
    .venv/bin/python bench/import_memory.py --podman   # the podman runner's stack
    .venv/bin/python bench/import_memory.py --podman --block charset_normalizer,chardet
    .venv/bin/python bench/import_memory.py --start    # the start of an agent, step by step

The modules are imported in the order given, and VmRSS is read from /proc after each
one, so a row counts what that import adds to the rows before it. MB is 10^6 bytes.
Compile fairu's modules first (`python -m compileall`), as a pip install does, or the
first import of each also compiles it. `--block` sets the named modules to None in
sys.modules before any import, so that importing them fails as if they were missing.

`--start` imports what an agent with the podman runner imports, then takes the steps
of the agent's start in the same order, up to the health endpoint and the broker
session, which it leaves out. It needs the podman API service at `--socket`, and it
makes the agent's state folder in a temporary folder, so the identity key is new, as
at a site's first start.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Rows of (label, modules imported for it), in the order an agent loads them.
AGENT_IMPORTS = [
    ("asyncio (with ssl)", ["asyncio", "ssl"]),
    ("pydantic", ["pydantic"]),
    ("cryptography (Ed25519)", ["cryptography.hazmat.primitives.asymmetric.ed25519"]),
    ("pika", ["pika"]),
    ("psutil, sqlite3", ["psutil", "sqlite3"]),
    ("fairu.protocol.models (fairu's models built)", ["fairu.protocol.models"]),
    ("rest of fairu.agent.cli", ["fairu.agent.cli"]),
    ("aiohttp client", ["aiohttp"]),
    ("aiohttp.web", ["aiohttp.web"]),
    ("podman-py and fairu.runners.podman", ["podman", "fairu.runners.podman"]),
    ("pynvml", ["pynvml"]),
    ("tarfile, zipfile", ["tarfile", "zipfile"]),
]

# The podman runner's stack, after the modules that every agent loads.
PODMAN_IMPORTS = [
    ("fairu.agent.cli (every agent)", ["fairu.agent.cli"]),
    ("charset_normalizer (imported by requests)", ["charset_normalizer"]),
    ("urllib3 (with http.client)", ["urllib3"]),
    ("requests (with idna, certifi, http.cookiejar)", ["requests"]),
    ("podman", ["podman"]),
    ("fairu.runners.podman", ["fairu.runners.podman"]),
]


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("no VmRSS line in /proc/self/status")


SITE_CONFIG = """[site]
name = "bench"
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/%2F"
[trust]
signing_keys = ["{signing_key}"]
[agent]
state_dir = "{state_dir}"
slots = 1
[[queues]]
competition = "bench"
name = "cpu"
[runner]
kind = "podman"
[runner.podman]
socket = "{socket}"
"""


def print_start_steps(socket: str) -> None:
    """Print the RSS that an agent's imports and each step of its start add."""
    before = resident_mb()
    print(f"| step | adds MB |\n|---|---|\n| (interpreter at start: {before:.1f} MB) | |")
    importlib.import_module("fairu.agent.cli")
    importlib.import_module("fairu.runners.podman")
    # Imported after the agent's imports, which load them too, so that the rows above
    # do not count them.
    import asyncio
    import tempfile
    from pathlib import Path

    from fairu.agent.config import load_config
    from fairu.agent.daemon import Agent, build_runner
    from fairu.agent.probe import probe_capacity
    from fairu.protocol.signing import generate_private_key, public_key_text

    def row(label: str) -> None:
        nonlocal before
        now = resident_mb()
        print(f"| {label} | {now - before:.1f} |")
        before = now

    row("imports of fairu.agent.cli and fairu.runners.podman")
    signing_key = public_key_text(generate_private_key().public_key())
    row("a signing key for the config (the first Ed25519 key made)")
    with tempfile.TemporaryDirectory(prefix="fairu-start-") as folder:
        config_path = Path(folder) / "site.toml"
        config_path.write_text(SITE_CONFIG.format(
            signing_key=signing_key, state_dir=Path(folder) / "state", socket=socket,
        ))
        config = load_config(config_path)
        agent = Agent(config, build_runner(config))
        row("site config read, agent and runner built")

        async def start() -> None:
            await asyncio.to_thread(agent.state.prepare)
            row("state folder prepared, jobs.sqlite opened (first worker thread)")
            await asyncio.to_thread(agent.state.load_identity, config.site.name)
            row("identity key made, written and read back")
            await asyncio.to_thread(probe_capacity, config.agent.state_dir)
            row("capacity probed")
            await agent.runner.check()
            await agent.runner.describe_sandbox()
            row("podman service checked, sandbox described")
            await agent.runner.close()
            await asyncio.to_thread(agent.state.close)

        asyncio.run(start())
    print(f"| (total) | {before:.1f} MB |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--podman", action="store_true", help="the podman runner's stack")
    parser.add_argument("--block", default="", help="comma-separated modules to hide")
    parser.add_argument(
        "--start", action="store_true",
        help="print what the agent's imports and each step of its start add instead",
    )
    parser.add_argument(
        "--socket", default="unix:///run/user/1001/podman/podman.sock",
        help="podman API socket URL for --start",
    )
    args = parser.parse_args()
    if args.start:
        print_start_steps(args.socket)
        return 0

    blocked = set(filter(None, args.block.split(",")))
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    rows = PODMAN_IMPORTS if args.podman else AGENT_IMPORTS
    before = resident_mb()
    print(f"| import | adds MB |\n|---|---|\n| (interpreter at start: {before:.1f} MB) | |")
    for label, modules in rows:
        if blocked.intersection(modules):
            print(f"| {label} | blocked |")
            continue
        for module in modules:
            importlib.import_module(module)
        now = resident_mb()
        print(f"| {label} | {now - before:.1f} |")
        before = now
    print(f"| (total) | {before:.1f} MB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
