"""Ingestion program of the HiggsML uncertainty demo challenge.

The program loads the participant's Model class from SUBMISSION/model.py, trains it
once on the training set in INPUT/train.npz, and calls its predict method for an
estimate of the signal strength mu and its 68 % interval on each pseudo-experiment.
It writes OUTPUT/predictions.json, a JSON list of records with the keys set,
experiment, mu_hat, delta_mu_hat, p16 and p84.

Pseudo-experiments are generated here, not read from disk. Experiment j of set i
uses a random generator seeded with (base_seed, i, j) alone, so a record does not
depend on which range of experiments a run covers. The model receives the events of
an experiment with unit weights, but not their labels, the set's true mu or the TES
factor alpha of the experiment.

The code runs on NumPy 1.24 (Debian bookworm) and NumPy 2.x, and make_data.py
imports the generator functions from this file.
"""

import argparse
import importlib.util
import json
import logging
import math
import os
import sys
import time

import numpy as np

# /inputs is mounted read-only in the container, so importing model.py must not try
# to write a __pycache__ folder next to the participant's files.
sys.dont_write_bytecode = True

LOG = logging.getLogger("ingestion")

SETTINGS_FILE = "settings.json"
TRAIN_FILE = "train.npz"
PREDICTIONS_FILE = "predictions.json"
MODEL_FILE = "model.py"

# Feature columns, in GeV except delta_r. The tau energy scale (TES) multiplies the
# energy-like columns only.
FEATURES = ("mass_vis", "pt_h", "delta_r")
ENERGY_FEATURES = ("mass_vis", "pt_h")

# Labels of the training set.
SIGNAL_LABEL = 1
BACKGROUND_LABEL = 0

# Stream tags of the seed key [base_seed, stream, set_index, experiment_index].
# Every key has four entries because np.random.SeedSequence gives keys that differ
# only by trailing zeros, such as [5, 1] and [5, 1, 0], the same state.
TRAIN_STREAM = 0
MU_STREAM = 1
EXPERIMENT_STREAM = 2

PREDICTION_KEYS = ("mu_hat", "delta_mu_hat", "p16", "p84")

SETTINGS_KEYS = (
    "num_sets",
    "experiments_per_set",
    "base_seed",
    "signal_yield",
    "background_yield",
    "tes_sigma",
    "mu_range",
)


class IngestionError(Exception):
    """Invalid input data, submission or options, with a message for the user."""


# ---------------------------------------------------------------------------
# Toy generator
# ---------------------------------------------------------------------------


def sample_signal(rng, n_events):
    """Draw n_events signal events: a Gaussian mass peak at 125 GeV of width 10 GeV."""
    mass_vis = rng.normal(125.0, 10.0, n_events)
    pt_h = 20.0 + rng.exponential(50.0, n_events)
    delta_r = np.clip(rng.normal(1.8, 0.5, n_events), 0.4, 5.0)
    return {"mass_vis": mass_vis, "pt_h": pt_h, "delta_r": delta_r}


def sample_background(rng, n_events):
    """Draw n_events background events, whose mass falls exponentially above 40 GeV."""
    mass_vis = 40.0 + rng.exponential(35.0, n_events)
    pt_h = 10.0 + rng.exponential(30.0, n_events)
    delta_r = np.clip(rng.normal(2.6, 0.8, n_events), 0.4, 5.0)
    return {"mass_vis": mass_vis, "pt_h": pt_h, "delta_r": delta_r}


def systematics(data_set, tes=1.0):
    """Return a copy of data_set with the energy-like features multiplied by tes.

    data_set is a dict with a "data" entry that maps feature names to arrays, as
    the training and test sets are. Other entries (labels, weights) are shared with
    the input, not copied. This is the function that the model receives.
    """
    features = dict(data_set["data"])
    for name in ENERGY_FEATURES:
        features[name] = features[name] * np.asarray(tes, dtype=features[name].dtype)
    shifted = dict(data_set)
    shifted["data"] = features
    return shifted


def make_rng(settings, stream, set_index=0, experiment_index=0):
    key = [int(settings["base_seed"]), stream, int(set_index), int(experiment_index)]
    return np.random.default_rng(key)


def true_mu(settings, set_index):
    """Return the true signal strength of set set_index, drawn uniformly in mu_range."""
    low, high = settings["mu_range"]
    rng = make_rng(settings, MU_STREAM, set_index)
    return float(rng.uniform(low, high))


def _merge_shuffled(rng, signal, background):
    """Concatenate signal and background columns in one random order.

    Returns (features, is_signal). Shuffling keeps the position of an event from
    revealing its label.
    """
    n_total = len(signal["mass_vis"]) + len(background["mass_vis"])
    order = rng.permutation(n_total)
    features = {}
    for name in FEATURES:
        column = np.concatenate([signal[name], background[name]])
        features[name] = column[order].astype(np.float32)
    is_signal = np.zeros(n_total, dtype=bool)
    is_signal[: len(signal["mass_vis"])] = True
    return features, is_signal[order]


def generate_training_set(settings, n_signal, n_background):
    """Generate the nominal (alpha = 1) training set from the training seed stream.

    The weights of each class add up to its nominal yield, so the weighted set
    describes one pseudo-experiment at mu = 1. Returns a dict with "data" (feature
    name -> float32 array), "labels" (uint8, 1 for signal) and "weights" (float64).
    """
    rng = make_rng(settings, TRAIN_STREAM)
    signal = sample_signal(rng, n_signal)
    background = sample_background(rng, n_background)
    features, is_signal = _merge_shuffled(rng, signal, background)

    labels = np.where(is_signal, SIGNAL_LABEL, BACKGROUND_LABEL).astype(np.uint8)
    weights = np.where(
        is_signal,
        float(settings["signal_yield"]) / n_signal,
        float(settings["background_yield"]) / n_background,
    )
    return {"data": features, "labels": labels, "weights": weights}


def generate_pseudo_experiment(settings, set_index, experiment_index):
    """Generate experiment experiment_index of set set_index.

    The signal and background counts are Poisson draws around mu * signal_yield and
    background_yield. A TES factor alpha ~ Normal(1, tes_sigma) then scales the
    energy-like features of all events. Returns (test_set, alpha), where test_set
    has "data" and unit "weights" but no labels.
    """
    rng = make_rng(settings, EXPERIMENT_STREAM, set_index, experiment_index)
    mu = true_mu(settings, set_index)
    alpha = float(rng.normal(1.0, float(settings["tes_sigma"])))
    n_signal = int(rng.poisson(mu * float(settings["signal_yield"])))
    n_background = int(rng.poisson(float(settings["background_yield"])))

    signal = sample_signal(rng, n_signal)
    background = sample_background(rng, n_background)
    features, _ = _merge_shuffled(rng, signal, background)

    test_set = {"data": features, "weights": np.ones(n_signal + n_background)}
    return systematics(test_set, alpha), alpha


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def load_settings(input_dir):
    path = os.path.join(input_dir, SETTINGS_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            settings = json.load(handle)
    except FileNotFoundError:
        raise IngestionError(
            f"settings file not found: {path}. Pass the input_data folder as --input."
        ) from None
    except json.JSONDecodeError as error:
        raise IngestionError(
            f"settings file {path} is not valid JSON: {error}"
        ) from None

    missing = [key for key in SETTINGS_KEYS if key not in settings]
    if missing:
        raise IngestionError(f"settings file {path} is missing keys: {missing}")
    for key in ("num_sets", "experiments_per_set"):
        if not isinstance(settings[key], int) or settings[key] < 1:
            raise IngestionError(f"{key} in {path} must be a positive integer")
    if not isinstance(settings["base_seed"], int) or settings["base_seed"] < 0:
        raise IngestionError(f"base_seed in {path} must be a non-negative integer")
    for key in ("signal_yield", "background_yield", "tes_sigma"):
        if not _is_number(settings[key]) or settings[key] < 0:
            raise IngestionError(f"{key} in {path} must be a non-negative number")
    mu_range = settings["mu_range"]
    if (
        not isinstance(mu_range, list)
        or len(mu_range) != 2
        or not all(_is_number(bound) for bound in mu_range)
        or mu_range[0] > mu_range[1]
    ):
        raise IngestionError(f"mu_range in {path} must be [low, high] with low <= high")
    return settings


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_training_set(input_dir):
    """Load INPUT/train.npz as a dict with "data", "labels" and "weights"."""
    path = os.path.join(input_dir, TRAIN_FILE)
    try:
        archive = np.load(path)
    except FileNotFoundError:
        raise IngestionError(
            f"training set not found: {path}. Regenerate input_data with make_data.py."
        ) from None
    with archive:
        data = {name: archive[name] for name in FEATURES}
        return {
            "data": data,
            "labels": archive["labels"],
            "weights": archive["weights"],
        }


def load_model_class(submission_dir):
    """Import SUBMISSION/model.py and return its Model class.

    The submission folder goes first on sys.path so that model.py can import its
    own helper modules. Callers remove it again with _remove_from_path.
    """
    path = os.path.join(submission_dir, MODEL_FILE)
    if not os.path.isfile(path):
        raise IngestionError(
            f"submission has no {MODEL_FILE}: {path} not found. "
            "Pass the folder that contains model.py as --submission."
        )

    sys.path.insert(0, os.path.abspath(submission_dir))
    spec = importlib.util.spec_from_file_location("model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["model"] = module
    spec.loader.exec_module(module)

    model_class = getattr(module, "Model", None)
    if model_class is None:
        raise IngestionError(f"{path} defines no class named Model")
    return model_class


def _remove_from_path(submission_dir):
    entry = os.path.abspath(submission_dir)
    if entry in sys.path:
        sys.path.remove(entry)


def resolve_range(name, first, count, total):
    """Return (first, count) with count defaulting to the rest of 0 .. total - 1."""
    if first < 0 or first >= total:
        raise IngestionError(f"--first-{name} {first} is out of range 0 .. {total - 1}")
    if count is None:
        count = total - first
    if count < 1 or first + count > total:
        raise IngestionError(
            f"--{name}s {count} starting at {first} is out of range: "
            f"the settings define {total} {name}s"
        )
    return first, count


# ---------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------


def validate_prediction(prediction, set_index, experiment_index):
    """Return the prediction as a record, or raise IngestionError if it is invalid."""
    where = f"set {set_index} experiment {experiment_index}"
    if not isinstance(prediction, dict):
        raise IngestionError(
            f"Model.predict returned {type(prediction).__name__} for {where}, "
            f"expected a dict with keys {list(PREDICTION_KEYS)}"
        )
    record = {"set": set_index, "experiment": experiment_index}
    for key in PREDICTION_KEYS:
        if key not in prediction:
            raise IngestionError(f"Model.predict result for {where} is missing {key!r}")
        try:
            value = float(prediction[key])
        except (TypeError, ValueError):
            raise IngestionError(
                f"{key} for {where} is not a number: {prediction[key]!r}"
            ) from None
        if not math.isfinite(value):
            raise IngestionError(f"{key} for {where} is not finite: {value}")
        record[key] = value
    if record["p16"] > record["p84"]:
        raise IngestionError(
            f"p16 {record['p16']} exceeds p84 {record['p84']} for {where}"
        )
    return record


def write_predictions(output_dir, records):
    """Write the records to OUTPUT/predictions.json, one record a line."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, PREDICTIONS_FILE)
    partial_path = path + ".partial"
    lines = [json.dumps(record) for record in records]
    with open(partial_path, "w", encoding="utf-8") as handle:
        handle.write("[\n" + ",\n".join(lines) + "\n]\n")
    os.replace(partial_path, path)
    return path


def run_ingestion(
    input_dir,
    submission_dir,
    output_dir,
    first_set=0,
    sets=None,
    first_experiment=0,
    experiments=None,
    base_seed=None,
):
    """Train the submission's model, predict the selected experiments, write them.

    sets and experiments are counts that default to the rest of the settings'
    range. base_seed, when given, replaces the settings' base_seed. Returns the
    list of prediction records in (set, experiment) order.
    """
    settings = load_settings(input_dir)
    if base_seed is not None:
        if base_seed < 0:
            raise IngestionError(f"--base-seed {base_seed} must be a non-negative integer")
        settings["base_seed"] = base_seed
    first_set, sets = resolve_range("set", first_set, sets, settings["num_sets"])
    first_experiment, experiments = resolve_range(
        "experiment", first_experiment, experiments, settings["experiments_per_set"]
    )
    LOG.info(
        "running sets %d..%d, experiments %d..%d",
        first_set,
        first_set + sets - 1,
        first_experiment,
        first_experiment + experiments - 1,
    )

    def get_train_set():
        return load_training_set(input_dir)

    try:
        model_class = load_model_class(submission_dir)
        started = time.monotonic()
        model = model_class(get_train_set=get_train_set, systematics=systematics)
        model.fit()
        LOG.info("model trained in %.2f s", time.monotonic() - started)

        started = time.monotonic()
        records = []
        for set_index in range(first_set, first_set + sets):
            for experiment_index in range(
                first_experiment, first_experiment + experiments
            ):
                test_set, _ = generate_pseudo_experiment(
                    settings, set_index, experiment_index
                )
                prediction = model.predict(test_set)
                records.append(
                    validate_prediction(prediction, set_index, experiment_index)
                )
        LOG.info(
            "predicted %d experiments in %.2f s",
            len(records),
            time.monotonic() - started,
        )
    finally:
        _remove_from_path(submission_dir)

    path = write_predictions(output_dir, records)
    LOG.info("wrote %s", path)
    return records


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Train a HiggsML demo submission and predict mu on "
        "pseudo-experiments."
    )
    parser.add_argument(
        "--input",
        required=True,
        help="input_data folder with settings.json and train.npz",
    )
    parser.add_argument("--submission", required=True, help="folder with model.py")
    parser.add_argument(
        "--output",
        required=True,
        help="folder for predictions.json (created if missing)",
    )
    parser.add_argument(
        "--first-set",
        type=int,
        default=0,
        help="index of the first set to run (default 0)",
    )
    parser.add_argument(
        "--sets",
        type=int,
        default=None,
        help="number of sets to run (default: the rest)",
    )
    parser.add_argument(
        "--first-experiment",
        type=int,
        default=0,
        help="index of the first experiment of each set to run (default 0)",
    )
    parser.add_argument(
        "--experiments",
        type=int,
        default=None,
        help="number of experiments per set to run (default: the rest)",
    )
    parser.add_argument(
        "--base-seed",
        type=int,
        default=None,
        help="seed of the training set, the true mu and the pseudo-experiments "
        "(default: base_seed of settings.json)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    args = parse_args(argv)
    try:
        run_ingestion(
            args.input,
            args.submission,
            args.output,
            first_set=args.first_set,
            sets=args.sets,
            first_experiment=args.first_experiment,
            experiments=args.experiments,
            base_seed=args.base_seed,
        )
    except IngestionError as error:
        LOG.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
