"""The chain of trust against a real agent and broker: certificates, rotation,
revocation, root rotation, replay, audience and site policy."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

import pytest

from fairu.agent.session import Delivery
from fairu.broker.keys import KeyFolder
from fairu.protocol.models import FinalStatus, Resources, RootChain, utc_now
from fairu.protocol.signing import generate_private_key, sign_payload
from fairu.protocol.topology import DEAD_LETTER_QUEUE, TRUST_EXCHANGE
from fairu.protocol.trust import issue_certificate, sign_job, sign_rotation

pytestmark = pytest.mark.broker

TIMEOUT_S = 60


@pytest.fixture
def keys(tmp_path: Path) -> KeyFolder:
    folder = KeyFolder(tmp_path / "keys")
    folder.init_root()
    folder.issue(timedelta(days=1), make_current=True)
    return folder


def root_trust(folder: KeyFolder) -> str:
    return f'root_key = "{(folder.root / "root.pub").read_text().strip()}"'


def signed(job, key, certificate) -> bytes:
    envelope = sign_job(job.model_dump_json().encode(), key, certificate)
    return envelope.model_dump_json(exclude_none=True).encode()


def signed_current(job, folder: KeyFolder) -> bytes:
    current = folder.current_signing_key()
    return signed(job, current.key, current.certificate)


async def publish_trust(amqp, envelope) -> None:
    await amqp.publish(TRUST_EXCHANGE, "", envelope.model_dump_json(exclude_none=True).encode())


async def test_each_rejection_has_its_code(
    competition, start_agent, keys, publish, results, make_job, amqp
):
    start_agent(
        competition,
        runner="null",
        trust=root_trust(keys),
        extra='[policy]\nallowed_images = ["localhost/", "registry.example.org/"]\n'
        "max_cpus = 2\n",
    )
    current = keys.current_signing_key()
    now = utc_now()
    cases: dict[str, bytes] = {}
    jobs = {}

    def add(code: str, job, body: bytes) -> None:
        jobs[code] = job
        cases[code] = body

    bare = generate_private_key()
    job = make_job(competition)
    add("unknown_key", job, signed(job, bare, None))

    stranger_root = generate_private_key()
    stranger_cert = issue_certificate(
        stranger_root, bare.public_key(), now, now + timedelta(hours=1)
    )
    job = make_job(competition)
    add("bad_certificate", job, signed(job, bare, stranger_cert))

    old_cert = issue_certificate(
        keys.root_key(), bare.public_key(), now - timedelta(days=2), now - timedelta(days=1)
    )
    job = make_job(competition)
    add("certificate_expired", job, signed(job, bare, old_cert))

    job = make_job(competition)
    other = make_job(competition, image="localhost/other:1")
    forged = sign_job(job.model_dump_json().encode(), current.key, current.certificate)
    forged = forged.model_copy(
        update={"payload": sign_payload(other.model_dump_json().encode(), bare).payload}
    )
    add("bad_signature", other, forged.model_dump_json(exclude_none=True).encode())

    job = make_job(
        competition, created_at=now - timedelta(hours=2), expires_at=now - timedelta(hours=1)
    )
    add("expired", job, signed_current(job, keys))

    job = make_job(competition, queue="gpu")
    add("audience_mismatch", job, signed_current(job, keys))

    job = make_job(competition, image="docker.io/library/python:3.11")
    add("image_not_allowed", job, signed_current(job, keys))

    job = make_job(competition, resources=Resources(cpus=4))
    add("resources_exceed_policy", job, signed_current(job, keys))

    for body in cases.values():
        await publish(competition, body)

    for code, job in jobs.items():
        result = await results.wait(job.job_id, TIMEOUT_S)
        assert result.status is FinalStatus.REJECTED, (code, result)
        assert result.error is not None
        assert result.error.code == code, result.error

    # The rejected messages went to the dead-letter queue.
    await wait_dead_lettered(amqp, list(cases.values()))

    # A fresh job still runs, and a new message reusing its id is a replay.
    job = make_job(competition)
    await publish(competition, signed_current(job, keys))
    assert (await results.wait(job.job_id, TIMEOUT_S)).status is FinalStatus.SUCCEEDED
    again = make_job(competition, job_id=job.job_id)
    await publish(competition, signed_current(again, keys))
    await wait_results(results, job.job_id, 2)
    replay = results.results[job.job_id][1]
    assert replay.error is not None
    assert replay.error.code == "replayed"


async def test_competition_policy_rejects(
    competition, start_agent, keys, publish, results, make_job
):
    start_agent(
        competition, runner="null", trust=root_trust(keys),
        extra='[policy]\ncompetitions = ["another-competition"]\n',
    )
    job = make_job(competition)
    await publish(competition, signed_current(job, keys))
    result = await results.wait(job.job_id, TIMEOUT_S)
    assert result.error is not None
    assert result.error.code == "competition_not_allowed"


async def test_rotation_keeps_old_key_until_expiry(
    competition, start_agent, keys, publish, results, make_job
):
    old = keys.issue(timedelta(seconds=8), make_current=True)
    keys.issue(timedelta(days=1), make_current=True)
    start_agent(competition, runner="null", trust=root_trust(keys),
                agent_extra="clock_skew_s = 0")

    before = make_job(competition)
    await publish(competition, signed(before, old.key, old.certificate))
    assert (await results.wait(before.job_id, TIMEOUT_S)).status is FinalStatus.SUCCEEDED

    await asyncio.sleep(max(0.0, (old.body.not_after - utc_now()).total_seconds() + 1))
    after = make_job(competition)
    await publish(competition, signed(after, old.key, old.certificate))
    result = await results.wait(after.job_id, TIMEOUT_S)
    assert result.error is not None
    assert result.error.code == "certificate_expired"

    fresh = make_job(competition)
    await publish(competition, signed_current(fresh, keys))
    assert (await results.wait(fresh.job_id, TIMEOUT_S)).status is FinalStatus.SUCCEEDED


async def test_revocation_reaches_running_agent(
    competition, start_agent, keys, publish, results, make_job, amqp
):
    agent = start_agent(competition, runner="null", trust=root_trust(keys))
    current = keys.current_signing_key()
    spare = keys.issue(timedelta(days=1), make_current=False)
    first_list = keys.revoke(spare.body.key_id)
    await publish_trust(amqp, first_list)
    job = make_job(competition)
    await publish(competition, signed_current(job, keys))
    assert (await results.wait(job.job_id, TIMEOUT_S)).status is FinalStatus.SUCCEEDED

    envelope = keys.revoke(current.body.key_id)
    published = time.monotonic()
    await publish_trust(amqp, envelope)
    while True:
        probe = make_job(competition)
        await publish(competition, signed(probe, current.key, current.certificate))
        result = await results.wait(probe.job_id, TIMEOUT_S)
        if result.error is not None and result.error.code == "key_revoked":
            break
        assert time.monotonic() - published < 5, "revocation not applied within 5 s"
        await asyncio.sleep(0.2)
    assert time.monotonic() - published < 5

    revocations = agent.config_path.parent / "state" / "trust" / "revocations.json"
    assert revocations.exists()

    # The older list, which does not name the current key, changes nothing.
    await publish_trust(amqp, first_list)
    await asyncio.sleep(1)
    probe = make_job(competition)
    await publish(competition, signed(probe, current.key, current.certificate))
    result = await results.wait(probe.job_id, TIMEOUT_S)
    assert result.error is not None
    assert result.error.code == "key_revoked"

    # The revocation survives a restart.
    agent.stop()
    agent.start()
    probe = make_job(competition)
    await publish(competition, signed(probe, current.key, current.certificate))
    result = await results.wait(probe.job_id, TIMEOUT_S)
    assert result.error is not None
    assert result.error.code == "key_revoked"


async def test_root_rotation_chain(
    competition, start_agent, keys, publish, results, make_job, amqp
):
    agent = start_agent(competition, runner="null", trust=root_trust(keys))
    _key_id, version, chain = keys.rotate_root()
    assert version == 2
    keys.issue(timedelta(days=1), make_current=True)
    await publish_trust(amqp, sign_payload(chain.model_dump_json().encode(), keys.root_key()))

    job = await run_until_accepted(competition, keys, publish, results, make_job)
    assert job.status is FinalStatus.SUCCEEDED

    # A link signed by a key that is not the current root is refused.
    impostor = generate_private_key()
    bogus = RootChain(links=[*chain.links, sign_rotation(impostor, impostor.public_key(), 3)])
    await publish_trust(amqp, sign_payload(bogus.model_dump_json().encode(), impostor))
    await asyncio.sleep(1)
    now = utc_now()
    impostor_key = generate_private_key()
    impostor_cert = issue_certificate(impostor, impostor_key.public_key(), now,
                                      now + timedelta(hours=1))
    probe = make_job(competition)
    await publish(competition, signed(probe, impostor_key, impostor_cert))
    result = await results.wait(probe.job_id, TIMEOUT_S)
    assert result.error is not None
    assert result.error.code == "bad_certificate"
    assert "rejected a trust message" in agent.log()

    root_file = agent.config_path.parent / "state" / "trust" / "root.json"
    assert '"version": 2' in root_file.read_text()


async def run_until_accepted(competition, keys, publish, results, make_job):
    deadline = time.monotonic() + 10
    while True:
        job = make_job(competition)
        await publish(competition, signed_current(job, keys))
        result = await results.wait(job.job_id, TIMEOUT_S)
        if result.status is FinalStatus.SUCCEEDED or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.3)


async def wait_results(results, job_id: str, count: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while len(results.results.get(job_id, [])) < count:
        assert time.monotonic() < deadline, f"fewer than {count} results for {job_id}"
        await asyncio.sleep(0.1)


async def wait_dead_lettered(amqp, bodies: list[bytes]) -> None:
    """Read the dead-letter queue until every body in `bodies` has been seen."""
    missing = set(bodies)
    seen = asyncio.Event()

    def on_dead(delivery: Delivery) -> None:
        amqp.ack(delivery.delivery_tag)
        missing.discard(delivery.body)
        if not missing:
            seen.set()

    tag = await amqp.consume(DEAD_LETTER_QUEUE, on_dead)
    try:
        await asyncio.wait_for(seen.wait(), TIMEOUT_S)
    finally:
        await amqp.cancel(tag)
