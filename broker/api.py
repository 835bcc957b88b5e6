"""The coordinator's HTTP API and the organizer page, served by aiohttp.

The /api/v1 endpoints return JSON, and every error is {"error": {"code", "message"}}
with no traceback. The API has no authentication of its own, because submissions carry
their organizer's signature. The server listens on loopback unless `--http` names
another address. On loopback it also rejects Host headers other than loopback names
(DNS rebinding) and cross-origin POSTs (CSRF from a page the organizer's browser has
open).
`docs/api.md` describes the endpoints and `docs/openapi.yaml` their schemas.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import mimetypes
import re
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from fairu.addresses import parse_host_port
from fairu.protocol.errors import ConfigError, ErrorCode, RejectedError
from fairu.protocol.evaluation import EvaluationStatus, EvaluationSummary

from .evaluations import MAX_REQUEST_BYTES
from .store import Store

logger = logging.getLogger(__name__)

DEFAULT_HTTP_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8480
API_PREFIX = "/api/v1"
# The largest request body read: the envelope size that `Evaluations` accepts.
MAX_BODY_BYTES = MAX_REQUEST_BYTES
WEB_ROOT = Path(__file__).parent / "web"
WEB_FILES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
# Names of files an evaluation may offer for download: one path component.
ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

# Errors of the signature chain; any other rejection of a submission is a 400.
UNTRUSTED_CODES = frozenset({
    ErrorCode.UNKNOWN_KEY,
    ErrorCode.BAD_CERTIFICATE,
    ErrorCode.CERTIFICATE_EXPIRED,
    ErrorCode.KEY_REVOKED,
    ErrorCode.BAD_SIGNATURE,
})
DUPLICATE_CODES = frozenset({ErrorCode.REPLAYED})

# The page is static: its script and style come from this server alone.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
# An artifact such as report.html is written by the competition's scoring program,
# so it opens as a sandboxed document: no scripts, and no access to this origin.
ARTIFACT_POLICY = "sandbox; default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class EvaluationService(Protocol):
    """The part of the coordinator's `Evaluations` that the API calls.

    `artifact_path` blocks on SQLite and the file system, so the API calls it in a
    thread; the coroutines do their own blocking work in threads.
    """

    async def submit(self, body: bytes) -> EvaluationStatus: ...

    async def status(self, evaluation_id: str) -> EvaluationStatus | None: ...

    async def list(self) -> list[EvaluationSummary]: ...

    def artifact_path(self, evaluation_id: str, name: str) -> Path | None: ...

    async def cancel(self, evaluation_id: str) -> EvaluationStatus | None: ...


STORE_KEY = web.AppKey("store", Store)
EVALUATIONS_KEY: web.AppKey[EvaluationService | None] = web.AppKey("evaluations")
MAX_BODY_KEY = web.AppKey("max_body_bytes", int)
LOOPBACK_ONLY_KEY = web.AppKey("loopback_only", bool)
REQUEST_ID_KEY = web.RequestKey("request_id", str)


class ApiError(Exception):
    """An error returned to the client as JSON with this status and code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def make_app(
    store: Store,
    evaluations: EvaluationService | None,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    loopback_only: bool = True,
) -> web.Application:
    """Build the API application; `loopback_only` rejects non-loopback Host headers.

    With `evaluations` None, the evaluation endpoints respond with 503 and the
    fleet is still served.
    """
    # aiohttp's own cap is set one byte above ours, so `_read_body` responds first.
    app = web.Application(
        client_max_size=max_body_bytes + 1, middlewares=[_errors, _guard_origin]
    )
    app[STORE_KEY] = store
    app[EVALUATIONS_KEY] = evaluations
    app[MAX_BODY_KEY] = max_body_bytes
    app[LOOPBACK_ONLY_KEY] = loopback_only
    app.router.add_get("/", _page)
    for name in WEB_FILES:
        app.router.add_get(f"/{name}", _web_file)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/openapi.json", _openapi)
    app.router.add_post(f"{API_PREFIX}/evaluations", _submit)
    app.router.add_get(f"{API_PREFIX}/evaluations", _list_evaluations)
    app.router.add_get(f"{API_PREFIX}/evaluations/{{evaluation_id}}", _show_evaluation)
    app.router.add_post(
        f"{API_PREFIX}/evaluations/{{evaluation_id}}/cancel", _cancel_evaluation
    )
    app.router.add_get(
        f"{API_PREFIX}/evaluations/{{evaluation_id}}/artifacts/{{name}}", _artifact
    )
    app.router.add_get(f"{API_PREFIX}/agents", _agents)
    return app


# --- middleware -------------------------------------------------------------------


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Return every error as JSON with a request id, and log it with that id."""
    request_id = uuid.uuid4().hex[:12]
    request[REQUEST_ID_KEY] = request_id
    try:
        response = await handler(request)
    except ApiError as exc:
        level = logging.WARNING if exc.status >= 500 else logging.INFO
        logger.log(
            level, "request %s %s %s failed with %d %s: %s",
            request_id, request.method, request.path, exc.status, exc.code, exc.message,
        )
        return _error_response(exc.status, exc.code, exc.message, request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = _http_message(request, exc)
        logger.info(
            "request %s %s %s failed with %d: %s",
            request_id, request.method, request.path, exc.status, message,
        )
        return _error_response(exc.status, code, message, request_id)
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception(
            "request %s %s %s failed with an internal error",
            request_id, request.method, request.path,
        )
        return _error_response(
            500, "internal_error",
            f"the coordinator failed on this request; its log has request id {request_id}",
            request_id,
        )
    response.headers["X-Request-Id"] = request_id
    return response


_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}


def _http_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no endpoint {request.path}; GET /openapi.json lists the endpoints"
    if exc.status == 405:
        return f"{request.method} is not allowed on {request.path}"
    if exc.status == 413:
        return f"the request body exceeds {request.app[MAX_BODY_KEY]} bytes"
    return exc.reason


@web.middleware
async def _guard_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.app[LOOPBACK_ONLY_KEY] and not _is_loopback_host(request.host):
        raise ApiError(
            421, "misdirected_request",
            f"this server accepts only loopback host names, not {request.host!r}",
        )
    origin = request.headers.get("Origin")
    if request.method not in ("GET", "HEAD", "OPTIONS") and origin is not None:
        if origin != f"{request.scheme}://{request.host}":
            raise ApiError(
                403, "cross_origin",
                f"a {request.method} from origin {origin!r} is not allowed; send it "
                "without an Origin header, as fairu-admin and curl do",
            )
    return await handler(request)


def _is_loopback_host(host: str) -> bool:
    name = host
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _error_response(
    status: int, code: str, message: str, request_id: str
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}},
        status=status,
        headers={"X-Request-Id": request_id},
    )


# --- the page ---------------------------------------------------------------------


async def _page(request: web.Request) -> web.StreamResponse:
    return _static_file("index.html")


async def _web_file(request: web.Request) -> web.StreamResponse:
    return _static_file(request.path.lstrip("/"))


def _static_file(name: str) -> web.FileResponse:
    response = web.FileResponse(
        WEB_ROOT / name,
        headers={
            "Content-Type": WEB_FILES[name],
            "Content-Security-Policy": PAGE_POLICY,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        },
    )
    return response


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _openapi(request: web.Request) -> web.Response:
    from .openapi import openapi_document

    return web.json_response(openapi_document())


# --- evaluations ------------------------------------------------------------------


def _evaluations(request: web.Request) -> EvaluationService:
    evaluations = request.app[EVALUATIONS_KEY]
    if evaluations is None:
        raise ApiError(
            503, "evaluations_disabled",
            "this coordinator runs no evaluations; start fairu-coordinator with "
            "--keys-dir naming a folder with a certified job-signing key",
        )
    return evaluations


async def _submit(request: web.Request) -> web.Response:
    evaluations = _evaluations(request)
    body = await _read_body(request)
    try:
        status = await evaluations.submit(body)
    except RejectedError as exc:
        raise ApiError(_rejection_status(exc.code), str(exc.code), exc.message) from None
    logger.info(
        "request %s submitted evaluation %s (%d shards)",
        request[REQUEST_ID_KEY], status.evaluation_id, status.shards_total,
    )
    return _model_response(status, status=201)


def _rejection_status(code: ErrorCode) -> int:
    if code in UNTRUSTED_CODES:
        return 403
    if code in DUPLICATE_CODES:
        return 409
    if code is ErrorCode.MESSAGE_TOO_LARGE:
        return 413
    if code is ErrorCode.INTERNAL_ERROR:
        # The broker or the coordinator's key folder failed, not the request.
        return 503
    return 400


async def _read_body(request: web.Request) -> bytes:
    """Read the body in chunks and stop at the cap, whatever the Content-Length."""
    limit = request.app[MAX_BODY_KEY]
    too_large = ApiError(
        413, str(ErrorCode.MESSAGE_TOO_LARGE),
        f"the request body exceeds the limit of {limit} bytes",
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise ApiError(
            400, str(ErrorCode.BAD_ENVELOPE),
            "the request body is empty; send the signed envelope JSON of an "
            "evaluation request",
        )
    return body


async def _list_evaluations(request: web.Request) -> web.Response:
    summaries = await _evaluations(request).list()
    return web.json_response([summary.model_dump(mode="json") for summary in summaries])


async def _show_evaluation(request: web.Request) -> web.Response:
    status = await _find(request)
    return _model_response(status)


async def _cancel_evaluation(request: web.Request) -> web.Response:
    evaluation_id = (await _find(request)).evaluation_id
    status = await _evaluations(request).cancel(evaluation_id)
    if status is None:
        raise _unknown_evaluation(evaluation_id)
    logger.info(
        "request %s cancelled evaluation %s, now %s",
        request[REQUEST_ID_KEY], evaluation_id, status.state.value,
    )
    return _model_response(status)


async def _find(request: web.Request) -> EvaluationStatus:
    evaluation_id = request.match_info["evaluation_id"]
    status = await _evaluations(request).status(evaluation_id)
    if status is None:
        raise _unknown_evaluation(evaluation_id)
    return status


def _unknown_evaluation(evaluation_id: str) -> ApiError:
    return ApiError(
        404, "unknown_evaluation",
        f"no evaluation {evaluation_id!r}; GET {API_PREFIX}/evaluations lists them",
    )


async def _artifact(request: web.Request) -> web.StreamResponse:
    evaluation_id = request.match_info["evaluation_id"]
    name = request.match_info["name"]
    if not ARTIFACT_NAME.fullmatch(name):
        raise ApiError(
            400, "invalid_name",
            f"invalid artifact name {name!r}: use one file name of letters, digits, "
            "'.', '_' or '-'",
        )
    status = await _find(request)
    path = await asyncio.to_thread(
        _evaluations(request).artifact_path, evaluation_id, name
    )
    if path is None or not await asyncio.to_thread(path.is_file):
        raise ApiError(
            404, "unknown_artifact",
            f"evaluation {evaluation_id} has no artifact {name!r}; it has "
            f"{', '.join(status.artifacts) or 'none yet'}",
        )
    # FileResponse sends the file from a thread (sendfile where it can).
    return web.FileResponse(
        path,
        headers={
            "Content-Type": artifact_content_type(name),
            "Content-Security-Policy": ARTIFACT_POLICY,
            "X-Content-Type-Options": "nosniff",
        },
    )


def artifact_content_type(name: str) -> str:
    """Return the media type served for an artifact, from its file extension."""
    guessed, _encoding = mimetypes.guess_type(name, strict=True)
    if guessed is None:
        return "application/octet-stream"
    if guessed.startswith("text/") or guessed == "application/json":
        return f"{guessed}; charset=utf-8"
    return guessed


def _model_response(model: EvaluationStatus, status: int = 200) -> web.Response:
    return web.Response(
        body=model.model_dump_json().encode(),
        status=status,
        content_type="application/json",
    )


# --- the fleet --------------------------------------------------------------------


async def _agents(request: web.Request) -> web.Response:
    agents = await asyncio.to_thread(fleet, request.app[STORE_KEY])
    return web.json_response(agents)


def fleet(store: Store) -> list[dict[str, Any]]:
    """Return every agent as `fairu-admin agents list --json` prints it."""
    # Imported here because fairu-admin imports this module for its defaults.
    from .admin import gpus_by_model

    agents = store.agents()
    for agent in agents:
        agent["gpus_by_model"] = gpus_by_model(agent)
    return agents


# --- the server -------------------------------------------------------------------


def parse_listen(text: str) -> tuple[str, int]:
    """Split HOST:PORT for `--http`; raise ConfigError when it is invalid."""
    return parse_host_port(text, "--http", f"{DEFAULT_HTTP_HOST}:{DEFAULT_HTTP_PORT}")


def is_loopback_address(host: str) -> bool:
    return _is_loopback_host(f"[{host}]" if ":" in host else host)


class ApiServer:
    """The API application bound to one address; `start` raises ConfigError if taken."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"cannot serve the HTTP API on {self.host}:{self.port}: the port is "
                    "already in use (another coordinator?); choose another with "
                    "--http HOST:PORT"
                ) from None
            raise ConfigError(
                f"cannot serve the HTTP API on {self.host}:{self.port}: {exc.strerror}"
            ) from None
        self._runner = runner
        if self.port == 0:
            sockets = runner.addresses
            self.port = int(sockets[0][1])
        logger.info("HTTP API serving on %s", self.url)

    async def stop(self) -> None:
        if self._runner is None:
            return
        await self._runner.cleanup()
        self._runner = None
        logger.info("HTTP API on %s stopped", self.url)
