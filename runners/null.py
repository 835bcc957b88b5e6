"""A runner that starts no container, for control-plane benchmarks only.

It writes an empty scores.json and reports exit code 0, so a job measures the cost
of fairu itself: verify, parse, publish with a confirm, ack.
"""

from __future__ import annotations

import asyncio

from fairu.protocol.models import SandboxInfo

from .base import RunOutcome, RunSpec


class NullRunner:
    name = "null"

    async def check(self) -> None:
        return None

    async def run(self, spec: RunSpec) -> RunOutcome:
        await asyncio.to_thread((spec.output_dir / "scores.json").write_text, "{}")
        return RunOutcome(exit_code=0, timed_out=False, log_tail="", log_truncated=False, run_s=0.0)

    async def describe_sandbox(self) -> SandboxInfo:
        # No job code runs, so there is nothing to confine.
        return SandboxInfo(
            runner=self.name,
            rootless=False,
            memory_limit=False,
            cpu_limit=False,
            pids_limit=False,
            rlimits=False,
            user_namespaces_blocked=False,
        )

    async def remove_labelled(self, agent_id: str) -> int:
        return 0

    async def close(self) -> None:
        return None
