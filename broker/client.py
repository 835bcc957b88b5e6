"""The organizer's side of the coordinator's HTTP API: requests and their rendering.

`fairu-admin evaluate` and `fairu-admin evaluations` use it. The rendering
functions are pure, so the progress bar and the tables are tested without a server.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import TextIO, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from fairu.protocol.errors import ConfigError, FairuError
from fairu.protocol.evaluation import (
    EvaluationState,
    EvaluationStatus,
    EvaluationSummary,
)
from fairu.protocol.signing import describe_validation

from .api import API_PREFIX, DEFAULT_HTTP_HOST, DEFAULT_HTTP_PORT

logger = logging.getLogger(__name__)

DEFAULT_COORDINATOR_URL = f"http://{DEFAULT_HTTP_HOST}:{DEFAULT_HTTP_PORT}"
REQUEST_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 1.0
FINAL_STATES = frozenset(
    {EvaluationState.FINISHED, EvaluationState.FAILED, EvaluationState.CANCELLED}
)
# The maximum bytes of a response read. An evaluation of 100 000 shards is an
# estimated 30 MB of JSON.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024

ModelT = TypeVar("ModelT", bound=BaseModel)


class CoordinatorError(FairuError):
    """The coordinator could not be reached, or it responded with an error."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class CoordinatorClient:
    """Blocking calls to the coordinator's API at `url`, such as http://127.0.0.1:8480."""

    def __init__(self, url: str, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        try:
            parts = urllib.parse.urlsplit(url)
            # Reading the port checks it: a port that is not a number from 0 to
            # 65535 raises ValueError here instead of inside urlopen.
            parts.port
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"invalid coordinator URL {url!r}: use http://HOST:PORT, such as "
                f"{DEFAULT_COORDINATOR_URL}"
            )
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def submit(self, envelope: bytes) -> EvaluationStatus:
        data = self._request("POST", f"{API_PREFIX}/evaluations", envelope)
        return _parse(data, EvaluationStatus)

    def status(self, evaluation_id: str) -> EvaluationStatus:
        path = f"{API_PREFIX}/evaluations/{urllib.parse.quote(evaluation_id, safe='')}"
        return _parse(self._request("GET", path), EvaluationStatus)

    def list(self) -> list[EvaluationSummary]:
        data = self._request("GET", f"{API_PREFIX}/evaluations")
        try:
            return _SUMMARIES.validate_json(data)
        except ValidationError as exc:
            raise CoordinatorError(
                f"the coordinator sent an invalid evaluation list: {describe_validation(exc)}"
            ) from None

    def cancel(self, evaluation_id: str) -> EvaluationStatus:
        quoted = urllib.parse.quote(evaluation_id, safe="")
        data = self._request("POST", f"{API_PREFIX}/evaluations/{quoted}/cancel", b"")
        return _parse(data, EvaluationStatus)

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(
            self.url + path,
            data=body,
            method=method,
            headers={"Accept": "application/json", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read(MAX_RESPONSE_BYTES)
        except urllib.error.HTTPError as exc:
            raise _error_from_response(method, self.url + path, exc) from None
        except urllib.error.URLError as exc:
            reason = getattr(exc.reason, "strerror", None) or exc.reason
            raise CoordinatorError(
                f"cannot reach the coordinator at {self.url}: {reason}; check that "
                "fairu-coordinator runs with --http and that --coordinator names its "
                "address"
            ) from None
        except TimeoutError:
            raise CoordinatorError(
                f"the coordinator at {self.url} did not respond to {method} {path} within "
                f"{self.timeout_s:.0f} s"
            ) from None
        except OSError as exc:
            raise CoordinatorError(
                f"request {method} {path} to the coordinator at {self.url} failed: {exc}"
            ) from None


_SUMMARIES = TypeAdapter(list[EvaluationSummary])


def _error_from_response(method: str, url: str, exc: urllib.error.HTTPError) -> CoordinatorError:
    try:
        detail = json.loads(exc.read(64 * 1024))["error"]
        message = f"{detail['code']}: {detail['message']}"
    except (ValueError, KeyError, TypeError, OSError):
        message = f"HTTP {exc.code} {exc.reason}"
        if exc.code == 404:
            message += "; is this the coordinator's address?"
    return CoordinatorError(
        f"the coordinator responded to {method} {url} with {exc.code}: {message}",
        exc.code,
    )


def _parse(data: bytes, model: type[ModelT]) -> ModelT:
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise CoordinatorError(
            f"the coordinator sent an invalid {model.__name__}: {describe_validation(exc)}"
        ) from None


# --- following an evaluation --------------------------------------------------------


def follow(
    client: CoordinatorClient,
    evaluation_id: str,
    out: TextIO,
    *,
    tty: bool,
    poll_s: float = POLL_INTERVAL_S,
    sleep: Callable[[float], None] = time.sleep,
) -> EvaluationStatus:
    """Poll the evaluation until it is final, showing its progress on `out`.

    A TTY gets one progress bar redrawn in place; other outputs get a line each
    time the state or a shard count changes.
    """
    last_line = ""
    while True:
        status = client.status(evaluation_id)
        if tty:
            bar = render_progress(status)
            out.write("\r" + bar.ljust(len(last_line)))
            last_line = bar
        else:
            line = progress_line(status)
            if line != last_line:
                out.write(time.strftime("%H:%M:%S") + "  " + line + "\n")
                last_line = line
        out.flush()
        if status.state in FINAL_STATES:
            if tty:
                out.write("\n")
            return status
        sleep(poll_s)


def format_duration(seconds: float) -> str:
    """Return a duration as 45s, 3m05s or 2h10m."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _counts(summary: EvaluationSummary) -> str:
    text = (
        f"{summary.shards_done}/{summary.shards_total} shards done, "
        f"{summary.shards_running} running, {summary.shards_failed} failed"
    )
    if summary.state not in FINAL_STATES and summary.eta_s is not None:
        text += f", about {format_duration(summary.eta_s)} left"
    return text


def render_progress(summary: EvaluationSummary, width: int = 30) -> str:
    """Return a one-line progress bar: [#####-----] and the shard counts."""
    total = summary.shards_total
    filled = width if total == 0 else min(width, summary.shards_done * width // total)
    bar = "#" * filled + "-" * (width - filled)
    return f"[{bar}] {summary.state.value:<9} {_counts(summary)}"


def progress_line(summary: EvaluationSummary) -> str:
    """Return a plain progress line for a log or a pipe."""
    return f"{summary.evaluation_id} {summary.state.value}: {_counts(summary)}"


# --- tables -------------------------------------------------------------------------


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Align rows of cells in columns two spaces apart; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [value.ljust(width) for value, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _span(first: int, count: int) -> str:
    last = first + count - 1
    return str(first) if count == 1 else f"{first}-{last}"


def format_scores(scores: dict[str, float]) -> str:
    if not scores:
        return ""
    width = max(len(name) for name in scores)
    lines = [f"{'score':<{width}}  value"]
    lines.extend(f"{name:<{width}}  {value:.6g}" for name, value in scores.items())
    return "\n".join(lines)


def format_evaluation(status: EvaluationStatus) -> str:
    """Return an evaluation's summary, its shard table and its scores."""
    fields = [
        ("evaluation", status.evaluation_id),
        ("competition", status.competition),
        ("submission", status.submission_id),
        ("state", status.state.value),
        ("shards", _counts(status)),
        ("submitted", f"{status.submitted_at:%Y-%m-%d %H:%M:%S %Z}"),
    ]
    if status.finished_at is not None:
        fields.append(("finished", f"{status.finished_at:%Y-%m-%d %H:%M:%S %Z}"))
    if status.error:
        fields.append(("error", status.error))
    if status.artifacts:
        fields.append(("artifacts", ", ".join(status.artifacts)))
    width = max(len(name) for name, _ in fields)
    parts = ["\n".join(f"{name:<{width}}  {value}" for name, value in fields)]

    rows = [("SHARD", "SETS", "EXPERIMENTS", "STATE", "ATTEMPTS", "SITE", "AGENT",
             "DURATION")]
    for shard in status.shards:
        rows.append((
            str(shard.index),
            _span(shard.first_set, shard.sets),
            _span(shard.first_experiment, shard.experiments),
            shard.state.value,
            str(shard.attempts),
            shard.site or "-",
            shard.agent_id or "-",
            "-" if shard.duration_s is None else f"{shard.duration_s:.1f} s",
        ))
    if status.shards:
        parts.append(format_table(rows))
    errors = [f"shard {s.index}: {s.error}" for s in status.shards if s.error]
    if errors:
        parts.append("\n".join(errors))
    if status.scores:
        parts.append(format_scores(status.scores))
    return "\n\n".join(parts)


# Scores shown per row of `evaluations list`; a HiggsML-style scoring writes dozens of
# per-set values, which `evaluations show` prints in full.
LISTED_SCORES = 3


def _list_scores(scores: dict[str, float]) -> str:
    names = list(scores)
    text = ", ".join(f"{name}={scores[name]:.4g}" for name in names[:LISTED_SCORES])
    if len(names) > LISTED_SCORES:
        text += f" (+{len(names) - LISTED_SCORES} more)"
    return text


def format_evaluations(summaries: Sequence[EvaluationSummary]) -> str:
    """Return one row per evaluation; an empty list gives a sentence instead."""
    if not summaries:
        return "no evaluations"
    rows = [("EVALUATION", "SUBMISSION", "STATE", "DONE/TOTAL", "RUNNING", "FAILED",
             "SUBMITTED", "SCORES")]
    for summary in summaries:
        scores = _list_scores(summary.scores)
        rows.append((
            summary.evaluation_id,
            summary.submission_id,
            summary.state.value,
            f"{summary.shards_done}/{summary.shards_total}",
            str(summary.shards_running),
            str(summary.shards_failed),
            f"{summary.submitted_at:%Y-%m-%d %H:%M:%S}",
            scores or "-",
        ))
    return format_table(rows)
