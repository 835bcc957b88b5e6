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

from aiohttp import web

from fairu.protocol.errors import ConfigError
from fairu.protocol.models import FinalStatus

from .admission import Admission

logger = logging.getLogger(__name__)

# Evaluation jobs run from seconds to a day, so the buckets span that range.
DURATION_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
RUNTIME_CHECK_TIMEOUT_S = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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
    """Split "HOST:PORT" (IPv6 in brackets, "[::1]:9100"); raise ConfigError."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"invalid agent.health_listen {text!r}: use HOST:PORT, such as "
            "127.0.0.1:9464"
        )
    return host, int(port)


class HealthServer:
    """Serves /healthz and /metrics until `stop`."""

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
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        """Start listening; return the base URL, with the port the OS picked for 0."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(
                f"cannot listen on agent.health_listen {self.host}:{self.port}: "
                f"{exc.strerror}; pick a free port or 0"
            ) from None
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
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
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _request: web.Request) -> web.Response:
        gauges = self.gauges()
        podman_error = await self._runtime_error()
        body = {
            "broker_connected": gauges.broker_connected,
            "podman_reachable": podman_error is None,
        }
        if podman_error is not None:
            body["podman_error"] = podman_error
        healthy = gauges.broker_connected and podman_error is None
        body["status"] = "ok" if healthy else "unhealthy"
        return web.Response(
            status=200 if healthy else 503,
            text=json.dumps(body),
            content_type="application/json",
        )

    async def _runtime_error(self) -> str | None:
        try:
            await asyncio.wait_for(self.check_runtime(), RUNTIME_CHECK_TIMEOUT_S)
        except TimeoutError:
            return f"no answer within {RUNTIME_CHECK_TIMEOUT_S:.0f} s"
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
            logger.warning("health check: the container runtime failed: %s", exc)
            return str(exc)
        return None

    async def _metrics(self, _request: web.Request) -> web.Response:
        response = web.Response(text=self.metrics.render(self.gauges()))
        response.headers["Content-Type"] = CONTENT_TYPE
        return response


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
