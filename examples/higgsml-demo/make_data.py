"""Generate the data folders of the HiggsML uncertainty demo challenge.

OUT/input_data/ receives settings.json and the training set train.npz, and
OUT/reference_data/ receives mu_true.json with the true signal strength of each set.
Everything follows from the settings, base_seed included, so two runs with the same
options write byte-identical files. The event generator lives in
ingestion_program/ingestion.py, which creates the pseudo-experiments from the same
settings at evaluation time.

Usage: python3 make_data.py --out DIR [--seed N] [--sets N] [--experiments M]
"""

import argparse
import importlib.util
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
INGESTION_PATH = os.path.join(HERE, "ingestion_program", "ingestion.py")

INPUT_DIR = "input_data"
REFERENCE_DIR = "reference_data"
REFERENCE_FILE = "mu_true.json"

# Defaults sized so that a full evaluation (4 sets x 25 experiments of about 3,600
# events each) takes well under a second, about 0.2 s measured on a 2-core x86-64
# host, and train.npz stays near 1.1 MB.
DEFAULT_SETTINGS = {
    "num_sets": 4,
    "experiments_per_set": 25,
    "base_seed": 2024,
    # Expected event counts of one pseudo-experiment at mu = 1 and alpha = 1.
    "signal_yield": 300.0,
    "background_yield": 3000.0,
    # Standard deviation of the tau energy scale factor alpha around 1.
    "tes_sigma": 0.01,
    # Interval from which the true mu of each set is drawn uniformly.
    "mu_range": [0.5, 2.0],
    "train_signal_events": 20000,
    "train_background_events": 80000,
}


def load_ingestion():
    """Import ingestion_program/ingestion.py by path, since the bundle is no package."""
    spec = importlib.util.spec_from_file_location(
        "higgsml_demo_ingestion", INGESTION_PATH
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
        handle.write("\n")


def make_data(out_dir, **overrides):
    """Write OUT/input_data and OUT/reference_data and return their paths.

    overrides replace entries of DEFAULT_SETTINGS, for example base_seed=7.
    Raises KeyError for a name that DEFAULT_SETTINGS does not contain.
    """
    unknown = sorted(set(overrides) - set(DEFAULT_SETTINGS))
    if unknown:
        raise KeyError(f"unknown settings: {unknown}")
    settings = dict(DEFAULT_SETTINGS, **overrides)
    ingestion = load_ingestion()
    settings["features"] = list(ingestion.FEATURES)

    input_dir = os.path.join(out_dir, INPUT_DIR)
    reference_dir = os.path.join(out_dir, REFERENCE_DIR)
    os.makedirs(input_dir, exist_ok=True)
    os.makedirs(reference_dir, exist_ok=True)

    training_set = ingestion.generate_training_set(
        settings, settings["train_signal_events"], settings["train_background_events"]
    )
    arrays = dict(training_set["data"])
    arrays["labels"] = training_set["labels"]
    arrays["weights"] = training_set["weights"]
    # The file is byte-identical across runs: np.savez_compressed opens each member
    # by name, and zipfile in CPython 3.11 then stamps it 1980-01-01, not the time.
    np.savez_compressed(os.path.join(input_dir, ingestion.TRAIN_FILE), **arrays)
    write_json(os.path.join(input_dir, ingestion.SETTINGS_FILE), settings)

    reference = {
        "mu_true": [
            ingestion.true_mu(settings, i) for i in range(settings["num_sets"])
        ],
        "num_sets": settings["num_sets"],
        "experiments_per_set": settings["experiments_per_set"],
    }
    write_json(os.path.join(reference_dir, REFERENCE_FILE), reference)
    return input_dir, reference_dir


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Generate the HiggsML demo data folders."
    )
    parser.add_argument(
        "--out",
        required=True,
        help="folder that receives input_data/ and reference_data/",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SETTINGS["base_seed"],
        help="base seed (>= 0)",
    )
    parser.add_argument(
        "--sets", type=int, default=DEFAULT_SETTINGS["num_sets"], help="number of sets"
    )
    parser.add_argument(
        "--experiments",
        type=int,
        default=DEFAULT_SETTINGS["experiments_per_set"],
        help="number of pseudo-experiments per set",
    )
    args = parser.parse_args(argv)
    if args.seed < 0 or args.sets < 1 or args.experiments < 1:
        parser.error("--seed must be >= 0 and --sets and --experiments >= 1")

    input_dir, reference_dir = make_data(
        args.out,
        base_seed=args.seed,
        num_sets=args.sets,
        experiments_per_set=args.experiments,
    )
    print(f"wrote {input_dir} and {reference_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
