"""`fairu-admin submit --wait` against a real agent, broker and coordinator."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from fairu.protocol.models import FinalStatus, JobResult, utc_now
from fairu.protocol.signing import generate_private_key, sign_model, write_private_key
from fairu.protocol.topology import RESULTS_EXCHANGE, result_routing_key

pytestmark = [pytest.mark.broker, pytest.mark.podman]


def write_job_file(folder, competition, seconds: int) -> None:
    (folder / "job.toml").write_text(
        f"""
competition = "{competition.name}"
queue = "{competition.queue}"
submission_id = "sub-1"
image = "localhost/fairu-python:1"
command = ["python3", "-c", "import time, json; time.sleep({seconds}); json.dump({{'ok': 1}}, open('/output/scores.json', 'w'))"]
[resources]
walltime_s = 120
"""
    )


async def test_submit_ignores_forged_result(
    coordinator, competition, start_agent, signing_key, amqp, tmp_path
):
    token = await asyncio.to_thread(coordinator.store.add_enrollment_token, "test")
    start_agent(competition, agent_extra=f'enrollment_token = "{token}"')
    deadline = time.monotonic() + 30
    while True:
        ours = [a for a in coordinator.store.agents() if a["queues"] == [competition.amqp_queue]]
        if ours:
            break
        assert time.monotonic() < deadline, "the agent never registered"
        await asyncio.sleep(0.2)
    agent_id = ours[0]["agent_id"]
    write_private_key(tmp_path / "signing.key", signing_key.private)
    write_job_file(tmp_path, competition, seconds=4)

    submit = subprocess.Popen(
        [sys.executable, "-m", "fairu.broker.admin", "submit", str(tmp_path / "job.toml"),
         "--key", str(tmp_path / "signing.key"), "--job-id", "job-forgery-check", "--wait",
         "--db", str(coordinator.store.path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    await asyncio.sleep(2)
    forged = JobResult(
        job_id="job-forgery-check", agent_id=agent_id, site="test",
        status=FinalStatus.SUCCEEDED, scores={"ok": 99.0}, finished_at=utc_now(),
    )
    impostor = generate_private_key()
    await amqp.publish(
        RESULTS_EXCHANGE, result_routing_key("job-forgery-check"),
        sign_model(forged, impostor, agent_id),
    )
    stdout, stderr = await asyncio.to_thread(submit.communicate, timeout=120)

    assert submit.returncode == 0, stderr
    assert "ignored a result for job job-forgery-check" in stderr
    assert "99" not in stdout
    assert "ok  1" in stdout
