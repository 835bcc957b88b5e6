"""Tests of fairu.broker.predictions: parsing, shard completeness, pooling and files."""

import json

import numpy as np
import pytest

from fairu.broker.predictions import (
    RECORD_KEYS,
    IncompleteShardError,
    Predictions,
    PredictionsError,
    PredictionsTooLargeError,
    check_shard,
    check_unique,
    encode_predictions_json,
    parse_predictions,
    parse_shard,
    pool,
    read_predictions_json,
    read_predictions_npz,
    write_predictions_json,
    write_predictions_npz,
)

from ..prediction_data import load_score_program, shard_status

reference = load_score_program("higgsml_demo_score_predictions")


def record(set_index=0, experiment=0, **values):
    fields = {"mu_hat": 1.0, "delta_mu_hat": 0.2, "p16": 0.8, "p84": 1.2}
    fields.update(values)
    return {"set": set_index, "experiment": experiment, **fields}


def grid_records(first_set, sets, first_experiment, experiments):
    return [
        record(set_index, experiment, mu_hat=1.0 + set_index + experiment / 1000)
        for set_index in range(first_set, first_set + sets)
        for experiment in range(first_experiment, first_experiment + experiments)
    ]


def encode(value):
    return json.dumps(value).encode()


def message_of(data, **options):
    with pytest.raises(PredictionsError) as caught:
        parse_predictions(data, source="shard 4", **options)
    return str(caught.value)


# --- parsing ------------------------------------------------------------------------


def test_parse_valid_records():
    records = [record(2, 7, mu_hat=1.5), record(3, 0, mu_hat=-2, p16=-3, p84=5)]

    predictions = parse_predictions(encode(records))

    assert predictions.set.dtype == np.int64
    assert predictions.mu_hat.dtype == np.float64
    assert predictions.set.tolist() == [2, 3]
    assert predictions.experiment.tolist() == [7, 0]
    assert predictions.mu_hat.tolist() == [1.5, -2.0]
    assert predictions.p16.tolist() == [0.8, -3.0]
    assert predictions.to_records()[1] == {
        "set": 3,
        "experiment": 0,
        "mu_hat": -2.0,
        "delta_mu_hat": 0.2,
        "p16": -3.0,
        "p84": 5.0,
    }


def test_parse_ignores_extra_keys_and_inverted_interval():
    records = [record(0, 0, p16=2.0, p84=1.0, model="x", extra=[1, 2])]

    predictions = parse_predictions(encode(records))

    assert predictions.p16.tolist() == [2.0]
    assert predictions.p84.tolist() == [1.0]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "shard 4 is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
        (b"\xff[]", "shard 4 is not UTF-8"),
        (
            b"[" * 100_000 + b"]" * 100_000,
            "shard 4 is not valid JSON: nested too deeply",
        ),
        (b"{}", "shard 4 must contain a non-empty JSON list of records"),
        (b"[]", "shard 4 must contain a non-empty JSON list of records"),
        (encode([record(), 5]), "record 1 of shard 4 is not a JSON object"),
        (
            encode([record(), {"experiment": 1}]),
            "record 1 of shard 4: set None is missing or not an integer",
        ),
        (
            encode([record(True, 0)]),
            "record 0 of shard 4: set True is missing or not an integer",
        ),
        (
            encode([record(1.0, 0)]),
            "record 0 of shard 4: set 1.0 is missing or not an integer",
        ),
        (
            encode([record(0, "3")]),
            "record 0 of shard 4: experiment '3' is missing or not an integer",
        ),
        (encode([record(-1, 0)]), "record 0 of shard 4: set -1 is not in 0 .. 99999"),
        (
            encode([record(0, 0), record(100_000, 0)]),
            "record 1 of shard 4: set 100000 is not in 0 .. 99999",
        ),
        (
            encode([record(0, 2**70)]),
            f"record 0 of shard 4: experiment {2**70} is not in 0 .. 999999",
        ),
        (
            encode([record(0, 0, mu_hat=None)]),
            "record 0 of shard 4: mu_hat is missing or not a number (None)",
        ),
        (
            encode([record(0, 0, p84=False)]),
            "record 0 of shard 4: p84 is missing or not a number (False)",
        ),
        (
            encode([record(0, 0, p16="0.5")]),
            "record 0 of shard 4: p16 is missing or not a number ('0.5')",
        ),
        (
            encode([{"set": 0, "experiment": 0, "mu_hat": 1, "p16": 0, "p84": 2}]),
            "record 0 of shard 4: delta_mu_hat is missing or not a number (None)",
        ),
        (
            (
                b'[{"set": 0, "experiment": 0, "mu_hat": NaN, "delta_mu_hat": 1, '
                b'"p16": 0, "p84": 1}]'
            ),
            "record 0 of shard 4: mu_hat nan is not finite",
        ),
        (
            (
                b'[{"set": 0, "experiment": 0, "mu_hat": 1, "delta_mu_hat": 1, '
                b'"p16": -Infinity, "p84": 1}]'
            ),
            "record 0 of shard 4: p16 -inf is not finite",
        ),
        (
            (
                b'[{"set": 0, "experiment": 0, "mu_hat": 1, "delta_mu_hat": 1, '
                b'"p16": 0, "p84": 1e999}]'
            ),
            "record 0 of shard 4: p84 inf is not finite",
        ),
        (
            encode([record(0, 0), record(0, 1, delta_mu_hat=10**400)]),
            (
                "record 1 of shard 4: delta_mu_hat "
                "1000000000000000000000000000000000000... is not finite"
            ),
        ),
    ],
)
def test_parse_rejects_invalid(data, message):
    assert message_of(data).startswith(message)


def test_parse_rejects_like_reference(tmp_path):
    # Each body that the example's load_predictions rejects is rejected here too.
    bodies = [
        [record(True, 0)],
        [record(0, 0, mu_hat=True)],
        [record(0, 0, p16=None)],
        [record(0, 1.5)],
        [record(0, 0, p84=10**400)],
        [record(-1, 0)],
    ]
    for body in bodies:
        path = tmp_path / "predictions.json"
        path.write_bytes(encode(body))
        with pytest.raises(reference.ScoringError):
            reference.load_predictions(str(path), 10, 10)
        with pytest.raises(PredictionsError):
            parse_predictions(encode(body))


def test_parse_rejects_too_many_bytes():
    data = encode([record()])

    with pytest.raises(PredictionsTooLargeError) as caught:
        parse_predictions(data, source="shard 4", max_bytes=len(data) - 1)

    assert str(caught.value).startswith(
        f"shard 4 is {len(data)} bytes; the limit is {len(data) - 1} bytes"
    )


def test_parse_rejects_too_many_records():
    data = encode(grid_records(0, 1, 0, 11))

    with pytest.raises(PredictionsTooLargeError) as caught:
        parse_predictions(data, source="shard 4", max_records=10)

    assert str(caught.value).startswith(
        "shard 4 contains 11 '{' characters, so it may hold more than the limit of "
        "10 records"
    )


def test_parse_rejects_long_list_without_objects():
    with pytest.raises(PredictionsTooLargeError) as caught:
        parse_predictions(encode([0] * 11), source="shard 4", max_records=10)

    assert str(caught.value) == "shard 4 has 11 records; the limit is 10"


# --- shard completeness -------------------------------------------------------------


def test_parse_shard_complete():
    shard = shard_status(3, 2, 2, 10, 5)
    records = grid_records(2, 2, 10, 5)
    records.reverse()

    predictions = parse_shard(encode(records), shard)

    assert len(predictions) == 10
    assert predictions.set.tolist()[0] == 3


def test_shard_missing_duplicated_outside_message():
    shard = shard_status(3, 0, 2, 10, 20)
    records = grid_records(0, 2, 10, 20)
    del records[7]  # set 0 experiment 17
    del records[-1]  # set 1 experiment 29
    records.append(record(0, 11))
    records.append(record(0, 11))
    records.append(record(9, 0))

    with pytest.raises(IncompleteShardError) as caught:
        parse_shard(encode(records), shard)

    assert str(caught.value) == (
        "shard 3: 2 missing (set 0 experiment 17, set 1 experiment 29), "
        "1 duplicated (set 0 experiment 11: 3 records), "
        "1 outside the shard (set 9 experiment 0); the shard must predict each "
        "experiment 10 .. 29 of each set 0 .. 1 exactly once"
    )
    assert caught.value.shard == 3
    assert caught.value.missing.tolist() == [[0, 17], [1, 29]]
    assert caught.value.duplicated.tolist() == [[0, 11]]
    assert caught.value.outside.tolist() == [[9, 0]]


def test_shard_only_missing():
    shard = shard_status(0, 5, 1, 0, 4)
    records = grid_records(5, 1, 0, 3)

    with pytest.raises(IncompleteShardError) as caught:
        parse_shard(encode(records), shard)

    assert str(caught.value).startswith("shard 0: 1 missing (set 5 experiment 3);")
    assert caught.value.duplicated.shape == (0, 2)
    assert caught.value.outside.shape == (0, 2)


def test_shard_experiment_outside_in_known_set():
    shard = shard_status(1, 0, 1, 0, 3)
    records = grid_records(0, 1, 0, 3) + [record(0, 3)]

    with pytest.raises(IncompleteShardError) as caught:
        parse_shard(encode(records), shard)

    assert str(caught.value).startswith(
        "shard 1: 1 outside the shard (set 0 experiment 3);"
    )


def test_shard_message_lists_five_then_ellipsis():
    shard = shard_status(2, 0, 1, 0, 10)
    records = grid_records(0, 1, 0, 3)

    with pytest.raises(IncompleteShardError) as caught:
        parse_shard(encode(records), shard)

    assert str(caught.value).startswith(
        "shard 2: 7 missing (set 0 experiment 3, set 0 experiment 4, "
        "set 0 experiment 5, set 0 experiment 6, set 0 experiment 7, ...);"
    )
    assert len(caught.value.missing) == 7


def test_shard_rectangle_over_limit():
    shard = shard_status(6, 0, 100, 0, 1000)
    predictions = parse_predictions(encode(grid_records(0, 1, 0, 1)))

    with pytest.raises(PredictionsTooLargeError) as caught:
        check_shard(predictions, shard, max_records=99_999)

    assert str(caught.value) == (
        "shard 6 covers 100000 experiments; the limit is 99999 per shard. "
        "Split the evaluation into smaller shards."
    )


def test_shard_limits_follow_rectangle():
    shard = shard_status(5, 0, 1, 0, 3)
    doubled = grid_records(0, 1, 0, 3) * 2

    with pytest.raises(IncompleteShardError, match="3 duplicated"):
        parse_shard(encode(doubled), shard)
    with pytest.raises(PredictionsTooLargeError) as caught:
        parse_shard(encode(doubled + [record(0, 0)]), shard)

    assert str(caught.value).startswith(
        "shard 5 contains 7 '{' characters, so it may hold more than the limit of "
        "6 records"
    )


def test_shard_byte_limit_follows_rectangle():
    shard = shard_status(5, 0, 1, 0, 1)
    padded = encode([record(0, 0, comment="x" * 1100)])

    with pytest.raises(PredictionsTooLargeError) as caught:
        parse_shard(padded, shard)

    assert str(caught.value).startswith(
        f"shard 5 is {len(padded)} bytes; the limit is 1024 bytes"
    )


def test_shard_parse_error_names_shard():
    shard = shard_status(8, 0, 1, 0, 1)

    with pytest.raises(PredictionsError) as caught:
        parse_shard(encode([record(0, 0, mu_hat="x")]), shard)

    assert str(caught.value).startswith("record 0 of shard 8: mu_hat")


# --- pooling ------------------------------------------------------------------------


def test_pool_concatenates_in_order():
    first = parse_predictions(encode(grid_records(0, 1, 0, 2)))
    second = parse_predictions(encode(grid_records(1, 1, 0, 2)))

    pooled = pool([second, first])

    assert pooled.set.tolist() == [1, 1, 0, 0]
    assert pooled.experiment.tolist() == [0, 1, 0, 1]
    assert pooled.sorted().set.tolist() == [0, 0, 1, 1]


def test_pool_rejects_overlapping_shards():
    first = parse_predictions(encode(grid_records(0, 1, 0, 3)))
    second = parse_predictions(encode(grid_records(0, 1, 2, 3)))

    with pytest.raises(PredictionsError) as caught:
        pool([first, second])

    assert str(caught.value) == (
        "pooled predictions: 1 (set, experiment) pairs appear more than once "
        "(set 0 experiment 2)"
    )


def test_pool_without_unique_check_keeps_repeats():
    first = parse_predictions(encode(grid_records(0, 1, 0, 3)))

    assert len(pool([first, first], unique=False)) == 6


def test_pool_of_nothing_is_empty():
    pooled = pool([])

    assert len(pooled) == 0
    assert pooled.set.dtype == np.int64


def test_check_unique_passes_distinct_pairs():
    predictions = parse_predictions(encode(grid_records(0, 3, 0, 3)))

    check_unique(predictions)


# --- the Predictions type -----------------------------------------------------------


def test_predictions_rejects_wrong_dtype():
    arrays = {key: np.zeros(2) for key in RECORD_KEYS}

    with pytest.raises(TypeError, match="Predictions.set must be a NumPy int64 array"):
        Predictions(**arrays)


def test_predictions_rejects_unequal_lengths():
    arrays = {key: np.zeros(2) for key in RECORD_KEYS}
    arrays["set"] = np.zeros(2, dtype=np.int64)
    arrays["experiment"] = np.zeros(2, dtype=np.int64)
    arrays["p84"] = np.zeros(3)

    with pytest.raises(ValueError, match="Predictions.p84 has 3 entries"):
        Predictions(**arrays)


def test_predictions_rejects_two_dimensions():
    arrays = {key: np.zeros((2, 1)) for key in RECORD_KEYS}
    arrays["set"] = np.zeros((2, 1), dtype=np.int64)
    arrays["experiment"] = np.zeros((2, 1), dtype=np.int64)

    with pytest.raises(ValueError, match="must be 1-D"):
        Predictions(**arrays)


# --- files --------------------------------------------------------------------------

AWKWARD_FLOATS = [0.1, 1e-310, 5e-324, 1.7976931348623157e308, -0.0, 2.0**53 + 2, 1 / 3]


def awkward_predictions():
    records = [
        record(0, position, mu_hat=value, p16=-value, p84=value)
        for position, value in enumerate(AWKWARD_FLOATS)
    ]
    return parse_predictions(encode(records))


def assert_same_arrays(left, right):
    for key in RECORD_KEYS:
        left_bits = getattr(left, key).view(np.int64)
        right_bits = getattr(right, key).view(np.int64)
        assert np.array_equal(left_bits, right_bits), key


def test_json_round_trip_is_bit_exact(tmp_path):
    predictions = awkward_predictions()

    path = write_predictions_json(tmp_path / "predictions.json", predictions)
    again = read_predictions_json(path)

    assert path == tmp_path / "predictions.json"
    assert_same_arrays(predictions, again)


def test_json_file_readable_by_reference(tmp_path):
    predictions = parse_predictions(encode(grid_records(0, 2, 0, 5)))

    write_predictions_json(tmp_path / "predictions.json", predictions)
    records = reference.load_predictions(str(tmp_path), 2, 5)

    assert records == predictions.to_records()


def test_json_encoding_one_record_a_line():
    predictions = parse_predictions(encode(grid_records(0, 1, 0, 2)))

    lines = encode_predictions_json(predictions).decode().splitlines()

    assert lines[0] == "["
    assert lines[-1] == "]"
    assert json.loads(lines[1].rstrip(",")) == predictions.to_records()[0]


def test_json_read_rejects_repeats(tmp_path):
    path = tmp_path / "predictions.json"
    path.write_bytes(encode([record(0, 1), record(0, 1)]))

    with pytest.raises(PredictionsError) as caught:
        read_predictions_json(path)

    assert str(caught.value) == (
        f"{path}: 1 (set, experiment) pairs appear more than once (set 0 experiment 1)"
    )


def test_json_read_checks_grid(tmp_path):
    path = tmp_path / "predictions.json"
    path.write_bytes(encode([record(0, 1), record(2, 0)]))

    with pytest.raises(PredictionsError) as caught:
        read_predictions_json(path, num_sets=2, experiments_per_set=5)

    assert str(caught.value) == f"record 1 of {path}: set 2 is not in 0 .. 1"


def test_json_read_missing_file(tmp_path):
    with pytest.raises(PredictionsError, match="failed to read .*missing.json"):
        read_predictions_json(tmp_path / "missing.json")


def test_json_read_bounded(tmp_path):
    path = tmp_path / "predictions.json"
    path.write_bytes(encode(grid_records(0, 1, 0, 20)))

    with pytest.raises(PredictionsTooLargeError, match="larger than the limit of 100"):
        read_predictions_json(path, max_bytes=100)


def test_npz_round_trip_is_bit_exact(tmp_path):
    predictions = awkward_predictions()

    path = write_predictions_npz(tmp_path / "pooled.npz", predictions)
    again = read_predictions_npz(path)

    assert path == tmp_path / "pooled.npz"
    assert sorted(path.parent.iterdir()) == [path]
    assert_same_arrays(predictions, again)


def _save_npz(path, **arrays):
    with path.open("wb") as handle:
        np.savez(handle, **arrays)


def _valid_arrays():
    predictions = parse_predictions(encode(grid_records(0, 1, 0, 3)))
    arrays = {key: getattr(predictions, key) for key in RECORD_KEYS}
    return {"format": np.int64(1), **arrays}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda arrays: arrays.pop("p16"), "contains the arrays"),
        (lambda arrays: arrays.update(format=np.int64(2)), "has format"),
        (
            lambda arrays: arrays.update(set=arrays["set"].astype(np.float64)),
            "Predictions.set must be a NumPy int64 array",
        ),
        (
            lambda arrays: arrays.update(mu_hat=np.array([1.0, np.nan, 1.0])),
            "record 1 of .*: mu_hat is not finite",
        ),
        (
            lambda arrays: arrays.update(experiment=np.array([0, -1, 2])),
            "record 1 of .*: experiment -1 is not in 0 .. 999999",
        ),
        (
            lambda arrays: arrays.update(experiment=np.array([0, 0, 2])),
            r"1 \(set, experiment\) pairs appear more than once",
        ),
    ],
)
def test_npz_read_rejects_invalid(tmp_path, change, message):
    arrays = _valid_arrays()
    change(arrays)
    path = tmp_path / "pooled.npz"
    _save_npz(path, **arrays)

    with pytest.raises(PredictionsError, match=message):
        read_predictions_npz(path)


def test_npz_read_rejects_pickled_objects(tmp_path):
    arrays = _valid_arrays()
    arrays["mu_hat"] = np.array([1.0, "x", None], dtype=object)
    path = tmp_path / "pooled.npz"
    _save_npz(path, **arrays)

    with pytest.raises(PredictionsError, match="failed to read"):
        read_predictions_npz(path)


def test_npz_read_rejects_other_file(tmp_path):
    path = tmp_path / "pooled.npz"
    path.write_bytes(b"not an archive")

    with pytest.raises(PredictionsError, match="failed to read"):
        read_predictions_npz(path)


def test_npz_read_rejects_too_many_records(tmp_path):
    path = write_predictions_npz(
        tmp_path / "pooled.npz", parse_predictions(encode(grid_records(0, 1, 0, 3)))
    )

    with pytest.raises(PredictionsTooLargeError, match="has 3 records; the limit is 2"):
        read_predictions_npz(path, max_records=2)
