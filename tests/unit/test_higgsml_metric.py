"""Tests of the quantiles score in examples/higgsml-demo/scoring_program/metric.py."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

METRIC_PATH = (
    Path(__file__).resolve().parents[2]
    / "examples"
    / "higgsml-demo"
    / "scoring_program"
    / "metric.py"
)


def _load_metric():
    spec = importlib.util.spec_from_file_location(
        "higgsml_demo_metric_test", METRIC_PATH
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


metric = _load_metric()


def test_check_value_ten_experiments():
    mu_true = [1.0] * 10
    p16 = [0.75] * 7 + [1.05] * 3
    p84 = [1.25] * 7 + [1.55] * 3

    result = metric.score(mu_true, p16, p84, mu_true)

    assert round(result["interval"], 4) == 0.5
    assert round(result["coverage"], 4) == 0.7
    assert result["penalty"] == 1.0
    assert round(result["quantiles_score"], 4) == 0.6911


def test_check_value_hundred_experiments():
    mu_true = np.ones(100)
    p16 = np.array([0.9] * 50 + [1.05] * 50)
    p84 = np.array([1.1] * 50 + [1.25] * 50)

    result = metric.score(mu_true, p16, p84, mu_true)

    assert round(result["interval"], 4) == 0.2
    assert round(result["coverage"], 4) == 0.5
    assert round(result["penalty"], 3) == 14.744
    assert round(result["quantiles_score"], 4) == -1.0864


def test_rmse_and_mae():
    mu_true = [1.0, 1.0, 2.0, 2.0]
    mu_hat = [1.5, 0.5, 2.0, 3.0]

    result = metric.score(mu_true, [0.0] * 4, [3.0] * 4, mu_hat)

    assert result["rmse"] == pytest.approx(math.sqrt((0.25 + 0.25 + 0.0 + 1.0) / 4))
    assert result["mae"] == pytest.approx((0.5 + 0.5 + 0.0 + 1.0) / 4)


def test_coverage_band_hundred_experiments():
    low, high, sigma68 = metric.coverage_band(100)

    assert sigma68 == pytest.approx(math.sqrt(0.6827 * 0.3173 / 100))
    assert low == pytest.approx(0.6827 - 2 * sigma68)
    assert high == pytest.approx(0.6827 + 2 * sigma68)


def test_penalty_inside_band_is_one():
    low, high, _ = metric.coverage_band(100)

    assert metric.coverage_penalty(low, 100) == 1.0
    assert metric.coverage_penalty(0.6827, 100) == 1.0
    assert metric.coverage_penalty(high, 100) == 1.0


def test_penalty_below_band_fourth_power():
    low, _, sigma68 = metric.coverage_band(100)

    assert metric.coverage_penalty(low - sigma68, 100) == pytest.approx(2.0)
    assert metric.coverage_penalty(low - 2 * sigma68, 100) == pytest.approx(17.0)
    assert metric.coverage_penalty(low - 3 * sigma68, 100) == pytest.approx(82.0)


def test_penalty_above_band_third_power():
    _, high, sigma68 = metric.coverage_band(100)

    assert metric.coverage_penalty(high + sigma68, 100) == pytest.approx(2.0)
    assert metric.coverage_penalty(high + 2 * sigma68, 100) == pytest.approx(9.0)
    assert metric.coverage_penalty(high + 3 * sigma68, 100) == pytest.approx(28.0)


def test_under_coverage_costs_more_than_over_coverage():
    low, high, sigma68 = metric.coverage_band(100)

    below = metric.coverage_penalty(low - 2 * sigma68, 100)
    above = metric.coverage_penalty(high + 2 * sigma68, 100)

    assert below > above


def test_full_coverage_is_penalised():
    # Intervals that always cover lie above the band for 100 experiments.
    mu_true = np.ones(100)
    result = metric.score(mu_true, mu_true - 0.1, mu_true + 0.1, mu_true)
    _, high, sigma68 = metric.coverage_band(100)
    expected_penalty = 1.0 + ((1.0 - high) / sigma68) ** 3

    assert result["coverage"] == 1.0
    assert result["penalty"] == pytest.approx(expected_penalty)
    assert result["quantiles_score"] == pytest.approx(
        -math.log((result["interval"] + 1e-3) * expected_penalty)
    )


def test_zero_width_intervals_score_finite():
    mu_true = np.ones(10)
    result = metric.score(mu_true, mu_true, mu_true, mu_true)

    assert result["interval"] == 0.0
    assert result["coverage"] == 1.0
    assert math.isfinite(result["quantiles_score"])


def test_swapped_interval_does_not_cover():
    result = metric.score([1.0], [1.2], [0.8], [1.0])

    assert result["coverage"] == 0.0
    assert result["interval"] == pytest.approx(0.4)


def test_results_are_python_floats():
    result = metric.score(np.ones(4), np.zeros(4), np.full(4, 2.0), np.ones(4))

    for name, value in result.items():
        assert type(value) is float, name


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="differ in length"):
        metric.score([1.0, 1.0], [0.5], [1.5, 1.5], [1.0, 1.0])


def test_empty_input_raises():
    with pytest.raises(ValueError, match="no pseudo-experiments"):
        metric.score([], [], [], [])


def test_two_dimensional_input_raises():
    with pytest.raises(ValueError, match="1-D"):
        metric.score(np.ones((2, 2)), np.ones(4), np.ones(4), np.ones(4))
