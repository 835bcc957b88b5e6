"""The coordinator's HTTP API over real HTTP, against an in-memory evaluation service.

The integration tests run the same API on the real `Evaluations`. These cover the
HTTP layer alone: status codes, error bodies, size caps, host and origin checks,
artifact serving, the fleet view and the OpenAPI document.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import socket
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
import yaml
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from yarl import URL

from fairu.broker import admin
from fairu.broker.api import ApiServer, make_app, parse_listen
from fairu.broker.openapi import openapi_document
from fairu.broker.store import Store
from fairu.protocol.errors import ConfigError, ErrorCode, RejectedError
from fairu.protocol.evaluation import (
    EvaluationState,
    EvaluationStatus,
    EvaluationSummary,
    ShardState,
    ShardStatus,
)
from fairu.protocol.signing import decode_envelope

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8


def status_of(evaluation_id: str, **fields) -> EvaluationStatus:
    values = {
        "evaluation_id": evaluation_id,
        "competition": "higgsml-demo",
        "submission_id": "sample",
        "state": EvaluationState.RUNNING,
        "shards_total": 2,
        "shards_done": 1,
        "shards_running": 1,
        "shards_failed": 0,
        "submitted_at": T0,
        "shards": [
            ShardStatus(index=0, first_set=0, sets=1, first_experiment=0,
                        experiments=10, state=ShardState.DONE, attempts=1),
            ShardStatus(index=1, first_set=1, sets=1, first_experiment=0,
                        experiments=10, state=ShardState.RUNNING, attempts=1),
        ],
    }
    values.update(fields)
    return EvaluationStatus(**values)


class FakeEvaluations:
    """Stands in for `Evaluations`: `submit` reads the evaluation id from the payload.

    A key id of "untrusted" stands for a bad signature chain, and a payload that is
    not a JSON object for an invalid request.
    """

    def __init__(self, artifacts: Path) -> None:
        self.statuses: dict[str, EvaluationStatus] = {}
        self.artifacts = artifacts
        self.fail_with: Exception | None = None

    async def submit(self, body: bytes) -> EvaluationStatus:
        envelope = decode_envelope(body)
        if envelope.key_id == "untrusted":
            raise RejectedError(ErrorCode.BAD_SIGNATURE, "signature does not match")
        payload = json.loads(base64.b64decode(envelope.payload))
        if not isinstance(payload, dict):
            raise RejectedError(ErrorCode.BAD_PAYLOAD, "payload is not an object")
        evaluation_id = payload["evaluation_id"]
        if evaluation_id in self.statuses:
            raise RejectedError(ErrorCode.REPLAYED, f"{evaluation_id} exists")
        if evaluation_id == "broker-down":
            raise RejectedError(ErrorCode.INTERNAL_ERROR, "the broker cannot be reached")
        self.statuses[evaluation_id] = status_of(evaluation_id)
        return self.statuses[evaluation_id]

    async def status(self, evaluation_id: str) -> EvaluationStatus | None:
        if self.fail_with is not None:
            raise self.fail_with
        return self.statuses.get(evaluation_id)

    async def list(self) -> list[EvaluationSummary]:
        fields = set(EvaluationSummary.model_fields)
        return [
            EvaluationSummary(**{k: v for k, v in dict(s).items() if k in fields})
            for s in self.statuses.values()
        ]

    def artifact_path(self, evaluation_id: str, name: str) -> Path | None:
        path = self.artifacts / evaluation_id / name
        return path if path.exists() else None

    async def cancel(self, evaluation_id: str) -> EvaluationStatus | None:
        status = self.statuses.get(evaluation_id)
        if status is not None and status.state is EvaluationState.RUNNING:
            status = status.model_copy(update={"state": EvaluationState.CANCELLED})
            self.statuses[evaluation_id] = status
        return status


def envelope(payload: object, key_id: str = "signer-1") -> bytes:
    encoded = base64.b64encode(json.dumps(payload).encode()).decode()
    return json.dumps(
        {"protocol": 1, "key_id": key_id, "signature": "AAAA", "payload": encoded}
    ).encode()


def registration(agent_id: str) -> dict[str, object]:
    return {
        "agent_id": agent_id, "site": "uni-a", "version": "0.1.0", "public_key": "AAAA",
        "cpu_cores": 8, "memory_bytes": 16 * 2**30, "gpus": [], "queues": ["q"],
        "slots": 2, "running_jobs": [], "free_slots": 2, "at": T0.isoformat(),
        "capacity": {"cpus": 8.0, "memory_bytes": 16 * 2**30, "gpus": [], "slots": 2},
        "free": {"cpus": 6.0, "memory_bytes": 12 * 2**30, "gpus": [], "slots": 1},
    }


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "coordinator.sqlite")
    yield store
    store.close()


@pytest.fixture
def evaluations(tmp_path):
    service = FakeEvaluations(tmp_path / "artifacts")
    finished = status_of(
        "eval-done", state=EvaluationState.FINISHED, shards_done=2, shards_running=0,
        scores={"coverage": 0.68}, artifacts=["coverage.png", "report.html"],
    )
    service.statuses["eval-done"] = finished
    folder = tmp_path / "artifacts" / "eval-done"
    folder.mkdir(parents=True)
    (folder / "coverage.png").write_bytes(PNG)
    (folder / "report.html").write_text("<h1>report</h1><script>alert(1)</script>")
    return service


@pytest.fixture
async def server(store, evaluations):
    api = ApiServer(make_app(store, evaluations, max_body_bytes=64 * 1024), "127.0.0.1", 0)
    await api.start()
    yield api
    await api.stop()


@pytest.fixture
async def http(server):
    async with aiohttp.ClientSession(base_url=server.url) as session:
        yield session


async def error_of(response: aiohttp.ClientResponse) -> dict[str, str]:
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    return body["error"]


async def test_healthz_ok(http):
    async with http.get("/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}
        assert len(response.headers["X-Request-Id"]) == 12


async def test_page_and_assets_served(http):
    async with http.get("/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        assert '<script src="/app.js"' in await response.text()
    async with http.get("/app.js") as response:
        assert response.status == 200
        assert response.content_type == "text/javascript"
        assert "innerHTML" not in await response.text()
    async with http.get("/style.css") as response:
        assert response.content_type == "text/css"


async def test_submit_then_show_and_list(http):
    async with http.post("/api/v1/evaluations", data=envelope({"evaluation_id": "e1"})) as r:
        assert r.status == 201
        created = EvaluationStatus.model_validate_json(await r.read())
    assert created.evaluation_id == "e1"
    async with http.get("/api/v1/evaluations/e1") as response:
        assert response.status == 200
        assert EvaluationStatus.model_validate_json(await response.read()) == created
    async with http.get("/api/v1/evaluations") as response:
        ids = [item["evaluation_id"] for item in await response.json()]
    assert ids == ["eval-done", "e1"]


async def test_submit_duplicate_conflicts(http):
    body = envelope({"evaluation_id": "e2"})
    async with http.post("/api/v1/evaluations", data=body) as response:
        assert response.status == 201
    async with http.post("/api/v1/evaluations", data=body) as response:
        assert response.status == 409
        error = await error_of(response)
    assert error["code"] == "replayed"
    assert "e2 exists" in error["message"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        pytest.param(b"{not json", 400, "malformed_json", id="malformed-json"),
        pytest.param(b"[1, 2]", 400, "wrong_type", id="not-an-object"),
        pytest.param(b"", 400, "bad_envelope", id="empty"),
        pytest.param(envelope([1]), 400, "bad_payload", id="invalid-request"),
        pytest.param(envelope({}, key_id="untrusted"), 403, "bad_signature", id="untrusted"),
        pytest.param(envelope({"evaluation_id": "broker-down"}), 503, "internal_error",
                     id="broker-down"),
    ],
)
async def test_submit_rejected(http, body, status, code):
    async with http.post("/api/v1/evaluations", data=body) as response:
        assert response.status == status
        error = await error_of(response)
    assert error["code"] == code
    assert "Traceback" not in error["message"]


async def test_submit_oversized_body(http):
    big = b"x" * (64 * 1024 + 1)
    async with http.post("/api/v1/evaluations", data=big) as response:
        assert response.status == 413
        error = await error_of(response)
    assert error["code"] == "message_too_large"
    assert "65536 bytes" in error["message"]

    async def chunks():
        for _ in range(80):
            yield b"y" * 1024

    # Without a Content-Length the cap applies while the body streams in.
    async with http.post("/api/v1/evaluations", data=chunks()) as response:
        assert response.status == 413
        assert (await error_of(response))["code"] == "message_too_large"


async def test_unknown_evaluation_not_found(http):
    async with http.get("/api/v1/evaluations/nope-1") as response:
        assert response.status == 404
        error = await error_of(response)
    assert error["code"] == "unknown_evaluation"
    assert "'nope-1'" in error["message"]
    async with http.post("/api/v1/evaluations/nope-1/cancel") as response:
        assert response.status == 404


async def test_cancel_evaluation(http, evaluations):
    evaluations.statuses["e3"] = status_of("e3")
    async with http.post("/api/v1/evaluations/e3/cancel") as response:
        assert response.status == 200
        assert (await response.json())["state"] == "cancelled"
    async with http.post("/api/v1/evaluations/eval-done/cancel") as response:
        assert response.status == 200
        assert (await response.json())["state"] == "finished"


async def test_cross_origin_post_forbidden(http, server, evaluations):
    evaluations.statuses["e4"] = status_of("e4")
    headers = {"Origin": "http://evil.example"}
    async with http.post("/api/v1/evaluations/e4/cancel", headers=headers) as response:
        assert response.status == 403
        assert (await error_of(response))["code"] == "cross_origin"
    assert evaluations.statuses["e4"].state is EvaluationState.RUNNING
    headers = {"Origin": server.url}
    async with http.post("/api/v1/evaluations/e4/cancel", headers=headers) as response:
        assert response.status == 200


async def test_foreign_host_misdirected(http):
    async with http.get("/api/v1/agents", headers={"Host": "evil.example"}) as response:
        assert response.status == 421
        assert "evil.example" in (await error_of(response))["message"]
    async with http.get("/healthz", headers={"Host": "localhost:8480"}) as response:
        assert response.status == 200


async def test_artifacts_served_with_types(http):
    url = "/api/v1/evaluations/eval-done/artifacts/"
    async with http.get(url + "coverage.png") as response:
        assert response.status == 200
        assert response.content_type == "image/png"
        assert await response.read() == PNG
        assert response.headers["Content-Security-Policy"].startswith("sandbox")
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    async with http.get(url + "report.html") as response:
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert response.headers["Content-Security-Policy"].startswith("sandbox")


@pytest.mark.parametrize(
    ("name", "status", "code"),
    [
        pytest.param(".hidden", 400, "invalid_name", id="dot-first"),
        pytest.param("a%20b.png", 400, "invalid_name", id="space"),
        pytest.param("..%2Fcoverage.png", 400, "invalid_name", id="parent"),
        pytest.param("%2E%2E", 400, "invalid_name", id="dot-dot"),
        pytest.param("report.pdf", 404, "unknown_artifact", id="absent"),
    ],
)
async def test_artifact_bad_names(http, name, status, code):
    # encoded=True sends the name as written, without the client normalizing it.
    url = URL(f"/api/v1/evaluations/eval-done/artifacts/{name}", encoded=True)
    async with http.get(url) as response:
        assert response.status == status
        assert (await error_of(response))["code"] == code


async def test_artifact_of_unknown_evaluation(http):
    async with http.get("/api/v1/evaluations/nope-2/artifacts/report.html") as response:
        assert response.status == 404
        assert (await error_of(response))["code"] == "unknown_evaluation"


async def test_unknown_route_and_method(http):
    async with http.get("/api/v1/nothing") as response:
        assert response.status == 404
        assert (await error_of(response))["code"] == "not_found"
    async with http.delete("/api/v1/evaluations") as response:
        assert response.status == 405
        assert (await error_of(response))["code"] == "method_not_allowed"


async def test_internal_error_hides_traceback(http, evaluations, caplog):
    evaluations.fail_with = RuntimeError("database is locked")
    with caplog.at_level(logging.ERROR, logger="fairu.broker.api"):
        async with http.get("/api/v1/evaluations/eval-done") as response:
            assert response.status == 500
            error = await error_of(response)
            request_id = response.headers["X-Request-Id"]
    assert error["code"] == "internal_error"
    assert "database is locked" not in error["message"]
    assert request_id in error["message"]
    assert f"request {request_id} GET /api/v1/evaluations/eval-done failed" in caplog.text


async def test_agents_match_admin_json(http, store, tmp_path):
    store.upsert_registration(registration("uni-a-0123456789abcdef"))
    async with http.get("/api/v1/agents") as response:
        assert response.status == 200
        agents = await response.json()
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert admin.main(["agents", "--db", str(store.path), "list", "--json"]) == 0
    printed = json.loads(output.getvalue())
    for agent in agents + printed:
        agent.pop("fleet_state")  # computed from the clock at each call
    assert agents == printed
    assert agents[0]["site"] == "uni-a"
    assert agents[0]["free"]["cpus"] == 6.0


async def test_evaluations_disabled(store):
    api = ApiServer(make_app(store, None), "127.0.0.1", 0)
    await api.start()
    try:
        async with aiohttp.ClientSession(base_url=api.url) as http:
            for method, url in [
                ("GET", "/api/v1/evaluations"),
                ("GET", "/api/v1/evaluations/e1"),
                ("POST", "/api/v1/evaluations"),
                ("POST", "/api/v1/evaluations/e1/cancel"),
                ("GET", "/api/v1/evaluations/e1/artifacts/report.html"),
            ]:
                async with http.request(method, url, data=b"{}") as response:
                    assert response.status == 503, url
                    error = await error_of(response)
                    assert error["code"] == "evaluations_disabled"
                    assert "--keys-dir" in error["message"]
            async with http.get("/api/v1/agents") as response:
                assert response.status == 200
    finally:
        await api.stop()


async def test_port_in_use_rejected(store, evaluations):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        api = ApiServer(make_app(store, evaluations), "127.0.0.1", port)
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}: the port is already in use"):
            await api.start()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8480", ("127.0.0.1", 8480)),
        ("[::1]:9000", ("::1", 9000)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["8480", "host:", ":8480", "host:99999", "host:http"])
def test_parse_listen_invalid(text):
    with pytest.raises(ConfigError, match="--http"):
        parse_listen(text)


# --- the OpenAPI document -----------------------------------------------------------

DOCUMENT_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
# Files of the organizer page; the document describes the page at "/" alone.
PAGE_ASSETS = {"/app.js", "/style.css", "/index.html"}


def test_committed_document_current():
    committed = yaml.safe_load(DOCUMENT_PATH.read_text())
    assert committed == openapi_document(), (
        "docs/openapi.yaml is out of date; run scripts/write-openapi.py"
    )


def test_document_valid_openapi():
    validate_spec(openapi_document())


def test_document_matches_routes(store, evaluations):
    app = make_app(store, evaluations)
    served = set()
    for route in app.router.routes():
        path = route.resource.canonical
        if route.method != "HEAD" and path not in PAGE_ASSETS:
            served.add((route.method.lower(), path))
    documented = {
        (method, path)
        for path, operations in openapi_document()["paths"].items()
        for method in operations
    }
    assert served == documented


def response_validator(document: dict, path: str, method: str, status: int):
    """Return a JSON Schema validator for one documented response."""
    responses = document["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} documents no {status}"
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    resource = Resource.from_contents(document, default_specification=DRAFT202012)
    registry = Registry().with_resource("urn:fairu:openapi", resource)
    # Refs in the document are relative to its root, so resolve them there.
    wrapped = {"$id": "urn:fairu:openapi:response", **_rebase(schema)}
    return Draft202012Validator(
        wrapped, registry=registry, format_checker=Draft202012Validator.FORMAT_CHECKER
    )


def _rebase(schema):
    if isinstance(schema, dict):
        return {
            key: ("urn:fairu:openapi" + value if key == "$ref" else _rebase(value))
            for key, value in schema.items()
        }
    if isinstance(schema, list):
        return [_rebase(item) for item in schema]
    return schema


RESPONSE_CASES = [
    pytest.param("get", "/healthz", "/healthz", None, 200, id="healthz"),
    pytest.param("get", "/api/v1/agents", "/api/v1/agents", None, 200, id="agents"),
    pytest.param("get", "/api/v1/evaluations", "/api/v1/evaluations", None, 200,
                 id="list"),
    pytest.param("get", "/api/v1/evaluations/{evaluation_id}",
                 "/api/v1/evaluations/eval-done", None, 200, id="show"),
    pytest.param("get", "/api/v1/evaluations/{evaluation_id}",
                 "/api/v1/evaluations/nope", None, 404, id="show-unknown"),
    pytest.param("post", "/api/v1/evaluations", "/api/v1/evaluations",
                 envelope({"evaluation_id": "e9"}), 201, id="submit"),
    pytest.param("post", "/api/v1/evaluations", "/api/v1/evaluations", b"{", 400,
                 id="submit-invalid"),
    pytest.param("post", "/api/v1/evaluations", "/api/v1/evaluations",
                 envelope({}, key_id="untrusted"), 403, id="submit-untrusted"),
    pytest.param("post", "/api/v1/evaluations", "/api/v1/evaluations",
                 b"x" * (64 * 1024 + 1), 413, id="submit-too-large"),
    pytest.param("post", "/api/v1/evaluations/{evaluation_id}/cancel",
                 "/api/v1/evaluations/eval-done/cancel", b"", 200, id="cancel-finished"),
    pytest.param("get", "/api/v1/evaluations/{evaluation_id}/artifacts/{name}",
                 "/api/v1/evaluations/eval-done/artifacts/.x", None, 400,
                 id="artifact-bad-name"),
]


@pytest.mark.parametrize(("method", "template", "url", "body", "status"), RESPONSE_CASES)
async def test_responses_match_schemas(http, store, method, template, url, body, status):
    store.upsert_registration(registration("uni-a-0123456789abcdef"))
    async with http.request(method.upper(), url, data=body) as response:
        assert response.status == status
        data = await response.json()
    validator = response_validator(openapi_document(), template, method, status)
    errors = [error.message for error in validator.iter_errors(data)]
    assert errors == []


async def test_served_document_is_current(http):
    async with http.get("/openapi.json") as response:
        assert response.status == 200
        assert await response.json() == openapi_document()


CHROMIUM = Path("/usr/bin/chromium")


async def test_page_fleet_without_evaluations(store, tmp_path):
    # The page draws the fleet even though every evaluation endpoint responds 503.
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found; scripts/setup-host.sh installs chromium")
    from playwright.async_api import async_playwright

    agent_id = "uni-a-0123456789abcdef"
    store.upsert_registration(registration(agent_id))
    api = ApiServer(make_app(store, None), "127.0.0.1", 0)
    await api.start()
    try:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM),
                headless=True, args=["--no-sandbox", "--disable-gpu", "--no-first-run"],
            )
            try:
                page = await context.new_page()
                await page.goto(api.url + "/")
                agent_row = page.locator(f'#fleet tr[data-agent-id="{agent_id}"]')
                await agent_row.wait_for(timeout=30_000)
                agent_text = await agent_row.inner_text()
                updated = page.locator("#updated.error")
                await updated.wait_for(timeout=30_000)
                updated_text = await updated.inner_text()
            finally:
                await context.close()
    finally:
        await api.stop()

    assert agent_text.split("\t")[:2] == ["uni-a", agent_id]
    assert "runs no evaluations" in updated_text
