"""Cancel, drain and poison messages against the real broker and rootless podman."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from fairu.protocol.models import CancelRequest, FinalStatus, Resources, utc_now
from fairu.protocol.signing import sign_model
from fairu.protocol.topology import DELIVERY_LIMIT, TRUST_EXCHANGE

pytestmark = [pytest.mark.broker, pytest.mark.podman]

SLEEP_THEN_SCORE = (
    "import time, json; time.sleep({seconds}); "
    "json.dump({{'slept': {seconds}}}, open('/output/scores.json', 'w'))"
)


def sleeping_job(make_job, competition, seconds: float, walltime_s: int = 120):
    return make_job(
        competition,
        command=["python3", "-c", SLEEP_THEN_SCORE.format(seconds=seconds)],
        resources=Resources(walltime_s=walltime_s),
    )


async def cancel(amqp, signing_key, job_id: str) -> None:
    request = CancelRequest(job_id=job_id, reason="withdrawn by the organizer", at=utc_now())
    await amqp.publish(TRUST_EXCHANGE, "", sign_model(request, signing_key.private))


async def wait_for_log(agent, text: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in agent.log():
        assert time.monotonic() < deadline, f"{text!r} not in the agent log:\n{agent.log()}"
        await asyncio.sleep(0.1)


async def test_cancel_queued_job(
    competition, start_agent, signing_key, publish, results, make_job, amqp
):
    job = sleeping_job(make_job, competition, 1)
    await publish(competition, signing_key.sign(job))
    await cancel(amqp, signing_key, job.job_id)

    start_agent(competition)
    result = await results.wait(job.job_id)

    assert result.status is FinalStatus.CANCELLED
    assert result.error is not None
    assert result.error.code == "cancelled"
    assert result.durations.run_s == 0


async def test_cancel_running_job(
    competition, start_agent, signing_key, publish, results, make_job, amqp, podman_socket
):
    agent = start_agent(competition)
    job = sleeping_job(make_job, competition, 60)
    await publish(competition, signing_key.sign(job))
    await wait_for_log(agent, "started container")

    requested = time.monotonic()
    await cancel(amqp, signing_key, job.job_id)
    result = await results.wait(job.job_id)
    elapsed = time.monotonic() - requested

    assert result.status is FinalStatus.CANCELLED
    assert elapsed < 5, f"cancel took {elapsed:.1f} s"
    assert not _containers_of(podman_socket, job.job_id)

    after = sleeping_job(make_job, competition, 0)
    await publish(competition, signing_key.sign(after))
    assert (await results.wait(after.job_id)).status is FinalStatus.SUCCEEDED


async def test_drain_lets_short_job_finish(
    competition, start_agent, signing_key, publish, results, make_job
):
    agent = start_agent(competition, stop_grace_s=60)
    job = sleeping_job(make_job, competition, 3)
    await publish(competition, signing_key.sign(job))
    await wait_for_log(agent, "started container")

    assert agent.stop() == 0
    result = await results.wait(job.job_id)
    assert result.status is FinalStatus.SUCCEEDED
    assert "handing job" not in agent.log()


async def test_drain_without_agent(tmp_path, signing_key):
    config = tmp_path / "site.toml"
    config.write_text(
        f'[site]\nname = "x"\n[trust]\nsigning_keys = ["{signing_key.public_text}"]\n'
        '[agent]\nstate_dir = "state"\n[[queues]]\ncompetition = "c"\nname = "q"\n'
    )
    drained = subprocess.run(
        [sys.executable, "-m", "fairu.agent.cli", "drain", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert drained.returncode == 1
    assert "no agent is running" in drained.stderr


async def test_poison_message_gets_failed_result(
    coordinator, competition, signing_key, publish, make_job, amqp
):
    job = make_job(competition)
    await publish(competition, signing_key.sign(job))

    # Stand in for agents that crash on this message: take it and hand it back
    # until the quorum queue's delivery limit dead-letters it.
    returned = asyncio.Event()
    count = 0

    def on_delivery(delivery) -> None:
        nonlocal count
        count += 1
        amqp.nack(delivery.delivery_tag, requeue=True)
        if count > DELIVERY_LIMIT:
            returned.set()

    tag = await amqp.consume(competition.amqp_queue, on_delivery)
    await asyncio.wait_for(returned.wait(), 30)
    await amqp.cancel(tag)

    deadline = time.monotonic() + 30
    while (stored := coordinator.store.result(job.job_id)) is None:
        assert time.monotonic() < deadline, "no failed result recorded for the poison job"
        await asyncio.sleep(0.2)
    assert stored.status == "failed"
    assert stored.agent_id == "fairu-coordinator"


def _containers_of(podman_socket: str, job_id: str) -> list[object]:
    import podman

    with podman.PodmanClient(base_url=podman_socket) as client:
        return client.containers.list(all=True, filters={"label": f"fairu.job_id={job_id}"})


async def test_second_agent_on_same_state_refused(competition, start_agent):
    agent = start_agent(competition, runner="null")
    second = subprocess.run(
        [sys.executable, "-m", "fairu.agent.cli", "start", "--config", str(agent.config_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert second.returncode == 2
    assert "another agent" in second.stderr
    assert "Traceback" not in second.stderr
    assert agent.process is not None and agent.process.poll() is None


async def test_drain_ignores_stale_pid_file(tmp_path, signing_key):
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        config = tmp_path / "site.toml"
        config.write_text(
            f'[site]\nname = "x"\n[trust]\nsigning_keys = ["{signing_key.public_text}"]\n'
            '[agent]\nstate_dir = "state"\n[[queues]]\ncompetition = "c"\nname = "q"\n'
        )
        (tmp_path / "state").mkdir()
        (tmp_path / "state" / "agent.pid").write_text(f"{bystander.pid}\n")
        drained = subprocess.run(
            [sys.executable, "-m", "fairu.agent.cli", "drain", "--config", str(config)],
            capture_output=True, text=True, timeout=60,
        )
        assert drained.returncode == 1
        assert "no agent is running" in drained.stderr
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
