"""Tests of fairu.broker.scoring against the example challenge's own scoring program.

Every comparison is exact (==) with compute_scores in
examples/higgsml-demo/scoring_program/score.py on the same records.
"""

import json
import math
import warnings

import numpy as np
import pytest

from fairu.broker.predictions import Predictions, parse_predictions, parse_shard, pool
from fairu.broker.scoring import (
    MAX_SETS_WITH_PER_SET_SCORES,
    ScoringError,
    coverage_band,
    exact_group_sums,
    exact_sum,
    pooled_scores,
)
from fairu.protocol.evaluation import ShardState

from ..prediction_data import (
    load_score_program,
    random_predictions,
    shard_status,
)

reference = load_score_program("higgsml_demo_score_pooled")


def make_predictions(rng, num_sets, experiments, *, width_scale=0.3, bias=0.0):
    """Return (Predictions, mu_true) for a full grid with random, skewed intervals."""
    return random_predictions(
        rng,
        num_sets,
        experiments,
        bias=bias,
        half_width_mean=width_scale,
        half_width_sd=width_scale / 3,
        skewed_p84=True,
    )


def assert_same_as_reference(predictions, mu_true):
    ours = pooled_scores(predictions, mu_true)
    theirs = reference.compute_scores(predictions.to_records(), np.asarray(mu_true))
    assert list(ours) == list(theirs)
    for name, value in theirs.items():
        assert ours[name] == value, name
    return ours


# --- exact summation ----------------------------------------------------------------


def _fsum_or_inf(values):
    try:
        return math.fsum(values)
    except OverflowError:
        return math.inf


@pytest.mark.parametrize("seed", range(12))
def test_exact_sum_matches_fsum_wide_exponents(seed):
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 5000))
    exponents = rng.integers(-1074, 1000, count).astype(np.float64)
    values = np.abs(rng.normal(1.0, 1.0, count)) * np.exp2(exponents)
    values = values[np.isfinite(values)]

    assert exact_sum(values) == _fsum_or_inf(values)


def test_exact_sum_matches_fsum_subnormals():
    rng = np.random.default_rng(7)
    values = rng.integers(0, 2**52, 3000).astype(np.float64) * 2.0**-1074

    assert values.min() < 2.0**-1022
    assert exact_sum(values) == math.fsum(values)


def test_exact_sum_subnormal_result():
    values = np.array([5e-324, 3 * 5e-324, 2.0**-1070, 0.0])

    assert exact_sum(values) == math.fsum(values)
    assert exact_sum(values) == 4 * 5e-324 + 2.0**-1070


def test_exact_sum_many_equal_values_carry():
    # 2**20 copies of a value with all 53 significand bits set: the bin sums carry
    # far beyond 53 bits.
    values = np.full(2**20, 1.0 - 2.0**-53)

    assert exact_sum(values) == math.fsum(values)


def test_exact_sum_half_way_rounding():
    # 2**53 + 1 is half-way between two floats and rounds to even.
    values = np.array([2.0**53, 0.5, 0.5, 1.0, 2.0**-60])

    assert exact_sum(values) == math.fsum(values)


def test_exact_sum_differs_from_naive_sum():
    # The data of the equality tests is only a check if a naive sum would fail it.
    rng = np.random.default_rng(11)
    uniform = rng.uniform(0.0, 1.0, 100_000)
    # 1 followed by 1000 values that each fall below half an ulp of 1.
    tiny_after_one = np.array([1.0] + [2.0**-53] * 1000)

    for values in (uniform, tiny_after_one):
        assert exact_sum(values) == math.fsum(values)
        assert float(np.sum(values)) != math.fsum(values)


def test_exact_sum_overflow_is_inf():
    values = np.full(4, 1.7e308)

    assert exact_sum(values) == math.inf


def test_exact_sum_inf_and_nan():
    assert exact_sum(np.array([1.0, math.inf])) == math.inf
    assert math.isnan(exact_sum(np.array([math.nan, 1.0, math.inf])))


def test_exact_sum_empty_is_zero():
    assert exact_sum(np.array([], dtype=np.float64)) == 0.0


def test_exact_sum_rejects_negative():
    with pytest.raises(ValueError, match="sign bit"):
        exact_sum(np.array([1.0, -2.0]))


def test_exact_group_sums_match_fsum_per_group():
    rng = np.random.default_rng(5)
    values = np.abs(rng.normal(0.0, 1.0, 20_000)) * np.exp2(
        rng.integers(-60, 60, 20_000).astype(np.float64)
    )
    groups = rng.integers(0, 9, 20_000)

    total, per_group = exact_group_sums(values, groups, 9)

    assert total == math.fsum(values)
    for group in range(9):
        assert per_group[group] == math.fsum(values[groups == group]), group


def test_exact_group_sums_special_group_only():
    values = np.array([1.0, math.inf, 2.0, math.nan, 3.0])
    groups = np.array([0, 1, 0, 2, 3])

    total, per_group = exact_group_sums(values, groups, 4)

    assert per_group[0] == 3.0
    assert per_group[1] == math.inf
    assert math.isnan(per_group[2])
    assert per_group[3] == 3.0
    assert math.isnan(total)


def test_exact_group_sums_bad_arguments():
    values = np.ones(3)

    with pytest.raises(ValueError, match="num_groups 0"):
        exact_group_sums(values, None, 0)
    with pytest.raises(ValueError, match="groups has shape"):
        exact_group_sums(values, np.zeros(2, dtype=np.int64), 2)
    with pytest.raises(ValueError, match="1-D"):
        exact_group_sums(np.ones((2, 2)), None, 1)


# --- equality with compute_scores ---------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_random_predictions_match_reference(seed):
    rng = np.random.default_rng(1000 + seed)
    num_sets = int(rng.integers(1, 45))
    experiments = int(rng.integers(1, 120))
    width_scale = float(10.0 ** rng.uniform(-6, 2))
    bias = float(rng.normal(0.0, 0.2))
    predictions, mu_true = make_predictions(
        rng, num_sets, experiments, width_scale=width_scale, bias=bias
    )

    scores = assert_same_as_reference(predictions, mu_true)

    assert scores["experiments"] == num_sets * experiments


def _naive_figures(predictions, mu_true):
    n = len(predictions)
    width = np.abs(predictions.p84 - predictions.p16)
    errors = predictions.mu_hat - np.asarray(mu_true)[predictions.set]
    return {
        "interval": float(np.sum(width)) / n,
        "rmse": math.sqrt(float(np.sum(errors * errors)) / n),
        "mae": float(np.sum(np.abs(errors))) / n,
    }


@pytest.mark.parametrize(
    ("seed", "figure"), [(2, "interval"), (10, "rmse"), (8, "mae")]
)
def test_naive_sum_would_fail(seed, figure):
    # np.sum in place of the exact sums would change these scores, so the equality
    # tests can detect that mistake.
    rng = np.random.default_rng(seed)
    predictions, mu_true = make_predictions(rng, 4, 25_000)

    scores = assert_same_as_reference(predictions, mu_true)

    assert _naive_figures(predictions, mu_true)[figure] != scores[figure]


def test_shuffled_order_same_scores():
    rng = np.random.default_rng(3)
    predictions, mu_true = make_predictions(rng, 6, 300)
    shuffled = predictions.take(rng.permutation(len(predictions)))

    in_order = assert_same_as_reference(predictions, mu_true)
    out_of_order = assert_same_as_reference(shuffled, mu_true)

    assert in_order == out_of_order


def test_one_experiment():
    predictions = Predictions(
        set=np.array([0]),
        experiment=np.array([0]),
        mu_hat=np.array([1.2]),
        delta_mu_hat=np.array([0.1]),
        p16=np.array([1.1]),
        p84=np.array([1.3]),
    )

    scores = assert_same_as_reference(predictions, [1.0])

    assert scores["coverage"] == 0.0
    assert scores["set_0.interval"] == scores["interval"]


def test_zero_width_intervals():
    mu_true = np.array([1.0, 2.0])
    set_index = np.array([0, 0, 1, 1, 1], dtype=np.int64)
    # Intervals of width 0, two of them exactly at the true mu.
    points = np.array([1.0, 1.5, 2.0, 2.0, 0.0])
    predictions = Predictions(
        set=set_index,
        experiment=np.array([0, 1, 0, 1, 2], dtype=np.int64),
        mu_hat=points,
        delta_mu_hat=np.zeros(5),
        p16=points,
        p84=points.copy(),
    )

    scores = assert_same_as_reference(predictions, mu_true)

    assert scores["interval"] == 0.0
    assert scores["coverage"] == 3 / 5
    assert scores["quantiles_score"] == -math.log(1e-3 * scores["penalty"])


def test_true_mu_on_interval_edges_counts_as_covered():
    mu_true = np.array([1.0])
    predictions = Predictions(
        set=np.zeros(4, dtype=np.int64),
        experiment=np.arange(4, dtype=np.int64),
        mu_hat=np.array([1.0, 1.0, 1.0, 1.0]),
        delta_mu_hat=np.full(4, 0.5),
        p16=np.array([1.0, 0.5, np.nextafter(1.0, 2.0), 0.5]),
        p84=np.array([1.5, 1.0, 1.5, np.nextafter(1.0, 0.0)]),
    )

    scores = assert_same_as_reference(predictions, mu_true)

    assert scores["coverage"] == 0.5


@pytest.mark.parametrize("offset", [-1, 0, 1])
@pytest.mark.parametrize("edge", ["low", "high"])
def test_coverage_at_band_edges(edge, offset):
    n_experiments = 400
    low, high, _ = coverage_band(n_experiments)
    bound = low if edge == "low" else high
    # floor(bound * n) / n is the last coverage at or below the bound.
    covered = math.floor(bound * n_experiments) + offset
    mu_true = np.array([1.0])
    is_covered = np.arange(n_experiments) < covered
    predictions = Predictions(
        set=np.zeros(n_experiments, dtype=np.int64),
        experiment=np.arange(n_experiments, dtype=np.int64),
        mu_hat=np.ones(n_experiments),
        delta_mu_hat=np.full(n_experiments, 0.1),
        p16=np.where(is_covered, 0.9, 1.05),
        p84=np.where(is_covered, 1.1, 1.25),
    )

    scores = assert_same_as_reference(predictions, mu_true)

    assert scores["coverage"] == covered / n_experiments
    inside = low <= scores["coverage"] <= high
    assert (scores["penalty"] == 1.0) == inside


def test_exactly_max_sets_have_per_set_figures():
    rng = np.random.default_rng(8)
    predictions, mu_true = make_predictions(rng, MAX_SETS_WITH_PER_SET_SCORES, 20)

    scores = assert_same_as_reference(predictions, mu_true)

    last = MAX_SETS_WITH_PER_SET_SCORES - 1
    assert f"set_{last}.coverage" in scores
    assert len(scores) == 7 + 3 * MAX_SETS_WITH_PER_SET_SCORES


@pytest.mark.parametrize("num_sets", [MAX_SETS_WITH_PER_SET_SCORES + 1, 500])
def test_many_sets_have_no_per_set_figures(num_sets):
    rng = np.random.default_rng(num_sets)
    predictions, mu_true = make_predictions(rng, num_sets, 3)

    scores = assert_same_as_reference(predictions, mu_true)

    assert not any(name.startswith("set_") for name in scores)
    assert len(scores) == 7


def test_per_set_rule_counts_scored_sets_only():
    # 100 sets have a true mu, but only 3 of them, not adjacent, have records.
    rng = np.random.default_rng(4)
    predictions, _ = make_predictions(rng, 3, 10)
    renumbered = Predictions(
        set=np.array([5, 40, 99])[predictions.set],
        experiment=predictions.experiment,
        mu_hat=predictions.mu_hat,
        delta_mu_hat=predictions.delta_mu_hat,
        p16=predictions.p16,
        p84=predictions.p84,
    )
    mu_true = rng.uniform(0.5, 2.0, 100)

    scores = assert_same_as_reference(renumbered, mu_true)

    assert sorted(name for name in scores if name.endswith(".rmse")) == [
        "set_40.rmse",
        "set_5.rmse",
        "set_99.rmse",
    ]


def test_extreme_magnitudes_match_reference():
    rng = np.random.default_rng(21)
    predictions, mu_true = make_predictions(rng, 3, 50)
    scale = np.exp2(rng.integers(-1000, 500, len(predictions)).astype(np.float64))
    wide = Predictions(
        set=predictions.set,
        experiment=predictions.experiment,
        mu_hat=predictions.mu_hat * scale,
        delta_mu_hat=predictions.delta_mu_hat,
        p16=predictions.p16 * scale,
        p84=predictions.p84 * scale,
    )

    assert_same_as_reference(wide, mu_true)


# --- errors ---------------------------------------------------------------------------


def test_non_finite_score_rejected():
    predictions = Predictions(
        set=np.zeros(2, dtype=np.int64),
        experiment=np.arange(2, dtype=np.int64),
        mu_hat=np.array([1e200, 1.0]),
        delta_mu_hat=np.ones(2),
        p16=np.zeros(2),
        p84=np.ones(2),
    )

    with pytest.raises(ScoringError, match="score rmse is not finite"):
        pooled_scores(predictions, [1.0])
    with warnings.catch_warnings():
        # The example's metric squares 1e200 without np.errstate.
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(reference.ScoringError, match="score rmse is not finite"):
            reference.compute_scores(predictions.to_records(), np.array([1.0]))


def test_empty_predictions_rejected():
    predictions = parse_predictions(
        b'[{"set": 0, "experiment": 0, "mu_hat": 1, "delta_mu_hat": 1, '
        b'"p16": 0, "p84": 2}]'
    ).take(np.array([], dtype=np.int64))

    with pytest.raises(ScoringError, match="no pseudo-experiments to score"):
        pooled_scores(predictions, [1.0])


def test_set_without_true_mu_rejected():
    rng = np.random.default_rng(1)
    predictions, mu_true = make_predictions(rng, 3, 4)

    with pytest.raises(ScoringError) as caught:
        pooled_scores(predictions, mu_true[:2])

    assert str(caught.value) == ("record 8 has set 2, but mu_true covers sets 0 .. 1")


@pytest.mark.parametrize(
    ("mu_true", "message"),
    [
        ([], "mu_true must be a non-empty 1-D list, got shape (0,)"),
        ([[1.0], [2.0]], "mu_true must be a non-empty 1-D list, got shape (2, 1)"),
        ([1.0, math.nan], "mu_true[1] is nan, not finite"),
        (["x"], "mu_true must be a list of numbers"),
    ],
)
def test_invalid_mu_true_rejected(mu_true, message):
    rng = np.random.default_rng(1)
    predictions, _ = make_predictions(rng, 1, 4)

    with pytest.raises(ScoringError) as caught:
        pooled_scores(predictions, mu_true)

    assert str(caught.value).startswith(message)


# --- shards ---------------------------------------------------------------------------


def _shard_bytes(records, first_set, sets, first_experiment, experiments):
    chosen = [
        record
        for record in records
        if first_set <= record["set"] < first_set + sets
        and first_experiment <= record["experiment"] < first_experiment + experiments
    ]
    return json.dumps(chosen).encode()


def test_pooled_shards_equal_unsharded_score():
    rng = np.random.default_rng(17)
    whole, mu_true = make_predictions(rng, 5, 40)
    records = whole.to_records()
    # Shards that split sets and experiments: 5 sets x 40 experiments into a
    # 2 x 3 layout of uneven rectangles.
    rectangles = [
        (first_set, sets, first_experiment, experiments)
        for first_set, sets in ((0, 2), (2, 3))
        for first_experiment, experiments in ((0, 7), (7, 20), (27, 13))
    ]

    parts = []
    for index, (first_set, sets, first_experiment, experiments) in enumerate(
        rectangles
    ):
        shard = shard_status(
            index, first_set, sets, first_experiment, experiments, ShardState.DONE
        )
        data = _shard_bytes(records, first_set, sets, first_experiment, experiments)
        parts.append(parse_shard(data, shard))
    pooled = pool(reversed(parts))

    assert len(pooled) == len(whole)
    assert pooled_scores(pooled, mu_true) == reference.compute_scores(records, mu_true)
    assert pooled_scores(pooled, mu_true) == pooled_scores(whole, mu_true)
