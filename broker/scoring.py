"""The built-in pooled metric: the HiggsML quantiles score over all pooled experiments.

`pooled_scores` returns the same dict, bit for bit, as `compute_scores` in the
example challenge's scoring program (examples/higgsml-demo/scoring_program/score.py)
on the same records: quantiles_score, interval, coverage, penalty, rmse, mae and
experiments, and set_<i>.coverage, set_<i>.interval and set_<i>.rmse while at most
MAX_SETS_WITH_PER_SET_SCORES sets are scored.

That program adds with math.fsum, which returns the correctly rounded sum. Here each
sum is computed exactly from the float64 bit patterns (see `exact_group_sums`) and
rounded once, so it is the same float for any order of the records. The scalar steps
after the sums are the same Python float operations as the example's metric.py.
docs/scoring.md gives the argument in full.

Every function blocks. Callers on an event loop run them through `asyncio.to_thread`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from fairu.protocol.errors import FairuError

from .predictions import Predictions, first_out_of_range

logger = logging.getLogger(__name__)

# Fraction of a Gaussian within one standard deviation of its mean.
TARGET_COVERAGE = 0.6827
# Added to the mean interval width so that a zero width has a finite logarithm.
WIDTH_OFFSET = 1e-3
# More scored sets than this give no per-set figures, as in the example's score.py.
MAX_SETS_WITH_PER_SET_SCORES = 32
PER_SET_FIGURES = ("coverage", "interval", "rmse")

# The maximum number of groups of `exact_group_sums`, because each group needs
# 2048 bins per array.
MAX_SUM_GROUPS = 1024

# A float64 is sign (1 bit), biased exponent (11 bits) and fraction (52 bits).
_FRACTION_BITS = 52
_EXPONENT_BINS = 2048
_SPECIAL_EXPONENT = 2047
_SUBNORMAL_EXPONENT_BIAS = 1075
# The low part of a split keeps the last 27 fraction bits, the high part the rest.
_LOW_BITS = 27
_LOW_MASK = np.int64((1 << _LOW_BITS) - 1)
# Records per bincount pass. In one exponent bin each high part is q * 2**k with
# q < 2**26, and each low part r * 2**k' with r < 2**27, so 2**25 of them add up
# to less than 2**53 units, so every partial sum in float64 is exact.
_BLOCK = 1 << 25
# Sums are held as Python integers in units of 2**-1074, the smallest subnormal.
_UNIT_EXPONENT = 1074


class ScoringError(FairuError):
    """Predictions or true mu values that cannot be scored, with the reason."""


# --- exact summation ----------------------------------------------------------------


def exact_sum(values: np.ndarray) -> float:
    """Return the correctly rounded sum of non-negative float64 values, like math.fsum.

    Returns inf where the exact sum exceeds the float range (math.fsum raises
    OverflowError there) and nan if a value is nan.
    """
    total, _ = exact_group_sums(values, None, 1)
    return total


def exact_group_sums(
    values: np.ndarray, groups: np.ndarray | None, num_groups: int
) -> tuple[float, list[float]]:
    """Return the correctly rounded sum of all values and of each group's values.

    `values` is a 1-D float64 array of non-negative numbers (sign bit clear) and
    `groups` an int64 array of the same length with entries in 0 .. num_groups - 1,
    or None for one group. Each result equals math.fsum over the same values, with
    inf where math.fsum raises OverflowError.

    Each value splits into a high and a low part, both exact, and the parts are
    added per (group, binary exponent) with np.bincount. Within one bin they are
    integer multiples of one power of two and the sums stay below 2**53 units, so
    float64 adds them exactly. The bin sums become Python integers in units of
    2**-1074, and one correctly rounded integer division gives each float.
    """
    values = np.ascontiguousarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {values.shape}")
    if not 1 <= num_groups <= MAX_SUM_GROUPS:
        raise ValueError(f"num_groups {num_groups} is not in 1 .. {MAX_SUM_GROUPS}")
    if groups is not None and groups.shape != values.shape:
        raise ValueError(
            f"groups has shape {groups.shape}, values has shape {values.shape}"
        )
    if np.signbit(values).any():
        raise ValueError("exact_group_sums needs values with the sign bit clear")

    totals = [0] * num_groups
    special = np.zeros(num_groups, dtype=bool)
    for start in range(0, max(values.shape[0], 1), _BLOCK):
        block = values[start : start + _BLOCK]
        offsets = None
        if groups is not None and num_groups > 1:
            offsets = groups[start : start + _BLOCK] * _EXPONENT_BINS
        high_sums, low_sums = _bin_sums(block, offsets, num_groups)
        special |= _add_bin_sums(totals, high_sums, low_sums)

    results = [_round_units(total) for total in totals]
    total = _round_units(sum(totals))
    if special.any():
        _apply_special(results, special, values, groups, num_groups)
        total = math.nan if any(math.isnan(value) for value in results) else math.inf
    return total, results


def _bin_sums(
    block: np.ndarray, offsets: np.ndarray | None, num_groups: int
) -> tuple[np.ndarray, np.ndarray]:
    bits = block.view(np.int64)
    keys = bits >> _FRACTION_BITS
    if offsets is not None:
        keys += offsets
    high = (bits & ~_LOW_MASK).view(np.float64)
    # inf - inf gives nan in the special bin, which _apply_special replaces.
    with np.errstate(invalid="ignore"):
        low = block - high
    bins = num_groups * _EXPONENT_BINS
    return (
        np.bincount(keys, weights=high, minlength=bins),
        np.bincount(keys, weights=low, minlength=bins),
    )


def _add_bin_sums(
    totals: list[int], high_sums: np.ndarray, low_sums: np.ndarray
) -> np.ndarray:
    """Add the bin sums to `totals` in units of 2**-1074; return the groups with inf
    or nan values."""
    num_groups = len(totals)
    exponents_all = np.arange(high_sums.shape[0]) % _EXPONENT_BINS
    nonzero = (high_sums != 0) | (low_sums != 0)
    # A bin of inf or nan values, or a bin sum beyond the float range: the group's
    # sum is inf or nan, because every value is non-negative.
    special = nonzero & (
        (exponents_all == _SPECIAL_EXPONENT)
        | ~np.isfinite(high_sums)
        | ~np.isfinite(low_sums)
    )
    special_groups = np.zeros(num_groups, dtype=bool)
    special_groups[np.flatnonzero(special) // _EXPONENT_BINS] = True

    used = np.flatnonzero(nonzero & ~special)
    exponents = exponents_all[used]
    # A value in bin e >= 1 is an integer times 2**(e - 1075); subnormals (e = 0)
    # share the unit of bin 1.
    shifts = np.maximum(exponents, 1) - 1
    unit = shifts + 1 - _SUBNORMAL_EXPONENT_BIAS
    high_units = np.ldexp(high_sums[used], -(unit + _LOW_BITS)).astype(np.int64)
    low_units = np.ldexp(low_sums[used], -unit).astype(np.int64)
    for group, shift, high, low in zip(
        (used // _EXPONENT_BINS).tolist(),
        shifts.tolist(),
        high_units.tolist(),
        low_units.tolist(),
        strict=True,
    ):
        totals[group] += ((high << _LOW_BITS) + low) << shift
    return special_groups


def _round_units(total: int) -> float:
    # CPython rounds int / int correctly (half to even), subnormal results included.
    try:
        return total / (1 << _UNIT_EXPONENT)
    except OverflowError:
        return math.inf


def _apply_special(
    results: list[float],
    special: np.ndarray,
    values: np.ndarray,
    groups: np.ndarray | None,
    num_groups: int,
) -> None:
    nan = np.isnan(values)
    if groups is None or num_groups == 1:
        has_nan = np.array([bool(nan.any())])
    else:
        has_nan = np.bincount(groups[nan], minlength=num_groups) > 0
    for group in np.flatnonzero(special).tolist():
        results[group] = math.nan if has_nan[group] else math.inf


# --- the metric ---------------------------------------------------------------------


def coverage_band(n_experiments: int) -> tuple[float, float, float]:
    """Return (low, high, sigma68): the coverage band with no penalty, and its scale.

    sigma68 is the binomial standard deviation of the coverage of n_experiments
    intervals that each cover the true value with probability TARGET_COVERAGE.
    """
    sigma68 = math.sqrt(TARGET_COVERAGE * (1.0 - TARGET_COVERAGE) / n_experiments)
    low = TARGET_COVERAGE - 2.0 * sigma68
    high = TARGET_COVERAGE + 2.0 * sigma68
    return low, high, sigma68


def coverage_penalty(coverage: float, n_experiments: int) -> float:
    """Return the factor f(c) >= 1 that multiplies the mean interval width.

    f is 1 inside the band. Below it, f grows with the fourth power of the distance
    in units of sigma68, and above it with the third power.
    """
    low, high, sigma68 = coverage_band(n_experiments)
    if coverage < low:
        return 1.0 + abs((coverage - low) / sigma68) ** 4
    if coverage > high:
        return 1.0 + abs((coverage - high) / sigma68) ** 3
    return 1.0


def summary_figures(
    width_sum: float,
    covered: int,
    squared_error_sum: float,
    absolute_error_sum: float,
    n_experiments: int,
) -> dict[str, float]:
    """Return the metric's figures from the correctly rounded sums of n experiments.

    The operations and their order are those of score() in the example's metric.py.
    """
    interval = width_sum / n_experiments
    coverage = float(covered) / n_experiments
    penalty = coverage_penalty(coverage, n_experiments)
    quantiles_score = -math.log((interval + WIDTH_OFFSET) * penalty)
    rmse = math.sqrt(squared_error_sum / n_experiments)
    mae = absolute_error_sum / n_experiments
    return {
        "quantiles_score": quantiles_score,
        "interval": interval,
        "coverage": coverage,
        "penalty": penalty,
        "rmse": rmse,
        "mae": mae,
    }


def pooled_scores(
    predictions: Predictions, mu_true: Sequence[float] | np.ndarray
) -> dict[str, float]:
    """Score the pooled predictions against the true mu of each set.

    mu_true[i] is the true mu of set i. Returns the flat scores dict of the example's
    compute_scores, keys in the same order. Raises ScoringError when there are no
    predictions, a set index has no true mu, or a score is not finite.
    """
    truth_by_set = _check_mu_true(mu_true)
    n_experiments = len(predictions)
    if n_experiments == 0:
        raise ScoringError("no pseudo-experiments to score: the predictions are empty")
    set_index = predictions.set
    _check_set_indices(set_index, len(truth_by_set))

    truth = truth_by_set[set_index]
    p16 = predictions.p16
    p84 = predictions.p84
    covered = (p16 <= truth) & (truth <= p84)
    # Values near the float range overflow to inf here, and _check_finite then
    # rejects the score that they make infinite.
    with np.errstate(over="ignore"):
        width = np.abs(p84 - p16)
        errors = predictions.mu_hat - truth
        squared = errors * errors
    absolute = np.abs(errors)

    records_per_set = np.bincount(set_index, minlength=len(truth_by_set))
    scored_sets = np.flatnonzero(records_per_set)
    per_set = len(scored_sets) <= MAX_SETS_WITH_PER_SET_SCORES
    groups = None
    num_groups = 1
    if per_set and len(scored_sets) > 1:
        lookup = np.zeros(len(truth_by_set), dtype=np.int64)
        lookup[scored_sets] = np.arange(len(scored_sets))
        groups = lookup[set_index]
        num_groups = len(scored_sets)

    width_sum, width_by_set = exact_group_sums(width, groups, num_groups)
    squared_sum, squared_by_set = exact_group_sums(squared, groups, num_groups)
    absolute_sum, _ = exact_group_sums(absolute, None, 1)

    scores = summary_figures(
        width_sum,
        int(np.count_nonzero(covered)),
        squared_sum,
        absolute_sum,
        n_experiments,
    )
    scores["experiments"] = float(n_experiments)

    if per_set:
        if groups is None:
            covered_by_set = [int(np.count_nonzero(covered))]
        else:
            covered_by_set = np.bincount(groups[covered], minlength=num_groups).tolist()
        for position, set_number in enumerate(scored_sets.tolist()):
            n_in_set = int(records_per_set[set_number])
            scores[f"set_{set_number}.coverage"] = (
                float(covered_by_set[position]) / n_in_set
            )
            scores[f"set_{set_number}.interval"] = width_by_set[position] / n_in_set
            scores[f"set_{set_number}.rmse"] = math.sqrt(
                squared_by_set[position] / n_in_set
            )
    else:
        logger.info(
            "%d sets exceed %d, so the scores have no per-set figures",
            len(scored_sets),
            MAX_SETS_WITH_PER_SET_SCORES,
        )

    _check_finite(scores)
    logger.info(
        "pooled %d experiments of %d sets: quantiles_score %.6g, coverage %.4g",
        n_experiments,
        len(scored_sets),
        scores["quantiles_score"],
        scores["coverage"],
    )
    return scores


def _check_mu_true(mu_true: Sequence[float] | np.ndarray) -> np.ndarray:
    try:
        truth_by_set = np.asarray(mu_true, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ScoringError(f"mu_true must be a list of numbers: {exc}") from None
    if truth_by_set.ndim != 1 or truth_by_set.size == 0:
        raise ScoringError(
            f"mu_true must be a non-empty 1-D list, got shape {truth_by_set.shape}"
        )
    not_finite = np.flatnonzero(~np.isfinite(truth_by_set))
    if not_finite.size:
        first = int(not_finite[0])
        raise ScoringError(f"mu_true[{first}] is {truth_by_set[first]}, not finite")
    return truth_by_set


def _check_set_indices(set_index: np.ndarray, num_sets: int) -> None:
    first = first_out_of_range(set_index, num_sets)
    if first is not None:
        raise ScoringError(
            f"record {first} has set {int(set_index[first])}, but mu_true covers "
            f"sets 0 .. {num_sets - 1}"
        )


def _check_finite(scores: dict[str, float]) -> None:
    for name, value in scores.items():
        if not math.isfinite(value):
            raise ScoringError(
                f"score {name} is not finite ({value}): the predictions are too large"
            )
