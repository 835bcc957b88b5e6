"""`fairu-admin evaluate` and `evaluations`: the progress display, the tables and
the client's URL and connection errors, without a coordinator."""

from __future__ import annotations

import io
import socket
from datetime import UTC, datetime

import pytest

from fairu.broker import admin
from fairu.broker.client import (
    CoordinatorClient,
    follow,
    format_duration,
    format_evaluation,
    format_evaluations,
    progress_line,
    render_progress,
)
from fairu.protocol.errors import ConfigError
from fairu.protocol.evaluation import (
    EvaluationState,
    EvaluationStatus,
    ShardState,
    ShardStatus,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def shard(index: int, state: ShardState, **fields) -> ShardStatus:
    values = {
        "index": index, "first_set": index * 2, "sets": 2, "first_experiment": 0,
        "experiments": 50, "state": state, "attempts": 1,
    }
    values.update(fields)
    return ShardStatus(**values)


def status(**fields) -> EvaluationStatus:
    values = {
        "evaluation_id": "eval-1", "competition": "higgsml-demo",
        "submission_id": "sample", "state": EvaluationState.RUNNING,
        "shards_total": 4, "shards_done": 1, "shards_running": 2, "shards_failed": 0,
        "submitted_at": T0, "eta_s": 95.0,
    }
    values.update(fields)
    return EvaluationStatus(**values)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (44.6, "45s"), (60, "1m00s"), (185, "3m05s"), (7800, "2h10m"), (-3, "0s")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_progress_bar_counts():
    line = render_progress(status(), width=20)
    assert line.startswith("[#####---------------] running ")
    assert "1/4 shards done, 2 running, 0 failed, about 1m35s left" in line


def test_progress_bar_full_when_finished():
    line = render_progress(
        status(state=EvaluationState.FINISHED, shards_done=4, shards_running=0, eta_s=0.0),
        width=8,
    )
    assert line.startswith("[########] finished")
    assert "left" not in line


def test_progress_bar_without_shards():
    line = render_progress(status(shards_total=0, shards_done=0, shards_running=0), width=4)
    assert line.startswith("[####]")


def test_progress_line_plain():
    assert progress_line(status(eta_s=None)) == (
        "eval-1 running: 1/4 shards done, 2 running, 0 failed"
    )


class ScriptedClient:
    """Returns the given statuses from `status`, one per call."""

    def __init__(self, statuses: list[EvaluationStatus]) -> None:
        self.statuses = list(statuses)

    def status(self, evaluation_id: str) -> EvaluationStatus:
        return self.statuses.pop(0)


def test_follow_plain_prints_changes_only():
    client = ScriptedClient([
        status(),
        status(),
        status(shards_done=3, shards_running=1, eta_s=10.0),
        status(state=EvaluationState.FINISHED, shards_done=4, shards_running=0),
    ])
    out = io.StringIO()
    sleeps = []
    final = follow(client, "eval-1", out, tty=False, sleep=sleeps.append)  # type: ignore[arg-type]
    assert final.state is EvaluationState.FINISHED
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("eval-1 running: 1/4 shards done, 2 running, 0 failed, about 1m35s left")
    assert lines[2].endswith("eval-1 finished: 4/4 shards done, 0 running, 0 failed")
    assert len(sleeps) == 3
    assert "\r" not in out.getvalue()


def test_follow_tty_redraws_one_line():
    client = ScriptedClient([
        status(),
        status(state=EvaluationState.FAILED, shards_failed=1, shards_running=0),
    ])
    out = io.StringIO()
    follow(client, "eval-1", out, tty=True, sleep=lambda _s: None)  # type: ignore[arg-type]
    text = out.getvalue()
    assert text.count("\r") == 2
    assert text.endswith("\n")
    assert text.count("\n") == 1
    assert "[" in text.split("\r")[2]


def test_shard_table():
    text = format_evaluation(status(
        state=EvaluationState.FINISHED,
        finished_at=T0,
        scores={"coverage": 0.683, "quantiles_score": 1.25},
        artifacts=["coverage.png", "report.html"],
        shards=[
            shard(0, ShardState.DONE, site="uni-a", agent_id="uni-a-0001", duration_s=12.34),
            shard(1, ShardState.FAILED, attempts=3, sets=1, error="nonzero_exit: exit 1"),
        ],
    ))
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("SHARD"))
    assert header.split() == [
        "SHARD", "SETS", "EXPERIMENTS", "STATE", "ATTEMPTS", "SITE", "AGENT", "DURATION",
    ]
    done = lines[lines.index(header) + 1].split()
    assert done == ["0", "0-1", "0-49", "done", "1", "uni-a", "uni-a-0001", "12.3", "s"]
    failed = lines[lines.index(header) + 2].split()
    assert failed == ["1", "2", "0-49", "failed", "3", "-", "-", "-"]
    assert "shard 1: nonzero_exit: exit 1" in lines
    assert "artifacts    coverage.png, report.html" in lines
    assert any(line.split() == ["coverage", "0.683"] for line in lines)
    assert any(line.split() == ["quantiles_score", "1.25"] for line in lines)


def test_shard_table_columns_aligned():
    text = format_evaluation(status(shards=[
        shard(0, ShardState.RUNNING, site="a", agent_id="short"),
        shard(11, ShardState.QUEUED, attempts=0, site="long-site-name", agent_id="x"),
    ]))
    table = [line for line in text.splitlines() if line[:1].isdigit() or line.startswith("SHARD")]
    starts = {line.index(word) for line, word in zip(table, ["STATE", "running", "queued"])}
    assert len(starts) == 1


def test_evaluations_list_table():
    text = format_evaluations([
        status(),
        status(evaluation_id="eval-2", state=EvaluationState.FINISHED, shards_done=4,
               shards_running=0, scores={"coverage": 0.7}),
    ])
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["EVALUATION", "SUBMISSION", "STATE"]
    assert lines[1].split()[:4] == ["eval-1", "sample", "running", "1/4"]
    assert lines[2].split()[-1] == "coverage=0.7"
    assert format_evaluations([]) == "no evaluations"


def test_evaluations_list_caps_scores():
    scores = {"quantiles_score": 1.5} | {f"set_{i}.coverage": 0.5 for i in range(10)}
    text = format_evaluations([
        status(state=EvaluationState.FINISHED, shards_done=4, shards_running=0,
               scores=scores),
    ])
    row = text.splitlines()[1]
    assert row.endswith(
        "quantiles_score=1.5, set_0.coverage=0.5, set_1.coverage=0.5 (+8 more)"
    )
    assert "set_2.coverage" not in row


@pytest.mark.parametrize(
    "url",
    [
        "127.0.0.1:8480",
        "ftp://127.0.0.1/",
        "http://",
        "coordinator",
        "http://127.0.0.1:notaport",
        "http://127.0.0.1:99999",
        "http://[::1",
    ],
)
def test_client_bad_url(url):
    with pytest.raises(ConfigError, match="invalid coordinator URL"):
        CoordinatorClient(url)


def test_cli_connection_refused(capsys):
    # A port bound and closed again has no listener.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    code = admin.main(["evaluations", "show", "eval-1", "--coordinator", url])
    assert code == 1
    error = capsys.readouterr().err
    assert f"cannot reach the coordinator at {url}: Connection refused" in error
    assert "Traceback" not in error
