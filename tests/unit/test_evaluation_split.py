"""The split rule of sharded evaluations, the filling of shard placeholders and the
placeholder check of a request."""

from __future__ import annotations

from datetime import timedelta

import pytest

from fairu.broker.evaluations import (
    Rectangle,
    _check_request,
    count_shards,
    fill_placeholders,
    shard_job_id,
    split_shards,
)
from fairu.protocol.errors import RejectedError
from fairu.protocol.evaluation import EvaluationRequest
from fairu.protocol.models import utc_now


def _cells(shards: list[Rectangle]) -> list[tuple[int, int]]:
    return [
        (s, e)
        for shard in shards
        for s in range(shard.first_set, shard.first_set + shard.sets)
        for e in range(shard.first_experiment, shard.first_experiment + shard.experiments)
    ]


@pytest.mark.parametrize(
    ("num_sets", "experiments", "shard_size"),
    [(1, 1, 1), (7, 4, 4), (7, 4, 28), (7, 4, 100), (4, 25, 10), (3, 7, 3), (5, 3, 7)],
)
def test_split_covers_grid_once(num_sets: int, experiments: int, shard_size: int) -> None:
    shards = split_shards(num_sets, experiments, shard_size)

    cells = _cells(shards)
    assert sorted(cells) == [(s, e) for s in range(num_sets) for e in range(experiments)]
    assert len(cells) == len(set(cells))
    assert all(1 <= shard.size <= shard_size for shard in shards)
    assert len(shards) == count_shards(num_sets, experiments, shard_size)


def test_split_whole_sets_with_rest_in_last_shard() -> None:
    shards = split_shards(5, 3, 7)

    assert shards == [Rectangle(0, 2, 0, 3), Rectangle(2, 2, 0, 3), Rectangle(4, 1, 0, 3)]


def test_split_within_sets_never_spans_two() -> None:
    shards = split_shards(2, 7, 3)

    assert shards[:3] == [Rectangle(0, 1, 0, 3), Rectangle(0, 1, 3, 3), Rectangle(0, 1, 6, 1)]
    assert all(shard.sets == 1 for shard in shards)


def test_fill_placeholders_in_every_word() -> None:
    words = ["--first-set={first_set}", "{sets}", "-e {first_experiment}:{experiments}",
             "--base-seed", "{base_seed}", "{unknown}"]

    filled = fill_placeholders(words, Rectangle(3, 2, 5, 4), 2024)

    assert filled == ["--first-set=3", "2", "-e 5:4", "--base-seed", "2024", "{unknown}"]


def test_shard_job_id_fits_identifier() -> None:
    assert shard_job_id("ev-1", 12, 3) == "ev-1.s12.a3"


def _request(command: list[str]) -> EvaluationRequest:
    now = utc_now()
    return EvaluationRequest(
        evaluation_id="ev-1",
        competition="demo",
        queue="cpu",
        submission_id="sub-1",
        image="localhost/fairu-python:1",
        command=command,
        num_sets=2,
        experiments_per_set=4,
        shard_size=4,
        base_seed=1,
        mu_true=[1.0, 1.0],
        created_at=now,
        expires_at=now + timedelta(hours=1),
    )


RECTANGLE = ["{first_set}", "{sets}", "{first_experiment}", "{experiments}"]


def test_check_request_rejects_unknown_placeholder() -> None:
    request = _request(["run", *RECTANGLE, "--seed", "{base-seed}"])
    with pytest.raises(RejectedError, match=r"contains \{base-seed\}, which is not a placeholder"):
        _check_request(request, timedelta(minutes=5))


def test_check_request_keeps_shell_braces() -> None:
    script = 'echo "${HOME}" | awk "{print $1}"; exec run "$@"'
    request = _request(["/bin/sh", "-c", script, "sh", *RECTANGLE, "{attempt}", "{base_seed}"])
    _check_request(request, timedelta(minutes=5))
