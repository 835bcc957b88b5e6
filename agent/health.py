"""The agent's health endpoint: /healthz and /metrics over HTTP, on loopback by default.

/healthz returns 200 when the broker session is open and the podman service responds
to a ping, and 503 otherwise, with a JSON body saying which check failed. /metrics
returns the agent's counters and gauges in the Prometheus text exposition format
(version 0.0.4), written here so that the agent needs no Prometheus client library.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus

from fairu.addresses import parse_host_port
from fairu.protocol.errors import ConfigError
from fairu.protocol.models import FinalStatus

from .admission import Admission

logger = logging.getLogger(__name__)

# Evaluation jobs run from seconds to a day, so the buckets span that range.
DURATION_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
RUNTIME_CHECK_TIMEOUT_S = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A request head larger than this gets an error response, and one slower than the
# timeout gets none. Both close the connection.
MAX_REQUEST_HEAD_BYTES = 8192
REQUEST_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Gauges:
    running_jobs: int
    free_slots: int
    free_gpus: int
    gpus: int
    broker_connected: bool

    @classmethod
    def of(cls, admission: Admission, running_jobs: int, connected: bool) -> Gauges:
        return cls(
            running_jobs=running_jobs,
            free_slots=admission.free_slots(),
            free_gpus=len(admission.free_units()),
            gpus=len(admission.offer.units),
            broker_connected=connected,
        )


class AgentMetrics:
    """Counters of one agent process; every method runs on the event loop."""

    def __init__(self) -> None:
        self.finished = {status.value: 0 for status in FinalStatus}
        self.bucket_counts = [0] * len(DURATION_BUCKETS_S)
        self.duration_count = 0
        self.duration_sum = 0.0
        self.sessions = 0

    @property
    def broker_reconnects(self) -> int:
        return max(0, self.sessions - 1)

    def session_opened(self) -> None:
        self.sessions += 1

    def job_finished(self, status: str, duration_s: float | None) -> None:
        """Count a final result; `duration_s` is None for a job that never ran."""
        self.finished[status] = self.finished.get(status, 0) + 1
        if duration_s is None:
            return
        self.duration_count += 1
        self.duration_sum += duration_s
        for index, bound in enumerate(DURATION_BUCKETS_S):
            if duration_s <= bound:
                self.bucket_counts[index] += 1

    def render(self, gauges: Gauges) -> str:
        lines: list[str] = []
        _header(
            lines,
            "fairu_jobs_finished_total",
            "counter",
            "Jobs ended, by final status.",
        )
        for status, count in sorted(self.finished.items()):
            lines.append(
                f'fairu_jobs_finished_total{{status="{_label(status)}"}} {count}'
            )

        name = "fairu_job_duration_seconds"
        _header(lines, name, "histogram", "Time from the start of a job to its result.")
        for bound, count in zip(DURATION_BUCKETS_S, self.bucket_counts, strict=True):
            lines.append(f'{name}_bucket{{le="{_number(bound)}"}} {count}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.duration_count}')
        lines.append(f"{name}_sum {_number(self.duration_sum)}")
        lines.append(f"{name}_count {self.duration_count}")

        for metric, kind, help_text, value in (
            ("fairu_running_jobs", "gauge", "Jobs running now.", gauges.running_jobs),
            (
                "fairu_free_slots",
                "gauge",
                "Jobs that could still start.",
                gauges.free_slots,
            ),
            ("fairu_free_gpus", "gauge", "GPU units no job holds.", gauges.free_gpus),
            ("fairu_gpus", "gauge", "GPU units offered to jobs.", gauges.gpus),
            (
                "fairu_broker_connected",
                "gauge",
                "1 while a broker session is open.",
                int(gauges.broker_connected),
            ),
            (
                "fairu_broker_reconnects_total",
                "counter",
                "Broker sessions opened after the first.",
                self.broker_reconnects,
            ),
        ):
            _header(lines, metric, kind, help_text)
            lines.append(f"{metric} {value}")
        return "\n".join(lines) + "\n"


def _header(lines: list[str], name: str, kind: str, help_text: str) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


def parse_listen(text: str) -> tuple[str, int]:
    """Split `agent.health_listen`; raise ConfigError when it is invalid."""
    return parse_host_port(text, "agent.health_listen", "127.0.0.1:9464")


class HealthServer:
    """Serves /healthz and /metrics until `stop`.

    The two GET endpoints need only the request line, so the server parses the
    request head itself on asyncio's streams and closes the connection after each
    response, instead of importing a web framework into every idle agent.
    """

    def __init__(
        self,
        listen: str,
        metrics: AgentMetrics,
        gauges: Callable[[], Gauges],
        check_runtime: Callable[[], Awaitable[None]],
    ) -> None:
        self.host, self.port = parse_listen(listen)
        self.metrics = metrics
        self.gauges = gauges
        self.check_runtime = check_runtime
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> str:
        """Start listening; return the base URL, with the port the OS picked for 0."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=MAX_REQUEST_HEAD_BYTES
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on agent.health_listen {self.host}:{self.port}: "
                f"{exc.strerror}; pick a free port or 0"
            ) from None
        port = self._server.sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{port}"
        if not _is_loopback(self.host):
            logger.warning(
                "health endpoint listens on %s, which is not a loopback address",
                self.host,
            )
        logger.info("health endpoint listening on %s", self.url)
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, content_type, body = await self._answer(reader)
            reason = HTTPStatus(status).phrase
            head = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("ascii") + body)
            await writer.drain()
        except (ConnectionError, TimeoutError):
            pass  # The client went away or stalled, so no response can reach it.
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            return _plain(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
        except asyncio.IncompleteReadError:
            return _plain(HTTPStatus.BAD_REQUEST, "incomplete request")
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _plain(HTTPStatus.BAD_REQUEST, "malformed request line")
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target not in ("/healthz", "/metrics"):
            return _plain(HTTPStatus.NOT_FOUND, "not found; try /healthz or /metrics")
        if method != "GET":
            return _plain(HTTPStatus.METHOD_NOT_ALLOWED, "only GET is served")
        if target == "/healthz":
            return await self._healthz()
        return 200, CONTENT_TYPE, self.metrics.render(self.gauges()).encode()

    async def _healthz(self) -> tuple[int, str, bytes]:
        gauges = self.gauges()
        podman_error = await self._runtime_error()
        body: dict[str, object] = {
            "broker_connected": gauges.broker_connected,
            "podman_reachable": podman_error is None,
        }
        if podman_error is not None:
            body["podman_error"] = podman_error
        healthy = gauges.broker_connected and podman_error is None
        body["status"] = "ok" if healthy else "unhealthy"
        return 200 if healthy else 503, "application/json", json.dumps(body).encode()

    async def _runtime_error(self) -> str | None:
        try:
            await asyncio.wait_for(self.check_runtime(), RUNTIME_CHECK_TIMEOUT_S)
        except TimeoutError:
            return f"no answer within {RUNTIME_CHECK_TIMEOUT_S:.0f} s"
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
            logger.warning("health check: the container runtime failed: %s", exc)
            return str(exc)
        return None


def _plain(status: HTTPStatus, text: str) -> tuple[int, str, bytes]:
    return status.value, "text/plain; charset=utf-8", f"{text}\n".encode()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
