"""Pooled scoring and predictions parsing against baselines measured in the same run.

Scoring: `fairu.broker.scoring.pooled_scores` over one million pseudo-experiments, in
two layouts: 32 sets of 31,250 (the most sets that get per-set figures, so the time
includes them) and 1,000 sets of 1,000 (no per-set figures). The baselines are the
example challenge's own `compute_scores` on the same records, and the same metric
with np.sum in place of the exact sums. Each round runs all three in turn, and the
script checks that pooled_scores returns exactly the reference's dict.

Parsing: `parse_shard` of a 1,000-experiment shard's predictions.json, read from
disk, against the example's `load_predictions` of the same file.

    .venv/bin/python bench/scoring.py            # 7 rounds, about 20 s on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import common
from fairu.broker.predictions import (
    Predictions,
    encode_predictions_json,
    parse_shard,
    pool,
)
from fairu.broker.scoring import pooled_scores, summary_figures

TARGET_MS = 100.0
TARGET_EXPERIMENTS = 1_000_000


prediction_data = common.load_repo_module(
    "tests/prediction_data.py", "fairu_bench_prediction_data"
)


def naive_scores(predictions: Predictions, mu_true: np.ndarray) -> dict[str, float]:
    """Compute the global figures with np.sum, which may differ in the last bits."""
    truth = mu_true[predictions.set]
    errors = predictions.mu_hat - truth
    covered = (predictions.p16 <= truth) & (truth <= predictions.p84)
    return summary_figures(
        float(np.sum(np.abs(predictions.p84 - predictions.p16))),
        int(np.count_nonzero(covered)),
        float(np.sum(errors * errors)),
        float(np.sum(np.abs(errors))),
        len(predictions),
    )


def seconds(function: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def bench_scoring(reference, rounds: int, experiments_total: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    layouts = [(32, experiments_total // 32), (1000, experiments_total // 1000)]
    print(f"pooled scoring, {rounds} rounds, median ms")
    print(
        "layout          | pooled_scores | np.sum metric | compute_scores | "
        "vs compute_scores | vs np.sum | same as reference"
    )
    for num_sets, per_set in layouts:
        predictions, mu_true = prediction_data.random_predictions(
            rng, num_sets, per_set
        )
        records = predictions.to_records()
        times: dict[str, list[float]] = {"pooled": [], "naive": [], "reference": []}
        for _ in range(rounds):
            times["pooled"].append(seconds(pooled_scores, predictions, mu_true))
            times["naive"].append(seconds(naive_scores, predictions, mu_true))
            times["reference"].append(
                seconds(reference.compute_scores, records, mu_true)
            )
        same = pooled_scores(predictions, mu_true) == reference.compute_scores(
            records, mu_true
        )
        pooled_ms, naive_ms, reference_ms = (
            statistics.median(times[name]) * 1000
            for name in ("pooled", "naive", "reference")
        )
        layout = f"{num_sets} x {per_set}"
        print(
            f"{layout:<15} | {pooled_ms:13.1f} | {naive_ms:13.1f} | "
            f"{reference_ms:14.1f} | {reference_ms / pooled_ms:17.1f} | "
            f"{pooled_ms / naive_ms:9.2f} | {'yes' if same else 'NO'}"
        )
        if len(predictions) == TARGET_EXPERIMENTS:
            verdict = "met" if pooled_ms <= TARGET_MS else "missed"
            print(f"  target {TARGET_MS:.0f} ms for one million experiments: {verdict}")


def bench_parsing(reference, rounds: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # A shard of 1,000 experiments: 2 sets of 500, as the coordinator could cut it.
    predictions, mu_true = prediction_data.random_predictions(rng, 2, 500, first_set=6)
    shard = prediction_data.shard_status(3, 6, 2, 0, 500)
    with tempfile.TemporaryDirectory(prefix="fairu-bench-scoring-") as folder:
        path = Path(folder) / "predictions.json"
        path.write_bytes(encode_predictions_json(predictions))
        ours = []
        theirs = []
        for _ in range(rounds * 10):
            ours.append(seconds(lambda: parse_shard(path.read_bytes(), shard)))
            theirs.append(
                seconds(
                    lambda: reference.load_predictions(str(path), len(mu_true), 500)
                )
            )
        size = path.stat().st_size
    ours_ms = statistics.median(ours) * 1000
    theirs_ms = statistics.median(theirs) * 1000
    print(f"\nparsing a 1,000-experiment shard ({size} bytes), median of {len(ours)}")
    print(f"  parse_shard (read, parse, validate, completeness): {ours_ms:.2f} ms")
    print(f"  example load_predictions (read, parse, validate):  {theirs_ms:.2f} ms")
    print(f"  ratio load_predictions / parse_shard: {theirs_ms / ours_ms:.1f}")


def bench_pooling(rounds: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    parts = [
        prediction_data.random_predictions(rng, 1, 1000, first_set=index)[0]
        for index in range(1000)
    ]
    pool_ms = statistics.median(seconds(pool, parts) for _ in range(rounds)) * 1000
    pooled = pool(parts)
    encode_ms = seconds(encode_predictions_json, pooled) * 1000
    print(f"\npool of 1,000 shards of 1,000 with the repeat check: {pool_ms:.1f} ms")
    print(f"encode_predictions_json of {len(pooled)} records: {encode_ms:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds per figure")
    parser.add_argument(
        "--experiments", type=int, default=1_000_000, help="pooled experiments"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the random data")
    args = parser.parse_args()
    if args.rounds < 1 or args.experiments < 1000:
        parser.error("--rounds must be at least 1 and --experiments at least 1000")

    reference = prediction_data.load_score_program("higgsml_demo_score_bench")
    bench_scoring(reference, args.rounds, args.experiments, args.seed)
    bench_parsing(reference, args.rounds, args.seed)
    bench_pooling(args.rounds, args.seed)


if __name__ == "__main__":
    main()
