"""Signed jobs through a real agent, the real broker and rootless podman."""

from __future__ import annotations

import base64
import importlib.util
import json
from datetime import timedelta
from pathlib import Path

import pytest

from fairu.protocol.models import FinalStatus, InputSpec, Resources, utc_now
from fairu.protocol.signing import generate_private_key, sign_payload

pytestmark = [pytest.mark.broker, pytest.mark.podman]

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "higgsml-demo"


def load_example_builder():
    spec = importlib.util.spec_from_file_location(
        "higgsml_build_bundles", EXAMPLE_DIR / "build_bundles.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_example_scores_match_direct(
    competition, start_agent, signing_key, publish, results, make_job, artifact_server
):
    builder = load_example_builder()
    bundles = builder.build_bundles(str(artifact_server.root))
    inputs = [
        InputSpec(
            name=bundle["name"].replace("_", "-"),
            url=artifact_server.url(Path(bundle["path"]).name),
            sha256=bundle["sha256"],
            size=bundle["size"],
            mount=bundle["name"],
            unpack="tar",
        )
        for bundle in bundles
    ]
    start_agent(competition)
    job = make_job(
        competition,
        command=builder.COMMAND_ARGV,
        inputs=inputs,
        resources=Resources(walltime_s=300),
    )
    await publish(competition, signing_key.sign(job))

    result = await results.wait(job.job_id, timeout_s=240)

    assert result.status is FinalStatus.SUCCEEDED, result
    expected = builder.expected_scores()
    assert result.scores["quantiles_score"] == pytest.approx(expected["quantiles_score"], abs=1e-12)
    assert result.scores["coverage"] == pytest.approx(expected["coverage"], abs=1e-12)
    assert result.exit_code == 0
    assert result.durations.run_s > 0


async def test_failures_then_next_job_runs(
    competition, start_agent, signing_key, publish, results, make_job
):
    agent = start_agent(competition)

    wrong_key = generate_private_key()
    forged = make_job(competition)
    await publish(competition, sign_payload(forged.model_dump_json().encode(), wrong_key,
                                            key_id=_key_id(signing_key)).model_dump_json().encode())

    now = utc_now()
    expired = make_job(
        competition, created_at=now - timedelta(hours=2), expires_at=now - timedelta(hours=1)
    )
    await publish(competition, signing_key.sign(expired))

    malformed_id = "job-malformed"
    malformed = sign_payload(b'{"protocol": 1, "job_id": "' + malformed_id.encode() + b'", ',
                             signing_key.private).model_dump_json().encode()
    await publish(competition, malformed)

    crashing = make_job(competition, command=["python3", "-c", "import sys; print('boom'); sys.exit(3)"])
    await publish(competition, signing_key.sign(crashing))

    healthy = make_job(
        competition,
        command=["python3", "-c", "open('/output/scores.json', 'w').write('{\"ok\": 1}')"],
    )
    await publish(competition, signing_key.sign(healthy))

    forged_result = await results.wait(forged.job_id)
    assert forged_result.status is FinalStatus.REJECTED
    assert forged_result.error.code == "bad_signature"
    assert forged_result.authenticated is False

    expired_result = await results.wait(expired.job_id)
    assert expired_result.status is FinalStatus.REJECTED
    assert expired_result.error.code == "expired"
    assert expired_result.authenticated is True

    malformed_result = await results.wait("unknown")
    assert malformed_result.error.code == "malformed_json"
    assert "not valid JSON" in malformed_result.error.message

    crash_result = await results.wait(crashing.job_id)
    assert crash_result.status is FinalStatus.FAILED
    assert crash_result.error.code == "nonzero_exit"
    assert crash_result.exit_code == 3
    assert "boom" in crash_result.log_tail

    healthy_result = await results.wait(healthy.job_id)
    assert healthy_result.status is FinalStatus.SUCCEEDED, healthy_result
    assert healthy_result.scores == {"ok": 1.0}
    assert "Traceback" not in agent.log()


def _key_id(signing_key) -> str:
    from fairu.protocol.signing import key_id_for

    return key_id_for(signing_key.private.public_key())


async def test_fault_outside_pipeline_still_gives_result(
    competition, start_agent, signing_key, publish, results, make_job
):
    import sqlite3

    agent = start_agent(competition, runner="null")
    database = agent.config_path.parent / "state" / "jobs.sqlite"
    with sqlite3.connect(database) as connection:
        connection.execute("DROP TABLE jobs")

    job = make_job(competition)
    await publish(competition, signing_key.sign(job))
    result = await results.wait(job.job_id)

    assert result.status is FinalStatus.FAILED
    assert result.error is not None
    assert result.error.code == "internal_error"
    assert "no such table" in result.error.message
