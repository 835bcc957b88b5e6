"""Wire and status models of a sharded evaluation.

An organizer signs an `EvaluationRequest` with a certified job-signing key, as for a
job, and hands it to the coordinator. The coordinator splits the N sets of M
pseudo-experiments into shards with disjoint ranges, publishes one signed job per
shard, checks each shard's predictions, and pools them into one score.

A shard covers a rectangle of the (set, experiment) grid: sets
`first_set .. first_set + sets - 1`, and in each of them experiments
`first_experiment .. first_experiment + experiments - 1`.

The status models are what the coordinator's HTTP API returns and what
`fairu-admin evaluations show` prints.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field, StringConstraints

from .models import (
    PROTOCOL_VERSION,
    EnvName,
    Identifier,
    InputSpec,
    Model,
    Name,
    Resources,
    ScoreName,
    ShortText,
)

# A shard job writes its predictions to /output/<PREDICTIONS_ARTIFACT>: a JSON list
# of records with the keys set, experiment, mu_hat, delta_mu_hat, p16 and p84.
PREDICTIONS_ARTIFACT = "predictions.json"

# Placeholders that the coordinator replaces in every word of a shard's command.
# {attempt} is the shard job's attempt number, 1 for the first.
SHARD_PLACEHOLDERS = (
    "{first_set}",
    "{sets}",
    "{first_experiment}",
    "{experiments}",
    "{base_seed}",
    "{attempt}",
)

MAX_SETS = 100_000
MAX_EXPERIMENTS_PER_SET = 1_000_000
MAX_SHARDS = 100_000


class ScoringProgram(Model):
    """A final job that runs the organizer's scoring program over the pooled
    predictions, mounted at /inputs/<predictions_mount>/predictions.json."""

    image: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    command: Annotated[list[ShortText], Field(min_length=1, max_length=64)]
    env: Annotated[dict[EnvName, ShortText], Field(max_length=64)] = {}
    inputs: Annotated[list[InputSpec], Field(max_length=32)] = []
    resources: Resources = Resources()
    predictions_mount: Annotated[
        str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    ] = "pooled_predictions"


class EvaluationRequest(Model):
    """One submission evaluated over num_sets x experiments_per_set pseudo-experiments."""

    protocol: Literal[1] = PROTOCOL_VERSION
    kind: Literal["evaluation"] = "evaluation"
    evaluation_id: Identifier
    competition: Name
    queue: Name
    submission_id: Identifier
    # The ingestion job of one shard; SHARD_PLACEHOLDERS in `command` are filled in.
    image: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    command: Annotated[list[ShortText], Field(min_length=1, max_length=64)]
    env: Annotated[dict[EnvName, ShortText], Field(max_length=64)] = {}
    inputs: Annotated[list[InputSpec], Field(max_length=32)] = []
    resources: Resources = Resources()
    num_sets: Annotated[int, Field(ge=1, le=MAX_SETS)]
    experiments_per_set: Annotated[int, Field(ge=1, le=MAX_EXPERIMENTS_PER_SET)]
    # Pseudo-experiments per shard.
    shard_size: Annotated[int, Field(ge=1, le=MAX_SETS * MAX_EXPERIMENTS_PER_SET)]
    # Experiment j of set i is generated from (base_seed, i, j) alone.
    base_seed: Annotated[int, Field(ge=0, le=2**63 - 1)]
    # The true mu of each set, for the built-in pooled metric; length num_sets.
    mu_true: Annotated[list[float], Field(min_length=1, max_length=MAX_SETS)]
    # "builtin" pools with fairu's NumPy metric; "program" also runs scoring_program.
    scoring: Literal["builtin", "program"] = "builtin"
    scoring_program: ScoringProgram | None = None
    # Attempts of one shard, counting the first, before the evaluation fails.
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    # A shard still running after this many seconds gets a second attempt on
    # another agent; the first result wins. None turns this off.
    straggler_after_s: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] | None = None
    created_at: AwareDatetime
    expires_at: AwareDatetime


class EvaluationState(StrEnum):
    RUNNING = "running"
    SCORING = "scoring"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ShardState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    RETRYING = "retrying"
    FAILED = "failed"
    # The evaluation was cancelled or failed before this shard was done.
    CANCELLED = "cancelled"


class ShardStatus(Model):
    index: Annotated[int, Field(ge=0)]
    first_set: Annotated[int, Field(ge=0)]
    sets: Annotated[int, Field(ge=1)]
    first_experiment: Annotated[int, Field(ge=0)]
    experiments: Annotated[int, Field(ge=1)]
    state: ShardState
    attempts: Annotated[int, Field(ge=0)]
    # The job id of the attempt whose result was accepted, or of the latest attempt.
    job_id: Identifier | None = None
    site: Name | None = None
    agent_id: Identifier | None = None
    duration_s: Annotated[float, Field(ge=0)] | None = None
    error: Annotated[str, StringConstraints(max_length=4096)] | None = None


class EvaluationSummary(Model):
    evaluation_id: Identifier
    competition: Name
    submission_id: Identifier
    state: EvaluationState
    shards_total: Annotated[int, Field(ge=0)]
    shards_done: Annotated[int, Field(ge=0)]
    shards_running: Annotated[int, Field(ge=0)]
    shards_failed: Annotated[int, Field(ge=0)]
    submitted_at: AwareDatetime
    finished_at: AwareDatetime | None = None
    # Estimated seconds until every shard is done; None until one shard finished.
    eta_s: Annotated[float, Field(ge=0)] | None = None
    scores: Annotated[dict[ScoreName, float], Field(max_length=100_000)] = {}
    error: Annotated[str, StringConstraints(max_length=4096)] | None = None


class EvaluationStatus(EvaluationSummary):
    shards: Annotated[list[ShardStatus], Field(max_length=MAX_SHARDS)] = []
    # Names of the evaluation's result artifacts, such as coverage.png and report.html.
    artifacts: Annotated[list[str], Field(max_length=64)] = []
