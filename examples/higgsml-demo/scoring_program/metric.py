"""Quantiles score of the HiggsML Uncertainty Challenge, in plain NumPy.

A submission reports, for each pseudo-experiment, an estimate mu_hat of the signal
strength and the 16th and 84th percentiles [p16, p84] of its uncertainty on mu. The
score rewards narrow intervals and penalises a coverage of the true mu that differs
from 68.27 % by more than two binomial standard deviations.

The code runs on NumPy 1.24 (Debian bookworm) and NumPy 2.x.
"""

import math

import numpy as np

# Fraction of a Gaussian within one standard deviation of its mean.
TARGET_COVERAGE = 0.6827

# Added to the mean interval width so that a zero width still has a finite logarithm.
WIDTH_OFFSET = 1e-3


def coverage_band(n_experiments):
    """Return (low, high, sigma68): the coverage band with no penalty, and its scale.

    sigma68 is the binomial standard deviation of the coverage of n_experiments
    intervals that each cover the true value with probability TARGET_COVERAGE.
    """
    sigma68 = math.sqrt(TARGET_COVERAGE * (1.0 - TARGET_COVERAGE) / n_experiments)
    low = TARGET_COVERAGE - 2.0 * sigma68
    high = TARGET_COVERAGE + 2.0 * sigma68
    return low, high, sigma68


def coverage_penalty(coverage, n_experiments):
    """Return the factor f(c) >= 1 that multiplies the interval width in the score.

    f is 1 inside the band TARGET_COVERAGE +- 2 sigma68. Below the band it grows with
    the fourth power of the distance in units of sigma68, above it with the third
    power, so that under-coverage costs more than over-coverage.
    """
    low, high, sigma68 = coverage_band(n_experiments)
    if coverage < low:
        return 1.0 + abs((coverage - low) / sigma68) ** 4
    if coverage > high:
        return 1.0 + abs((coverage - high) / sigma68) ** 3
    return 1.0


def score(mu_true, p16, p84, mu_hat):
    """Compute the quantiles score and the summary figures of pooled pseudo-experiments.

    All four arguments are 1-D sequences with one entry per pseudo-experiment, so
    experiments from several sets are pooled by concatenating them. Returns a dict
    of Python floats:

    - quantiles_score: -ln((interval + WIDTH_OFFSET) * penalty), higher is better
    - interval: mean of |p84 - p16|
    - coverage: fraction of experiments with p16 <= mu_true <= p84
    - penalty: the coverage penalty f(coverage) >= 1
    - rmse, mae: root mean square and mean absolute error of mu_hat

    Raises ValueError when the arrays are empty, not 1-D, or differ in length.
    """
    arrays = {
        "mu_true": np.asarray(mu_true, dtype=np.float64),
        "p16": np.asarray(p16, dtype=np.float64),
        "p84": np.asarray(p84, dtype=np.float64),
        "mu_hat": np.asarray(mu_hat, dtype=np.float64),
    }
    for name, values in arrays.items():
        if values.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {values.shape}")
    lengths = {values.shape[0] for values in arrays.values()}
    if len(lengths) != 1:
        shapes = {name: values.shape[0] for name, values in arrays.items()}
        raise ValueError(f"mu_true, p16, p84 and mu_hat differ in length: {shapes}")
    n_experiments = lengths.pop()
    if n_experiments == 0:
        raise ValueError("no pseudo-experiments to score")

    mu_true = arrays["mu_true"]
    p16 = arrays["p16"]
    p84 = arrays["p84"]
    mu_hat = arrays["mu_hat"]

    # math.fsum rounds each sum correctly, whereas np.sum may differ in the last bit
    # between NumPy versions and SIMD code paths. A container and the host then
    # compute the same score from the same predictions.
    interval = math.fsum(np.abs(p84 - p16)) / n_experiments
    covered = (p16 <= mu_true) & (mu_true <= p84)
    coverage = float(np.count_nonzero(covered)) / n_experiments
    penalty = coverage_penalty(coverage, n_experiments)
    quantiles_score = -math.log((interval + WIDTH_OFFSET) * penalty)

    errors = mu_hat - mu_true
    rmse = math.sqrt(math.fsum(errors * errors) / n_experiments)
    mae = math.fsum(np.abs(errors)) / n_experiments

    return {
        "quantiles_score": quantiles_score,
        "interval": interval,
        "coverage": coverage,
        "penalty": penalty,
        "rmse": rmse,
        "mae": mae,
    }
