"""Scoring program of the HiggsML uncertainty demo challenge.

The program reads the predictions.json that ingestion.py wrote, pairs each record
with the true mu of its set from REFERENCE/mu_true.json, and writes
OUTPUT/scores.json: a flat JSON object that maps score names to finite floats. The
global figures pool all scored experiments. Per-set figures named set_<i>.coverage,
set_<i>.interval and set_<i>.rmse follow while there are at most
MAX_SETS_WITH_PER_SET_SCORES sets, which keeps the object under 200 keys.

A predictions file may cover any subset of the experiments, for example one shard
of a larger evaluation. Each (set, experiment) pair must appear at most once.
"""

import argparse
import importlib.util
import json
import logging
import math
import os
import re
import sys

import numpy as np

# /inputs is mounted read-only in the container, so importing metric.py must not try
# to write a __pycache__ folder there.
sys.dont_write_bytecode = True

LOG = logging.getLogger("score")

HERE = os.path.dirname(os.path.abspath(__file__))
PREDICTIONS_FILE = "predictions.json"
REFERENCE_FILE = "mu_true.json"
SCORES_FILE = "scores.json"

MAX_SETS_WITH_PER_SET_SCORES = 32
SCORE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
PREDICTION_KEYS = ("mu_hat", "p16", "p84")


class ScoringError(Exception):
    """Invalid predictions or reference data, with a message for the user."""


def load_metric():
    """Import metric.py from this folder by path, whatever the caller's sys.path."""
    spec = importlib.util.spec_from_file_location(
        "higgsml_demo_metric", os.path.join(HERE, "metric.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read_json(path, description):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ScoringError(f"{description} not found: {path}") from None
    except json.JSONDecodeError as error:
        raise ScoringError(f"{description} {path} is not valid JSON: {error}") from None


def load_reference(reference_dir):
    """Return (mu_true per set as a float array, experiments_per_set)."""
    path = os.path.join(reference_dir, REFERENCE_FILE)
    reference = _read_json(path, "reference file")
    try:
        mu_true = np.asarray(reference["mu_true"], dtype=np.float64)
        experiments_per_set = int(reference["experiments_per_set"])
    except (KeyError, TypeError, ValueError) as error:
        raise ScoringError(f"reference file {path} is invalid: {error!r}") from None
    if mu_true.ndim != 1 or mu_true.size == 0 or not np.all(np.isfinite(mu_true)):
        raise ScoringError(
            f"mu_true in {path} must be a non-empty list of finite numbers"
        )
    return mu_true, experiments_per_set


def _is_index(value):
    return isinstance(value, int) and not isinstance(value, bool)


def load_predictions(path, num_sets, experiments_per_set):
    """Return the prediction records of FILE, or of DIR/predictions.json, validated.

    Each record needs integer set and experiment indices inside the reference's
    range and finite mu_hat, p16 and p84. Raises ScoringError on the first
    invalid record or on a repeated (set, experiment) pair.
    """
    if os.path.isdir(path):
        path = os.path.join(path, PREDICTIONS_FILE)
    records = _read_json(path, "predictions file")
    if not isinstance(records, list) or not records:
        raise ScoringError(f"{path} must contain a non-empty JSON list of records")

    seen = set()
    for position, record in enumerate(records):
        where = f"record {position} of {path}"
        if not isinstance(record, dict):
            raise ScoringError(f"{where} is not a JSON object")
        set_index = record.get("set")
        experiment_index = record.get("experiment")
        if not _is_index(set_index) or not 0 <= set_index < num_sets:
            raise ScoringError(
                f"{where}: set {set_index!r} is not in 0 .. {num_sets - 1}"
            )
        if not _is_index(experiment_index) or not (
            0 <= experiment_index < experiments_per_set
        ):
            raise ScoringError(
                f"{where}: experiment {experiment_index!r} is not in "
                f"0 .. {experiments_per_set - 1}"
            )
        if (set_index, experiment_index) in seen:
            raise ScoringError(
                f"{where}: set {set_index} experiment {experiment_index} appears twice"
            )
        seen.add((set_index, experiment_index))
        for key in PREDICTION_KEYS:
            value = record.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ScoringError(f"{where}: {key} is missing or not a number")
            # float() raises OverflowError for an integer beyond the float range.
            try:
                finite = math.isfinite(float(value))
            except OverflowError:
                finite = False
            if not finite:
                raise ScoringError(f"{where}: {key} is not finite")
    return records


def compute_scores(records, mu_true):
    """Return the flat scores dict of the records against the true mu of each set."""
    metric = load_metric()
    set_indices = np.array([record["set"] for record in records], dtype=np.int64)
    columns = {
        key: np.array([record[key] for record in records], dtype=np.float64)
        for key in PREDICTION_KEYS
    }
    truth = mu_true[set_indices]

    scores = metric.score(truth, columns["p16"], columns["p84"], columns["mu_hat"])
    scores["experiments"] = float(len(records))

    scored_sets = np.unique(set_indices)
    if len(scored_sets) <= MAX_SETS_WITH_PER_SET_SCORES:
        for set_index in scored_sets:
            in_set = set_indices == set_index
            per_set = metric.score(
                truth[in_set],
                columns["p16"][in_set],
                columns["p84"][in_set],
                columns["mu_hat"][in_set],
            )
            for name in ("coverage", "interval", "rmse"):
                scores[f"set_{set_index}.{name}"] = per_set[name]
    else:
        LOG.info(
            "%d sets exceed %d, so scores.json has no per-set figures",
            len(scored_sets),
            MAX_SETS_WITH_PER_SET_SCORES,
        )

    for name, value in scores.items():
        if not SCORE_NAME.match(name):
            raise ScoringError(
                f"score name {name!r} does not match {SCORE_NAME.pattern}"
            )
        if not math.isfinite(value):
            raise ScoringError(
                f"score {name} is not finite ({value}): the predictions are too large"
            )
    return scores


def write_scores(output_dir, scores):
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, SCORES_FILE)
    partial_path = path + ".partial"
    with open(partial_path, "w", encoding="utf-8") as handle:
        json.dump(scores, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(partial_path, path)
    return path


def run_scoring(predictions_path, reference_dir, output_dir):
    """Score the predictions, write OUTPUT/scores.json and return the scores dict."""
    mu_true, experiments_per_set = load_reference(reference_dir)
    records = load_predictions(predictions_path, len(mu_true), experiments_per_set)
    scores = compute_scores(records, mu_true)
    path = write_scores(output_dir, scores)
    LOG.info(
        "scored %d experiments (quantiles_score %.4f, coverage %.3f), wrote %s",
        len(records),
        scores["quantiles_score"],
        scores["coverage"],
        path,
    )
    return scores


def main(argv=None):
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    parser = argparse.ArgumentParser(
        description="Score HiggsML demo predictions against the true mu of each set."
    )
    parser.add_argument(
        "--predictions",
        required=True,
        help="predictions.json, or the folder containing it",
    )
    parser.add_argument("--reference", required=True, help="reference_data folder")
    parser.add_argument(
        "--output", required=True, help="folder for scores.json (created if missing)"
    )
    args = parser.parse_args(argv)
    try:
        run_scoring(args.predictions, args.reference, args.output)
    except ScoringError as error:
        LOG.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
