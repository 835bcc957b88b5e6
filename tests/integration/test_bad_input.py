"""Malformed and hostile messages and bundles through a real agent and broker.

Every case must end with its own error code, every rejected message must reach the
dead-letter exchange, and the agent must keep serving: a normal job at the end of the
corpus succeeds.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import stat
import tarfile
import time
import uuid
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from fairu.agent.session import Delivery
from fairu.protocol.errors import RejectedError
from fairu.protocol.models import FinalStatus, InputSpec, JobResult, JobSpec, utc_now
from fairu.protocol.signing import generate_private_key, open_unverified, sign_payload
from fairu.protocol.topology import DEAD_LETTER_EXCHANGE, RESULTS_EXCHANGE

pytestmark = [pytest.mark.broker, pytest.mark.podman]

MIB = 1024 * 1024
# Limits of the agent under test, small enough to reach with small bundles. The
# start_agent fixture adds these lines at the end of the site config.
AGENT_INPUTS = """
[inputs]
max_unpacked_members = 50
max_unpacked_bytes = 268435456
"""


@dataclass
class Case:
    name: str
    # Builds the message body with the helpers of `Corpus`.
    build: Callable[["Corpus"], bytes]
    code: str
    dead_lettered: bool = True


class Corpus:
    """Builds message bodies for one competition, signed with the trusted key."""

    def __init__(self, competition: Any, signing_key: Any, make_job: Any, server: Any):
        self.competition = competition
        self.signing_key = signing_key
        self.make_job = make_job
        self.server = server

    def job(self, **fields: Any) -> JobSpec:
        fields.setdefault("job_id", f"bad-{uuid.uuid4().hex[:12]}")
        return self.make_job(self.competition, **fields)

    def job_dict(self, **changes: Any) -> dict[str, Any]:
        data = json.loads(self.job().model_dump_json())
        for name, value in changes.items():
            if value is None:
                del data[name]
            else:
                data[name] = value
        return data

    def sign_bytes(self, payload: bytes) -> bytes:
        envelope = sign_payload(payload, self.signing_key.private)
        return envelope.model_dump_json(exclude_none=True).encode()

    def sign_dict(self, data: dict[str, Any]) -> bytes:
        return self.sign_bytes(json.dumps(data).encode())

    def envelope(self, **changes: Any) -> dict[str, Any]:
        data = json.loads(self.signing_key.sign(self.job()))
        data.update(changes)
        return data

    def with_input(self, data: bytes, unpack: str, **overrides: Any) -> bytes:
        name = f"bundle-{uuid.uuid4().hex[:8]}"
        (self.server.root / name).write_bytes(data)
        spec = {
            "name": "bundle",
            "url": self.server.url(name),
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "mount": "bundle",
            "unpack": unpack,
        }
        spec.update(overrides)
        job = self.job(inputs=[InputSpec(**spec)])
        return self.signing_key.sign(job)


def tar_of(add: Callable[[tarfile.TarFile], None], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as bundle:
        add(bundle)
    return buffer.getvalue()


def tar_member(
    name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b""
):
    def add(bundle: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = link
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        bundle.addfile(info, io.BytesIO(data) if data else None)

    return add


def zip_of(members: list[tuple[str, bytes, int]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                bundle.writestr(info, data)
    return buffer.getvalue()


def too_many_files(bundle: tarfile.TarFile) -> None:
    for index in range(60):
        tar_member(f"f{index}", data=b"x")(bundle)


def zeros_member(size: int) -> Callable[[tarfile.TarFile], None]:
    return tar_member("zeros.bin", data=bytes(size))


def tampered(corpus: Corpus) -> bytes:
    data = corpus.envelope()
    other = corpus.job().model_dump_json().encode()
    data["payload"] = base64.b64encode(other).decode()
    return json.dumps(data).encode()


def unknown_key(corpus: Corpus) -> bytes:
    envelope = sign_payload(
        corpus.job().model_dump_json().encode(), generate_private_key()
    )
    return envelope.model_dump_json().encode()


def expired(corpus: Corpus) -> bytes:
    now = utc_now()
    job = corpus.job(
        created_at=now - timedelta(hours=2), expires_at=now - timedelta(hours=1)
    )
    return corpus.signing_key.sign(job)


def wrong_queue(corpus: Corpus) -> bytes:
    return corpus.signing_key.sign(corpus.job(queue="gpu"))


CASES = [
    # The envelope, before any signature check.
    Case(
        "envelope-too-large",
        lambda c: b"{" + b" " * (MIB + 10) + b"}",
        "message_too_large",
    ),
    Case("envelope-not-utf8", lambda c: b'{"key_id": "\xff\xfe"}', "invalid_utf8"),
    Case("envelope-not-json", lambda c: b"hello, agent", "malformed_json"),
    Case("envelope-deep-nesting", lambda c: b"[" * 200_000, "malformed_json"),
    Case(
        "envelope-duplicate-key",
        lambda c: b'{"key_id": "a", "key_id": "b", "signature": "", "payload": ""}',
        "malformed_json",
    ),
    Case("envelope-array", lambda c: b"[1, 2, 3]", "wrong_type"),
    Case(
        "envelope-key-id-number",
        lambda c: json.dumps(c.envelope(key_id=7)).encode(),
        "wrong_type",
    ),
    Case(
        "envelope-missing-signature",
        lambda c: json.dumps(
            {k: v for k, v in c.envelope().items() if k != "signature"}
        ).encode(),
        "missing_field",
    ),
    Case(
        "envelope-unknown-field",
        lambda c: json.dumps(c.envelope(route="x")).encode(),
        "unknown_field",
    ),
    Case(
        "envelope-version-2",
        lambda c: json.dumps(c.envelope(protocol=2)).encode(),
        "unsupported_version",
    ),
    Case(
        "envelope-nan",
        lambda c: json.dumps(c.envelope(extra=float("nan"))).encode(),
        "non_finite_number",
    ),
    Case(
        "envelope-huge-integer",
        lambda c: json.dumps(c.envelope(extra=10**40)).encode(),
        "number_out_of_range",
    ),
    Case(
        "envelope-long-signature",
        lambda c: json.dumps(c.envelope(signature="A" * 4096)).encode(),
        "string_too_long",
    ),
    Case(
        "envelope-payload-not-base64",
        lambda c: json.dumps(c.envelope(payload="not base64!")).encode(),
        "bad_envelope",
    ),
    Case("envelope-unknown-key", unknown_key, "unknown_key"),
    Case("envelope-tampered-payload", tampered, "bad_signature"),
    # The payload, signed by the trusted key.
    Case(
        "payload-not-utf8",
        lambda c: c.sign_bytes(b'{"protocol": 1, "x": "\xff"}'),
        "invalid_utf8",
    ),
    Case(
        "payload-malformed",
        lambda c: c.sign_bytes(b'{"protocol": 1, "job_id": '),
        "malformed_json",
    ),
    Case(
        "payload-duplicate-key",
        lambda c: c.sign_bytes(
            json.dumps(c.job_dict())[:-1].encode() + b', "job_id": "other"}'
        ),
        "malformed_json",
    ),
    Case(
        "payload-nan",
        lambda c: c.sign_bytes(b'{"protocol": 1, "kind": "job", "x": NaN}'),
        "non_finite_number",
    ),
    Case(
        "payload-infinite-cpus",
        lambda c: c.sign_bytes(
            json.dumps(c.job_dict(resources={"cpus": float("inf")})).encode()
        ),
        "non_finite_number",
    ),
    Case(
        "payload-huge-memory",
        lambda c: c.sign_dict(c.job_dict(resources={"memory_mb": 10**30})),
        "number_out_of_range",
    ),
    Case(
        "payload-walltime-too-long",
        lambda c: c.sign_dict(c.job_dict(resources={"walltime_s": 10**9})),
        "number_out_of_range",
    ),
    Case(
        "payload-cpus-string",
        lambda c: c.sign_dict(c.job_dict(resources={"cpus": "2"})),
        "wrong_type",
    ),
    Case(
        "payload-missing-job-id",
        lambda c: c.sign_dict(c.job_dict(job_id=None)),
        "missing_field",
    ),
    Case(
        "payload-unknown-field",
        lambda c: c.sign_dict(c.job_dict(priority=10)),
        "unknown_field",
    ),
    Case(
        "payload-huge-image",
        lambda c: c.sign_dict(c.job_dict(image="x" * 100_000)),
        "string_too_long",
    ),
    Case(
        "payload-too-many-env",
        lambda c: c.sign_dict(c.job_dict(env={f"V{i}": "1" for i in range(100)})),
        "too_many_items",
    ),
    Case(
        "payload-version-2",
        lambda c: c.sign_dict(c.job_dict(protocol=2)),
        "unsupported_version",
    ),
    Case(
        "payload-bad-job-id",
        lambda c: c.sign_dict(c.job_dict(job_id="../../etc")),
        "bad_payload",
    ),
    Case("payload-expired", expired, "expired"),
    Case("payload-wrong-queue", wrong_queue, "audience_mismatch"),
    Case(
        "payload-egress",
        lambda c: c.signing_key.sign(c.job(network="egress")),
        "egress_not_allowed",
    ),
    # Bundles of otherwise valid jobs: the job fails, the message is acked.
    Case(
        "tar-absolute-path",
        lambda c: c.with_input(tar_of(tar_member("/etc/cron.d/job", data=b"x")), "tar"),
        "input_unsafe_member",
        dead_lettered=False,
    ),
    Case(
        "tar-dotdot",
        lambda c: c.with_input(tar_of(tar_member("a/../../escape", data=b"x")), "tar"),
        "input_unsafe_member",
        dead_lettered=False,
    ),
    Case(
        "tar-symlink-outside",
        lambda c: c.with_input(
            tar_of(tar_member("up", tarfile.SYMTYPE, "../../..")), "tar"
        ),
        "input_unsafe_member",
        dead_lettered=False,
    ),
    Case(
        "tar-hardlink-outside",
        lambda c: c.with_input(
            tar_of(tar_member("shadow", tarfile.LNKTYPE, "/etc/shadow")), "tar"
        ),
        "input_unsafe_member",
        dead_lettered=False,
    ),
    Case(
        "tar-device",
        lambda c: c.with_input(tar_of(tar_member("sda", tarfile.BLKTYPE)), "tar"),
        "input_unsafe_member",
        dead_lettered=False,
    ),
    Case(
        "tar-too-many-files",
        lambda c: c.with_input(tar_of(too_many_files), "tar"),
        "input_too_large",
        dead_lettered=False,
    ),
    Case(
        "tar-gzip-bomb",
        lambda c: c.with_input(tar_of(zeros_member(96 * MIB), "w:gz"), "tar"),
        "input_too_large",
        dead_lettered=False,
    ),
    Case(
        "zip-absolute-path",
        lambda c: c.with_input(
            zip_of([("/etc/passwd", b"x", stat.S_IFREG | 0o644)]), "zip"
        ),
        "input_unsafe_member",
        dead_lettered=False,
    ),
    Case(
        "zip-symlink-outside",
        lambda c: c.with_input(zip_of([("up", b"../..", stat.S_IFLNK | 0o777)]), "zip"),
        "input_unsafe_member",
        dead_lettered=False,
    ),
    Case(
        "zip-bomb",
        lambda c: c.with_input(
            zip_of([("zeros.bin", bytes(96 * MIB), stat.S_IFREG | 0o644)]), "zip"
        ),
        "input_too_large",
        dead_lettered=False,
    ),
    Case(
        "zip-corrupt",
        lambda c: c.with_input(b"PK\x03\x04 truncated", "zip"),
        "input_unpack_failed",
        dead_lettered=False,
    ),
    Case(
        "input-digest-mismatch",
        lambda c: c.with_input(b"bytes", "none", sha256="0" * 64),
        "input_digest_mismatch",
        dead_lettered=False,
    ),
    Case(
        "input-not-found",
        lambda c: c.with_input(b"bytes", "none", url=c.server.url("missing")),
        "input_fetch_failed",
        dead_lettered=False,
    ),
]


class Collector:
    """Results of one agent in arrival order, and the bodies that were dead-lettered."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.results: list[JobResult] = []
        self.dead: set[bytes] = set()


async def collect(amqp: Any, collector: Collector, queue_name: str) -> None:
    results_queue = await amqp.declare_queue(
        "", durable=False, exclusive=True, auto_delete=True
    )
    await amqp.bind(results_queue, RESULTS_EXCHANGE, "result.#")
    dead_queue = await amqp.declare_queue(
        "", durable=False, exclusive=True, auto_delete=True
    )
    # The dead-letter exchange is a fanout, so this queue gets a copy of every
    # dead letter; only those from this test's job queue are kept.
    await amqp.bind(dead_queue, DEAD_LETTER_EXCHANGE, "")

    def on_result(delivery: Delivery) -> None:
        amqp.ack(delivery.delivery_tag)
        try:
            result = open_unverified(delivery.body, JobResult)
        except RejectedError:
            return
        if result.agent_id == collector.agent_id:
            collector.results.append(result)

    def on_dead(delivery: Delivery) -> None:
        amqp.ack(delivery.delivery_tag)
        deaths = (delivery.properties.headers or {}).get("x-death") or []
        # pika returns long strings in headers as str or as bytes.
        if any(
            death.get("queue") in (queue_name, queue_name.encode()) for death in deaths
        ):
            collector.dead.add(delivery.body)

    await amqp.consume(results_queue, on_result)
    await amqp.consume(dead_queue, on_dead)


async def test_bad_input_corpus_codes(
    amqp, competition, start_agent, signing_key, publish, make_job, artifact_server
):
    from fairu.agent.state import StateDir

    assert len(CASES) >= 30
    agent = start_agent(competition, extra=AGENT_INPUTS)
    state = StateDir(agent.config_path.parent / "state")
    collector = Collector(state.load_identity("test").agent_id)
    await collect(amqp, collector, competition.amqp_queue)
    corpus = Corpus(competition, signing_key, make_job, artifact_server)

    bodies = [case.build(corpus) for case in CASES]
    normal = corpus.job(
        command=[
            "python3",
            "-c",
            "open('/output/scores.json', 'w').write('{\"ok\": 1}')",
        ]
    )
    for body in [*bodies, signing_key.sign(normal)]:
        await publish(competition, body)

    deadline = time.monotonic() + 300
    while len(collector.results) < len(CASES) + 1:
        assert time.monotonic() < deadline, (
            f"{len(collector.results)} of {len(CASES) + 1} results arrived"
        )
        await asyncio.sleep(0.2)
    # Give the last dead letters time to arrive.
    await asyncio.sleep(1.0)

    for case, body, result in zip(CASES, bodies, collector.results, strict=False):
        assert result.error is not None, (case.name, result)
        assert result.error.code == case.code, (case.name, result.error)
        if case.dead_lettered:
            assert result.status is FinalStatus.REJECTED, (case.name, result.status)
            assert body in collector.dead, f"{case.name} was not dead-lettered"
        else:
            assert result.status is FinalStatus.FAILED, (case.name, result.status)
            assert body not in collector.dead, f"{case.name} was dead-lettered"
    last = collector.results[len(CASES)]
    assert last.job_id == normal.job_id
    assert last.status is FinalStatus.SUCCEEDED, last
    assert last.scores == {"ok": 1.0}
    assert agent.process is not None and agent.process.poll() is None
    assert "Traceback" not in agent.log()
