"""Random predictions and the example challenge's scoring program, for tests and bench/.

bench/scoring.py loads this file by its path, so it must not import other test modules.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np

from fairu.broker.predictions import Predictions
from fairu.protocol.evaluation import ShardState, ShardStatus

SCORE_PATH = (
    Path(__file__).resolve().parents[1]
    / "examples"
    / "higgsml-demo"
    / "scoring_program"
    / "score.py"
)


def load_score_program(module_name: str) -> ModuleType:
    """Load the example's score.py, which is not an installed module."""
    spec = importlib.util.spec_from_file_location(module_name, SCORE_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shard_status(
    index: int,
    first_set: int,
    sets: int,
    first_experiment: int,
    experiments: int,
    state: ShardState = ShardState.RUNNING,
) -> ShardStatus:
    """Return the status of a shard on its first attempt."""
    return ShardStatus(
        index=index,
        first_set=first_set,
        sets=sets,
        first_experiment=first_experiment,
        experiments=experiments,
        state=state,
        attempts=1,
    )


def random_predictions(
    rng: np.random.Generator,
    num_sets: int,
    experiments: int,
    *,
    first_set: int = 0,
    bias: float = 0.0,
    half_width_mean: float = 0.3,
    half_width_sd: float = 0.1,
    skewed_p84: bool = False,
) -> tuple[Predictions, np.ndarray]:
    """Return predictions for a full grid of sets and experiments, and mu_true.

    Sets run from `first_set`, and mu_true has an entry for each set below
    `first_set + num_sets`. mu_hat is mu_true plus `bias` plus N(0, 0.3) noise. The
    half width is |N(half_width_mean, half_width_sd)|, and p16 lies one half width
    below mu_hat. p84 lies one half width above it, or, with
    `skewed_p84`, a U(0.5, 1.5) multiple of the half width above it.
    """
    set_index = np.repeat(
        np.arange(first_set, first_set + num_sets, dtype=np.int64), experiments
    )
    experiment = np.tile(np.arange(experiments, dtype=np.int64), num_sets)
    mu_true = rng.uniform(0.5, 2.0, first_set + num_sets)
    mu_hat = mu_true[set_index] + bias + rng.normal(0.0, 0.3, set_index.size)
    half_width = np.abs(rng.normal(half_width_mean, half_width_sd, set_index.size))
    if skewed_p84:
        p84 = mu_hat + rng.uniform(0.5, 1.5, set_index.size) * half_width
    else:
        p84 = mu_hat + half_width
    predictions = Predictions(
        set=set_index,
        experiment=experiment,
        mu_hat=mu_hat,
        delta_mu_hat=half_width,
        p16=mu_hat - half_width,
        p84=p84,
    )
    return predictions, mu_true
