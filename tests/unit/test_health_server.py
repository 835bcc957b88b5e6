"""The agent's health endpoint on loopback: routes and malformed requests."""

from __future__ import annotations

import asyncio

import pytest

from fairu.agent.health import MAX_REQUEST_HEAD_BYTES, AgentMetrics, Gauges, HealthServer


async def _runtime_ok() -> None:
    return None


@pytest.fixture
async def server():
    health = HealthServer(
        "127.0.0.1:0", AgentMetrics(), lambda: Gauges(0, 1, 0, 0, True), _runtime_ok
    )
    await health.start()
    yield health
    await health.stop()


async def http_round_trip(server: HealthServer, request: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split(" ")[1]), headers, body


async def test_healthz_ok(server):
    status, headers, body = await http_round_trip(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-Length"] == str(len(body))
    assert headers["Connection"] == "close"
    assert b'"status": "ok"' in body


async def test_metrics_with_query_string(server):
    status, headers, body = await http_round_trip(server, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"fairu_broker_connected 1" in body


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        pytest.param(b"GET /other HTTP/1.1\r\n\r\n", 404, id="unknown path"),
        pytest.param(b"POST /healthz HTTP/1.1\r\n\r\n", 405, id="wrong method"),
        pytest.param(b"GET /healthz\r\n\r\n", 400, id="no version"),
        pytest.param(b"hello world\r\n\r\n", 400, id="not http"),
        pytest.param(b"GET /healthz HTTP/1.1\r\n", 400, id="head cut short"),
    ],
)
async def test_bad_request_gets_error(server, request_bytes, expected):
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request_bytes)
    await writer.drain()
    if not request_bytes.endswith(b"\r\n\r\n"):
        writer.write_eof()
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert response.startswith(f"HTTP/1.1 {expected} ".encode())


async def test_oversized_head_gets_431(server):
    request = b"GET /healthz HTTP/1.1\r\nX-Filler: " + b"a" * MAX_REQUEST_HEAD_BYTES + b"\r\n\r\n"
    status, _headers, _body = await http_round_trip(server, request)
    assert status == 431


async def test_server_keeps_serving_after_bad_request(server):
    await http_round_trip(server, b"nonsense\r\n\r\n")
    status, _headers, _body = await http_round_trip(server, b"GET /healthz HTTP/1.1\r\n\r\n")
    assert status == 200
