"""The wire models and the signing chain, without a broker."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
from pydantic import ValidationError

from fairu.protocol import ErrorCode, FinalStatus, JobResult, JobSpec, RejectedError, utc_now
from fairu.protocol.signing import (
    decode_envelope,
    generate_private_key,
    key_id_for,
    parse_payload,
    sign_model,
    sign_payload,
    verify_envelope,
)
from fairu.protocol.topology import job_queue_name, split_job_queue_name


def make_job(**overrides: object) -> JobSpec:
    now = utc_now()
    fields: dict[str, object] = {
        "job_id": "job-1",
        "competition": "higgs",
        "queue": "cpu",
        "submission_id": "sub-1",
        "image": "localhost/fairu-python:1",
        "command": ["python3", "-c", "print(1)"],
        "created_at": now,
        "expires_at": now + timedelta(hours=1),
    }
    fields.update(overrides)
    return JobSpec(**fields)  # type: ignore[arg-type]


@pytest.fixture
def key():
    return generate_private_key()


@pytest.fixture
def trusted(key):
    return {key_id_for(key.public_key()): key.public_key()}


def job_dict() -> dict[str, object]:
    return json.loads(make_job().model_dump_json())


def test_job_roundtrip_through_signature(key, trusted):
    job = make_job()
    envelope = decode_envelope(sign_model(job, key))
    payload = verify_envelope(envelope, trusted)
    assert parse_payload(payload, JobSpec) == job


def test_job_rejects_unknown_field():
    data = job_dict() | {"priority": 1}
    with pytest.raises(ValidationError, match="priority"):
        JobSpec.model_validate_json(json.dumps(data))


def test_job_rejects_string_for_number():
    data = job_dict()
    data["resources"] = {"cpus": "2"}
    with pytest.raises(ValidationError):
        JobSpec.model_validate_json(json.dumps(data))


@pytest.mark.parametrize(
    "field, value",
    [
        pytest.param("job_id", "../etc", id="job-id-path"),
        pytest.param("competition", "Higgs.ML", id="competition-dot"),
        pytest.param("command", [], id="empty-command"),
        pytest.param("inputs", [{"name": "a", "url": "file:///etc/passwd", "sha256": "0" * 64,
                                 "size": 1, "mount": "a"}], id="file-url"),
        pytest.param("inputs", [{"name": "a", "url": "http://h/a", "sha256": "0" * 64,
                                 "size": 1, "mount": "../a"}], id="mount-escape"),
    ],
)
def test_job_rejects_invalid_value(field, value):
    data = job_dict()
    data[field] = value
    with pytest.raises(ValidationError):
        JobSpec.model_validate_json(json.dumps(data))


def test_job_rejects_naive_datetime():
    data = job_dict()
    data["expires_at"] = "2030-01-01T00:00:00"
    with pytest.raises(ValidationError, match="timezone"):
        JobSpec.model_validate_json(json.dumps(data))


def test_result_rejects_nan_score():
    with pytest.raises(ValidationError):
        JobResult(
            job_id="j", agent_id="a", site="s", status=FinalStatus.SUCCEEDED,
            scores={"x": float("nan")}, finished_at=utc_now(),
        )


def test_tampered_payload_fails_signature(key, trusted):
    envelope = decode_envelope(sign_model(make_job(), key))
    forged = make_job(image="evil/image:latest").model_dump_json().encode()
    tampered = envelope.model_copy(update={"payload": base64.b64encode(forged).decode()})
    with pytest.raises(RejectedError) as caught:
        verify_envelope(tampered, trusted)
    assert caught.value.code is ErrorCode.BAD_SIGNATURE


def test_unknown_key_is_rejected(key):
    other = generate_private_key()
    envelope = decode_envelope(sign_model(make_job(), key))
    with pytest.raises(RejectedError) as caught:
        verify_envelope(envelope, {key_id_for(other.public_key()): other.public_key()})
    assert caught.value.code is ErrorCode.UNKNOWN_KEY


def test_key_id_cannot_point_at_another_key(key, trusted):
    attacker = generate_private_key()
    envelope = sign_payload(make_job().model_dump_json().encode(), attacker,
                            key_id=key_id_for(key.public_key()))
    with pytest.raises(RejectedError) as caught:
        verify_envelope(envelope, trusted)
    assert caught.value.code is ErrorCode.BAD_SIGNATURE


@pytest.mark.parametrize(
    "body, code",
    [
        pytest.param(b"not json", ErrorCode.MALFORMED_JSON, id="not-json"),
        pytest.param(b"[]", ErrorCode.WRONG_TYPE, id="array"),
        pytest.param(b'{"key_id": "k"}', ErrorCode.MISSING_FIELD, id="missing-fields"),
        pytest.param(b"\xff\xfe", ErrorCode.INVALID_UTF8, id="not-utf8"),
        pytest.param(b"{" * 2_000_000, ErrorCode.MESSAGE_TOO_LARGE, id="too-large"),
        pytest.param(b'{"protocol": 7}', ErrorCode.UNSUPPORTED_VERSION, id="version-7"),
        pytest.param(
            b'{"key_id": "k", "signature": "", "payload": "", "extra": 1}',
            ErrorCode.UNKNOWN_FIELD,
            id="unknown-field",
        ),
        pytest.param(
            b'{"key_id": "k", "signature": "", "payload": "***"}',
            ErrorCode.BAD_ENVELOPE,
            id="payload-not-base64",
        ),
    ],
)
def test_bad_envelope_codes(body, code):
    with pytest.raises(RejectedError) as caught:
        decode_envelope(body)
    assert caught.value.code is code


def test_envelope_without_protocol_is_version_1(key):
    envelope = json.loads(sign_model(make_job(), key))
    del envelope["protocol"]

    decoded = decode_envelope(json.dumps(envelope).encode())

    assert decoded.protocol == 1


def job_bytes(**changes: object) -> bytes:
    data = job_dict()
    for name, value in changes.items():
        if value is DELETE:
            del data[name]
        else:
            data[name] = value
    return json.dumps(data).encode()


DELETE = object()


@pytest.mark.parametrize(
    "payload, code",
    [
        pytest.param(b"\xff\xfe", ErrorCode.INVALID_UTF8, id="not-utf8"),
        pytest.param(b"{not json", ErrorCode.MALFORMED_JSON, id="malformed-json"),
        pytest.param(b"[" * 100_000, ErrorCode.MALFORMED_JSON, id="deep-nesting"),
        pytest.param(
            b'{"protocol": 1, "protocol": 1}',
            ErrorCode.MALFORMED_JSON,
            id="duplicate-key",
        ),
        pytest.param(b'"job"', ErrorCode.WRONG_TYPE, id="string"),
        pytest.param(
            b'{"protocol": 1, "x": NaN}', ErrorCode.NON_FINITE_NUMBER, id="nan"
        ),
        pytest.param(
            b'{"protocol": 1, "x": -Infinity}',
            ErrorCode.NON_FINITE_NUMBER,
            id="infinity",
        ),
        pytest.param(
            b'{"protocol": 1, "x": 1e999}',
            ErrorCode.NUMBER_OUT_OF_RANGE,
            id="float-overflow",
        ),
        pytest.param(
            b'{"protocol": 1, "x": ' + b"9" * 5000 + b"}",
            ErrorCode.NUMBER_OUT_OF_RANGE,
            id="int-5000-digits",
        ),
        pytest.param(
            b'{"protocol": 1, "x": 9223372036854775808}',
            ErrorCode.NUMBER_OUT_OF_RANGE,
            id="int-beyond-64-bit",
        ),
        pytest.param(b'{"protocol": 2}', ErrorCode.UNSUPPORTED_VERSION, id="version-2"),
        pytest.param(
            b'{"protocol": "1"}', ErrorCode.UNSUPPORTED_VERSION, id="version-string"
        ),
        pytest.param(
            b'{"protocol": true}', ErrorCode.UNSUPPORTED_VERSION, id="version-true"
        ),
        pytest.param(
            b'{"kind": "job"}', ErrorCode.UNSUPPORTED_VERSION, id="no-version"
        ),
        pytest.param(
            b'{"protocol": 1, "kind": "job"}', ErrorCode.MISSING_FIELD, id="missing"
        ),
        pytest.param(job_bytes(job_id=DELETE), ErrorCode.MISSING_FIELD, id="no-job-id"),
        pytest.param(
            job_bytes(priority=1), ErrorCode.UNKNOWN_FIELD, id="unknown-field"
        ),
        pytest.param(
            job_bytes(command="python3"), ErrorCode.WRONG_TYPE, id="command-string"
        ),
        pytest.param(
            job_bytes(resources={"cpus": "2"}), ErrorCode.WRONG_TYPE, id="cpus-string"
        ),
        pytest.param(
            job_bytes(resources={"memory_mb": 1.5}),
            ErrorCode.WRONG_TYPE,
            id="memory-float",
        ),
        pytest.param(
            job_bytes(resources=[1]), ErrorCode.WRONG_TYPE, id="resources-array"
        ),
        pytest.param(
            job_bytes(resources={"walltime_s": 10**12}),
            ErrorCode.NUMBER_OUT_OF_RANGE,
            id="walltime-huge",
        ),
        pytest.param(
            job_bytes(resources={"cpus": -1.0}),
            ErrorCode.NUMBER_OUT_OF_RANGE,
            id="cpus-negative",
        ),
        pytest.param(
            job_bytes(image="x" * 100_000), ErrorCode.STRING_TOO_LONG, id="image-huge"
        ),
        pytest.param(
            job_bytes(command=["a" * 5000]),
            ErrorCode.STRING_TOO_LONG,
            id="argument-huge",
        ),
        pytest.param(
            job_bytes(command=["a"] * 65),
            ErrorCode.TOO_MANY_ITEMS,
            id="too-many-arguments",
        ),
        pytest.param(
            job_bytes(env={f"V{i}": "1" for i in range(65)}),
            ErrorCode.TOO_MANY_ITEMS,
            id="too-many-variables",
        ),
        pytest.param(
            job_bytes(job_id="../etc"), ErrorCode.BAD_PAYLOAD, id="job-id-pattern"
        ),
        pytest.param(
            job_bytes(expires_at="2030-01-01T00:00:00"),
            ErrorCode.BAD_PAYLOAD,
            id="naive-datetime",
        ),
        pytest.param(
            job_bytes(network="host"), ErrorCode.BAD_PAYLOAD, id="network-host"
        ),
    ],
)
def test_bad_payload_codes(payload, code):
    with pytest.raises(RejectedError) as caught:
        parse_payload(payload, JobSpec)
    assert caught.value.code is code, caught.value.message


def test_payload_of_other_kind_is_not_a_job():
    result = JobResult(job_id="j", agent_id="a", site="s", status=FinalStatus.FAILED, finished_at=utc_now())
    with pytest.raises(RejectedError) as caught:
        parse_payload(result.model_dump_json().encode(), JobSpec)
    assert caught.value.code is ErrorCode.BAD_PAYLOAD


def test_validation_message_omits_input_values():
    data = job_dict()
    data["env"] = {"TOKEN": 12345}
    with pytest.raises(RejectedError) as caught:
        parse_payload(json.dumps(data).encode(), JobSpec)
    assert "12345" not in caught.value.message
    assert "env.TOKEN" in caught.value.message


def test_job_queue_name_roundtrip():
    name = job_queue_name("higgs", "gpu-large")
    assert name == "fairu.jobs.higgs.gpu-large"
    assert split_job_queue_name(name) == ("higgs", "gpu-large")


@pytest.mark.parametrize("name", ["fairu.jobs.higgs", "other.higgs.cpu", "fairu.jobs.a.b.c"])
def test_split_rejects_foreign_queue(name):
    with pytest.raises(ValueError):
        split_job_queue_name(name)
