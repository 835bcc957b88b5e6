"""Fan-out of one sharded evaluation: 400 shards of 0.5 s over 8 agent slots.

The coordinator runs in this process with `Evaluations`; two `fairu-agent`
processes (through bench/fairu_agent.py, so that their results and events go to the
benchmark's own exchanges) with 4 slots each run the shard jobs with the null runner's `null-shard`
command, which waits 0.5 s and writes the shard's predictions. The null runner
keeps the measurement on fairu's own work (signing, publishing with confirms,
verifying, returning the artifact, checking and recording each shard): a rootless
podman container takes about 3 s to start on the 2-core development host, six
times the job itself, so podman would measure container start-up instead.

The ideal wall time is shards x seconds / slots = 25 s. The script prints the time
from submit until every shard is done, the time until the evaluation is finished
(pooling, scoring and the report included), and their ratios to the ideal.

    .venv/bin/python bench/fanout.py            # target: ratio <= 1.15
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta

import common
from fairu.agent.session import AmqpSession
from fairu.broker.coordinator import Coordinator, CoordinatorQueues
from fairu.broker.evaluations import CoordinatorKeys, Evaluations
from fairu.broker.keys import KeyFolder
from fairu.broker.store import Store
from fairu.broker.topology import declare_job_queue, declare_topology
from fairu.protocol.evaluation import EvaluationRequest, EvaluationState
from fairu.protocol.models import Resources, utc_now
from fairu.protocol.topology import job_queue_name

TARGET_RATIO = 1.15


async def run(args: argparse.Namespace) -> float:
    prefix = common.unique_prefix()
    work = common.make_work_folder(prefix)
    competition = f"b-{uuid.uuid4().hex[:8]}"
    # The agents publish to the benchmark's own exchanges, so that their results and
    # registrations do not wait in fairu.coordinator.records for the next coordinator.
    topology = common.BenchTopology(args.broker, prefix)
    await asyncio.to_thread(topology.declare_results)
    queues = CoordinatorQueues(
        records=topology.records_queue, heartbeats=f"{prefix}.heartbeats", dead_letters=None
    )
    session = AmqpSession(args.broker, name="fairu-bench fanout")
    await session.open()
    await declare_topology(session)
    await declare_job_queue(session, competition, "cpu")
    await session.declare_queue(
        queues.heartbeats, durable=False, arguments={"x-expires": 900_000}
    )
    await session.bind(queues.records, topology.events_exchange, "agent.registration.#")
    await session.bind(queues.heartbeats, topology.events_exchange, "agent.heartbeat.#")

    folder = KeyFolder(work / "keys")
    folder.init_root()
    folder.issue(timedelta(hours=2), make_current=True)
    keys = CoordinatorKeys(work / "keys")
    root_key = (work / "keys" / "root.pub").read_text().strip()
    store = Store(work / "coordinator.sqlite")
    evaluations = Evaluations(args.broker, store, work / "evaluations", keys)
    coordinator = Coordinator(args.broker, store, queues=queues, evaluations=evaluations)
    serving = asyncio.create_task(coordinator.run())

    agents = []
    slots_per_agent = args.slots // args.agents
    try:
        for index in range(args.agents):
            agent_dir = work / f"agent-{index}"
            agent_dir.mkdir()
            token = store.add_enrollment_token("bench")
            config = common.write_agent_config(
                agent_dir, url=args.broker, trust=f'root_key = "{root_key}"',
                competition=competition, queue="cpu", runner="null", slots=slots_per_agent,
                heartbeat_interval_s=5, agent_extra=f'enrollment_token = "{token}"',
            )
            log = open(agent_dir / "agent.log", "wb")
            agents.append(
                subprocess.Popen(
                    common.fairu_agent_argv(config, "WARNING"),
                    stdout=log, stderr=subprocess.STDOUT, env=common.agent_env(topology),
                )
            )
        while sum(a["approval"] == "approved" for a in store.agents()) < args.agents:
            await asyncio.sleep(0.2)

        now = utc_now()
        request = EvaluationRequest(
            evaluation_id=f"fanout-{uuid.uuid4().hex[:8]}",
            competition=competition,
            queue="cpu",
            submission_id="bench",
            image="localhost/fairu-python:1",
            command=["null-shard", str(args.seconds), "{first_set}", "{sets}",
                     "{first_experiment}", "{experiments}"],
            num_sets=args.shards,
            experiments_per_set=1,
            shard_size=1,
            # Small requests, so that each agent's 4 slots fit in the host's 2 cores.
            resources=Resources(cpus=0.25, memory_mb=64, walltime_s=60),
            base_seed=0,
            mu_true=[1.0] * args.shards,
            created_at=now,
            expires_at=now + timedelta(hours=1),
        )
        started = time.monotonic()
        await evaluations.submit(keys.sign(request))
        shards_done_s = None
        while True:
            status = await evaluations.status(request.evaluation_id)
            assert status is not None
            if shards_done_s is None and status.shards_done == args.shards:
                shards_done_s = time.monotonic() - started
            if status.state is not EvaluationState.RUNNING and status.state is not (
                EvaluationState.SCORING
            ):
                break
            await asyncio.sleep(0.05)
        finished_s = time.monotonic() - started
        if status.state is not EvaluationState.FINISHED:
            raise SystemExit(f"evaluation ended {status.state}: {status.error}")
    finally:
        for process in agents:
            process.terminate()
        for process in agents:
            process.wait(60)
        coordinator.stopping.set()
        await asyncio.wait_for(serving, 60)
        store.close()
        await session.delete_queue(job_queue_name(competition, "cpu"))
        await session.delete_queue(queues.heartbeats)
        await session.close()
        await asyncio.to_thread(topology.delete_all)
        if not os.environ.get("FAIRU_KEEP_BENCH_WORK"):
            common.remove_folder(work)

    assert shards_done_s is not None
    ideal = args.shards * args.seconds / args.slots
    print(f"shards {args.shards} x {args.seconds} s over {args.slots} slots "
          f"({args.agents} agents); ideal {ideal:.1f} s")
    print(f"all shards done   {shards_done_s:6.1f} s   ratio {shards_done_s / ideal:.3f}")
    print(f"evaluation done   {finished_s:6.1f} s   ratio {finished_s / ideal:.3f}")
    print(f"target ratio <= {TARGET_RATIO} for all shards done: "
          f"{'met' if shards_done_s / ideal <= TARGET_RATIO else 'NOT met'}")
    return shards_done_s / ideal


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default=common.DEFAULT_BROKER_URL, help="AMQP URL")
    parser.add_argument("--shards", type=int, default=400, help="shard count (default 400)")
    parser.add_argument("--seconds", type=float, default=0.5, help="seconds per shard job")
    parser.add_argument("--slots", type=int, default=8, help="agent slots in all (default 8)")
    parser.add_argument("--agents", type=int, default=2, help="agents sharing the slots")
    args = parser.parse_args()
    if args.slots % args.agents:
        parser.error("--slots must be a multiple of --agents")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
