"""A runner that starts no container, for control-plane benchmarks only.

It writes nothing, so the job gets no work folder and empty scores, and reports exit
code 0. A job then measures the cost of fairu itself: verify, parse, publish with a
confirm, ack.

One command is understood instead of being ignored, for benchmarks of sharded
evaluations: `null-shard SECONDS FIRST_SET SETS FIRST_EXPERIMENT EXPERIMENTS` waits
SECONDS and writes a predictions.json with one record per experiment of that
rectangle, as an ingestion program would.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path

from fairu.protocol.models import SandboxInfo

from .base import RunOutcome, RunSpec


class NullRunner:
    name = "null"

    async def check(self) -> None:
        return None

    def writes_output(self, command: Sequence[str]) -> bool:
        return list(command[:1]) == [SHARD_COMMAND]

    async def run(self, spec: RunSpec) -> RunOutcome:
        started = time.monotonic()
        if self.writes_output(spec.command):
            try:
                seconds, *rectangle = (float(word) for word in spec.command[1:6])
            except ValueError:
                return _outcome(2, f"{SHARD_COMMAND}: expected five numbers\n", started)
            await asyncio.sleep(seconds)
            await asyncio.to_thread(_write_predictions, spec.output_dir, *map(int, rectangle))
        return _outcome(0, "", started)

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


SHARD_COMMAND = "null-shard"


def _outcome(exit_code: int, log: str, started: float) -> RunOutcome:
    return RunOutcome(
        exit_code=exit_code,
        timed_out=False,
        log_tail=log,
        log_truncated=False,
        run_s=time.monotonic() - started,
    )


def _write_predictions(
    folder: Path, first_set: int, sets: int, first_experiment: int, experiments: int
) -> None:
    records = [
        {"set": i, "experiment": j, "mu_hat": 1.0, "delta_mu_hat": 0.1, "p16": 0.9, "p84": 1.1}
        for i in range(first_set, first_set + sets)
        for j in range(first_experiment, first_experiment + experiments)
    ]
    (folder / "predictions.json").write_text(json.dumps(records))
    (folder / "scores.json").write_text("{}")
