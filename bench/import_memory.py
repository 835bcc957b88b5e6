"""Print the resident memory that each import adds to a fresh Python process.

    .venv/bin/python bench/import_memory.py            # the agent's imports
    .venv/bin/python bench/import_memory.py --podman   # the podman runner's stack
    .venv/bin/python bench/import_memory.py --podman --block charset_normalizer,chardet

The modules are imported in the order given, and VmRSS is read from /proc after each
one, so a row counts what that import adds to the rows before it. MB is 10^6 bytes.
Compile fairu's modules first (`python -m compileall`), as a pip install does, or the
first import of each also compiles it. `--block` sets the named modules to None in
sys.modules before any import, so that importing them fails as if they were missing.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--podman", action="store_true", help="the podman runner's stack")
    parser.add_argument("--block", default="", help="comma-separated modules to hide")
    args = parser.parse_args()

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
