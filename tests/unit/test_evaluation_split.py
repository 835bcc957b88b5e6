"""The split rule of sharded evaluations and the filling of shard placeholders."""

from __future__ import annotations

import pytest

from fairu.broker.evaluations import (
    Rectangle,
    count_shards,
    fill_placeholders,
    shard_job_id,
    split_shards,
)


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
